"""The operator acceptance test: what docs/deploy.md tells an operator to do, with the real
components and the units' own command lines.

`cahfp deploy init --client-certs`, `add-device` for three boards and one that is then revoked,
mosquitto started with the generated configuration (TLS, passwords, ACL, client certificates,
revocation list) on a free loopback port, the
coordinator started with the exact `ExecStart` line of its unit (environment file substituted)
on an empty run directory and the unmodified `examples/fmnist-vgg11.toml` (rounds, data and
deadline shrunk by `--set`, and the operator's own model: `model.name = "op_net:build"`, a
module the test writes, with a depthwise convolution, on `PYTHONPATH` in every environment
file), three boards provisioned with `provision-board.sh` and started with their unit's
`ExecStart` line, each emulating another board (`CAHFP_PROFILE` in its environment file: it
measures this host and scales the measurement to the board's speed, memory and uplink), their
own images as `imagefolder:` (Raspberry Pi 4 and 5, Jetson Orin Nano). The federation's
`clients.safety` makes the boards plan for a small share of a generous deadline: three boards
training at once on this 2-core machine run slower than the boards they emulate. Mid-run the
coordinator is killed with SIGKILL and started again with the same line.

CPU quotas (the testbed's cgroups) are not used here: a Raspberry Pi 4's quota (0.12 of this
machine) would make the real rounds miss any deadline short enough for a test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from deploy.broker.embedded import free_port
from tests.conftest import missing
from tests.mqtt_helpers import REPO, finish, kill_all, metrics, start_generated_broker, wait_for
from tests.mqtt_helpers import run_cli as cahfp

pytestmark = pytest.mark.slow

FED = "fmnist-vgg11"  # the example config's federation.name
BOARDS = {"pi-01": "raspberry-pi-4", "pi-02": "raspberry-pi-5", "jetson-01": "jetson-orin-nano"}
# Images per board, the round deadline and the share of it the boards plan for
# (clients.safety, which reaches them with the status and every task): with the model below
# (55 MFLOPs of training per image) an emulated Pi 4 needs about 9 s of its own time for a
# first round that trains dense and scores (4 batches of 32), a Pi 5 about 4 s, against
# 0.12 x 85 % (the first round's margin) of 75 s = 7.7 s: the Pi 4 must prune (to about 0.5 to
# 0.7, as far as pruning to a quarter of the FLOPs speeds a step up on this host) and the others
# need not. Three boards training at once on 2 cores run slower than the boards they emulate, so
# the real deadline is generous; the real rounds take seconds.
IMAGES = 1500
DEADLINE = 75
SAFETY = 0.12


OWN_MODEL = """
from torch import nn


def build(num_classes, in_channels, width):
    c = max(8, round(128 * width))
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),  # depthwise
        nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes),
    )
"""


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def exec_start(unit: str, env: dict[str, str], state_dir: Path) -> list[str]:
    """The unit's ExecStart line with its environment substituted, as systemd runs it: the
    installed `cahfp` becomes this interpreter's `-m cahfp.cli`, /var/lib/cahfp the test's
    state directory."""
    text = (REPO / "deploy" / "systemd" / unit).read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    words = shlex.split(line.removeprefix("ExecStart="))
    assert words[0] == "/opt/cahfp/venv/bin/cahfp", words
    out = [sys.executable, "-m", "cahfp.cli"]
    for w in words[1:]:
        w = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w)
        out.append(w.replace("/var/lib/cahfp", str(state_dir)))
    return out


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path):
    """Start ``cmd`` with ``env`` (as the unit's EnvironmentFile gives it)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    out = open(log, "wb")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        cmd, env=full_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def write_images(fmnist, indices, folder: Path) -> None:
    """A board's own images: Fashion-MNIST PNGs in class folders (c0 ... c9, in label order)."""
    for i in indices:
        d = folder / "train" / f"c{int(fmnist.targets[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.images[i, 0].numpy()).save(d / f"{i}.png")


def test_operator_path_end_to_end(fmnist_root, fmnist_train, tmp_path):
    for tool in ("mosquitto", "mosquitto_passwd"):
        if not shutil.which(tool):
            missing(f"{tool} is not installed (apt-get install mosquitto)")
    if os.geteuid() != 0:
        missing("the operator test needs root (provisioning creates the cahfp user)")
    deploy = Path(tempfile.mkdtemp(prefix="cahfp-operator-"))  # /tmp: readable by mosquitto
    port = free_port()
    models = tmp_path / "models"  # what an operator copies to /opt/cahfp/models
    models.mkdir()
    (models / "op_net.py").write_text(OWN_MODEL)
    procs: list[subprocess.Popen] = []
    try:
        # -- the server: broker configuration, credentials, the broker itself
        r = cahfp(
            "deploy", "init", "--out", str(deploy), "--federation", FED,
            "--host", "localhost,127.0.0.1", "--port", str(port), "--bind", "127.0.0.1",
            "--client-certs",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        for name in [*BOARDS, "stolen-01"]:
            r = cahfp("deploy", "add-device", "--dir", str(deploy), name)
            assert r.returncode == 0 and "added" in r.stdout, r.stderr
        broker = start_generated_broker(deploy, port)
        procs.append(broker)

        # -- each board: provisioned from its bundle into its own root, its own images
        boards = {}
        for i, name in enumerate([*BOARDS, "stolen-01"]):
            root = tmp_path / name
            (root / "etc").mkdir(parents=True)
            for f in ("passwd", "group", "shadow", "gshadow"):
                if Path("/etc", f).exists():
                    shutil.copy(Path("/etc", f), root / "etc" / f)
            write_images(fmnist_train, range(IMAGES * i, IMAGES * (i + 1)), root / "data")
            r = subprocess.run(
                [
                    "bash", str(REPO / "deploy" / "provision" / "provision-board.sh"),
                    "--bundle", str(deploy / "clients" / name), "--platform", "pi",
                    "--root", str(root), "--skip-install",
                    "--data", f"imagefolder:{root / 'data'}",
                ],
                capture_output=True,
                text=True,
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            with open(root / "etc" / "cahfp" / "client.env", "a") as f:
                f.write(f"PYTHONPATH={models}\n")  # the operator's own model (docs/deploy.md)
                if name in BOARDS:  # to emulate a board (here: three on one machine)
                    f.write(f"CAHFP_PROFILE={BOARDS[name]}\n")
            env = read_env(root / "etc" / "cahfp" / "client.env")
            for key, file in (("CAHFP_CA", "ca.crt"), ("CAHFP_CERT", "client.crt")):
                env[key] = str(root / "etc" / "cahfp" / file)
            env["CAHFP_KEY"] = str(root / "etc" / "cahfp" / "client.key")
            env["XDG_CACHE_HOME"] = str(root / "var" / "lib" / "cahfp" / ".cache")
            boards[name] = (root, env)
        r = cahfp("deploy", "revoke-device", "--dir", str(deploy), "stolen-01")
        assert r.returncode == 0, r.stderr
        broker.send_signal(signal.SIGHUP)  # the reload docs/deploy.md asks for

        # -- the coordinator, as its unit starts it, on an empty run directory
        server = tmp_path / "server"
        (server / "runs").mkdir(parents=True)
        coord_env = read_env(deploy / "clients" / "coordinator" / "client.env")
        coord_env.update(
            CAHFP_CA=str(deploy / "certs" / "ca.crt"),
            CAHFP_CERT=str(deploy / "clients" / "coordinator" / "client.crt"),
            CAHFP_KEY=str(deploy / "clients" / "coordinator" / "client.key"),
            CAHFP_CONFIG=str(REPO / "examples" / "fmnist-vgg11.toml"),
            CAHFP_RUN_DIR=str(server / "runs" / "main"),
            CAHFP_DATA_DIR=str(fmnist_root),
            PYTHONPATH=str(models),
        )
        shrink = [
            "--set", "federation.rounds=3", "--set", "federation.clients=3",
            "--set", f"federation.deadline_s={DEADLINE}", "--set", "data.eval_samples=500",
            "--set", f"clients.safety={SAFETY}", "--set", "model.name=op_net:build",
            "--registration-timeout", "150",
        ]  # fmt: skip
        coord_cmd = exec_start("cahfp-coordinator.service", coord_env, server) + shrink
        run = server / "runs" / "main"
        coord1 = start(coord_cmd, coord_env, tmp_path / "coordinator-1.log", server)
        procs.append(coord1)

        # -- the boards, as their unit starts them, one after the other (boards come online
        # one by one; each measures itself alone, not while two others measure too)
        clients = {}
        for name in BOARDS:
            root, env = boards[name]
            cmd = exec_start("cahfp-client.service", env, root / "var" / "lib" / "cahfp")
            log = tmp_path / f"{name}.log"
            clients[name] = start(cmd, env, log, root)
            procs.append(clients[name])
            wait_for(lambda log=log: "measured;" in log.read_text(), 150, f"{name}'s measurement")
        root, env = boards["stolen-01"]
        cmd = exec_start("cahfp-client.service", env, root / "var" / "lib" / "cahfp")
        stolen = start(cmd, env, tmp_path / "stolen-01.log", root)
        procs.append(stolen)
        # a board with a valid password but a certificate of another deployment's CA
        other = tmp_path / "other-ca"
        r = cahfp("deploy", "init", "--out", str(other), "--devices", "pi-02", "--client-certs")
        assert r.returncode == 0, r.stderr
        root, env = boards["pi-02"]
        rogue_env = {
            **env,
            "CAHFP_CERT": str(other / "clients" / "pi-02" / "client.crt"),
            "CAHFP_KEY": str(other / "clients" / "pi-02" / "client.key"),
        }
        cmd = exec_start("cahfp-client.service", rogue_env, root / "var" / "lib" / "cahfp")
        rogue = start(cmd, rogue_env, tmp_path / "rogue.log", root)
        procs.append(rogue)

        # -- mid-run: SIGKILL the coordinator once round 1 is checkpointed, start it again
        state = run / "checkpoint" / "state.json"
        wait_for(state.is_file, 180, "round 1's checkpoint of the first coordinator")
        os.killpg(coord1.pid, signal.SIGKILL)
        coord1.wait(10)
        done = len(metrics(run)) - 1
        coord2 = start(coord_cmd, coord_env, tmp_path / "coordinator-2.log", server)
        procs.append(coord2)
        codes = finish([coord2, stolen, rogue], timeout=240)
        for proc in clients.values():  # what `systemctl stop` does: SIGTERM, then wait
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        codes += finish(list(clients.values()), timeout=30)
    finally:
        kill_all(procs)
        shutil.rmtree(deploy, ignore_errors=True)
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    everything = "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in sorted(logs.items()))
    assert codes == [0, 77, 77, 0, 0, 0], everything

    # every round completed, none lost or repeated across the kill
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3], everything
    assert all(r["aggregated"] >= 1 for r in m[1:]), m
    assert f"resuming after round {done}" in logs["coordinator-2.log"]
    assert "starting a fresh run" in logs["coordinator-1.log"]

    # each board's keep is the one its own measurement chose; the slowest keeps the least
    first = {c["client_id"]: c for c in m[1]["clients"]}
    assert set(first) == set(BOARDS), first
    for name in BOARDS:
        chosen = re.search(r"round 1 ok in .*?: keep (\d\.\d\d):", logs[f"{name}.log"])
        assert chosen, logs[f"{name}.log"][-2000:]
        assert first[name]["keep_target"] == pytest.approx(float(chosen.group(1)), abs=0.005)
    keeps = {name: first[name]["keep_target"] for name in BOARDS}
    assert keeps["pi-01"] < 1.0 == keeps["jetson-01"], keeps  # the Pi 4 must prune
    assert keeps["pi-01"] == min(keeps.values()), keeps
    pattern = r"client (\S+) registered \(keep \S+, its own measurement\)"
    assert sorted(re.findall(pattern, logs["coordinator-1.log"])) == sorted(BOARDS), everything

    # the revoked board and the one with a foreign certificate are refused with one clear line
    assert "it is revoked" in logs["stolen-01.log"].splitlines()[-1], logs["stolen-01.log"]
    assert "not issued by its CA" in logs["rogue.log"].splitlines()[-1], logs["rogue.log"]
    assert logs["rogue.log"].splitlines()[-1].startswith("error: the broker refused")
    assert not any("Traceback" in text for text in logs.values()), everything

    # and the result serves the device: export a pruned model, classify one of the images
    onnx = tmp_path / "model.onnx"
    r = cahfp(
        "export", "--run", str(run), "--keep", "0.5", "--out", str(onnx),
        env={"CAHFP_DATA_DIR": str(fmnist_root), "PYTHONPATH": str(models)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    image = next((tmp_path / "pi-01" / "data" / "train").rglob("*.png"))
    r = cahfp("infer", str(onnx), str(image))
    assert r.returncode == 0 and str(image) in r.stdout, r.stdout + r.stderr
