"""``cahfp profile``: measure this device and show the keep it would choose."""

from __future__ import annotations

import argparse

from cahfp.cli.options import add_device
from cahfp.errors import CAHFPError


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--profile",
        help="emulate this board profile on this host (a name from device_profiles/ or a file), "
        "as `cahfp client --profile NAME` does",
    )
    p.add_argument("--fresh", action="store_true", help="ignore the cached calibration")
    add_device(p, "auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from cahfp.device.budget import device_budget
    from cahfp.device.calibrate import calibrate
    from cahfp.device.measure import accelerators, measure_device, training_memory
    from cahfp.device.profiles import REFERENCE_FLOPS_PER_SECOND, load_profile
    from cahfp.device.select import resolve_device
    from cahfp.messages import BudgetSettings, ModelSpec
    from cahfp.training import Recipe

    compute = resolve_device(args.device)
    board = load_profile(args.profile) if args.profile else None
    info = measure_device()
    spec = ModelSpec(
        name=args.model,
        width=args.width,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
    )
    measured = calibrate(spec, args.batch_size, use_cache=not args.fresh, device=compute)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    memory = args.memory_mb << 20 if args.memory_mb else training_memory(info, compute)
    device = device_budget(measured, memory, board)  # what `cahfp client` sets up, too
    if args.memory_mb:
        device.memory_bytes = memory
    if args.uplink_mbps:
        device.uplink_bytes_per_s = args.uplink_mbps * 1e6 / 8
    cal = device.model.calibration
    settings = BudgetSettings(safety=args.safety, min_keep=args.min_keep)
    cons = device.constraints(
        settings,
        args.deadline,
        int(args.epochs * args.samples),
        args.batch_size,
        score_samples=4 * args.batch_size,
    )
    try:
        choice = device.model.choose(cons)
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
        "compute_device": str(compute),
        "accelerators": accelerators(),
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

    def shown(value, fmt: str = "", unit: str = "") -> str:
        return "n/a" if value is None else f"{format(value, fmt)}{unit}"

    cg = info.cgroup
    quota = f"{cg.cpu_quota:g} cores" if cg.cpu_quota else "none"
    limit = f"{cg.memory_limit / mib:.0f} MiB" if cg.memory_limit else "none"
    print(
        f"         load {shown(info.load_1m, '.2f')}, temperature "
        f"{shown(info.temperature_c, '.0f', ' C')}, battery "
        f"{shown(info.battery_percent, '.0f', '%')}, accelerator {info.accelerator or 'none'}; "
        f"cgroup {shown(cg.version)}: cpu quota {quota}, memory limit {limit}; trains on "
        f"{compute}"
    )
    for acc in accelerators():
        kind = "integrated, shares the board's memory" if acc["integrated"] else "discrete"
        print(
            f"         {acc['device']} {acc['name']}: {acc['memory_bytes'] / mib:.0f} MiB "
            f"({kind}), compute capability {acc['capability']}"
        )
    if board is not None:
        print(
            f"emulated {board.name}: {board.relative_speed:g} x the reference speed (this host's "
            f"times x {device.time_scale:.3g}), memory {board.memory_bytes / mib:.0f} MiB, "
            f"uplink {board.uplink_mbps:g} Mbit/s"
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
        f"speed    {cal.flops_per_second / 1e9:.0f} GFLOP/s dense training on {compute}: "
        "relative_speed "
        f"{cal.flops_per_second / REFERENCE_FLOPS_PER_SECOND:.3g} in a device profile"
    )
    print(
        f"round    {args.samples} samples x {args.epochs:g} epochs, deadline {args.deadline:g} s:"
        f" {decision['reason']}"
    )
    return 0
