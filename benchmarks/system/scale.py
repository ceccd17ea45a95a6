"""Part 4: the coordinator with 10-1000 lightweight MQTT clients, one round each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.swarm import MAX_CLIENTS


def part_scale(args) -> list[dict]:
    """One coordinator round with N swarm clients; the coordinator in its own process."""
    from deploy.broker.embedded import EmbeddedBroker

    rows = []
    with EmbeddedBroker("mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.scale.split(",")]:
            fed = f"scale{n}"
            cfg = Path(tmp) / f"{fed}.toml"
            cfg.write_text(
                f'[federation]\nname = "{fed}"\nrounds = 1\nclients = {n}\ndeadline_s = 900\n'
                'strategy = "fedavg"\nmin_updates = 1\n'
                '[model]\nname = "vgg11"\nwidth = 0.33\n'
                f'[data]\ndataset = "fmnist"\neval_samples = 1000\n'
                + (f'data_dir = "{args.data_dir}"\n' if args.data_dir else "")
            )
            swarms = []  # several processes: see benchmarks.swarm.MAX_CLIENTS
            for k in range(0, n, MAX_CLIENTS):
                swarms.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.swarm",
                            "--broker",
                            broker.url,
                            "--federation",
                            fed,
                            "--clients",
                            str(min(MAX_CLIENTS, n - k)),
                            "--prefix",
                            f"v{k // MAX_CLIENTS}-",
                            "--width",
                            "0.33",
                        ],
                        stdout=subprocess.PIPE,
                        stderr=open(Path(tmp) / f"swarm-{fed}-{k}.log", "w"),  # noqa: SIM115
                        text=True,
                    )
                )
            for swarm in swarms:
                line = swarm.stdout.readline()
                if "swarm ready" not in line:
                    swarm.kill()
                    logs = "".join(p.read_text()[-2000:] for p in Path(tmp).glob("swarm-*.log"))
                    raise RuntimeError(f"swarm did not start: {line} {logs}")
            run = Path(tmp) / fed
            t0 = time.perf_counter()
            coord = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cahfp.cli",
                    "coordinator",
                    "--broker",
                    broker.url,
                    "--config",
                    str(cfg),
                    "--out",
                    str(run),
                    "--registration-timeout",
                    "300",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(coord.pid, 0)
            coord.returncode = status
            wall = time.perf_counter() - t0
            for swarm in swarms:
                swarm.terminate()
                swarm.wait(60)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rec = lines[-1]
            oks = sum(c["status"] == "ok" for c in rec["clients"])
            rows.append(
                {
                    "clients": n,
                    "aggregated": rec["aggregated"],
                    "ok": oks,
                    "round_s": rec["seconds"],
                    "aggregate_s": rec["aggregate_seconds"],
                    "eval_s": rec["eval_seconds"],
                    "statistics_s": rec.get("statistics_seconds", 0.0),
                    "measured_statistics": sum(c.get("statistics") == "ok" for c in rec["clients"]),
                    "dense": sum((c.get("keep_achieved") or 0) >= 1 for c in rec["clients"]),
                    "cpu_round_s": rec["cpu_seconds"],
                    "cpu_per_update_ms": rec["cpu_seconds"] / max(rec["aggregated"], 1) * 1e3,
                    "updates_per_s": rec["aggregated"] / max(rec["seconds"], 1e-9),
                    # the coordinator's own high-water mark (its rusage counts this process's
                    # memory at the fork that started it)
                    "peak_rss_mb": rec["peak_rss_mb"],
                    "inbox_memory_mb": rec["transport"].get("inbox_peak_memory_mb", 0.0),
                    "spooled_mb": rec["transport"].get("inbox_peak_on_disk_mb", 0.0),
                    "process_wall_s": wall,
                    "process_cpu_s": usage.ru_utime + usage.ru_stime,
                }
            )
            print(f"scale {n}: {rows[-1]}", flush=True)
    return rows
