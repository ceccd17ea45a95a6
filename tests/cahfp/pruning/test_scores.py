import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from cahfp.errors import UnknownName
from cahfp.models import build_model
from cahfp.pruning import find_groups, make_plan, normalised_scores, score_groups
from cahfp.pruning.curvature import channel_dims, directional_terms
from tests.nets import CustomResidualNet, randomize_bn


def batch(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_hook_fisher_block_equals_per_sample_weight_gradients():
    model = randomize_bn(CustomResidualNet(1, 10), 3).double().eval()
    x, y = batch(6)
    x = x.double()
    groups = find_groups(model, x)
    terms = directional_terms(model, groups, [(x, y)], 1, collect=True)
    s1, s2, n = terms.s1, terms.s2, terms.n
    assert n == 6
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    modules = dict(model.named_modules())
    for g in groups:
        gw = torch.zeros(6, g.size, dtype=torch.float64)  # g_x . w for every sample and channel
        for prod in g.producers:
            for pname, dim in channel_dims(modules[prod.module]).items():
                key = f"{prod.module}.{pname}"
                contrib = (per_sample[key] * params[key]).double().movedim(dim + 1, 1)
                contrib = contrib.reshape(6, contrib.shape[1], -1).sum(-1)
                gw.index_add_(1, prod.root, contrib[:, prod.idxs])
        torch.testing.assert_close(s1[g.gid], gw.sum(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(s2[g.gid], (gw**2).sum(0), rtol=1e-6, atol=1e-9)


def test_every_sample_counts_and_duplicates_do_not_change_the_mean():
    model = randomize_bn(build_model("vgg11", 10, 1, 0.25, seed=0), 1)
    b1, b2 = batch(8, 1), batch(8, 2)
    one = score_groups(model, [b1], "curvature")
    two = score_groups(model, [b1, b2], "curvature")
    dup = score_groups(model, [b1, b1], "curvature")
    assert not torch.allclose(one.flat(), two.flat())
    torch.testing.assert_close(one.flat(), dup.flat())
    # the second batch's last sample alone moves the score
    x2, y2 = b2
    x3 = x2.clone()
    x3[-1] += 1.0
    three = score_groups(model, [b1, (x3, y2)], "curvature")
    assert not torch.allclose(two.flat(), three.flat())
    assert one.info["samples"] == 8 and two.info["samples"] == 16


def test_scoring_leaves_the_model_untouched():
    model = build_model("resnet20", 10, 1, 0.5).train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_groups(model, [batch()], "curvature")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@pytest.mark.parametrize("kind", ["fisher-block", "diag-fisher", "hutchinson"])
@pytest.mark.parametrize("first_order", [True, False])
def test_curvature_variants_give_finite_nonnegative_scores(kind, first_order):
    model = randomize_bn(CustomResidualNet(1, 10), 0)
    s = score_groups(
        model, [batch(), batch(seed=1)], "curvature", curvature_kind=kind, first_order=first_order
    )
    flat = s.flat()
    assert torch.isfinite(flat).all() and (flat >= 0).all() and flat.max() > 0
    assert s.info["curvature"] == kind and s.info["first_order"] is first_order


def test_diag_fisher_and_fisher_block_differ_only_by_cross_terms():
    # With a single parameter per channel (a BatchNorm without bias), the Fisher block is its
    # own diagonal: both estimates must agree exactly.
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias = None
    data = [batch(8)]
    block = score_groups(model, data, "curvature", curvature_kind="fisher-block", first_order=False)
    diag = score_groups(model, data, "curvature", curvature_kind="diag-fisher", first_order=False)
    torch.testing.assert_close(block.flat(), diag.flat(), rtol=1e-6, atol=1e-12)


def test_baseline_selectors():
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    x = batch()[0]
    ordered = score_groups(model, None, "ordered", example_input=x)
    plan = make_plan(model, ordered, 0.5, allocation="uniform")
    for g in plan.groups:
        k = len(plan.kept[g.gid])
        assert plan.kept[g.gid].tolist() == list(range(k))
    r3 = score_groups(model, None, "rolling", example_input=x, round_idx=3)
    plan3 = make_plan(model, r3, 0.5, allocation="uniform")
    for g in plan3.groups:
        k = len(plan3.kept[g.gid])
        assert sorted(plan3.kept[g.gid].tolist()) == sorted((3 + i) % g.size for i in range(k))
    a = score_groups(model, None, "random", example_input=x, seed=4)
    b = score_groups(model, None, "random", example_input=x, seed=4)
    c = score_groups(model, None, "random", example_input=x, seed=5)
    assert torch.equal(a.flat(), b.flat()) and not torch.equal(a.flat(), c.flat())
    mag = score_groups(model, None, "magnitude", example_input=x)
    first = next(g for g in mag.groups if g.name == "features.0")
    expected = model.features[0].weight.detach().abs().sum((1, 2, 3)).double()
    torch.testing.assert_close(mag.values[first.gid], expected)


def test_taylor_is_the_absolute_first_order_term():
    model = randomize_bn(build_model("vgg11", 10, 1, 0.25, seed=0), 0)
    data = [batch()]
    taylor = score_groups(model, data, "taylor")
    groups = taylor.groups
    t = directional_terms(model.eval(), groups, data, 1)
    torch.testing.assert_close(
        taylor.flat(), torch.cat([(t.s1[g.gid] / t.n).abs() for g in groups])
    )


def test_joint_objective_costs_match_the_second_order_set_formula():
    from cahfp.pruning.plan import JointObjective

    model = randomize_bn(build_model("vgg11", 10, 1, 0.25, seed=0), 2)
    scores = score_groups(model, [batch(16, 1), batch(16, 2)], "curvature")
    a = scores.directional.double()
    assert a.shape == (32, scores.groups.num_channels)

    def f(removed: torch.Tensor) -> float:  # -g.1_S + 1/2 1_S' F 1_S, computed directly
        s = a[:, removed].sum(1)
        return float(-a.mean(0)[removed].sum() + 0.5 * (s @ s) / a.shape[0])

    obj = JointObjective(scores.groups, scores)
    removed = torch.zeros(a.shape[1], dtype=torch.bool)
    for g in list(scores.groups)[:4]:
        block, cost = obj.drop(g, 3)
        cols = block + obj.offset[g.gid]
        before = f(removed)
        removed[cols] = True
        assert cost == pytest.approx(f(removed) - before, rel=1e-9, abs=1e-12)
        obj.remove(g, block)
    g = next(iter(scores.groups))
    block, gain = obj.restore(g, 2)
    cols = block + obj.offset[g.gid]
    assert removed[cols].all()
    after = removed.clone()
    after[cols] = False
    assert gain == pytest.approx(f(removed) - f(after), rel=1e-9, abs=1e-12)
    obj.add(g, block)
    torch.testing.assert_close(obj.u, a.T @ a[:, after].sum(1) / a.shape[0])


def test_joint_planning_can_be_switched_off():
    model = build_model("vgg11", 10, 1, 0.5, seed=0)
    scores = score_groups(model, [batch()], "curvature")
    joint = make_plan(model, scores, 0.5, interactions=True)
    ranked = make_plan(model, scores, 0.5)
    assert joint.objective == "joint" and ranked.objective == "ranked"
    for g in ranked.groups:  # ranked keeps each layer's top-scored channels
        k = len(ranked.kept[g.gid])
        top = torch.argsort(scores.values[g.gid], descending=True, stable=True)[:k]
        assert sorted(top.tolist()) == ranked.kept[g.gid].tolist()


@pytest.mark.parametrize("interactions", [True, False])
def test_coverage_bonus_steers_plans_toward_under_covered_channels(interactions):
    model = build_model("vgg11", 10, 1, 0.5, seed=0)
    scores = score_groups(model, [batch()], "curvature")
    coverage = {}
    for g in scores.groups:
        c = torch.ones(g.size, dtype=torch.float64)
        c[: g.size // 2] = 0.0  # nobody trained the first half recently
        coverage[g.gid] = c
    plain = make_plan(model, scores, 0.3, interactions=interactions)
    steered = make_plan(
        model, scores, 0.3, interactions=interactions, coverage=coverage, coverage_weight=1e6
    )
    for g in scores.groups:
        kept = steered.kept[g.gid]
        if len(kept) <= g.size // 2:
            assert kept.max() < g.size // 2, g.name  # only under-covered channels kept
    assert abs(steered.flops_fraction - plain.flops_fraction) < 0.05
    with pytest.raises(ValueError, match="coverage"):
        make_plan(model, scores, 0.3, coverage={0: torch.ones(3)}, coverage_weight=1.0)


def test_anchor_blends_federation_scores_into_the_local_ranking():
    model = build_model("vgg11", 10, 1, 0.5, seed=0)
    scores = score_groups(model, [batch()], "curvature")
    norm = normalised_scores(scores)
    assert float(torch.cat(list(norm.values())).abs().mean()) == pytest.approx(1.0, rel=1e-5)
    # the federation ranks every layer's channels the opposite way to this client
    anchor = {gid: -v for gid, v in norm.items()}
    local = make_plan(model, scores, 0.4)
    anchored = make_plan(model, scores, 0.4, anchor=anchor, anchor_weight=1.0)
    half = make_plan(model, scores, 0.4, anchor=anchor, anchor_weight=0.0)
    assert all(torch.equal(half.kept[g], local.kept[g]) for g in local.kept)
    for g in scores.groups:
        k = len(anchored.kept[g.gid])
        if k < g.size:  # a pruned layer keeps the federation's best, i.e. this client's worst
            worst = torch.argsort(scores.values[g.gid], stable=True)[:k]
            assert sorted(worst.tolist()) == anchored.kept[g.gid].tolist(), g.name
    with pytest.raises(ValueError, match="anchor"):
        make_plan(model, scores, 0.4, anchor={0: torch.ones(3)}, anchor_weight=0.5)


def test_gradient_modes_of_the_joint_planner():
    from cahfp.pruning.plan import JointObjective

    model = randomize_bn(build_model("vgg11", 10, 1, 0.25, seed=0), 4)
    scores = score_groups(model, [batch(16, 3)], "curvature")
    gbar = scores.directional.double().mean(0)
    signed = JointObjective(scores.groups, scores, "signed")
    absolute = JointObjective(scores.groups, scores, "absolute")
    off = JointObjective(scores.groups, scores, "off")
    torch.testing.assert_close(signed.gbar, gbar)
    torch.testing.assert_close(absolute.gbar, -gbar.abs())
    assert not off.gbar.any()
    g = next(iter(scores.groups))
    block, cost = absolute.drop(g, 2)
    cols = block + absolute.offset[g.gid]
    s = absolute.a[:, cols].sum(1)
    assert cost == pytest.approx(float(gbar[cols].abs().sum() + 0.5 * (s @ s) / absolute.n))
    with pytest.raises(UnknownName):
        make_plan(model, scores, 0.5, gradient="sideways")
    for mode in ("signed", "absolute", "off"):
        plan = make_plan(model, scores, 0.5, gradient=mode, interactions=True)
        assert 0.42 <= plan.flops_fraction <= 0.52
