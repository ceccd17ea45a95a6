"""The system benchmark's options: which models, how many steps, which scales."""

from __future__ import annotations

import argparse
import sys

KEEPS = (0.75, 0.5, 0.25)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.system",
        description=sys.modules["benchmarks.system"].__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--models", default="vgg11:1.0:3:32,resnet18:0.5:3:32,vgg11:0.25:1:28,resnet20:0.5:1:28"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--repeats", type=int, default=3, help="independent timings of each pair (median shown)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scale", default="10,100,1000")
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.scale, args.repeats = "vgg11:0.25:1:28", 3, "10", 1
    return args


def models(args):
    for spec in args.models.split(","):
        name, width, c, size = spec.split(":")
        yield name, float(width), int(c), int(size)
