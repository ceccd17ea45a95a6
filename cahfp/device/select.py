"""Which torch device computes: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``--device``,
``train.device``). Training, scoring, evaluation, the statistics phase and calibration run on
it; data loading, random draws, transfers and aggregation stay on the CPU, so a CPU run is
bit-identical whatever the choice was when no GPU is present."""

from __future__ import annotations

import re

import torch
from torch import nn

from cahfp.errors import ConfigError, DeviceUnavailable

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str) -> str:
    """``spec`` if it names a device kind this project knows, else a one-line ``ConfigError``."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ConfigError(f"unknown device {spec!r}; use {DEVICE_CHOICES}")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names on this machine: ``auto`` is the current CUDA device when torch
    sees one, else the CPU. Asking for CUDA where there is none, or for an index beyond the
    devices present, raises ``DeviceUnavailable`` with one line saying what is there."""
    check_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise DeviceUnavailable(
            f"device {spec}: torch {torch.__version__} ({build}) sees no CUDA device here; "
            "use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= count:
        raise DeviceUnavailable(f"device {spec}: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (or, without any, its buffers) live; the CPU for neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
