"""One device choice everywhere (``--device``, ``train.device``): resolved once, with one-line
errors for a device that is not there; the recipe tasks carry never names it; every command
that computes takes it. The CUDA tests skip where torch sees no GPU (CI has none, strict mode
included) and run in the accelerator machine's device script."""

from __future__ import annotations

import pytest
import torch

from cahfp.config import load_config
from cahfp.device.select import model_device, resolve_device
from cahfp.errors import ConfigError, DeviceUnavailable
from tests.cahfp.test_cli import cahfp, one_error_line

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def test_auto_is_the_cpu_without_a_gpu_and_cuda_without_one_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailable, match=f"device {spec}: torch .* sees no CUDA"):
            resolve_device(spec)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_cuda_indices_are_checked_against_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailable, match="cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_the_config_checks_the_device_and_tasks_never_carry_it():
    cfg = load_config(None, {"train.device": "cpu", "train.lr": 0.01})
    assert cfg.train.device == "cpu"
    recipe = cfg.train.recipe()
    assert "device" not in recipe.model_dump() and recipe.lr == 0.01
    assert load_config(None, {}).train.device == "auto"
    with pytest.raises(ConfigError, match=r"train\.device = 'tpu': unknown device"):
        load_config(None, {"train.device": "tpu"})


def test_the_recipe_a_task_carries_has_no_device():
    from cahfp.messages import TaskMessage

    assert "device" not in TaskMessage.model_fields["recipe"].annotation.model_fields
    assert "device" not in load_config(None, {"train.device": "cpu"}).train.recipe().model_dump()


def test_model_device_follows_the_parameters():
    net = torch.nn.Linear(2, 2)
    assert model_device(net) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")


@pytest.mark.parametrize(
    "command",
    [
        ("simulate", "--rounds", "1", "--device", "cuda:7"),
        ("profile", "--device", "cuda:7"),
        ("export", "--run", "nowhere", "--out", "x.onnx", "--keep", "0.5", "--device", "gpu"),
        ("client", "--broker", "mqtt://127.0.0.1:1", "--id", "a", "--data", "fmnist",
         "--device", "cuda:7"),
    ],
)  # fmt: skip
def test_every_computing_command_takes_the_device_and_refuses_a_missing_one_in_one_line(
    command, monkeypatch
):
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    line = one_error_line(cahfp(*command))
    assert "cuda:7" in line or "unknown device 'gpu'" in line, line


# ----------------------------------------------------------------------------- on a GPU


def _planned_round(device: torch.device):
    """One client round that scores, plans and trains a submodel at keep 0.5 on ``device``."""
    from cahfp.client_round import ClientState, run_task
    from cahfp.data.datasets import ImageData
    from cahfp.messages import ModelSpec, TaskMessage
    from cahfp.models import build_model
    from cahfp.pruning import PlanOptions
    from cahfp.training import Recipe
    from cahfp.wire import decode_update, encode_update

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = ImageData(x, torch.arange(96) % 10, [str(i) for i in range(10)], (0.5,), (0.25,), "n")
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    task = TaskMessage(
        task_id="t",
        round=1,
        client_id="c",
        model=spec,
        recipe=Recipe(epochs=1, batch_size=32),
        keep=0.5,
        payload="state",
        plan=PlanOptions(),
        deadline_s=600,
    )
    state = ClientState("c", data, compute_device=device)
    result = run_task(state, task, encode_update(model.state_dict(), {}))
    assert result.message.status == "ok", result.message.reason
    tensors, imap, _ = decode_update(result.payload, model.state_dict())
    assert imap and all(t.device.type == "cpu" for t in tensors.values())
    assert all(t.device.type == "cpu" for t in (state.statistics or {}).values())
    return result.message.metrics


def test_a_planned_round_on_the_cpu_device_sends_cpu_tensors():
    metrics = _planned_round(torch.device("cpu"))
    assert 0.2 < metrics.keep_achieved <= 0.53  # scoring passes come out of the keep


@CUDA
def test_a_planned_round_on_cuda_matches_the_cpu_round():
    cpu, gpu = _planned_round(torch.device("cpu")), _planned_round(torch.device("cuda"))
    assert abs(cpu.keep_achieved - gpu.keep_achieved) < 0.05
    assert abs(cpu.train_loss - gpu.train_loss) < 0.2


@CUDA
def test_a_simulation_on_cuda_learns_and_keeps_the_global_model_on_the_cpu(fmnist_root):
    from coordinator.simulation import simulate

    cfg = load_config(
        None,
        {
            "federation.rounds": 2,
            "federation.clients": 4,
            "data.train_samples": 800,
            "data.eval_samples": 500,
            "data.data_dir": str(fmnist_root),
            "train.device": "cuda",
        },
    )
    summary = simulate(cfg, None, quiet=True)
    assert summary["final_accuracy"] > 0.3


def test_the_training_memory_is_where_the_training_runs(monkeypatch):
    """The budget's memory: the host's on the CPU and on an integrated GPU (a Jetson's unified
    memory, counted once), the free memory of a discrete GPU."""
    from types import SimpleNamespace

    from cahfp.device.measure import measure_device, training_memory

    info = measure_device()
    assert training_memory(info, torch.device("cpu")) == info.usable_memory
    props = {
        "jetson": SimpleNamespace(is_integrated=True),
        "h100": SimpleNamespace(is_integrated=False),
    }
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (3 << 30, 80 << 30))
    for board, want in (("jetson", info.usable_memory), ("h100", 3 << 30)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, b=board: props[b])
        assert training_memory(info, torch.device("cuda", 0)) == want


@CUDA
def test_profile_lists_the_gpus_and_measures_training_on_one(tmp_path):
    proc = cahfp("profile", "--device", "cuda", "--json", "--fresh")
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["compute_device"].startswith("cuda")
    assert report["accelerators"] and report["accelerators"][0]["memory_bytes"] > 0
    assert report["calibration"]["seconds_per_sample"] > 0
