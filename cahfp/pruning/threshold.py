"""Threshold plans (FIARSE, Wu et al., NeurIPS 2024): keep the channels whose importance passes a
threshold, the smallest threshold whose plan fits the training-FLOPs budget.

A channel's importance is the mean ``|w|`` over the weights and biases of every Conv/Linear that
produces it (``channel_scores``: FIARSE's per-element magnitude, averaged over the channel's
producing elements). ``threshold_plan`` keeps, in every group, the channels whose importance is
at least the threshold ``theta``, and at least its top ``ceil(floor x size)`` channels whatever
``theta`` (``pruning.floor``; without it a layer can vanish), choosing ``theta`` by bisection
over the sorted importances (a plan's cost only falls as ``theta`` rises):

* ``global`` (FIARSE's ``generate_mask``): one ``theta`` for all groups;
* ``layerwise`` (FIARSE's ``layer_wise_generate_mask``): the same kept fraction of every group,
  the largest that fits, and ``theta`` of a group = the importance of its last kept channel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cahfp.errors import BudgetInfeasible
from cahfp.pruning.groups import OUT, GroupSet, param_dims
from cahfp.pruning.plan import CostModel, Plan, _feed_every_producer, _floor, _ranking

_EPS = 1e-9


def producing_tensors(module: nn.Module, groups: GroupSet):
    """For every group: ``(tensor name, channel dim, member idxs, member roots)`` of the weight
    and bias of each Conv/Linear producing its channels (its ``out`` members that are not
    BatchNorm)."""
    modules = dict(module.named_modules())
    out = {}
    for g in groups:
        tensors = []
        for mem in g.members:
            m = modules[mem.module]
            if mem.role != OUT or isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            for pname, dim in param_dims(m, OUT):
                key = f"{mem.module}.{pname}" if mem.module else pname
                tensors.append((key, dim, mem.idxs, mem.root))
        out[g.gid] = tensors
    return out


def mean_magnitude(tensors: dict[str, torch.Tensor], producing, size: int) -> torch.Tensor:
    """Mean ``|w|`` of each of a group's ``size`` channels over its ``producing`` tensors
    (``producing_tensors``' entry; ``tensors`` by name), on their device. Differentiable in
    ``tensors``."""
    dev = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    total = torch.zeros(size, dtype=torch.float64, device=dev)
    count = torch.zeros(size, dtype=torch.float64, device=dev)
    for key, dim, idxs, root in producing:
        w = tensors[key].abs().movedim(dim, 0)
        per = w.reshape(w.shape[0], -1)
        root = root.to(dev)
        total = total.index_add(0, root, per[idxs.to(dev)].sum(1).double())
        width = torch.full((len(idxs),), float(per.shape[1]), dtype=torch.float64, device=dev)
        count = count.index_add(0, root, width)
    return total / count.clamp(min=1)


def channel_scores(model: nn.Module, groups: GroupSet) -> dict[int, torch.Tensor]:
    """Every channel's importance: mean ``|w|`` over its producing weights and biases."""
    tensors = {k: v.detach() for k, v in model.named_parameters()}
    producing = producing_tensors(model, groups)
    return {g.gid: mean_magnitude(tensors, producing[g.gid], g.size).cpu() for g in groups}


def threshold_plan(
    model: nn.Module,
    groups: GroupSet,
    keep: float,
    floor: float = 0.1,
    layerwise: bool = False,
    scores: dict[int, torch.Tensor] | None = None,
) -> tuple[Plan, dict[str, float]]:
    """The plan of the smallest threshold(s) whose training FLOPs are at most ``keep`` of the
    dense model's, and the threshold of every group (by its root layer's name). ``scores``:
    per-channel importances (default ``channel_scores``)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = scores if scores is not None else channel_scores(model, groups)
    cost = CostModel.flops(groups)
    budget = keep * cost.dense * (1 + _EPS)
    order = {g.gid: _ranking(scores[g.gid]) for g in groups}
    minimum = {g.gid: _floor(g.size, floor, 1) for g in groups}
    if cost.total(minimum) > budget:
        raise BudgetInfeasible(
            f"keep {keep:.3f} of dense training FLOPs is below the smallest threshold plan "
            f"({cost.total(minimum) / cost.dense:.3f} with every layer at its floor of "
            f"{floor:.0%} of its channels)"
        )
    if layerwise:
        counts, thetas = _layerwise(groups, scores, order, minimum, cost, budget)
    else:
        counts, thetas = _global(groups, scores, minimum, cost, budget)
    kept = {
        g.gid: _feed_every_producer(
            g, torch.sort(order[g.gid][: counts[g.gid]]).values, scores[g.gid]
        )
        for g in groups
    }
    plan = Plan(
        groups,
        kept,
        keep,
        cost.total(counts) / cost.dense,
        "uniform" if layerwise else "global",
        "threshold",
    )
    params = CostModel.params(groups)
    plan.param_fraction = params.total(counts) / params.dense
    return plan, {g.name: thetas[g.gid] for g in groups}


def _global(groups, scores, minimum, cost, budget):
    """One threshold: the smallest channel importance whose plan fits."""

    def counts_at(theta: float) -> dict[int, int]:
        return {g.gid: max(minimum[g.gid], int((scores[g.gid] >= theta).sum())) for g in groups}

    candidates = torch.unique(torch.cat([scores[g.gid] for g in groups]))  # ascending
    lo, hi = 0, len(candidates) - 1  # the largest candidate keeps only the floors: it fits
    while lo < hi:
        mid = (lo + hi) // 2
        if cost.total(counts_at(float(candidates[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    theta = float(candidates[lo])
    return counts_at(theta), {g.gid: theta for g in groups}


def _layerwise(groups, scores, order, minimum, cost, budget):
    """One kept fraction for every group, the largest that fits; a group's threshold is the
    importance of its last channel within that fraction."""

    def top(g, f: float) -> int:
        return max(1, math.ceil(f * g.size - _EPS))

    def counts_at(f: float) -> dict[int, int]:
        return {g.gid: max(minimum[g.gid], top(g, f)) for g in groups}

    fractions = sorted({k / g.size for g in groups for k in range(1, g.size + 1)})
    lo, hi = 0, len(fractions) - 1  # the smallest fraction keeps one channel: the floors
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.total(counts_at(fractions[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    f = fractions[lo]
    thetas = {g.gid: float(scores[g.gid][order[g.gid][top(g, f) - 1]]) for g in groups}
    return counts_at(f), thetas


__all__ = ["channel_scores", "mean_magnitude", "producing_tensors", "threshold_plan"]
