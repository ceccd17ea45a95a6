"""The layers are enforced: ``lint-imports`` (import-linter, the contract in pyproject.toml) passes
on the project, and fails on a copy of it with one upward import or one import between the two
apps."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "deploy", "coordinator", "edge_client", "cahfp", "device_profiles")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.is_file():
        missing("import-linter is not installed (pip install -c constraints.txt -e .[dev])")
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_layers_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        ("cahfp/costs.py", "from coordinator import engine", "cahfp.costs -> coordinator.engine"),
        (
            "edge_client/agent.py",
            "from coordinator import records",
            "edge_client.agent -> coordinator.records",
        ),
        (
            "cahfp/training.py",
            "from cahfp.device import profiles",
            None,  # downward: allowed
        ),
        (
            "device_profiles/__init__.py",
            "import cahfp.errors",
            "device_profiles -> cahfp.errors",
        ),
    ],
)
def test_a_wrong_import_breaks_the_build(tmp_path, module, line, reported):
    for name in PACKAGES:
        shutil.copytree(
            REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # the import under test\n")
    proc = lint_imports(tmp_path)
    if reported is None:
        assert proc.returncode == 0, proc.stdout[-3000:]
        return
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 kept, 1 broken" in proc.stdout
    assert reported in proc.stdout, proc.stdout[-3000:]
