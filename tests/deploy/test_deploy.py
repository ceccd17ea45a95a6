"""The deployment: generated secured broker config (TLS, passwords, ACL), a federation over it,
systemd units, the provisioning script, and the emulated testbed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cahfp.mqtt.link import LinkError, MqttLink, read_credentials
from cahfp.mqtt.protocol import CLIENT_ID_PREFIX, Topics
from deploy.broker import config as bc
from deploy.broker.embedded import free_port
from tests.conftest import missing
from tests.mqtt_helpers import (
    REPO,
    SEED,
    cli,
    finish,
    kill_all,
    metrics,
    start_generated_broker,
    write_config,
)

FED = "sec"


@pytest.fixture(scope="module")
def secured():
    """A deployment directory made by `cahfp deploy init` and mosquitto running it."""
    if not shutil.which("mosquitto"):
        missing("mosquitto is not installed")
    d = Path(tempfile.mkdtemp(prefix="cahfp-deploy-"))  # under /tmp: reachable by mosquitto
    port = free_port()
    bc.init(
        d,
        ["dev-a", "dev-b", "dev-c", "dev-d"],
        federation=FED,
        hosts=["localhost", "127.0.0.1"],
        port=port,
        bind="127.0.0.1",
    )
    proc = start_generated_broker(d, port)
    yield d, f"mqtts://localhost:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(5)
    shutil.rmtree(d, ignore_errors=True)


def link(secured, name, client_id=None, password=None):
    d, url = secured
    user, pw = read_credentials(d / "clients" / name / "credentials")
    return MqttLink(
        url,
        client_id or user,
        username=user,
        password=password or pw,
        ca_file=str(d / "certs" / "ca.crt"),
    )


def received(lnk: MqttLink, seconds: float = 1.5) -> list:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        m = lnk.get(0.1)
        if m is not None:
            out.append(m)
    return out


def test_generated_files_and_modes(secured):
    d, _ = secured
    conf = (d / "mosquitto.conf").read_text()
    for line in (
        "allow_anonymous false",
        "use_username_as_clientid true",
        "tls_version",
        "password_file",
        "acl_file",
        "max_packet_size",
    ):
        assert line in conf
    # listener options belong after the listener line, else mosquitto applies them to a
    # default plain listener it opens on 1883
    assert conf.index("use_username_as_clientid") > conf.index("\nlistener ")
    assert oct((d / "certs" / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert oct((d / "passwords").stat().st_mode & 0o777) == "0o640"
    assert "dev-a:$7$" in (d / "passwords").read_text()  # hashed by mosquitto_passwd
    assert "pattern read cahfp/sec/task/%u" in (d / "acl").read_text()


def test_tls_with_credentials_works_and_wrong_password_is_refused(secured):
    ok = link(secured, "dev-a")
    ok.start(10)
    ok.stop()
    bad = link(secured, "dev-a", password="wrong")
    with pytest.raises(LinkError, match=r"(?i)not authori"):
        bad.start(5)
    _d, url = secured
    plain = MqttLink(url.replace("mqtts", "mqtt"), "x")
    with pytest.raises(LinkError):
        plain.start(3)  # no TLS: the handshake never completes


def test_acl_isolates_devices(secured):
    t = Topics(FED)
    coord, a, b = link(secured, "coordinator"), link(secured, "dev-a"), link(secured, "dev-b")
    a.subscribe(t.task("dev-b"))  # A tries to read B's tasks
    a.subscribe(t.task("+"))
    b.subscribe(t.task("dev-b"))
    coord.subscribe(t.update())
    for lnk in (coord, a, b):
        lnk.start(10)
    time.sleep(0.5)
    coord.publish(t.task("dev-b"), b'{"task": "for b"}').wait_for_publish(5)
    assert [m.topic for m in received(b)] == [t.task("dev-b")]  # positive control
    assert received(a, 0.5) == []  # A never receives B's task
    a.publish(t.update("dev-b"), b"forged").wait_for_publish(5)
    assert received(coord) == []  # A's publish on B's update topic never arrives
    a.publish(t.update("dev-a"), b"own").wait_for_publish(5)
    assert [m.topic for m in received(coord)] == [t.update("dev-a")]
    # A second connection claiming A's client id with B's credentials cannot kick A off:
    # the broker uses the username (dev-b) as its client id.
    impostor = link(secured, "dev-b", client_id="dev-a")
    impostor.start(10)
    time.sleep(1.0)
    assert a.connected.is_set() and a.connects == 1
    a.publish(t.update("dev-a"), b"still here").wait_for_publish(5)
    assert [m.payload for m in received(coord)] == [b"still here"]
    for lnk in (impostor, coord, a, b):
        lnk.stop()


def outsider_refused(url: str, ca: str, client_id: str) -> bool:
    """Connect with ``client_id`` and no username at all; True when the broker refuses."""
    host, port = url.split("//")[1].split(":")
    out = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    out.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    answers = []
    out.on_connect = lambda c, u, f, rc, p: answers.append(rc)
    out.connect(host, int(port), 20)
    end = time.monotonic() + 5
    while not answers and time.monotonic() < end:
        out.loop(0.1)
    out.disconnect()
    return bool(answers) and answers[0].is_failure


def test_outsider_without_username_cannot_deafen_a_board(secured):
    """Issue 20 item 13. In mosquitto 2.0.11 a CONNECT without a username is refused by
    ``use_username_as_clientid`` *after* the broker has taken the client id from the packet,
    and cleaning up the refused connection removes whichever session holds that id from the
    broker's index: the board's. On its next reconnect the board gets a new session while its
    subscriptions stay with the lost one, so it receives retained messages (sent on subscribe)
    but no live ones. The generated configuration refuses unprefixed client ids first."""
    d, url = secured
    t = Topics(FED)
    coord, board = link(secured, "coordinator"), link(secured, "dev-d")
    board.subscribe(t.task("dev-d"))
    coord.start(10)
    board.start(10)
    ca = str(d / "certs" / "ca.crt")
    for cid in ("dev-d", CLIENT_ID_PREFIX + "dev-d", board.client._client_id.decode()):
        assert outsider_refused(url, ca, cid)
    board.client.socket().shutdown(socket.SHUT_RDWR)  # the board's connection drops...
    end = time.monotonic() + 15
    while board.connects < 2 and time.monotonic() < end:  # ...and it reconnects by itself
        time.sleep(0.1)
    assert board.connects == 2
    time.sleep(0.5)  # its subscription is restored
    coord.publish(t.task("dev-d"), b"live").wait_for_publish(5)
    assert [m.payload for m in received(board)] == [b"live"]
    for lnk in (coord, board):
        lnk.stop()


@pytest.mark.trained
def test_federation_over_tls_with_generated_config(secured, fmnist_root, tmp_path):
    d, url = secured
    cfg = write_config(tmp_path / "fed.toml", FED, 3, 3, fmnist_root)
    ca = str(d / "certs" / "ca.crt")
    clients = [
        cli(
            "client",
            "--broker",
            url,
            "--ca",
            ca,
            "--credentials",
            str(d / "clients" / f"dev-{x}" / "credentials"),
            "--id",
            f"dev-{x}",
            "--federation",
            FED,
            "--data",
            "fmnist",
            "--partition",
            "iid",
            "--num-clients",
            "3",
            "--client-index",
            str(i),
            "--train-samples",
            "900",
            "--seed",
            str(SEED),
            "--data-dir",
            str(fmnist_root),
            "--profile",
            "none",
            "--threads",
            "1",
            "--until-finished",
            log=tmp_path / f"dev-{x}.log",
        )
        for i, x in enumerate("abc")
    ]
    coord = cli(
        "coordinator",
        "--broker",
        url,
        "--ca",
        ca,
        "--credentials",
        str(d / "clients" / "coordinator" / "credentials"),
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "run"),
        "--registration-timeout",
        "60",
        "--tracking",
        f"tensorboard:{tmp_path / 'tb'}",
        log=tmp_path / "coordinator.log",
    )
    try:
        codes = finish([coord, *clients], timeout=300)
    finally:
        kill_all([coord, *clients])
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
    assert codes == [0, 0, 0, 0], logs
    m = metrics(tmp_path / "run")
    assert [r["round"] for r in m] == [0, 1, 2, 3]
    assert all(r["aggregated"] == 3 for r in m[1:])
    assert m[-1]["accuracy"] > m[0]["accuracy"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "tb"))  # --tracking mirrored every round
    tb.Reload()
    assert [(s.step, round(s.value, 6)) for s in tb.Scalars("accuracy")] == [
        (r["round"], round(r["accuracy"], 6)) for r in m
    ]
    # an operator reads it back with the read-only observer account `deploy init` made
    observer = str(d / "clients" / "observer" / "credentials")
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", "status", "--broker", url, "--ca", ca,
         "--credentials", observer, "--federation", FED],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.match(rf"federation {FED} \(run [0-9a-f]{{8}}\): finished, round 3", lines[0])
    assert lines[1].startswith(f"last model: round 3, accuracy {m[-1]['accuracy']:.4f}, 2.3")
    assert lines[2] == "boards: 3 known, 0 online (as their last presence says)"
    assert [x.split(":")[0].strip() for x in lines[3:6]] == ["dev-a", "dev-b", "dev-c"]
    assert all(x.split(": ")[1].startswith("offline") for x in lines[3:6]), lines


def test_the_observer_account_only_reads(secured):
    """It sees the federation's retained state but cannot reach a board, and what it
    publishes under its own name is never taken for a board's."""
    t = Topics(FED)
    obs, a, coord = link(secured, "observer"), link(secured, "dev-a"), link(secured, "coordinator")
    a.subscribe(t.task("dev-a"))
    obs.subscribe(t.status)
    coord.subscribe(t.presence())
    for lnk in (obs, a, coord):
        lnk.start(10)
    time.sleep(0.5)
    coord.publish(t.status, b'{"probe": 1}').wait_for_publish(5)
    assert b'{"probe": 1}' in [m.payload for m in received(obs)]  # it reads the status
    obs.publish(t.task("dev-a"), b"forged task").wait_for_publish(5)
    obs.publish(t.status, b"forged status").wait_for_publish(5)
    assert received(a, 0.5) == []  # never delivered: the ACL refuses its writes
    assert all(m.payload != b"forged status" for m in received(obs, 0.5))
    obs.publish(t.presence("observer"), b'{"v": 8}').wait_for_publish(5)
    assert t.presence("observer") in [m.topic for m in received(coord)]  # its own topic...
    from coordinator.mqtt_transport import MqttTransport

    transport = MqttTransport.__new__(MqttTransport)  # ...which the coordinator ignores
    transport.topics, transport.registry = t, {}
    assert transport._handle(t.presence("observer"), b'{"v": 8}') == []
    assert transport.registry == {}
    for lnk in (obs, a, coord):
        lnk.stop()


def test_add_and_revoke_device(secured):
    d, _url = secured
    bundle = bc.add_device(d, "dev-new")
    assert (bundle / "credentials").is_file() and (bundle / "ca.crt").is_file()
    with pytest.raises(bc.DeployError, match="already exists"):
        bc.add_device(d, "dev-new")
    bc.revoke_device(d, "dev-new")
    assert "dev-new:" not in (d / "passwords").read_text()
    assert not bundle.exists()


def test_systemd_units_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        missing("systemd-analyze is not installed (apt-get install systemd)")
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "opt" / "cahfp" / "venv" / "bin").mkdir(parents=True)
    exe = root / "opt" / "cahfp" / "venv" / "bin" / "cahfp"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    shutil.copytree("/usr/lib/systemd", root / "usr" / "lib" / "systemd", symlinks=True)
    units = ["cahfp-coordinator.service", "cahfp-client.service"]
    for u in units:
        shutil.copy(REPO / "deploy" / "systemd" / u, root / "etc" / "systemd" / "system" / u)
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    (root / "etc" / "systemd" / "system" / "broken.service").write_text(
        "[Service]\nExecStart=/nonexistent\n"
    )
    bad = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "broken.service"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0  # the check can fail


SCRIPT = REPO / "deploy" / "provision" / "provision-board.sh"


def test_provision_script_passes_shellcheck():
    if not shutil.which("shellcheck"):
        missing("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_provision_dry_run_and_throwaway_root(secured, tmp_path):
    d, _ = secured
    bundle = d / "clients" / "dev-a"
    dry = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--bundle",
            str(bundle),
            "--platform",
            "pi",
            "--source",
            str(REPO),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "would run:" in dry.stdout and "download.pytorch.org/whl/cpu" in dry.stdout
    inf = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--bundle",
            str(bundle),
            "--platform",
            "pi",
            "--source",
            str(REPO),
            "--dry-run",
            "--inference-only",
        ],
        capture_output=True,
        text=True,
    )
    assert "onnxruntime" in inf.stdout and "torch" not in inf.stdout
    jet = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--bundle",
            str(bundle),
            "--platform",
            "jetson",
            "--source",
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert jet.returncode != 0 and "NVIDIA" in jet.stderr
    if os.geteuid() != 0:
        missing("provisioning into a throwaway root needs root (useradd --root)")
    root = tmp_path / "board"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", f).exists():
            shutil.copy(Path("/etc", f), root / "etc" / f)
    args = [
        "bash",
        str(SCRIPT),
        "--bundle",
        str(bundle),
        "--platform",
        "pi",
        "--root",
        str(root),
        "--skip-install",
    ]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    env = (root / "etc" / "cahfp" / "client.env").read_text()
    assert "CAHFP_CLIENT_ID=dev-a" in env and "CAHFP_MQTT_PASSWORD=" in env
    assert oct((root / "etc" / "cahfp" / "client.env").stat().st_mode & 0o777) == "0o640"
    assert (root / "etc" / "systemd" / "system" / "cahfp-client.service").is_file()
    assert "cahfp:" in (root / "etc" / "passwd").read_text()
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "already done: user cahfp exists" in second.stdout
    assert "already done: cahfp-client.service installed" in second.stdout


@pytest.mark.trained
def test_testbed_slower_slice_chooses_smaller_keep(fmnist_root, tmp_path):
    if os.geteuid() != 0:
        missing("the testbed needs root")
    from cahfp.config import load_config
    from cahfp.device.profiles import load_profile
    from deploy.testbed import Testbed, run_testbed

    def profile(name, quota):
        text = (REPO / "device_profiles" / "raspberry-pi-5.toml").read_text()
        text = text.replace('name = "raspberry-pi-5"', f'name = "{name}"')
        text = text.replace("cpu_quota = 0.28", f"cpu_quota = {quota}")
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return load_profile(path)

    profiles = [profile("fast", 1.0), profile("slow", 0.2)]
    cfg = load_config(
        None,
        {
            "federation.name": "tb",
            "federation.rounds": 2,
            "federation.clients": 2,
            # about 2 s of dense training for the fast slice, 11 s for the slow one: the slow one
            # must shrink, with room for the first round's prediction error
            "federation.deadline_s": 12.0,
            "clients.budget": "measured",
            "model.width": 0.25,
            "data.train_samples": 6000,
            "data.eval_samples": 500,
            "data.partition": "iid",
            "data.data_dir": str(fmnist_root),
        },
    )
    summary, report = run_testbed(profiles, cfg, tmp_path / "run")
    assert summary["rounds"] == 2
    fast, slow = report
    assert fast["measured_cores"] == pytest.approx(1.0) and slow["measured_cores"] == pytest.approx(
        0.2
    )
    assert slow["ms_per_sample"] > 2 * fast["ms_per_sample"]
    # A CPU quota of 0.2 cores throttles in bursts, so a slow-slice round can still overrun its
    # prediction and arrive late (recorded without a keep); at least one must arrive.
    slow_keeps = [k for k in slow["keeps"] if k is not None]
    assert all(k is not None for k in fast["keeps"]) and slow_keeps, report
    assert max(slow_keeps) < min(fast["keeps"]), report
    assert Testbed(profiles).leftovers() == []
