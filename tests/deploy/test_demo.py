"""The one-command demo: a real federation over an embedded broker, and nothing left behind."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.mqtt_helpers import REPO

pytestmark = pytest.mark.slow


def leftovers(url: str) -> list[str]:
    port = url.rsplit(":", 1)[-1]
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if url in cmd or (cmd.startswith("mosquitto") and port in cmd):
            found.append(cmd)
    return found


def _interruptible() -> None:
    """In the child: Ctrl-C's default action, even when the test runs where SIGINT is ignored
    (a background job of a non-interactive shell passes SIG_IGN down, and Python then installs
    no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "140"}
    kwargs.setdefault("preexec_fn", _interruptible)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cahfp.cli",
            "demo",
            "--rounds",
            "2",
            "--clients",
            "3",
            "--samples-per-client",
            "200",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def watch_dashboard(proc) -> tuple[str, dict]:
    """Read the demo's output up to its dashboard line, then poll ``/api/state`` until round 1
    has ended with every board seen; the output read and that state."""
    import json
    import urllib.request

    text = line = ""
    while "dashboard:" not in line:
        line = proc.stdout.readline()
        assert line, text
        text += line
    url = re.search(r"dashboard: (http://\S+)/", text).group(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/api/state", timeout=10) as r:
            state = json.loads(r.read())
        if state["round"] >= 1 and not state["in_round"] and len(state["boards"]) == 3:
            return text, state
        time.sleep(0.5)
    raise AssertionError(f"round 1 did not end on the dashboard: {state}")


def broker_url(text: str) -> str:
    m = re.search(r"at (mqtt://127\.0\.0\.1:\d+)", text)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_demo_runs_a_federation_and_cleans_up(fmnist_root, tmp_path, kind):
    if kind == "mosquitto":
        import shutil

        from tests.conftest import missing

        if not shutil.which("mosquitto"):
            missing("mosquitto is not installed")
    dashboard = ["--dashboard", "127.0.0.1:0"] if kind == "mosquitto" else []
    proc = demo("--broker", kind, "--out", str(tmp_path / "run"), "--data-dir", str(fmnist_root),
                *dashboard)  # fmt: skip
    head = ""
    if dashboard:  # the dashboard shows the boards (presence over the real broker) live
        head, state = watch_dashboard(proc)
        assert all(b["online"] for b in state["boards"]), state["boards"]
        assert [b["id"] for b in state["boards"]] == ["demo-0", "demo-1", "demo-2"]
        assert all(b["profile"] for b in state["boards"])
    out, _ = proc.communicate(timeout=600)
    out = head + out
    assert proc.returncode == 0, out
    assert "final accuracy" in out and "on-device" in out
    for cid in ("demo-0", "demo-1", "demo-2"):
        assert cid in out
    if kind == "amqtt":
        assert "amqtt fallback" in out
    time.sleep(1)
    assert leftovers(broker_url(out)) == []
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_ctrl_c_leaves_no_process_behind(fmnist_root, tmp_path):
    # enough rounds that it cannot finish first (a quiet host runs a round in a second)
    proc = demo("--out", str(tmp_path / "run"), "--data-dir", str(fmnist_root), "--rounds", "500")
    text = ""
    deadline = time.monotonic() + 120
    while "round 1:" not in text and time.monotonic() < deadline:
        text += proc.stdout.readline()
    assert "started 3 clients" in text and "round 1:" in text, text
    proc.send_signal(signal.SIGINT)  # mid-run: clients training, the broker up
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text + out
    time.sleep(1)
    assert leftovers(broker_url(text)) == []
