"""The round engine and in-process simulation on real Fashion-MNIST slices."""

import json

import pytest
import torch

from cahfp.config import ConfigError, load_config
from cahfp.data import load_dataset
from cahfp.errors import DatasetUnavailable, InvalidUpdate
from cahfp.strategies import STRATEGIES
from cahfp.wire import encode_update
from coordinator.simulation import federation_data, simulate, training_pool
from tests.conftest import REPO, TEST_SEED

TIME_KEYS = {
    "seconds",
    "train_seconds",
    "score_seconds",
    "aggregate_seconds",
    "statistics_seconds",
    "eval_seconds",
    "total_seconds",
    "wall_seconds",
    "cpu_seconds",  # measured resources, not outcomes
    "peak_rss_mb",
}


def small_config(fmnist_root, strategy, rounds=2, **extra):
    overrides = {
        "federation.strategy": strategy,
        "federation.rounds": rounds,
        "federation.clients": 4,
        "federation.seed": 3 + TEST_SEED,
        "model.name": "vgg11",
        "model.width": 0.25,
        "data.data_dir": str(fmnist_root),
        "data.partition": "iid",
        "data.train_samples": 1600,
        "data.eval_samples": 1000,
        "train.epochs": 1,
        "train.batch_size": 32,
        "pruning.refresh_period": 2,
        "pruning.stagger_refresh": False,
        "clients.budget": "fixed-tiers",
        **extra,
    }
    return load_config(None, overrides)


@pytest.mark.trained
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_and_accounts_consistently(fmnist_root, tmp_path, strategy):
    cfg = small_config(fmnist_root, strategy, rounds=3)
    summary = simulate(cfg, tmp_path / strategy, quiet=True)
    records = [
        json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.1
    _, _, spec = federation_data(cfg)
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {})
    dense_bytes = len(encode_update(engine.state, {}))
    values_bytes = sum(v.numel() * v.element_size() for v in engine.state.values())
    for r in records[1:]:
        expected_clients = 1 if strategy == "fedavg-fit" else 4
        assert len(r["clients"]) == expected_clients
        for c in r["clients"]:
            assert c["status"] == "ok", c
            keep = c["keep_target"]
            dense_work = engine.dense_flops * c["samples_trained"]
            plain = dense_work * c["keep_achieved"]
            if strategy in ("fjord", "fjord-kd"):  # batches at narrower widths count as run,
                extra = 2 if strategy == "fjord-kd" else 1  # plus the teacher pass with KD
                assert 0 < c["train_flops"] <= extra * plain * (1 + 1e-9)
            else:
                assert c["train_flops"] == pytest.approx(plain, rel=1e-9)
            if keep is None or keep >= 1:  # dense training, then the statistics phase
                assert c["keep_achieved"] == 1.0 and c["score_flops"] == 0
                assert c["statistics"] == "ok" and c["statistics_flops"] > 0
                assert c["bytes_down"] == 2 * dense_bytes  # the task, the aggregated model
                # packed: the values and a header of at most a few kB, then the statistics
                assert values_bytes < c["bytes_up"] < values_bytes + 12288
            else:
                # a refresh plans below the budget to leave room for its scoring, spread over
                # the refresh period (2); between refreshes the task asks for the plan's keep
                target = keep - c["score_flops"] / dense_work / 2 if c["refreshed"] else keep
                assert target - 0.08 <= c["keep_achieved"] <= target + 0.02
                assert c["bytes_up"] < dense_bytes * (keep + 0.25)
                if not c["refreshed"]:  # a slice, not the dense model, went down
                    assert c["bytes_down"] < dense_bytes * (keep + 0.25)
                if c["score_flops"]:
                    assert STRATEGIES[strategy].client_plans and c["refreshed"]
    if STRATEGIES[strategy].client_plans:
        refreshed = [
            c["refreshed"] for r in records[1:] for c in r["clients"] if c["keep_target"] < 1
        ]
        assert refreshed == [True] * 3 + [False] * 3 + [True] * 3  # refresh period 2
    for name in (
        "accuracy_vs_round.png",
        "accuracy_vs_uplink.png",
        "client_keeps.png",
        "model.safetensors",
        "config.toml",
        "summary.json",
        "checkpoint/state.json",
    ):
        assert (tmp_path / strategy / name).is_file(), name


def simulate_both(fmnist_root, tmp_path, key: str, rounds: int) -> tuple[dict, dict]:
    """CA-HFP simulated with the boolean config ``key`` on and off: per value, the metrics
    lines and the final model."""
    from safetensors.torch import load_file

    runs, models = {}, {}
    for on in (True, False):
        cfg = small_config(fmnist_root, "cahfp", rounds=rounds, **{key: on})
        simulate(cfg, tmp_path / str(on), quiet=True)
        lines = (tmp_path / str(on) / "metrics.jsonl").read_text().splitlines()
        runs[on] = [json.loads(x) for x in lines]
        models[on] = load_file(tmp_path / str(on) / "model.safetensors")
    return runs, models


def strip_times(obj):
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


def test_same_config_and_seed_give_identical_metrics(fmnist_root, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = small_config(fmnist_root, "cahfp")
        simulate(cfg, tmp_path / name, quiet=True)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs.append([strip_times(json.loads(x)) for x in lines])
    assert runs[0] == runs[1]
    other = small_config(fmnist_root, "cahfp", **{"federation.seed": 4 + TEST_SEED})
    simulate(other, tmp_path / "c", quiet=True)
    lines = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    assert [strip_times(json.loads(x)) for x in lines] != runs[0]


def test_bad_configs_fail_fast_with_clear_messages(tmp_path, isolated_cache):
    with pytest.raises(ConfigError, match=r"federation\.strategy = 'fedprox'.*known: fedavg"):
        load_config(None, {"federation.strategy": "fedprox"})
    with pytest.raises(ConfigError, match=r"pruning\.tiers.*1\.5"):
        load_config(None, {"pruning.tiers": [1.0, 1.5]})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, {"train.lr": 0})
    with pytest.raises(ConfigError, match=r"budget_uplink = true applies to .* not 'heterofl'"):
        load_config(None, {"federation.strategy": "heterofl", "pruning.budget_uplink": True})
    # the uplink cap: CA-HFP's by default, Taylor's on request
    assert load_config(None, {"federation.strategy": "cahfp"}).strategy().uplink_capped()
    assert not load_config(None, {"federation.strategy": "taylor"}).strategy().uplink_capped()
    capped = {"federation.strategy": "taylor", "pruning.budget_uplink": True}
    assert load_config(None, capped).strategy().uplink_capped()
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nrounds = 'many'\nunknown_key = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*federation\.rounds.*unknown_key"):
        load_config(bad)
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    cfg = load_config(None, {"data.data_dir": str(tmp_path / "empty")})
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte"):
        simulate(cfg, None, quiet=True)


def test_non_utf8_config_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[federation]\nname = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text \(byte 0xe9 at"):
        load_config(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", "simulate", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad} is not UTF-8 text (byte 0xe9 at offset 24); TOML files must be UTF-8"
    ]


def test_example_configs_are_valid():

    examples = sorted((REPO / "examples").glob("*.toml"))
    assert len(examples) >= 6
    for path in examples:
        cfg = load_config(path)
        assert cfg.federation.rounds >= 1


def test_staggered_refreshes_and_coverage_records(fmnist_root, tmp_path):
    cfg = small_config(fmnist_root, "cahfp", rounds=3, **{"pruning.stagger_refresh": True})
    simulate(cfg, tmp_path / "run", quiet=True)
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ][1:]
    refreshed = {
        c["client_id"]: [
            r["round"]
            for r in records
            for c2 in r["clients"]
            if c2["client_id"] == c["client_id"] and c2["refreshed"]
        ]
        for c in records[0]["clients"]
        if c["keep_target"] < 1
    }
    # period 2: clients with an odd index refresh in rounds 1 and 2, even ones in 1 and 3
    assert refreshed == {"client-001": [1, 2], "client-002": [1, 3], "client-003": [1, 2]}
    dense_share = sum(c["samples"] for c in records[0]["clients"] if c["keep_target"] >= 1) / sum(
        c["samples"] for c in records[0]["clients"]
    )
    for r in records:
        assert dense_share - 1e-9 <= r["coverage_min"] <= r["coverage_mean"] <= 1.0


def test_validation_split_is_held_out_from_every_client(fmnist_root):
    base = {"data.data_dir": str(fmnist_root), "data.train_samples": 2000}
    cfg = load_config(None, {**base, "data.eval_samples": 500, "data.eval_split": "validation"})
    pool, held_out = training_pool(60_000, cfg)
    assert len(pool) == 2000 and len(held_out) == 500
    assert not set(pool.tolist()) & set(held_out.tolist())
    clients, evaluation, _ = federation_data(cfg)
    assert len(evaluation) == 500 and sum(len(c) for c in clients) == 2000
    train = load_dataset("fmnist", "train", str(fmnist_root))
    assert torch.equal(evaluation.images, train.subset(held_out).images)  # not the test set
    # the default (test split) draws the clients' images as it always did: a seeded permutation
    test_pool, none = training_pool(60_000, load_config(None, base))
    expected = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:2000]
    assert none is None and torch.equal(test_pool, expected)
    with pytest.raises(ConfigError, match="eval_samples"):
        training_pool(
            60_000,
            load_config(
                None, {**base, "data.eval_split": "validation", "data.eval_samples": 60_000}
            ),
        )
    with pytest.raises(ConfigError, match="after the validation hold-out"):
        training_pool(
            60_000,
            load_config(
                None,
                {
                    **base,
                    "data.train_samples": 59_000,
                    "data.eval_split": "validation",
                    "data.eval_samples": 2000,
                },
            ),
        )


def test_linear_temperature_schedule_settles_by_the_last_round(fmnist_root):
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    _, _, spec = federation_data(small_config(fmnist_root, "cahfp"))
    temps = {}
    for schedule in ("constant", "linear"):
        extra = {"pruning.temperature": 2.0, "pruning.temperature_schedule": schedule}
        cfg = small_config(fmnist_root, "cahfp", rounds=5, **extra)
        engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {})
        temps[schedule] = [engine.strategy.temperature(r) for r in range(1, 6)]
    assert temps == {"constant": [2.0] * 5, "linear": [2.0, 1.5, 1.0, 0.5, 0.0]}


def test_anchor_scores_travel_both_ways_and_bad_ones_are_refused(fmnist_root, tmp_path):
    """With ``pruning.anchor_weight``, refreshing clients report their normalised channel
    scores with their update and later refreshes receive the federation's average."""
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    cfg = small_config(fmnist_root, "cahfp", rounds=3, **{"pruning.anchor_weight": 0.5})
    simulate(cfg, tmp_path / "run", quiet=True)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    _, _, spec = federation_data(cfg)
    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {})
    dense_bytes = len(encode_update(engine.state, {}))
    channels = sum(g.size for g in engine.strategy.groups)
    refreshes = [(r["round"], c) for r in records[1:] for c in r["clients"] if c["refreshed"]]
    assert {rnd for rnd, _ in refreshes} == {1, 3}  # refresh period 2, not staggered
    for rnd, c in refreshes:
        # round 1: nobody has reported yet; round 3: the anchor (float32 per channel) goes down
        extra = c["bytes_down"] - dense_bytes
        assert extra == 0 if rnd == 1 else 4 * channels <= extra < 4 * channels + 4096
    good = {f"score/{g.name}": torch.ones(g.size) for g in engine.strategy.groups}
    assert set(engine.strategy.check_update(good, True)) == {g.gid for g in engine.strategy.groups}
    assert engine.strategy.check_update({}, True) is None
    assert engine.strategy.check_update(good, False) is None  # not re-planned: not asked for
    first = next(iter(engine.strategy.groups))
    name = first.name
    for bad, reason in (
        ({**good, f"score/{name}": torch.full((first.size,), float("nan"))}, "finite"),
        ({**good, f"score/{name}": torch.ones(3)}, "mis-shaped"),
        ({**good, f"score/{name}": torch.ones(first.size, dtype=torch.float64)}, "float32"),
        ({**good, f"score/{name}": torch.full((first.size,), 1e30)}, "not normalised"),
    ):
        with pytest.raises(InvalidUpdate, match=reason):
            engine.strategy.check_update(bad, True)
    # what a board does with a bad anchor from the coordinator: a typed error, so that the task
    # is answered "failed" with the reason instead of the agent's loop dying in the planner
    from cahfp.pruning.sides import checked_sides

    anchor = {f"anchor/{g.name}": torch.ones(g.size) for g in engine.strategy.groups}
    groups = engine.strategy.groups
    assert set(checked_sides(groups, anchor, "anchor")) == {g.gid for g in groups}
    inf = {**anchor, f"anchor/{name}": torch.full((first.size,), float("inf"))}
    with pytest.raises(InvalidUpdate, match="not finite"):
        checked_sides(engine.strategy.groups, inf, "anchor")


def test_size_exponent_weights_updates_by_the_share_of_parameters_they_carry(fmnist_root):
    """``aggregation.size_exponent`` gamma: weight = samples x (carried parameters / all)^gamma,
    counted from the decoded tensors (not from what the client claims)."""
    from cahfp.pruning import extract, make_plan, score_groups
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    cfg = small_config(fmnist_root, "cahfp", **{"aggregation.size_exponent": 1.0})
    _, _, spec = federation_data(cfg)
    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {})
    x = torch.randn(8, spec.in_channels, spec.image_size, spec.image_size)
    y = torch.randint(0, spec.num_classes, (8,))
    plan = make_plan(engine.model, score_groups(engine.model, [(x, y)], "magnitude"), 0.4)
    sub = extract(engine.model, plan).module
    share = sum(p.numel() for p in sub.parameters()) / sum(
        p.numel() for p in engine.model.parameters()
    )
    assert 0.1 < share < 0.9
    assert engine._weight(dict(engine.state), 120) == pytest.approx(120.0)
    assert engine._weight(sub.state_dict(), 120) == pytest.approx(120 * share)
    cfg.aggregation.size_exponent = 0.5
    assert engine._weight(sub.state_dict(), 120) == pytest.approx(120 * share**0.5)
    cfg.aggregation.size_exponent = 0.0
    assert engine._weight(sub.state_dict(), 120) == 120.0


def test_pruned_clients_leave_out_statistics_a_dense_update_supplies(fmnist_root, tmp_path):
    """``aggregation.omit_pruned_stats``: in rounds with a dense participant, pruned slices and
    updates carry no BatchNorm statistics. The aggregate would have taken them from the dense
    update anyway, so the global model is the same (``num_batches_tracked``, a counter that
    training does not read, aside) and only bytes are saved."""
    runs, models = simulate_both(fmnist_root, tmp_path, "aggregation.omit_pruned_stats", 3)
    saved_down = 0
    for a, b in zip(runs[True][1:], runs[False][1:], strict=True):
        assert (a["accuracy"], a["loss"]) == (b["accuracy"], b["loss"])
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert ca["keep_achieved"] == cb["keep_achieved"]
            if ca["keep_achieved"] == 1.0:
                assert ca["bytes_up"] == cb["bytes_up"]
            else:
                assert ca["bytes_up"] < cb["bytes_up"]
            saved_down += cb["bytes_down"] - ca["bytes_down"]
    assert saved_down > 0  # the slices of round 2 (refresh period 2)
    one, other = models[True], models[False]
    for k, v in one.items():
        assert k.endswith("num_batches_tracked") or torch.equal(v, other[k]), k


def test_statistics_are_asked_for_when_no_dense_update_is_expected(fmnist_root):
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    cfg = small_config(fmnist_root, "cahfp")
    _, _, spec = federation_data(cfg)
    keeps = {"a": 1.0, "b": 0.6, "c": 0.2}
    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, keeps)
    assert not engine.statistics_wanted(["a", "b"])
    assert engine.statistics_wanted(["b", "c"])  # nobody supplies them densely
    cfg.aggregation.omit_pruned_stats = False
    assert engine.statistics_wanted(["a", "b"])
    cfg.aggregation.omit_pruned_stats, cfg.aggregation.exact_stats = True, False
    assert engine.statistics_wanted(["a", "b"])  # every covering update's statistics count


def test_an_update_without_the_statistics_it_was_asked_for_is_refused(fmnist_root):
    from cahfp.aggregation import Aggregator
    from cahfp.client_round import submodel_from_slice
    from cahfp.messages import Metrics, UpdateMessage
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    cfg = small_config(fmnist_root, "heterofl")
    _, _, spec = federation_data(cfg)
    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {"a": 1.0, "b": 0.4})
    task, payload = engine.make_task("b", 1, statistics=True)
    module, imap, meta = submodel_from_slice(spec, payload)
    assert task.payload == "slice" and meta["statistics"]
    data = encode_update(module.state_dict(), imap, statistics=False)
    msg = UpdateMessage(
        task_id=task.task_id,
        round=1,
        client_id="b",
        status="ok",
        metrics=Metrics(samples=10),
    )
    agg = Aggregator(engine.state, stat_keys=engine.stat_keys, exact_stats=True)
    out = engine.accept(msg, data, {task.task_id: (task, len(payload))}, agg, {})
    assert out.status == "rejected" and "statistics the task asked for" in out.reason
    assert agg.count == 0
    # asked to leave them out: the slice comes without them, the client fills in its own
    # statistics when the slice is of its previous submodel, and the update is taken
    task, payload = engine.make_task("b", 2, statistics=False)
    own = {k: v + 5.0 for k, v in module.state_dict().items() if k.endswith("running_mean")}
    rebuilt, _, meta = submodel_from_slice(spec, payload, imap, own)
    assert not meta["statistics"] and len(payload) < len(engine._slice(engine.clients["b"]))
    state = rebuilt.state_dict()
    assert all(torch.equal(state[k], v) for k, v in own.items())
    fresh, *_ = submodel_from_slice(spec, payload, {}, own)  # another submodel: fresh ones
    assert all(not bool(fresh.state_dict()[k].any()) for k in own)
    assert all(bool((v == 1).all()) for k, v in fresh.state_dict().items() if "running_var" in k)
    msg = msg.model_copy(update={"task_id": task.task_id, "round": 2})
    out = engine.accept(msg, data, {task.task_id: (task, len(payload))}, agg, {})
    assert out.status == "ok" and agg.count == 1


def test_the_device_decides_its_keep_by_default_and_the_coordinator_only_caps_it(fmnist_root):
    """clients.budget = "measured" (the default): a client's keep is the one its own measurement
    chose, capped at clients.max_keep and said so; "fixed-tiers" (simulation and benchmarks)
    replaces it by the tier, and says so too."""
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    def engine(**extra):
        cfg = small_config(fmnist_root, "cahfp", **extra)
        _, _, spec = federation_data(cfg)
        events = []
        eng = RoundEngine(
            cfg,
            spec,
            InProcessTransport({}),
            lambda m: None,
            {},
            on_event=lambda k, d: events.append(d),
        )
        return eng, events

    assert load_config(None).clients.budget == "measured"
    eng, events = engine(**{"clients.budget": "measured"})
    assert eng.register("pi", 0.45).keep == 0.45 and events[-1]["source"] == "its own measurement"
    assert eng.register("plain", None).keep == 1.0  # measures nothing: trains what it is sent
    capped, events = engine(**{"clients.budget": "measured", "clients.max_keep": 0.3})
    assert capped.register("pi", 0.45).keep == 0.3
    assert "capped at clients.max_keep 0.3" in events[-1]["source"]
    assert capped.register("tiny", 0.2).keep == 0.2
    fixed, events = engine()  # small_config: fixed tiers 1.0, 0.6, 0.4, 0.2
    assert fixed.register("pi", 0.45).keep == 1.0
    assert events[-1]["source"] == "fixed tier; it measured 0.45"
    # the tasks carry the federation's budget settings to the clients
    task, _ = capped.make_task("pi", 1)
    assert task.budget.max_keep == 0.3 and task.keep is None  # the client decides, within it
    # old names of the two modes still load (run directories written before protocol 6)
    assert load_config(None, {"clients.budget": "profiles"}).clients.budget == "measured"
    assert load_config(None, {"clients.budget": "tiers"}).clients.budget == "fixed-tiers"


def test_a_task_for_data_that_does_not_fit_is_answered_failed_with_the_reason(fmnist_root):
    """Checked again when a task arrives: the answer is an immediate `failed` naming the
    mismatch, never an exception that takes the client down (or a round waiting for it)."""
    from cahfp.client_round import ClientState, run_task
    from cahfp.data.datasets import ImageData
    from coordinator.engine import RoundEngine
    from coordinator.inprocess import InProcessTransport

    cfg = small_config(fmnist_root, "cahfp")
    _, _, spec = federation_data(cfg)
    photos = ImageData(
        torch.zeros(8, 3, 32, 32, dtype=torch.uint8),
        torch.arange(8) % 12,
        [f"c{i}" for i in range(12)],
        (0.5,) * 3,
        (0.25,) * 3,
        "photos",
    )
    engine = RoundEngine(cfg, spec, InProcessTransport({}), lambda m: None, {"c": 1.0})
    task, payload = engine.make_task("c", 1)
    msg = run_task(ClientState("c", photos), task, payload).message
    assert msg.status == "failed"
    assert msg.reason == (
        "InvalidUpdate: local data does not fit the federation's model: 3 channels, the model "
        "takes 1; 32x32 images, the model takes 28x28; 12 classes, the model has 10"
    )
