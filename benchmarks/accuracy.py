"""Accuracy of every strategy at the same budgets, on real Fashion-MNIST, run in pieces.

One setting per invocation (a piece): its missing runs, then the accuracy of the submodels its
tiers run (``benchmarks.accuracy_tiers``), then the piece's JSON. ``--report`` merges every
piece found into ``accuracy.md`` / ``accuracy.json`` (``benchmarks.accuracy_report``). Settings:
10 clients (device tiers cycling keep 1.0, 0.6, 0.4, 0.2), 6000 training images, 30 rounds,
Dirichlet label skew alpha = 0.5 and 0.1, a VGG and a ResNet at CPU-sized widths; and
``cross-device``: all 60,000 training images over 100 clients, 10 % of them per round, 100
rounds. Every run is an in-process simulation through the same engine the MQTT federation uses,
in ``RUNS/<setting>/<strategy>-s<seed>/`` (done when its ``summary.json`` exists; an
interrupted one resumes from its checkpoint). Runs go two at a time in separate processes, one
torch thread each; wall times are measured that way. Do not run two invocations on one setting
at once.

    python -m benchmarks.accuracy --setting vgg11-0.25-a0.5          # one piece (all strategies)
    python -m benchmarks.accuracy --setting cross-device --strategies fedavg,cahfp --seeds 0,1
    python -m benchmarks.accuracy --setting vgg11-0.25-a0.1 --eval-split validation
    python -m benchmarks.accuracy --report         # merge the pieces into accuracy.md
    python -m benchmarks.accuracy --ablations      # CA-HFP ablations on the main setting
    python -m benchmarks.accuracy --ablations --ablation-setting vgg11-0.25-a0.1  # or another
    python -m benchmarks.accuracy --quick          # smoke run (2 rounds) and its report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, environment
from cahfp.strategies import STRATEGIES

QUICK = {"rounds": 2, "train_samples": 800, "eval_samples": 300, "tier_test_samples": 1000}


@dataclass(frozen=True)
class Setting:
    """A benchmark setting: the model, the label skew and the federation's size."""

    model: str
    width: float
    alpha: float
    clients: int = 10
    participation: float = 1.0
    rounds: int = 30
    train_samples: int | None = 6000  # None: the whole training set
    seeds: tuple[int, ...] = (0, 1, 2)

    def describe(self, quick: bool = False) -> str:
        samples = QUICK["train_samples"] if quick else self.train_samples
        images = f"{samples}" if samples else "all 60,000"
        part = f", {self.participation:.0%} of them per round" if self.participation < 1 else ""
        rounds = QUICK["rounds"] if quick else self.rounds
        return (
            f"{self.model} x{self.width:g}, Dirichlet alpha {self.alpha:g}, {images} training "
            f"images over {self.clients} clients{part}, {rounds} rounds"
        )


SETTINGS: dict[str, Setting] = {
    "vgg11-0.25-a0.5": Setting("vgg11", 0.25, 0.5),
    "vgg11-0.25-a0.1": Setting("vgg11", 0.25, 0.1),
    "resnet20-0.5-a0.5": Setting("resnet20", 0.5, 0.5),
    "resnet20-0.5-a0.1": Setting("resnet20", 0.5, 0.1),
    "cross-device": Setting(
        "vgg11", 0.25, 0.5, clients=100, participation=0.1, rounds=100, train_samples=None,
        seeds=(0, 1),
    ),
}  # fmt: skip
MAIN_SETTING = "vgg11-0.25-a0.5"
QUICK_STRATEGIES = "fedavg,heterofl,cahfp"
STRATEGY_ORDER = list(STRATEGIES)  # the registry's order

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
    # issue 22's lever: part of each thin client's plan rotates through what its plan drops
    "coverage-aware rotation 0.25": {"pruning.rotation": 0.25},
    "coverage-aware rotation 0.5": {"pruning.rotation": 0.5},
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
    # issue 22's lever: the round's submodels distilled into the global model on the
    # coordinator's unlabelled images (FedDF-style), against FedAvg on the same images
    "ensemble distillation, 100 steps on 2000 unlabelled images": {
        "aggregation.distill_steps": 100,
        "data.distill_samples": 2000,
    },
    "ensemble distillation, 400 steps on 2000 unlabelled images": {
        "aggregation.distill_steps": 400,
        "data.distill_samples": 2000,
    },
    "reference: FedAvg": {"federation.strategy": "fedavg"},
    "reference: FedAvg with ensemble distillation, 100 steps": {
        "federation.strategy": "fedavg",
        "aggregation.distill_steps": 100,
        "data.distill_samples": 2000,
    },
    # the baselines' own choices, made on the same validation images
    "reference: FIARSE, one global threshold": {
        "federation.strategy": "fiarse",
        "pruning.fiarse_threshold": "global",
    },
    "reference: FIARSE, layerwise thresholds": {
        "federation.strategy": "fiarse",
        "pruning.fiarse_threshold": "layerwise",
    },
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--setting", choices=list(SETTINGS), help="run one piece")
    what.add_argument("--report", action="store_true", help="merge the pieces into the table")
    what.add_argument("--ablations", action="store_true", help="run the CA-HFP ablations")
    what.add_argument("--quick", action="store_true", help="smoke run of the main setting")
    p.add_argument("--strategies", help="comma-separated (default: every registered strategy)")
    p.add_argument(
        "--seeds", help="comma-separated (default: the setting's, 0-2; 0-1 cross-device)"
    )
    p.add_argument(
        "--eval-split",
        choices=["test", "validation"],
        default="test",
        help="validation: score on held-out training images, runs in <setting>-val (how "
        "settings are chosen)",
    )
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument(
        "--ablation-seeds",
        default="0,1",
        help="seeds of each ablation variant (default %(default)s); ablations are evaluated on "
        "held-out training images (data.eval_split = validation), not on the test set",
    )
    p.add_argument(
        "--only",
        help="with --ablations: run only the variants whose label contains one of these "
        "comma-separated words (e.g. FIARSE)",
    )
    p.add_argument(
        "--ablation-setting",
        choices=[n for n, s in SETTINGS.items() if s.clients == 10],
        default=MAIN_SETTING,
        help="with --ablations: the setting they run in (default %(default)s)",
    )
    p.add_argument("--no-tiers", action="store_true", help="skip the tier submodel accuracy")
    p.add_argument(
        "--tier-clients",
        type=int,
        help="evaluate the submodels of the first N clients of each tier only (default: all; "
        "cross-device has 25 per tier, about 9 minutes per run on a busy 2-core machine)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/benchmark-accuracy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", help=f"where pieces (pieces/) and tables go (default {RESULTS})")
    args = p.parse_args(argv)
    if args.ablations:
        args.eval_split = "validation"
    if args.quick:
        args.setting = MAIN_SETTING
        args.strategies = args.strategies or QUICK_STRATEGIES
        args.seeds = args.seeds or "0"
    return args


def base_overrides(setting: str, seed: int, args) -> dict:
    """A run's configuration overrides in ``setting`` (identical to those of the runs already
    made, so that finished runs count)."""
    s = SETTINGS[setting]
    quick = QUICK if args.quick else {}
    name = setting if s.clients != 10 else f"{s.model}-a{s.alpha:g}"
    ov = {
        "federation.name": f"{name}-s{seed}",
        "federation.rounds": quick.get("rounds", s.rounds),
        "federation.clients": s.clients,
        "federation.seed": seed,
        "model.name": s.model,
        "model.width": s.width,
        "data.dataset": "fmnist",
        "data.partition": f"dirichlet:{s.alpha:g}",
        "data.train_samples": quick.get("train_samples", s.train_samples),
        "data.eval_samples": quick.get("eval_samples", args.eval_samples),
        "data.data_dir": args.data_dir,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.lr": 0.05,
        "clients.budget": "fixed-tiers",  # a method comparison: the same keeps for everyone
        "pruning.tiers": [1.0, 0.6, 0.4, 0.2],
        "pruning.refresh_period": 5,
    }
    if s.participation < 1:
        ov["federation.participation"] = s.participation
    if args.eval_split == "validation":
        ov["data.eval_split"] = "validation"
    return {k: v for k, v in ov.items() if v is not None}


def piece_name(args) -> str:
    """The piece's (and its runs' directory's) name: the setting, ``-val`` when scored on
    validation images, ``-quick`` for a smoke run."""
    suffix = ("-val" if args.eval_split == "validation" else "") + ("-quick" if args.quick else "")
    if args.ablations:
        other = args.ablation_setting != MAIN_SETTING
        return "ablations" + (f"-{args.ablation_setting}" if other else "") + suffix
    return args.setting + suffix


def pieces_dir(out_dir) -> Path:
    return Path(out_dir or RESULTS) / "accuracy_pieces"


def jobs_for(args) -> list[dict]:
    """Every run of this invocation: run directory, configuration overrides, labels."""
    root = Path(args.runs_dir) / piece_name(args)
    jobs = []
    if args.ablations:
        for seed in [int(x) for x in args.ablation_seeds.split(",")]:
            for label, extra in ABLATIONS.items():
                if args.only and not any(w in label for w in args.only.split(",")):
                    continue
                ov = {
                    **base_overrides(args.ablation_setting, seed, args),
                    "federation.strategy": "cahfp",
                    **extra,
                }
                run_dir = root / f"{slug(label)}-s{seed}"
                jobs.append(
                    {"label": label, "seed": seed, "run_dir": str(run_dir), "overrides": ov}
                )
        return jobs
    setting = SETTINGS[args.setting]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(setting.seeds)
    strategies = args.strategies.split(",") if args.strategies else STRATEGY_ORDER
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    for seed in seeds:
        for strategy in strategies:
            ov = {**base_overrides(args.setting, seed, args), "federation.strategy": strategy}
            run_dir = root / f"{strategy}-s{seed}"
            jobs.append({"label": strategy, "seed": seed, "run_dir": str(run_dir), "overrides": ov})
    return jobs


def slug(label: str) -> str:
    """A label as a directory name."""
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-")


def done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "summary.json").is_file()


def run_one(job: dict) -> dict:
    """Worker: one simulation, single-threaded; an interrupted run continues from its last
    checkpoint."""
    import torch

    torch.set_num_threads(1)
    from cahfp.config import load_config
    from coordinator.simulation import simulate

    # one process per run: the benchmark runs runs side by side itself (worker processes give
    # the same result bitwise, tests/coordinator/test_workers.py)
    cfg = load_config(None, {**job["overrides"], "federation.backend": "inprocess"})
    resume = (Path(job["run_dir"]) / "checkpoint" / "state.json").is_file()
    summary = simulate(cfg, job["run_dir"], quiet=True, resume=resume, force=not resume)
    record = {"commit": job["commit"], "resumed": resume, "torch_threads": 1}
    (Path(job["run_dir"]) / "benchmark.json").write_text(json.dumps(record, indent=1))
    return {**job, "summary": summary}


def tiers_one(job: dict) -> dict:
    """Worker: the tier submodels' accuracy of one finished run, single-threaded."""
    import torch

    torch.set_num_threads(1)
    from benchmarks.accuracy_tiers import ensure_tiers

    tiers = ensure_tiers(job["run_dir"], job["tier_test_samples"], job["tier_clients"])
    return {**job, "tiers": tiers}


def run_pool(fn, jobs: list[dict], workers: int, show) -> None:
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        for fut in as_completed(futures):
            show(fut.result())


def _show_run(r: dict) -> None:
    s = r["summary"]
    print(
        f"{r['run_dir']}: final3 {s['final3_accuracy']:.4f} last10 {s['final10_accuracy']:.4f} "
        f"flops {s['mean_client_flops_vs_dense'] or 1:.2f} up {s['mean_uplink_mb']:.3f} MB "
        f"({s['wall_seconds']:.0f} s)",
        flush=True,
    )


def _show_tiers(r: dict) -> None:
    t = r["tiers"]["tiers"]
    cells = ", ".join(f"{k}: {v['global']:.4f}/{v['personalised']:.4f}" for k, v in t.items())
    print(f"{r['run_dir']}: tiers (global/personalised) {cells}", flush=True)


def collect(root: Path) -> list[dict]:
    """Every finished run under ``root`` (``<label>-s<seed>/``) with its summary, commit and
    cached tier results."""
    from benchmarks.accuracy_tiers import load_tiers

    runs = []
    for d in sorted(root.glob("*-s*")):
        if not done(d):
            continue
        label, _, seed = d.name.rpartition("-s")
        if not seed.isdigit():
            continue
        bench = d / "benchmark.json"
        commit = json.loads(bench.read_text()).get("commit") if bench.is_file() else None
        runs.append(
            {
                "label": label,
                "seed": int(seed),
                "run_dir": str(d),
                "commit": commit,
                "summary": json.loads((d / "summary.json").read_text()),
                "tiers": load_tiers(d),
            }
        )
    return runs


def run_piece(args) -> Path:
    """Run what is missing of the piece, its tier results, and write the piece's JSON."""
    start = time.perf_counter()
    env = environment()
    env["torch_threads"] = 1
    jobs = jobs_for(args)
    todo = [{**j, "commit": env["commit"]} for j in jobs if not done(j["run_dir"])]
    print(f"{piece_name(args)}: {len(todo)} of {len(jobs)} runs to do", flush=True)
    run_pool(run_one, todo, args.workers, _show_run)
    root = Path(args.runs_dir) / piece_name(args)
    runs = collect(root)
    if not (args.no_tiers or args.ablations):
        limit = QUICK["tier_test_samples"] if args.quick else None
        need = [
            {"run_dir": r["run_dir"], "tier_test_samples": limit, "tier_clients": args.tier_clients}
            for r in runs
            if r["tiers"] is None
        ]
        print(f"{piece_name(args)}: tier submodels of {len(need)} runs to evaluate", flush=True)
        run_pool(tiers_one, need, args.workers, _show_tiers)
        runs = collect(root)
    piece = {
        "piece": piece_name(args),
        "setting": "ablations" if args.ablations else args.setting,
        "description": SETTINGS[args.ablation_setting if args.ablations else args.setting].describe(
            args.quick
        ),
        "ablation_setting": args.ablation_setting if args.ablations else None,
        "eval_split": args.eval_split,
        "eval_samples": QUICK["eval_samples"] if args.quick else args.eval_samples,
        "quick": args.quick,
        "env": env,
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }
    out = pieces_dir(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{piece_name(args)}.json"
    path.write_text(json.dumps(piece, indent=1, default=float))
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks import accuracy_report

    if args.report:
        path = accuracy_report.write_report(args.out_dir)
        print(f"wrote {path}")
        return 0
    piece = run_piece(args)
    if args.ablations or args.quick:
        path = accuracy_report.write_single(piece, args.out_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
