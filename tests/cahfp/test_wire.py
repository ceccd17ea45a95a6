"""The packed update format: exact round trips, a header that stays small, and every malformed
or mismatched payload refused with ``InvalidUpdate`` naming the problem."""

import contextlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from cahfp.errors import InvalidUpdate
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.wire import decode_update, encode_update


def submodel(name: str, keep: float, width: float = 0.5):
    model = build_model(name, 10, 1, width, seed=0)
    scores = score_groups(model, None, "random", torch.zeros(2, 1, 28, 28), seed=1)
    return model, extract(model, make_plan(model, scores, keep))


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_round_trip_is_exact_and_the_header_stays_small(name):
    model, sub = submodel(name, 0.3)
    state = sub.module.state_dict()
    data = encode_update(state, sub.index_map, {"round": 4, "client": "pi-01"})
    compact, imap, meta = decode_update(data, model.state_dict())
    assert meta == {
        "format": "cahfp.update/2",
        "round": 4,
        "client": "pi-01",
        "extras": {},
        "statistics": True,
    }
    assert compact.keys() == state.keys()
    for k, v in state.items():
        assert compact[k].dtype == v.dtype and torch.equal(compact[k], v), k
    assert imap.keys() == sub.index_map.keys()
    for k, dims in sub.index_map.items():
        assert imap[k].keys() == dims.keys()
        assert all(torch.equal(imap[k][d], idx) for d, idx in dims.items())
    header = int.from_bytes(data[:8], "little")
    values = sum(v.numel() * v.element_size() for v in state.values())
    # a few hundred bytes of header plus rows, whatever the number of tensors (resnet20: 100+)
    assert header < 1024 and len(state) > 50
    index = sum(len(i) for d in sub.index_map.values() for i in d.values())
    assert len(data) - values - header - 8 < 4 * index + 64 * 8 + 6 * index


def test_statistics_can_be_left_out_and_their_index_rows_stay():
    """``statistics=False``: the BatchNorm running statistics carry no bytes; everything else,
    and the index map (statistics included), decodes as before."""
    model, sub = submodel("resnet20", 0.3)
    state = sub.module.state_dict()
    stats = {k for k in state if k.endswith(("running_mean", "running_var", "batches_tracked"))}
    assert stats
    full = encode_update(state, sub.index_map)
    data = encode_update(state, sub.index_map, statistics=False)
    saved = sum(state[k].numel() * state[k].element_size() for k in stats)
    assert len(full) - len(data) >= saved
    compact, imap, meta = decode_update(data, model.state_dict())
    assert meta["statistics"] is False and set(compact) == set(state) - stats
    assert all(torch.equal(compact[k], state[k]) for k in compact)
    assert imap.keys() == sub.index_map.keys() and any(k in imap for k in stats)
    bad = save(load(data), {"cahfp": json.dumps({**json.loads(_meta(data)), "statistics": 0})})
    with pytest.raises(InvalidUpdate, match="statistics flag"):
        decode_update(bad, model.state_dict())
    # a header that claims the statistics are there when their bytes are not: too short
    lying = save(load(data), {"cahfp": json.dumps({**json.loads(_meta(data)), "statistics": True})})
    with pytest.raises(InvalidUpdate, match=r"too short|data holds"):
        decode_update(lying, model.state_dict())


def test_dense_state_with_side_tensors():
    """The dense model sent to a client: no index map, the planner's coverage alongside."""
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    coverage = {"coverage/features.0": torch.rand(16)}
    data = encode_update(model.state_dict(), {}, {"round": 2}, extras=coverage)
    compact, imap, meta = decode_update(data, model.state_dict())
    assert imap == {} and all(torch.equal(compact[k], v) for k, v in model.state_dict().items())
    assert meta["round"] == 2 and torch.equal(
        meta["extras"]["coverage/features.0"], coverage["coverage/features.0"]
    )
    tensors = load(data)
    tensors["z"] = torch.zeros(1)
    with pytest.raises(InvalidUpdate, match="unexpected tensors"):
        decode_update(save(tensors, {"cahfp": _meta(data)}), model.state_dict())


def _meta(data: bytes) -> str:
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["cahfp"]


def test_mismatched_updates_are_refused_with_the_reason():
    model, sub = submodel("vgg11", 0.5)
    state, layout = sub.module.state_dict(), model.state_dict()
    other = build_model("vgg16", 10, 1, 0.5, seed=0).state_dict()
    with pytest.raises(InvalidUpdate, match="packed for a different model"):
        decode_update(encode_update(state, sub.index_map), other)
    short = dict(state, **{"classifier.weight": state["classifier.weight"][:5]})
    with pytest.raises(InvalidUpdate, match=r"float32 data .* is too short for"):
        decode_update(encode_update(short, sub.index_map), layout)
    wide = dict(state, **{"classifier.bias": torch.zeros(40)})
    with pytest.raises(InvalidUpdate, match=r"float32 data holds 1[0-9]+ values"):
        decode_update(encode_update(wide, sub.index_map), layout)
    double = dict(state, **{"classifier.bias": state["classifier.bias"].double()})
    with pytest.raises(InvalidUpdate, match=r"float(32|64) data"):
        decode_update(encode_update(double, sub.index_map), layout)
    missing = {k: v for k, v in state.items() if k != "classifier.bias"}
    with pytest.raises(InvalidUpdate, match="different model"):
        decode_update(encode_update(missing, {}), layout)
    with pytest.raises(InvalidUpdate, match=r"expected a cahfp\.update/2"):
        decode_update(save({"x": torch.zeros(1)}, {"cahfp": json.dumps({"format": "x"})}), layout)
    sliced = next(iter(sub.index_map))
    bad = {k: {d: i.clone() for d, i in dims.items()} for k, dims in sub.index_map.items()}
    first = bad[sliced][min(bad[sliced])]
    first[-1] = 10_000
    with pytest.raises(InvalidUpdate, match="leaves the range"):
        decode_update(encode_update(state, bad), layout)
    first[-1] = first[0]
    with pytest.raises(InvalidUpdate, match="repeats an index"):
        decode_update(encode_update(state, bad), layout)
    with pytest.raises(ValueError, match="has no tensor"):
        encode_update({k: v for k, v in state.items() if k != sliced}, sub.index_map)


SMALL, SMALL_SUB = submodel("vgg11", 0.5, width=0.125)
PACKED = encode_update(SMALL_SUB.module.state_dict(), SMALL_SUB.index_map)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["i", "o", "m"]),
    st.integers(0, 10_000),
    st.integers(-(2**15), 2**15 - 1),
    st.booleans(),
)
def test_tampered_index_tables_only_raise_invalid_update(name, at, value, truncate):
    """Any change to the index tables either still decodes into in-range, distinct indices or
    raises InvalidUpdate; never another exception."""
    tensors = load(PACKED)
    t = tensors[name].clone().reshape(-1)
    if truncate:
        t = t[: at % (len(t) + 1)]
    elif len(t):
        t[at % len(t)] = value % 256 if t.dtype == torch.uint8 else value
    tensors[name] = t.reshape(-1, 3) if name == "m" and len(t) % 3 == 0 else t
    data = save(tensors, {"cahfp": _meta(PACKED)})
    with contextlib.suppress(InvalidUpdate):
        layout = SMALL.state_dict()
        compact, imap, _ = decode_update(data, layout)
        assert all(c.dim() == layout[k].dim() for k, c in compact.items())
        for k, dims in imap.items():
            for d, idx in dims.items():
                assert len(set(idx.tolist())) == len(idx) and idx.min() >= 0
                assert idx.max() < layout[k].shape[d]


@pytest.mark.parametrize(("rows", "dtype"), [(200, torch.uint8), (300, torch.int16)])
def test_index_tables_take_the_narrowest_dtype(rows, dtype):
    layout = {"w": torch.zeros(rows, 4), "b": torch.zeros(rows)}
    idx = torch.tensor([0, 7, rows - 1])
    imap = {"w": {0: idx}, "b": {0: idx}}
    compact = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    data = encode_update(compact, imap)
    assert load(data)["i"].dtype == dtype and len(load(data)["i"]) == 3  # shared vector, once
    out, back, _ = decode_update(data, layout)
    assert torch.equal(back["w"][0], idx) and torch.equal(out["w"], compact["w"])
