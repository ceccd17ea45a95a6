"""``cahfp demo``: a whole federation on this machine. An embedded broker, the coordinator in
this process and N client processes with different device profiles on Fashion-MNIST; a live
view, a final per-client table, and everything shut down afterwards, also on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cahfp.cli.options import output_console
from cahfp.config import load_config
from cahfp.device.boards import DEFAULT_BOARDS
from cahfp.pruning import build_compact
from cahfp.training import evaluate, measure_batchnorm_statistics
from coordinator.service import Coordinator
from coordinator.simulation import federation_data
from coordinator.view import ProgressView
from deploy.broker.embedded import EmbeddedBroker


def demo_config(args: argparse.Namespace):
    return load_config(
        args.config,
        {
            "federation.name": "demo",
            "federation.rounds": args.rounds,
            "federation.clients": args.clients,
            "federation.seed": args.seed,
            "federation.strategy": args.strategy,
            "federation.deadline_s": args.deadline,
            "federation.min_updates": 1,
            "model.name": "vgg11",
            "model.width": 0.25,
            "data.dataset": "fmnist",
            "data.partition": "dirichlet:0.5",
            "data.train_samples": args.clients * args.samples_per_client,
            "data.eval_samples": 2000,
            "data.data_dir": args.data_dir,
            "data.download": args.download or None,
            "clients.budget": "measured",
            "clients.profiles": list(DEFAULT_BOARDS),
        }
        if args.config is None
        else {},
    )


def client_command(
    cfg, url: str, client_id: str, index: int, num_clients: int, profile: str, *extra: str
) -> list[str]:
    """The `cahfp client` command line for client ``index`` of ``num_clients`` on the
    configured dataset and partition."""
    cmd = [
        sys.executable,
        "-m",
        "cahfp.cli",
        "client",
        "--broker",
        url,
        "--id",
        client_id,
        "--federation",
        cfg.federation.name,
        "--data",
        cfg.data.dataset,
        "--partition",
        cfg.data.partition,
        "--num-clients",
        str(num_clients),
        "--client-index",
        str(index),
        "--seed",
        str(cfg.federation.seed),
        "--profile",
        profile,
        *extra,
    ]
    if cfg.data.train_samples:
        cmd += ["--train-samples", str(cfg.data.train_samples)]
    if cfg.data.data_dir:
        cmd += ["--data-dir", cfg.data.data_dir]
    if cfg.data.download:
        cmd += ["--download"]
    return cmd


def spawn_clients(
    cfg, url: str, protocol: int = 5, prefix: str = "demo", until_finished: bool = False
) -> list[subprocess.Popen]:
    """One client process per configured client, on its partition of the configured dataset
    (emulating its device profile when ``clients.budget = "measured"``)."""
    procs = []
    for i in range(cfg.federation.clients):
        profile = cfg.profile_of(i) if cfg.clients.budget == "measured" else "none"
        extra = ["--mqtt-version", "5" if protocol == 5 else "3.1.1", "--threads", "1", "--quiet"]
        if until_finished:
            extra.append("--until-finished")
        cmd = client_command(cfg, url, f"{prefix}-{i}", i, cfg.federation.clients, profile, *extra)
        procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        )
    return procs


def stop_all(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def run_demo(args: argparse.Namespace) -> int:
    console = output_console(stderr=True)
    console.width = max(console.width, 110)
    cfg = demo_config(args)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    broker = EmbeddedBroker(args.broker)
    procs: list[subprocess.Popen] = []
    try:
        broker.start()
        note = (
            ""
            if broker.kind == "mosquitto"
            else (
                " (mosquitto not installed: using the in-process amqtt fallback, MQTT 3.1.1, "
                "for this local demo only)"
            )
        )
        console.print(f"broker: {broker.kind} at {broker.url}{note}")
        procs = spawn_clients(cfg, broker.url, broker.protocol)
        console.print(
            f"started {len(procs)} clients: "
            + ", ".join(f"demo-{i} ({cfg.profile_of(i)})" for i in range(len(procs)))
        )
        view = ProgressView(cfg, console, args.quiet)
        coord = Coordinator(cfg, broker.url, out, protocol=broker.protocol, on_event=view.event)
        dashboard = None
        if getattr(args, "dashboard", None):
            from coordinator.dashboard import serve

            dashboard = serve(coord.monitor, args.dashboard, args.dashboard_token)
            console.print(f"dashboard: {dashboard.url} (metrics: /metrics)")
        try:
            summary = coord.run(registration_timeout=args.registration_timeout)
        finally:
            view.stop()
            if dashboard:
                dashboard.stop()
        if len(coord.engine.clients) == 0:
            errors = [
                p.stderr.read().decode(errors="replace")[-800:]
                for p in procs
                if p.poll() is not None and p.stderr
            ]
            console.print("no client registered; client errors:\n" + "\n".join(errors))
            return 1
        print_table(console, cfg, coord, args, out)
        console.print(
            f"final accuracy {summary['final_accuracy']:.4f} after "
            f"{summary['rounds']} rounds; run directory {out}"
        )
        return 0
    except KeyboardInterrupt:
        console.print("interrupted: shutting everything down")
        return 130
    finally:
        stop_all(procs)
        broker.stop()


def print_table(console: Console, cfg, coord: Coordinator, args, out: Path) -> None:
    """Per board: profile, keep, the accuracy of its own submodel of the final global model with
    BatchNorm statistics recomputed on its own data (what it runs on-device), that submodel
    exported as ONNX (``OUT/onnx/<board>.onnx``: size, and its latency here, batch 1, one
    thread), bytes and device time per round."""
    from cahfp.data.datasets import dataset_info
    from cahfp.export import export_submodel
    from cahfp.inference import OnnxClassifier

    parts, test, _ = federation_data(cfg)
    info = dataset_info(cfg.data.dataset, cfg.data.data_dir)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    records = [r for r in coord.records if r.round > 0]
    table = Table(title="boards")
    cols = ("board", "profile", "keep (last)", "on-device accuracy", "ONNX MB",
            "ms/image here", "rounds ok", "MB up", "MB down", "device s/round")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("board", "profile") else "right")
    for cid, rec in sorted(coord.engine.clients.items()):
        outs = [c for r in records for c in r.clients if c.client_id == cid]
        ok = [c for c in outs if c.status == "ok"]
        i = int(cid.rsplit("-", 1)[-1]) if cid.rsplit("-", 1)[-1].isdigit() else rec.index
        acc = size = latency = "-"
        sub = None
        if rec.index_map is not None:
            sub = build_compact(coord.engine.model, rec.index_map)
            if rec.index_map:  # channels removed: the inherited statistics are stale
                measure_batchnorm_statistics(sub, parts[i % len(parts)])
        elif ok:
            sub = coord.engine.model
        if sub is not None:
            acc = f"{evaluate(sub, test).accuracy:.4f}"
            keep = ok[-1].keep_achieved if ok else 1.0
            onnx = export_submodel(sub.eval(), info, out / "onnx" / f"{cid}.onnx", keep=keep)
            size = f"{onnx.bytes / 1e6:.2f}"
            clf = OnnxClassifier(onnx.path, threads=1)
            latency = f"{clf.benchmark(1, iterations=50)['p50_ms']:.2f}"
        table.add_row(
            cid,
            cfg.profile_of(i),
            f"{ok[-1].keep_achieved:.2f}" if ok else "-",
            acc,
            size,
            latency,
            f"{len(ok)}/{len(outs)}",
            f"{sum(c.bytes_up for c in outs) / 1e6:.1f}",
            f"{sum(c.bytes_down for c in outs) / 1e6:.1f}",
            f"{sum(c.train_seconds + c.score_seconds for c in ok) / max(len(ok), 1):.1f}",
        )
    console.print(table)
    console.print(
        f"each board's model: {out / 'onnx'} (run one: cahfp infer {out / 'onnx'}/demo-0.onnx "
        "IMAGE); latency measured on this machine, not on the boards"
    )
