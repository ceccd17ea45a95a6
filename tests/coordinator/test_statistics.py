"""The statistics phase: after aggregation, dense participants measure the new global model's
BatchNorm statistics and the pooled result replaces the averaged ones."""

import copy

import pytest
import torch

from cahfp.aggregation import StatisticsPool
from cahfp.client_round import ClientState, run_task
from cahfp.errors import InvalidUpdate
from cahfp.messages import Metrics, TaskMessage, UpdateMessage
from cahfp.training import measure_batchnorm_statistics
from cahfp.wire import decode_state, encode_state, encode_update
from coordinator.simulation import federation_data
from coordinator.transport import Transport
from tests.coordinator.test_federation import simulate_both, small_config

LAYER = "bn"


def _stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics a client that saw activations ``x`` [N, C] reports (population variance)."""
    return {
        f"{LAYER}.running_mean": x.mean(0),
        f"{LAYER}.running_var": x.var(0, unbiased=False),
        f"{LAYER}.num_batches_tracked": torch.tensor(7),
    }


def test_pooled_statistics_are_those_of_the_pooled_activations_and_bad_sets_change_nothing():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=gen) * 2 + 3  # two clients whose activations differ
    b = torch.randn(100, 5, generator=gen) * 0.5 - 1
    layout = {k: torch.zeros(5) for k in _stats(a) if "num_batches" not in k}
    pool = StatisticsPool(layout)
    assert pool.result() == {}
    pool.add(_stats(a), 300)
    pool.add(_stats(b), 100)
    both = torch.cat([a, b])
    out = pool.result()
    torch.testing.assert_close(out[f"{LAYER}.running_mean"], both.mean(0))
    torch.testing.assert_close(out[f"{LAYER}.running_var"], both.var(0, unbiased=False))
    good = _stats(b)
    bad_sets = {
        "NaN": {**good, f"{LAYER}.running_mean": torch.full((5,), float("nan"))},
        "shape": {**good, f"{LAYER}.running_var": torch.ones(4)},
        "missing": {f"{LAYER}.running_mean": good[f"{LAYER}.running_mean"]},
        "unknown": {**good, "other.running_mean": torch.zeros(5)},
        "negative": {**good, f"{LAYER}.running_var": -torch.ones(5)},
    }
    messages = {
        "NaN": "NaN",
        "shape": "shape",
        "missing": "missing",
        "unknown": "unknown",
        "negative": "negative",
    }
    for name, stats in bad_sets.items():
        with pytest.raises(InvalidUpdate, match=messages[name]):
            pool.add(stats, 10)
    with pytest.raises(InvalidUpdate, match="weight"):
        pool.add(good, 0)
    assert pool.count == 2
    for k, v in pool.result().items():
        assert torch.equal(v, out[k])


def _client_setup(fmnist_root):
    cfg = small_config(fmnist_root, "cahfp")
    clients, _, spec = federation_data(cfg)
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {})
    return cfg, clients, spec, engine


def _statistics_task(cfg, spec, payload_kind="state", batches=2) -> TaskMessage:
    return TaskMessage(
        task_id="t1",
        round=1,
        client_id="client-000",
        model=spec,
        recipe=cfg.train,
        keep=1.0,
        payload=payload_kind,
        purpose="statistics",
        seed=11,
        deadline_s=60,
        calibration_batches=batches,
    )


def test_a_statistics_task_measures_the_received_model_and_keeps_the_clients_plan(fmnist_root):
    cfg, clients, spec, engine = _client_setup(fmnist_root)
    state = ClientState("client-000", clients[0])
    state.index_map, state.keep_achieved = {"marker": {}}, 0.5  # a plan from earlier rounds
    for k, v in engine.state.items():  # statistics that the measurement must replace
        if k.endswith("running_var"):
            v.fill_(7.0)
    payload = encode_update(engine.state, {})
    result = run_task(state, _statistics_task(cfg, spec), payload)
    msg = result.message
    assert msg.status == "ok", msg.reason
    assert msg.metrics.samples == 2 * cfg.train.batch_size
    assert msg.metrics.train_flops > 0 and msg.metrics.bytes_down == len(payload)
    stats, meta = decode_state(result.payload)
    assert meta["round"] == 1 and meta["client"] == "client-000"
    expected = copy.deepcopy(engine.model)
    expected.load_state_dict(engine.state)
    measure_batchnorm_statistics(expected, clients[0], 2, cfg.train.batch_size, seed=11)
    reference = expected.state_dict()
    assert set(stats) == {
        k for k in reference if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    for k, v in stats.items():
        assert torch.equal(v, reference[k]), k
    assert len(result.payload) < len(payload) / 10  # statistics only, no weights
    assert state.index_map == {"marker": {}} and state.keep_achieved == 0.5
    # a statistics task must carry the dense model
    bad = run_task(state, _statistics_task(cfg, spec, "slice"), payload)
    assert bad.message.status == "failed" and "dense global model" in bad.message.reason
    # a client with one image cannot measure a variance: it declines
    tiny = ClientState("client-000", clients[0].subset(range(1)))
    declined = run_task(tiny, _statistics_task(cfg, spec), payload)
    assert declined.message.status == "declined" and "too few" in declined.message.reason


def test_statistics_phase_replaces_only_the_statistics_with_those_of_the_new_model(
    fmnist_root, tmp_path
):
    """With the phase on, the global model's BatchNorm statistics are the pooled statistics the
    dense participants measure on the aggregated weights; the weights are exactly those of a
    run without it (training never reads running statistics)."""
    runs, models = simulate_both(fmnist_root, tmp_path, "aggregation.measure_statistics", rounds=2)
    for k, v in models[True].items():
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(v, models[False][k]), k
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(v, models[False][k]), k
    dense_bytes = None
    for with_phase, without in zip(runs[True][1:], runs[False][1:], strict=True):
        for c, d in zip(with_phase["clients"], without["clients"], strict=True):
            assert c["train_flops"] == d["train_flops"]
            if c["keep_achieved"] == 1.0:  # dense participants measure
                assert c["statistics"] == "ok" and c["statistics_flops"] > 0
                dense_bytes = d["bytes_down"]
                assert c["bytes_down"] == 2 * dense_bytes
                assert d["bytes_up"] < c["bytes_up"] < d["bytes_up"] + 8192
            else:
                assert c["statistics"] == "" and c["statistics_flops"] == 0
                assert (c["bytes_up"], c["bytes_down"]) == (d["bytes_up"], d["bytes_down"])
    assert dense_bytes
    # the statistics are those of the final weights, measured by the dense client (client-000,
    # the only keep-1 client of four) with its task seed
    cfg = small_config(fmnist_root, "cahfp", rounds=2)
    clients, _, spec = federation_data(cfg)
    from cahfp.models import build_model

    model = build_model(spec.name, spec.num_classes, spec.in_channels, spec.width, seed=None)
    model.load_state_dict(models[True])
    seed = cfg.federation.seed * 1_000_003 + 2 * 1009 + 0
    measure_batchnorm_statistics(
        model, clients[0], cfg.aggregation.statistics_batches, cfg.train.batch_size, seed=seed
    )
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, models[True][k], rtol=1e-5, atol=1e-6)


class _Answering(Transport):
    """Answers every statistics task with what ``answer(task)`` returns."""

    def __init__(self, answer):
        self.answer, self.tasks = answer, []

    def clients(self):
        return []

    def send(self, task, payload, rebuild=None):
        self.tasks.append(task)

    def collect(self, pending, deadline):
        for task in list(self.tasks):
            if task.task_id in pending:
                yield self.answer(task)


def test_bad_or_missing_statistics_answers_leave_the_averaged_statistics(fmnist_root):
    from coordinator.engine import ClientOutcome, RoundEngine

    cfg = small_config(fmnist_root, "cahfp")
    _, _, spec = federation_data(cfg)
    stats = {
        k: v
        for k, v in RoundEngine(cfg, spec, _Answering(None), lambda m: None, {}).state.items()
        if k.endswith(("running_mean", "running_var"))
    }

    def nan_answer(task):
        bad = {k: torch.full_like(v, float("nan")) for k, v in stats.items()}
        msg = UpdateMessage(
            task_id=task.task_id,
            round=task.round,
            client_id=task.client_id,
            status="ok",
            metrics=Metrics(samples=64),
        )
        return msg, encode_state(bad)

    def forged(task):
        msg = UpdateMessage(
            task_id="someone-else",
            round=task.round,
            client_id="x",
            status="ok",
            metrics=Metrics(samples=64),
        )
        return msg, encode_state(stats)

    for answer, expected in ((nan_answer, "rejected: statistics"), (forged, "no answer")):
        transport = _Answering(answer)
        engine = RoundEngine(cfg, spec, transport, lambda m: None, {"a": 1.0, "b": 0.4})
        for k in stats:
            engine.state[k] = engine.state[k] + 3.0  # "averaged" statistics
        before = {k: v.clone() for k, v in engine.state.items()}
        outcomes = {
            "a": ClientOutcome("a", "ok", keep_achieved=1.0),
            "b": ClientOutcome("b", "ok", keep_achieved=0.4),
        }
        engine._measure_statistics(1, outcomes)
        assert [t.client_id for t in transport.tasks] == ["a"]  # only the dense participant
        assert transport.tasks[0].purpose == "statistics"
        assert transport.tasks[0].deadline_s == cfg.aggregation.statistics_deadline_s == 120
        assert outcomes["a"].statistics.startswith(expected), outcomes["a"].statistics
        assert outcomes["b"].statistics == ""
        for k, v in engine.state.items():
            assert torch.equal(v, before[k]), k


class _FakeLink:
    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    def chunk_size(self) -> int:
        return 1 << 20

    def publish(self, topic, payload, qos=0, retain=False):
        self.published.append((topic, payload))

        class Info:
            def wait_for_publish(self, timeout=None):
                return True

        return Info()


def test_swarm_clients_answer_statistics_tasks_with_statistics_the_coordinator_accepts(
    fmnist_root,
):
    """The scale benchmark's lightweight clients answer a statistics task with valid random
    statistics (so the coordinator does the phase's real work at scale) and a training task
    with an update; one of their distinct updates is dense, so the phase happens."""
    import threading
    import time

    from benchmarks.swarm import Swarm
    from cahfp.mqtt.protocol import Reassembler, Topics
    from coordinator.engine import RoundEngine

    cfg, _, spec, _ = _client_setup(fmnist_root)
    swarm = Swarm("mqtt://127.0.0.1:1", "fed", 0, spec, distinct=4)
    assert [keep for *_, keep in swarm.updates][-1] == 1.0
    assert all(keep < 1 for *_, keep in swarm.updates[:-1])
    link = _FakeLink()
    stats_task = _statistics_task(cfg, spec)
    train_task = stats_task.model_copy(update={"task_id": "t2", "purpose": "train"})
    for task in (stats_task, train_task):
        swarm.jobs.put((link, "client-000", task.model_dump_json().encode()))
    worker = threading.Thread(target=swarm._work, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while swarm.answered < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    swarm.stop.set()
    worker.join(5)
    answers = [
        UpdateMessage.model_validate_json(p)
        for t, p in link.published
        if t.endswith("/update/client-000")
    ]
    assert [(a.task_id, a.status) for a in answers] == [("t1", "ok"), ("t2", "ok")]
    assert answers[0].metrics.samples == 2 * cfg.train.batch_size
    reassembler = Reassembler()
    payloads = {}
    for t, chunk in link.published:
        if t == Topics("fed").update_data("client-000"):
            done = reassembler.add(chunk)
            if done is not None:
                payloads[done[0]] = done[1]
    assert set(payloads) == {answers[0].transfer, answers[1].transfer}
    stats, _ = decode_state(payloads[answers[0].transfer])
    engine = RoundEngine(cfg, spec, _Answering(None), lambda m: None, {})
    pool = StatisticsPool(engine.state)
    pool.add(stats, answers[0].metrics.samples)  # raises if anything is missing or invalid
    assert pool.count == 1


def test_at_most_statistics_clients_are_asked_a_seeded_sample(fmnist_root):
    from coordinator.engine import ClientOutcome, RoundEngine

    cfg = small_config(fmnist_root, "cahfp")
    cfg.aggregation.statistics_clients = 2
    _, _, spec = federation_data(cfg)
    keeps = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.4}
    asked = []
    for rnd in (1, 1, 2):
        transport = _Answering(lambda task: (_ for _ in ()).throw(AssertionError("unused")))
        transport.collect = lambda pending, deadline: iter(())
        engine = RoundEngine(cfg, spec, transport, lambda m: None, keeps)
        outcomes = {c: ClientOutcome(c, "ok", keep_achieved=k) for c, k in keeps.items()}
        engine._measure_statistics(rnd, outcomes)
        asked.append([t.client_id for t in transport.tasks])
    assert all(len(a) == 2 and set(a) <= {"a", "b", "c"} for a in asked)
    assert asked[0] == asked[1]  # the same round draws the same sample
