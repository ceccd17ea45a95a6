"""Local training rules (``cahfp.local_rules``)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cahfp.data import ImageData
from cahfp.errors import InvalidTask
from cahfp.local_rules import LocalRule, make_step
from cahfp.models import build_model
from cahfp.pruning import build_compact, find_groups, index_map_for
from cahfp.pruning.threshold import channel_scores, threshold_plan
from cahfp.training import Recipe, train

X = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))

# ---------------------------------------------------------------- threshold gate (FIARSE)


class ToyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        return self.classifier(self.pool(torch.relu(self.conv(x))).flatten(1))


def _toy() -> tuple[nn.Module, torch.Tensor, float]:
    """A one-group model, its channel scores and a threshold between channels 0 and 1-3."""
    torch.manual_seed(0)
    model = ToyConv()
    with torch.no_grad():
        model.conv.weight[0].mul_(0.1)
        model.conv.bias[0].mul_(0.1)
    (g,) = find_groups(model, X[:1]).groups
    s = channel_scores(model, find_groups(model, X[:1]))[g.gid]
    assert s[0] < s[1:].min()
    return model, s, float((s[0] + s[1:].min()) / 2)


def _gate(model, theta, ste=True):
    return make_step(
        LocalRule(kind="threshold-gate", thresholds={"conv": theta}, ste=ste), model, X[:1], 0
    )


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,width", [("vgg11", 0.25), ("resnet20", 0.5)])
def test_threshold_gate_at_the_first_step_computes_the_plain_submodel(name, width):
    model = build_model(name, 10, 1, width, seed=0)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    groups = find_groups(model, x[:2])
    for layerwise in (False, True):
        plan, thetas = threshold_plan(model, groups, 0.4, layerwise=layerwise)
        sub = build_compact(model, index_map_for(model, groups, plan.kept)).eval()
        step = make_step(LocalRule(kind="threshold-gate", thresholds=thetas), sub, x[:1], 0)
        assert torch.equal(functional_call(sub, step.gated(sub), (x,)), sub(x))


def test_threshold_gate_surrogate_gradient_is_the_official_backward_per_channel():
    model, s, theta = _toy()
    w, b = model.conv.weight, model.conv.bias
    plain = _grads(model, F.cross_entropy(model(X), Y))
    loss, cost = _gate(model, theta)(model, X, Y, None)
    assert cost == 1.0
    ste = _grads(model, loss)
    # d loss / d m_c = sum over the channel's elements of g * w; ds/dw = sign(w) / n (n = 10)
    dm = (plain["conv.weight"] * w).sum((1, 2, 3)) + plain["conv.bias"] * b
    surrogate = (dm * 2 * theta / (s + theta) ** 2).float().detach()
    surrogate[0] = 0  # channel 0 is below the threshold at the start: kept by the floor, gate 1
    shape = (-1, 1, 1, 1)
    torch.testing.assert_close(
        ste["conv.weight"], plain["conv.weight"] + surrogate.view(shape) * w.sign() / 10
    )
    torch.testing.assert_close(ste["conv.bias"], plain["conv.bias"] + surrogate * b.sign() / 10)
    torch.testing.assert_close(ste["classifier.weight"], plain["classifier.weight"])
    assert not torch.equal(ste["conv.weight"][1:], plain["conv.weight"][1:])
    # without the surrogate: the plain masked gradients (what the official code computes)
    off = _grads(model, _gate(model, theta, ste=False)(model, X, Y, None)[0])
    for name in plain:
        torch.testing.assert_close(off[name], plain[name])


@pytest.mark.parametrize("ste", [True, False])
def test_threshold_gate_drops_a_channel_that_falls_below_the_threshold(ste):
    model, _, theta = _toy()
    step = _gate(model, theta, ste)  # channel 1 is gated (above theta at the start)
    with torch.no_grad():  # training pushed it below the threshold
        model.conv.weight[1].mul_(0.01)
        model.conv.bias[1].mul_(0.01)
    seen = {}
    hook = model.conv.register_forward_hook(lambda m, i, out: seen.update(out=out))
    loss, _ = step(model, X, Y, None)
    hook.remove()
    assert torch.equal(seen["out"][:, 1], torch.zeros_like(seen["out"][:, 1]))
    assert seen["out"][:, 0].abs().sum() > 0  # channel 0: below theta from the start, kept
    grads = _grads(model, loss)
    assert not grads["conv.weight"][1].any() and not grads["conv.bias"][1].any()
    assert grads["conv.weight"][0].any() and grads["conv.weight"][2:].any()


def test_threshold_gate_trains_reproducibly_and_refuses_a_rule_without_every_group():
    model, _, theta = _toy()
    images = (X * 60 + 128).clamp(0, 255).to(torch.uint8).repeat(4, 1, 1, 1)
    data = ImageData(images, Y.repeat(4), ["a", "b", "c"], (0.5,), (0.25,), "toy")
    recipe = Recipe(epochs=2, batch_size=8, logit_adjust=0.0)
    states = []
    for _ in range(2):
        m = copy.deepcopy(model)
        result = train(m, data, recipe, seed=3, step=_gate(m, theta))
        assert result.cost == 1.0 and result.steps == 8
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["conv.weight"], model.conv.weight)
    with pytest.raises(InvalidTask, match="no threshold for groups"):
        make_step(LocalRule(kind="threshold-gate", thresholds={"other": 0.1}), model, X[:1], 0)


def test_threshold_gate_follows_the_coordinators_importances_not_the_slices():
    """The coordinator measures importance on the dense model, the client on its slice (fewer
    input channels): with the coordinator's importances in the rule a fresh slice gates
    exactly the channels whose dense importance passes the threshold, and a channel leaves
    when its importance falls by the factor that would take the dense one below it."""
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    groups = find_groups(model, x[:2])
    scores = channel_scores(model, groups)
    plan, thetas = threshold_plan(model, groups, 0.4, scores=scores)
    sub = build_compact(model, index_map_for(model, groups, plan.kept)).eval()
    kept = {g.name: scores[g.gid][plan.kept[g.gid].sort().values].tolist() for g in groups}
    rule = LocalRule(kind="threshold-gate", thresholds=thetas, scores=kept)
    step = make_step(rule, sub, x[:1], 0)
    assert torch.equal(functional_call(sub, step.gated(sub), (x,)), sub(x))
    by_name = {g.name: g for g in find_groups(sub, x[:1])}
    gated = {}
    for producing, _, _, mask in step.groups:
        name = next(
            n
            for n, g in by_name.items()
            if g.size == len(mask)
            and any(key.startswith(n.rsplit(".", 1)[0]) for key, *_ in producing)
        )
        gated[name] = mask
    for name, mask in gated.items():
        dense = torch.tensor(kept[name], dtype=torch.float64)
        assert torch.equal(mask, dense >= thetas[name])
    with pytest.raises(InvalidTask, match="importances for group"):
        bad = {**kept, next(iter(kept)): [1.0]}
        make_step(LocalRule(kind="threshold-gate", thresholds=thetas, scores=bad), sub, x[:1], 0)
