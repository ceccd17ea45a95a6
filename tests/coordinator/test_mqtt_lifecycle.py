"""The coordinator's life over a real broker, run as an operator runs it (``python -m cahfp.cli
coordinator``): stopping it, resuming it, boards that come and go, a board that floods."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time

import pytest

from cahfp.mqtt.link import MqttLink
from cahfp.mqtt.protocol import Hello, Presence, Status, Topics, parse_json
from deploy.broker.embedded import EmbeddedBroker
from tests.mqtt_helpers import (
    client,
    coordinator,
    finish,
    kill_all,
    logs,
    metrics,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


class MuteBoard:
    """A board that announces itself like a real client (presence online, hello) and records
    the tasks it is sent, but never answers them."""

    def __init__(self, url: str, fed: str, cid: str = "mute"):
        self.topics, self.cid = Topics(fed), cid
        offline = Presence(client_id=cid, status="offline").model_dump_json().encode()
        self.link = MqttLink(url, cid, will=(self.topics.presence(cid), offline, 1, True))
        self.link.subscribe(self.topics.task(cid), 1)
        self.offline = offline

    def start(self) -> MuteBoard:
        self.link.start(10)
        online = Presence(client_id=self.cid, status="online").model_dump_json()
        self.link.publish(self.topics.presence(self.cid), online, 1, True)
        hello = Hello(client_id=self.cid, samples=100).model_dump_json()
        self.link.publish(self.topics.hello(self.cid), hello, 1, True).wait_for_publish(5)
        return self

    def tasks(self) -> int:
        n = 0
        while self.link.get(0.0) is not None:
            n += 1
        self._seen = getattr(self, "_seen", 0) + n
        return self._seen

    def stop(self) -> None:
        """A clean stop, as the agent does it: presence offline (retained), hello left."""
        self.link.stop(final=[(self.topics.presence(self.cid), self.offline, True)])


def retained_status(url: str, fed: str) -> Status:
    link = MqttLink(url, f"peek-{time.monotonic_ns()}")
    link.subscribe(Topics(fed).status, 1)
    link.start(10)
    try:
        msg = link.get(5.0)
        assert msg is not None, "no retained status"
        return parse_json(Status, msg.payload)
    finally:
        link.stop()


def small_client(url: str, fed: str, cid: str, data_dir, tmp_path, index: int = 0, *extra: str):
    """A real client with about 100 local images (one share of two), so rounds take seconds."""
    return client(
        url, fed, cid, index, 2, data_dir, tmp_path / f"{cid}.log", *extra, train_samples=200
    )


def checkpoint_round(run) -> int:
    path = run / "checkpoint" / "state.json"
    return json.loads(path.read_text())["round"] if path.is_file() else 0


def test_sigterm_stops_a_waiting_coordinator_within_seconds(broker, fmnist_root, tmp_path):
    """Item 18: with a 600 s deadline and a selected board that never answers, SIGTERM ends the
    coordinator within seconds (exit 0); the completed rounds stay and a --resume continues."""
    name = "sigterm"
    config = write_config(tmp_path / "s.toml", name, 4, 1, fmnist_root, deadline=600.0)
    run = tmp_path / name
    c0 = small_client(broker.url, name, "c0", fmnist_root, tmp_path)
    coord = coordinator(broker.url, config, run, tmp_path / "coordinator.log")
    procs = [c0, coord]
    mute = None
    try:
        wait_for(lambda: checkpoint_round(run) >= 1, 180, "round 1")
        mute = MuteBoard(broker.url, name).start()
        wait_for(mute.tasks, 120, "a task for the mute board")
        time.sleep(2.0)  # the coordinator now waits on the mute board (deadline 600 s)
        done = checkpoint_round(run)
        t0 = time.monotonic()
        os.killpg(coord.pid, signal.SIGTERM)
        code = coord.wait(30)
        took = time.monotonic() - t0
        assert code == 0, logs(tmp_path)
        assert took < 10, f"the coordinator took {took:.1f} s to stop"
        m = metrics(run)
        assert [r["round"] for r in m] == list(range(done + 1))  # the abandoned round: absent
        assert checkpoint_round(run) == done
        status = retained_status(broker.url, name)
        assert (status.state, status.round) == ("stopped", done), status
        assert "stopped" in (tmp_path / "coordinator.log").read_text()
        mute.stop()  # gone for good: a resumed coordinator must not wait for it
        mute = None
        coord2 = coordinator(broker.url, config, run, tmp_path / "coordinator2.log", "--resume")
        procs.append(coord2)
        codes = finish([coord2, c0], timeout=300)
    finally:
        kill_all(procs)
        if mute:
            mute.stop()
    assert codes == [0, 0], logs(tmp_path)
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3, 4]
    assert all(r["aggregated"] == 1 and not r["skipped"] for r in m[1:]), m
    assert f"resuming after round {done}" in (tmp_path / "coordinator2.log").read_text()


def test_a_new_run_under_the_same_name_ignores_the_old_runs_status(broker, fmnist_root, tmp_path):
    """Item 7: after a federation finished, a new coordinator run (and a --resume of it) under
    the same name gets --until-finished clients that started after the old 'finished' status:
    they take part instead of exiting at once. Item 14: a board that stopped cleanly (its
    retained hello stays) is never selected, so no round waits for it."""
    name = "again"
    config = write_config(tmp_path / "a.toml", name, 1, 1, fmnist_root, deadline=600.0)
    first = small_client(broker.url, name, "c0", fmnist_root, tmp_path)
    coord = coordinator(broker.url, config, tmp_path / "run1", tmp_path / "coordinator1.log")
    procs = [first, coord]
    try:
        assert finish([coord, first], timeout=240) == [0, 0], logs(tmp_path)
        old = retained_status(broker.url, name)
        assert old.state == "finished" and old.run
        MuteBoard(broker.url, name).start().stop()  # retained hello, presence offline
        config2 = write_config(tmp_path / "b.toml", name, 4, 1, fmnist_root, deadline=600.0)
        run = tmp_path / "run2"
        late = small_client(broker.url, name, "c1", fmnist_root, tmp_path, 1)
        procs.append(late)
        time.sleep(8)  # it has read the old run's retained 'finished' by now
        assert late.poll() is None, logs(tmp_path)
        coord2 = coordinator(broker.url, config2, run, tmp_path / "coordinator2.log")
        procs.append(coord2)
        wait_for(lambda: checkpoint_round(run) >= 2, 240, "round 2 of the new run")
        os.killpg(coord2.pid, signal.SIGTERM)
        assert coord2.wait(30) == 0, logs(tmp_path)
        stopped = retained_status(broker.url, name)
        assert stopped.state == "stopped" and stopped.run not in (None, old.run)
        newcomer = small_client(broker.url, name, "c2", fmnist_root, tmp_path)
        procs.append(newcomer)
        time.sleep(8)  # it has read the interrupted run's retained 'stopped'
        # it waits for both (else round 4 may start before the newcomer's hello arrives)
        coord3 = coordinator(
            broker.url, config2, run, tmp_path / "coordinator3.log", "--resume",
            "--set", "federation.clients=2",
        )  # fmt: skip
        procs.append(coord3)
        codes = finish([coord3, late, newcomer], timeout=300)
    finally:
        kill_all(procs)
    assert codes == [0, 0, 0], logs(tmp_path)
    assert retained_status(broker.url, name).run == stopped.run  # the resumed run kept its id
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3, 4]
    taken = {c["client_id"] for r in m[1:] for c in r["clients"] if c["status"] == "ok"}
    assert taken == {"c1", "c2"}, m
    selected = {c["client_id"] for r in m[1:] for c in r["clients"]}
    assert "mute" not in selected, m
    assert all(r["seconds"] < 120 for r in m[1:]), [r["seconds"] for r in m]


class PasswordBroker(EmbeddedBroker):
    """The test broker with a password file (no ACL), so a board can be revoked by a reload."""

    def config_text(self) -> str:
        return (
            super()
            .config_text()
            .replace(
                "allow_anonymous true", f"allow_anonymous false\npassword_file {self.dir}/passwords"
            )
        )

    def passwd(self, flag: str, *args: str) -> None:
        """``-b USER PASSWORD`` adds a user, ``-D USER`` removes one."""
        cmd = ["mosquitto_passwd", flag, str(self.dir / "passwords"), *args]
        subprocess.run(cmd, check=True, capture_output=True)
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam("mosquitto")
            os.chown(self.dir / "passwords", pw.pw_uid, pw.pw_gid)


def test_a_revoked_board_is_dropped_without_waiting_for_the_deadline(fmnist_root, tmp_path):
    """Item 14: a board revoked at a broker reload loses its connection without a last will; its
    presence stops being refreshed and the coordinator stops selecting it (and gives up on its
    task) instead of waiting out the 600 s deadline round after round."""
    if not shutil.which("mosquitto_passwd"):
        pytest.fail("mosquitto_passwd is not installed (apt-get install mosquitto)")
    broker = PasswordBroker("mosquitto")
    broker.dir.joinpath("passwords").write_text("")
    for user in ("coordinator", "c0", "dev"):
        broker.passwd("-b", user, f"pw-{user}")
        (tmp_path / f"{user}.cred").write_text(f"{user}:pw-{user}\n")
    broker.start()
    name = "revoke"
    config = write_config(tmp_path / "r.toml", name, 3, 2, fmnist_root, deadline=600.0)
    run = tmp_path / name
    fast = ("--presence-every", "1")
    procs = [
        small_client(
            broker.url,
            name,
            "c0",
            fmnist_root,
            tmp_path,
            0,
            *fast,
            "--credentials",
            str(tmp_path / "c0.cred"),
        ),
        small_client(
            broker.url,
            name,
            "dev",
            fmnist_root,
            tmp_path,
            1,
            *fast,
            "--credentials",
            str(tmp_path / "dev.cred"),
        ),
    ]
    try:
        coord = coordinator(
            broker.url,
            config,
            run,
            tmp_path / "coordinator.log",
            "--credentials",
            str(tmp_path / "coordinator.cred"),
        )
        procs.append(coord)
        wait_for(lambda: checkpoint_round(run) >= 1, 240, "round 1")
        broker.passwd("-D", "dev")
        os.kill(broker.proc.pid, signal.SIGHUP)  # the reload ends dev's session, no last will
        codes = finish([coord, procs[0]], timeout=240)
    finally:
        kill_all(procs)
        broker.stop()
    assert codes == [0, 0], logs(tmp_path)
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3]
    assert {c["client_id"]: c["status"] for c in m[1]["clients"]} == {"c0": "ok", "dev": "ok"}
    for r in m[2:]:
        assert [c["status"] for c in r["clients"] if c["client_id"] == "c0"] == ["ok"], r
        assert r["seconds"] < 60, r  # not the 600 s deadline


def flood(url: str, topic: str, until, seconds: float = 60.0, count: int = 200_000) -> dict:
    """Publish 256 KiB of junk on ``topic`` as fast as paho sends (QoS 0, loopback) until
    ``until()`` holds, ``seconds`` pass or ``count`` messages went out."""
    import paho.mqtt.client as mqtt

    f = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
    host, port = url.removeprefix("mqtt://").split(":")
    f.connect(host, int(port))
    f.loop_start()
    junk, n, t0 = os.urandom(1 << 18), 0, time.monotonic()
    try:
        while n < count and time.monotonic() - t0 < seconds and not (n % 64 == 0 and until()):
            f.publish(topic, junk, qos=0)
            n += 1
    finally:
        f.disconnect()
        f.loop_stop()
    took = time.monotonic() - t0
    return {"messages": n, "seconds": took, "mb_per_s": n * len(junk) / took / 1e6}


def test_a_flooding_device_does_not_lose_the_final_status(broker, fmnist_root, tmp_path):
    """Item 15: a device publishing junk on its own update data topic at full speed, until the
    federation has ended, neither fills the coordinator's inbox (its bytes beyond its round
    budget are dropped on arrival) nor costs the final status: the retained status is
    'finished' (not the last will's 'connection lost') and --until-finished clients exit."""
    name = "flood"
    config = write_config(tmp_path / "f.toml", name, 3, 1, fmnist_root, deadline=60.0)
    run = tmp_path / name
    c0 = small_client(broker.url, name, "c0", fmnist_root, tmp_path)
    coord = coordinator(broker.url, config, run, tmp_path / "coordinator.log")
    try:
        wait_for(lambda: checkpoint_round(run) >= 1, 240, "round 1")
        sent = flood(
            broker.url, Topics(name).update_data("flooder"), lambda: coord.poll() is not None
        )
        codes = finish([coord, c0], timeout=120)
    finally:
        kill_all([coord, c0])
    assert sent["messages"] > 1000, sent  # a flood: hundreds of MB/s on loopback
    assert codes == [0, 0], logs(tmp_path) + f"\n{sent}"
    status = retained_status(broker.url, name)
    assert (status.state, status.round) == ("finished", 3), (status, sent)
    m = metrics(run)
    assert [r["round"] for r in m] == [0, 1, 2, 3]
    assert all(r["aggregated"] == 1 for r in m[1:]), m
    dropped = sum(r["transport"].get("over_budget_mb", {}).get("flooder", 0) for r in m)
    assert dropped > 100, [r["transport"] for r in m]
    assert all(r["transport"]["inbox_peak_on_disk_mb"] == 0 for r in m[1:]), m
