"""Choosing which channels to keep under a training-FLOPs budget.

The FLOPs of every Conv/Linear are measured once on the dense model with FlopCounterMode; a
layer's FLOPs scale with the fraction of its input and output channels kept (one factor for a
depthwise layer), which is exact for what the counter measures.

* ``global`` allocation: start dense and repeatedly remove the block of channels with the lowest
  score per FLOP saved, across all layers, until the budget is met; then add back the best
  blocks that still fit. Blocks are 8 channels wide where a layer has 16 or more (onnxruntime
  keeps its speed-up on multiples of 8), single channels otherwise. Every layer keeps at least
  ``floor`` of its channels.
* ``uniform`` allocation: the same channel fraction in every layer up to rounding: the same
  greedy removal, always taking the block from the layer that keeps the largest fraction.

Within a layer the highest-scored channels are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cahfp.errors import BudgetInfeasible, UnknownName
from cahfp.pruning.groups import IN, OUT, GroupSet, find_groups
from cahfp.pruning.scores import Scores

ALLOCATIONS = ("global", "uniform")


@dataclass
class Plan:
    """Kept channel indices (sorted) of every group, and the training-FLOPs fraction they cost."""

    groups: GroupSet
    keep: dict[int, torch.Tensor]
    target: float
    flops_fraction: float
    allocation: str

    def counts(self) -> dict[int, int]:
        return {gid: len(idx) for gid, idx in self.keep.items()}

    @property
    def channel_fraction(self) -> float:
        return sum(self.counts().values()) / max(self.groups.num_channels, 1)


class FlopModel:
    """Training FLOPs per sample as a function of each group's kept channel count."""

    def __init__(self, groups: GroupSet):
        self.groups = groups
        self.dense = groups.total_flops
        self.size = {g.gid: g.size for g in groups}
        # For each (module, role) channel dim: [(gid, share of the dim that gid controls)].
        shares: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for g in groups:
            for m in g.members:
                n_dim = groups.dim_sizes.get((m.module, m.role))
                if n_dim:
                    shares.setdefault((m.module, m.role), []).append((g.gid, len(m.idxs) / n_dim))
        self.terms: list[tuple[float, list[list[tuple[int, float]]]]] = []
        self.fixed = 0.0
        self.by_group: dict[int, list[int]] = {g.gid: [] for g in groups}
        for module, flops in groups.flops.items():
            roles = [OUT] if module in groups.depthwise else [OUT, IN]
            dims = [shares[(module, r)] for r in roles if (module, r) in shares]
            if not dims:
                self.fixed += flops
                continue
            self.terms.append((flops, dims))
            for gid in {gid for d in dims for gid, _ in d}:
                self.by_group[gid].append(len(self.terms) - 1)

    def _term(self, i: int, counts: dict[int, int]) -> float:
        flops, dims = self.terms[i]
        for dim in dims:
            flops *= 1.0 - sum(share * (1 - counts[gid] / self.size[gid]) for gid, share in dim)
        return flops

    def total(self, counts: dict[int, int]) -> float:
        return self.fixed + sum(self._term(i, counts) for i in range(len(self.terms)))

    def delta(self, gid: int, counts: dict[int, int], new: int) -> float:
        """FLOPs saved by changing group ``gid`` to ``new`` channels."""
        changed = {**counts, gid: new}
        return sum(self._term(i, counts) - self._term(i, changed) for i in self.by_group[gid])


def make_plan(
    model: nn.Module,
    scores: Scores,
    keep: float,
    example_input: torch.Tensor | None = None,
    allocation: str = "global",
    floor: float = 0.1,
    multiple: int = 8,
) -> Plan:
    """Keep the channels ``scores`` rank highest so that training FLOPs are at most ``keep`` of
    the dense model's (and, after rounding, not far below)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if allocation not in ALLOCATIONS:
        raise UnknownName(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    groups = scores.groups
    if example_input is not None:
        groups = find_groups(model, example_input, scores.groups.ignored)
    for g in groups:
        v = scores.values[g.gid]
        if v.shape != (g.size,) or not torch.isfinite(v).all():
            raise ValueError(f"scores for group {g.name} are missing, mis-sized or not finite")
    fm = FlopModel(groups)
    budget = keep * fm.dense
    order = {g.gid: _ranking(scores.values[g.gid]) for g in groups}
    minimum = {g.gid: _floor(g.size, floor, multiple) for g in groups}
    if fm.total(minimum) > budget * (1 + 1e-9):
        raise BudgetInfeasible(
            f"keep {keep:.3f} is below the smallest plan this model allows "
            f"({fm.total(minimum) / fm.dense:.3f} of dense training FLOPs with every layer at "
            f"its floor of {floor:.0%} of its channels)"
        )
    if allocation == "global":

        def drop_key(g, k, new, saved, finishing):
            lost = float(scores.values[g.gid][order[g.gid][new:k]].sum())
            return lost if finishing else lost / saved  # last step: least score lost

        def add_key(g, k, new, cost):  # score regained per FLOP spent
            return float(scores.values[g.gid][order[g.gid][k:new]].sum()) / max(cost, 1e-12)
    else:

        def drop_key(g, k, new, saved, finishing):
            # from the layer left with the largest fraction; last step: least overshoot
            return (saved,) if finishing else (-new / g.size, -saved)

        def add_key(g, k, new, cost):  # to the layer with the smallest fraction
            return (-k / g.size, -cost)

    counts = {g.gid: g.size for g in groups}
    counts = _greedy(groups, fm, minimum, counts, budget, multiple, drop_key)
    counts = _fill(groups, fm, counts, budget, multiple, add_key)
    kept = {g.gid: torch.sort(order[g.gid][: counts[g.gid]]).values for g in groups}
    return Plan(groups, kept, keep, fm.total(counts) / fm.dense, allocation)


def _ranking(values: torch.Tensor) -> torch.Tensor:
    """Channel indices from most to least important (ties: lower index first)."""
    idx = torch.arange(len(values))
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return idx[order]


def _floor(size: int, floor: float, multiple: int) -> int:
    n = max(1, math.ceil(floor * size))
    if size >= 2 * multiple:
        n = min(size, math.ceil(n / multiple) * multiple)
    return n


def _step_down(size: int, k: int, multiple: int) -> int:
    """Next smaller allowed channel count below ``k``."""
    if size < 2 * multiple or multiple <= 1:
        return k - 1
    return (k - 1) // multiple * multiple


def _step_up(size: int, k: int, multiple: int) -> int:
    if size < 2 * multiple or multiple <= 1:
        return k + 1
    return min(size, (k // multiple + 1) * multiple)


def _greedy(groups, fm, minimum, counts, budget, multiple, key) -> dict[int, int]:
    """Remove the block with the smallest ``key`` until the FLOPs fit the budget. Once some
    removal would meet the budget, choose only among those (``key(..., finishing=True)``)."""
    counts = dict(counts)
    total = fm.total(counts)
    while total > budget * (1 + 1e-9):
        steps = []
        for g in groups:
            k = counts[g.gid]
            new = max(_step_down(g.size, k, multiple), minimum[g.gid])
            if new >= k:
                continue
            saved = fm.delta(g.gid, counts, new)
            if saved > 0:
                steps.append((g, k, new, saved))
        if not steps:
            break
        finishing = [st for st in steps if total - st[3] <= budget * (1 + 1e-9)]
        pool = finishing or steps
        _, gid, new, saved = min(
            (key(g, k, new, saved, bool(finishing)), g.gid, new, saved) for g, k, new, saved in pool
        )
        counts[gid] = new
        total -= saved
    return counts


def _fill(groups, fm, counts, budget, multiple, key) -> dict[int, int]:
    """Add back the removed blocks with the largest ``key`` that still fit the budget."""
    counts = dict(counts)
    total = fm.total(counts)
    while True:
        best = None
        for g in groups:
            k = counts[g.gid]
            if k >= g.size:
                continue
            new = _step_up(g.size, k, multiple)
            cost = -fm.delta(g.gid, counts, new)
            if total + cost > budget * (1 + 1e-9):
                continue
            cand = (key(g, k, new, cost), -g.gid, new, cost)
            if best is None or cand[:2] > best[:2]:
                best = cand
        if best is None:
            return counts
        _, neg_gid, new, cost = best
        counts[-neg_gid] = new
        total += cost
