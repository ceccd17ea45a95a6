"""FjORD's ordered dropout (``cahfp.local_rules.ordered_dropout``) and the ``fjord`` and
``fjord-kd`` strategies: what a step trains, what it costs, what the tasks carry, and that the
federation's coverage-weighted mean is the reference code's nested per-width average."""

import json
from functools import reduce

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cahfp.aggregation import Aggregator
from cahfp.local_rules import LocalRule, make_step
from cahfp.messages import TaskMessage
from cahfp.models import build_model
from cahfp.pruning import find_groups
from cahfp.pruning.extract import build_compact, index_map_for
from cahfp.pruning.widths import prefix_counts, prefix_index
from cahfp.training import Recipe, train
from coordinator.inprocess import InProcessTransport
from coordinator.simulation import simulate
from tests.coordinator.test_federation import small_config

X1 = torch.zeros(1, 1, 28, 28)


def _dense():
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    return model, find_groups(model, X1)


def _slice(model, groups, p):
    imap = index_map_for(model, groups, prefix_index(groups, p))
    return build_compact(model, imap), imap


def _rule(groups, widths, **kw):
    sizes = {g.name: g.size for g in groups}
    return LocalRule(kind="ordered-dropout", widths=widths, group_sizes=sizes, **kw)


def _data(n=96, seed=0):
    from cahfp.data.datasets import ImageData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData(x, y, [str(i) for i in range(10)], (0.5,), (0.25,), "noise")


def test_a_rule_with_only_the_clients_own_width_trains_exactly_as_plain_steps():
    model, groups = _dense()
    a, _ = _slice(model, groups, 0.6)
    b, _ = _slice(model, groups, 0.6)
    recipe = Recipe(epochs=1, batch_size=32)
    step = make_step(_rule(groups, (0.6,)), b, X1, seed=5)
    ra = train(a, _data(), recipe, seed=5)
    rb = train(b, _data(), recipe, seed=5, step=step)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ra.loss == rb.loss and rb.cost == 1.0


def test_widths_are_drawn_uniformly_from_a_seeded_sequence():
    model, groups = _dense()
    sub, _ = _slice(model, groups, 0.6)
    rule = _rule(groups, (0.2, 0.4, 0.6))

    def drawn(seed):
        step = make_step(rule, sub.eval(), X1, seed)
        costs = []
        x, y = torch.randn(1, 1, 28, 28), torch.arange(1)
        for _ in range(300):
            with torch.no_grad():
                costs.append(step(sub, x, y, None)[1])
        return costs

    first = drawn(7)
    assert first == drawn(7)
    assert first != drawn(8)
    levels = sorted(set(first))
    assert len(levels) == 3 and levels[-1] == 1.0 and levels[0] < 0.2
    for c in levels:  # each width about a third of the steps
        assert 0.25 < first.count(c) / len(first) < 0.42


def test_a_narrow_step_leaves_the_channels_beyond_its_width_untouched():
    model, groups = _dense()
    sub, _ = _slice(model, groups, 0.6)
    rule = _rule(groups, (0.2, 0.6))
    step = make_step(rule, sub, X1, seed=0)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    narrow_counts = prefix_counts(find_groups(sub, X1), 1.0)  # compact sizes
    for _ in range(20):  # find a step drawn at width 0.2
        sub.zero_grad()
        loss, cost = step(sub, x, y, None)
        if cost < 1:
            break
    assert cost < 1
    loss.backward()
    counts = {g.name: n for g, n in zip(groups, prefix_counts(groups, 0.2).values(), strict=True)}
    conv = sub.features[0]
    n = counts[next(g.name for g in groups if g.name.startswith("features.0"))]
    assert conv.weight.grad[:n].abs().sum() > 0
    assert not conv.weight.grad[n:].any()
    assert narrow_counts  # the slice has its own groups


def test_distillation_teaches_the_narrow_width_the_widest_widths_soft_outputs():
    model, groups = _dense()
    sub, _ = _slice(model, groups, 1.0)
    rule = _rule(groups, (0.4, 1.0), distill=True)
    step = make_step(rule, sub, X1, seed=0)
    sub.eval()  # deterministic passes for the check
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(20):
        loss, cost = step(sub, x, y, None)
        if cost > 1:
            break
    assert cost > 1  # teacher pass plus the narrow student pass
    teacher = sub(x)
    narrow = step.nested(step.counts[0], x)
    expected = F.cross_entropy(teacher, y) + F.cross_entropy(narrow, teacher.detach().softmax(1))
    torch.testing.assert_close(loss, expected)
    for _ in range(20):
        loss, cost = step(sub, x, y, None)
        if cost == 1:
            break
    assert cost == 1  # drawn at the widest width: no student pass, same gradient
    torch.testing.assert_close(loss, F.cross_entropy(teacher, y))


def test_the_coverage_weighted_mean_is_fjords_nested_per_width_average():
    """Flower's baselines/fjord ``fjord_average``, ported: widest width first, each width's
    block is the sample-weighted mean over the clients whose width reaches it."""
    model, groups = _dense()
    widths, samples = (0.45, 0.63, 1.0), (30.0, 50.0, 70.0)
    updates = []
    for i, p in enumerate(widths):
        sub, imap = _slice(model, groups, p)
        g = torch.Generator().manual_seed(i)
        compact = {
            k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in sub.state_dict().items()
        }
        updates.append((compact, imap))
    agg = Aggregator(model.state_dict())
    for (compact, imap), w in zip(updates, samples, strict=True):
        agg.add_compact(compact, imap, w)
    ours = agg.result()

    def fjord_average(key, full):
        out = full.clone().numpy()
        for level in range(len(widths) - 1, -1, -1):  # the reference's p_s[::-1]
            members = [(u, w) for (u, w) in zip(updates, samples, strict=True)][level:]
            imap = updates[level][1]
            idx = [slice(None)] * out.ndim
            for dim, sel in imap.get(key, {}).items():
                idx[dim] = slice(0, len(sel))
            block = reduce(np.add, [u[0][key].numpy()[tuple(idx)] * w for u, w in members])
            out[tuple(idx)] = block / sum(w for _, w in members)
        return out

    for key, full in model.state_dict().items():
        if not full.is_floating_point():
            continue
        np.testing.assert_allclose(
            ours[key].numpy(), fjord_average(key, full), rtol=1e-5, atol=1e-6
        )


def test_rules_that_do_not_describe_nested_widths_are_refused():
    _, groups = _dense()
    for widths in [(), (0.6, 0.4), (0.5, 1.2), (0.0, 0.5)]:
        with pytest.raises(ValidationError):
            _rule(groups, widths)
    with pytest.raises(ValidationError):
        LocalRule(kind="ordered-dropout", widths=(0.5,))


@pytest.mark.parametrize("strategy", ["fjord", "fjord-kd"])
def test_fjord_tasks_carry_each_clients_widths_and_count_their_cost(
    fmnist_root, tmp_path, monkeypatch, strategy
):
    tasks: list[TaskMessage] = []
    send = InProcessTransport.send

    def recording(self, task, payload, rebuild=None):
        tasks.append(task)
        return send(self, task, payload, rebuild)

    monkeypatch.setattr(InProcessTransport, "send", recording)
    cfg = small_config(fmnist_root, strategy, rounds=2)
    simulate(cfg, tmp_path / "run", quiet=True)
    train_tasks = [t for t in tasks if t.purpose == "train"]
    assert train_tasks and all(t.training is not None for t in train_tasks)
    grid = max((t.training.widths for t in train_tasks), key=len)
    assert grid[-1] == 1.0 and len(grid) == 4  # the tiers' widths and the dense one
    for t in train_tasks:
        w = t.training.widths
        assert w == tuple(p for p in grid if p <= w[-1])
        assert (t.payload == "state") == (w[-1] == 1.0)
        assert t.training.distill == (strategy == "fjord-kd")
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    from cahfp.costs import training_flops

    dense = training_flops(build_model("vgg11", 10, 1, 0.25), X1)
    thinnest = min(c["keep_target"] for r in records[1:] for c in r["clients"])
    for c in [c for r in records[1:] for c in r["clients"] if c["status"] == "ok"]:
        plain = dense * c["keep_achieved"] * c["samples_trained"]
        if c["keep_target"] == thinnest:  # no narrower width to draw: plain steps
            assert c["train_flops"] == pytest.approx(plain)
        elif strategy == "fjord":
            assert c["train_flops"] < plain  # narrower widths cost less
        else:
            assert c["train_flops"] > plain  # the teacher pass is extra


def test_a_rule_that_does_not_describe_the_received_slice_fails_the_task_in_one_line():
    """A malformed or hostile rule is refused when the task is parsed (sizes out of range) or
    answered ``failed`` with the reason (widths that are not the slice it came with); the
    device agent goes on."""
    from cahfp.client_round import ClientState, run_task
    from cahfp.messages import ModelSpec
    from cahfp.wire import encode_update

    model, groups = _dense()
    sizes = {g.name: g.size for g in groups}
    huge = {**sizes, next(iter(sizes)): 10**400}
    with pytest.raises(ValidationError):
        LocalRule(kind="ordered-dropout", widths=(0.5, 1.0), group_sizes=huge)
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    doubled = {k: 2 * v for k, v in sizes.items()}  # the dense model is only half of "1.0"
    task = TaskMessage(
        task_id="t",
        round=1,
        client_id="c",
        model=spec,
        recipe=Recipe(epochs=1, batch_size=32),
        keep=1.0,
        payload="state",
        deadline_s=600,
        training=LocalRule(kind="ordered-dropout", widths=(0.5, 1.0), group_sizes=doubled),
    )
    task = TaskMessage.model_validate_json(task.model_dump_json())  # as it travels
    result = run_task(ClientState("c", _data()), task, encode_update(model.state_dict(), {}))
    assert result.message.status == "failed"
    assert "InvalidTask: ordered-dropout rule's width 1 is not within the submodel" in (
        result.message.reason
    )
    assert "\n" not in result.message.reason


def test_a_keep_below_the_narrowest_width_is_infeasible():
    from cahfp.errors import BudgetInfeasible
    from cahfp.pruning.widths import width_for_keep

    _, groups = _dense()
    with pytest.raises(BudgetInfeasible, match="below the FLOPs of the narrowest width"):
        width_for_keep(groups, 1e-6)
