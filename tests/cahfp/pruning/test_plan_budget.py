"""A plan's FLOPs fraction is the extracted model's, counted independently, and lands close
under its budget on any network (grouped/depthwise convolutions, coarse layers)."""

import functools

import pytest
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from tests.nets import CustomResidualNet, MobileNetLike, ResidualConcatNet, TwoConvNet

NETS = {
    "mobilenet": lambda: MobileNetLike(num_classes=10, in_channels=1, width=1.0),
    "mobilenet-x0.25": lambda: MobileNetLike(num_classes=10, in_channels=1, width=0.25),
    "two-conv-32": lambda: TwoConvNet(1, 10, 32),
    "residual-concat-48": lambda: ResidualConcatNet(1, 10, 48),
    "custom": lambda: CustomResidualNet(1, 10),
    "vgg11": lambda: build_model("vgg11", 10, 1, 0.25, seed=0),
    "resnet20": lambda: build_model("resnet20", 10, 1, 0.5, seed=0),
}


def batch(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@functools.cache
def scored(name: str, method: str = "curvature"):
    torch.manual_seed(0)
    model = NETS[name]()
    x, y = batch()
    return model, score_groups(model, [(x, y)], method), x


def analytic_flops(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Forward and training FLOPs per sample from layer shapes alone (no FlopCounterMode):
    each pass of a Conv/Linear is 2 x weight elements x output positions (a grouped weight
    holds in/groups input channels); training adds the weight gradient and, except on the
    image, the input gradient."""
    forward, training = 0.0, 0.0

    def hook(module, args, out):
        nonlocal forward, training
        positions = out[0, 0].numel() if isinstance(module, _ConvNd) else 1
        one = 2 * module.weight.numel() * positions
        forward += one
        training += one * (2 if args[0] is x else 3)

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (_ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return forward, training


@pytest.mark.parametrize("name", ["mobilenet", "vgg11", "resnet20"])
@pytest.mark.parametrize("keep", [0.5, 0.35])
def test_plan_fraction_matches_an_independent_count_of_the_extracted_model(name, keep):
    model, scores, x = scored(name)
    plan = make_plan(model, scores, keep)
    dense_fwd, dense_train = analytic_flops(model, x[:1])
    sub_fwd, sub_train = analytic_flops(extract(model, plan).module, x[:1])
    assert abs(plan.flops_fraction - sub_train / dense_train) < 0.01
    assert abs(plan.flops_fraction - sub_fwd / dense_fwd) < 0.01  # what the board runs
    assert plan.flops_fraction <= keep + 1e-9


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("keep", [0.2, 0.35, 0.5, 0.6, 0.8])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_plan_uses_its_budget_on_any_network(name, keep, allocation):
    model, scores, x = scored(name)
    plan = make_plan(model, scores, keep, allocation=allocation)
    assert keep - 0.05 <= plan.flops_fraction <= keep + 1e-9, plan.counts()
    _, dense = analytic_flops(model, x[:1])
    _, sub = analytic_flops(extract(model, plan).module, x[:1])
    assert sub / dense == pytest.approx(plan.flops_fraction, abs=1e-6)


def test_fill_keeps_whole_blocks_where_they_land_close_enough():
    # vgg11 x0.5 lands within slack with 8-channel blocks: no finer block is used
    model = build_model("vgg11", 10, 1, 0.5, seed=0)
    x, y = batch()
    plan = make_plan(model, score_groups(model, [(x, y)], "curvature"), 0.5)
    assert all(len(plan.kept[g.gid]) % 8 == 0 for g in plan.groups if g.size >= 32)
    # a 32-channel two-convolution network needs finer blocks to use its budget
    model = TwoConvNet(1, 10, 32)
    coarse = make_plan(model, score_groups(model, [(x, y)], "curvature"), 0.5)
    assert coarse.flops_fraction >= 0.45
    assert any(len(coarse.kept[g.gid]) % 8 for g in coarse.groups)


@pytest.mark.parametrize("name", ["two-conv-32", "mobilenet", "residual-concat-48"])
def test_joint_objective_fills_the_budget_too(name):
    model, scores, _ = scored(name)
    assert scores.directional is not None
    for keep in (0.35, 0.5, 0.6):
        plan = make_plan(model, scores, keep, interactions=True)
        assert plan.objective == "joint"
        assert keep - 0.05 <= plan.flops_fraction <= keep + 1e-9, (keep, plan.counts())


def test_groups_of_same_shaped_models_with_other_strides_are_not_confused():
    from cahfp.pruning import find_groups

    def net(stride):  # same tensors, different work: an own model built as nn.Sequential
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=8),
            nn.Conv2d(8, 8, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    x = torch.zeros(2, 1, 28, 28)
    one, two = find_groups(net(1), x), find_groups(net(2), x)
    assert two.flops["2"] == pytest.approx(one.flops["2"] / 4)


@pytest.mark.parametrize("name", ["mobilenet", "mobilenet-x0.25", "residual-concat-48"])
@pytest.mark.parametrize("keep", [0.15, 0.25, 0.5])
def test_every_concatenated_branch_keeps_a_channel(name, keep):
    """HeteroFL's ordered selector keeps a concatenation's first channels: all of them from its
    first branch, none from the second, whose layer would be left with no output (the
    extracted model then fails to run). Each branch keeps at least its best channel."""
    model, _, x = scored(name)
    ordered = score_groups(model, None, "ordered", example_input=x)
    for allocation in ("uniform", "global"):
        plan = make_plan(model, ordered, keep, allocation=allocation)
        sub = extract(model, plan).module
        assert all(p.numel() for p in sub.parameters())
        sub.eval()(x)  # runs
