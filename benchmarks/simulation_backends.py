"""Simulation backends side by side on one job (``benchmarks.flower_job``: VGG-11 x0.25,
Fashion-MNIST, 10 clients sharing 15,000 images, 10 rounds, FedAvg, statistics phase off):
this project in process, on worker processes and on Ray, and Flower 1.42's simulation engine
(Ray) with its default client resources and with one CPU per client. Each contender is a
separate process tree, run one after another in one interleaved pass (``repeats`` passes),
sampled every second for the memory of all its processes (the sum of their proportional set
sizes, and of their resident sizes, which count shared libraries once per process).

Flower runs in its own virtualenv (``--flower-venv``, made on first use: ``flwr[simulation]
==1.42.0``, this repository's torch pins, and this project, editable). The benchmark checks
that the job is the same on both sides: the update Flower's client 0 sent in round 1 equals,
tensor for tensor, the one this project's engine gets from client 0 (same initial model, data
and client round) at the torch thread count Flower's client ran with."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.flower_job import JOB, job_config
from cahfp.errors import CAHFPError

REPO = Path(__file__).resolve().parents[1]
FLOWER = "flwr[simulation]==1.42.0"


@dataclass
class Contender:
    name: str
    argv: list[str]
    flower: bool = False
    runs: list[dict] = field(default_factory=list)


def ensure_flower_venv(venv: Path) -> Path:
    """The Flower virtualenv's python, made if missing; one line when it cannot be made."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import flwr, cahfp, torch; print(flwr.__version__)"]
    if python.exists():
        ok = subprocess.run(probe, capture_output=True, text=True, check=False)
        if ok.returncode == 0 and ok.stdout.strip() == "1.42.0":
            return python
    pins = [
        line.strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith(("torch==", "torchvision=="))
    ]
    print(f"making {venv} ({FLOWER}, {', '.join(pins)}, this project)", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", FLOWER, *pins, "-e", str(REPO)],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CAHFPError(f"cannot make the Flower virtualenv {venv}: {last}")
    return python


def _job_toml(rounds: int, train_samples: int | None, path: Path) -> Path:
    import tomli_w

    from cahfp.config import set_path

    data: dict = {}
    for key, value in {**JOB, "federation.rounds": rounds}.items():
        set_path(data, key, value)
    if train_samples:
        set_path(data, "data.train_samples", train_samples)
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


def contenders(args, job: Path, flower_python: Path | None) -> list[Contender]:
    ours = [sys.executable, "-m", "cahfp.cli", "simulate", "--config", str(job), "--quiet"]
    out = [
        Contender("cahfp, in process (one client at a time)", [*ours, "--backend", "inprocess"]),
        Contender("cahfp, 2 worker processes", [*ours, "--backend", "processes", "--workers", "2"]),
    ]
    if args.ray:
        out.append(
            Contender(
                "cahfp, Ray, 2 workers x 1 CPU",
                [*ours, "--backend", "ray", "--workers", "2", "--client-cpus", "1"],
            )
        )
    if flower_python:
        app = [str(flower_python), "-m", "benchmarks.flower_app"]
        app += ["--rounds", str(args.backend_rounds)]
        out.append(Contender("Flower 1.42, default client resources (2 CPUs)", app, flower=True))
        out.append(
            Contender("Flower 1.42, 1 CPU per client", [*app, "--client-cpus", "1"], flower=True)
        )
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes, from the kernel's own sum (/proc/PID/smaps_rollup,
    cheap enough to read every second)."""
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    return pss, rss


def _sample(root: psutil.Process) -> tuple[int, int, int]:
    """(PSS, RSS, processes) of ``root`` and all its descendants, in bytes."""
    pss = rss = n = 0
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for p in tree:
        try:
            a, b = _rollup(p.pid)
        except OSError:  # gone, or not ours to read
            continue
        pss, rss, n = pss + a, rss + b, n + 1
    return pss, rss, n


def measure(argv: list[str], env: dict) -> dict:
    """Run ``argv`` to the end: wall seconds and peak memory of its process tree."""
    start = time.perf_counter()
    log_path = Path(env["CAHFP_BENCH_LOG"])
    log = log_path.open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "rss": 0, "procs": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            pss, rss, n = _sample(root)
            peak.update(pss=max(peak["pss"], pss), rss=max(peak["rss"], rss),
                        procs=max(peak["procs"], n))  # fmt: skip
            done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    log.close()
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise CAHFPError(f"{' '.join(argv[:4])} exited with {code}: {' | '.join(tail)}")
    return {"wall_s": wall, "peak_pss_mb": peak["pss"] / 2**20,
            "peak_rss_mb": peak["rss"] / 2**20, "processes": peak["procs"]}  # fmt: skip


def rounds_of(out_dir: Path, flower: bool) -> tuple[list[float], float]:
    """Seconds of each round (training, aggregation and evaluation) and the final accuracy."""
    if flower:
        marks = json.loads((out_dir / "flower.json").read_text())["marks"]
        return [b["t"] - a["t"] for a, b in itertools.pairwise(marks)], marks[-1]["accuracy"]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if r["round"] > 0], rows[-1]["accuracy"]


def our_first_update(rounds: int, threads: int) -> dict:
    """Client 0's round-1 update as this project's engine makes it, at ``threads`` torch
    threads."""
    import torch

    from cahfp.client_round import ClientState, run_task
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport
    from coordinator.simulation import client_id, evaluator, federation_data

    cfg = job_config(rounds)
    clients, test_set, spec = federation_data(cfg)
    states = {client_id(i): ClientState(client_id(i), d) for i, d in enumerate(clients)}
    keeps = {client_id(i): cfg.keep_of(i) for i in range(len(clients))}
    engine = RoundEngine(
        cfg, spec, InProcessTransport(states), evaluator(test_set, torch.device("cpu")), keeps
    )
    task, payload = engine.make_task(client_id(0), 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_task(states[client_id(0)], task, payload)
    finally:
        torch.set_num_threads(before)
    from cahfp.wire import decode_update

    return decode_update(result.payload, engine.model.state_dict())[0]


def same_first_update(rounds: int, flower_dir: Path) -> bool:
    """Whether the update Flower's client 0 sent in round 1 equals this project's, tensor for
    tensor, at the torch thread count Flower's client ran with."""
    import torch

    from cahfp.wire import decode_update

    threads = json.loads((flower_dir / "first_update.json").read_text())["threads"]
    ours = our_first_update(rounds, threads)
    theirs = decode_update((flower_dir / "first_update.safetensors").read_bytes(), ours)[0]
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def run(args) -> dict:
    """Every contender, ``args.repeats`` interleaved passes; the summary rows."""
    if args.flower and args.backend_train_samples:
        raise CAHFPError("Flower runs the whole job: leave --backend-train-samples out")
    flower_python = None if not args.flower else ensure_flower_venv(Path(args.flower_venv))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    if args.data_dir:
        env["CAHFP_DATA_DIR"] = str(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = _job_toml(args.backend_rounds, args.backend_train_samples, tmp / "job.toml")
        field_ = contenders(args, job, flower_python)
        for k in range(args.repeats):
            for i, c in enumerate(field_):
                out = tmp / f"c{i}-r{k}"
                argv = [*c.argv, str(out)] if c.flower else [*c.argv, "--out", str(out)]
                m = measure(argv, {**env, "CAHFP_BENCH_LOG": f"{out}.log"})
                per_round, acc = rounds_of(out, c.flower)
                m.update(round_s=statistics.mean(per_round), accuracy=acc,
                         startup_s=m["wall_s"] - sum(per_round))  # fmt: skip
                c.runs.append(m)
                print(f"{c.name}: {m['round_s']:.2f} s/round, start-up {m['startup_s']:.1f} s, "
                      f"peak {m['peak_pss_mb']:.0f} MB PSS", file=sys.stderr)  # fmt: skip
        check = None
        if flower_python:
            flower_dirs = [tmp / f"c{i}-r0" for i, c in enumerate(field_) if c.flower]
            check = all(same_first_update(args.backend_rounds, d) for d in flower_dirs)
    rows = []
    for c in field_:
        row = {"name": c.name, "flower": c.flower, "runs": c.runs}
        for key in ("round_s", "startup_s", "wall_s", "peak_pss_mb", "peak_rss_mb", "accuracy"):
            row[key] = statistics.mean(r[key] for r in c.runs)
        row["processes"] = max(r["processes"] for r in c.runs)
        rows.append(row)
    return {"rows": rows, "same_first_update": check, "rounds": args.backend_rounds,
            "repeats": args.repeats, "train_samples": args.backend_train_samples}  # fmt: skip


def section(result: dict) -> list[str]:
    """The Markdown section of ``benchmarks/results/accelerators.md``."""
    from benchmarks.common import md_table

    rows = result["rows"]
    base = rows[0]["round_s"]
    flowers = [r for r in rows if r["flower"]]
    table = [
        [
            r["name"],
            f"{r['round_s']:.2f}",
            f"{base / r['round_s']:.2f}x",
            f"{r['startup_s']:.1f}",
            f"{r['peak_pss_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            str(r["processes"]),
            f"{r['accuracy']:.4f}",
        ]
        for r in rows
    ]
    headers = ["backend", "s per round", "speed vs in process", "start-up s",
               "peak PSS MB (all processes)", "peak RSS MB (sum)", "processes",
               "final accuracy"]  # fmt: skip
    lines = [
        f"The job: VGG-11 x0.25 on Fashion-MNIST, 10 clients sharing "
        f"{result['train_samples'] or 15000} training images, {result['rounds']} rounds, FedAvg, "
        "statistics phase off, evaluation after every round (`benchmarks/flower_job.py`); "
        f"{result['repeats']} interleaved pass(es), means. A round's seconds include training, "
        "aggregation and the evaluation; start-up is the rest of the process's wall time "
        "(imports, data, workers, shutdown).",
        "",
        md_table(headers, table),
        "",
    ]
    if flowers:
        same = result["same_first_update"]
        lines.append(
            "Same job on both sides: Flower's client 0 sent in round 1 "
            + ("exactly" if same else "NOT")
            + " the update this project's engine gets from client 0 at the same torch thread "
            "count (every tensor equal; Ray gives a client of 2 CPUs 2 threads)."
        )
        ours = [r for r in rows if not r["flower"]]
        best = min(ours, key=lambda r: r["round_s"])
        flower_default = flowers[0]
        ratio = flower_default["round_s"] / best["round_s"]
        lines += [
            "",
            f"Goal (at least 1.3x faster per round than Flower's default simulation, lower peak "
            f"memory than it): {best['name']} takes {best['round_s']:.2f} s per round against "
            f"{flower_default['round_s']:.2f} s, {ratio:.2f}x "
            + ("(met)" if ratio >= 1.3 else "(missed)")
            + f"; peak PSS {best['peak_pss_mb']:.0f} MB against {flower_default['peak_pss_mb']:.0f}"
            f" MB, RSS sum {best['peak_rss_mb']:.0f} MB against "
            f"{flower_default['peak_rss_mb']:.0f} MB "
            + ("(met)" if best["peak_pss_mb"] < flower_default["peak_pss_mb"] else "(missed)")
            + ".",
        ]
    else:
        lines.append("Flower not run (`--no-flower`).")
    return lines
