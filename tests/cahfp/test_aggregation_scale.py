"""Streaming aggregation equals the batch computation; hierarchical pre-aggregation composes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cahfp.aggregation import Aggregator
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, reconstruct, score_groups

MODEL = build_model("vgg11", 10, 1, 0.25, seed=0)
X = torch.zeros(2, 1, 28, 28)


def random_updates(n: int, seed: int):
    g = MODEL.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        keep = float(torch.empty(1).uniform_(0.25, 1.0, generator=gen))
        scores = score_groups(MODEL, None, "random", example_input=X, seed=seed * 1000 + i)
        sub = extract(MODEL, make_plan(MODEL, scores, keep))
        with torch.no_grad():
            for p in sub.module.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        weight = float(torch.randint(1, 500, (1,), generator=gen))
        out.append((sub, reconstruct(sub, g), weight))
    return g, out


def batch_mean(g, updates):
    """The definition, computed at once: per coordinate, the weighted mean of covering
    updates; the old value where nobody covered."""
    out = {}
    for k, ref in g.items():
        if not ref.is_floating_point():
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for _, upd, w in updates:
            m = upd.mask[k].double()
            num += upd.state[k].double() * m * w
            den += m * w
        out[k] = torch.where(den > 0, num / den.clamp_min(1e-30), ref.double()).float()
    return out


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_streamed_aggregation_equals_batch(n, seed):
    g, updates = random_updates(n, seed)
    agg = Aggregator(g)
    for sub, _, w in updates:
        agg.add_compact(sub.module.state_dict(), sub.index_map, w)
    got, want = agg.result(), batch_mean(g, updates)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1], [3, 3], [1, 5], [2, 2, 2]])
def test_hierarchical_pre_aggregation_composes(split):
    g, updates = random_updates(sum(split), 7)
    flat = Aggregator(g)
    for sub, _, w in updates:
        flat.add_compact(sub.module.state_dict(), sub.index_map, w)
    root, i = Aggregator(g), 0
    for size in split:  # each edge aggregator pre-averages its own clients
        edge = Aggregator(g)
        for sub, _, w in updates[i : i + size]:
            edge.add_compact(sub.module.state_dict(), sub.index_map, w)
        root.add_partial(edge.partial())
        i += size
    assert root.count == flat.count == len(updates)
    a, b = flat.result(), root.result()
    for k in g:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
