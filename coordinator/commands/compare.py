"""``cahfp compare``: compare runs (unfinished ones from their metrics): one table and a plot."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="compare runs (unfinished ones from their metrics): one table and a plot"
    )
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="plot file (default %(default)s)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.table import Table

    from cahfp.cli.options import output_console
    from cahfp.config import load_config
    from coordinator.plots import plot_compare
    from coordinator.records import load_metrics, run_summary

    table = Table(title="runs")
    cols = [
        "run",
        "strategy",
        "rounds",
        "final acc",
        "best acc",
        "FLOPs vs dense",
        "up MB/client-round",
        "down MB/client-round",
        "wall s",
    ]
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "strategy") else "right")
    runs, setups = {}, []
    for run in args.runs:
        path = Path(run)
        cfg = load_config(path / "config.toml")  # the run's config must still be valid
        strategy = cfg.federation.strategy
        label = path.name if strategy in path.name else f"{path.name} ({strategy})"
        runs[label] = load_metrics(path)
        s, name = run_summary(path, cfg), path.name
        setup = f"{cfg.model.name} x{cfg.model.width:g} on {cfg.data.dataset}"
        setups += [setup] if setup not in setups else []
        if not s["finished"]:
            name += " (unfinished)"
            print(
                f"note: {path} is unfinished (no summary.json): summarised from its "
                f"metrics.jsonl, {s['rounds']} of {cfg.federation.rounds} rounds",
                file=sys.stderr,
            )

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        table.add_row(
            name,
            s["strategy"],
            str(s["rounds"]),
            f(s["final_accuracy"], ".4f"),
            f(s["best_accuracy"], ".4f"),
            f(s["mean_client_flops_vs_dense"], ".2f"),
            f(s["mean_uplink_mb"], ".3f"),
            f(s["mean_downlink_mb"], ".3f"),
            f(s["wall_seconds"], ".0f"),
        )
    output_console().print(table)
    out = plot_compare(runs, Path(args.out), "; ".join(setups))
    print(f"plot written to {out}")
    return 0
