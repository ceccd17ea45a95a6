"""``--tracking``: a simulation's per-round metrics mirrored to TensorBoard and to MLflow, read
back with each tracker's own reader; a malformed or unusable target in one line."""

from __future__ import annotations

import json

import pytest

from cahfp.cli import main
from cahfp.config import load_config
from cahfp.errors import CAHFPError
from coordinator.tracking import Tracker, parse_tracking

ARGS = ["simulate", "--rounds", "2", "--clients", "3", "--quiet", "--backend", "inprocess",
        "--set", "data.train_samples=300", "--set", "data.eval_samples=100"]  # fmt: skip


def _accuracies(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["accuracy"] for x in lines]


def test_tensorboard_gets_every_rounds_metrics(fmnist_root, tmp_path):
    tb = tmp_path / "tb"
    argv = [*ARGS, "--data-dir", str(fmnist_root), "--out", str(tmp_path / "run"),
            "--tracking", f"tensorboard:{tb}"]  # fmt: skip
    assert main(argv) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert {"accuracy", "loss", "uplink_mb", "round_seconds"} <= set(events.Tags()["scalars"])
    got = [(s.step, round(s.value, 6)) for s in events.Scalars("accuracy")]
    assert got == [(i, round(a, 6)) for i, a in enumerate(_accuracies(tmp_path / "run"))]


def test_mlflow_gets_every_rounds_metrics(fmnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
    uri = (tmp_path / "mlruns").as_uri()
    argv = [*ARGS, "--data-dir", str(fmnist_root), "--out", str(tmp_path / "run"),
            "--tracking", f"mlflow:{uri}"]  # fmt: skip
    assert main(argv) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("federation").experiment_id])
    assert run.info.run_name == "run" and run.data.params["federation.rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    got = sorted((m.step, round(m.value, 6)) for m in history)
    assert got == [(i, round(a, 6)) for i, a in enumerate(_accuracies(tmp_path / "run"))]


def test_a_bad_tracking_target_is_one_line(tmp_path):
    with pytest.raises(CAHFPError, match=r"^--tracking expects tensorboard:DIR or mlflow:URI"):
        parse_tracking("wandb:project")
    with pytest.raises(CAHFPError, match=r"^MLflow at nowhere://x: "):
        Tracker("mlflow:nowhere://x", load_config(None, {}), "r")
