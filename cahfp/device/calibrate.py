"""A short calibration (about 1-3 s): time real training steps of the actual global model, dense
and pruned to a quarter of its FLOPs, on a synthetic batch of the real input shape, and measure
the activation memory per sample (the tensors autograd saves for backward) and the dense model's
training FLOPs per sample (so that the throughput is known). Results are cached
per model, batch size, thread count, torch version, CPU limits (cgroup quota, affinity) and the
compute device (a GPU by its name)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cahfp.costs import training_flops
from cahfp.data.paths import default_data_dir
from cahfp.device.budget import Calibration
from cahfp.device.measure import read_cgroup_limits
from cahfp.messages import ModelSpec
from cahfp.pruning import extract, make_plan, score_groups

SMALL_KEEP = 0.25


def cache_file() -> Path:
    return default_data_dir().parent / "calibration.json"


def _key(spec: ModelSpec, batch: int, device: torch.device) -> str:
    # what the process may use, too: two clients in different cgroups on one host (the testbed)
    # must not share a measurement
    limits = read_cgroup_limits()
    gpu = [str(device), torch.cuda.get_device_name(device)] if device.type == "cuda" else []
    raw = json.dumps(
        [
            *gpu,
            spec.model_dump(),
            batch,
            torch.get_num_threads(),
            torch.__version__,
            os.uname().nodename,
            limits.cpu_quota,
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        ]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _time_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float
) -> tuple[float, float]:
    """Seconds per sample of SGD steps (after one warm-up step): wall-clock and this process's
    CPU time (the clock an emulated board keeps, see ``cahfp.device.budget.device_budget``).
    On a GPU the clock waits for the device's queued work before it is read."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def sync():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    step()
    sync()
    steps, start, cpu = 0, time.perf_counter(), time.process_time()
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
        sync()
    n = steps * len(x)
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            ptr = t.untyped_storage().data_ptr()
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def calibrate(
    spec: ModelSpec,
    batch_size: int,
    seconds: float = 0.5,
    use_cache: bool = True,
    device: torch.device | None = None,
) -> Calibration:
    """Measure (or read the cached measurement of) ``spec``'s training on ``device`` (the CPU
    by default), where the client trains."""
    from cahfp.client_round import architecture

    device = device or torch.device("cpu")
    key = _key(spec, batch_size, device)
    path = cache_file()
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text()).get(key)
            # else measured before FLOPs and CPU time were
            if cached and cached.get("flops_per_sample", 0) > 0 and cached.get("cpu_seconds"):
                return Calibration(**cached)
        except (json.JSONDecodeError, TypeError):
            pass
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = architecture(spec)
        model.load_state_dict(model.state_dict())  # materialise
        model.to(device)
        x = torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size)
        y = torch.randint(0, spec.num_classes, (batch_size,))
        x, y = x.to(device), y.to(device)
        dense, dense_cpu = _time_steps(model, x, y, seconds)
        scores = score_groups(model, None, "ordered", example_input=x[:2])
        small = extract(model, make_plan(model, scores, SMALL_KEEP, allocation="uniform"))
        small_sps, small_cpu = _time_steps(small.module, x, y, seconds)
        acts = activation_bytes(model, x) / batch_size
        flops = training_flops(model, x[:1])
    cal = Calibration(
        seconds_per_sample=dense,
        seconds_per_sample_small=small_sps,
        small_keep=SMALL_KEEP,
        activation_bytes_per_sample=acts,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        state_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        flops_per_sample=flops,
        cpu_seconds=(dense_cpu, small_cpu),
    )
    if use_cache:
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            data = {}
        data[key] = asdict(cal)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    return cal
