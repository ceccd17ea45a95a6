"""The federation over a real broker: separate coordinator and client processes that share
only a mosquitto (started on a free loopback port by the ``broker`` fixture)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from cahfp.messages import Metrics, TaskMessage, UpdateMessage
from cahfp.models import build_model
from cahfp.mqtt.link import MqttLink
from cahfp.mqtt.protocol import Topics, split_payload
from cahfp.wire import decode_state, encode_update
from tests.mqtt_helpers import (
    cli,
    client,
    coordinator,
    finish,
    kill_all,
    logs,
    metrics,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def start_federation(broker, tmp_path, fmnist_root, name, rounds, n=3, coord_args=(), **cfg):
    config = write_config(tmp_path / f"{name}.toml", name, rounds, n, fmnist_root, **cfg)
    clients = [
        client(broker.url, name, f"c{i}", i, n, fmnist_root, tmp_path / f"c{i}.log")
        for i in range(n)
    ]
    coord = coordinator(
        broker.url, config, tmp_path / name, tmp_path / "coordinator.log", *coord_args
    )
    return config, coord, clients


@pytest.mark.trained
def test_end_to_end_three_clients(broker, fmnist_root, tmp_path):
    _, coord, clients = start_federation(broker, tmp_path, fmnist_root, "e2e", rounds=3)
    try:
        codes = finish([coord, *clients], timeout=300)
    finally:
        kill_all([coord, *clients])
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    m = metrics(tmp_path / "e2e")
    assert [r["round"] for r in m] == [0, 1, 2, 3]
    assert m[-1]["accuracy"] > m[0]["accuracy"] + 0.1
    for r in m[1:]:
        assert [c["status"] for c in r["clients"]] == ["ok"] * 3, r
    assert (tmp_path / "e2e" / "model.safetensors").is_file()
    assert (tmp_path / "e2e" / "accuracy_vs_round.png").is_file()


def test_killed_client_misses_the_round_and_rejoins(broker, fmnist_root, tmp_path):
    name = "kill"
    config = write_config(tmp_path / "k.toml", name, 8, 3, fmnist_root, deadline=10.0)
    run = tmp_path / name
    # enough local data that the rounds after the kill outlast the restarted client's start-up
    # (importing torch, loading data), else the run can end before it registers
    procs = [
        client(
            broker.url, name, f"c{i}", i, 3, fmnist_root, tmp_path / f"c{i}.log", train_samples=4000
        )
        for i in range(2)
    ]
    # the victim trains on more data, so that killing it lands in the middle of its work
    victim = client(
        broker.url, name, "c2", 0, 1, fmnist_root, tmp_path / "c2.log", train_samples=4000
    )
    coord = coordinator(broker.url, config, run, tmp_path / "coordinator.log")
    procs += [victim, coord]
    try:
        wait_for(lambda: len(metrics(run)) >= 2, 180, "round 1")  # round 2 has started
        time.sleep(1.0)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(5)
        wait_for(lambda: len(metrics(run)) >= 3, 60, "round 2 to end at its deadline")
        procs.append(client(broker.url, name, "c2", 2, 3, fmnist_root, tmp_path / "c2b.log"))
        codes = finish([coord, *procs[:2], procs[-1]], timeout=300)
    finally:
        kill_all(procs)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    m = metrics(run)
    assert [r["round"] for r in m] == list(range(9))
    r2 = {c["client_id"]: c["status"] for c in m[2]["clients"]}
    assert r2 == {"c0": "ok", "c1": "ok", "c2": "missing"}, m[2]
    assert m[2]["aggregated"] == 2 and not m[2]["skipped"]
    later = [c["status"] for r in m[3:] for c in r["clients"] if c["client_id"] == "c2"]
    assert "ok" in later, m[3:]


def test_coordinator_restart_resumes_after_last_completed_round(broker, fmnist_root, tmp_path):
    """Both starts use --resume, as the service unit does: the first, on an empty run
    directory, starts a fresh run and says so."""
    name = "resume"
    config, coord, clients = start_federation(
        broker,
        tmp_path,
        fmnist_root,
        name,
        rounds=4,
        coord_args=("--resume",),
        aggregation__server_momentum=0.5,
    )
    run = tmp_path / name
    procs = [coord, *clients]
    try:
        wait_for(
            lambda: (
                (run / "checkpoint" / "state.json").is_file()
                and json.loads((run / "checkpoint" / "state.json").read_text())["round"] >= 2
            ),
            240,
            "round 2",
        )
        os.killpg(coord.pid, signal.SIGKILL)
        coord.wait(5)
        done = json.loads((run / "checkpoint" / "state.json").read_text())["round"]
        coord2 = coordinator(broker.url, config, run, tmp_path / "coordinator2.log", "--resume")
        procs.append(coord2)
        codes = finish([coord2, *clients], timeout=300)
    finally:
        kill_all(procs)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3, 4]  # continuous, nothing lost or repeated
    assert all(r["aggregated"] == 3 for r in m[1:])
    assert "starting a fresh run" in (tmp_path / "coordinator.log").read_text()
    log2 = (tmp_path / "coordinator2.log").read_text()
    assert f"resuming after round {done}" in log2
    # the server momentum buffer was checkpointed and came back (the previous round's kept)
    assert sorted(p.name for p in (run / "checkpoint").glob("server-*")) == [
        "server-3.safetensors",
        "server-4.safetensors",
    ]
    assert "buffers restored" in log2, log2[-2000:]


def test_broker_restart_mid_run(broker, fmnist_root, tmp_path):
    name = "brk"
    _, coord, clients = start_federation(
        broker, tmp_path, fmnist_root, name, rounds=4, deadline=25.0
    )
    run = tmp_path / name
    try:
        wait_for(lambda: len(metrics(run)) >= 2, 180, "round 1")
        time.sleep(0.3)
        broker.kill()
        time.sleep(1.5)
        broker.start()
        codes = finish([coord, *clients], timeout=400)
    finally:
        kill_all([coord, *clients])
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3, 4]
    assert m[-1]["aggregated"] == 3


class Saboteur:
    """Watches a federation's tasks and updates (the test broker has no ACL) and injects, for
    every round, each kind of bad update, plus a duplicate of a real one."""

    def __init__(self, url: str, fed: str, victim: str = "c0"):
        self.topics = Topics(fed)
        self.victim = victim
        self.link = MqttLink(url, "mallory")
        for t in (self.topics.task(), self.topics.update(), self.topics.update_data()):
            self.link.subscribe(t, 1)
        self.injected: list[str] = []
        self.seen_updates: dict[str, list[bytes]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self):
        self.link.start(10)
        self.thread.start()
        return self

    def _update(self, task: TaskMessage, payload: bytes, round_=None, client=None) -> None:
        transfer, chunks = split_payload(payload, 1 << 20)
        for c in chunks:
            self.link.publish(self.topics.update_data(client or task.client_id), c)
        msg = UpdateMessage(
            task_id=task.task_id,
            round=task.round if round_ is None else round_,
            client_id=client or task.client_id,
            status="ok",
            metrics=Metrics(samples=100),
            transfer=transfer,
        )
        self.link.publish(self.topics.update(client or task.client_id), msg.model_dump_json())

    def attack(self, task: TaskMessage) -> None:
        spec = task.model
        state = build_model(spec.name, spec.num_classes, spec.in_channels, spec.width).state_dict()
        t, up = self.topics, self.topics.update(self.victim)
        # 1 malformed JSON
        self.link.publish(up, b"{not json")
        # 2 NaN values
        nan = dict(
            state,
            **{"features.0.weight": torch.full_like(state["features.0.weight"], float("nan"))},
        )
        self._update(task, encode_update(nan, {}))
        # 3 wrong shape
        short = dict(state, **{"classifier.weight": state["classifier.weight"][:5]})
        self._update(task, encode_update(short, {}))
        # 4 wrong round
        self._update(task, encode_update(state, {}), round_=task.round + 7)
        # 5 bad chunk hash
        _transfer, chunks = split_payload(encode_update(state, {}), 1 << 16)
        chunks[1] = chunks[1][:-10] + b"X" * 10
        for c in chunks:
            self.link.publish(t.update_data(self.victim), c)
        # 6 oversize (declared size above the coordinator's limit)
        header = json.dumps(
            {"transfer": "ab" * 8, "index": 0, "count": 2, "size": 1 << 40, "sha256": "0" * 64}
        ).encode()
        self.link.publish(
            t.update_data(self.victim), b"CHFP" + len(header).to_bytes(4, "big") + header + b"x"
        )
        # 7 unknown client
        self._update(task, encode_update(state, {}), client="mallory")
        self.injected.append(task.task_id)

    def run(self):
        replayed = set()
        while not self.stop.is_set():
            msg = self.link.get(0.2)
            if msg is None:
                continue
            kind, cid, data = self.topics.parse(msg.topic)
            if kind == "task" and not data and cid == self.victim:
                self.attack(TaskMessage.model_validate_json(msg.payload))
            elif kind == "update" and cid == "c1":
                self.seen_updates.setdefault(cid, []).append((msg.topic, msg.payload))
                if not data and msg.payload not in replayed:  # 8 duplicate of a real update
                    replayed.add(msg.payload)
                    for topic, payload in list(self.seen_updates[cid]):
                        self.link.publish(topic, payload)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.link.stop()


def test_bad_updates_are_rejected_and_change_nothing(broker, fmnist_root, tmp_path):
    results = {}
    for name, attack in (("clean", False), ("attacked", True)):
        d = tmp_path / name
        d.mkdir()
        saboteur = Saboteur(broker.url, name).start() if attack else None
        _, coord, clients = start_federation(broker, d, fmnist_root, name, rounds=2)
        try:
            codes = finish([coord, *clients], timeout=300)
        finally:
            kill_all([coord, *clients])
            if saboteur:
                saboteur.close()
        assert codes == [0, 0, 0, 0], logs(d)
        results[name] = (
            metrics(d / name),
            decode_state((d / name / "model.safetensors").read_bytes())[0],
        )
        if attack:
            # per round, the victim's training task and (it trains the dense model) its
            # statistics task: both were attacked
            assert len(saboteur.injected) == 4
            log = (d / "coordinator.log").read_text()
            for reason in (
                "malformed UpdateMessage",
                "NaN",
                "shape",
                "round does not match",
                "sha256 mismatch",
                "exceeds the limit",
            ):
                assert reason in log, reason
            # a client without a task has an upload budget of 1 MiB: the forged 2 MB update
            # in an unknown name is dropped on arrival, or refused if it fits
            assert "unknown client" in log or "mallory sent more than its upload budget" in log
    (clean_m, clean_state), (bad_m, bad_state) = results["clean"], results["attacked"]
    for r in bad_m[1:]:
        assert [c["status"] for c in r["clients"]] == ["ok"] * 3, r
        assert r["aggregated"] == 3
    # Updates arrive in another order, so float32 running means differ in rounding, which the
    # next rounds' training amplifies a little; a leaked bad update (random, stale, NaN or
    # oversized values) would move the weights by orders of magnitude more.
    # BatchNorm statistics are measured afresh on those weights (the statistics phase), from 64
    # images per client, so the rounding differences show there by a few percent.
    # Mean absolute differences up to 1.3e-5 have been seen between clean and attacked runs; one
    # leaked update (a fresh random initialization weighted 100 samples against the clients'
    # 4000) would shift every coordinate by about 2% of its distance from the trained value,
    # far above 1e-4.
    diffs = []
    for k, v in clean_state.items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(bad_state[k], v, atol=0.1, rtol=0.1)
            continue
        torch.testing.assert_close(bad_state[k], v, atol=5e-3, rtol=1e-2)  # 1.5e-3 seen
        if v.is_floating_point():
            diffs.append((bad_state[k] - v).abs().flatten())
    assert torch.cat(diffs).mean() < 1e-4
    # the statistics measured afresh on those weights move a few evaluation images (2 of 1000
    # seen) across the decision boundary
    assert [r["accuracy"] for r in bad_m] == pytest.approx(
        [r["accuracy"] for r in clean_m], abs=6e-3
    )


def test_resume_refuses_a_corrupt_checkpoint_with_one_line(fmnist_root, tmp_path):
    """A run directory with a checkpoint that cannot be read is not silently restarted: the
    coordinator exits 2 with one line, before it connects anywhere, and changes nothing."""
    config = write_config(tmp_path / "fed.toml", "corrupt", 2, 1, fmnist_root)
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text('{"round": 3}')
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    proc = cli(
        "coordinator",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--config",
        str(config),
        "--out",
        str(run),
        "--resume",
        log=tmp_path / "c.log",
    )
    assert proc.wait(120) == 2
    out = (tmp_path / "c.log").read_text()
    assert "error: no usable checkpoint" in out and "Traceback" not in out, out
    assert (run / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_a_client_whose_data_does_not_fit_refuses_and_the_round_does_not_wait(
    broker, fmnist_root, tmp_path
):
    """A board with 3x32x32 photos joining a Fashion-MNIST (1x28x28) federation: it checks its
    data against the federation's model when it joins, says why in one line and exits 2; its
    hello tells the coordinator, which never selects it, so the round does not wait for it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        d = tmp_path / "photos" / "train" / cls
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    config = write_config(tmp_path / "fit.toml", "fit", 1, 1, fmnist_root, deadline=120.0)
    good = client(broker.url, "fit", "good", 0, 2, fmnist_root, tmp_path / "good.log")
    bad = cli(
        "client",
        "--broker",
        broker.url,
        "--id",
        "bad",
        "--federation",
        "fit",
        "--data",
        f"imagefolder:{tmp_path / 'photos'}",
        "--profile",
        "none",
        "--until-finished",
        log=tmp_path / "bad.log",
    )
    coord = coordinator(
        broker.url,
        config,
        tmp_path / "fit",
        tmp_path / "coordinator.log",
        "--set",
        "federation.clients=2",
        "--registration-timeout",
        "15",
    )
    try:
        codes = finish([coord, good, bad], timeout=240)
    finally:
        kill_all([coord, good, bad])
    assert codes == [0, 0, 2], logs(tmp_path)
    out = (tmp_path / "bad.log").read_text()
    assert "Traceback" not in out, out
    assert (
        "error: bad: local data does not fit the federation's model: 3 channels, the model "
        "takes 1; 32x32 images, the model takes 28x28" in out
    ), out
    assert (
        "bad cannot take part: local data does not fit"
        in (tmp_path / "coordinator.log").read_text()
    )
    m = metrics(tmp_path / "fit")
    assert [c["client_id"] for c in m[1]["clients"]] == ["good"]
    assert m[1]["seconds"] < 60  # not the 120 s deadline


def test_coordinator_refuses_to_overwrite_a_run_without_force(fmnist_root, tmp_path):
    config = write_config(tmp_path / "fed.toml", "again", 2, 1, fmnist_root)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    proc = cli(
        "coordinator", "--broker", "mqtt://127.0.0.1:1", "--config", str(config),
        "--out", str(run), log=tmp_path / "c.log",
    )  # fmt: skip
    assert proc.wait(120) == 2
    out = (tmp_path / "c.log").read_text()
    assert f"error: {run} already holds a run (metrics.jsonl): --resume continues it" in out, out
    assert (run / "metrics.jsonl").read_text() == '{"round": 0}\n'
