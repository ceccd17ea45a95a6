"""Local SGD training and evaluation, deterministic under a seed on CPU. Each runs on the device
``model`` lives on: batches are drawn on the CPU (the same draws everywhere) and moved there."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from cahfp.data.datasets import ImageData
from cahfp.device.select import model_device


class Recipe(BaseModel):
    """How a client trains in one round. Exactly one of ``epochs`` and ``steps`` is used:
    ``steps`` wins when both are set."""

    model_config = ConfigDict(extra="forbid")

    epochs: float | None = Field(1.0, gt=0)
    steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    logit_adjust: float = Field(1.0, ge=0, le=10)

    @model_validator(mode="after")
    def _one_length(self) -> Recipe:
        if self.epochs is None and self.steps is None:
            raise ValueError("a recipe needs epochs or steps")
        return self

    def num_steps(self, num_samples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_samples / self.batch_size))


class TrainingCancelled(Exception):
    """``train`` was asked to stop (e.g. the device agent received SIGTERM)."""


class Step(Protocol):
    """One training step's loss, for rules that train differently from plain cross-entropy
    (``cahfp.local_rules``): returns the loss to backpropagate and the step's compute relative
    to one forward and backward pass of ``model`` on the batch."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]: ...


@dataclass
class TrainResult:
    steps: int
    samples: int
    loss: float
    seconds: float
    cost: float = 1.0  # the steps' compute relative to plain steps of the model (sample-weighted)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    samples: int


def train(
    model: nn.Module,
    data: ImageData,
    recipe: Recipe,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    step: Step | None = None,
) -> TrainResult:
    """Run local SGD on ``model`` in place. Batches are drawn by a generator seeded with
    ``seed``; the data is reshuffled every epoch and the last partial batch is kept.
    ``should_stop`` is checked before every step (raises ``TrainingCancelled``); the result's
    seconds are ``clock``'s. ``step`` replaces the plain (logit-adjusted) cross-entropy step."""
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    total_steps = recipe.num_steps(len(data))
    dev = model_device(model)
    shift = label_shift(data, recipe.logit_adjust)
    if shift is not None:
        shift = shift.to(dev)
    model.train()
    steps = samples = 0
    loss_sum = cost_sum = 0.0
    start = clock()
    while steps < total_steps:
        for x, y in data.batches(recipe.batch_size, shuffle=True, generator=gen):
            if len(y) < 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot normalise a single sample
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"stopped after {steps} of {total_steps} steps")
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad(set_to_none=True)
            if step is None:
                out = model(x)
                loss, cost = F.cross_entropy(out if shift is None else out + shift, y), 1.0
            else:
                loss, cost = step(model, x, y, shift)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {steps}; lower the learning rate"
                )
            loss.backward()
            opt.step()
            steps += 1
            samples += len(y)
            loss_sum += loss.item() * len(y)
            cost_sum += cost * len(y)
            if steps >= total_steps:
                break
    n = max(samples, 1)
    return TrainResult(
        steps, samples, loss_sum / n, clock() - start, cost_sum / n if samples else 1.0
    )


def label_shift(data: ImageData, tau: float) -> torch.Tensor | None:
    """``tau x log(local label frequency)``, added to the logits in the training loss
    (logit adjustment / balanced softmax): classes the client rarely or never sees are not pushed
    down just for being absent from its data. None when ``tau`` is 0."""
    if tau == 0:
        return None
    return tau * torch.log(label_frequencies(data).clamp_min(1e-8))


def label_frequencies(data: ImageData) -> torch.Tensor:
    """Each class's share of ``data``'s labels (float32, sums to 1; zeros when empty)."""
    counts = torch.bincount(data.targets.long(), minlength=data.num_classes).float()
    return counts / counts.sum().clamp_min(1)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 256) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    loss = correct = 0.0
    for x, y in data.batches(batch_size, augment=False):
        x, y = x.to(dev), y.to(dev)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(len(data), 1)
    return EvalResult(loss / n, correct / n, len(data))


@torch.no_grad()
def per_class_accuracy(model: nn.Module, data: ImageData, batch_size: int = 256) -> torch.Tensor:
    """Top-1 accuracy on each class's images of ``data`` in eval mode (float64, NaN for a class
    without images)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(data.num_classes, dtype=torch.float64)
    for x, y in data.batches(batch_size, augment=False):
        hit = (model(x.to(model_device(model))).argmax(1).cpu() == y).double()
        correct.index_add_(0, y.long(), hit)
    model.train(was_training)
    counts = torch.bincount(data.targets.long(), minlength=data.num_classes).double()
    return correct / counts  # 0 / 0 = NaN


@torch.no_grad()
def measure_batchnorm_statistics(
    model: nn.Module, data: ImageData, num_batches: int = 8, batch_size: int = 64, seed: int = 0
) -> int:
    """Recompute every BatchNorm layer's running statistics from ``num_batches`` batches of
    ``data`` (plain average, no augmentation); everything else stays in eval mode and no weight
    changes. Returns the number of images used (0 when the model has no BatchNorm or ``data``
    has fewer than two images, and then nothing is touched).

    A submodel cut out of a larger model inherits statistics measured with the removed channels
    still feeding each layer; they no longer describe its activations, and a pruned model can
    fall to chance accuracy until they are recomputed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(data) < 2 or num_batches <= 0:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the measured batches
        m.train()
    seen = 0
    gen = torch.Generator().manual_seed(seed)
    try:
        for i, (x, _) in enumerate(
            data.batches(batch_size, shuffle=True, generator=gen, augment=False)
        ):
            if i >= num_batches:
                break
            if len(x) < 2:
                continue
            model(x.to(model_device(model)))
            seen += len(x)
    except BaseException:
        seen = 0  # an interrupted pass: put back the statistics it had
        raise
    finally:
        for m, momentum, old in zip(norms, momenta, saved, strict=True):
            m.momentum = momentum
            if seen == 0:  # no usable batch, or interrupted: keep the statistics it had
                m.load_state_dict(old)
        model.train(was_training)
    return seen


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
