"""Per-channel side tensors that travel with a payload as extras named ``<kind>/<group root>``:
the federation's ``coverage`` and ``anchor`` (coordinator -> client, with the dense model) and a
client's normalised channel ``score`` (client -> coordinator, with its update). One check for
both directions: everything from the network is validated in full before it is used."""

from __future__ import annotations

import torch

from cahfp.errors import InvalidUpdate
from cahfp.pruning.groups import GroupSet


def checked_sides(
    groups: GroupSet,
    extras: dict[str, torch.Tensor],
    kind: str,
    dtype: torch.dtype | None = None,
    max_mean: float | None = None,
) -> dict[int, torch.Tensor] | None:
    """The ``kind`` side tensors of ``extras`` by group id, or None when there are none. Every
    group's must be present, of shape ``(group size,)``, floating point (exactly ``dtype`` when
    given) and finite, and (``max_mean``) their mean magnitude over all channels at most that;
    else ``InvalidUpdate`` names the group and the problem."""
    if not any(k.startswith(kind + "/") for k in extras):
        return None
    out = {}
    for g in groups:
        v = extras.get(f"{kind}/{g.name}")
        wanted = str(dtype).removeprefix("torch.") if dtype is not None else "floating point"
        if (
            v is None
            or v.shape != (g.size,)
            or not v.dtype.is_floating_point
            or (dtype is not None and v.dtype != dtype)
        ):
            raise InvalidUpdate(
                f"{kind} side tensor for channel group {g.name} is missing, mis-shaped or not "
                f"{wanted}"
            )
        if not torch.isfinite(v).all():
            raise InvalidUpdate(f"{kind} side tensor for channel group {g.name} is not finite")
        out[g.gid] = v
    if max_mean is not None:
        total = sum(float(s.abs().sum(dtype=torch.float64)) for s in out.values())
        if total > max_mean * 1.001 * groups.num_channels:
            raise InvalidUpdate(
                f"{kind} side tensors are not normalised: mean magnitude "
                f"{total / groups.num_channels:.3g}, expected at most {max_mean:g}"
            )
    return out
