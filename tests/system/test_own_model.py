"""The operator's own model, ``model.name = "package.module:callable"``, the way an operator
runs it: ``cahfp simulate``, ``compare``, ``export`` and an MQTT federation in which one board
cannot import the module."""

from __future__ import annotations

import pytest

from tests.mqtt_helpers import (
    client,
    coordinator,
    finish,
    kill_all,
    metrics,
    run_cli,
    write_config,
)

EXAMPLE = "examples.mobilenet_like:build"


def test_simulate_compare_and_export_an_own_model(fmnist_root, tmp_path):
    run = tmp_path / "own"
    sim = run_cli(
        "simulate",
        "--data-dir",
        str(fmnist_root),
        "--rounds",
        "2",
        "--clients",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--set",
        f"model.name={EXAMPLE}",
        "--set",
        "model.width=0.5",
        "--set",
        "data.train_samples=400",
        "--set",
        "data.eval_samples=200",
        "--set",
        "data.partition=iid",
        "--set",
        "pruning.tiers=[1.0, 0.5]",
        "--set",
        "clients.budget=fixed-tiers",
        "--out",
        str(run),
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(c["status"] == "ok" for r in rounds[1:] for c in r["clients"])
    assert any(c["keep_achieved"] < 0.6 for r in rounds[1:] for c in r["clients"])  # pruned
    assert f'name = "{EXAMPLE}"' in (run / "config.toml").read_text()
    cmp = run_cli("compare", str(run), "--out", str(tmp_path / "cmp.png"))
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    assert "own" in cmp.stdout and (tmp_path / "cmp.png").is_file()
    onnx = tmp_path / "own.onnx"
    exp = run_cli(
        "export",
        "--run",
        str(run),
        "--keep",
        "0.5",
        "--out",
        str(onnx),
        "--data-dir",
        str(fmnist_root),
        "--statistics-batches",
        "2",
    )
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert onnx.is_file() and "onnxruntime parity" in exp.stdout
    for proc in (sim, cmp, exp):
        assert "Traceback" not in proc.stderr


def test_plain_unknown_name_is_one_clear_line():
    proc = run_cli("simulate", "--rounds", "1", "--set", "model.name=mynet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'mynet'" in lines[0] and "vgg11" in lines[0] and "package.module:callable" in lines[0]


def test_coordinator_refuses_a_module_it_cannot_import(tmp_path, fmnist_root):
    config = write_config(
        tmp_path / "fed.toml", "nomod", 1, 1, fmnist_root, model__name="not_installed_net:build"
    )
    proc = run_cli(
        "coordinator",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "run"),
    )
    assert proc.returncode == 2
    assert "cannot import module 'not_installed_net'" in proc.stderr
    assert "Traceback" not in proc.stderr


TINY = """
from torch import nn

def build(num_classes, in_channels, width):
    c = max(4, round(16 * width))
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes),
    )
"""


@pytest.mark.slow
def test_a_board_without_the_module_refuses_to_join_and_the_round_goes_on(
    broker, fmnist_root, tmp_path
):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "tiny_own_net.py").write_text(TINY)
    config = write_config(
        tmp_path / "fed.toml",
        "ownfed",
        2,
        2,
        fmnist_root,
        deadline=60.0,
        model__name="tiny_own_net:build",
        model__width=1.0,
        pruning__tiers=[1.0, 0.5],
    )
    with_module = {"PYTHONPATH": str(mods)}
    procs = [
        coordinator(
            broker.url, config, tmp_path / "run", tmp_path / "coordinator.log", env=with_module
        ),
        client(broker.url, "ownfed", "c0", 0, 2, fmnist_root, tmp_path / "c0.log", env=with_module),
        client(broker.url, "ownfed", "c1", 1, 2, fmnist_root, tmp_path / "c1.log"),
    ]
    try:
        codes = finish(procs, timeout=240)
    finally:
        kill_all(procs)
    logs = {p.stem: p.read_text() for p in tmp_path.glob("*.log")}
    assert codes == [0, 0, 2], logs
    rounds = metrics(tmp_path / "run")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:  # c1 said at once that it cannot take part: never selected
        assert [(c["client_id"], c["status"]) for c in r["clients"]] == [("c0", "ok")]
        assert r["seconds"] < 45  # nobody waited for the deadline
    assert (
        "error: c1: model 'tiny_own_net:build': cannot import module 'tiny_own_net'" in (logs["c1"])
    ), logs["c1"]
    assert not any("Traceback" in text for text in logs.values()), logs
