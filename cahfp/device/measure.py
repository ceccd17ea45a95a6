"""What this device has: CPU, memory, load, temperature, battery, accelerator, and the limits of
the cgroup the process runs in (which psutil does not see), so that a client in a container or
a testbed slice measures what it really has."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CgroupLimits:
    version: int | None = None  # 1, 2 or None (not found)
    cpu_quota: float | None = None  # in cores (quota / period); None = unlimited
    memory_limit: int | None = None  # bytes; None = unlimited
    path: str = ""


@dataclass
class DeviceInfo:
    hostname: str
    machine: str
    logical_cores: int
    physical_cores: int | None
    cpu_freq_mhz: float | None
    memory_total: int
    memory_available: int
    load_1m: float | None
    temperature_c: float | None
    battery_percent: float | None
    on_power: bool | None
    accelerator: str | None
    cgroup: CgroupLimits = field(default_factory=CgroupLimits)

    @property
    def usable_cores(self) -> float:
        """Cores this process may use: the affinity mask, capped by the cgroup CPU quota."""
        try:
            cores = float(len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            cores = float(self.logical_cores)
        if self.cgroup.cpu_quota is not None:
            cores = min(cores, self.cgroup.cpu_quota)
        return cores

    @property
    def usable_memory(self) -> int:
        """Bytes this process can count on: available memory, capped by the cgroup limit."""
        mem = self.memory_available
        if self.cgroup.memory_limit is not None:
            used = _cgroup_memory_usage(self.cgroup)
            mem = min(mem, max(self.cgroup.memory_limit - used, 0))
        return mem

    def to_dict(self) -> dict:
        d = asdict(self)
        d["usable_cores"] = self.usable_cores
        d["usable_memory"] = self.usable_memory
        return d


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller -> path from ``/proc/self/cgroup`` (``""`` is the v2 unified hierarchy)."""
    out = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for c in controllers.split(","):
            out[c] = path
    return out


def read_cgroup_limits(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> CgroupLimits:
    """CPU quota and memory limit of this process's cgroup, v2 or v1. ``root`` and
    ``proc_cgroup`` (the text of /proc/self/cgroup) can point at fake files for tests."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    paths = _own_cgroup_paths(proc_cgroup)
    if (root / "cgroup.controllers").exists():  # v2
        rel = paths.get("", "/").lstrip("/")
        limits = CgroupLimits(version=2, path=str(root / rel))
        # the effective limit is the tightest one on the way up to the root
        node = root / rel
        while True:
            cpu = _read(node / "cpu.max")
            if cpu and not cpu.startswith("max"):
                quota, period = (float(x) for x in cpu.split()[:2])
                limits.cpu_quota = _min(limits.cpu_quota, quota / period)
            mem = _read(node / "memory.max")
            if mem and mem != "max":
                limits.memory_limit = _min(limits.memory_limit, int(mem))
            if node == root or root not in node.parents:
                break
            node = node.parent
        return limits
    cpu_dir = root / "cpu" / paths.get("cpu", "/").lstrip("/")
    if not cpu_dir.exists():
        cpu_dir = root / "cpu,cpuacct" / paths.get("cpu", "/").lstrip("/")
    mem_dir = root / "memory" / paths.get("memory", "/").lstrip("/")
    if not cpu_dir.exists() and not mem_dir.exists():
        return CgroupLimits()
    limits = CgroupLimits(version=1, path=str(cpu_dir))
    quota, period = _read(cpu_dir / "cpu.cfs_quota_us"), _read(cpu_dir / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        limits.cpu_quota = int(quota) / int(period)
    mem = _read(mem_dir / "memory.limit_in_bytes")
    if mem and int(mem) < (1 << 62):  # v1 reports "no limit" as a huge number
        limits.memory_limit = int(mem)
    return limits


def _cgroup_memory_usage(limits: CgroupLimits) -> int:
    base = Path(limits.path)
    for candidate in (
        base / "memory.current",
        base.parent.parent / "memory" / base.name / "memory.usage_in_bytes",
    ):
        value = _read(candidate)
        if value and value.isdigit():
            return int(value)
    return 0


def _min(a, b):
    return b if a is None else min(a, b)


def accelerators() -> list[dict]:
    """Every CUDA device torch sees: index, name, memory in bytes (an integrated GPU's, e.g. a
    Jetson's, is the board's memory, shared with the CPU) and compute capability."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "device": f"cuda:{i}",
                "name": p.name,
                "memory_bytes": int(p.total_memory),
                "integrated": bool(getattr(p, "is_integrated", False)),
                "capability": f"{p.major}.{p.minor}",
            }
        )
    return out


def training_memory(info: DeviceInfo, device) -> int:
    """Bytes the training on ``device`` (a ``torch.device``) may use: the usable host memory
    on the CPU and on an integrated GPU (a Jetson's unified memory, counted once), the free
    memory of a discrete GPU."""
    import torch

    if device.type != "cuda":
        return info.usable_memory
    if getattr(torch.cuda.get_device_properties(device), "is_integrated", False):
        return info.usable_memory
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def accelerator() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def measure_device() -> DeviceInfo:
    freq = psutil.cpu_freq()
    mem = psutil.virtual_memory()
    temp = None
    try:
        temps = psutil.sensors_temperatures()
        readings = [t.current for entries in temps.values() for t in entries if t.current]
        temp = max(readings) if readings else None
    except (AttributeError, OSError):
        pass
    battery = None
    with contextlib.suppress(AttributeError, OSError):
        battery = psutil.sensors_battery()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return DeviceInfo(
        hostname=platform.node(),
        machine=platform.machine(),
        logical_cores=psutil.cpu_count(logical=True) or 1,
        physical_cores=psutil.cpu_count(logical=False),
        cpu_freq_mhz=freq.current if freq else None,
        memory_total=mem.total,
        memory_available=mem.available,
        load_1m=load,
        temperature_c=temp,
        battery_percent=battery.percent if battery else None,
        on_power=battery.power_plugged if battery else None,
        accelerator=accelerator(),
        cgroup=read_cgroup_limits(),
    )
