"""Ensemble distillation on the coordinator (FedDF: Lin et al., "Ensemble Distillation for
Robust Model Fusion in Federated Learning", NeurIPS 2020), for submodels of one global model.

After aggregation, every accepted update of the round is rebuilt as the compact submodel it
is, and the global model learns to reproduce their mean outputs on unlabelled images that no
client holds. A thin client's submodel has seen only its own data, through only its own
channels; its outputs carry that data into every channel of the global model, those no thin
submodel keeps included, at no cost to the client (docs/method.md, "Server-side ensemble
distillation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cahfp.data import ImageData
from cahfp.data.datasets import random_crop_flip
from cahfp.pruning.extract import IndexMap, build_compact
from cahfp.training import measure_batchnorm_statistics


class EnsembleDistillation:
    """Collects a round's accepted submodels (``add``) and distils them into the global model
    (``apply``). Teachers' BatchNorm statistics are measured on the unlabelled images (a pruned
    update may leave its own out); the ensemble's output is the mean of the teachers' logits."""

    def __init__(
        self,
        images: ImageData,
        steps: int,
        lr: float = 1e-3,
        temperature: float = 1.0,
        batch_size: int = 64,
        statistics_batches: int = 4,
    ):
        if len(images) < 2:
            raise ValueError("ensemble distillation needs at least two unlabelled images")
        self.images = images
        self.steps = steps
        self.lr = lr
        self.temperature = temperature
        self.batch_size = batch_size
        self.statistics_batches = statistics_batches
        self.teachers: list[tuple[str, dict[str, torch.Tensor], IndexMap]] = []

    def add(self, compact: dict[str, torch.Tensor], imap: IndexMap, key: str = "") -> None:
        """Keep an accepted update (its compact tensors and index map) as a teacher; ``key``
        (its client) orders the teachers, so that arrival order does not change the sum."""
        self.teachers.append((key, {k: v.detach() for k, v in compact.items()}, imap))

    def clear(self) -> None:
        self.teachers = []

    def _teacher(self, model: nn.Module, compact, imap, seed: int) -> nn.Module:
        teacher = build_compact(model, imap) if imap else _copy(model)
        teacher.load_state_dict(compact, strict=False)  # statistics may be left out: measured
        measure_batchnorm_statistics(
            teacher, self.images, self.statistics_batches, self.batch_size, seed=seed
        )
        return teacher.eval()

    @torch.no_grad()
    def ensemble_logits(self, model: nn.Module, seed: int) -> torch.Tensor:
        """The teachers' mean logits on every unlabelled image (``model``: the global model,
        whose architecture the submodels are cut from)."""
        total = None
        for _, compact, imap in sorted(self.teachers, key=lambda t: t[0]):
            teacher = self._teacher(model, compact, imap, seed)
            out = torch.cat([teacher(x) for x, _ in self.images.batches(256, augment=False)])
            total = out if total is None else total + out
        return total / len(self.teachers)

    def apply(self, model: nn.Module, seed: int) -> float:
        """Distil this round's teachers into ``model`` in place (then forget them); returns the
        mean distillation loss (0 without teachers or steps)."""
        if not self.teachers or self.steps == 0:
            self.clear()
            return 0.0
        targets = self.ensemble_logits(model, seed)
        self.clear()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        t = self.temperature
        was_training = model.training
        model.train()
        data = self.images
        n = len(data)
        loss_sum = 0.0
        for _ in range(self.steps):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=gen)
            x = data.images[idx]
            if data.augment:
                x = random_crop_flip(x, gen)
            x = data.normalize(x)
            soft = F.softmax(targets[idx] / t, dim=1)
            loss = F.cross_entropy(model(x) / t, soft) * t * t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        model.train(was_training)
        return loss_sum / self.steps


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
