"""FIARSE in a federation: re-planned from the global model every round, its tasks carry the
threshold-gate rule, and the run is reproducible."""

import json

import torch
from safetensors.torch import load_file

from cahfp.messages import TaskMessage
from cahfp.models import build_model
from cahfp.pruning.extract import same_index_map
from cahfp.wire import decode_update
from coordinator.inprocess import InProcessTransport
from coordinator.simulation import simulate
from tests.coordinator.test_federation import small_config, strip_times

_SEND = InProcessTransport.send


def _run(fmnist_root, out, monkeypatch, **extra):
    tasks: list[TaskMessage] = []
    maps = {}

    def recording(self, task, payload, rebuild=None):
        tasks.append(task)
        if task.payload == "slice":  # keep the index map it was sent with
            skeleton = build_model("vgg11", 10, 1, 0.25).state_dict()
            maps[(task.round, task.client_id)] = decode_update(payload, skeleton)[1]
        return _SEND(self, task, payload, rebuild)

    monkeypatch.setattr(InProcessTransport, "send", recording)
    cfg = small_config(
        fmnist_root,
        "fiarse",
        rounds=2,
        **{"data.train_samples": 400, "data.eval_samples": 200, **extra},
    )
    simulate(cfg, out, quiet=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return tasks, maps, [json.loads(x) for x in lines], load_file(out / "model.safetensors")


def test_fiarse_replans_every_round_and_its_tasks_carry_the_threshold_gate(
    fmnist_root, tmp_path, monkeypatch
):
    one = {"pruning.fiarse_threshold": "global"}  # the official fiarse/ (layerwise: below)
    tasks, maps, records, model = _run(fmnist_root, tmp_path / "a", monkeypatch, **one)
    pruned = [t for t in tasks if t.keep is not None and t.keep < 1]
    assert len(pruned) == 6 and all(t.payload == "slice" for t in pruned)  # 3 per round
    assert all(t.training is None for t in tasks if t not in pruned)  # the dense client
    for t in pruned:
        rule = t.training
        assert rule.kind == "threshold-gate" and rule.ste
        assert len(set(rule.thresholds.values())) == 1  # one global threshold
    # a new plan from the moved global model in round 2: other thresholds and channels
    by_round = {
        r: {t.client_id: t.training.thresholds for t in pruned if t.round == r} for r in (1, 2)
    }
    assert all(by_round[1][c] != by_round[2][c] for c in by_round[1])
    for r in records[1:]:
        for c in r["clients"]:
            assert c["status"] == "ok" and c["refreshed"] is not None
            if c["keep_target"] < 1:
                assert c["keep_achieved"] <= c["keep_target"] + 1e-9
    clients = {c for _, c in maps}
    assert any(not same_index_map(maps[(1, c)], maps[(2, c)]) for c in clients)
    # the same configuration and seed: the same run, bit for bit
    tasks_b, _, records_b, model_b = _run(fmnist_root, tmp_path / "b", monkeypatch, **one)
    assert [t.training for t in tasks_b] == [t.training for t in tasks]
    assert strip_times(records_b) == strip_times(records)
    assert all(torch.equal(model[k], model_b[k]) for k in model)


def test_fiarse_layerwise_thresholds_by_default_and_plain_gradients_travel_in_the_rule(
    fmnist_root, tmp_path, monkeypatch
):
    tasks, _, records, _ = _run(
        fmnist_root, tmp_path / "lw", monkeypatch, **{"pruning.fiarse_ste": False}
    )
    rules = [t.training for t in tasks if t.training is not None]
    assert rules and all(not r.ste and len(set(r.thresholds.values())) > 1 for r in rules)
    assert all(c["status"] == "ok" for r in records[1:] for c in r["clients"])
