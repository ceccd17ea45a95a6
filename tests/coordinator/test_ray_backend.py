"""Simulation on Ray (``--backend ray``, the ``[ray]`` extra): through ``cahfp simulate`` on a
local Ray with 2 workers, bitwise the in-process result at one torch thread; how many workers
a cluster holds; a crashed worker and a missing Ray each one line."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from cahfp.cli import main
from cahfp.config import ClientResources
from cahfp.errors import CAHFPError
from tests.conftest import missing


@pytest.fixture
def ray_here(monkeypatch):
    """Ray installed, and no cluster address inherited: the backend starts a local Ray."""
    try:
        import ray  # noqa: F401
    except ImportError:
        missing("Ray is not installed (pip install 'cahfp-edge[ray]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _simulate(fmnist_root, out, *more) -> None:
    argv = [
        "simulate", "--rounds", "2", "--clients", "4", "--threads", "1", "--quiet",
        "--data-dir", str(fmnist_root), "--out", str(out),
        "--set", "clients.budget=fixed-tiers", "--set", "data.train_samples=600",
        "--set", "data.eval_samples=200", *more,
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def test_ray_workers_give_the_sequential_result_bitwise(fmnist_root, tmp_path, ray_here):
    _simulate(fmnist_root, tmp_path / "seq", "--backend", "inprocess")
    _simulate(
        fmnist_root, tmp_path / "ray", "--backend", "ray", "--workers", "2", "--client-cpus", "1"
    )
    seq = (tmp_path / "seq" / "model.safetensors").read_bytes()
    assert (tmp_path / "ray" / "model.safetensors").read_bytes() == seq
    import ray

    assert not ray.is_initialized()  # the Ray it started is shut down


def test_a_crashed_ray_worker_is_one_line(fmnist_root, ray_here):
    from cahfp.client_round import ClientState
    from cahfp.data import load_dataset
    from coordinator.ray_workers import RayTransport

    data = load_dataset("fmnist", "train", fmnist_root).subset(range(64))
    transport = RayTransport({"c0": ClientState("c0", data)}, ClientResources(), local_cpus=1)
    try:
        # a task its worker cannot run (its payload is not safetensors): the worker raises
        handle = transport._start(0, ("not json", b"", {}))
        with pytest.raises(CAHFPError, match=r"^simulation worker 0 crashed: ValidationError"):
            transport._answer(0, handle)
    finally:
        transport.close()


def test_workers_that_fit_the_cluster():
    from coordinator.ray_workers import workers_that_fit

    assert workers_that_fit({"CPU": 16}, ClientResources(num_cpus=2)) == 8
    assert workers_that_fit({"CPU": 16, "GPU": 1}, ClientResources(num_gpus=0.25)) == 4
    assert workers_that_fit({"CPU": 16}, ClientResources(num_gpus=0.5)) == 0
    assert workers_that_fit({"CPU": 0.3}, ClientResources(num_cpus=0.1)) == 3


def test_a_cluster_too_small_for_one_client_is_one_line(monkeypatch):
    from coordinator import ray_workers

    fake = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray_workers, "import_ray", lambda: fake)
    with pytest.raises(CAHFPError) as exc:
        ray_workers.RayTransport({}, ClientResources(num_gpus=1))
    assert str(exc.value) == (
        "no client fits the Ray cluster (4 CPUs, 0 GPUs) at num_cpus=1, num_gpus=1 "
        "(federation.client_resources)"
    )


def test_ray_not_installed_is_one_line(fmnist_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = ["simulate", "--backend", "ray", "--rounds", "1", "--clients", "2", "--quiet",
            "--data-dir", str(fmnist_root), "--set", "data.train_samples=200"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: the ray backend needs Ray: pip install 'cahfp-edge[ray]' (or use --backend "
        "processes)"
    ]
