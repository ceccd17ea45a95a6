"""The client's work for one round, independent of how tasks arrive (in-process or MQTT).

receive the model (dense state or the slice its plan keeps) -> on plan-refresh rounds score the
dense model's channel groups on local data and plan under the keep budget -> build the compact
submodel -> train it -> return its compact tensors and index map (the reconstruction into the
global space is exact from these) with metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from cahfp.costs import forward_flops, training_flops
from cahfp.data import ImageData
from cahfp.device.budget import DeviceBudget
from cahfp.errors import BudgetInfeasible, CAHFPError, InvalidTask, InvalidUpdate
from cahfp.local_rules import make_step
from cahfp.messages import BudgetSettings, Metrics, ModelSpec, TaskMessage, UpdateMessage
from cahfp.models import build_model
from cahfp.pruning import (
    PlanOptions,
    Scores,
    Submodel,
    build_compact,
    extract,
    make_plan,
    normalised_scores,
    score_groups,
)
from cahfp.pruning.extract import IndexMap, same_index_map
from cahfp.pruning.reconstruct import is_statistic
from cahfp.pruning.sides import checked_sides
from cahfp.training import Recipe, TrainingCancelled, measure_batchnorm_statistics, train
from cahfp.wire import decode_update, encode_state, encode_update


@dataclass
class Result:
    message: UpdateMessage
    payload: bytes | None
    submodel: nn.Module | None = None  # kept for on-device export


@dataclass
class ClientState:
    """What a device keeps between rounds: its data, its current plan and, when it chooses its
    own keep, its budget (``cahfp.device.budget.device_budget``)."""

    client_id: str
    data: ImageData
    index_map: IndexMap | None = None
    keep_achieved: float = 1.0
    dense_flops: dict[tuple, float] = field(default_factory=dict)
    device: DeviceBudget | None = None
    statistics: dict[str, torch.Tensor] | None = None  # BatchNorm buffers of the last submodel
    # where scoring, training and statistics run (``cahfp.device.select.resolve_device``); the
    # model travels, is planned and is encoded on the CPU
    compute_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def time_scale(self) -> float:
        """Seconds of ``clock`` -> the (emulated) device's seconds (1 on a real board)."""
        return self.device.time_scale if self.device else 1.0

    def clock(self) -> float:
        """What this device times its work with (``DeviceBudget.clock``; wall-clock without)."""
        return self.device.clock() if self.device else time.perf_counter()


def data_mismatch(spec: ModelSpec, data: ImageData) -> str:
    """Why ``data`` cannot train the federation's model ``spec`` ("" when it can): another
    number of channels, image size, or more classes than the model has outputs."""
    problems = []
    if data.in_channels != spec.in_channels:
        problems.append(f"{data.in_channels} channels, the model takes {spec.in_channels}")
    if data.image_size != spec.image_size:
        problems.append(
            f"{data.image_size}x{data.image_size} images, the model takes "
            f"{spec.image_size}x{spec.image_size}"
        )
    if data.num_classes > spec.num_classes:
        problems.append(f"{data.num_classes} classes, the model has {spec.num_classes}")
    if not problems:
        return ""
    return "local data does not fit the federation's model: " + "; ".join(problems)


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


def submodel_from_slice(
    spec: ModelSpec,
    payload: bytes,
    kept_map: IndexMap | None = None,
    kept: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, IndexMap, dict]:
    """Build the compact submodel directly from a received slice (with its index map and
    metadata), without ever allocating the dense model. A slice sent without BatchNorm
    statistics takes them from ``kept`` (this client's previous submodel's, planned as
    ``kept_map``) when the slice is of that same submodel, else fresh ones (mean 0, variance 1).
    Training does not read them; the export for local inference measures them again
    (``edge_client.agent``)."""
    skeleton = architecture(spec, "meta")
    tensors, imap, meta = decode_update(payload, skeleton.state_dict())
    compact = build_compact(skeleton, imap)
    if not meta["statistics"]:
        own = kept if kept and kept_map is not None and same_index_map(kept_map, imap) else {}
        tensors = {**tensors, **_statistics_for(compact, own)}
    return _load_exact(compact, tensors, "model slice"), imap, meta


def _statistics_for(module: nn.Module, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics for ``module`` (shapes read from its state dict): ``own``
    where it holds them in the right shape, fresh ones elsewhere."""
    out = {}
    for k, ref in module.state_dict().items():
        if not is_statistic(k):
            continue
        v = own.get(k)
        if v is None or v.shape != ref.shape or v.dtype != ref.dtype:
            fill = torch.ones if k.endswith(".running_var") else torch.zeros
            v = fill(ref.shape, dtype=ref.dtype)
        out[k] = v.clone()
    return out


def _dense_flops(state: ClientState, spec: ModelSpec, forward: bool = False) -> float:
    """Training (or, with ``forward``, inference) FLOPs per sample of the dense model."""
    key = (spec.name, spec.width, spec.num_classes, spec.in_channels, spec.image_size, forward)
    if key not in state.dense_flops:
        x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        count = forward_flops if forward else training_flops
        state.dense_flops[key] = count(architecture(spec), x)
    return state.dense_flops[key]


def run_task(state: ClientState, task: TaskMessage, payload: bytes, should_stop=None) -> Result:
    """Execute one task. Bad payloads and infeasible budgets become ``failed``/``declined``
    answers with the reason, never exceptions that would take the device agent down."""
    start = state.clock()
    try:
        return _run(state, task, payload, start, should_stop)
    except BudgetInfeasible as exc:
        return _answer(state, task, "declined", str(exc), start, len(payload))
    except TrainingCancelled as exc:
        return _answer(state, task, "failed", f"client stopping: {exc}", start, len(payload))
    except (CAHFPError, FloatingPointError) as exc:
        return _answer(state, task, "failed", f"{type(exc).__name__}: {exc}", start, len(payload))


def _answer(
    state: ClientState, task: TaskMessage, status: str, reason: str, start: float, down: int
) -> Result:
    metrics = Metrics(
        samples=0,
        keep_target=task.keep,
        bytes_down=down,
        total_seconds=(state.clock() - start) * state.time_scale,
        reason=reason,
    )
    return Result(_reply(task, status, metrics, reason), None)


def _reply(task: TaskMessage, status: str, metrics: Metrics, reason: str = "") -> UpdateMessage:
    return UpdateMessage(
        task_id=task.task_id,
        round=task.round,
        client_id=task.client_id,
        status=status,
        metrics=metrics,
        reason=reason,
    )


def model_problem(spec: ModelSpec) -> str:
    """Why this device cannot build the federation's model ("" when it can): for your own
    model, its module is missing here or its builder fails. Costs no memory (``meta``)."""
    try:
        architecture(spec, "meta")
    except CAHFPError as exc:
        return str(exc)
    return ""


def round_samples(recipe: Recipe, local: int) -> int:
    """Samples a round of ``recipe`` processes on ``local`` images."""
    return recipe.steps * recipe.batch_size if recipe.steps else math.ceil(recipe.epochs * local)


def decide_keep(
    state: ClientState,
    recipe: Recipe,
    deadline_s: float,
    budget: BudgetSettings,
    score_samples: int = 0,
    elapsed: float = 0.0,
):
    """The device's own budget choice (``KeepChoice``, raises ``BudgetInfeasible``) for a round
    of ``recipe`` under ``deadline_s`` and the federation's ``budget`` settings, scoring
    ``score_samples`` first, ``elapsed`` device seconds of the round already spent."""
    cons = state.device.constraints(
        budget,
        deadline_s,
        round_samples(recipe, len(state.data)),
        recipe.batch_size,
        score_samples,
        elapsed,
    )
    return state.device.model.choose(cons)


def announced_keep(
    state: ClientState,
    recipe: Recipe,
    deadline_s: float,
    budget: BudgetSettings,
    score_samples: int,
) -> tuple[float, str]:
    """What a device announces it can afford before its first task (its hello): the keep for a
    round of ``recipe`` that refreshes its plan (scoring ``score_samples``), and why; keep 0
    when not even ``budget.min_keep`` fits."""
    try:
        choice = decide_keep(state, recipe, deadline_s, budget, score_samples)
    except BudgetInfeasible as exc:
        return 0.0, str(exc)
    return choice.keep, choice.reason


def _dense_model(spec: ModelSpec, payload: bytes) -> tuple[nn.Module, dict]:
    skeleton = architecture(spec, "meta")
    tensors, imap, meta = decode_update(payload, skeleton.state_dict())
    if imap:
        raise InvalidUpdate("the dense model arrived with an index map")
    return _load_exact(skeleton, tensors, "global model"), meta


def _statistics_task(state: ClientState, task: TaskMessage, payload: bytes, start: float):
    """Recompute the received global model's BatchNorm statistics on local batches and answer
    with them alone; the client's plan and training state are left as they were."""
    if task.payload != "state":
        raise InvalidUpdate("a statistics task must carry the dense global model")
    model, _ = _dense_model(task.model, payload)
    model.to(state.compute_device)
    t0 = state.clock()
    images = measure_batchnorm_statistics(
        model, state.data, task.calibration_batches, task.recipe.batch_size, seed=task.seed
    )
    if images == 0:
        raise BudgetInfeasible("too few local images (or no BatchNorm) to measure statistics")
    seconds = (state.clock() - t0) * state.time_scale
    stats = {k: v.cpu() for k, v in model.state_dict().items() if is_statistic(k)}
    up = encode_state(stats, {"round": task.round, "client": task.client_id})
    metrics = Metrics(
        samples=images,
        keep_target=1.0,
        train_flops=_dense_flops(state, task.model, forward=True) * images,
        train_seconds=seconds,
        total_seconds=(state.clock() - start) * state.time_scale,
        bytes_down=len(payload),
    )
    msg = _reply(task, "ok", metrics)
    return Result(msg, up)


@dataclass
class PlannedSubmodel:
    """A client's own plan (``plan_on_data``): the compact submodel (its module, index map and
    plan), the channel scores it was planned from and how many local samples they cost."""

    submodel: Submodel
    scores: Scores
    scored_samples: int


def plan_on_data(
    model: nn.Module,
    data: ImageData,
    keep: float,
    options: PlanOptions,
    recipe: Recipe,
    *,
    seed: int,
    round_idx: int,
    extras: dict[str, torch.Tensor] | None = None,
) -> PlannedSubmodel:
    """What a client that plans itself does with the dense ``model``: score its channel groups
    on ``options.score_batches`` batches of its own ``data`` (``recipe``'s batch size, shuffled
    by ``seed``), plan under ``keep`` with ``options`` (with ``amortize_scoring`` the scoring
    passes, spread over the refresh period, come out of the keep; with ``budget_uplink`` the
    parameters stay within it too), steered by the federation's ``coverage`` and ``anchor``
    side tensors among ``extras`` when it sent them, and extract the compact submodel
    (``model`` is not modified)."""
    gen = torch.Generator().manual_seed(seed)
    batches = data.batches(recipe.batch_size, shuffle=True, generator=gen, augment=False)
    scores = score_groups(
        model,
        batches,
        options.scorer,
        num_batches=options.score_batches,
        seed=seed,
        round_idx=round_idx,
        first_order=options.first_order,
    )
    scored = scores.info.get("samples", 0)
    target = keep
    if options.amortize_scoring:  # scoring FLOPs, spread over the refresh period
        per_round = round_samples(recipe, len(data))
        target = keep - scored / max(per_round, 1) / options.refresh_period
        target = max(target, min(keep, 0.05))
    extras = extras or {}
    plan = make_plan(
        model,
        scores,
        target,
        options,
        coverage=checked_sides(scores.groups, extras, "coverage"),
        anchor=checked_sides(scores.groups, extras, "anchor"),
        seed=seed,
        param_keep=target if options.budget_uplink else None,
        rotation_step=round_idx // options.refresh_period,
    )
    return PlannedSubmodel(extract(model, plan), scores, scored)


def _run(
    state: ClientState, task: TaskMessage, payload: bytes, start: float, should_stop=None
) -> Result:
    problem = data_mismatch(task.model, state.data)
    if problem:
        raise InvalidUpdate(problem)
    if task.purpose == "statistics":
        return _statistics_task(state, task, payload, start)
    spec, data = task.model, state.data
    dense_flops = _dense_flops(state, spec)
    score_seconds = score_flops = 0.0
    refreshed = False
    reported: dict[str, torch.Tensor] = {}
    keep, reason = task.keep, ""
    if task.payload == "state":
        model, meta = _dense_model(spec, payload)
        model.to(state.compute_device)  # scoring runs there; plans are made on the CPU
        if task.plan is not None and keep is None and state.device is not None:
            score_samples = task.plan.score_batches * task.recipe.batch_size
            elapsed = (state.clock() - start) * state.time_scale
            choice = decide_keep(
                state, task.recipe, task.deadline_s, task.budget, score_samples, elapsed
            )
            keep, reason = choice.keep, choice.reason
        if task.plan is not None and keep is not None and keep < 1:
            t0 = state.clock()
            planned = plan_on_data(
                model,
                data,
                keep,
                task.plan,
                task.recipe,
                seed=task.seed,
                round_idx=task.round,
                extras=meta["extras"],
            )
            score_seconds = (state.clock() - t0) * state.time_scale
            score_flops = dense_flops * planned.scored_samples
            sub = planned.submodel
            module, imap, achieved = sub.module, sub.index_map, sub.plan.flops_fraction
            refreshed = True
            if task.plan.anchor_weight > 0:  # the client's view, for the federation's anchor
                report = normalised_scores(planned.scores)
                reported = {f"score/{g.name}": report[g.gid] for g in planned.scores.groups}
        else:
            module, imap, achieved = model, {}, 1.0
        state.index_map, state.keep_achieved = imap, achieved
    else:
        module, imap, meta = submodel_from_slice(spec, payload, state.index_map, state.statistics)
        achieved = float(meta.get("keep_achieved", state.keep_achieved))
        state.index_map, state.keep_achieved = imap, achieved
    module.to(state.compute_device)
    step = None
    if task.training is not None:
        example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        try:
            step = make_step(task.training, module, example, task.seed)
        except (ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidTask(
                f"the task's training rule does not fit its submodel: {exc}"
            ) from None
    result = train(
        module,
        data,
        task.recipe,
        seed=task.seed,
        should_stop=should_stop,
        clock=state.clock,
        step=step,
    )
    train_seconds = result.seconds * state.time_scale
    sender = {"round": task.round, "client": task.client_id}
    module.to("cpu")  # what is sent and kept lives on the CPU
    trained = module.state_dict()
    # a pruned client's statistics stay here when the coordinator takes them from dense updates
    statistics = task.statistics or not imap
    up = encode_update(trained, imap, sender, extras=reported, statistics=statistics)
    state.statistics = (
        {k: v.clone() for k, v in trained.items() if is_statistic(k)} if imap else None
    )
    other = (state.clock() - start - result.seconds) * state.time_scale - score_seconds
    uplink = state.device.uplink_bytes_per_s if state.device else None
    upload = len(up) / uplink if uplink else 0.0
    total = other + score_seconds + train_seconds + upload
    keep_budget = None
    if state.device is not None:
        scored = task.plan.score_batches * task.recipe.batch_size if refreshed else 0
        state.device.model.observe(
            achieved,  # a rule's extra or saved compute is part of what this keep costs here
            result.samples,
            train_seconds,
            max(other, 0.0),
            scored=(scored, score_seconds) if refreshed else None,
        )
        try:  # what this device could afford next round, for the coordinator's planning
            next_round = decide_keep(state, task.recipe, task.deadline_s, task.budget)
            keep_budget = next_round.keep
        except BudgetInfeasible:
            keep_budget = 0.0
    metrics = Metrics(
        samples=len(data),
        samples_trained=result.samples,
        steps=result.steps,
        train_loss=result.loss,
        keep_target=keep,
        keep_achieved=achieved,
        keep_budget=keep_budget,
        train_flops=dense_flops * achieved * result.cost * result.samples,
        score_flops=score_flops,
        train_seconds=train_seconds,
        score_seconds=score_seconds,
        total_seconds=total,
        bytes_down=len(payload),
        refreshed=refreshed,
        reason=reason,
    )
    msg = _reply(task, "ok", metrics)
    return Result(msg, up, module)
