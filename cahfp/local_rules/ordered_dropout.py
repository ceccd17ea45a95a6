"""FjORD's ordered dropout (Horváth et al., NeurIPS 2021): every batch trains a width drawn
uniformly from the rule's widths, the first ``ceil(p x size)`` channels of every group, run as
views of the received submodel (``cahfp.pruning.widths.NestedWidths``) so that narrower widths
train its leading slices in place. With ``distill`` the widest width (the received submodel)
is trained on the labels in the same step and the drawn width learns from its softened
outputs (FjORD's knowledge distillation; its reference code: weight 1, temperature 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cahfp.errors import InvalidTask
from cahfp.pruning import find_groups
from cahfp.pruning.plan import CostModel
from cahfp.pruning.widths import NestedWidths
from cahfp.seeds import stream

_EPS = 1e-9


class OrderedDropout:
    """The ``cahfp.training.Step`` of an ``ordered-dropout`` rule."""

    def __init__(self, rule, module: nn.Module, example: torch.Tensor, seed: int):
        groups = find_groups(module, example)
        unknown = [g.name for g in groups if g.name not in rule.group_sizes]
        if unknown:
            raise InvalidTask(f"ordered-dropout rule has no dense size for groups {unknown[:3]}")
        self.rule = rule
        self.nested = NestedWidths(module, groups)
        cost = CostModel.flops(groups)
        self.counts: list[dict[int, int] | None] = []
        self.costs: list[float] = []
        for p in rule.widths:
            counts = {g.gid: max(1, math.ceil(p * rule.group_sizes[g.name] - _EPS)) for g in groups}
            over = [g for g in groups if counts[g.gid] > g.size]
            if over:
                raise InvalidTask(
                    f"ordered-dropout rule's width {p:g} is not within the submodel it came "
                    f"with (group {over[0].name}: {counts[over[0].gid]} of {over[0].size} "
                    "channels)"
                )
            full = all(n == g.size for g, n in zip(groups, counts.values(), strict=True))
            self.counts.append(None if full else counts)
            self.costs.append(1.0 if full else cost.total(counts) / cost.dense)
            if not full:
                self.nested.views(counts)  # a width that is not nested fails here, not mid-round
        if self.counts[-1] is not None:
            raise InvalidTask(
                f"ordered-dropout rule's widest width {rule.widths[-1]:g} is not the submodel "
                "it came with"
            )
        self.gen = torch.Generator().manual_seed(stream(seed, "ordered-dropout"))

    def __call__(self, model: nn.Module, x, y, shift) -> tuple[torch.Tensor, float]:
        i = int(torch.randint(len(self.counts), (1,), generator=self.gen))
        counts = self.counts[i]

        def adjusted(out: torch.Tensor) -> torch.Tensor:
            return out if shift is None else out + shift

        if not self.rule.distill:
            out = model(x) if counts is None else self.nested(counts, x)
            return F.cross_entropy(adjusted(out), y), self.costs[i]
        teacher = adjusted(model(x))
        loss = F.cross_entropy(teacher, y)
        a, t = self.rule.kd_weight, self.rule.kd_temperature
        if counts is None:  # the drawn width is the widest: its student pass equals the teacher
            return loss + (1 - a) * F.cross_entropy(teacher, y), 1.0
        student = adjusted(self.nested(counts, x))
        soft = F.softmax(teacher.detach() / t, dim=1)
        kd = F.cross_entropy(student / t, soft) * t * t
        loss = loss + (1 - a) * F.cross_entropy(student, y) + a * kd
        return loss, 1.0 + self.costs[i]
