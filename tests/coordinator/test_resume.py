"""A simulation's run directory through interruption, damage and resume, the way an operator
meets them: ``cahfp simulate --resume``, ``--force``, ``cahfp compare`` and ``cahfp export`` on
an unfinished run, and files that resume must not trust."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from coordinator import simulation
from coordinator.engine import RoundEngine
from tests.coordinator.test_federation import small_config

SETTINGS = {
    # staggered refreshes: in round 3 some clients train their saved plan's slice, others
    # re-plan against the saved coverage and anchor; server momentum carries a buffer
    "pruning.stagger_refresh": True,
    "aggregation.server_momentum": 0.5,
    "data.train_samples": 480,
    "data.eval_samples": 300,
}


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cahfp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},  # rich's table on one line per run
    )


def one_error_line(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(match, lines[0]), lines[0]


def same_model(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def runs(fmnist_root, tmp_path_factory):
    """An uninterrupted 3-round run, and the same run interrupted during round 3."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = small_config(fmnist_root, "cahfp", rounds=3, **SETTINGS)
    simulation.simulate(cfg, tmp / "whole", quiet=True)
    real = RoundEngine.run_round

    def ctrl_c_in_round_3(self, rnd):
        if rnd == 3:
            raise KeyboardInterrupt
        return real(self, rnd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RoundEngine, "run_round", ctrl_c_in_round_3)
        with pytest.raises(KeyboardInterrupt):
            simulation.simulate(cfg, tmp / "cut", quiet=True)
    return tmp / "whole", tmp / "cut"


def test_unfinished_run_compares_exports_and_resumes_to_the_same_model(runs, tmp_path):
    whole, cut = runs
    run = tmp_path / "cut"
    shutil.copytree(cut, run)
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    # compare summarises an unfinished run from its metrics and says so
    proc = cli("compare", whole, run, "--out", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr
    assert "cut (unfinished)" in proc.stdout and "whole" in proc.stdout
    assert "unfinished (no summary.json): summarised from its metrics.jsonl, 2 of 3 rounds" in (
        proc.stderr
    )
    # export takes the last checkpoint and says so
    proc = cli("export", "--run", run, "--out", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "no model.safetensors (the run is unfinished); exporting its checkpoint of round 2" in (
        proc.stderr
    )
    assert (tmp_path / "m.onnx").is_file()
    # a new run in the same directory is refused; it names the directory and both ways out
    one_error_line(
        cli("simulate", "--out", run, "--rounds", "1"),
        rf"{re.escape(str(run))} already holds a run \(metrics.jsonl, config.toml, checkpoint\):"
        r" --resume continues it, --force starts over",
    )
    # a crash while writing metrics left a torn last line: dropped with a warning
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "accuracy": 0.7')
    proc = cli("simulate", "--resume", "--out", run)  # stderr is a pipe: a line per round
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped a torn last line" in proc.stderr and "Traceback" not in proc.stderr
    assert "resuming" in proc.stderr and "after round 2" in proc.stderr
    assert re.search(r"round 3: accuracy 0\.\d{4}, 4 updates", proc.stderr), proc.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    # the same final model as the uninterrupted run, bit for bit (same process settings; the
    # engine's plans, coverage and anchor and every client's plan and statistics were restored)
    assert same_model(run, whole)


def test_damaged_checkpoint_falls_back_to_the_previous_round(runs, tmp_path):
    whole, _ = runs
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    ck = run / "checkpoint"
    assert sorted(p.name for p in ck.glob("*-[23].safetensors")) == [
        "global-2.safetensors",
        "global-3.safetensors",
        "server-2.safetensors",
        "server-3.safetensors",
        "sim-2.safetensors",
        "sim-3.safetensors",
    ]
    weights = ck / "global-3.safetensors"
    data = bytearray(weights.read_bytes())
    data[-65536:] = b"\xff" * 65536
    weights.write_bytes(bytes(data))
    (run / "model.safetensors").unlink()
    proc = cli("simulate", "--resume", "--out", run, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 3: accuracy" not in proc.stderr  # --quiet: warnings only
    assert (
        "checkpoint of round 3 refused (global-3.safetensors does not match its digest in "
        "state.json (damaged on disk)); falling back to round 2"
    ) in proc.stderr
    assert same_model(run, whole)  # round 3 again, from round 2: the same model
    # both rounds damaged: refused, nothing loaded
    for name in ("global-3.safetensors", "sim-2.safetensors"):
        (ck / name).write_bytes((ck / name).read_bytes()[:-8] + b"\xff" * 8)
    one_error_line(
        cli("simulate", "--resume", "--out", run),
        r"no usable checkpoint in .*round 3: global-3.safetensors does not match its digest.*"
        r"round 2: sim-2.safetensors does not match its digest",
    )


def test_malformed_checkpoints_are_one_clear_line(runs, tmp_path):
    _, cut = runs
    cases = {
        "list": (lambda s: [s], r"state.json is a JSON list, not an object naming the round"),
        "no index": (
            lambda s: {**s, "clients": {**s["clients"], "client-001": {"keep": 0.5}}},
            r"client 'client-001' in state.json has no index",
        ),
    }
    for name, (edit, match) in cases.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(cut, run)
        state = run / "checkpoint" / "state.json"
        state.write_text(json.dumps(edit(json.loads(state.read_text()))))
        one_error_line(cli("simulate", "--resume", "--out", run), match)
    # the MQTT coordinator's --resume reads checkpoints the same way (it fails before connecting)
    coordinator = ("coordinator", "--broker", "mqtt://127.0.0.1:9", "--resume", "--out")
    one_error_line(
        cli(*coordinator, tmp_path / "list", "--config", cut / "config.toml"),
        r"state.json is a JSON list",
    )
    run = tmp_path / "width"
    shutil.copytree(cut, run)
    one_error_line(
        cli("simulate", "--resume", "--out", run, "--set", "model.width=0.5"),
        r"checkpoint of round 2 in .* is of another model than the configured one: "
        r"\S+ has shape \(\d+, 1, 3, 3\), the configured model's \(\d+, 1, 3, 3\)",
    )
    one_error_line(
        cli(*coordinator, run, "--config", cut / "config.toml", "--set", "model.width=0.5"),
        r"is of another model than the configured one",
    )
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in cut.iterdir())
    assert (run / "config.toml").read_text() == (cut / "config.toml").read_text()  # not lost


def test_no_checkpoint_yet_is_distinguishable_and_force_clears_the_old_run(tmp_path):
    from cahfp.config import Config
    from cahfp.errors import CAHFPError
    from coordinator.records import (
        NoCheckpoint,
        RunRecorder,
        check_new_run,
        load_checkpoint,
        load_metrics,
    )

    with pytest.raises(NoCheckpoint, match=r"no checkpoint in .* yet"):
        load_checkpoint(tmp_path)  # an empty run directory: the caller may start fresh
    assert issubclass(NoCheckpoint, CAHFPError)
    rec = RunRecorder(tmp_path, Config(), 1.0)
    assert list(tmp_path.iterdir()) == []  # nothing written before the first record
    state = {"w": torch.ones(3)}
    rec.checkpoint(1, state, {"clients": {"a": {"index": 0, "keep": 0.5}}})
    # a checkpoint written before digests (no "files") still loads
    ck = tmp_path / "checkpoint"
    (ck / "state.json").write_text(json.dumps({"round": 1, "clients": {}}))
    done, loaded, _ = load_checkpoint(tmp_path, like=state)
    assert done == 1 and torch.equal(loaded["w"], state["w"])
    with pytest.raises(CAHFPError, match=r"w has shape \(3,\), the configured model's \(4,\)"):
        load_checkpoint(tmp_path, like={"w": torch.ones(4)})
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n')
    with pytest.raises(CAHFPError, match="line 2 is not a round record"):
        load_metrics(tmp_path)  # only a torn *last* line is dropped
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(CAHFPError, match="already holds a run"):
        check_new_run(tmp_path)
    check_new_run(tmp_path, force=True)
    assert list(tmp_path.iterdir()) == []


def test_metrics_of_runs_written_before_the_statistics_rename_still_read(tmp_path):
    """The statistics phase's metrics were named "calibration" before 2026-12: such a run's
    metrics load under the new names (compare, resume and the summary read them)."""
    import json

    from coordinator.records import load_metrics

    old = {
        "round": 1,
        "accuracy": 0.5,
        "calibration_seconds": 1.5,
        "clients": [{"client_id": "c", "calibration": "ok", "calibration_flops": 3.0}],
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    (rec,) = load_metrics(tmp_path)
    assert rec["statistics_seconds"] == 1.5 and "calibration_seconds" not in rec
    assert rec["clients"] == [{"client_id": "c", "statistics": "ok", "statistics_flops": 3.0}]
