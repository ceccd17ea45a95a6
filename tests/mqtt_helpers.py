"""Processes and files for the MQTT tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TEST_SEED

REPO = Path(__file__).resolve().parents[1]
SEED = 1 + TEST_SEED  # the federation's and the clients' data seed


def write_config(
    path: Path,
    name: str,
    rounds: int,
    clients: int,
    data_dir: Path,
    deadline: float = 20.0,
    **extra,
) -> Path:
    sections = {
        "federation": {
            "name": name,
            "rounds": rounds,
            "clients": clients,
            "seed": SEED,
            "deadline_s": deadline,
            "min_updates": 1,
            "strategy": "cahfp",
        },
        "model": {"name": "vgg11", "width": 0.25},
        "data": {
            "dataset": "fmnist",
            "partition": "iid",
            "train_samples": 300 * clients,
            "eval_samples": 1000,
            "data_dir": str(data_dir),
        },
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "pruning": {"tiers": [1.0, 0.5, 0.3], "refresh_period": 2},
        # these clients do not measure themselves (--profile none): the tiers give their keeps
        "clients": {"budget": "fixed-tiers"},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        sections.setdefault(section, {})[field] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "cahfp.cli", *args],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cahfp ARGS`` to completion (``python -m`` from the repository root, which is then on
    sys.path, as for an operator in a checkout) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "cahfp.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def client(
    url: str,
    fed: str,
    cid: str,
    index: int,
    n: int,
    data_dir: Path,
    log: Path,
    *extra: str,
    train_samples: int | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    return cli(
        "client",
        "--broker",
        url,
        "--id",
        cid,
        "--federation",
        fed,
        "--data",
        "fmnist",
        "--partition",
        "iid",
        "--num-clients",
        str(n),
        "--client-index",
        str(index),
        "--train-samples",
        str(train_samples or 300 * n),
        "--seed",
        str(SEED),
        "--data-dir",
        str(data_dir),
        "--profile",
        "none",
        "--threads",
        "1",
        "--until-finished",
        *extra,
        log=log,
        env=env,
    )


def coordinator(
    url: str, config: Path, out: Path, log: Path, *extra: str, env: dict | None = None
) -> subprocess.Popen:
    return cli(
        "coordinator",
        "--broker",
        url,
        "--config",
        str(config),
        "--out",
        str(out),
        "--registration-timeout",
        "60",
        *extra,
        log=log,
        env=env,
    )


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def start_generated_broker(d: Path, port: int) -> subprocess.Popen:
    """mosquitto running the configuration `cahfp deploy init` wrote into ``d``, once it
    listens on ``port``; its log goes to ``d/mosquitto.log``."""
    from deploy.broker.embedded import wait_port

    log = d / "mosquitto.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(d / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    assert wait_port(port), log.read_text() if proc.poll() is not None else "no listener"
    return proc


def logs(folder: Path) -> str:
    """The tail of every process log in ``folder``, for assertion messages."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.log")))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finish(procs: list[subprocess.Popen], timeout: float = 120.0) -> list[int]:
    """Wait for processes to exit by themselves; kill (and report -9) what does not."""
    codes = []
    end = time.monotonic() + timeout
    for p in procs:
        try:
            codes.append(p.wait(max(end - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
            codes.append(-9)
    return codes


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
