"""The ``cahfp`` command. Subcommands import their implementation lazily so that, e.g.,
``cahfp infer`` on an inference-only board never imports torch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cahfp.errors import CAHFPError

Handler = Callable[[argparse.Namespace], int]


def _mqtt_level(text: str) -> int:
    """The MQTT protocol level for ``--mqtt-version``: 5, or 4 for 3.1.1."""
    levels = {"5": 5, "3.1.1": 4, "311": 4, "4": 4}
    if text not in levels:
        raise argparse.ArgumentTypeError(f"unknown MQTT version {text!r} (use 5 or 3.1.1)")
    return levels[text]


def _presence_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds in (0, 3600], got {text!r}")
    return value


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
    config = args.config
    if args.resume and config is None and args.out:
        from pathlib import Path

        config = Path(args.out) / "config.toml"  # the interrupted run's own configuration
        if not config.is_file():
            raise CAHFPError(f"{args.out} holds no run to resume (no config.toml); give --config")
    cfg = load_config(config, overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = simulate(cfg, args.out, quiet=args.quiet, resume=args.resume, force=args.force)
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
    from coordinator.records import load_metrics, run_summary

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
        cfg = load_config(path / "config.toml")  # the run's config must still be valid
        s, name = run_summary(path, cfg), path.name
        if not s["finished"]:
            name += " (unfinished)"
            print(
                f"note: {path} is unfinished (no summary.json): summarised from its "
                f"metrics.jsonl, {s['rounds']} of {cfg.federation.rounds} rounds",
                file=sys.stderr,
            )

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        table.add_row(
            name,
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

    from cahfp.device.budget import device_budget
    from cahfp.device.calibrate import calibrate
    from cahfp.device.measure import measure_device
    from cahfp.messages import BudgetSettings, ModelSpec
    from cahfp.training import Recipe
    from device_profiles import REFERENCE_FLOPS_PER_SECOND, load_profile

    board = load_profile(args.profile) if args.profile else None
    info = measure_device()
    spec = ModelSpec(
        name=args.model,
        width=args.width,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
    )
    measured = calibrate(spec, args.batch_size, use_cache=not args.fresh)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    memory = args.memory_mb << 20 if args.memory_mb else info.usable_memory
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
        f"cgroup {shown(cg.version)}: cpu quota {quota}, memory limit {limit}"
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
        f"speed    {cal.flops_per_second / 1e9:.0f} GFLOP/s dense training: relative_speed "
        f"{cal.flops_per_second / REFERENCE_FLOPS_PER_SECOND:.3g} in a device profile"
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
    if run and not args.checkpoint and not checkpoint.is_file():
        from coordinator.records import checkpoint_weights

        rnd, checkpoint = checkpoint_weights(run)
        print(
            f"note: {run} has no model.safetensors (the run is unfinished); exporting its "
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
        calibration_batches=args.calibration_batches,
    )
    print(
        f"wrote {result.path} ({result.bytes / 1e6:.2f} MB), keep {args.keep:g}, "
        f"onnxruntime parity {result.max_abs_diff:.1e}"
    )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from cahfp.inference import OnnxClassifier

    if not args.inputs and not args.benchmark:
        raise CAHFPError(
            "nothing to do: give images or .npy batches to classify "
            "(cahfp infer MODEL IMAGE...), or --benchmark"
        )
    clf = OnnxClassifier(args.model, threads=args.threads)
    if not clf.verified:
        print(
            f"note: {args.model} carries no weights digest (exported before digests); "
            "its integrity is not checked",
            file=sys.stderr,
        )
    if args.benchmark:
        for batch in dict.fromkeys([1, args.batch]):
            b = clf.benchmark(batch, iterations=args.iterations)
            print(
                f"batch {batch:>3}: p50 {b['p50_ms']:.3f} ms, p95 {b['p95_ms']:.3f} ms, "
                f"{b['throughput']:.1f} images/s"
            )
    for pred in clf.classify(args.inputs, args.top_k, strict=args.strict):
        if pred.note:
            print(f"note: {pred.note}", file=sys.stderr)
        labels = ", ".join(f"{label} {p:.3f}" for label, p in pred.top)
        print(f"{pred.source}: {labels}")
    return 0


def _logging(args: argparse.Namespace) -> None:
    import logging

    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_demo(args: argparse.Namespace) -> int:
    from deploy.demo import run_demo

    if args.quiet:
        _logging(args)
    return run_demo(args)


def cmd_client(args: argparse.Namespace) -> int:
    from edge_client.service import run_client

    _logging(args)
    return run_client(args)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cahfp.config import load_config
    from coordinator.service import Coordinator
    from coordinator.view import ProgressView

    _logging(args)
    cfg = load_config(
        args.config,
        {
            "data.data_dir": args.data_dir,
            "data.download": True if args.download else None,
            **_parse_set(args.set),
        },
    )
    view = ProgressView(cfg, Console(stderr=True), quiet=True)
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
        on_event=view.event,
        inbox_memory=int(args.inbox_memory_mb * (1 << 20)),
        spool_dir=args.spool_dir,
    )
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):  # stop within a second, keep completed rounds
        signal.signal(sig, lambda *_: coord.stop.set())
    summary = coord.run(registration_timeout=args.registration_timeout)
    acc = summary["final_accuracy"]
    print(
        ("stopped: " if coord.stop.is_set() else "")
        + (f"final accuracy {acc:.4f}" if acc is not None else "no round evaluated")
        + f" after {summary['rounds']} rounds"
        + (f"; results in {args.out}" if args.out else "")
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from deploy import broker_config as bc

    if args.action == "init":
        devices = [d for d in (args.devices or "").split(",") if d]
        hosts = [h for h in (args.host or "").split(",") if h] or None
        d = bc.init(
            args.out,
            devices,
            federation=args.federation,
            hosts=hosts,
            port=args.port,
            bind=args.bind,
            client_certs=args.client_certs,
        )
        print(
            f"deployment for federation {args.federation!r} in {d}: {len(devices)} devices; "
            f"run the broker with: mosquitto -c {d}/mosquitto.conf"
        )
        print(
            f"copy {d}/clients/<name>/ to each board (deploy/provision/provision-board.sh "
            "--bundle ...), clients/coordinator/ to the coordinator host"
        )
    elif args.action == "add-device":
        out = bc.add_device(args.dir, args.name)
        cert = " (with its client certificate)" if (out / "client.crt").is_file() else ""
        print(f"added {args.name}; its bundle{cert} is {out}; reload the broker to apply")
    else:
        cert = bc.revoke_device(args.dir, args.name)
        what = "its password and certificate" if cert else "its password"
        print(
            f"revoked {args.name}; reload the broker (systemctl reload mosquitto or "
            f"kill -HUP <its pid>) so that it stops accepting {what}"
        )
    return 0


def cmd_testbed(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        print("the testbed needs root (network namespaces, tc, cgroups); skipped")
        return 0
    from cahfp.config import load_config
    from deploy.testbed import parse_profiles, run_testbed

    if not args.quiet:
        _logging(args)
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


def _add_broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument(
        "--credentials",
        help="file with 'username:password' (else CAHFP_MQTT_USERNAME / CAHFP_MQTT_PASSWORD)",
    )
    p.add_argument("--ca", help="CA certificate for mqtts://")
    p.add_argument(
        "--cert",
        help="client certificate (PEM) for a broker that requires one (else CAHFP_CERT)",
    )
    p.add_argument("--key", help="the client certificate's private key (else CAHFP_KEY)")
    p.add_argument(
        "--mqtt-version",
        type=_mqtt_level,
        default=5,
        metavar="{5,3.1.1}",
        help="MQTT protocol: 5 (default) or 3.1.1 for brokers without MQTT 5",
    )


def build_parser() -> argparse.ArgumentParser:
    # nothing heavier than argparse here: `cahfp infer` on an inference-only board has only
    # onnxruntime, numpy and Pillow (no torch, no pydantic)
    parser = argparse.ArgumentParser(
        prog="cahfp",
        description="CA-HFP Edge: curvature-aware heterogeneous federated pruning on edge boards",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="a whole federation on this machine: embedded broker, "
        "coordinator and client processes on Fashion-MNIST",
    )
    _add_data_dir(p)
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
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("coordinator", help="run the coordinator service over MQTT")
    _add_broker(p)
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
    _add_data_dir(p)
    p.set_defaults(handler=cmd_coordinator)

    p = sub.add_parser("client", help="run the edge client (device agent) over MQTT")
    _add_broker(p)
    p.add_argument("--id", required=True, help="client id (= MQTT username when secured)")
    p.add_argument(
        "--federation",
        default="federation",
        help="federation id (the coordinator's federation.name)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="imagefolder:PATH, or fmnist/cifar10/cifar100 "
        "with --partition/--num-clients/--client-index",
    )
    p.add_argument("--partition", default="iid")
    p.add_argument("--num-clients", type=int, default=1)
    p.add_argument("--client-index", type=int, default=0)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="with validation, leave out the coordinator's held-out images (--eval-samples of "
        "them); must match its data.eval_split, data.eval_samples and federation.seed",
    )
    p.add_argument("--eval-samples", type=int)
    p.add_argument(
        "--profile",
        default=os.environ.get("CAHFP_PROFILE", "auto"),
        help="auto (measure this device; the default, or $CAHFP_PROFILE), none (do not measure: "
        "train what the coordinator assigns) or a device profile name to emulate on this host "
        "(on one core unless --threads says otherwise)",
    )
    p.add_argument("--export-dir", help="write the trained submodel as model.onnx here")
    p.add_argument(
        "--until-finished",
        action="store_true",
        help="exit when the coordinator announces that the federation has finished",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 when emulating)"
    )
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument(
        "--presence-every",
        type=_presence_seconds,
        metavar="SECONDS",
        help="refresh this board's presence every SECONDS (default: the protocol's, "
        "cahfp.protocol.PRESENCE_EVERY, 30); the coordinator counts it as gone after "
        "PRESENCE_MISSES (3) missed refreshes",
    )
    p.add_argument("--quiet", action="store_true")
    _add_data_dir(p)
    p.set_defaults(handler=cmd_client)

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
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint (with its "
        "config.toml unless --config is given); the result is the uninterrupted run's",
    )
    again.add_argument(
        "--force", action="store_true", help="start over in an --out that holds a run (deletes it)"
    )
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

    p = sub.add_parser(
        "compare", help="compare runs (unfinished ones from their metrics): one table and a plot"
    )
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
    p.add_argument(
        "--profile",
        help="emulate this board profile on this host (a name from device_profiles/ or a file), "
        "as `cahfp client --profile NAME` does",
    )
    p.add_argument("--fresh", action="store_true", help="ignore the cached calibration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_profile)

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
        "--calibration-batches",
        type=int,
        default=8,
        help="batches of training data (64 images) to recompute a pruned model's BatchNorm "
        "statistics from; 0 keeps the inherited ones and, with a data-free scorer, needs no data",
    )
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("infer", help="classify images with an exported model (onnxruntime only)")
    p.add_argument("model", help="an .onnx file written by cahfp")
    p.add_argument("inputs", nargs="*", help="PNG/JPEG images or .npy batches")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse images whose size or channels differ from the model input (default: "
        "convert to grey/RGB and resize them, with a note on stderr)",
    )
    p.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)  # now the default
    p.add_argument("--benchmark", action="store_true", help="print latency and throughput")
    p.add_argument("--batch", type=int, default=32, help="benchmark batch size")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int)
    p.set_defaults(handler=cmd_infer)

    p = sub.add_parser("deploy", help="broker configuration, certificates and device credentials")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("init", help="a secured broker configuration for one federation")
    q.add_argument("--out", required=True)
    q.add_argument("--devices", default="", help="comma-separated device names")
    q.add_argument("--federation", default="federation")
    q.add_argument("--host", help="comma-separated broker host names / IPs for the certificate")
    q.add_argument("--port", type=int, default=8883)
    q.add_argument("--bind", default="0.0.0.0")
    q.add_argument(
        "--client-certs", action="store_true", help="also issue and require client certificates"
    )
    for action, helptext in (
        ("add-device", "add one device"),
        ("revoke-device", "revoke one device"),
    ):
        q = dsub.add_parser(action, help=helptext)
        q.add_argument("--dir", required=True, help="the deployment directory")
        q.add_argument("name")
    p.set_defaults(handler=cmd_deploy)

    p = sub.add_parser(
        "testbed",
        help="emulated edge testbed: clients in network namespaces "
        "and cgroups with their profiles' limits (root)",
    )
    p.add_argument(
        "--profiles",
        default="pi4:2,pi5:1,nano:1",
        help="NAME:COUNT,... (pi4, pi5, nano, orin, server, a profile name or file)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--deadline", type=float, default=30.0)
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--json", help="write the per-client report here")
    p.add_argument("--quiet", action="store_true")
    _add_data_dir(p)
    p.set_defaults(handler=cmd_testbed)

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
        return getattr(exc, "exit_code", 2)  # 77: refused for good, systemd does not restart
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
