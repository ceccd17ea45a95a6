"""An emulated edge testbed on one Linux machine (root only).

Every client process gets its own network namespace, joined to a bridge on the host by a veth
pair with a ``tc`` token-bucket (tbf) rate limit in both directions from its device profile,
and its own cgroup (v1 or v2, whichever the host has) with the profile's CPU quota and memory
limit. The broker (a private mosquitto listening on the bridge address) and the coordinator run
outside. Clients start with ``--profile auto``: they measure the slice they are in (the
cgroup-aware profiler and calibration) and choose their keep fractions themselves.

Everything (processes, namespaces, veth pairs, the bridge, cgroups) is removed on exit, on an
error, and on Ctrl-C or SIGTERM.

    cahfp testbed --profiles raspberry-pi-4:2,raspberry-pi-5:1,jetson-nano:1 --rounds 5
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cahfp.config import Config
from cahfp.errors import CAHFPError
from deploy.demo import client_command
from device_profiles import DeviceProfile, load_profile

log = logging.getLogger("cahfp.testbed")
ALIASES = {
    "pi4": "raspberry-pi-4",
    "pi5": "raspberry-pi-5",
    "nano": "jetson-nano",
    "orin": "jetson-orin-nano",
    "server": "x86-server",
}
CG = Path("/sys/fs/cgroup")


class TestbedError(CAHFPError):
    """The testbed cannot run here (not root, no netns/tc/cgroups)."""


def parse_profiles(spec: str) -> list[DeviceProfile]:
    """``pi4:2,raspberry-pi-5:1,/path/board.toml:1`` -> one profile per client."""
    out = []
    for item in spec.split(","):
        name, _, count = item.strip().rpartition(":")
        if not name:
            name, count = count, "1"
        if not count.isdigit() or int(count) < 1:
            raise TestbedError(f"bad profile count in {item!r} (NAME:COUNT)")
        out += [load_profile(ALIASES.get(name, name))] * int(count)
    return out


def cgroup_version() -> int:
    return 2 if (CG / "cgroup.controllers").exists() else 1


@dataclass
class Slot:
    index: int
    profile: DeviceProfile
    name: str = ""
    ip: str = ""
    cgroups: list[Path] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def netns(self) -> str:
        return f"cahfp-tb{self.index}"

    @property
    def veth_host(self) -> str:
        return f"cahfp-h{self.index}"

    @property
    def veth_ns(self) -> str:
        return f"cahfp-n{self.index}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


class Testbed:
    BRIDGE = "cahfp-tbbr"

    def __init__(self, profiles: list[DeviceProfile], subnet: str = "10.77.0"):
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, tc, cgroups)")
        for tool in ("ip", "tc"):
            if not sh("which", tool, check=False).stdout.strip():
                raise TestbedError(f"{tool} not found (apt-get install iproute2)")
        self.subnet = subnet
        self.host_ip = f"{subnet}.1"
        self.slots = [
            Slot(i, p, name=f"tb-{i}-{p.name}", ip=f"{subnet}.{10 + i}")
            for i, p in enumerate(profiles)
        ]
        self.cg_version = cgroup_version()

    # ------------------------------------------------------------------ network

    def _network(self) -> None:
        sh("ip", "link", "add", self.BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.BRIDGE)
        sh("ip", "link", "set", self.BRIDGE, "up")
        for s in self.slots:
            rate = f"{s.profile.emulation.bandwidth_mbps}mbit"
            sh("ip", "netns", "add", s.netns)
            sh("ip", "link", "add", s.veth_host, "type", "veth", "peer", "name", s.veth_ns)
            sh("ip", "link", "set", s.veth_ns, "netns", s.netns)
            sh("ip", "link", "set", s.veth_host, "master", self.BRIDGE)
            sh("ip", "link", "set", s.veth_host, "up")
            ns = ("ip", "netns", "exec", s.netns)
            sh(*ns, "ip", "addr", "add", f"{s.ip}/24", "dev", s.veth_ns)
            sh(*ns, "ip", "link", "set", s.veth_ns, "up")
            sh(*ns, "ip", "link", "set", "lo", "up")
            # uplink (the client's egress) and downlink (the host side's egress)
            tbf = ("root", "tbf", "rate", rate, "burst", "64kb", "latency", "400ms")
            sh(*ns, "tc", "qdisc", "add", "dev", s.veth_ns, *tbf)
            sh("tc", "qdisc", "add", "dev", s.veth_host, *tbf)

    # ------------------------------------------------------------------ cgroups

    def _cgroups(self) -> None:
        for s in self.slots:
            quota = s.profile.emulation.cpu_quota
            mem = s.profile.emulation.memory_limit_mb << 20
            name = f"cahfp-{s.netns}"
            if self.cg_version == 2:
                for ctrl in ("+cpu", "+memory"):
                    sh("sh", "-c", f"echo {ctrl} > {CG}/cgroup.subtree_control", check=False)
                d = CG / name
                d.mkdir(exist_ok=True)
                (d / "cpu.max").write_text(f"{int(quota * 100000)} 100000\n")
                (d / "memory.max").write_text(f"{mem}\n")
                s.cgroups = [d]
            else:
                cpu, memory = CG / "cpu" / name, CG / "memory" / name
                cpu.mkdir(exist_ok=True)
                memory.mkdir(exist_ok=True)
                (cpu / "cpu.cfs_period_us").write_text("100000\n")
                (cpu / "cpu.cfs_quota_us").write_text(f"{int(quota * 100000)}\n")
                (memory / "memory.limit_in_bytes").write_text(f"{mem}\n")
                s.cgroups = [cpu, memory]

    # ------------------------------------------------------------------ processes

    def start_clients(
        self, url: str, cfg: Config, extra: list[str], log_dir: Path | None = None
    ) -> None:
        """Start one client per slot; each one's output goes to ``log_dir/NAME.log``."""
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        for s in self.slots:
            procs_files = " ".join(str(c / "cgroup.procs") for c in s.cgroups)
            inner = client_command(
                cfg, url, s.name, s.index, len(self.slots), "auto", "--until-finished", *extra
            )
            # The shell moves itself into the cgroups, then becomes the client in the netns.
            # nsenter, not `ip netns exec`: the latter remounts /sys, which hides
            # /sys/fs/cgroup, and the client could no longer measure its own limits.
            script = (
                f'for f in {procs_files}; do echo $$ > "$f"; done; exec nsenter '
                f'--net=/var/run/netns/{s.netns} "$@"'
            )
            out = open(log_dir / f"{s.name}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            try:
                s.proc = subprocess.Popen(
                    ["sh", "-c", script, "sh", *inner],
                    cwd=Path.cwd(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                if log_dir:
                    out.close()

    def setup(self) -> None:
        self.teardown(quiet=True)  # leftovers of an earlier, killed run
        try:
            self._network()
            self._cgroups()
        except Exception:
            self.teardown(quiet=True)
            raise

    def teardown(self, quiet: bool = False) -> None:
        for s in self.slots:
            if s.proc and s.proc.poll() is None:
                try:
                    os.killpg(s.proc.pid, signal.SIGTERM)
                    s.proc.wait(10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(s.proc.pid, signal.SIGKILL)
        for s in self.slots:
            sh("ip", "netns", "del", s.netns, check=False)  # also removes its veth end
            sh("ip", "link", "del", s.veth_host, check=False)
        sh("ip", "link", "del", self.BRIDGE, check=False)
        for s in self.slots:
            cgs = s.cgroups or (
                [CG / f"cahfp-{s.netns}"]
                if self.cg_version == 2
                else [CG / "cpu" / f"cahfp-{s.netns}", CG / "memory" / f"cahfp-{s.netns}"]
            )
            for c in cgs:
                for _ in range(20):
                    try:
                        if c.exists():
                            c.rmdir()
                        break
                    except OSError:  # processes still leaving
                        time.sleep(0.1)
        if not quiet:
            log.info("testbed torn down")

    def leftovers(self) -> list[str]:
        """Anything of this testbed still present (for checks)."""
        found = []
        netns = sh("ip", "netns", "list", check=False).stdout
        links = sh("ip", "-o", "link", "show", check=False).stdout
        for s in self.slots:
            if s.netns in netns:
                found.append(f"netns {s.netns}")
            if f" {s.veth_host}@" in links or f" {s.veth_host}:" in links:
                found.append(f"link {s.veth_host}")
            found += [f"cgroup {c}" for c in s.cgroups if c.exists()]
        if f" {self.BRIDGE}:" in links:
            found.append(f"bridge {self.BRIDGE}")
        return found


def run_testbed(
    profiles: list[DeviceProfile], cfg: Config, out: Path | None, quiet: bool = True
) -> tuple[dict, list[dict]]:
    """Set up, run a federation of ``len(profiles)`` clients, tear down. Returns the run
    summary and a per-client report."""
    from rich.console import Console

    from coordinator.broker import EmbeddedBroker
    from coordinator.service import Coordinator
    from coordinator.view import ProgressView

    bed = Testbed(profiles)
    broker = None

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        bed.setup()
        broker = EmbeddedBroker("mosquitto", bind=bed.host_ip).start()
        log_dir = out / "clients" if out else None
        bed.start_clients(broker.url, cfg, ["--threads", "1"], log_dir)
        view = ProgressView(cfg, Console(stderr=True), quiet)
        coord = Coordinator(cfg, broker.url, out, on_event=view.event)
        try:
            summary = coord.run(registration_timeout=300)
        finally:
            view.stop()
        report = []
        for s in bed.slots:
            reg = coord.transport.registry.get(s.name)
            prof = (reg.hello.profile if reg and reg.hello else {}) or {}
            cal = prof.get("calibration", {})
            dev = prof.get("device", {})
            outs = [
                c for r in coord.records if r.round > 0 for c in r.clients if c.client_id == s.name
            ]
            report.append(
                {
                    "client": s.name,
                    "profile": s.profile.name,
                    "cpu_quota": s.profile.emulation.cpu_quota,
                    "memory_mb": s.profile.emulation.memory_limit_mb,
                    "bandwidth_mbps": s.profile.emulation.bandwidth_mbps,
                    "measured_cores": dev.get("usable_cores"),
                    "measured_memory_mb": (dev.get("usable_memory") or 0) / 2**20,
                    "ms_per_sample": cal.get("seconds_per_sample", 0) * 1e3,
                    "keeps": [c.keep_target for c in outs],
                    "statuses": [c.status for c in outs],
                    "round_seconds": [c.train_seconds + c.score_seconds for c in outs],
                }
            )
        return summary, report
    finally:
        signal.signal(signal.SIGTERM, previous)
        bed.teardown()
        if broker is not None:
            broker.stop()
