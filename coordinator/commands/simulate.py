"""``cahfp simulate``: run a federation in-process (no broker)."""

from __future__ import annotations

import argparse

from cahfp.cli.options import add_dashboard, add_data_dir, add_device, add_tracking, parse_set
from cahfp.errors import CAHFPError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federation in-process (no broker)")
    p.add_argument("--config", help="TOML config (see examples/); defaults apply without one")
    p.add_argument(
        "--strategy",
        help="a registered strategy (docs/strategies.md; an unknown name lists the known ones)",
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory for metrics, checkpoints, model and plots")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint (with its "
        "config.toml unless --config is given); the result is the uninterrupted run's",
    )
    again.add_argument(
        "--force", action="store_true", help="start over in an --out that holds a run (deletes it)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set pruning.refresh_period=3",
    )
    p.add_argument("--quiet", action="store_true", help="log lines instead of a live view")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_data_dir(p)
    add_device(p)
    add_dashboard(p)
    add_tracking(p)
    p.add_argument(
        "--backend",
        choices=["auto", "inprocess", "processes", "ray"],
        help="a round's clients one after another in this process, in parallel worker "
        "processes, or on Ray (this machine, or the cluster at RAY_ADDRESS; needs "
        "cahfp-edge[ray]) (default: the config's federation.backend, auto = processes when "
        "more than one core is free)",
    )
    p.add_argument(
        "--workers", type=int, help="parallel workers (default: as many as fit, one per core)"
    )
    p.add_argument(
        "--client-cpus",
        type=float,
        metavar="N",
        help="ray: CPUs each worker reserves (federation.client_resources.num_cpus, default 1)",
    )
    p.add_argument(
        "--client-gpus",
        type=float,
        metavar="N",
        help="ray: GPUs each worker reserves, e.g. 0.25 (federation.client_resources.num_gpus)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:

    from cahfp.config import load_config
    from coordinator.simulation import simulate
    from coordinator.view import progress_logging

    overrides = {
        "federation.strategy": args.strategy,
        "federation.rounds": args.rounds,
        "federation.seed": args.seed,
        "federation.clients": args.clients,
        "data.data_dir": args.data_dir,
        "data.download": True if args.download else None,
        "train.device": args.device,
        "federation.backend": args.backend,
        "federation.workers": args.workers,
        "federation.client_resources.num_cpus": args.client_cpus,
        "federation.client_resources.num_gpus": args.client_gpus,
        **parse_set(args.set),
    }
    config = args.config
    if args.resume and config is None and args.out:
        from pathlib import Path

        config = Path(args.out) / "config.toml"  # the interrupted run's own configuration
        if not config.is_file():
            raise CAHFPError(f"{args.out} holds no run to resume (no config.toml); give --config")
    cfg = load_config(config, overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress_logging(args.quiet)
    summary = simulate(
        cfg,
        args.out,
        quiet=args.quiet,
        resume=args.resume,
        force=args.force,
        dashboard=args.dashboard,
        dashboard_token=args.dashboard_token,
        tracking=args.tracking,
    )
    print(
        f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f})"
        f", mean client FLOPs {summary['mean_client_flops_vs_dense'] or 1:.2f} of dense, "
        f"uplink {summary['mean_uplink_mb']:.2f} MB per client-round"
        + (f"; results in {args.out}" if args.out else "")
    )
    return 0
