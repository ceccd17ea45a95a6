"""The client's work for one round, independent of how tasks arrive (in-process or MQTT).

receive the model (dense state or the slice its plan keeps) -> on plan-refresh rounds score the
dense model's channel groups on local data and plan under the keep budget -> build the compact
submodel -> train it -> return its compact tensors and index map (the reconstruction into the
global space is exact from these) with metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from cahfp.costs import training_flops
from cahfp.data import ImageData
from cahfp.errors import BudgetInfeasible, CAHFPError, InvalidUpdate
from cahfp.messages import Metrics, ModelSpec, TaskMessage, UpdateMessage
from cahfp.models import build_model
from cahfp.pruning import build_compact, extract, make_plan, score_groups
from cahfp.pruning.extract import IndexMap
from cahfp.training import train
from cahfp.wire import decode_state, decode_update, encode_update


@dataclass
class Result:
    message: UpdateMessage
    payload: bytes | None
    submodel: nn.Module | None = None  # kept for on-device export


@dataclass
class ClientState:
    """What a device keeps between rounds: its data and its current plan."""

    client_id: str
    data: ImageData
    index_map: IndexMap | None = None
    keep_achieved: float = 1.0
    dense_flops: dict[tuple, float] = field(default_factory=dict)


def architecture(spec: ModelSpec, device: str | torch.device | None = None) -> nn.Module:
    """The global model's architecture (on the ``meta`` device it costs no memory)."""
    with torch.device(device or "cpu"):
        return build_model(spec.name, spec.num_classes, spec.in_channels, spec.width, seed=None)


def _load_exact(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise InvalidUpdate(
            f"{what} does not match the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise InvalidUpdate(
                f"{what}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(ref.shape)}"
            )
    module.load_state_dict(tensors, assign=True)
    return module


def submodel_from_slice(spec: ModelSpec, imap: IndexMap, tensors: dict) -> nn.Module:
    """Build the compact submodel directly from a received slice, without ever allocating the
    dense model."""
    skeleton = architecture(spec, "meta")
    return _load_exact(build_compact(skeleton, imap), tensors, "model slice")


def _dense_flops(state: ClientState, spec: ModelSpec) -> float:
    key = (spec.name, spec.width, spec.num_classes, spec.in_channels, spec.image_size)
    if key not in state.dense_flops:
        x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        state.dense_flops[key] = training_flops(architecture(spec), x)
    return state.dense_flops[key]


def run_task(state: ClientState, task: TaskMessage, payload: bytes) -> Result:
    """Execute one task. Bad payloads and infeasible budgets become ``failed``/``declined``
    answers with the reason, never exceptions that would take the device agent down."""
    start = time.perf_counter()
    try:
        return _run(state, task, payload, start)
    except BudgetInfeasible as exc:
        return _answer(task, "declined", str(exc), start, len(payload))
    except (CAHFPError, FloatingPointError) as exc:
        return _answer(task, "failed", f"{type(exc).__name__}: {exc}", start, len(payload))


def _answer(task: TaskMessage, status: str, reason: str, start: float, down: int) -> Result:
    metrics = Metrics(
        samples=0,
        keep_target=task.keep,
        bytes_down=down,
        total_seconds=time.perf_counter() - start,
        reason=reason,
    )
    msg = UpdateMessage(
        task_id=task.task_id,
        round=task.round,
        client_id=task.client_id,
        status=status,
        metrics=metrics,
        reason=reason,
    )
    return Result(msg, None)


def _run(state: ClientState, task: TaskMessage, payload: bytes, start: float) -> Result:
    spec, data = task.model, state.data
    dense_flops = _dense_flops(state, spec)
    score_seconds = score_flops = 0.0
    refreshed = False
    if task.payload == "state":
        tensors, _ = decode_state(payload)
        model = _load_exact(architecture(spec, "meta"), tensors, "global model")
        if task.plan is not None and task.keep is not None and task.keep < 1:
            gen = torch.Generator().manual_seed(task.seed)
            batches = data.batches(
                task.recipe.batch_size, shuffle=True, generator=gen, augment=False
            )
            t0 = time.perf_counter()
            scores = score_groups(
                model,
                batches,
                task.plan.scorer,
                num_batches=task.plan.score_batches,
                seed=task.seed,
                round_idx=task.round,
            )
            plan = make_plan(
                model,
                scores,
                task.keep,
                allocation=task.plan.allocation,
                floor=task.plan.floor,
                multiple=task.plan.multiple,
                interactions=task.plan.interactions,
            )
            sub = extract(model, plan)
            score_seconds = time.perf_counter() - t0
            score_flops = dense_flops * scores.info.get("samples", 0)
            module, imap, achieved = sub.module, sub.index_map, plan.flops_fraction
            refreshed = True
        else:
            module, imap, achieved = model, {}, 1.0
        state.index_map, state.keep_achieved = imap, achieved
    else:
        tensors, imap, meta = decode_update(payload)
        module = submodel_from_slice(spec, imap, tensors)
        achieved = float(meta.get("keep_achieved", state.keep_achieved))
        state.index_map, state.keep_achieved = imap, achieved
    result = train(module, data, task.recipe, seed=task.seed)
    up = encode_update(module.state_dict(), imap, {"round": task.round, "client": task.client_id})
    metrics = Metrics(
        samples=len(data),
        samples_trained=result.samples,
        steps=result.steps,
        train_loss=result.loss,
        keep_target=task.keep,
        keep_achieved=achieved,
        train_flops=dense_flops * achieved * result.samples,
        score_flops=score_flops,
        train_seconds=result.seconds,
        score_seconds=score_seconds,
        total_seconds=time.perf_counter() - start,
        bytes_down=len(payload),
        refreshed=refreshed,
    )
    msg = UpdateMessage(
        task_id=task.task_id,
        round=task.round,
        client_id=task.client_id,
        status="ok",
        metrics=metrics,
    )
    return Result(msg, up, module)
