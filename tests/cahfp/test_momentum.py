"""Server momentum (FedAvgM): the global step, what it leaves alone, and its checkpoint."""

from __future__ import annotations

import pytest
import torch

from cahfp.errors import CAHFPError
from cahfp.momentum import ServerMomentum
from coordinator.records import RunRecorder, load_checkpoint, load_server_state


def states():
    prev = {
        "w": torch.tensor([1.0, 2.0]),
        "bn.running_mean": torch.tensor([0.0]),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    new = {
        "w": torch.tensor([2.0, 2.0]),
        "bn.running_mean": torch.tensor([5.0]),
        "bn.num_batches_tracked": torch.tensor(4),
    }
    return prev, new


def test_beta_zero_is_the_aggregate():
    prev, new = states()
    out = ServerMomentum(0.0, {"bn.running_mean"}).step(prev, new)
    assert all(torch.equal(out[k], new[k]) for k in new)


def test_heavy_ball_steps_and_statistics_untouched():
    mom = ServerMomentum(0.5, {"bn.running_mean"})
    prev, new = states()
    first = mom.step(prev, new)
    assert torch.equal(first["w"], new["w"])  # m = d on the first round
    # round 2: the aggregate moves w by (0, 1); the model moves by 0.5 * (1, 0) + (0, 1)
    second_agg = {**first, "w": first["w"] + torch.tensor([0.0, 1.0])}
    second = mom.step(first, second_agg)
    assert torch.allclose(second["w"], torch.tensor([2.5, 3.0]))
    # statistics and counters take the aggregate's values
    assert torch.equal(second["bn.running_mean"], second_agg["bn.running_mean"])
    assert second["bn.num_batches_tracked"].dtype == torch.int64
    # a round whose aggregate changes nothing still moves by beta * m
    third = mom.step(second, dict(second))
    assert torch.allclose(third["w"], second["w"] + torch.tensor([0.25, 0.5]))


def test_bad_momentum_rejected():
    with pytest.raises(ValueError, match="server momentum"):
        ServerMomentum(1.0)


def test_checkpoint_round_trip_and_bad_buffers(tmp_path):
    from cahfp.config import Config

    mom = ServerMomentum(0.9, {"bn.running_mean"})
    prev, new = states()
    state = mom.step(prev, new)
    rec = RunRecorder(tmp_path, Config(), 1.0)
    rec.checkpoint(2, state, {"clients": {}}, mom.state())
    done, loaded, _ = load_checkpoint(tmp_path)
    again = ServerMomentum(0.9, {"bn.running_mean"})
    again.load(load_server_state(tmp_path, done), loaded)
    assert torch.equal(again.buffer["w"], mom.buffer["w"])
    ck = tmp_path / "checkpoint"
    (ck / "server-3.safetensors").write_bytes((ck / "server-2.safetensors").read_bytes())
    with pytest.raises(CAHFPError, match="round 2, the checkpoint of round 3"):
        load_server_state(tmp_path, 3)  # a file whose name and contents disagree
    for bad, match in (
        ({"momentum/x": torch.zeros(2)}, "lacks"),
        ({"momentum/w": torch.zeros(3)}, "mis-shaped"),
        ({"momentum/w": torch.tensor([float("nan"), 0.0])}, "not finite"),
        ({"momentum/bn.running_mean": torch.zeros(1)}, "lacks"),
    ):
        with pytest.raises(CAHFPError, match=match):
            again.load(bad, loaded)
        assert torch.equal(again.buffer["w"], mom.buffer["w"])  # nothing lost
    # a later checkpoint without momentum removes the stale buffer file; the previous round's
    # files stay (the fall-back when the last round's are damaged), older ones go
    rec.checkpoint(3, state, {"clients": {}}, {})
    assert load_server_state(tmp_path, 3) == {}
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "global-2.safetensors",
        "global-3.safetensors",
        "server-2.safetensors",
        "state.json",
    ]
    rec.checkpoint(4, state, {"clients": {}}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "global-3.safetensors",
        "global-4.safetensors",
        "state.json",
    ]


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from cahfp.config import Config
    from coordinator import records

    prev, new = states()
    rec = RunRecorder(tmp_path, Config(), 1.0)
    rec.checkpoint(1, prev, {"clients": {}}, {"momentum/w": torch.ones(2)})
    real = records.atomic_write

    def crash_at_state_json(path, data):
        if path.name == "state.json":
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(records, "atomic_write", crash_at_state_json)
    with pytest.raises(OSError):
        rec.checkpoint(2, new, {"clients": {}}, {"momentum/w": torch.zeros(2)})
    done, state, _ = load_checkpoint(tmp_path)  # round 1, whole
    assert done == 1 and torch.equal(state["w"], prev["w"])
    assert torch.equal(load_server_state(tmp_path, 1)["momentum/w"], torch.ones(2))
    # a corrupt weights file is named, not unpickled or half-loaded
    (tmp_path / "checkpoint" / "global-1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CAHFPError, match="no usable checkpoint"):
        load_checkpoint(tmp_path)
