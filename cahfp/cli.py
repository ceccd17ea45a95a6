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


def _parse_set(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CAHFPError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    import logging

    from cahfp.config import load_config
    from coordinator.simulation import simulate

    overrides = {
        "federation.strategy": args.strategy,
        "federation.rounds": args.rounds,
        "federation.seed": args.seed,
        "federation.clients": args.clients,
        "data.data_dir": args.data_dir,
        "data.download": True if args.download else None,
        **_parse_set(args.set),
    }
    cfg = load_config(args.config, overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = simulate(cfg, args.out, quiet=args.quiet)
    print(
        f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f})"
        f", mean client FLOPs {summary['mean_client_flops_vs_dense'] or 1:.2f} of dense, "
        f"uplink {summary['mean_uplink_mb']:.2f} MB per client-round"
        + (f"; results in {args.out}" if args.out else "")
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from cahfp.config import load_config
    from coordinator.plots import plot_compare
    from coordinator.records import load_metrics

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
    runs = {}
    for run in args.runs:
        path = Path(run)
        runs[path.name] = load_metrics(path)
        summary_file = path / "summary.json"
        if not summary_file.is_file():
            raise CAHFPError(f"{path} has no summary.json (run not finished?)")
        import json

        s = json.loads(summary_file.read_text())
        load_config(path / "config.toml")  # the run's config must still be valid

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        table.add_row(
            path.name,
            s["strategy"],
            str(s["rounds"]),
            f(s["final_accuracy"], ".4f"),
            f(s["best_accuracy"], ".4f"),
            f(s["mean_client_flops_vs_dense"], ".2f"),
            f(s["mean_uplink_mb"], ".3f"),
            f(s["mean_downlink_mb"], ".3f"),
            f(s["wall_seconds"], ".0f"),
        )
    Console().print(table)
    out = plot_compare(runs, Path(args.out))
    print(f"plot written to {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from cahfp.messages import ModelSpec
    from cahfp.training import Recipe
    from edge_client.budget import BudgetModel, Constraints
    from edge_client.calibrate import calibrate
    from edge_client.device import measure_device

    info = measure_device()
    spec = ModelSpec(
        name=args.model,
        width=args.width,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
    )
    cal = calibrate(spec, args.batch_size, use_cache=not args.fresh)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    model = BudgetModel(cal, min_keep=args.min_keep)
    memory = args.memory_mb << 20 if args.memory_mb else info.usable_memory
    cons = Constraints(
        deadline_s=args.deadline,
        samples=int(args.epochs * args.samples),
        batch_size=args.batch_size,
        memory_bytes=memory,
        uplink_bytes_per_s=args.uplink_mbps * 1e6 / 8 if args.uplink_mbps else None,
        score_samples=4 * args.batch_size,
        safety=args.safety,
    )
    try:
        choice = model.choose(cons)
        decision = {
            "keep": choice.keep,
            "reason": choice.reason,
            "predicted_seconds": choice.seconds,
            "predicted_memory": choice.memory,
        }
    except CAHFPError as exc:
        decision = {"keep": None, "reason": str(exc)}
    report = {
        "device": info.to_dict(),
        "model": spec.model_dump(),
        "recipe": recipe.model_dump(),
        "calibration": cal.__dict__,
        "decision": decision,
    }
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    mib = 1 << 20
    print(
        f"device   {info.hostname} ({info.machine}): {info.logical_cores} logical / "
        f"{info.physical_cores} physical cores, usable {info.usable_cores:g}; memory "
        f"{info.memory_available / mib:.0f} of {info.memory_total / mib:.0f} MiB available, "
        f"usable {info.usable_memory / mib:.0f} MiB"
    )
    print(
        f"         load {info.load_1m}, temperature {info.temperature_c} C, battery "
        f"{info.battery_percent}, accelerator {info.accelerator or 'none'}, cgroup v"
        f"{info.cgroup.version} quota {info.cgroup.cpu_quota} limit {info.cgroup.memory_limit}"
    )
    print(
        f"model    {spec.name} x{spec.width:g}, input {spec.in_channels}x{spec.image_size}x"
        f"{spec.image_size}, batch {args.batch_size}"
    )
    print(
        f"measured {cal.seconds_per_sample * 1e3:.3f} ms/sample dense, "
        f"{cal.seconds_per_sample_small * 1e3:.3f} ms/sample at keep {cal.small_keep}; "
        f"activations {cal.activation_bytes_per_sample / 1024:.0f} KiB/sample; parameters "
        f"{cal.param_bytes / mib:.1f} MiB"
    )
    print(
        f"round    {args.samples} samples x {args.epochs:g} epochs, deadline {args.deadline:g} s:"
        f" {decision['reason']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_client.exporting import export_checkpoint

    run = Path(args.run) if args.run else None
    config = args.config or (run / "config.toml" if run else None)
    checkpoint = args.checkpoint or (run / "model.safetensors" if run else None)
    if config is None or checkpoint is None:
        raise CAHFPError("give --run RUN_DIR, or --config and --checkpoint")
    result = export_checkpoint(
        config, checkpoint, args.keep, args.out, scorer=args.scorer, data_dir=args.data_dir
    )
    print(
        f"wrote {result.path} ({result.bytes / 1e6:.2f} MB), keep {args.keep:g}, "
        f"onnxruntime parity {result.max_abs_diff:.1e}"
    )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from cahfp.inference import OnnxClassifier

    clf = OnnxClassifier(args.model, threads=args.threads)
    if args.benchmark:
        for batch in dict.fromkeys([1, args.batch]):
            b = clf.benchmark(batch, iterations=args.iterations)
            print(
                f"batch {batch:>3}: p50 {b['p50_ms']:.3f} ms, p95 {b['p95_ms']:.3f} ms, "
                f"{b['throughput']:.1f} images/s"
            )
    for pred in clf.classify(args.inputs, args.top_k, args.fit):
        labels = ", ".join(f"{label} {p:.3f}" for label, p in pred.top)
        print(f"{pred.source}: {labels}")
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

    p = sub.add_parser("simulate", help="run a federation in-process (no broker)")
    p.add_argument("--config", help="TOML config (see examples/); defaults apply without one")
    p.add_argument(
        "--strategy",
        help="fedavg, fedavg-fit, heterofl, fedrolex, magnitude, random, taylor, cahfp",
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory for metrics, checkpoints, model and plots")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set pruning.refresh_period=3",
    )
    p.add_argument("--quiet", action="store_true", help="log lines instead of a live view")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    _add_data_dir(p)
    p.set_defaults(handler=cmd_simulate)

    p = sub.add_parser("compare", help="compare finished runs: one table and a combined plot")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="plot file (default %(default)s)")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("profile", help="measure this device and show the keep it would choose")
    p.add_argument("--model", default="vgg11")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=1000, help="local training samples")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=60.0, help="round deadline in seconds")
    p.add_argument("--memory-mb", type=int, help="memory budget (default: measured usable)")
    p.add_argument("--uplink-mbps", type=float)
    p.add_argument("--safety", type=float, default=0.8)
    p.add_argument("--min-keep", type=float, default=0.1)
    p.add_argument("--fresh", action="store_true", help="ignore the cached calibration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_profile)

    p = sub.add_parser("export", help="prune a checkpoint to a keep fraction and export ONNX")
    p.add_argument("--run", help="a run directory (config.toml + model.safetensors)")
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
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("infer", help="classify images with an exported model (onnxruntime only)")
    p.add_argument("model", help="an .onnx file written by cahfp")
    p.add_argument("inputs", nargs="*", help="PNG/JPEG images or .npy batches")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--fit",
        action="store_true",
        help="convert and resize images that do not match the model input",
    )
    p.add_argument("--benchmark", action="store_true", help="print latency and throughput")
    p.add_argument("--batch", type=int, default=32, help="benchmark batch size")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int)
    p.set_defaults(handler=cmd_infer)

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
