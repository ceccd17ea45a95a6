"""Threshold plans (FIARSE): the channels whose mean |w| passes the smallest threshold that fits
the training-FLOPs budget, every layer at least at its floor."""

import math

import pytest
import torch
from torch import nn

from cahfp.errors import BudgetInfeasible
from cahfp.models import build_model
from cahfp.pruning import extract, find_groups
from cahfp.pruning.plan import CostModel
from cahfp.pruning.threshold import channel_scores, threshold_plan

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class TwoProducers(nn.Module):
    """One channel group written by two convolutions (a residual sum)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        return self.classifier(self.pool(torch.relu(self.a(x) + self.b(x))).flatten(1))


def test_a_channel_scores_the_mean_magnitude_of_every_weight_and_bias_producing_it():
    torch.manual_seed(0)
    model = TwoProducers()
    (group,) = find_groups(model, X).groups
    a, b = model.a, model.b
    expected = (
        a.weight.abs().sum((1, 2, 3)) + a.bias.abs() + b.weight.abs().sum((1, 2, 3)) + b.bias.abs()
    ) / (9 + 1 + 1 + 1)
    torch.testing.assert_close(
        channel_scores(model, find_groups(model, X))[group.gid].float(), expected.detach()
    )


def _trained_like(name: str, width: float) -> nn.Module:
    """A model whose layers' magnitudes differ more than at initialisation."""
    model = build_model(name, 10, 1, width, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                scale = (
                    torch.rand(m.weight.shape[0], generator=gen) * 2 * torch.rand(1, generator=gen)
                )
                m.weight.mul_(scale.view(-1, *[1] * (m.weight.dim() - 1)))
    return model


def _cost(groups, counts) -> float:
    cm = CostModel.flops(groups)
    return cm.total(counts) / cm.dense


@pytest.mark.parametrize("name,width", [("vgg11", 0.25), ("resnet20", 0.5)])
@pytest.mark.parametrize("keep", [0.2, 0.4, 0.6])
def test_a_global_threshold_plan_is_the_smallest_threshold_that_fits(name, width, keep):
    model = _trained_like(name, width)
    groups = find_groups(model, X)
    scores = channel_scores(model, groups)
    plan, thetas = threshold_plan(model, groups, keep, floor=0.1)
    (theta,) = set(thetas.values())
    assert set(thetas) == {g.name for g in groups}
    assert plan.flops_fraction <= keep + 1e-9
    assert plan.flops_fraction == pytest.approx(_cost(groups, plan.counts()))
    floors = {g.gid: max(1, math.ceil(0.1 * g.size)) for g in groups}
    for g in groups:
        kept, s = plan.kept[g.gid], scores[g.gid]
        above = s >= theta
        assert above[kept].sum() == above.sum()  # every channel above the threshold is kept
        forced = kept[~above[kept]]  # below it: only the floor's, the group's best
        if len(forced):
            assert len(kept) == floors[g.gid]
            assert s[forced].min() >= s[~torch.isin(torch.arange(g.size), kept)].max()
    # the next lower threshold does not fit
    lower = torch.cat([scores[g.gid] for g in groups])
    lower = lower[lower < theta].max()
    counts = {g.gid: max(floors[g.gid], int((scores[g.gid] >= lower).sum())) for g in groups}
    assert _cost(groups, counts) > keep
    sub = extract(model, plan).module  # the plan extracts like any other
    assert sub(X).shape == (2, 10)


def test_a_layerwise_threshold_plan_keeps_one_fraction_of_every_layer():
    model = _trained_like("vgg11", 0.25)
    groups = find_groups(model, X)
    scores = channel_scores(model, groups)
    plan, thetas = threshold_plan(model, groups, 0.4, floor=0.1, layerwise=True)
    assert plan.flops_fraction <= 0.4
    fractions = [len(plan.kept[g.gid]) / g.size for g in groups]
    assert max(fractions) - min(fractions) < max(1 / g.size for g in groups)
    for g in groups:  # each layer's best channels, its threshold the last kept one's score
        s = scores[g.gid]
        assert s[plan.kept[g.gid]].min() == thetas[g.name]
        assert (
            s[plan.kept[g.gid]].min()
            >= s[~torch.isin(torch.arange(g.size), plan.kept[g.gid])].max()
        )
    assert len(set(thetas.values())) > 1
    # one more channel in every layer would not fit
    counts = {g.gid: min(g.size, len(plan.kept[g.gid]) + 1) for g in groups}
    assert _cost(groups, counts) > 0.4


def test_the_global_threshold_keeps_everything_at_keep_one_and_refuses_budgets_below_the_floor():
    model = _trained_like("vgg11", 0.25)
    groups = find_groups(model, X)
    for layerwise in (False, True):
        plan, _ = threshold_plan(model, groups, 1.0, layerwise=layerwise)
        assert plan.counts() == {g.gid: g.size for g in groups} and plan.flops_fraction == 1
    with pytest.raises(BudgetInfeasible, match="floor of 50%"):
        threshold_plan(model, groups, 0.1, floor=0.5)


def test_a_global_threshold_starves_the_layers_of_small_magnitude_to_their_floor():
    """Mean |w| shrinks with a layer's fan-in: at initialisation one threshold keeps the first
    (wide-kernel, FLOPs-heavy) layers and leaves the deep ones at the floor; the layerwise
    threshold does not."""
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    groups = find_groups(model, X)
    plan, _ = threshold_plan(model, groups, 0.2, floor=0.1)
    at_floor = [g.name for g in groups if len(plan.kept[g.gid]) == math.ceil(0.1 * g.size)]
    assert "features.25" in at_floor and "features.0" not in at_floor
    plan, _ = threshold_plan(model, groups, 0.2, floor=0.1, layerwise=True)
    assert all(len(plan.kept[g.gid]) > math.ceil(0.1 * g.size) for g in groups)


def test_the_group_cache_stays_bounded_when_structures_change_every_round(monkeypatch):
    """FIARSE's submodels change every round: a long-lived client must not keep them all."""
    from cahfp.pruning import groups as groups_module
    from cahfp.pruning.extract import build_compact, index_map_for

    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    x = torch.zeros(1, 1, 28, 28)
    dense = groups_module.find_groups(model, x)
    size = 3
    monkeypatch.setattr(groups_module, "CACHE_SIZE", size)
    for n in range(1, size + 4):
        keep = {g.gid: torch.arange(max(1, min(g.size, n % g.size + 1))) for g in dense}
        sub = build_compact(model, index_map_for(model, dense, keep))
        assert groups_module.find_groups(sub, x) is groups_module.find_groups(sub, x)
    assert len(groups_module._CACHE) <= size
