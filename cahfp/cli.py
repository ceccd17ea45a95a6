"""The ``cahfp`` command. Subcommands import their implementation lazily so that, e.g.,
``cahfp infer`` on an inference-only board never imports torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cahfp.errors import CAHFPError

Handler = Callable[[argparse.Namespace], int]


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", help="dataset root (default: $CAHFP_DATA_DIR, then ~/.cache/cahfp/data)"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="allow downloading missing public datasets (checksummed)",
    )


def cmd_models(args: argparse.Namespace) -> int:
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


def cmd_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cahfp.data import load_dataset, resolve_data_dir
    from cahfp.data.sources import import_fmnist

    if args.action == "import":
        if args.dataset != "fmnist":
            raise CAHFPError(
                "only fmnist is imported from loose files; CIFAR archives are "
                "read where they are (put cifar-*-python.tar.gz in the data dir)"
            )
        raw = import_fmnist(Path(args.source), resolve_data_dir(args.data_dir))
        print(f"imported Fashion-MNIST into {raw}")
        return 0
    for split in ("train", "test"):
        ds = load_dataset(args.dataset, split, args.data_dir, args.download)
        counts = ds.targets.bincount(minlength=ds.num_classes).tolist()
        print(
            f"{args.dataset} {split}: {len(ds)} images {tuple(ds.images.shape[1:])}, "
            f"{ds.num_classes} classes, per class min {min(counts)} max {max(counts)}"
        )
        for note in ds.notes:
            print(f"  note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cahfp.local_demo import run_local_demo

    return run_local_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cahfp",
        description="CA-HFP Edge: curvature-aware heterogeneous federated pruning on edge boards",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run a small federation on Fashion-MNIST on this machine")
    _add_data_dir(p)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples-per-client", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("models", help="list the registered models with sizes and FLOPs")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("data", help="check or import datasets")
    p.add_argument("action", choices=["check", "import"])
    p.add_argument("dataset", help="fmnist | cifar10 | cifar100 | imagefolder:PATH")
    p.add_argument("source", nargs="?", help="for import: folder holding the official files")
    _add_data_dir(p)
    p.set_defaults(handler=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if getattr(args, "action", None) == "import" and not args.source:
        parser.error("data import needs the SOURCE folder")
    try:
        return args.handler(args)
    except CAHFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
