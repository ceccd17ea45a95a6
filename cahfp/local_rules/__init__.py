"""Training rules that some strategies give their clients instead of plain cross-entropy
steps on the received submodel, carried in the task (``TaskMessage.training``):

- ``ordered-dropout`` (FjORD): every batch trains a nested width of the received submodel,
  drawn from the strategy's widths up to the client's own; optionally distilled from the
  client's widest width (``ordered_dropout``);
- ``threshold-gate`` (FIARSE): channels whose importance falls below the round's threshold
  are gated off, with the threshold function trained through (``threshold_gate``).

``make_step`` turns a rule into the ``cahfp.training.Step`` that ``train`` runs."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from cahfp.training import Step


class LocalRule(BaseModel):
    """How a client trains its submodel in one round (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: Literal["ordered-dropout", "threshold-gate"]
    widths: tuple[float, ...] = Field(
        (),
        description="ordered-dropout: the widths drawn from, increasing; the last is the "
        "received submodel's",
    )
    group_sizes: dict[str, Annotated[int, Field(ge=1, le=2**31)]] = Field(
        default_factory=dict,
        description="ordered-dropout: each channel group's size in the dense model, by its "
        "root layer (a width p keeps ceil(p x size) channels of it)",
    )
    distill: bool = Field(
        False,
        description="ordered-dropout: distil the widest width into "
        "the drawn one (FjORD's knowledge distillation)",
    )
    kd_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of the distillation term in "
        "the narrower width's loss (the rest: the labels)",
    )
    kd_temperature: float = Field(1.0, gt=0, le=100)
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="threshold-gate: the round's threshold of each channel group, by root layer",
    )
    scores: dict[str, list[Annotated[float, Field(ge=0)]]] = Field(
        default_factory=dict,
        description="threshold-gate: the coordinator's importance of each kept channel, by "
        "group and in the slice's order (the gate follows each channel's change from it); "
        "a group without: the client's own importances at the start",
    )
    ste: bool = Field(True, description="threshold-gate: train through the threshold function")

    @model_validator(mode="after")
    def _complete(self) -> LocalRule:
        if self.kind == "ordered-dropout":
            w = self.widths
            if not w or any(not 0 < p <= 1 for p in w) or any(a >= b for a, b in pairwise(w)):
                raise ValueError("ordered-dropout needs increasing widths in (0, 1]")
            if not self.group_sizes or min(self.group_sizes.values()) < 1:
                raise ValueError("ordered-dropout needs every group's dense size (>= 1)")
        if self.kind == "threshold-gate" and (
            not self.thresholds or min(self.thresholds.values()) < 0
        ):
            raise ValueError("threshold-gate needs a threshold >= 0 for each group")
        return self


def make_step(rule: LocalRule, module: nn.Module, example: torch.Tensor, seed: int) -> Step:
    """The training step ``rule`` prescribes for ``module`` (the client's submodel; ``example``
    an input batch of one image; ``seed`` the round's seed)."""
    if rule.kind == "ordered-dropout":
        from cahfp.local_rules.ordered_dropout import OrderedDropout

        return OrderedDropout(rule, module, example, seed)
    from cahfp.local_rules.threshold_gate import ThresholdGate

    return ThresholdGate(rule, module, example, seed)


__all__ = ["LocalRule", "make_step"]
