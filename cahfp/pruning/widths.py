"""Nested widths (FjORD's ordered dropout): the first ``ceil(p * size)`` channels of every
group, and a model of width ``p`` run as ``narrow()`` views of a wider one, so that a step at
width ``p`` trains the wider model's parameters in place.

A width ``p`` is a fraction of every group's channels (FjORD's ``int(np.ceil(width * p))``); a
keep is a fraction of dense training FLOPs. ``width_for_keep`` converts one into the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from cahfp.errors import BudgetInfeasible
from cahfp.pruning.extract import IndexMap, build_compact, index_map_for
from cahfp.pruning.groups import GroupSet
from cahfp.pruning.plan import CostModel

_EPS = 1e-9


def prefix_counts(groups: GroupSet, p: float) -> dict[int, int]:
    """Channels of every group at width ``p`` (at least one)."""
    if not 0 < p <= 1:
        raise ValueError(f"a width must be in (0, 1], got {p}")
    return {g.gid: max(1, math.ceil(p * g.size - _EPS)) for g in groups}


def prefix_index(groups: GroupSet, p: float) -> dict[int, torch.Tensor]:
    """The kept channels of every group at width ``p``: its first ones."""
    return {gid: torch.arange(n) for gid, n in prefix_counts(groups, p).items()}


def flops_fraction(groups: GroupSet, p: float) -> float:
    """Training FLOPs of width ``p`` over the dense model's."""
    cost = CostModel.flops(groups)
    return cost.total(prefix_counts(groups, p)) / cost.dense


def width_for_keep(groups: GroupSet, keep: float, resolution: int = 256) -> float:
    """The widest width (a multiple of ``1 / resolution``) whose training FLOPs fit ``keep``
    (``BudgetInfeasible`` when none does)."""
    if keep >= 1:
        return 1.0
    if flops_fraction(groups, 1 / resolution) > keep + _EPS:
        raise BudgetInfeasible(
            f"keep {keep:g} is below the FLOPs of the narrowest width "
            f"({flops_fraction(groups, 1 / resolution):.3f})"
        )
    lo, hi = 1, resolution  # flops_fraction is monotone in the width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if flops_fraction(groups, mid / resolution) <= keep + _EPS:
            lo = mid
        else:
            hi = mid - 1
    return lo / resolution


class NestedWidths:
    """Run ``module`` (whose groups are ``groups``, found on ``module`` itself) at narrower
    widths. ``counts[gid]`` channels of each group form the narrower model; its parameters are
    ``narrow()`` views of ``module``'s (gradients land in the leading slice of each), and its
    BatchNorm running statistics are views too, so a step in train mode updates the leading
    slice of ``module``'s buffers in place."""

    def __init__(self, module: nn.Module, groups: GroupSet):
        self.module = module
        self.groups = groups
        self._skeletons: dict[tuple, tuple[nn.Module, IndexMap]] = {}

    def _skeleton(self, counts: dict[int, int]) -> tuple[nn.Module, IndexMap]:
        key = tuple(sorted(counts.items()))
        if key not in self._skeletons:
            keep = {gid: torch.arange(n) for gid, n in counts.items()}
            imap = index_map_for(self.module, self.groups, keep)
            for key_, dims in imap.items():
                for dim, idx in dims.items():
                    if not torch.equal(idx, torch.arange(len(idx))):
                        raise ValueError(
                            f"{key_}: the first channels of its groups are not its first "
                            f"indices along dim {dim} (a concatenation): no nested width"
                        )
            self._skeletons[key] = (build_compact(self.module, imap).to("meta"), imap)
        return self._skeletons[key]

    def views(self, counts: dict[int, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The narrower model's structure and its tensors as views of ``module``'s."""
        skeleton, imap = self._skeleton(counts)
        tensors = {}
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            for dim, idx in sorted(imap.get(name, {}).items()):
                t = t.narrow(dim, 0, len(idx))
            tensors[name] = t
        return skeleton, tensors

    def __call__(self, counts: dict[int, int], x: torch.Tensor) -> torch.Tensor:
        """The output of the narrower model with ``counts`` channels per group on ``x``."""
        skeleton, tensors = self.views(counts)
        skeleton.train(self.module.training)
        return functional_call(skeleton, tensors, (x,), strict=True)
