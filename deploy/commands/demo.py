"""``cahfp demo``: a whole federation on this machine: embedded broker, coordinator and client
processes on Fashion-MNIST."""

from __future__ import annotations

import argparse

from cahfp.cli.options import add_dashboard, add_data_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="a whole federation on this machine: embedded broker, "
        "coordinator and client processes on Fashion-MNIST",
    )
    add_data_dir(p)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--samples-per-client",
        type=int,
        default=5000,
        help="training images per client (default %(default)s: enough work that the emulated "
        "Raspberry Pi 4 must prune to meet the deadline)",
    )
    p.add_argument("--strategy", default="cahfp")
    p.add_argument("--deadline", type=float, default=20.0, help="round deadline, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", default="auto", choices=["auto", "mosquitto", "amqtt"])
    p.add_argument("--config", help="use this federation config instead of the built-in one")
    p.add_argument("--out", help="run directory (default runs/demo-TIMESTAMP)")
    p.add_argument("--registration-timeout", type=float, default=180.0)
    p.add_argument("--quiet", action="store_true")
    add_dashboard(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.view import progress_logging
    from deploy.demo import run_demo

    progress_logging(args.quiet)
    return run_demo(args)
