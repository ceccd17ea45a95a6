"""``cahfp testbed``: emulated edge testbed: clients in network namespaces and cgroups with their
profiles' limits (root)."""

from __future__ import annotations

import argparse

from cahfp.cli.options import add_data_dir, setup_logging
from cahfp.device.boards import ALIASES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testbed",
        help="emulated edge testbed: clients in network namespaces "
        "and cgroups with their profiles' limits (root)",
    )
    p.add_argument(
        "--profiles",
        default="pi4:2,pi5:1,nano:1",
        help=f"NAME:COUNT,... ({', '.join(ALIASES)}, a profile name or file)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--deadline", type=float, default=30.0)
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--json", help="write the per-client report here")
    p.add_argument("--quiet", action="store_true")
    add_data_dir(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        print("the testbed needs root (network namespaces, tc, cgroups); skipped")
        return 0
    from cahfp.config import load_config
    from deploy.testbed import parse_profiles, run_testbed

    if not args.quiet:
        setup_logging(args)
    profiles = parse_profiles(args.profiles)
    overrides = {
        "federation.name": "testbed",
        "federation.rounds": args.rounds,
        "federation.clients": len(profiles),
        "federation.deadline_s": args.deadline,
        "clients.budget": "measured",
        "data.data_dir": args.data_dir,
        **(
            {}
            if args.config
            else {
                "model.width": 0.25,
                "data.train_samples": 600 * len(profiles),
                "data.eval_samples": 1000,
            }
        ),
    }
    cfg = load_config(args.config, overrides)
    summary, report = run_testbed(profiles, cfg, Path(args.out) if args.out else None)
    for r in report:
        print(
            f"{r['client']}: quota {r['cpu_quota']:g} cores (measured "
            f"{r['measured_cores']}), memory {r['memory_mb']} MiB, {r['bandwidth_mbps']:g} "
            f"Mbit/s; calibration {r['ms_per_sample']:.2f} ms/sample; keeps "
            f"{[round(k, 2) if k is not None else None for k in r['keeps']]}; seconds "
            f"{[round(t, 1) for t in r['round_seconds']]}"
        )
    print(f"final accuracy {summary['final_accuracy']:.4f} after {summary['rounds']} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "clients": report}, indent=1))
    return 0
