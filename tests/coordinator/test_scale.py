"""A scale smoke test: 50 lightweight clients on real MQTT connections, the real coordinator."""

import time

import pytest

from benchmarks.swarm import Swarm
from cahfp.config import load_config
from cahfp.messages import ModelSpec
from coordinator.service import Coordinator

pytestmark = pytest.mark.slow


def test_fifty_lightweight_clients_in_under_a_minute(broker, fmnist_root, tmp_path):
    n = 50
    cfg = load_config(
        None,
        {
            "federation.name": "scale",
            "federation.rounds": 2,
            "federation.clients": n,
            "federation.deadline_s": 60,
            "federation.strategy": "cahfp",
            "model.name": "vgg11",
            "model.width": 0.25,
            "data.eval_samples": 200,
            "data.data_dir": str(fmnist_root),
            "pruning.refresh_period": 2,
            "clients.budget": "fixed-tiers",
        },
    )
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    swarm = Swarm(broker.url, "scale", n, spec, distinct=4)
    start = time.perf_counter()
    swarm.start()
    try:
        # a 1 MiB inbox: most of the burst of updates waits on disk, and nothing is lost
        coord = Coordinator(cfg, broker.url, tmp_path / "run", inbox_memory=1 << 20)
        summary = coord.run(registration_timeout=60)
    finally:
        swarm.close()
    elapsed = time.perf_counter() - start
    assert summary["rounds"] == 2
    asked = 0
    for rec in coord.records[1:]:
        assert rec.aggregated == n  # every update counted once, none lost
        assert sorted(c.status for c in rec.clients) == ["ok"] * n
        # the statistics phase: a capped sample of the dense participants, every answer pooled
        dense = [c for c in rec.clients if c.keep_achieved == 1.0]
        measured = [c for c in rec.clients if c.statistics]
        assert len(measured) == min(len(dense), cfg.aggregation.statistics_clients)
        assert all(c.statistics == "ok" and c.keep_achieved == 1.0 for c in measured)
        assert rec.statistics_seconds > 0 or not measured
        asked += len(measured)
    assert asked > 0  # a quarter of the swarm's updates are dense: the phase happened
    assert swarm.answered == 2 * n + asked
    inbox = [rec.transport for rec in coord.records[1:]]  # per round
    assert all(i["inbox_peak_memory_mb"] <= 1.0 + 1e-6 for i in inbox)
    assert all(i["inbox_spooled_mb"] > 0 and i["inbox_peak_on_disk_mb"] > 0 for i in inbox)
    assert elapsed < 60, f"{elapsed:.1f} s"
