"""``cahfp export``: prune a checkpoint to a keep fraction and export ONNX."""

from __future__ import annotations

import argparse
import sys

from cahfp.cli.options import add_device
from cahfp.errors import CAHFPError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="prune a checkpoint to a keep fraction and export ONNX")
    p.add_argument(
        "--run",
        help="a run directory (config.toml + model.safetensors, or its last checkpoint when "
        "the run is unfinished)",
    )
    p.add_argument("--config")
    p.add_argument("--checkpoint")
    p.add_argument("--keep", type=float, default=1.0)
    p.add_argument(
        "--scorer",
        default="curvature",
        help="curvature (needs the dataset) or a data-free selector: magnitude, ordered",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument(
        "--statistics-batches",
        "--calibration-batches",  # its name before 2026-12 (still accepted)
        dest="statistics_batches",
        type=int,
        default=8,
        help="batches of training data (64 images) to recompute a pruned model's BatchNorm "
        "statistics from; 0 keeps the inherited ones and, with a data-free scorer, needs no data",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: a static INT8 (QDQ) model, per-channel weights, activations calibrated on "
        "256 of the config's training images; float and INT8 accuracy on 1000 test images are "
        "reported",
    )
    add_device(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cahfp.device.select import resolve_device
    from cahfp.export import export_checkpoint

    if args.device:
        resolve_device(args.device)  # before anything is read: fail at once
    run_dir = Path(args.run) if args.run else None
    config = args.config or (run_dir / "config.toml" if run_dir else None)
    checkpoint = args.checkpoint or (run_dir / "model.safetensors" if run_dir else None)
    if config is None or checkpoint is None:
        raise CAHFPError("give --run RUN_DIR, or --config and --checkpoint")
    if run_dir and not args.checkpoint and not checkpoint.is_file():
        from coordinator.records import checkpoint_weights

        rnd, checkpoint = checkpoint_weights(run_dir)
        print(
            f"note: {run_dir} has no model.safetensors (the run is unfinished); exporting its "
            f"checkpoint of round {rnd}",
            file=sys.stderr,
        )
    result = export_checkpoint(
        config,
        checkpoint,
        args.keep,
        args.out,
        scorer=args.scorer,
        data_dir=args.data_dir,
        statistics_batches=args.statistics_batches,
        device=args.device,
        quantize=args.quantize,
    )
    print(
        f"wrote {result.path} ({result.bytes / 1e6:.2f} MB), keep {args.keep:g}, "
        f"onnxruntime parity {result.max_abs_diff:.1e}"
    )
    if result.quantization:
        acc = result.accuracy or {}
        print(
            f"int8: {result.bytes / 1e6:.2f} MB against {result.float_bytes / 1e6:.2f} MB float; "
            f"top-1 agreement with float {result.agreement:.3f} on the calibration images; "
            f"accuracy on {acc.get('images')} test images float {acc.get('float', 0):.4f}, "
            f"int8 {acc.get('int8', 0):.4f}"
        )
    return 0
