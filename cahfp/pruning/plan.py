"""Choosing which channels to keep under a training-FLOPs budget.

The FLOPs of every Conv/Linear are measured once on the dense model with FlopCounterMode; a
layer's FLOPs scale with the fraction of its input and output channels kept (one factor for a
depthwise layer), which is exact for what the counter measures.

Channels are removed in *blocks*: 8 channels where a layer has 32 or more (onnxruntime keeps
its speed-up on multiples of 8), single channels in narrower layers; every layer keeps at least
``floor`` of its channels. Starting dense, the planner repeatedly removes one block until the
budget is met, then adds back the best blocks that still fit. On the last removal it chooses
among the removals that meet the budget and land within ``slack`` (0.03) of it (else the one
that overshoots least) the one that costs least. Where whole blocks are too coarse to land
within ``slack`` of the budget, a fill step adds back blocks of half, a quarter, ... of
``multiple`` channels until the plan does (or single channels fit no more).

*Which layer* gives up the next block is the allocation:

* ``global``: the block whose removal costs the least score per FLOP saved, across all layers;
* ``uniform``: the layer that keeps the largest fraction of its channels (the same fraction in
  every layer up to rounding).

*Which channels* form the block, and what removing them costs, is the objective:

* ranked (any scores): the lowest-scored remaining channels; cost = the sum of their scores;
* joint (curvature scores that carry their per-sample terms, see ``Scores.directional``): the
  second-order loss increase of removing the whole set S, ``-g.1_S + 1/2 1_S' F 1_S`` with the
  empirical Fisher F over *all* channels, so cross terms between channels removed together
  (within and across layers) are counted. The block is the channels of the layer with the
  smallest marginal increase given what is already removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cahfp.errors import BudgetInfeasible, UnknownName
from cahfp.pruning.groups import IN, OUT, ChannelGroup, GroupSet, find_groups
from cahfp.pruning.options import PlanOptions
from cahfp.pruning.scores import Scores

ALLOCATIONS = ("global", "uniform")
GRADIENT_MODES = ("signed", "absolute", "off")


@dataclass
class Plan:
    """Kept channel indices (sorted) of every group, and the training-FLOPs fraction they cost."""

    groups: GroupSet
    kept: dict[int, torch.Tensor]  # group id -> kept channel indices (sorted)
    target: float
    flops_fraction: float
    allocation: str
    objective: str = "ranked"
    param_fraction: float | None = None  # kept parameters / dense parameters

    def counts(self) -> dict[int, int]:
        return {gid: len(idx) for gid, idx in self.kept.items()}


class CostModel:
    """A cost (training FLOPs per sample, or parameters) as a function of each group's kept
    channel count: every term scales with the kept fraction of each channel dimension it
    depends on."""

    def __init__(self, groups: GroupSet, terms: list[tuple[str, float, tuple[str, ...]]]):
        """``terms``: (module, dense cost, the roles - ``out``/``in`` - it scales with)."""
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
        for module, cost, roles in terms:
            dims = [shares[(module, r)] for r in roles if (module, r) in shares]
            if not dims:
                self.fixed += cost
                continue
            self.terms.append((cost, dims))
            for gid in {gid for d in dims for gid, _ in d}:
                self.by_group[gid].append(len(self.terms) - 1)
        self.dense = self.fixed + sum(c for c, _ in self.terms)

    @classmethod
    def flops(cls, groups: GroupSet) -> CostModel:
        return cls(
            groups,
            [
                (m, f, (OUT,) if m in groups.depthwise else (OUT, IN))
                for m, f in groups.flops.items()
            ],
        )

    @classmethod
    def params(cls, groups: GroupSet) -> CostModel:
        terms = []
        for m, (full, per_channel) in groups.params.items():
            terms.append((m, full, (OUT,) if m in groups.depthwise else (OUT, IN)))
            terms.append((m, per_channel, (OUT,)))
        return cls(groups, terms)

    def _term(self, i: int, counts: dict[int, int]) -> float:
        cost, dims = self.terms[i]
        for dim in dims:
            cost *= 1.0 - sum(share * (1 - counts[gid] / self.size[gid]) for gid, share in dim)
        return cost

    def total(self, counts: dict[int, int]) -> float:
        return self.fixed + sum(self._term(i, counts) for i in range(len(self.terms)))

    def delta(self, gid: int, counts: dict[int, int], new: int) -> float:
        """Cost saved by changing group ``gid`` to ``new`` channels."""
        changed = {**counts, gid: new}
        return sum(self._term(i, counts) - self._term(i, changed) for i in self.by_group[gid])


def make_plan(
    model: nn.Module,
    scores: Scores,
    keep: float,
    options: PlanOptions | None = None,
    *,
    example_input: torch.Tensor | None = None,
    slack: float = 0.03,
    coverage: dict[int, torch.Tensor] | None = None,
    anchor: dict[int, torch.Tensor] | None = None,
    seed: int = 0,
    param_keep: float | None = None,
    rotation_step: int = 0,
    **knobs,
) -> Plan:
    """Keep the channels ``scores`` rank highest so that training FLOPs are at most ``keep`` of
    the dense model's (and, after rounding, not far below), and, with ``param_keep``, the
    parameters (what an update carries) at most that fraction of the dense model's.
    ``options`` (``PlanOptions``; ``knobs`` override its fields, e.g. ``allocation="uniform"``)
    hold the planning knobs: with ``interactions`` and curvature scores that carry per-sample
    terms, channels are chosen jointly (see module docstring); with ``anchor`` (federation-wide
    channel scores in units of the typical channel score, see ``normalised_scores``) a
    channel's value becomes ``(1 - anchor_weight) * local + anchor_weight * anchor * scale``;
    ``coverage`` is priced by ``coverage_weight``, Gumbel noise by ``temperature`` (``seed``);
    with ``rotation`` > 0 that share of each group's kept channels is a window at position
    ``rotation_step`` through the channels the plan would drop (``rotate``)."""
    opts = (options or PlanOptions()).but(**knobs)
    allocation, floor, multiple = opts.allocation, opts.floor, opts.multiple
    interactions, gradient = opts.interactions, opts.gradient
    coverage_weight, temperature, anchor_weight = (
        opts.coverage_weight,
        opts.temperature,
        opts.anchor_weight,
    )
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if allocation not in ALLOCATIONS:
        raise UnknownName(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    groups = scores.groups
    if example_input is not None:
        groups = find_groups(model, example_input, scores.groups.ignored)
    for g in groups:
        v = scores.values.get(g.gid)
        if v is None or v.shape != (g.size,) or not torch.isfinite(v).all():
            raise ValueError(f"scores for group {g.name} are missing, mis-sized or not finite")
    fm = CostModel.flops(groups)
    models = [(fm, keep * fm.dense)]
    if param_keep is not None:
        if not 0 < param_keep <= 1:
            raise ValueError(f"param_keep must be in (0, 1], got {param_keep}")
        pm = CostModel.params(groups)
        models.append((pm, param_keep * pm.dense))
    minimum = {g.gid: _floor(g.size, floor, multiple) for g in groups}
    for cm, budget in models:
        if cm.total(minimum) > budget * (1 + 1e-9):
            what = "training FLOPs" if cm is fm else "parameters"
            raise BudgetInfeasible(
                f"keep {budget / cm.dense:.3f} of dense {what} is below the smallest plan this "
                f"model allows ({cm.total(minimum) / cm.dense:.3f} with every layer at its "
                f"floor of {floor:.0%} of its channels)"
            )
    joint = interactions and scores.directional is not None
    if gradient not in GRADIENT_MODES:
        raise UnknownName(f"unknown gradient mode {gradient!r}; known: {GRADIENT_MODES}")
    objective = (
        JointObjective(groups, scores, gradient) if joint else RankedObjective(groups, scores)
    )
    bonus = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    if coverage is not None and coverage_weight > 0:
        cb = coverage_bonus(groups, coverage, coverage_weight * objective.scale)
        bonus = {gid: bonus[gid] + cb[gid] for gid in bonus}
    if anchor is not None and anchor_weight > 0:
        scale = float(scores.flat().abs().mean())
        for g in groups:
            a = anchor.get(g.gid)
            if a is None or a.shape != (g.size,) or not torch.isfinite(a).all():
                raise ValueError(f"anchor scores for group {g.name} are missing or mis-sized")
            local = scores.values[g.gid]
            bonus[g.gid] += anchor_weight * (a.to(torch.float64) * scale - local)
    if temperature > 0:  # Gumbel perturbation: sample plans, more likely the better ones
        gen = torch.Generator().manual_seed(seed)
        for g in groups:
            u = torch.rand(g.size, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            bonus[g.gid] += temperature * objective.scale * -torch.log(-torch.log(u))
    if any(bool(b.any()) for b in bonus.values()):
        objective.set_bonus(bonus)
    counts = {g.gid: g.size for g in groups}
    totals = [cm.total(counts) for cm, _ in models]

    def fits(tot) -> list[bool]:
        return [t <= b * (1 + 1e-9) for t, (_, b) in zip(tot, models, strict=True)]

    # Remove blocks until every budget is met. A step's saving counts the budgets still
    # violated, each relative to its dense total.
    while not all(fits(totals)):
        ok = fits(totals)
        steps = []
        for g in groups:
            k = counts[g.gid]
            new = max(_step_down(g.size, k, multiple), minimum[g.gid])
            if new >= k:
                continue
            saved = [cm.delta(g.gid, counts, new) for cm, _ in models]
            gain = sum(
                s / cm.dense for s, (cm, _), o in zip(saved, models, ok, strict=True) if not o
            )
            if gain > 0:
                block, cost = objective.drop(g, k - new)
                steps.append((g, new, saved, gain, block, cost))
        if not steps:
            break
        after = {id(st): [t - s for t, s in zip(totals, st[2], strict=True)] for st in steps}
        finishing = [st for st in steps if all(fits(after[id(st)]))]
        # A last step that lands far below the FLOPs budget wastes it: prefer those that land
        # within ``slack`` of it, else the one that overshoots least.
        close = [st for st in finishing if after[id(st)][0] >= models[0][1] - slack * fm.dense]
        if finishing and not close:
            finishing = [max(finishing, key=lambda st: after[id(st)][0])]
        elif close:
            finishing = close

        def key(st, finishing=bool(finishing)):
            g, new, saved, gain, _, cost = st
            if finishing:  # last step: least loss (global) or least overshoot (uniform)
                return (cost if allocation == "global" else saved[0], g.gid)
            if allocation == "global":
                return (cost / gain, g.gid)
            return (-new / g.size, -gain, g.gid)

        g, new, saved, _, block, _ = min(finishing or steps, key=key)
        objective.remove(g, block)
        counts[g.gid] = new
        totals = [t - s for t, s in zip(totals, saved, strict=True)]

    def add_back(step_up) -> None:
        """Add blocks (``step_up(group, count)`` gives the next count) while one fits every
        budget: the best value per FLOP (global) or to the narrowest layer (uniform)."""
        nonlocal totals
        while True:
            adds = []
            for g in groups:
                k = counts[g.gid]
                if k >= g.size:
                    continue
                new = step_up(g, k)
                costs = [-cm.delta(g.gid, counts, new) for cm, _ in models]
                if all(fits([t + c for t, c in zip(totals, costs, strict=True)])):
                    block, gain = objective.restore(g, new - k)
                    adds.append((g, new, costs, block, gain))
            if not adds:
                return
            if allocation == "global":
                g, new, costs, block, _ = max(
                    adds, key=lambda a: (a[4] / max(a[2][0] / fm.dense, 1e-12), -a[0].gid)
                )
            else:
                g, new, costs, block, _ = max(
                    adds, key=lambda a: (-counts[a[0].gid] / a[0].size, -a[2][0], -a[0].gid)
                )
            objective.add(g, block)
            counts[g.gid] = new
            totals = [t + c for t, c in zip(totals, costs, strict=True)]

    # Add back what still fits every budget.
    add_back(lambda g, k: _step_up(g.size, k, multiple))
    # Fill: where whole blocks are too coarse to land within ``slack`` of the FLOPs budget,
    # add blocks of half, a quarter, ... of ``multiple`` channels to the blocked layers.
    fine = multiple // 2
    while fine >= 1 and totals[0] < models[0][1] - slack * fm.dense:
        add_back(
            lambda g, k, fine=fine: (
                min(g.size, (k // fine + 1) * fine) if _blocked(g.size, multiple) else k + 1
            )
        )
        fine //= 2
    kept = {g.gid: objective.kept(g) for g in groups}
    if opts.rotation > 0:
        kept = {
            g.gid: rotate(kept[g.gid], g.size, scores.values[g.gid], opts.rotation, rotation_step)
            for g in groups
        }
    kept = {g.gid: _feed_every_producer(g, kept[g.gid], scores.values[g.gid]) for g in groups}
    assert all(len(kept[g.gid]) == counts[g.gid] for g in groups)
    plan = Plan(
        groups, kept, keep, fm.total(counts) / fm.dense, allocation, "joint" if joint else "ranked"
    )
    plan.param_fraction = CostModel.params(groups).total(counts) / CostModel.params(groups).dense
    return plan


def rotate(
    kept: torch.Tensor, size: int, values: torch.Tensor, share: float, step: int
) -> torch.Tensor:
    """Coverage-aware rotation of one group's ``kept`` channels (of ``size``): the best
    ``1 - share`` of them by ``values`` stay (the core); the other ``r = floor(share * kept)``
    slots take the window ``[step * r, step * r + r)`` (cyclic) of the remaining channels in
    index order. The count, and so the plan's cost, is unchanged. While the core holds, the
    windows of ``ceil((size - kept + r) / r)`` successive steps cover every channel, so a client
    that steps once per refresh trains all of them within that many refreshes."""
    r = int(share * len(kept))
    if r == 0 or len(kept) >= size:
        return kept
    order = kept[torch.argsort(values[kept], descending=True, stable=True)]
    core = order[: len(kept) - r]
    rest = torch.ones(size, dtype=torch.bool)
    rest[core] = False
    candidates = torch.nonzero(rest).flatten()
    window = (step * r + torch.arange(r)) % len(candidates)
    return torch.sort(torch.cat([core, candidates[window]])).values.to(kept.dtype)


def _feed_every_producer(g: ChannelGroup, kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Where a group joins layers by a concatenation, each layer produces some of its channels:
    a plan that kept none of one layer's would leave that layer with no output. Swap in that
    layer's best channel for the worst kept channel of a layer that keeps several (the count,
    and so the plan's cost, stays the same)."""
    keep = set(kept.tolist())
    sources = [sorted(set(p.root.tolist())) for p in g.producers if len(p.root)]
    for roots in sources:
        if keep.intersection(roots) or len(roots) == len(keep) == 0:
            continue
        shared = [c for c in keep if all(len(keep.intersection(r)) > 1 for r in sources if c in r)]
        if not shared:
            continue
        worst = min(shared, key=lambda c: float(values[c]))
        best = max(roots, key=lambda c: float(values[c]))
        keep = (keep - {worst}) | {best}
    return torch.tensor(sorted(keep), dtype=kept.dtype)


def coverage_bonus(groups: GroupSet, coverage: dict[int, torch.Tensor], scale: float):
    """Extra cost of removing each channel: ``scale * (mean coverage - coverage_c)``. Channels
    that few clients trained recently become dearer to drop, well-covered ones cheaper, which
    raises the federation's minimum coverage (the covering index that appears in convergence
    bounds of pruned federated training) at a bounded price in local loss."""
    for g in groups:
        if coverage.get(g.gid) is None or coverage[g.gid].shape != (g.size,):
            raise ValueError(f"coverage of group {g.name} is missing or mis-sized")
    flat = torch.cat([coverage[g.gid].double() for g in groups])
    return {g.gid: scale * (flat.mean() - coverage[g.gid].double()) for g in groups}


def normalised_scores(scores: Scores) -> dict[int, torch.Tensor]:
    """Channel scores divided by their mean magnitude over all channels: comparable between
    clients whose losses differ in scale (what a client reports for the federation's anchor)."""
    scale = float(scores.flat().abs().mean())
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    return {gid: (v / scale).to(torch.float32) for gid, v in scores.values.items()}


class RankedObjective:
    """Channels leave in ascending score order and come back in descending order; a block costs
    the sum of its channels' scores (plus any coverage bonus)."""

    def __init__(self, groups: GroupSet, scores: Scores):
        self.groups = groups
        self.values = scores.values
        self.order = {g.gid: _ranking(scores.values[g.gid]) for g in groups}
        self.count = {g.gid: g.size for g in groups}
        self.scale = float(torch.cat([v for v in self.values.values()]).abs().mean())

    def set_bonus(self, bonus: dict[int, torch.Tensor]) -> None:
        self.values = {gid: v + bonus[gid] for gid, v in self.values.items()}
        self.order = {g.gid: _ranking(self.values[g.gid]) for g in self.groups}

    def drop(self, g: ChannelGroup, n: int) -> tuple[torch.Tensor, float]:
        k = self.count[g.gid]
        block = self.order[g.gid][k - n : k]
        return block, float(self.values[g.gid][block].sum())

    def remove(self, g: ChannelGroup, block: torch.Tensor) -> None:
        self.count[g.gid] -= len(block)

    def restore(self, g: ChannelGroup, n: int) -> tuple[torch.Tensor, float]:
        k = self.count[g.gid]
        block = self.order[g.gid][k : k + n]
        return block, float(self.values[g.gid][block].sum())

    def add(self, g: ChannelGroup, block: torch.Tensor) -> None:
        self.count[g.gid] += len(block)

    def kept(self, g: ChannelGroup) -> torch.Tensor:
        return torch.sort(self.order[g.gid][: self.count[g.gid]]).values


class JointObjective:
    """Second-order loss of removing a set S of channels, ``f(S) = -g.1_S + 1/2 1_S' F 1_S``,
    with ``F = A'A/n`` from the per-sample terms ``A`` (``[n, channels]``, never formed as a
    matrix: ``F v = A'(A v)/n``). Keeps ``u = F 1_S`` up to date as S changes."""

    def __init__(self, groups: GroupSet, scores: Scores, gradient: str = "signed"):
        a = scores.directional.to(torch.float64)
        self.a, self.n = a, a.shape[0]
        if not scores.info.get("first_order", True):
            gradient = "off"
        # signed: -g.1_S as in the expansion; absolute: +|g|.1_S, the bound |dL| <= |g.w| +
        # 1/2 w'Fw per channel (removing a channel the loss is sensitive to costs, whatever
        # the direction); off: curvature only
        self.gbar = {
            "signed": a.mean(0),
            "absolute": -a.mean(0).abs(),
            "off": torch.zeros(a.shape[1], dtype=torch.float64),
        }[gradient]
        self.fdiag = (a * a).sum(0) / self.n
        self.u = torch.zeros(a.shape[1], dtype=torch.float64)
        self.removed = torch.zeros(a.shape[1], dtype=torch.bool)
        self.offset, pos = {}, 0
        for g in groups:
            self.offset[g.gid] = pos
            pos += g.size
        if pos != a.shape[1]:
            raise ValueError(f"per-sample terms have {a.shape[1]} channels, groups have {pos}")
        self.bonus = torch.zeros(a.shape[1], dtype=torch.float64)
        self.scale = float(0.5 * self.fdiag.mean())  # a typical channel's loss increase

    def set_bonus(self, bonus: dict[int, torch.Tensor]) -> None:
        self.bonus = torch.cat([bonus[gid] for gid in self.offset])

    def _span(self, g: ChannelGroup) -> slice:
        return slice(self.offset[g.gid], self.offset[g.gid] + g.size)

    def _cost(self, cols: torch.Tensor) -> float:
        """f(S + block) - f(S) for a block disjoint from S (global column indices)."""
        s = self.a[:, cols].sum(1)
        return float(
            -self.gbar[cols].sum()
            + 0.5 * (s @ s) / self.n
            + self.u[cols].sum()
            + self.bonus[cols].sum()
        )

    def drop(self, g: ChannelGroup, n: int) -> tuple[torch.Tensor, float]:
        span = self._span(g)
        marginal = -self.gbar[span] + 0.5 * self.fdiag[span] + self.u[span] + self.bonus[span]
        marginal[self.removed[span]] = math.inf
        block = torch.sort(_smallest(marginal, n)).values
        return block, self._cost(block + span.start)

    def remove(self, g: ChannelGroup, block: torch.Tensor) -> None:
        cols = block + self.offset[g.gid]
        self.removed[cols] = True
        self.u += self.a.T @ self.a[:, cols].sum(1) / self.n

    def restore(self, g: ChannelGroup, n: int) -> tuple[torch.Tensor, float]:
        span = self._span(g)
        # gain of bringing back c: f(S) - f(S - c) = -g_c + u_c - 1/2 F_cc
        marginal = -self.gbar[span] + self.u[span] - 0.5 * self.fdiag[span] + self.bonus[span]
        marginal[~self.removed[span]] = -math.inf
        block = torch.sort(_largest(marginal, n)).values
        cols = block + span.start
        self.u -= self.a.T @ self.a[:, cols].sum(1) / self.n  # tentatively take it out of S
        self.removed[cols] = False
        gain = self._cost(cols)
        self.removed[cols] = True
        self.u += self.a.T @ self.a[:, cols].sum(1) / self.n
        return block, gain

    def add(self, g: ChannelGroup, block: torch.Tensor) -> None:
        cols = block + self.offset[g.gid]
        self.removed[cols] = False
        self.u -= self.a.T @ self.a[:, cols].sum(1) / self.n

    def kept(self, g: ChannelGroup) -> torch.Tensor:
        return torch.nonzero(~self.removed[self._span(g)]).flatten()


def _smallest(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` smallest values (ties: lower index first)."""
    return torch.tensor(sorted(range(len(values)), key=lambda i: (float(values[i]), i))[:n])


def _largest(values: torch.Tensor, n: int) -> torch.Tensor:
    return torch.tensor(sorted(range(len(values)), key=lambda i: (-float(values[i]), i))[:n])


def _ranking(values: torch.Tensor) -> torch.Tensor:
    """Channel indices from most to least important (ties: lower index first)."""
    return _largest(values, len(values))


def _blocked(size: int, multiple: int) -> bool:
    """Layers of at least four blocks move in whole blocks; narrower ones channel by channel."""
    return multiple > 1 and size >= 4 * multiple


def _floor(size: int, floor: float, multiple: int) -> int:
    n = max(1, math.ceil(floor * size))
    if _blocked(size, multiple):
        n = min(size, math.ceil(n / multiple) * multiple)
    return n


def _step_down(size: int, k: int, multiple: int) -> int:
    """Next smaller allowed channel count below ``k``."""
    return (k - 1) // multiple * multiple if _blocked(size, multiple) else k - 1


def _step_up(size: int, k: int, multiple: int) -> int:
    return min(size, (k // multiple + 1) * multiple) if _blocked(size, multiple) else k + 1
