"""Server-side ensemble distillation (``cahfp.distillation``, ``aggregation.distill_steps``):
the global model moves towards the round's submodels' mean outputs on unlabelled images that
no client holds; off by default; a configuration without those images is one clear line."""

import pytest
import torch
import torch.nn.functional as F

from cahfp.config import load_config
from cahfp.data.datasets import ImageData
from cahfp.distillation import EnsembleDistillation
from cahfp.errors import ConfigError
from cahfp.models import build_model
from cahfp.pruning import find_groups
from cahfp.pruning.extract import build_compact, index_map_for
from cahfp.pruning.widths import prefix_index
from coordinator.simulation import distillation_data, federation_data, simulate
from tests.coordinator.test_federation import small_config


def _images(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageData(
        x,
        torch.zeros(n, dtype=torch.long),
        [str(i) for i in range(10)],
        (0.5,),
        (0.25,),
        "unlabelled",
    )


def _teachers(model):
    groups = find_groups(model, torch.zeros(1, 1, 28, 28))
    out = []
    for i, p in enumerate((0.5, 1.0)):
        other = build_model("vgg11", 10, 1, 0.25, seed=10 + i)
        imap = index_map_for(other, groups, prefix_index(groups, p)) if p < 1 else {}
        sub = build_compact(other, imap) if imap else other
        out.append(({k: v for k, v in sub.state_dict().items() if "running" not in k}, imap))
    return out


def _gap(model, distiller, teachers):
    """KL from the teachers' mean output to ``model``'s, on the unlabelled images."""
    for c, imap in teachers:
        distiller.add(c, imap)
    target = distiller.ensemble_logits(model, seed=0)
    distiller.clear()
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x) for x, _ in distiller.images.batches(256, augment=False)])
    return F.kl_div(out.log_softmax(1), target.softmax(1), reduction="batchmean").item()


def test_the_global_model_learns_the_submodels_mean_output():
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    distiller = EnsembleDistillation(_images(), steps=30, lr=1e-3, batch_size=32)
    teachers = _teachers(model)
    before = _gap(model, distiller, teachers)
    twin = build_model("vgg11", 10, 1, 0.25, seed=0)
    for c, imap in teachers:  # a pruned teacher carries no BatchNorm statistics: measured
        distiller.add(c, imap)
    distiller.apply(model, seed=3)
    for c, imap in teachers:
        distiller.add(c, imap)
    distiller.apply(twin, seed=3)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # deterministic under the seed
    assert _gap(model, distiller, teachers) < 0.5 * before
    assert distiller.teachers == []  # a round's teachers are forgotten


def test_without_teachers_or_steps_nothing_changes():
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert EnsembleDistillation(_images(), steps=5).apply(model, seed=0) == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_distillation_needs_unlabelled_images_named_in_one_line():
    expected = r"aggregation\.distill_steps needs data\.distill_samples"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, {"aggregation.distill_steps": 10, "data.train_samples": 100})


def test_the_unlabelled_images_are_held_by_no_client_nor_the_validation_set(fmnist_root):
    cfg = small_config(
        fmnist_root,
        "cahfp",
        **{
            "aggregation.distill_steps": 5,
            "data.distill_samples": 300,
            "data.eval_split": "validation",
        },
    )
    clients, held_out, _ = federation_data(cfg)
    images = distillation_data(cfg)
    assert len(images) == 300
    seen = {bytes(x.numpy()) for c in [*clients, held_out] for x in c.images}
    assert not any(bytes(x.numpy()) in seen for x in images.images)
    plain = small_config(fmnist_root, "cahfp")
    assert distillation_data(plain) is None
    for a, b in zip(clients, federation_data(plain)[0], strict=True):  # the clients' split
        assert torch.equal(a.targets, b.targets)  # does not change


def test_a_federation_with_distillation_runs_and_differs_from_one_without(fmnist_root, tmp_path):
    extra = {"data.train_samples": 400, "data.eval_samples": 200}
    plain = simulate(small_config(fmnist_root, "heterofl", rounds=1, **extra), None, quiet=True)
    distilled = simulate(
        small_config(
            fmnist_root,
            "heterofl",
            rounds=1,
            **extra,
            **{"aggregation.distill_steps": 5, "data.distill_samples": 200},
        ),
        tmp_path / "run",
        quiet=True,
    )
    assert distilled["rounds"] == 1 and distilled["client_updates"] == plain["client_updates"]
    assert distilled["final_loss"] != plain["final_loss"]
