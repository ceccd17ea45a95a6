"""An embedded default broker for the one-command demo and the tests: a private ``mosquitto``
process on a free loopback port with a generated config (with persistence, so a broker restart
keeps sessions), or, when mosquitto is not installed, amqtt running in-process. amqtt speaks
MQTT 3.1.1 only, is slower, and keeps retained messages across clients in ways mosquitto does
not: it is acceptable for this local demo only, never for a deployment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cahfp.errors import CAHFPError

log = logging.getLogger("cahfp.broker")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False


class EmbeddedBroker:
    def __init__(
        self,
        kind: str = "auto",
        port: int | None = None,
        workdir: str | None = None,
        max_packet: int = 8 << 20,
        bind: str = "127.0.0.1",
    ):
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise CAHFPError(f"unknown broker kind {kind!r} (mosquitto or amqtt)")
        self.kind, self.port, self.max_packet = kind, port or free_port(), max_packet
        self.bind = bind
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="cahfp-broker-"))
        self.proc: subprocess.Popen | None = None
        self._amqtt: tuple[asyncio.AbstractEventLoop, object, threading.Thread] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.bind}:{self.port}"

    @property
    def protocol(self) -> int:
        return 5 if self.kind == "mosquitto" else 4

    def config_text(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} {self.bind}",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {self.dir}/",
                "autosave_interval 1",
                f"max_packet_size {self.max_packet}",
                "max_queued_messages 100000",
                "max_inflight_messages 64",
                f"log_dest file {self.dir}/mosquitto.log",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
            ]
        )

    def start(self) -> EmbeddedBroker:
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_amqtt()
        log.info("embedded %s broker at %s", self.kind, self.url)
        return self

    def _start_mosquitto(self) -> None:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        if os.geteuid() == 0:  # mosquitto drops privileges to its own user: let it write here
            try:
                pw = pwd.getpwnam("mosquitto")
                for p in (self.dir, *self.dir.iterdir()):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            except KeyError:
                conf.write_text(self.config_text() + "user root\n")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if not wait_port(self.port, host=self.bind):
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""
            self.stop()
            raise CAHFPError(f"mosquitto did not start on port {self.port}: {err.strip()}")

    def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise CAHFPError(
                "no broker available: install mosquitto (apt-get install mosquitto)"
                " or the Python fallback (pip install amqtt)"
            ) from None
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.bind}:{self.port}",
                    "max_connections": 1000,
                }
            },
            "sys_interval": 0,
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
        loop = asyncio.new_event_loop()
        started = threading.Event()
        holder: dict = {}

        def run():
            asyncio.set_event_loop(loop)

            async def main():
                holder["broker"] = Broker(config, loop=loop)
                await holder["broker"].start()
                started.set()

            loop.run_until_complete(main())
            loop.run_forever()

        thread = threading.Thread(target=run, name="amqtt", daemon=True)
        thread.start()
        if not started.wait(15) or not wait_port(self.port, host=self.bind):
            raise CAHFPError(f"amqtt did not start on port {self.port}")
        self._amqtt = (loop, holder["broker"], thread)

    def kill(self) -> None:
        """Stop the broker abruptly (tests: a broker crash)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._amqtt:
            loop, broker, thread = self._amqtt
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            with contextlib.suppress(Exception):
                fut.result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            self._amqtt = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
