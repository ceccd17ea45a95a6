import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cahfp.aggregation import Aggregator
from cahfp.costs import training_flops
from cahfp.errors import BudgetInfeasible, InvalidUpdate, UnknownName
from cahfp.models import build_model
from cahfp.pruning import extract, find_groups, make_plan, reconstruct, score_groups
from cahfp.pruning.groups import OUT, param_dims
from cahfp.training import Recipe, train
from tests.nets import CustomResidualNet, randomize_bn

MODELS = {
    "vgg11": lambda: build_model("vgg11", 10, 1, 0.25, seed=0),
    "vgg16": lambda: build_model("vgg16", 10, 1, 0.25, seed=0),
    "resnet18": lambda: build_model("resnet18", 10, 1, 0.25, seed=0),
    "resnet20": lambda: build_model("resnet20", 10, 1, 0.5, seed=0),
    "custom": lambda: CustomResidualNet(1, 10),
}


def batch(n=16, seed=0, size=28):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def zero_pruned(model: nn.Module, plan) -> nn.Module:
    """The global model with every pruned channel's output parameters set to zero."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for g in plan.groups:
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[plan.kept[g.gid]] = False
        for mem in g.members:
            if mem.role != OUT:
                continue
            module = modules[mem.module]
            for pname, dim in param_dims(module, OUT):
                if isinstance(getattr(module, pname), nn.Parameter):
                    getattr(module, pname).data.index_fill_(dim, mem.idxs[drop[mem.root]], 0.0)
    return ref


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25])
@pytest.mark.parametrize("method", ["curvature", "magnitude"])
def test_submodel_equals_global_with_pruned_channels_zeroed(name, keep, method):
    model = randomize_bn(MODELS[name]()).eval()
    x, y = batch()
    scores = score_groups(model, [(x, y)], method)
    plan = make_plan(model, scores, keep, example_input=x)
    sub = extract(model, plan)
    sub.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub.module(x), zero_pruned(model, plan)(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in sub.module.parameters()) < sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_budget_is_met_as_measured_by_flop_counter(name):
    model = MODELS[name]()
    x, y = batch()
    scores = score_groups(model, [(x, y)], "curvature")
    dense = training_flops(model, x[:1])
    for keep in (0.9, 0.6, 0.4, 0.25):
        for allocation in ("global", "uniform"):
            plan = make_plan(model, scores, keep, allocation=allocation)
            measured = training_flops(extract(model, plan).module, x[:1]) / dense
            assert keep - 0.08 <= measured <= keep + 0.02, (keep, allocation, measured)
            assert measured == pytest.approx(plan.flops_fraction, abs=1e-9)


def test_channel_counts_are_multiples_of_8_where_wide_and_floors_hold():
    # vgg11 at width 0.5: 32 to 256 channels per layer
    model = build_model("vgg11", 10, 1, 0.5)
    x, y = batch()
    plan = make_plan(model, score_groups(model, [(x, y)], "curvature"), 0.3)
    for g in plan.groups:
        k = len(plan.kept[g.gid])
        assert k >= max(1, round(0.1 * g.size))
        if g.size >= 32:
            assert k % 8 == 0, (g.name, g.size, k)


def test_classifier_outputs_are_never_pruned():
    for name, make in MODELS.items():
        model = make()
        x, y = batch()
        plan = make_plan(model, score_groups(model, [(x, y)], "random"), 0.25)
        out = extract(model, plan).module(x)
        assert out.shape == (16, 10), name
        groups = find_groups(model, x)
        head = "classifier" if name != "custom" else "fc2"
        assert all(not (m.module == head and m.role == OUT) for g in groups for m in g.members)


def test_infeasible_budget_and_bad_arguments():
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    scores = score_groups(model, [(x, y)], "magnitude", example_input=x)
    with pytest.raises(BudgetInfeasible, match="smallest plan"):
        make_plan(model, scores, 0.001)
    with pytest.raises(ValueError, match="keep"):
        make_plan(model, scores, 1.5)
    with pytest.raises(UnknownName):
        make_plan(model, scores, 0.5, allocation="greedy")
    with pytest.raises(UnknownName):
        score_groups(model, [(x, y)], "hessian")
    full = make_plan(model, scores, 1.0)
    assert all(len(full.kept[g.gid]) == g.size for g in full.groups)


def test_round_trip_without_training_restores_global_state_and_mask_covers_kept():
    model = build_model("resnet20", 10, 1, 0.5)
    x, y = batch()
    plan = make_plan(model, score_groups(model, [(x, y)], "curvature"), 0.5)
    sub = extract(model, plan)
    upd = reconstruct(sub, model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(upd.state[k], v), k
        dims = sub.index_map.get(k, {})
        expected = torch.ones(v.shape, dtype=torch.bool)
        for dim, idx in dims.items():
            sel = torch.zeros(v.shape[dim], dtype=torch.bool)
            sel[idx] = True
            shape = [1] * v.dim()
            shape[dim] = -1
            expected &= sel.view(shape)
        assert torch.equal(upd.mask[k], expected), k
    assert any(not m.all() for m in upd.mask.values())


def test_trained_submodel_aggregated_alone_changes_exactly_the_kept_coordinates(fmnist_train):
    model = build_model("vgg11", 10, 1, 0.25, seed=1)
    data = fmnist_train.subset(range(256))
    plan = make_plan(model, score_groups(model, data.batches(64), "curvature"), 0.5)
    sub = extract(model, plan)
    train(sub.module, data, Recipe(steps=5, batch_size=32, lr=0.05), seed=0)
    upd = reconstruct(sub, model.state_dict())
    agg = Aggregator(model.state_dict())
    agg.add_compact(sub.module.state_dict(), sub.index_map, weight=256)
    new = agg.result()
    trained = sub.module.state_dict()
    for k, old in model.state_dict().items():
        m = upd.mask[k]
        assert torch.equal(new[k][~m], old[~m]), k
        dims = sub.index_map.get(k, {})
        got = new[k]
        for dim, idx in sorted(dims.items()):
            got = got.index_select(dim, idx)
        assert torch.equal(got, trained[k]), k
    assert any(not torch.equal(new[k], v) for k, v in model.state_dict().items())


def test_two_overlapping_clients_average_by_weight_where_both_cover():
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    g = model.state_dict()
    subs = []
    for seed, keep in ((0, 0.6), (1, 0.4)):
        plan = make_plan(model, score_groups(model, [(x, y)], "random", seed=seed), keep)
        sub = extract(model, plan)
        with torch.no_grad():
            for p in sub.module.parameters():
                p.add_(torch.randn_like(p))
        subs.append(sub)
    agg = Aggregator(g)
    agg.add_compact(subs[0].module.state_dict(), subs[0].index_map, 3.0)
    agg.add_compact(subs[1].module.state_dict(), subs[1].index_map, 1.0)
    new = agg.result()
    for k in g:
        if not g[k].is_floating_point():
            continue
        a, b = reconstruct(subs[0], g), reconstruct(subs[1], g)
        both = a.mask[k] & b.mask[k]
        only_a = a.mask[k] & ~b.mask[k]
        none = ~a.mask[k] & ~b.mask[k]
        torch.testing.assert_close(new[k][both], (3 * a.state[k][both] + b.state[k][both]) / 4)
        torch.testing.assert_close(new[k][only_a], a.state[k][only_a])
        assert torch.equal(new[k][none], g[k][none])


def test_compact_aggregation_equals_the_weighted_mean_of_reconstructed_updates():
    """With uncovered weight λ, each coordinate's new value is the mean of the reconstructed
    updates (the global value where a client did not cover it) weighted w (covered) or λw."""
    model = build_model("resnet20", 10, 1, 0.5)
    x, y = batch()
    g = model.state_dict()
    lam = 0.3
    agg = Aggregator(g, lam)
    num = {k: torch.zeros(v.shape) for k, v in g.items() if v.is_floating_point()}
    den = {k: torch.zeros(v.shape) for k in num for v in [g[k]]}
    for seed, keep, w in ((0, 0.7, 2.0), (1, 0.3, 5.0), (2, 0.5, 1.0)):
        sub = extract(
            model, make_plan(model, score_groups(model, [(x, y)], "random", seed=seed), keep)
        )
        with torch.no_grad():
            for p in sub.module.parameters():
                p.mul_(1.5)
        agg.add_compact(sub.module.state_dict(), sub.index_map, w)
        upd = reconstruct(sub, g)
        for k in num:
            wc = torch.where(upd.mask[k], w, lam * w)
            num[k] += wc * upd.state[k]
            den[k] += wc
    new = agg.result()
    for k in num:
        torch.testing.assert_close(new[k], num[k] / den[k])


def test_a_reconstructed_update_folds_in_exactly_as_its_wire_form():
    """The public path (``reconstruct`` + ``Aggregator.add``) and the one the coordinator runs
    (``add_compact``) are one fold: the same result bit for bit."""
    model = build_model("resnet20", 10, 1, 0.5)
    x, y = batch()
    g = model.state_dict()
    public, wire = Aggregator(g, 0.3), Aggregator(g, 0.3)
    for seed, keep, w in ((0, 0.7, 2.0), (1, 0.3, 5.0), (2, 1.0, 1.0)):
        sub = extract(
            model, make_plan(model, score_groups(model, [(x, y)], "random", seed=seed), keep)
        )
        with torch.no_grad():
            for p in sub.module.parameters():
                p.mul_(1.5)
        public.add(reconstruct(sub, g), w)
        wire.add_compact(sub.module.state_dict(), sub.index_map, w)
    a, b = public.result(), wire.result()
    assert all(torch.equal(a[k], b[k]) for k in g)
    upd = reconstruct(sub, g)
    key = "conv1.weight" if "conv1.weight" in g else next(iter(g))
    upd.mask[key] = upd.mask[key].clone()
    upd.mask[key].view(-1)[0] = ~upd.mask[key].view(-1)[0]  # one coordinate, not a channel
    with pytest.raises(InvalidUpdate, match="whole channels"):
        public.add(upd, 1.0)
    assert public.count == 3


def test_bad_updates_are_rejected_and_nothing_is_lost():
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    g = model.state_dict()
    sub = extract(model, make_plan(model, score_groups(model, [(x, y)], "magnitude"), 0.5))
    good = sub.module.state_dict()
    agg = Aggregator(g)
    agg.add_compact(good, sub.index_map, 1.0)
    before = agg.result()
    key = "features.0.weight"
    nan = {**good, key: good[key].clone().fill_(float("nan"))}
    with pytest.raises(InvalidUpdate, match="NaN"):
        agg.add_compact(nan, sub.index_map, 1.0)
    wrong = {**good, key: good[key][:-1]}
    with pytest.raises(InvalidUpdate, match="shape"):
        agg.add_compact(wrong, sub.index_map, 1.0)
    bad_idx = {k: dict(v) for k, v in sub.index_map.items()}
    bad_idx[key][0] = bad_idx[key][0] + 1000
    with pytest.raises(InvalidUpdate, match="out of range"):
        agg.add_compact(good, bad_idx, 1.0)
    with pytest.raises(InvalidUpdate, match="missing"):
        agg.add_compact({k: v for k, v in good.items() if k != key}, sub.index_map, 1.0)
    with pytest.raises(InvalidUpdate, match="weight"):
        agg.add_compact(good, sub.index_map, float("nan"))
    after = agg.result()
    assert agg.count == 1
    assert all(torch.equal(before[k], after[k]) for k in g)


@settings(max_examples=12, deadline=None)
@given(
    keep=st.floats(0.2, 1.0),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["vgg11", "resnet20", "custom"]),
    method=st.sampled_from(["curvature", "magnitude", "random", "ordered", "rolling"]),
    allocation=st.sampled_from(["global", "uniform"]),
)
def test_invariants_hold_for_random_keeps_and_seeds(keep, seed, name, method, allocation):
    torch.manual_seed(seed)
    model = randomize_bn(MODELS[name](), seed).eval()
    x, y = batch(8, seed)
    scores = score_groups(model, [(x, y)], method, seed=seed, round_idx=seed)
    plan = make_plan(model, scores, keep, allocation=allocation)
    assert keep - 0.08 <= plan.flops_fraction <= keep + 0.02
    sub = extract(model, plan)
    sub.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub.module(x), zero_pruned(model, plan)(x), atol=1e-5, rtol=1e-5)
    g = model.state_dict()
    upd = reconstruct(sub, g)
    assert all(torch.equal(upd.state[k], g[k]) for k in g)
    agg = Aggregator(g)
    agg.add_compact(sub.module.state_dict(), sub.index_map, 1 + seed % 7)
    assert all(torch.equal(v, g[k]) for k, v in agg.result().items())


def test_running_statistics_come_from_dense_updates_when_any():
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    g = model.state_dict()
    stats = {k for k, b in model.named_buffers() if b.is_floating_point()}
    sub = extract(model, make_plan(model, score_groups(model, [(x, y)], "random"), 0.5))
    pruned = {
        k: v + 1.0 if v.is_floating_point() else v for k, v in sub.module.state_dict().items()
    }
    dense = {k: v + 3.0 if v.is_floating_point() else v for k, v in g.items()}
    for exact in (True, False):
        agg = Aggregator(g, stat_keys=stats, exact_stats=exact)
        agg.add_compact(pruned, sub.index_map, 1.0)
        agg.add_compact(dense, {}, 1.0)
        out = agg.result()
        key = "features.5.running_mean"  # partly covered by the pruned update
        covered = reconstruct(sub, g).mask[key]
        expected_both = g[key] + (3.0 if exact else 2.0)
        torch.testing.assert_close(out[key][covered], expected_both[covered])
        torch.testing.assert_close(out[key][~covered], g[key][~covered] + 3.0)
        w = "features.4.weight"  # parameters are always averaged over all covering updates
        torch.testing.assert_close(
            out[w][reconstruct(sub, g).mask[w]], (g[w] + 2.0)[reconstruct(sub, g).mask[w]]
        )
    agg = Aggregator(g, stat_keys=stats, exact_stats=True)  # no dense update: all covering
    agg.add_compact(pruned, sub.index_map, 1.0)
    key = "features.5.running_var"
    covered = reconstruct(sub, g).mask[key]
    torch.testing.assert_close(agg.result()[key][covered], (g[key] + 1.0)[covered])


@pytest.mark.parametrize("pooled", [False, True])
def test_a_pruned_update_without_statistics_leaves_them_to_the_others(pooled):
    """``statistics=False``: a pruned update's parameters count as usual, its BatchNorm
    statistics as not covered (the dense update's, or the previous global ones, stand)."""
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    g = model.state_dict()
    stats = {k for k, b in model.named_buffers() if b.is_floating_point()}
    sub = extract(model, make_plan(model, score_groups(model, [(x, y)], "random"), 0.5))
    pruned = {k: v + 1.0 for k, v in sub.module.state_dict().items() if k not in stats}
    pruned = {k: v for k, v in pruned.items() if not k.endswith("num_batches_tracked")}
    dense = {k: v + 3.0 if v.is_floating_point() else v for k, v in g.items()}
    w, key = "features.4.weight", "features.5.running_mean"
    mask = reconstruct(sub, g).mask[w]
    for with_dense in (True, False):
        agg = Aggregator(g, stat_keys=stats, exact_stats=True, pooled_variance=pooled)
        agg.add_compact(pruned, sub.index_map, 1.0, statistics=False)
        if with_dense:
            agg.add_compact(dense, {}, 1.0)
        out = agg.result()
        torch.testing.assert_close(out[w][mask], (g[w] + (2.0 if with_dense else 1.0))[mask])
        expected = g[key] + 3.0 if with_dense else g[key]
        torch.testing.assert_close(out[key], expected)
    agg = Aggregator(g, stat_keys=stats, exact_stats=True)
    with pytest.raises(InvalidUpdate, match="missing"):  # statistics are required by default
        agg.add_compact(pruned, sub.index_map, 1.0)
    with pytest.raises(InvalidUpdate, match="dense update must carry"):
        agg.add_compact({k: v for k, v in g.items() if k not in stats}, {}, 1.0, statistics=False)
    with pytest.raises(InvalidUpdate, match="missing"):  # only statistics may be left out
        agg.add_compact({k: v for k, v in pruned.items() if k != w}, sub.index_map, 1.0, False)
    assert agg.count == 0


@pytest.mark.parametrize("exact", [True, False])
def test_pooled_variance_is_the_variance_of_the_pooled_activations(exact):
    """Two clients whose channels see shifted activations: the pooled variance is the mixture's
    variance (mean of variances plus the spread of the means), on covered channels only; it
    composes through partial aggregates like everything else."""
    model = build_model("vgg11", 10, 1, 0.25)
    x, y = batch()
    g = model.state_dict()
    stats = {k for k, b in model.named_buffers() if b.is_floating_point()}
    sub = extract(model, make_plan(model, score_groups(model, [(x, y)], "random"), 0.5))
    key, mkey = "features.5.running_var", "features.5.running_mean"
    covered = reconstruct(sub, g).mask[key]
    a = {k: v.clone() for k, v in sub.module.state_dict().items()}
    a[mkey], a[key] = a[mkey] * 0 + 2.0, a[key] * 0 + 1.0
    b = {k: v.clone() for k, v in g.items()}
    b[mkey], b[key] = b[mkey] * 0 - 1.0, b[key] * 0 + 4.0
    for split in (False, True):
        agg = Aggregator(g, stat_keys=stats, exact_stats=exact, pooled_variance=True)
        if split:  # the same two updates through two edge aggregators
            edge = Aggregator(g, stat_keys=stats, exact_stats=exact, pooled_variance=True)
            edge.add_compact(a, sub.index_map, 1.0)
            agg.add_compact(b, {}, 3.0)
            agg.add_partial(edge.partial())
        else:
            agg.add_compact(a, sub.index_map, 1.0)
            agg.add_compact(b, {}, 3.0)
        out = agg.result()
        if exact:  # statistics from the dense update alone
            torch.testing.assert_close(out[key], torch.full_like(g[key], 4.0))
            continue
        # covered: weights 1 and 3, means 2 and -1, variances 1 and 4
        mean = (1 * 2.0 + 3 * -1.0) / 4
        var = (1 * (1.0 + 4.0) + 3 * (4.0 + 1.0)) / 4 - mean**2
        torch.testing.assert_close(out[mkey][covered], torch.full_like(g[mkey], mean)[covered])
        torch.testing.assert_close(out[key][covered], torch.full_like(g[key], var)[covered])
        # channels only the dense update covered: its variance, exactly
        torch.testing.assert_close(out[key][~covered], torch.full_like(g[key], 4.0)[~covered])
    plain = Aggregator(g)
    plain.add_compact(a, sub.index_map, 1.0)
    plain.add_compact(b, {}, 3.0)
    torch.testing.assert_close(plain.result()[key][covered], torch.full_like(g[key], 3.25)[covered])
    untouched = Aggregator(g, pooled_variance=True)
    untouched.add_compact(a, sub.index_map, 1.0)
    torch.testing.assert_close(untouched.result()[key][~covered], g[key][~covered])


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_parameter_budget_is_met_as_well(allocation):
    model = build_model("vgg11", 10, 1, 0.5)
    x, y = batch()
    scores = score_groups(model, [(x, y)], "curvature")
    dense_params = sum(p.numel() for p in model.parameters())
    dense_flops = training_flops(model, x[:1])
    for keep, param_keep in ((0.6, 0.4), (0.5, 0.5), (0.8, 0.3)):
        plan = make_plan(model, scores, keep, allocation=allocation, param_keep=param_keep)
        sub = extract(model, plan).module
        params = sum(p.numel() for p in sub.parameters()) / dense_params
        assert params <= param_keep + 1e-6 and plan.param_fraction == pytest.approx(params)
        assert training_flops(sub, x[:1]) / dense_flops <= keep + 1e-6
    with pytest.raises(BudgetInfeasible, match="parameters"):
        make_plan(model, scores, 0.5, param_keep=0.001)
