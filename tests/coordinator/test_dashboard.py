"""The coordinator's live dashboard and Prometheus /metrics: the state the engine's events build,
served over HTTP (JSON, server-sent events, the page, the text exposition format) by
``cahfp simulate --dashboard``; a token off loopback; a malformed address in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cahfp.config import load_config
from cahfp.errors import CAHFPError
from coordinator.dashboard import parse_address, serve
from coordinator.monitor import Monitor
from coordinator.records import ClientOutcome, RoundRecord


def _get(url: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metrics(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_the_monitor_follows_the_engines_events():
    m = Monitor(load_config(None, {"federation.deadline_s": 30}))
    m.event("initial", {"record": RoundRecord(0, 0.1, 2.3, 0.0, 0)})
    m.event("round_start", {"round": 1, "selected": ["pi-01", "pi-02"]})
    assert m.snapshot()["in_round"] and m.snapshot()["deadline_at"] is not None
    m.event("client_done", {"round": 1, "outcome": ClientOutcome(
        "pi-01", "ok", keep_target=None, keep_achieved=0.4, bytes_up=1000, bytes_down=4000,
        train_seconds=12.0, score_seconds=1.0)})  # fmt: skip
    m.event("rejected", {"client": "pi-02", "reason": "update has NaN values: conv1"})
    m.event("client_done", {"round": 1, "outcome": ClientOutcome(
        "pi-02", "missing", "no update before the deadline")})  # fmt: skip
    m.event("round_end", {"record": RoundRecord(1, 0.42, 1.7, 31.0, 1, statistics_seconds=0.5)})
    s = m.snapshot()
    assert (s["round"], s["in_round"], s["deadline_s"]) == (1, False, 30)
    assert [h["accuracy"] for h in s["history"]] == [0.1, 0.42]
    a, b = s["boards"]
    assert (a["id"], a["keep"], a["last_seconds"], a["bytes_up"], a["online"]) == (
        "pi-01", 0.4, 13.0, 1000, True)  # fmt: skip
    assert b["last_status"] == "missing" and b["last_error"] == "no update before the deadline"
    values = _metrics(__import__("prometheus_client").generate_latest(m.metrics.registry).decode())
    assert values[("cahfp_rounds_completed_total", ())] == 1
    assert values[("cahfp_updates_total", (("reason", "update has nan values"),
                                           ("status", "rejected")))] == 1  # fmt: skip
    assert values[("cahfp_bytes_total", (("direction", "in"),))] == 1000
    assert values[("cahfp_coordinator_rss_bytes", ())] > 10e6


def test_a_dashboard_off_loopback_needs_its_token():
    d = serve(Monitor(load_config(None, {})), "0.0.0.0:0")
    try:
        assert d.token and d.url.endswith(f"?token={d.token}")
        port = re.search(r":(\d+)/", d.url).group(1)
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/api/state")[0] == 401
        assert _get(f"{base}/metrics?token=wrong")[0] == 401
        assert _get(f"{base}/api/state?token={d.token}")[0] == 200
        code, body = _get(f"{base}/metrics", {"Authorization": f"Bearer {d.token}"})
        assert code == 200 and b"cahfp_rounds_completed_total" in body
    finally:
        d.stop()
    with pytest.raises(CAHFPError, match=r"^--dashboard expects HOST:PORT \(e\.g\. 127"):
        parse_address("localhost:http")


def test_simulate_serves_a_live_dashboard(fmnist_root, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cahfp.cli", "simulate", "--rounds", "8", "--clients", "3",
         "--backend", "inprocess", "--data-dir", str(fmnist_root), "--dashboard", "127.0.0.1:0",
         "--set", "data.train_samples=1500", "--set", "data.eval_samples=200",
         "--set", "clients.budget=fixed-tiers"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        while "dashboard:" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "simulate ended without a dashboard line"
        url = re.search(r"(http://\S+)/", line).group(1)
        code, page = _get(url + "/")
        assert code == 200 and b"EventSource" in page and b'<table id="boards"' in page
        with urllib.request.urlopen(url + "/events", timeout=30) as events:
            first = json.loads(events.readline().decode().removeprefix("data: "))
        assert first["model"] == "vgg11 x0.25" and first["rounds"] == 8
        rounds = []
        while proc.poll() is None and len(set(rounds)) < 3:
            rounds.append(json.loads(_get(url + "/api/state")[1])["round"])
            time.sleep(0.3)
        assert len(set(rounds)) >= 3 and rounds == sorted(rounds)  # a rising round counter
        state = json.loads(_get(url + "/api/state")[1])
        assert [b["id"] for b in state["boards"]] == ["client-000", "client-001", "client-002"]
        metrics = _metrics(_get(url + "/metrics")[1].decode())
        assert metrics[("cahfp_rounds_completed_total", ())] >= max(rounds) - 1 >= 1
        assert metrics[("cahfp_updates_total", (("reason", "-"), ("status", "ok")))] >= 3
    finally:
        proc.wait(timeout=300)
        proc.stderr.close()
    assert proc.returncode == 0
