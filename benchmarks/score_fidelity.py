"""Does the curvature score keep what matters?

On a small VGG and a small ResNet trained for a few epochs on real Fashion-MNIST:

1. the pruning curve: test accuracy and loss right after one-shot pruning (no fine-tuning, no
   BatchNorm re-estimation) at several keeps, for every scoring method under the same
   allocation, over several draws of the scoring batches;
2. per layer, the Spearman correlation between each method's channel score and the true loss
   increase when that channel alone is removed (measured on held-out samples).

    python -m benchmarks.score_fidelity            # full run, writes benchmarks/results/
    python -m benchmarks.score_fidelity --quick    # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from benchmarks.common import (
    Timer,
    env_line,
    environment,
    fmt_ms,
    md_table,
    mean_std,
    spearman,
    write_results,
)
from cahfp.data import load_dataset
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.pruning.groups import OUT, param_dims
from cahfp.training import Recipe, evaluate, train

# name -> (score_groups kwargs, make_plan kwargs)
METHODS: dict[str, tuple[dict, dict]] = {
    "cahfp (curvature per channel)": ({"method": "curvature"}, {}),
    "cahfp, joint set objective": ({"method": "curvature"}, {"interactions": True}),
    "curvature, no first-order": ({"method": "curvature", "first_order": False}, {}),
    "curvature, diag-Fisher": ({"method": "curvature", "curvature_kind": "diag-fisher"}, {}),
    "curvature, Hutchinson": ({"method": "curvature", "curvature_kind": "hutchinson"}, {}),
    "taylor": ({"method": "taylor"}, {}),
    "magnitude": ({"method": "magnitude"}, {}),
    "random": ({"method": "random"}, {}),
}
OURS = ["cahfp (curvature per channel)", "cahfp, joint set objective"]
MAIN = [*OURS, "taylor", "magnitude", "random"]
BASELINES = ["taylor", "magnitude", "random"]
SIGNED = "curvature, signed dL"
CORR_METHODS = [
    ("curvature (Fisher block)", "cahfp (curvature per channel)"),
    ("no first-order", "curvature, no first-order"),
    ("diag-Fisher", "curvature, diag-Fisher"),
    ("Hutchinson", "curvature, Hutchinson"),
    ("taylor", "taylor"),
    ("magnitude", "magnitude"),
    ("random", "random"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default="vgg11:0.5,resnet20:1.0",
        help="comma-separated NAME:WIDTH (default: %(default)s)",
    )
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--train-samples", type=int, default=50000)
    p.add_argument("--seeds", type=int, default=3, help="draws of the scoring batches")
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keeps", default="0.75,0.5,0.25")
    p.add_argument("--test-samples", type=int, default=5000)
    p.add_argument("--recal-samples", type=int, default=1024)
    p.add_argument("--corr-channels", type=int, default=12, help="channels sampled per layer")
    p.add_argument("--corr-samples", type=int, default=2000, help="held-out samples for true dL")
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.train_samples, args.seeds = "vgg11:0.25", 0.3, 3000, 1
        args.test_samples, args.corr_channels, args.corr_samples = 500, 3, 200
        args.recal_samples, args.keeps = 256, "0.5"
    return args


def recalibrate_bn(module: nn.Module, data, samples: int) -> nn.Module:
    """Copy of ``module`` with BatchNorm running statistics re-estimated (no weight change)."""
    m = copy.deepcopy(module).train()
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
    with torch.no_grad():
        for x, _ in data.subset(range(min(samples, len(data)))).batches(256, augment=False):
            m(x)
    return m.eval()


def without_channel(model: nn.Module, group, channel: int) -> nn.Module:
    """Copy of ``model`` with one channel of ``group`` removed (its output parameters zeroed)."""
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    for mem in group.members:
        if mem.role != OUT:
            continue
        module = modules[mem.module]
        for pname, dim in param_dims(module, OUT):
            t = getattr(module, pname)
            if isinstance(t, nn.Parameter):
                t.data.index_fill_(dim, mem.idxs[mem.root == channel], 0.0)
    return m


def signed_prediction(scores, group) -> torch.Tensor:
    """The curvature estimate before taking its absolute value: -g.w + 1/2 E[(g_x.w)^2]."""
    start = sum(g.size for g in scores.groups.groups[: group.gid])
    a = scores.directional[:, start : start + group.size].double()
    return -a.mean(0) + 0.5 * (a * a).mean(0)


def run_model(name: str, width: float, args, train_set, test_set, log) -> dict:
    keeps = [float(k) for k in args.keeps.split(",")]
    fit = train_set.subset(range(min(args.train_samples, len(train_set) - args.corr_samples)))
    held_out = train_set.subset(range(len(train_set) - args.corr_samples, len(train_set)))
    test = test_set.subset(range(min(args.test_samples, len(test_set))))
    model = build_model(name, 10, 1, width, seed=0)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)
    with Timer() as t_train:
        train(model, fit, recipe, seed=0)
    model.eval()
    dense = evaluate(model, test)
    log(
        f"{name} x{width}: trained {args.epochs} epochs on {len(fit)} samples in "
        f"{t_train.seconds:.0f} s, dense accuracy {dense.accuracy:.4f}"
    )
    out = {
        "model": name,
        "width": width,
        "dense_accuracy": dense.accuracy,
        "dense_loss": dense.loss,
        "train_seconds": t_train.seconds,
        "curves": {},
        "recal": {},
        "score_seconds": {},
        "correlation": {},
    }
    scores_seed0 = {}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(1000 + seed)
        idx = torch.randperm(len(fit), generator=gen)[: args.score_batches * args.batch_size]
        batches = list(fit.subset(idx).batches(args.batch_size))
        for method, (skw, pkw) in METHODS.items():
            scores = score_groups(model, batches, num_batches=args.score_batches, seed=seed, **skw)
            out["score_seconds"].setdefault(method, []).append(scores.info["seconds"])
            if seed == 0:
                scores_seed0[method] = scores
            for allocation in ("global", "uniform"):
                if allocation == "uniform" and method not in MAIN:
                    continue
                for keep in keeps:
                    plan = make_plan(model, scores, keep, allocation=allocation, **pkw)
                    sub = extract(model, plan).module.eval()
                    res = evaluate(sub, test)
                    rec = out["curves"].setdefault(
                        f"{allocation}|{method}|{keep}", {"accuracy": [], "loss": [], "flops": []}
                    )
                    rec["accuracy"].append(res.accuracy)
                    rec["loss"].append(res.loss)
                    rec["flops"].append(plan.flops_fraction)
                    if seed == 0 and allocation == "global":
                        r = evaluate(recalibrate_bn(sub, fit, args.recal_samples), test)
                        out["recal"][f"{method}|{keep}"] = r.accuracy
        log(f"  scoring draw {seed + 1}/{args.seeds} done")
    # Per-layer rank correlation with the true single-channel loss increase.
    base = evaluate(model, held_out).loss
    gen = torch.Generator().manual_seed(7)
    groups = scores_seed0[MAIN[0]].groups
    for g in groups:
        chans = torch.randperm(g.size, generator=gen)[: min(args.corr_channels, g.size)]
        true = [evaluate(without_channel(model, g, int(c)), held_out).loss - base for c in chans]
        row = {"size": g.size, "channels": len(chans), "true_mean": sum(true) / len(true)}
        for label, method in CORR_METHODS:
            row[label] = spearman(scores_seed0[method].values[g.gid][chans], true)
        row[SIGNED] = spearman(signed_prediction(scores_seed0[MAIN[0]], g)[chans], true)
        out["correlation"][g.name] = row
    log(f"  correlations over {len(groups)} layers done")
    return out


def report(results: list[dict], args, env: dict, seconds: float) -> str:
    keeps = [float(k) for k in args.keeps.split(",")]
    cmd = "python -m benchmarks.score_fidelity" + (" --quick" if args.quick else "")
    lines = [
        "# Score fidelity: does the curvature score keep what matters?",
        "",
        f"Measured {env_line(env)}; whole run {seconds / 60:.1f} min. Reproduce: `{cmd}`.",
        "",
        "Setup: real Fashion-MNIST. Each model is trained from a fixed seed for "
        f"{args.epochs:g} epochs on {args.train_samples} training images (SGD, lr 0.05, momentum "
        f"0.9, batch {args.batch_size}). Scores use {args.score_batches} batches of "
        f"{args.batch_size} training images; {args.seeds} draws of those batches (and of the "
        "random scores) give the mean ± standard deviation. Accuracy and loss are measured on "
        f"the first {args.test_samples} test images right after one-shot pruning: no "
        "fine-tuning and no BatchNorm re-estimation. `keep` is the fraction of dense training "
        "FLOPs (FlopCounterMode); the achieved fraction is within the planner's bounds.",
        "",
        "Allocation: `global` lets the planner choose per-layer widths (score per FLOP saved); "
        "`uniform` keeps the same fraction in every layer. `cahfp` (the default) ranks "
        "channels by their own second-order score |dL|; `cahfp, joint set objective` plans "
        "with the same terms jointly (`-g.1_S + 1/2 1_S' F 1_S`, cross terms included, see "
        "docs/method.md). The other `curvature` rows are ablations of the default.",
        "",
    ]
    verdicts = []
    for r in results:
        title = f"{r['model']} (width {r['width']:g}): dense accuracy {r['dense_accuracy']:.4f}"
        lines += [f"## {title}", ""]
        for allocation, methods in (("global", list(METHODS)), ("uniform", MAIN)):
            rows = []
            for method in methods:
                row = [method]
                for keep in keeps:
                    rec = r["curves"][f"{allocation}|{method}|{keep}"]
                    row.append(f"{fmt_ms(rec['accuracy'])} ({mean_std(rec['loss'])[0]:.2f})")
                rows.append(row)
            lines += [
                f"Accuracy (mean loss) after one-shot pruning, `{allocation}` allocation:",
                "",
                md_table(["method"] + [f"keep {k:g}" for k in keeps], rows),
                "",
            ]
        rows = [[m] + [f"{r['recal'][f'{m}|{k}']:.3f}" for k in keeps] for m in METHODS]
        lines += [
            "For reference, the same `global` plans (first draw) after re-estimating "
            f"BatchNorm statistics on {args.recal_samples} training images (still no "
            "weight update):",
            "",
            md_table(["method"] + [f"keep {k:g}" for k in keeps], rows),
            "",
        ]
        corr = r["correlation"]
        labels = [lab for lab, _ in CORR_METHODS] + [SIGNED]
        rows = [
            [layer, f"{c['channels']}/{c['size']}", f"{c['true_mean']:+.4f}"]
            + [f"{c[lab]:.2f}" for lab in labels]
            for layer, c in corr.items()
        ]
        rows.append(
            ["**mean**", "", ""]
            + [
                f"**{mean_std([c[lab] for c in corr.values() if c[lab] == c[lab]])[0]:.2f}**"
                for lab in labels
            ]
        )
        lines += [
            f"Spearman correlation per layer between the channel score and the true loss "
            f"increase of removing that channel alone, on {args.corr_samples} held-out "
            "training images (`channels` sampled of the layer's total; `mean dL` is the "
            "average true increase; single channels move the loss very little, so these "
            "correlations are noisy; the last column ranks by the signed estimate "
            "`-g.w + 1/2 w'Fw` instead of its absolute value):",
            "",
            md_table(["layer (group root)", "channels", "mean dL", *labels], rows),
            "",
        ]
        for keep in keeps:
            if keep not in (0.75, 0.5):
                continue
            for allocation in ("global", "uniform", "global + BN re-estimated"):

                def acc(method, a=allocation, k=keep, r=r):
                    if a.startswith("global +"):
                        return r["recal"][f"{method}|{k}"]
                    return mean_std(r["curves"][f"{a}|{method}|{k}"]["accuracy"])[0]

                best = max(BASELINES, key=acc)
                for method in OURS:
                    ours, theirs = acc(method), acc(best)
                    verdicts.append(
                        f"- {r['model']}, keep {keep:g}, {allocation}: {method} {ours:.3f} vs "
                        f"best baseline ({best}) {theirs:.3f}: "
                        + ("**ahead**" if ours > theirs else "**behind**")
                        + f" by {abs(ours - theirs) * 100:.1f} points"
                    )
    secs = {m: mean_std(v)[0] for m, v in results[0]["score_seconds"].items()} if results else {}
    lines += [
        "## Target check (keep 0.75 and 0.5; one-shot: mean over draws; BN re-estimated: "
        "first draw)",
        "",
        *verdicts,
        "",
        "## Cost of scoring",
        "",
        f"Seconds per scoring call on the first model ({args.score_batches} batches of "
        f"{args.batch_size}): "
        + ", ".join(f"{m} {s:.2f}" for m, s in secs.items())
        + ". The Fisher-block score costs one forward and one backward pass per batch "
        "(the same as a training step without the update).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    env = environment()
    train_set = load_dataset("fmnist", "train", args.data_dir)
    test_set = load_dataset("fmnist", "test", args.data_dir)
    results = []
    for spec in args.models.split(","):
        name, _, width = spec.partition(":")
        results.append(
            run_model(
                name,
                float(width or 1),
                args,
                train_set,
                test_set,
                lambda msg: print(msg, flush=True),
            )
        )
    seconds = time.perf_counter() - start
    md = report(results, args, env, seconds)
    path = write_results(
        "score_fidelity" + ("_quick" if args.quick else ""),
        md,
        {"env": env, "args": vars(args), "results": results},
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
