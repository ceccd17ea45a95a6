"""The ``cahfp`` dispatcher: commands come from the entry-point group ``cahfp.commands``; each
layer registers its own with argparse alone; an unknown command, a package whose entry points
are missing or a command that cannot be loaded is one ``error:`` line and exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

COMMANDS = {
    "models": "cahfp.cli.models",
    "data": "cahfp.cli.data",
    "profile": "cahfp.cli.profile",
    "infer": "cahfp.cli.infer",
    "coordinator": "coordinator.commands.coordinator",
    "simulate": "coordinator.commands.simulate",
    "compare": "coordinator.commands.compare",
    "status": "coordinator.commands.status",
    "export": "coordinator.commands.export",
    "client": "edge_client.commands.client",
    "deploy": "deploy.commands.deploy",
    "testbed": "deploy.commands.testbed",
    "demo": "deploy.commands.demo",
}


def cahfp(*args: str, cwd: Path = REPO, isolated: bool = False) -> subprocess.CompletedProcess:
    """``python -m cahfp.cli ARGS``; ``isolated``: without site-packages (``-S``), so that only
    what lies in ``cwd`` is installed."""
    flags = ["-S"] if isolated else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "cahfp.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_every_command_is_registered_by_its_layer():
    from cahfp.cli import command_entry_points

    found = {ep.name: ep.value for ep in command_entry_points()}
    assert found == {name: f"{module}:register" for name, module in COMMANDS.items()}


def test_registering_every_command_imports_neither_torch_nor_pydantic():
    """An inference-only board has neither: building the whole parser must not need them."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['pydantic'] = None; "
        "from cahfp.cli import build_parser; p = build_parser(); "
        "print(sorted(p._subparsers._group_actions[0].choices))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sorted(COMMANDS))


def test_an_unknown_command_is_one_line():
    line = one_error_line(cahfp("simulat", "--rounds", "1"))
    assert "unknown command 'simulat'" in line and "simulate" in line


def test_missing_entry_points_are_one_line(tmp_path):
    """The code without its installed metadata (a copied source tree, not pip-installed)."""
    shutil.copytree(REPO / "cahfp", tmp_path / "cahfp")
    line = one_error_line(cahfp("models", cwd=tmp_path, isolated=True))
    assert "no cahfp commands are registered" in line and "install the package" in line


def test_a_command_that_cannot_load_stops_only_itself(tmp_path):
    shutil.copytree(REPO / "cahfp", tmp_path / "cahfp")
    dist = tmp_path / "fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[cahfp.commands]\nbroken = nowhere.commands:register\ndata = cahfp.cli.data:register\n"
    )
    line = one_error_line(cahfp("broken", cwd=tmp_path, isolated=True))
    assert "command 'broken' cannot be loaded from nowhere.commands:register" in line
    ok = cahfp("data", "--help", cwd=tmp_path, isolated=True)
    assert ok.returncode == 0 and "check or import datasets" not in ok.stderr, ok.stderr
    assert "{check,import}" in ok.stdout
    one_error_line(cahfp("--help", cwd=tmp_path, isolated=True))  # the listing needs them all


def test_data_import_without_its_source_is_one_line():
    line = one_error_line(cahfp("data", "import", "fmnist"))
    assert line == "error: data import needs the SOURCE folder"


def test_the_export_options_old_name_still_works():
    """`--calibration-batches` became `--statistics-batches` (the BatchNorm statistics are not
    the device's calibration); scripts written with the old name keep working."""
    from cahfp.cli import build_parser

    common = ["export", "--run", "r", "--keep", "0.5", "--out", "m.onnx"]
    for option in ("--statistics-batches", "--calibration-batches"):
        args = build_parser().parse_args([*common, option, "3"])
        assert args.statistics_batches == 3
