"""Accuracy of every strategy at the same budgets, on real Fashion-MNIST.

10 clients (device tiers cycling keep 1.0, 0.6, 0.4, 0.2), Dirichlet label skew alpha = 0.5
and 0.1, a VGG and a ResNet at CPU-sized widths; the main setting (VGG, alpha 0.5) over three
seeds. Every run is an in-process simulation through the same engine the MQTT federation uses.
Runs go two at a time in separate processes, one torch thread each (more throughput than one
process with two threads on small models); wall times are measured that way.

    python -m benchmarks.accuracy                  # the table (about an hour on 2 cores)
    python -m benchmarks.accuracy --ablations      # CA-HFP ablations on the main setting
    python -m benchmarks.accuracy --quick          # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.common import env_line, environment, md_table, mean_std, write_results
from cahfp.strategies import STRATEGIES

STRATEGY_ORDER = list(STRATEGIES)  # the registry's order
PRUNING = ["heterofl", "fedrolex", "magnitude", "random", "taylor"]

# name -> config overrides, for the CA-HFP ablations (main setting; scored on held-out training
# images, never on the test set, so that settings chosen from them are not tuned on the test set)
ABLATIONS: dict[str, dict] = {
    "cahfp (default)": {},
    "plan: joint set objective (interactions)": {"pruning.interactions": True},
    "score: no first-order term": {"pruning.first_order": False},
    "allocation: uniform": {"pruning.allocation": "uniform"},
    "refresh period 1": {"pruning.refresh_period": 1},
    "refresh period 10": {"pruning.refresh_period": 10},
    "refreshes not staggered": {"pruning.stagger_refresh": False},
    "coverage bonus 1": {"pruning.coverage_weight": 1.0},
    "sampled plans (temperature 1)": {"pruning.temperature": 1.0},
    "sampled plans (temperature 0.5)": {"pruning.temperature": 0.5},
    "sampled plans (temperature 1, falling linearly)": {
        "pruning.temperature": 1.0,
        "pruning.temperature_schedule": "linear",
    },
    "federation-wide anchor 0.5": {"pruning.anchor_weight": 0.5},
    "fill: uncovered weight 0.5": {"aggregation.uncovered_weight": 0.5},
    "BN statistics from all covering clients": {"aggregation.exact_stats": False},
    "BN variance of the pooled activations": {"aggregation.pooled_variance": True},
    "reference: Taylor (no uplink cap, its default)": {"federation.strategy": "taylor"},
    "reference: Taylor with the uplink cap": {
        "federation.strategy": "taylor",
        "pruning.budget_uplink": True,
    },
    "uncovered weight 0.5 + BN from all": {
        "aggregation.uncovered_weight": 0.5,
        "aggregation.exact_stats": False,
    },
    "uncovered weight 0.5 + BN from all + joint set objective": {
        "aggregation.uncovered_weight": 0.5,
        "aggregation.exact_stats": False,
        "pruning.interactions": True,
    },
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument(
        "--train-samples",
        type=int,
        default=6000,
        help="training images split over the 10 clients (default %(default)s)",
    )
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--vgg", default="vgg11:0.25")
    p.add_argument("--resnet", default="resnet20:0.5")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main setting")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--strategies", default=",".join(STRATEGY_ORDER))
    p.add_argument("--ablations", action="store_true", help="run the CA-HFP ablations instead")
    p.add_argument(
        "--ablation-seeds",
        default="0,1",
        help="seeds of each ablation variant (default %(default)s); ablations are evaluated on "
        "held-out training images (data.eval_split = validation), not on the test set",
    )
    p.add_argument("--runs-dir", default="runs/benchmark-accuracy")
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.train_samples, args.eval_samples, args.seeds = 2, 800, 300, 1
        args.strategies = "fedavg,heterofl,cahfp"
    return args


def base_overrides(args, model: str, alpha: float, seed: int) -> dict:
    name, _, width = model.partition(":")
    return {
        "federation.name": f"{name}-a{alpha:g}-s{seed}",
        "federation.rounds": args.rounds,
        "federation.clients": 10,
        "federation.seed": seed,
        "model.name": name,
        "model.width": float(width),
        "data.dataset": "fmnist",
        "data.partition": f"dirichlet:{alpha:g}",
        "data.train_samples": args.train_samples,
        "data.eval_samples": args.eval_samples,
        "data.data_dir": args.data_dir,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.lr": 0.05,
        "clients.budget": "fixed-tiers",  # a method comparison: the same keeps for everyone
        "pruning.tiers": [1.0, 0.6, 0.4, 0.2],
        "pruning.refresh_period": 5,
    }


def run_one(job: dict) -> dict:
    """Worker: one simulation, single-threaded."""
    import torch

    torch.set_num_threads(1)
    from cahfp.config import load_config
    from coordinator.simulation import simulate

    cfg = load_config(None, job["overrides"])
    start = time.perf_counter()
    summary = simulate(cfg, job["run_dir"], quiet=True, force=True)  # a rerun replaces it
    summary["wall_seconds"] = time.perf_counter() - start
    return {**job, "summary": summary}


def jobs_for(args) -> list[dict]:
    strategies = args.strategies.split(",")
    jobs = []
    if args.ablations:
        for seed in [int(x) for x in args.ablation_seeds.split(",")]:
            for label, extra in ABLATIONS.items():
                ov = {
                    **base_overrides(args, args.vgg, 0.5, seed),
                    "federation.strategy": "cahfp",
                    "data.eval_split": "validation",
                    **extra,
                }
                jobs.append({"setting": "ablation", "seed": seed, "label": label, "overrides": ov})
    else:
        settings = [(args.vgg, 0.5, s) for s in range(args.seeds)]
        settings += [(args.vgg, 0.1, 0), (args.resnet, 0.5, 0), (args.resnet, 0.1, 0)]
        for model, alpha, seed in settings:
            for strategy in strategies:
                ov = {**base_overrides(args, model, alpha, seed), "federation.strategy": strategy}
                jobs.append(
                    {
                        "setting": f"{model} a={alpha:g}",
                        "seed": seed,
                        "label": strategy,
                        "overrides": ov,
                    }
                )
    for i, j in enumerate(jobs):
        slug = "".join(ch if ch.isalnum() else "-" for ch in j["label"]).strip("-")
        j["run_dir"] = str(
            Path(args.runs_dir) / f"{i:02d}-{j['overrides']['federation.name']}-{slug}"
        )
    return jobs


def row_values(results: list[dict]) -> list[str]:
    final = [r["summary"]["final3_accuracy"] for r in results]
    final10 = [r["summary"]["final10_accuracy"] for r in results]
    best = [r["summary"]["best_accuracy"] for r in results]
    flops = [r["summary"]["mean_client_flops_vs_dense"] or 1.0 for r in results]
    up = [r["summary"]["mean_uplink_mb"] for r in results]
    down = [r["summary"]["mean_downlink_mb"] for r in results]
    wall = [r["summary"]["wall_seconds"] for r in results]

    def f(vals, fmt):
        m, s = mean_std(vals)
        return format(m, fmt) if len(vals) == 1 else f"{format(m, fmt)} ± {format(s, fmt)}"

    return [
        f(final, ".4f"),
        f(final10, ".4f"),
        f(best, ".4f"),
        f(flops, ".2f"),
        f(up, ".3f"),
        f(down, ".3f"),
        f(wall, ".0f"),
    ]


HEADERS = [
    "strategy",
    "final acc (mean of last 3 rounds)",
    "last 10 rounds",
    "best acc",
    "client FLOPs vs dense",
    "uplink MB/client/round",
    "downlink MB/client/round",
    "wall s",
]


def report(results: list[dict], args, env: dict, seconds: float) -> str:
    cmd = (
        "python -m benchmarks.accuracy"
        + (" --ablations" if args.ablations else "")
        + (f" --eval-samples {args.eval_samples}" if args.eval_samples != 2000 else "")
        + (
            f" --ablation-seeds {args.ablation_seeds}"
            if args.ablations and args.ablation_seeds != "0,1"
            else ""
        )
        + (" --quick" if args.quick else "")
    )
    lines = [
        "# Accuracy of every strategy at the same budgets"
        if not args.ablations
        else "# CA-HFP ablations (VGG, alpha 0.5, validation accuracy)",
        "",
        f"Measured {env_line(env)}; whole invocation {seconds / 60:.1f} min with "
        f"{args.workers} runs in parallel (one torch thread each). Reproduce: `{cmd}`.",
        "",
        f"Setup: real Fashion-MNIST; {args.train_samples} training images (a seeded subset) "
        "split over 10 clients by a Dirichlet(alpha) label partition; device tiers cycle keep "
        "1.0, 0.6, 0.4, 0.2 (fractions of dense training FLOPs) over the clients; every client "
        f"takes part in every round; {args.rounds} rounds; 1 local epoch of SGD (batch 32, lr "
        "0.05, momentum 0.9, weight decay 5e-4, logit-adjusted cross-entropy with tau 1 for "
        "every strategy); mask refresh every 5 rounds; after each aggregation the round's "
        "dense participants measure the new model's BatchNorm statistics on 2 batches of "
        "their data (the statistics phase, every strategy); accuracy on "
        + (
            f"{args.eval_samples} held-out training images"
            if args.ablations
            else f"the first {args.eval_samples} test images"
        )
        + f". Models: {args.vgg} and {args.resnet} "
        "(NAME:WIDTH). `final acc` is the mean of the last three rounds' accuracy (the "
        "target's measure); `last 10 rounds` averages over more of the round-to-round swings, "
        "which reach several points under strong skew; FLOPs "
        "and bytes are per participating client and round (FLOPs include CA-HFP's and "
        "Taylor's scoring passes and the statistics phase's forward passes; bytes are the "
        "safetensors payloads, the statistics phase's included).",
        "",
    ]
    if args.ablations:
        by_label: dict[str, list] = {}
        for r in results:
            by_label.setdefault(r["label"], []).append(r)
        rows = [[label, *row_values(rs)] for label, rs in by_label.items()]
        lines += [
            f"Ablations are scored on {args.eval_samples} held-out *training* images that no "
            "client holds (`data.eval_split = validation`), never on the test set, so that a "
            f"setting chosen from this table is not tuned on it. Seeds {args.ablation_seeds} "
            "(mean ± std).",
            "",
            md_table(["variant", *HEADERS[1:]], rows),
            "",
        ]
        return "\n".join(lines)
    by_setting: dict[str, dict[str, list]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], {}).setdefault(r["label"], []).append(r)
    verdict = []
    for setting, by_strategy in by_setting.items():
        n = len(next(iter(by_strategy.values())))
        lines += [f"## {setting}" + (f" ({n} seeds, mean ± std)" if n > 1 else ""), ""]
        rows = [[s, *row_values(by_strategy[s])] for s in STRATEGY_ORDER if s in by_strategy]
        lines += [md_table(HEADERS, rows), ""]
        if "cahfp" in by_strategy and "fedavg" in by_strategy:
            acc = _means(by_strategy, "final3_accuracy")
            acc10 = _means(by_strategy, "final10_accuracy")
            flops = mean_std(
                [r["summary"]["mean_client_flops_vs_dense"] for r in by_strategy["cahfp"]]
            )[0]
            up = mean_std([r["summary"]["mean_uplink_mb"] for r in by_strategy["cahfp"]])[0]
            up_fa = mean_std([r["summary"]["mean_uplink_mb"] for r in by_strategy["fedavg"]])[0]
            best, best10 = _best_pruning(acc), _best_pruning(acc10)
            gap = (acc["fedavg"] - acc["cahfp"]) * 100
            verdict.append(
                f"- {setting}: cahfp {acc['cahfp']:.4f}; fedavg {acc['fedavg']:.4f} "
                f"({gap:+.1f} points behind; target ≤ 1.5)"
                + (
                    f"; best other pruning strategy {best} {acc[best]:.4f} ("
                    + ("cahfp ahead" if acc["cahfp"] > acc[best] else "cahfp behind")
                    + f" by {abs(acc['cahfp'] - acc[best]) * 100:.1f} points)"
                    if best
                    else ""
                )
                + f"; client FLOPs {flops:.2f} and uplink {up / up_fa:.2f} of fedavg's "
                "(target ≤ 0.60); over the last 10 rounds cahfp "
                f"{acc10['cahfp']:.4f}, fedavg {acc10['fedavg']:.4f} "
                f"({(acc10['fedavg'] - acc10['cahfp']) * 100:+.1f}), best other "
                + (f"{best10} {acc10[best10]:.4f}" if best10 else "none")
            )
    lines += ["## Target check", "", *verdict, ""]
    return "\n".join(lines)


def _means(by_strategy: dict[str, list[dict]], key: str) -> dict[str, float]:
    """Each strategy's mean of the summary value ``key`` over its runs (seeds)."""
    return {s: mean_std([r["summary"][key] for r in v])[0] for s, v in by_strategy.items()}


def _best_pruning(acc: dict[str, float]) -> str | None:
    """The most accurate pruning strategy other than CA-HFP, if any ran."""
    others = {s: a for s, a in acc.items() if s in PRUNING}
    return max(others, key=others.get) if others else None


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    env = environment()
    env["torch_threads"] = 1
    jobs = jobs_for(args)
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, j): j for j in jobs}
        for fut in as_completed(futures):
            r = fut.result()
            s = r["summary"]
            print(
                f"{r['setting']:>22} seed {r.get('seed', 0)} {r['label']:<40} final3 "
                f"{s['final3_accuracy']:.4f} best {s['best_accuracy']:.4f} flops "
                f"{s['mean_client_flops_vs_dense'] or 1:.2f} up {s['mean_uplink_mb']:.3f} MB "
                f"({s['wall_seconds']:.0f} s)",
                flush=True,
            )
            results.append(r)
    index = {j["run_dir"]: i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: index[r["run_dir"]])
    seconds = time.perf_counter() - start
    name = "accuracy_ablations" if args.ablations else "accuracy"
    name += "_quick" if args.quick else ""
    path = write_results(
        name,
        report(results, args, env, seconds),
        {"env": env, "args": vars(args), "runs": results},
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
