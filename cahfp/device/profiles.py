"""Board profiles: the schema and the loader of the TOML files shipped in the ``device_profiles``
data package (read through ``importlib.resources``, so they are found in any install)."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cahfp.errors import CAHFPError, UnknownName

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_PACKAGE = "device_profiles"
SOURCE_KINDS = ("datasheet:", "published benchmark:", "assumption:")
FIGURES = ("cores", "memory_mb", "accelerator", "relative_speed", "uplink_mbps", "emulation")
# The reference machine's dense training throughput that ``relative_speed`` multiplies: the
# 2-core build machine of this project measures 120-260 GFLOP/s on the CPU-sized models as its
# shared host's speed drifts; the profiles' sources were written against about 200.
REFERENCE_FLOPS_PER_SECOND = 200e9


class Emulation(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    cpu_quota: float = Field(gt=0, description="cores of the reference machine")
    memory_limit_mb: int = Field(gt=0)
    bandwidth_mbps: float = Field(gt=0)


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    description: str
    cores: int = Field(ge=1)
    memory_mb: int = Field(gt=0)
    accelerator: str
    relative_speed: float = Field(gt=0, description="training throughput vs the reference")
    uplink_mbps: float = Field(gt=0)
    emulation: Emulation
    sources: dict[str, str]

    @model_validator(mode="after")
    def _every_figure_has_a_source(self) -> DeviceProfile:
        for key in FIGURES:
            src = self.sources.get(key, "")
            if not src.startswith(SOURCE_KINDS):
                raise ValueError(f"sources.{key} must start with one of {SOURCE_KINDS}")
        return self

    @property
    def memory_bytes(self) -> int:
        return self.emulation.memory_limit_mb << 20

    @property
    def uplink_bytes_per_s(self) -> float:
        return self.uplink_mbps * 1e6 / 8

    @property
    def flops_per_second(self) -> float:
        """The board's dense training throughput."""
        return self.relative_speed * REFERENCE_FLOPS_PER_SECOND

    def time_scale(self, host_flops_per_second: float = 0.0) -> float:
        """Board seconds per second measured on this host, for emulation: the host's measured
        throughput over the board's, so that an emulated board runs at its profile's speed
        whatever this host's speed is at the moment (a shared host drifts by 2x). Without a
        measurement, ``1 / relative_speed`` (this host taken as the reference machine)."""
        if host_flops_per_second > 0:
            return host_flops_per_second / self.flops_per_second
        return 1.0 / self.relative_speed


def _shipped() -> Traversable:
    return files(PROFILE_PACKAGE)


def profile_names() -> list[str]:
    """The names of the shipped profiles (their file names without ``.toml``)."""
    return sorted(p.name[: -len(".toml")] for p in _shipped().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (a shipped file) or by path."""
    path: Traversable = Path(name_or_path)
    if not path.suffix:
        path = _shipped() / f"{name_or_path}.toml"
    if not path.is_file():
        raise UnknownName(
            f"unknown device profile {name_or_path!r}; known: {', '.join(profile_names())}"
        )
    try:
        return DeviceProfile.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CAHFPError(f"device profile {path} is invalid: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise CAHFPError(f"device profile {path} is invalid: {problems}") from None
