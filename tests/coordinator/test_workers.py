"""Simulation over several cores (``federation.backend = "processes"``): the same federation
bitwise as the in-process run at the same torch thread count, the coordinator's client states
kept current for checkpoints, the automatic choice, and a dead worker reported in one line."""

from __future__ import annotations

import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch

from cahfp.config import load_config
from cahfp.errors import CAHFPError
from coordinator import simulation
from coordinator.inprocess import InProcessTransport
from coordinator.simulation import make_transport, simulate
from coordinator.workers import ProcessTransport


def _cfg(fmnist_root, backend: str, **more):
    return load_config(
        None,
        {
            "federation.rounds": 3,
            "federation.clients": 4,
            "federation.backend": backend,
            "federation.workers": 2,
            "clients.budget": "fixed-tiers",
            "data.train_samples": 800,
            "data.eval_samples": 300,
            "data.data_dir": str(fmnist_root),
            **more,
        },
    )


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", ["cahfp", "fjord"])
def test_worker_processes_give_the_sequential_result_bitwise(
    fmnist_root, tmp_path, strategy, one_thread
):
    runs = {}
    for backend in ("inprocess", "processes"):
        cfg = _cfg(fmnist_root, backend, **{"federation.strategy": strategy})
        summary = simulate(cfg, tmp_path / backend, quiet=True)
        runs[backend] = ((tmp_path / backend / "model.safetensors").read_bytes(), summary)
    (a, sa), (b, sb) = runs["inprocess"], runs["processes"]
    assert a == b  # 2 workers x 1 thread against 1 thread in process
    assert sa["final_accuracy"] == sb["final_accuracy"]
    assert sa["mean_client_flops_vs_dense"] == sb["mean_client_flops_vs_dense"]


def test_the_coordinators_client_states_stay_current(fmnist_root, one_thread, monkeypatch):
    """Checkpoints read the coordinator's states: after a round on workers they hold the plans
    the workers made."""
    seen = {}
    original = simulation.make_transport

    def keep(cfg, states):
        seen.update(states)
        return original(cfg, states)

    monkeypatch.setattr(simulation, "make_transport", keep)
    simulate(_cfg(fmnist_root, "processes", **{"federation.rounds": 1}), None, quiet=True)
    pruned = [s for s in seen.values() if s.keep_achieved < 1]
    assert len(pruned) == 3 and all(s.index_map for s in pruned)


def test_auto_takes_workers_only_with_cores_to_spare(fmnist_root, monkeypatch):
    cfg = _cfg(fmnist_root, "auto", **{"federation.workers": 0})
    states = {f"c{i}": SimpleNamespace() for i in range(4)}
    cores = {"n": 1.0}
    monkeypatch.setattr(
        "cahfp.device.measure.measure_device", lambda: SimpleNamespace(usable_cores=cores["n"])
    )
    assert isinstance(make_transport(cfg, states), InProcessTransport)
    cores["n"] = 2.0
    monkeypatch.setattr(mp, "current_process", lambda: SimpleNamespace(daemon=True))
    assert isinstance(make_transport(cfg, states), InProcessTransport)  # a pool's worker
    with pytest.raises(CAHFPError, match="cannot start inside a daemonic process"):
        make_transport(_cfg(fmnist_root, "processes"), states)


def test_a_worker_that_dies_is_one_line(fmnist_root):
    from cahfp.client_round import ClientState
    from cahfp.data import load_dataset
    from cahfp.messages import ModelSpec, TaskMessage
    from cahfp.models import build_model
    from cahfp.training import Recipe
    from cahfp.wire import encode_update

    data = load_dataset("fmnist", "train", fmnist_root).subset(range(64))
    transport = ProcessTransport({"c0": ClientState("c0", data)}, workers=1)
    try:
        transport.procs[0].kill()
        transport.procs[0].join()
        spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
        task = TaskMessage(
            task_id="t", round=1, client_id="c0", model=spec, recipe=Recipe(), keep=1.0,
            payload="state", deadline_s=600,
        )  # fmt: skip
        model = build_model("vgg11", 10, 1, 0.25, seed=0)
        transport.send(task, encode_update(model.state_dict(), {}))
        with pytest.raises(CAHFPError, match=r"simulation worker 0 (died|crashed)"):
            list(transport.collect({"t"}, float("inf")))
    finally:
        transport.close()


def test_clients_are_spread_so_that_workers_hold_as_many_images():
    from coordinator.workers import spread

    sizes = [897, 1964, 1460, 1806, 1622, 1820, 1897, 630, 1168, 1736]  # a Dirichlet(0.5) split
    states = {f"c{i}": SimpleNamespace(data=range(n)) for i, n in enumerate(sizes)}
    worker_of = spread(states, 2)
    load = [sum(sizes[i] for i in range(10) if worker_of[f"c{i}"] == w) for w in (0, 1)]
    assert sorted(load) == [7482, 7518]  # against 7044 / 7956 for client i on worker i mod 2
    assert spread(states, 2) == worker_of and set(spread(states, 3).values()) == {0, 1, 2}
