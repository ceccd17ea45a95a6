"""``cahfp coordinator``: run the coordinator service over MQTT."""

from __future__ import annotations

import argparse

from cahfp.cli.options import (
    add_broker,
    add_dashboard,
    add_data_dir,
    add_tracking,
    parse_set,
    setup_logging,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator service over MQTT")
    add_broker(p)
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="run directory (metrics, checkpoints, model, plots)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (a run directory without one starts fresh)",
    )
    p.add_argument(
        "--force", action="store_true", help="start over in an --out that holds a run (deletes it)"
    )
    p.add_argument(
        "--registration-timeout",
        type=float,
        default=None,
        help="seconds to wait for clients before round 1 (default: the deadline)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--inbox-memory-mb",
        type=float,
        default=64,
        help="received bytes held in memory before the backlog waits on disk (default 64)",
    )
    p.add_argument(
        "--spool-dir",
        help="directory for that backlog, in an unlinked file (default: the --out directory, "
        "else the system temp directory)",
    )
    add_data_dir(p)
    add_dashboard(p)
    add_tracking(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cahfp.config import load_config
    from coordinator.service import Coordinator
    from coordinator.view import ProgressView

    setup_logging(args)
    cfg = load_config(
        args.config,
        {
            "data.data_dir": args.data_dir,
            "data.download": True if args.download else None,
            **parse_set(args.set),
        },
    )
    # a service: a log line per round, also on a terminal (--quiet: warnings only)
    view = ProgressView(cfg, Console(stderr=True), getattr(args, "quiet", False), live=False)
    tracker = None
    if args.tracking:
        from pathlib import Path

        from coordinator.tracking import Tracker

        tracker = Tracker(
            args.tracking, cfg, Path(args.out).name if args.out else cfg.federation.name
        )

    def events(kind: str, data: dict) -> None:
        if tracker:
            tracker.event(kind, data)
        view.event(kind, data)

    coord = Coordinator(
        cfg,
        args.broker,
        args.out,
        resume=args.resume,
        force=args.force,
        credentials=args.credentials,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        protocol=args.mqtt_version,
        on_event=events,
        inbox_memory=int(args.inbox_memory_mb * (1 << 20)),
        spool_dir=args.spool_dir,
    )
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):  # stop within a second, keep completed rounds
        signal.signal(sig, lambda *_: coord.stop.set())
    dashboard = None
    if args.dashboard:
        from coordinator.dashboard import serve

        dashboard = serve(coord.monitor, args.dashboard, args.dashboard_token)
        print(f"dashboard: {dashboard.url} (metrics: /metrics)", flush=True)
    try:
        summary = coord.run(registration_timeout=args.registration_timeout)
    finally:
        if dashboard:
            dashboard.stop()
        if tracker:
            tracker.close()
    acc = summary["final_accuracy"]
    print(
        ("stopped: " if coord.stop.is_set() else "")
        + (f"final accuracy {acc:.4f}" if acc is not None else "no round evaluated")
        + f" after {summary['rounds']} rounds"
        + (f"; results in {args.out}" if args.out else "")
    )
    return 0
