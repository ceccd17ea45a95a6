"""Nested widths (FjORD's ordered dropout): a narrower width run as views of the wider model
computes what the extracted submodel computes, and trains the wider model's leading slices."""

import pytest
import torch

from cahfp.models import build_model
from cahfp.pruning import extract, find_groups, make_plan, score_groups
from cahfp.pruning.extract import build_compact, index_map_for
from cahfp.pruning.widths import (
    NestedWidths,
    flops_fraction,
    prefix_counts,
    prefix_index,
    width_for_keep,
)

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,width", [("vgg11", 0.25), ("resnet20", 0.5)])
def test_a_narrow_width_computes_what_its_extracted_submodel_computes(name, width):
    model = build_model(name, 10, 1, width, seed=0).eval()
    groups = find_groups(model, X[:2])
    nested = NestedWidths(model, groups)
    for p in (0.2, 0.5, 1.0):
        counts = prefix_counts(groups, p)
        imap = index_map_for(model, groups, prefix_index(groups, p))
        sub = build_compact(model, imap).eval()
        torch.testing.assert_close(nested(counts, X), sub(X))


def test_a_step_at_a_narrow_width_trains_the_leading_slices_in_place():
    model = build_model("vgg11", 10, 1, 0.25, seed=0).train()
    groups = find_groups(model, X[:2])
    nested = NestedWidths(model, groups)
    counts = prefix_counts(groups, 0.4)
    imap = index_map_for(model, groups, prefix_index(groups, 0.4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nested(counts, X).sum().backward()
    after = model.state_dict()
    for key, dims in imap.items():
        t = after[key]
        for dim, idx in dims.items():
            rest = t.narrow(dim, len(idx), t.shape[dim] - len(idx))
            old = before[key].narrow(dim, len(idx), t.shape[dim] - len(idx))
            assert torch.equal(rest, old), key  # beyond the width: untouched
        param = dict(model.named_parameters()).get(key)
        if param is not None:
            for dim, idx in dims.items():
                beyond = param.grad.narrow(dim, len(idx), param.shape[dim] - len(idx))
                assert not beyond.any(), key
    stats = [k for k in imap if k.endswith("running_mean")]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)
    tracked = [k for k in after if k.endswith("num_batches_tracked")]
    assert all(int(after[k]) == int(before[k]) + 1 for k in tracked)


def test_the_width_for_a_keep_is_the_widest_that_fits_it():
    model = build_model("resnet20", 10, 1, 0.5, seed=0)
    groups = find_groups(model, X[:2])
    widths = [width_for_keep(groups, k) for k in (0.2, 0.4, 0.6, 1.0)]
    assert widths == sorted(widths) and widths[-1] == 1.0
    for keep, p in zip((0.2, 0.4, 0.6), widths, strict=False):
        assert flops_fraction(groups, p) <= keep + 1e-9
        assert flops_fraction(groups, p + 1 / 256) > keep
    with pytest.raises(ValueError, match="width"):
        prefix_counts(groups, 0.0)


def test_the_extracted_prefix_plan_and_the_nested_counts_agree():
    """A client holds the prefix slice at its widest width; the narrower widths of that slice
    are the global model's narrower prefixes."""
    model = build_model("vgg11", 10, 1, 0.25, seed=0).eval()
    groups = find_groups(model, X[:2])
    plan = make_plan(model, score_groups(model, None, "ordered", example_input=X[:2]), 0.6)
    sub = extract(model, plan).module.eval()
    sub_groups = find_groups(sub, X[:2])
    nested_sub = NestedWidths(sub, sub_groups)
    p = 0.2
    global_counts = prefix_counts(groups, p)
    counts = {g.gid: min(global_counts[g.gid], g.size) for g in sub_groups}
    torch.testing.assert_close(nested_sub(counts, X), NestedWidths(model, groups)(global_counts, X))
