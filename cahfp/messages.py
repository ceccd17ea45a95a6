"""Control messages between coordinator and clients (small JSON, validated with pydantic).

Tensors never travel inside these: a task or update refers to its payload (safetensors bytes,
``cahfp.wire``) which the transport carries alongside. The same classes are used in-process
(simulation) and over MQTT. ``PROTOCOL`` is bumped on incompatible changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cahfp.local_rules import LocalRule
from cahfp.pruning.options import PlanOptions
from cahfp.training import Recipe

MAX_SAMPLES = 10**12  # far above any board's data; keeps the weights finite floats
PROTOCOL = 8  # 3: tasks say whether pruned payloads carry BatchNorm statistics (statistics)
#  4: the training recipe gained logit_adjust
#  5: statistics tasks (purpose), which recompute the global model's BatchNorm statistics
#  6: tasks and the retained status carry the federation's budget settings (budget); a hello
#     can say why the device cannot take part (problem); status and model announcements name
#     their run (run); presence is refreshed (every)
#  7: tasks can carry a local training rule (training: FjORD's ordered dropout, FIARSE's gate)
#  8: plan settings gained rotation (CA-HFP's coverage-aware rotation)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[PROTOCOL] = PROTOCOL


class ModelSpec(BaseModel):
    """The global architecture, so a client can build (or slice) it from the task alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    width: float = Field(gt=0)
    num_classes: int = Field(ge=2)
    in_channels: int = Field(ge=1)
    image_size: int = Field(ge=8)


class BudgetSettings(BaseModel):
    """How a device that measures itself turns its measurement into a keep: the share of the
    deadline and of its memory it plans for, and the range of keeps it may choose (the
    federation's ``clients`` settings; the coordinator caps a device's choice at ``max_keep``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    safety: float = Field(0.8, gt=0, le=1)
    min_keep: float = Field(0.1, gt=0, le=1)
    max_keep: float = Field(1.0, gt=0, le=1)


class TaskMessage(_Message):
    """One client's work for one round. ``payload`` says what the attached bytes hold: the
    dense global model (``state``) or the slice of it the client's plan keeps (``slice``).

    ``purpose = "statistics"``: after aggregation, recompute the BatchNorm running statistics
    of the attached dense model on ``calibration_batches`` local batches (no training, no
    weight change) and answer with those statistics alone (a ``cahfp.state`` payload)."""

    kind: Literal["task"] = "task"
    purpose: Literal["train", "statistics"] = "train"
    task_id: str
    round: int = Field(ge=0)
    client_id: str
    model: ModelSpec
    recipe: Recipe
    keep: float | None = Field(None, gt=0, le=1, description="None: the client decides")
    budget: BudgetSettings = Field(
        default_factory=BudgetSettings, description="how a self-measuring client decides"
    )
    payload: Literal["state", "slice"]
    plan: PlanOptions | None = Field(None, description="set when the client plans itself")
    seed: int = 0
    deadline_s: float = Field(gt=0)
    transfer: str | None = Field(None, description="id of the payload transfer (MQTT)")
    statistics: bool = Field(
        True,
        description="False: a slice payload, and the update of a pruned submodel, leave out the "
        "BatchNorm running statistics (the coordinator takes them from dense updates)",
    )
    calibration_batches: int = Field(
        2, ge=1, le=1024, description="statistics tasks: local batches to measure"
    )
    training: LocalRule | None = Field(
        None, description="how the client trains its submodel; None: plain cross-entropy steps"
    )


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    samples: int = Field(
        ge=0, le=MAX_SAMPLES, description="local dataset size (the aggregation weight)"
    )
    samples_trained: int = Field(
        0, ge=0, le=MAX_SAMPLES * 1000, description="samples processed in training"
    )
    steps: int = Field(0, ge=0)
    train_loss: float | None = None
    keep_target: float | None = None
    keep_achieved: float = Field(1.0, ge=0, le=1.5, description="training-FLOPs fraction")
    keep_budget: float | None = Field(
        None,
        ge=0,
        le=1,
        description="what the device could afford next round (when it measures itself)",
    )
    train_flops: float = Field(0.0, ge=0)
    score_flops: float = Field(0.0, ge=0)
    train_seconds: float = Field(0.0, ge=0)
    score_seconds: float = Field(0.0, ge=0)
    total_seconds: float = Field(0.0, ge=0)
    bytes_down: int = Field(0, ge=0)
    refreshed: bool = False
    reason: str = ""


class UpdateMessage(_Message):
    """A client's answer to a task: ``ok`` with an update payload, ``declined`` (it cannot fit
    the deadline or memory even at the smallest keep; no payload) or ``failed``."""

    kind: Literal["update"] = "update"
    task_id: str
    round: int = Field(ge=0)
    client_id: str
    status: Literal["ok", "declined", "failed"]
    metrics: Metrics
    reason: str = ""
    transfer: str | None = Field(None, description="id of the payload transfer (MQTT)")
