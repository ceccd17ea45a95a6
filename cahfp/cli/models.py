"""``cahfp models``: list the registered models with sizes and FLOPs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with sizes and FLOPs")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cahfp.costs import param_count, training_flops
    from cahfp.models import build_model, model_names

    size = 28 if args.in_channels == 1 else 32
    x = torch.zeros(1, args.in_channels, size, size)
    print(f"{'model':10} {'params':>12} {'train MFLOPs/sample':>20}")
    for name in model_names():
        m = build_model(name, args.num_classes, args.in_channels, args.width)
        print(f"{name:10} {param_count(m):>12,} {training_flops(m, x) / 1e6:>20.1f}")
    return 0
