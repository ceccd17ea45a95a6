"""Mapping a (trained) compact submodel back into the global parameter space.

``reconstruct`` scatters each compact tensor into a copy of the current global tensor at the
kept indices; every other position keeps its global value, and a boolean mask of the global
shape marks the positions the client holds. On the wire an update is the compact tensors plus
the index map (``cahfp.wire``), never dense tensors padded with zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cahfp.errors import InvalidUpdate
from cahfp.pruning.extract import IndexMap, Submodel

State = Mapping[str, torch.Tensor]

STATISTICS = (".running_mean", ".running_var", ".num_batches_tracked")


def is_statistic(key: str) -> bool:
    """A BatchNorm running-statistics buffer: model state that training does not read (batches
    are normalised with their own statistics), so it may be left out of a transfer that does not
    need it (``cahfp.wire.encode_update(statistics=False)``)."""
    return key.endswith(STATISTICS)


@dataclass
class Update:
    """Global-shaped tensors and, for each, the boolean mask of positions the client covered."""

    state: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]


def scatter_(full: torch.Tensor, compact: torch.Tensor, dims: Mapping[int, torch.Tensor]):
    """Write ``compact`` into ``full`` at the kept indices ``dims`` (in place, vectorised)."""
    if not dims:
        full.copy_(compact)
        return full
    (dim, idx), *rest = sorted(dims.items())
    if rest:
        part = full.index_select(dim, idx)
        scatter_(part, compact, dict(rest))
        compact = part
    full.index_copy_(dim, idx, compact.to(full.dtype))
    return full


def expected_shape(shape: torch.Size, dims: Mapping[int, torch.Tensor]) -> tuple[int, ...]:
    return tuple(len(dims[d]) if d in dims else n for d, n in enumerate(shape))


def check_compact(
    compact: State, imap: IndexMap, global_state: State, statistics: bool = True
) -> None:
    """Raise ``InvalidUpdate`` naming the first problem: key sets, index ranges and order,
    shapes, dtypes, non-finite values. With ``statistics=False`` the BatchNorm running
    statistics may be absent (their index-map entries are still checked)."""
    missing = [k for k in global_state if k not in compact and (statistics or not is_statistic(k))]
    extra = [k for k in compact if k not in global_state]
    if missing or extra:
        raise InvalidUpdate(
            f"update keys differ from the global model: missing {missing[:5]}, unknown {extra[:5]}"
        )
    bad_map = [k for k in imap if k not in global_state]
    if bad_map:
        raise InvalidUpdate(f"index map names tensors the global model lacks: {bad_map[:5]}")
    for key, ref in global_state.items():
        dims = imap.get(key, {})
        for dim, idx in dims.items():
            if not 0 <= dim < ref.dim():
                raise InvalidUpdate(f"{key}: index map dimension {dim} out of range")
            if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
                raise InvalidUpdate(f"{key}: indices along dim {dim} must be a 1-D integer tensor")
            if len(idx) and (idx.min() < 0 or idx.max() >= ref.shape[dim]):
                raise InvalidUpdate(
                    f"{key}: index out of range along dim {dim} (size {ref.shape[dim]})"
                )
            if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise InvalidUpdate(f"{key}: indices along dim {dim} must be strictly increasing")
        if key not in compact:
            continue  # an omitted statistic (allowed above)
        t = compact[key]
        want = expected_shape(ref.shape, dims)
        if tuple(t.shape) != want:
            raise InvalidUpdate(
                f"{key}: shape {tuple(t.shape)} does not match {want} "
                f"(global {tuple(ref.shape)} sliced by the index map)"
            )
        if t.is_floating_point() != ref.is_floating_point():
            raise InvalidUpdate(f"{key}: dtype {t.dtype} incompatible with global {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidUpdate(f"{key}: contains NaN or infinite values")


def reconstruct_compact(compact: State, imap: IndexMap, global_state: State) -> Update:
    """Global-shaped update from compact tensors and their index map (validated first)."""
    check_compact(compact, imap, global_state)
    state, mask = {}, {}
    for key, ref in global_state.items():
        dims = imap.get(key, {})
        full = ref.detach().clone()
        scatter_(full, compact[key].detach(), dims)
        covered = torch.zeros(ref.shape, dtype=torch.bool)
        scatter_(covered, torch.ones(expected_shape(ref.shape, dims), dtype=torch.bool), dims)
        state[key], mask[key] = full, covered
    return Update(state, mask)


def reconstruct(sub: Submodel, global_state: State) -> Update:
    """The submodel's tensors in global shapes; positions it did not keep take the values of
    ``global_state``."""
    return reconstruct_compact(sub.module.state_dict(), sub.index_map, global_state)


def compact_from_update(
    update: Update, global_state: State
) -> tuple[dict[str, torch.Tensor], IndexMap]:
    """The compact tensors and index map a reconstructed update holds (the inverse of
    ``reconstruct_compact``). Raises ``InvalidUpdate`` when a tensor or mask is missing or
    mis-shaped, or a mask is not a selection of whole indices along each dimension."""
    compact: dict[str, torch.Tensor] = {}
    imap: IndexMap = {}
    for key, ref in global_state.items():
        t, m = update.state.get(key), update.mask.get(key)
        if t is None or m is None:
            raise InvalidUpdate(f"update lacks tensor {key}")
        if t.shape != ref.shape or m.shape != ref.shape or m.dtype != torch.bool:
            raise InvalidUpdate(f"{key}: update or mask shape differs from {tuple(ref.shape)}")
        dims = {}
        for d in range(m.dim()):
            others = [o for o in range(m.dim()) if o != d]
            kept = m.any(dim=others) if others else m
            if not bool(kept.all()):
                dims[d] = torch.nonzero(kept).flatten()
        sliced = t
        for d, idx in sorted(dims.items()):
            sliced = sliced.index_select(d, idx)
        covered = m
        for d, idx in sorted(dims.items()):
            covered = covered.index_select(d, idx)
        if not bool(covered.all()) or int(m.sum()) != covered.numel():
            raise InvalidUpdate(f"{key}: mask is not a selection of whole channels")
        compact[key] = sliced
        if dims:
            imap[key] = dims
    return compact, imap
