"""The submodel a tier's client runs (``cahfp.submodels``) and how it is scored: every family of
strategy plans it through the ``Strategy`` interface within the client's keep, the global model
is left alone, and personalised accuracy weighs per-class accuracy by the client's labels."""

import pytest
import torch
from torch import nn

from cahfp.config import PruningConfig
from cahfp.costs import training_flops
from cahfp.data import ImageData
from cahfp.errors import CAHFPError
from cahfp.models import build_model
from cahfp.strategies import get_strategy
from cahfp.submodels import client_submodel, export_plan, personalised_accuracy
from cahfp.training import Recipe, label_frequencies, per_class_accuracy


def _data(labels, images=None, seed=0) -> ImageData:
    labels = torch.as_tensor(labels)
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (len(labels), 1, 28, 28), generator=gen, dtype=torch.uint8)
    return ImageData(images, labels, [str(i) for i in range(10)], (0.5,), (0.5,), "synthetic")


@pytest.mark.parametrize(
    ("strategy", "planner"),
    [("cahfp", "client"), ("heterofl", "coordinator"), ("fedavg", "export default (curvature)")],
)
def test_each_family_plans_within_the_keep_and_leaves_the_global_model(strategy, planner):
    model = build_model("vgg11", 10, 1, 0.25, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.zeros(2, 1, 28, 28)
    pruning = PruningConfig()
    data = _data(torch.arange(160) % 10)
    rec = _Record(index=3, keep=0.4)
    sub = client_submodel(
        get_strategy(strategy)(pruning), model, data, rec, 31, Recipe(), 7, example, pruning
    )
    assert sub.planner == planner
    measured = training_flops(sub.module, example[:1]) / training_flops(model, example[:1])
    assert sub.flops_fraction == pytest.approx(measured)
    assert 0.05 < sub.flops_fraction <= 0.4 + 0.03
    assert sub.statistics_images == 160  # 8 batches of 64, as many as the client holds
    assert not sub.module.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    out = sub.module(example)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_the_dense_default_is_the_export_plan():
    """A dense strategy's clients get exactly ``cahfp export``'s plan on their data."""
    model = build_model("vgg11", 10, 1, 0.25, seed=1).eval()
    example, pruning, data = (
        torch.zeros(2, 1, 28, 28),
        PruningConfig(),
        _data(torch.arange(96) % 10),
    )
    plan = export_plan(model, 0.2, pruning, example, data)
    rec = _Record(index=0, keep=0.2)
    sub = client_submodel(
        get_strategy("fedavg")(pruning), model, data, rec, 5, Recipe(), 0, example, pruning
    )
    assert sub.flops_fraction == pytest.approx(plan.flops_fraction, abs=1e-9)
    with pytest.raises(CAHFPError, match="needs data"):
        export_plan(model, 0.2, pruning, example, None)
    with pytest.raises(CAHFPError, match="keep in"):
        client_submodel(
            get_strategy("fedavg")(pruning), model, data, _Record(0, 1.0), 5, Recipe(), 0,
            example, pruning,
        )  # fmt: skip


class _ByPixel(nn.Module):
    """Predicts the class written in the first pixel (as 0-9), a fixed classifier."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 0.5 + 0.5) * 255  # undo the (0.5, 0.5) normalisation
        return nn.functional.one_hot(cls.round().long(), 10).float()


def test_personalised_accuracy_weighs_per_class_accuracy_by_the_clients_labels():
    # test set: class 0 twice (one predicted right), class 1 twice (both right), class 2 once
    # (wrong); predictions are the first pixel
    predicted = [0, 5, 1, 1, 0]
    images = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.uint8)
    test = _data([0, 0, 1, 1, 2], images)
    per_class = per_class_accuracy(_ByPixel(), test)
    assert per_class[:3].tolist() == [0.5, 1.0, 0.0]
    assert torch.isnan(per_class[3:]).all()  # no test images of those classes
    client = _data([0, 0, 0, 1])  # label frequencies 3/4, 1/4
    assert label_frequencies(client)[:2].tolist() == [0.75, 0.25]
    assert personalised_accuracy(per_class, client) == pytest.approx(0.75 * 0.5 + 0.25 * 1.0)
    with pytest.raises(CAHFPError, match="no images of a class"):
        personalised_accuracy(per_class, _data([0, 4]))


class _Record:
    """A ``PlannedClient`` (what the coordinator records of a client)."""

    def __init__(self, index: int, keep: float):
        self.index, self.keep = index, keep
        self.index_map = None
        self.keep_achieved = 1.0
        self.planned_round = None
        self.planned_keep = None
