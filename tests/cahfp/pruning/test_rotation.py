"""Coverage-aware rotation (``pruning.rotation``): part of each layer's kept channels is a window
that moves through the channels the curvature plan drops, at the plan's cost, so that a thin
client trains every channel within a bounded number of refreshes."""

import math

import pytest
import torch

from cahfp.config import load_config
from cahfp.errors import ConfigError
from cahfp.models import build_model
from cahfp.pruning import PlanOptions, extract, make_plan, score_groups
from cahfp.pruning.plan import rotate
from cahfp.strategies import get_strategy


def batch(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_rotation_keeps_the_best_channels_and_cycles_the_rest_through_every_channel():
    values = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 0.5])
    kept = torch.tensor([0, 2, 4, 6, 8])  # the five best
    share, size = 0.4, 10
    r = int(share * len(kept))  # 2 rotating slots; core = channels 0, 2, 4
    windows = []
    steps = math.ceil((size - len(kept) + r) / r)  # 7 candidates, 2 a step: 4 steps
    for step in range(steps):
        out = rotate(kept, size, values, share, step)
        assert len(out) == len(kept) and out.tolist() == sorted(set(out.tolist()))
        assert {0, 2, 4} <= set(out.tolist())
        windows.append(set(out.tolist()) - {0, 2, 4})
    assert windows[0] == {1, 3} and windows[1] == {5, 6}  # index order over the non-core channels
    assert set().union(*windows) == set(range(size)) - {0, 2, 4}
    assert rotate(kept, size, values, share, steps).tolist() == [
        0,
        2,
        3,
        4,
        5,
    ]  # cyclic: 8, 9 mod 7
    assert rotate(kept, size, values, 0.1, 3).tolist() == kept.tolist()  # no whole slot: as is
    full = torch.arange(size)
    assert rotate(full, size, values, 0.5, 1).tolist() == full.tolist()  # nothing dropped


@pytest.mark.parametrize("interactions", [False, True])
def test_a_rotated_plan_costs_what_the_plain_plan_costs_and_moves_with_its_step(interactions):
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    scores = score_groups(model, [batch()], "curvature")
    plain = make_plan(model, scores, 0.4, interactions=interactions)
    plans = [
        make_plan(model, scores, 0.4, interactions=interactions, rotation=0.5, rotation_step=s)
        for s in range(6)
    ]
    for plan in plans:
        assert plan.flops_fraction == pytest.approx(plain.flops_fraction)
        assert plan.param_fraction == pytest.approx(plain.param_fraction)
        for g in scores.groups:
            assert len(plan.kept[g.gid]) == len(plain.kept[g.gid])
        # a rotated plan is a real submodel of the same size
        sub = extract(model, plan)
        assert sub.module(batch(2)[0]).shape == (2, 10)
    pruned = [g for g in scores.groups if len(plain.kept[g.gid]) < g.size]
    assert pruned
    for g in pruned:
        seen = set().union(*(set(p.kept[g.gid].tolist()) for p in plans))
        assert len(seen) > len(plain.kept[g.gid]), g.name  # the window moved
        r = int(0.5 * len(plain.kept[g.gid]))
        best = torch.argsort(scores.values[g.gid], descending=True, stable=True)
        if not interactions:  # ranked: the core is the top of the plain plan
            core = set(best[: len(plain.kept[g.gid]) - r].tolist())
            assert all(core <= set(p.kept[g.gid].tolist()) for p in plans)
    assert any(not torch.equal(plans[0].kept[g.gid], plans[1].kept[g.gid]) for g in pruned)


def test_rotation_is_a_cahfp_knob_checked_by_the_configuration():
    cfg = load_config(None, {"pruning.rotation": 0.5})
    assert get_strategy("cahfp")(cfg.pruning).plan_options(1).rotation == 0.5
    assert get_strategy("taylor")(cfg.pruning).plan_options(1).rotation == 0.0
    assert PlanOptions().rotation == 0.0  # off by default
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"pruning\.rotation"):
            load_config(None, {"pruning.rotation": bad})


def test_a_client_rotates_once_per_refresh_but_the_model_a_board_runs_is_not_rotated():
    from cahfp.client_round import plan_on_data
    from cahfp.data import ImageData
    from cahfp.submodels import client_submodel
    from cahfp.training import Recipe

    model = build_model("vgg11", 10, 1, 0.25, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (160, 1, 28, 28), generator=gen, dtype=torch.uint8)
    data = ImageData(
        images, torch.arange(160) % 10, [str(i) for i in range(10)], (0.5,), (0.5,), "s"
    )
    rotating = load_config(None, {"pruning.rotation": 0.5}).pruning
    options = get_strategy("cahfp")(rotating).plan_options(1)

    def kept(rnd):
        sub = plan_on_data(model, data, 0.4, options, Recipe(), seed=3, round_idx=rnd).submodel
        return [sub.plan.kept[g.gid].tolist() for g in sub.plan.groups]

    assert kept(5) == kept(9)  # one refresh period: the same window
    assert kept(5) != kept(10)  # the next refresh: the window moved

    class Record:
        index, keep, index_map = 3, 0.4, None

    example = torch.zeros(2, 1, 28, 28)
    plain = load_config(None, {}).pruning
    exported = [
        client_submodel(
            get_strategy("cahfp")(p), model, data, Record(), 10, Recipe(), 3, example, p
        )
        for p in (rotating, plain)
    ]
    a, b = (e.module.state_dict() for e in exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
