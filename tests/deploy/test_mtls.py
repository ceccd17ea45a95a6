"""Mutual TLS end to end (issue 20 item 3): `cahfp deploy init --client-certs` issues a
certificate per device and for the coordinator, the real mosquitto runs the generated
configuration, `cahfp client` / `cahfp coordinator` present the certificates, and a refused or
missing certificate ends the process with one clear line; revocation goes through the CRL."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from cahfp.mqtt.link import CertificateRefused, MqttLink, read_credentials
from cahfp.mqtt.protocol import Topics
from deploy import pki
from deploy.broker import config as bc
from deploy.broker.embedded import free_port
from tests.conftest import missing
from tests.mqtt_helpers import (
    REPO,
    cli,
    finish,
    kill_all,
    metrics,
    run_cli,
    start_generated_broker,
    write_config,
)

FED = "mt"
DEVICES = ["dev-a", "dev-b", "dev-r", "dev-s"]


def spawn(*args: str, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        [sys.executable, "-m", "cahfp.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def mtls():
    """`cahfp deploy init --client-certs` and mosquitto running its configuration."""
    if not shutil.which("mosquitto"):
        missing("mosquitto is not installed")
    d = Path(tempfile.mkdtemp(prefix="cahfp-mtls-"))  # under /tmp: reachable by mosquitto
    port = free_port()
    made = run_cli(
        "deploy", "init", "--out", str(d), "--federation", FED, "--devices", ",".join(DEVICES),
        "--host", "localhost,127.0.0.1", "--port", str(port), "--bind", "127.0.0.1",
        "--client-certs",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    proc = start_generated_broker(d, port)
    yield d, f"mqtts://localhost:{port}", proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(5)
    shutil.rmtree(d, ignore_errors=True)


def reload_broker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)  # mosquitto applies a reload at its next loop iteration


def link(mtls, name: str, bundle: Path | None = None, cert: bool = True) -> MqttLink:
    d, url, _ = mtls
    b = bundle or d / "clients" / name
    user, pw = read_credentials(b / "credentials")
    return MqttLink(
        url,
        name,
        username=user,
        password=pw,
        ca_file=str(d / "certs" / "ca.crt"),
        cert_file=str(b / "client.crt") if cert else None,
        key_file=str(b / "client.key") if cert else None,
    )


def client_args(url: str, d: Path, name: str, bundle: Path | None = None) -> list[str]:
    b = bundle or d / "clients" / name
    return [
        "client", "--broker", url, "--ca", str(d / "certs" / "ca.crt"),
        "--credentials", str(b / "credentials"), "--id", name, "--federation", FED,
        "--data", "fmnist", "--partition", "iid", "--num-clients", "2", "--client-index", "0",
        "--train-samples", "200", "--seed", "1", "--data-dir", str(fmnist_dir()),
        "--profile", "none", "--threads", "1", "--connect-timeout", "20",
    ]  # fmt: skip


def fmnist_dir() -> Path:
    from tests.conftest import _fmnist_root

    root = _fmnist_root()
    if root is None:
        missing("real Fashion-MNIST not found (set CAHFP_DATA_DIR or provide ../shared/data)")
    return root


def one_error_line(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    """The process ended with ``code``, its last stderr line names the problem, and it
    printed no traceback."""
    out = proc.stderr.strip()
    assert proc.returncode == code, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert out.splitlines()[-1].startswith("error: ") and text in out.splitlines()[-1], out[-2000:]


def test_generated_files(mtls):
    d, _, _ = mtls
    conf = (d / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and f"crlfile {d}/certs/crl.pem" in conf
    assert conf.index("crlfile") > conf.index("\nlistener ")  # a listener option
    ca = x509.load_pem_x509_certificate((d / "certs" / "ca.crt").read_bytes())
    for name in [*DEVICES, "coordinator"]:  # the coordinator's bundle has one too
        b = d / "clients" / name
        cert = x509.load_pem_x509_certificate((b / "client.crt").read_bytes())
        assert cert.issuer == ca.subject
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
        env = (b / "client.env").read_text()
        assert "CAHFP_CERT=/etc/cahfp/client.crt\n" in env
        assert "CAHFP_KEY=/etc/cahfp/client.key\n" in env
        assert oct((b / "client.key").stat().st_mode & 0o777) == "0o600"
        assert (d / "certs" / "issued" / f"{name}.crt").read_bytes() == (
            b / "client.crt"
        ).read_bytes()
    assert oct((d / "certs" / "crl.pem").stat().st_mode & 0o777) == "0o640"
    assert pki.revoked_serials(d / "certs") == set()


def test_devices_and_coordinator_exchange_messages(mtls):
    t = Topics(FED)
    coord, a = link(mtls, "coordinator"), link(mtls, "dev-a")
    a.subscribe(t.task("dev-a"))
    coord.subscribe(t.update())
    coord.start(10)
    a.start(10)
    time.sleep(0.5)
    coord.publish(t.task("dev-a"), b"task").wait_for_publish(5)
    a.publish(t.update("dev-a"), b"update").wait_for_publish(5)
    assert a.get(5).payload == b"task"
    assert coord.get(5).payload == b"update"
    for lnk in (a, coord):
        lnk.stop()


def test_client_without_certificate_is_refused(mtls):
    d, url, _ = mtls
    proc = run_cli(*client_args(url, d, "dev-a"))
    one_error_line(proc, 77, "the broker requires a client certificate")
    assert proc.stderr.count("requires a client certificate") == 2  # the log line, the error


def test_certificate_of_another_ca_is_refused(mtls, tmp_path):
    d, url, _ = mtls
    pki.make_ca(tmp_path, "intruder")
    pki.issue(tmp_path, "dev-a", "dev-a", client=True)
    proc = run_cli(
        *client_args(url, d, "dev-a"),
        env={"CAHFP_CERT": str(tmp_path / "dev-a.crt"), "CAHFP_KEY": str(tmp_path / "dev-a.key")},
    )
    one_error_line(proc, 77, f"refused the client certificate {tmp_path}/dev-a.crt: not issued")


def test_bad_certificate_options_are_one_line_errors(mtls, tmp_path):
    d, url, _ = mtls
    b = d / "clients" / "dev-a"
    base = client_args(url, d, "dev-a")
    missing_cert = run_cli(*base, "--cert", str(tmp_path / "none.crt"), "--key", str(b / "x"))
    one_error_line(missing_cert, 2, f"cannot read client certificate file {tmp_path}/none.crt")
    no_key = run_cli(*base, "--cert", str(b / "client.crt"))
    one_error_line(no_key, 2, "needs its key")
    other = tmp_path / "other.key"
    pki.make_ca(tmp_path, "x")
    shutil.copy(tmp_path / "ca.key", other)
    mismatch = run_cli(*base, "--cert", str(b / "client.crt"), "--key", str(other))
    one_error_line(mismatch, 2, "cannot use the client certificate")
    plain = [*base]
    plain[plain.index(url)] = url.replace("mqtts://", "mqtt://")
    plain.remove("--ca")
    plain.remove(str(d / "certs" / "ca.crt"))
    nontls = run_cli(
        *plain, env={"CAHFP_CERT": str(b / "client.crt"), "CAHFP_KEY": str(b / "client.key")}
    )
    one_error_line(nontls, 2, "not mqtts://")


def test_crl_alone_refuses_a_certificate_after_reload(mtls):
    """The password of dev-s stays valid: only the revocation list can refuse it."""
    d, _, proc = mtls
    ok = link(mtls, "dev-s")
    ok.start(10)
    ok.stop()
    cert = x509.load_pem_x509_certificate((d / "clients" / "dev-s" / "client.crt").read_bytes())
    pki.write_crl(d / "certs", cert)
    reload_broker(proc)
    refused = link(mtls, "dev-s")
    with pytest.raises(CertificateRefused, match=r"client certificate .*: it is revoked"):
        refused.start(10)
    other = link(mtls, "dev-b")  # the others are unaffected
    other.start(10)
    other.stop()


def test_revoked_device_is_refused_while_running_and_afterwards(mtls, tmp_path):
    """`cahfp deploy revoke-device` + reload: the running client (still holding a valid-looking
    certificate and password) is disconnected, refused on reconnect, and exits 77 with one
    line; started again with the same bundle it is refused at once."""
    d, url, proc = mtls
    kept = tmp_path / "dev-r"  # what an attacker kept of the board's bundle
    shutil.copytree(d / "clients" / "dev-r", kept)
    env = {"CAHFP_CERT": str(kept / "client.crt"), "CAHFP_KEY": str(kept / "client.key")}
    log = tmp_path / "dev-r.log"
    running = spawn(*client_args(url, d, "dev-r", kept), env=env, log=log)
    try:
        end = time.monotonic() + 120
        while "ready" not in log.read_text() and time.monotonic() < end:
            assert running.poll() is None, log.read_text()
            time.sleep(0.3)
        assert "ready" in log.read_text()
        revoked = run_cli("deploy", "revoke-device", "--dir", str(d), "dev-r")
        assert revoked.returncode == 0 and "its password and certificate" in revoked.stdout
        reload_broker(proc)
        assert running.wait(30) == 77
    finally:
        kill_all([running])
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("it is revoked") == 2, text  # logged once, then the error line
    assert text.strip().splitlines()[-1].endswith("it is revoked")
    again = run_cli(*client_args(url, d, "dev-r", kept), env=env)
    one_error_line(again, 77, "it is revoked")


def test_federation_over_mutual_tls(mtls, fmnist_root, tmp_path):
    """The coordinator presents its bundle's certificate from the environment (as its unit
    does), the client through --cert/--key; one round completes."""
    d, url, _ = mtls
    cfg = write_config(tmp_path / "fed.toml", FED, 1, 1, fmnist_root)
    cb = d / "clients" / "coordinator"
    coord_env = {"CAHFP_CERT": str(cb / "client.crt"), "CAHFP_KEY": str(cb / "client.key")}
    b = d / "clients" / "dev-b"
    client = cli(
        *client_args(url, d, "dev-b"), "--cert", str(b / "client.crt"), "--key",
        str(b / "client.key"), "--until-finished", log=tmp_path / "dev-b.log",
    )  # fmt: skip
    coord = spawn(
        "coordinator", "--broker", url, "--ca", str(d / "certs" / "ca.crt"),
        "--credentials", str(cb / "credentials"), "--config", str(cfg),
        "--out", str(tmp_path / "run"), "--registration-timeout", "60",
        env=coord_env, log=tmp_path / "coordinator.log",
    )  # fmt: skip
    try:
        codes = finish([coord, client], timeout=240)
    finally:
        kill_all([coord, client])
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
    assert codes == [0, 0], logs
    assert [r["round"] for r in metrics(tmp_path / "run")] == [0, 1]


def test_tls12_refusal_and_untrusted_broker_are_one_line(mtls, tmp_path):
    """A TLS 1.2 client learns of the refusal in the handshake itself (not at its first read
    as with TLS 1.3); a wrong CA file on the client's side is not retried either."""
    d, url, _ = mtls
    for cert, text in ((True, "refused the client certificate"), (False, "requires a client")):
        lnk = link(mtls, "dev-b", cert=cert)
        lnk.client._ssl_context.maximum_version = ssl.TLSVersion.TLSv1_2  # paho's context
        if cert:  # a certificate of another CA
            pki.make_ca(tmp_path, "intruder")
            pki.issue(tmp_path, "dev-b", "dev-b", client=True)
            lnk.client._ssl_context.load_cert_chain(tmp_path / "dev-b.crt", tmp_path / "dev-b.key")
            lnk.cert_file = str(tmp_path / "dev-b.crt")
        with pytest.raises(CertificateRefused, match=text):
            lnk.start(10)
    b = d / "clients" / "dev-b"
    user, pw = read_credentials(b / "credentials")
    wrong_ca = MqttLink(
        url, "dev-b", username=user, password=pw, ca_file=str(tmp_path / "ca.crt"),
        cert_file=str(b / "client.crt"), key_file=str(b / "client.key"),
    )  # fmt: skip
    with pytest.raises(CertificateRefused, match="broker's certificate is not trusted"):
        wrong_ca.start(10)


def test_provisioned_board_uses_its_certificate(mtls, tmp_path):
    """provision-board.sh installs the certificate and key where client.env says, readable by
    the service's group only, and those installed files connect."""
    if os.geteuid() != 0:
        missing("provisioning into a throwaway root needs root (useradd --root)")
    d, url, _ = mtls
    root = tmp_path / "board"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", f).exists():
            shutil.copy(Path("/etc", f), root / "etc" / f)
    script = REPO / "deploy" / "provision" / "provision-board.sh"
    args = ["--bundle", str(d / "clients" / "dev-a"), "--platform", "pi", "--root", str(root)]
    done = subprocess.run(
        ["bash", str(script), *args, "--skip-install"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    etc = root / "etc" / "cahfp"
    env = dict(
        line.split("=", 1) for line in (etc / "client.env").read_text().splitlines() if "=" in line
    )
    assert (
        env["CAHFP_CERT"] == "/etc/cahfp/client.crt" and env["CAHFP_KEY"] == "/etc/cahfp/client.key"
    )
    gid = next(
        int(line.split(":")[2])
        for line in (root / "etc" / "group").read_text().splitlines()
        if line.startswith("cahfp:")
    )
    key = etc / "client.key"
    assert oct(key.stat().st_mode & 0o777) == "0o640" and key.stat().st_gid == gid
    assert (etc / "client.crt").stat().st_gid == gid
    installed = {k: str(root) + env[k] for k in ("CAHFP_CA", "CAHFP_CERT", "CAHFP_KEY")}
    lnk = MqttLink(
        url, "dev-a", username=env["CAHFP_MQTT_USERNAME"], password=env["CAHFP_MQTT_PASSWORD"],
        ca_file=installed["CAHFP_CA"], cert_file=installed["CAHFP_CERT"],
        key_file=installed["CAHFP_KEY"],
    )  # fmt: skip
    lnk.start(10)
    lnk.stop()
    dry = subprocess.run(
        ["bash", str(script), *args, "--skip-install", "--dry-run"], capture_output=True, text=True
    )
    assert "client.key (0640, group cahfp)" in dry.stdout


def test_init_again_with_client_certs_equips_existing_bundles(tmp_path):
    """A deployment made without certificates, then `init --client-certs`: the bundles still
    there (the coordinator's included) get a certificate, and the broker requires them."""
    if not shutil.which("mosquitto_passwd"):
        missing("mosquitto_passwd is not installed")
    d = tmp_path / "dep"
    bc.init(d, ["pi-1"], federation="x")
    assert not (d / "clients" / "coordinator" / "client.crt").exists()
    bc.init(d, ["pi-1"], federation="x", client_certs=True)
    for name in ("coordinator", "pi-1"):
        b = d / "clients" / name
        assert (b / "client.crt").is_file() and (b / "client.key").is_file()
        assert (b / "client.env").read_text().count("CAHFP_CERT=/etc/cahfp/client.crt\n") == 1
    assert "require_certificate true" in (d / "mosquitto.conf").read_text()
    bc.init(d, ["pi-1"], federation="x", client_certs=True)  # idempotent: nothing issued twice
    assert (d / "clients" / "pi-1" / "client.env").read_text().count("CAHFP_CERT=") == 1
