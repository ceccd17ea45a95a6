"""Every command and code block in README.md and docs/ is checked against what the project does.

* Python blocks run as written.
* Every `cahfp ...` line (in bash and text blocks, `sudo` and the virtualenv prefix allowed) is
  parsed by the real command-line parser: a renamed or removed option fails here. The cheap
  ones (`cahfp models`, `cahfp data check fmnist`, `cahfp profile`) also run.
* Every bash block passes `bash -n`; every `make` target it names exists; every repository file
  it names exists.
* README's inference-only install runs in a fresh virtualenv (with its path under a temporary
  directory instead of /opt) and then classifies an image with no torch installed.

What needs a real server (systemd, /etc, a public host name) is exercised end to end by
tests/deploy/test_operator.py, with the units' own command lines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cahfp.cli import build_parser
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = ("sudo ", ".venv/bin/", "/opt/cahfp/venv/bin/")
CHEAP = ("cahfp models", "cahfp data check fmnist", "cahfp profile")


def blocks(lang: str) -> list[tuple[str, int, str]]:
    """(file, line, text) of every fenced block of language ``lang``."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == f"```{lang}":
                start = i + 1
                i += 1
                while lines[i].strip() != "```":
                    i += 1
                out.append((path.name, start + 1, "\n".join(lines[start:i])))
            i += 1
    return out


def commands() -> list[tuple[str, int, str]]:
    """Every `cahfp` command line of the bash and text blocks, alternatives (`A | B`) split,
    optional parts (`[--x]`) kept, descriptions after the command dropped."""
    out = []
    for lang in ("bash", "text"):
        for name, line, text in blocks(lang):
            text = text.replace("\\\n", " ")
            for k, raw in enumerate(text.splitlines()):
                raw = raw.split(" #", 1)[0] if lang == "bash" else re.split(r"\s{3,}", raw)[0]
                for part in raw.split(" | "):
                    cmd = part.strip()
                    for prefix in PREFIXES:
                        cmd = cmd.removeprefix(prefix)
                    if cmd.startswith("cahfp "):
                        out.append((name, line + k, re.sub(r"[\[\]]", "", cmd)))
    return out


def test_the_docs_have_blocks_and_commands():
    assert len(blocks("python")) >= 2 and len(commands()) >= 15


@pytest.mark.parametrize("where", blocks("python"), ids=lambda b: f"{b[0]}:{b[1]}")
def test_python_blocks_run(where, tmp_path):
    name, line, text = where
    proc = subprocess.run(
        [sys.executable, "-c", text], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{name}:{line}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("where", commands(), ids=lambda c: f"{c[0]}:{c[1]}")
def test_cahfp_command_lines_parse(where):
    name, line, cmd = where
    try:
        args = build_parser().parse_args(shlex.split(cmd)[1:])
    except SystemExit as exc:
        pytest.fail(f"{name}:{line}: `{cmd}` does not parse (exit {exc.code})")
    assert getattr(args, "handler", None), f"{name}:{line}: `{cmd}` names no command"


@pytest.mark.parametrize("cmd", CHEAP)
def test_cheap_documented_commands_run(cmd, fmnist_root, tmp_path):
    assert any(c == cmd or c.startswith(cmd + " ") for _, _, c in commands()), cmd
    env = {**os.environ, "CAHFP_DATA_DIR": str(fmnist_root), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", *shlex.split(cmd)[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "None" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("where", blocks("bash"), ids=lambda b: f"{b[0]}:{b[1]}")
def test_shell_blocks_are_valid_and_name_what_exists(where):
    name, line, text = where
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{name}:{line}: {syntax.stderr}"
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", text):
        assert target in targets, f"{name}:{line}: make {target} is not a Makefile target"
    for path in re.findall(r"(?<![\w/.])((?:deploy|examples|docs|benchmarks)/[\w./-]+)", text):
        assert (REPO / path).exists(), f"{name}:{line}: {path} does not exist"
    if "constraints.txt" in text:
        assert (REPO / "constraints.txt").is_file()


def test_the_files_the_docs_name_exist():
    """A module path in backticks (`coordinator/engine.py`, `cahfp/mqtt/`) names a file or
    folder of this repository: a move without its doc fails here."""
    pattern = (
        r"`((?:cahfp|coordinator|edge_client|deploy|benchmarks|tests|device_profiles)/[\w./-]*)`"
    )
    missing_paths = [
        f"{path.name}: {name}"
        for path in DOCS
        for name in re.findall(pattern, path.read_text())
        if not (REPO / name.rstrip(".")).exists()
    ]
    assert not missing_paths, missing_paths


@pytest.mark.slow
def test_inference_only_install_as_the_readme_says(tmp_path):
    """README's three lines, with /opt/cahfp/venv under tmp_path: a virtualenv with only
    onnxruntime, numpy and Pillow (pinned by constraints.txt) and the project without its
    dependencies runs `cahfp infer` on an exported model, and has no torch."""
    block = next(t for n, _, t in blocks("bash") if n == "README.md" and "--no-deps" in t)
    venv = tmp_path / "venv"
    script = block.replace("/opt/cahfp/venv", str(venv))
    proc = subprocess.run(
        ["bash", "-e", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        missing(f"the package index is not reachable: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import numpy as np
    import torch
    from PIL import Image

    from cahfp.data.datasets import dataset_info
    from cahfp.export import export_submodel
    from cahfp.models import build_model

    model = build_model("vgg11", 10, 1, 0.25, seed=0).eval()
    onnx = export_submodel(model, dataset_info("fmnist"), tmp_path / "m.onnx").path
    image = tmp_path / "shoe.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
    del torch
    infer = subprocess.run(
        [str(venv / "bin" / "cahfp"), "infer", str(onnx), str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert infer.returncode == 0 and "shoe.png" in infer.stdout, infer.stdout + infer.stderr
    no_torch = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True
    )
    assert no_torch.returncode != 0
