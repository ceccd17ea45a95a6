"""``cahfp data``: check or import datasets."""

from __future__ import annotations

import argparse

from cahfp.cli.options import add_data_dir
from cahfp.errors import CAHFPError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check or import datasets")
    p.add_argument("action", choices=["check", "import"])
    p.add_argument("dataset", help="fmnist | cifar10 | cifar100 | imagefolder:PATH")
    p.add_argument("source", nargs="?", help="for import: folder holding the official files")
    add_data_dir(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "import" and not args.source:
        raise CAHFPError("data import needs the SOURCE folder")
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
    from cahfp.errors import DatasetUnavailable

    for split in ("train", "test"):
        try:
            ds = load_dataset(args.dataset, split, args.data_dir, args.download)
        except DatasetUnavailable as exc:
            if split == "test" and args.dataset.startswith("imagefolder:"):
                print(f"{args.dataset} test: none ({exc}); a board needs only train/")
                continue
            raise
        counts = ds.targets.bincount(minlength=ds.num_classes).tolist()
        print(
            f"{args.dataset} {split}: {len(ds)} images {tuple(ds.images.shape[1:])}, "
            f"{ds.num_classes} classes, per class min {min(counts)} max {max(counts)}"
        )
        for note in ds.notes:
            print(f"  note: {note}")
    return 0
