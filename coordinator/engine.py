"""Transport-agnostic round logic: select participants, send each a task, gather and validate
updates until the deadline, aggregate them (streaming), evaluate, record, checkpoint."""

from __future__ import annotations

import random
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cahfp.aggregation import Aggregator, StatisticsPool
from cahfp.config import Config
from cahfp.costs import training_flops
from cahfp.errors import CAHFPError, InvalidUpdate
from cahfp.messages import ModelSpec, PlanSettings, TaskMessage, UpdateMessage
from cahfp.models import build_model
from cahfp.momentum import ServerMomentum
from cahfp.pruning import find_groups, index_map_for, make_plan, score_groups
from cahfp.pruning.extract import IndexMap, kept_channels, slice_tensor
from cahfp.strategies import get_strategy
from cahfp.training import EvalResult
from cahfp.wire import decode_state, decode_update, encode_update
from coordinator.transport import Rejected, Transport


class RoundInterrupted(Exception):
    """The transport was stopped while a round waited for its answers: the round is abandoned
    (nothing of it is applied or recorded)."""


@dataclass
class ClientRecord:
    """What the coordinator knows about one client."""

    client_id: str
    index: int
    keep: float  # its budget: fraction of dense training FLOPs
    index_map: IndexMap | None = None
    keep_achieved: float = 1.0
    planned_round: int | None = None  # round its current plan was made
    # the budget its current plan was made for (its FLOPs can be lower: scoring is amortized)
    planned_keep: float | None = None


@dataclass
class ClientOutcome:
    client_id: str
    status: str  # ok | declined | failed | rejected | missing
    reason: str = ""
    keep_target: float | None = None
    keep_achieved: float | None = None
    samples: int = 0
    samples_trained: int = 0
    train_flops: float = 0.0
    score_flops: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0
    score_seconds: float = 0.0
    refreshed: bool = False
    # its statistics task after aggregation (its bytes are counted in bytes_up/bytes_down):
    # "" = none sent, "ok", or why its answer was not used; and the FLOPs it reported
    calibration: str = ""
    calibration_flops: float = 0.0


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    loss: float | None
    seconds: float
    aggregated: int
    skipped: str = ""
    clients: list[ClientOutcome] = field(default_factory=list)
    aggregate_seconds: float = 0.0
    eval_seconds: float = 0.0
    coverage_min: float | None = None  # smallest share of the round's weight covering a channel
    coverage_mean: float | None = None
    cpu_seconds: float = 0.0  # coordinator process CPU time spent in this round
    peak_rss_mb: float = 0.0  # coordinator process peak resident memory so far
    transport: dict = field(default_factory=dict)  # the transport's own counters (Transport.stats)
    calibration_seconds: float = 0.0  # the statistics phase: tasks sent to answers pooled


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB). On Linux the memory map's high-water mark
    (``VmHWM``): ``ru_maxrss`` also counts the parent's memory at the ``fork`` / ``exec`` that
    started this process, so under a big parent (a benchmark) it measures the parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RoundEngine:
    def __init__(
        self,
        config: Config,
        spec: ModelSpec,
        transport: Transport,
        evaluate: Callable[[nn.Module], EvalResult],
        client_keeps: dict[str, float],
        on_event: Callable[[str, dict], None] | None = None,
    ):
        self.cfg = config
        self.spec = spec
        self.transport = transport
        self.evaluate = evaluate
        self.strategy = get_strategy(config.federation.strategy)
        self.model = build_model(
            spec.name, spec.num_classes, spec.in_channels, spec.width, seed=config.federation.seed
        )
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.stat_keys = {k for k, b in self.model.named_buffers() if b.is_floating_point()}
        self.momentum = ServerMomentum(config.aggregation.server_momentum, self.stat_keys)
        self.param_keys = {k for k, _ in self.model.named_parameters()}
        self.param_count = sum(p.numel() for p in self.model.parameters())
        self.example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
        self.dense_flops = training_flops(self.model, self.example[:1])
        self.clients = {
            cid: ClientRecord(cid, i, keep)
            for i, (cid, keep) in enumerate(sorted(client_keeps.items()))
        }
        self.on_event = on_event or (lambda kind, data: None)
        self.round = 0
        self.self_budget = config.clients.budget == "measured"  # clients choose their keep
        self.budget_settings = config.clients.settings()
        self._announced: dict[str, float | None] = {}  # the keep each client last announced
        self.groups = None if self.strategy.dense else find_groups(self.model, self.example)
        self.coverage: dict[int, torch.Tensor] | None = None  # decayed average share per channel
        self._round_cover: dict[int, torch.Tensor] | None = None
        # CA-HFP anchor: decayed, sample-weighted average of the clients' normalised scores
        self.anchor: dict[int, torch.Tensor] | None = None
        self._round_scores: dict[int, torch.Tensor] = {}
        self._round_score_weight = 0.0
        self._dense_cache: tuple[tuple, bytes] = ((), b"")
        self._ordered_plans: dict[float, tuple[IndexMap, float]] = {}

    # ------------------------------------------------------------------ selection and tasks

    def register(
        self, cid: str, measured: float | None = None, restored: bool = False
    ) -> ClientRecord:
        """Add a client that appeared (e.g. sent its hello) with the keep its own measurement
        chose (None: it does not measure itself), or (``restored``) the keep a checkpoint
        recorded for it; its index fixes its seeds."""
        index = len(self.clients)
        rec = self.clients[cid] = ClientRecord(cid, index, 1.0)
        self._announced[cid] = measured
        if self.self_budget:
            self._adopt(rec, measured)
            wanted = 1.0 if measured is None else measured
            source = "its own measurement" if measured is not None else "it does not measure"
            source = "restored from the checkpoint" if restored else source
            if rec.keep < wanted:
                source += f", capped at clients.max_keep {self.cfg.clients.max_keep:g}"
        else:
            rec.keep = self.cfg.keep_of(index)
            source = "fixed tier" + (f"; it measured {measured:.2f}" if measured else "")
        self.on_event("registered", {"client": cid, "keep": rec.keep, "source": source})
        return rec

    def _adopt(self, rec: ClientRecord, measured: float | None) -> None:
        """Take a device's own choice of keep, capped at the federation's maximum (never
        replaced: a device that measured nothing is taken as able to train the dense model)."""
        rec.keep = min(1.0 if measured is None else measured, self.cfg.clients.max_keep)

    def eligible(self) -> list[str]:
        available = set(self.transport.clients())
        for cid in sorted(available - set(self.clients)):
            self.register(cid, self.transport.keep_estimate(cid))
        if self.self_budget:  # a device re-announces its keep when its measurement changes
            for cid in sorted(available & set(self.clients)):
                estimate = self.transport.keep_estimate(cid)
                if estimate is not None and estimate != self._announced.get(cid):
                    self._announced[cid] = estimate
                    self._adopt(self.clients[cid], estimate)
        ids = [c for c in sorted(self.clients) if c in available and self.clients[c].keep > 0]
        if self.strategy.fit_only:
            ids = [c for c in ids if self.clients[c].keep >= 1.0]
        return ids

    def select(self, rnd: int) -> list[str]:
        ids = self.eligible()
        if not ids:
            return []
        count = max(1, round(self.cfg.federation.participation * len(ids)))
        rng = random.Random(self.cfg.federation.seed * 100_003 + rnd)
        return sorted(rng.sample(ids, min(count, len(ids))))

    def _allocation(self) -> str:
        alloc = self.cfg.pruning.allocation
        return self.strategy.allocation if alloc == "auto" else alloc

    def _sides(self, plan: PlanSettings | None) -> tuple[str, ...]:
        """The per-channel side tensors a dense task's planner asks for and the coordinator has."""
        if plan is None:
            return ()
        sides = []
        if plan.coverage_weight > 0 and self.coverage is not None:
            sides.append("coverage")
        if plan.anchor_weight > 0 and self.anchor is not None:
            sides.append("anchor")
        return tuple(sides)

    def _dense_payload(self, rnd: int, sides: tuple[str, ...]) -> bytes:
        """The dense global model with the requested side tensors, encoded once per round
        (every dense task shares it)."""
        key = (rnd, sides)
        if self._dense_cache[0] != key:
            source = {"coverage": self.coverage, "anchor": self.anchor}
            extras = {f"{s}/{g.name}": source[s][g.gid].float() for s in sides for g in self.groups}
            self._dense_cache = (key, encode_update(self.state, {}, extras=extras))
        return self._dense_cache[1]

    def _slice(self, rec: ClientRecord, statistics: bool = True) -> bytes:
        imap = rec.index_map or {}
        tensors = {k: slice_tensor(v, imap.get(k, {})) for k, v in self.state.items()}
        meta = {"keep_achieved": rec.keep_achieved}
        return encode_update(tensors, imap, meta, statistics=statistics)

    def _rebuilder(self, task: TaskMessage):
        rec = self.clients[task.client_id]
        if task.payload == "slice":
            return lambda: self._slice(rec, task.statistics)
        sides = self._sides(task.plan)
        return lambda: self._dense_payload(task.round, sides)

    def _coordinator_plan(self, rec: ClientRecord, rnd: int) -> None:
        p = self.cfg.pruning
        if self.strategy.scorer == "ordered" and rec.keep in self._ordered_plans:
            # HeteroFL's plan depends on the keep fraction only
            rec.index_map, rec.keep_achieved = self._ordered_plans[rec.keep]
            rec.planned_keep = rec.keep
            self._mark_planned(rec, rnd)
            return
        scores = score_groups(
            self.model,
            None,
            self.strategy.scorer,
            example_input=self.example,
            round_idx=rnd,
            seed=self.cfg.federation.seed * 7919 + rec.index + rnd * 104_729,
        )
        plan = make_plan(
            self.model,
            scores,
            rec.keep,
            allocation=self._allocation(),
            floor=p.floor,
            multiple=p.multiple,
        )
        rec.index_map = index_map_for(self.model, plan.groups, plan.keep)
        rec.keep_achieved, rec.planned_keep = plan.flops_fraction, rec.keep
        if self.strategy.scorer == "ordered":
            self._ordered_plans[rec.keep] = (rec.index_map, rec.keep_achieved)
        self._mark_planned(rec, rnd)

    def _temperature(self, rnd: int) -> float:
        """The plan temperature for round ``rnd`` (1-based) under the configured schedule."""
        p = self.cfg.pruning
        if p.temperature_schedule == "linear":
            rounds = self.cfg.federation.rounds
            return p.temperature * max(0.0, (rounds - rnd) / max(rounds - 1, 1))
        return p.temperature

    def _plan_due(self, rec: ClientRecord, rnd: int) -> bool:
        if rec.index_map is None or rec.planned_round is None:
            return True
        if self.strategy.scorer == "rolling":
            return rnd != rec.planned_round  # the window moves every round by definition
        planned = rec.keep_achieved if rec.planned_keep is None else rec.planned_keep
        shrank = rec.keep < planned - 0.05  # the device can no longer afford its plan
        grew = rec.keep > planned + 0.1 and rec.keep_achieved < 1
        if shrank or grew:
            return True
        if self.strategy.scorer == "ordered":
            return False  # the first channels never change
        return rnd - rec.planned_round >= self.cfg.pruning.refresh_period

    def _mark_planned(self, rec: ClientRecord, rnd: int) -> None:
        """Record that ``rec``'s plan was made in ``rnd``. With staggering, a client's first plan
        counts as made ``index mod period`` rounds earlier, so that refreshes spread evenly over
        the rounds (each refresh then sees coverage that includes the others' recent choices)."""
        first = rec.planned_round is None
        period = self.cfg.pruning.refresh_period
        offset = rec.index % period if first and self.cfg.pruning.stagger_refresh else 0
        rec.planned_round = rnd - offset

    def statistics_wanted(self, selected: list[str]) -> bool:
        """Whether this round's pruned clients must send (and receive) BatchNorm running
        statistics. With ``exact_stats`` the aggregate takes them from dense updates whenever one
        arrives, so a pruned client's are wasted bytes in a round where some participant is
        expected to train the dense model (its keep, or its last reported budget, is 1).
        ``aggregation.omit_pruned_stats`` turns the saving on."""
        a = self.cfg.aggregation
        if not (a.omit_pruned_stats and a.exact_stats) or self.strategy.dense:
            return True
        return not any(self.clients[c].keep >= 1 for c in selected)

    def _task(self, cid: str, rnd: int, **fields) -> TaskMessage:
        """A task for ``cid`` in round ``rnd``: a fresh id, the model, the recipe and the
        client's seed for the round (training and statistics tasks alike), plus ``fields``."""
        seed = self.cfg.federation.seed * 1_000_003 + rnd * 1009 + self.clients[cid].index
        return TaskMessage(
            task_id=uuid.uuid4().hex,
            round=rnd,
            client_id=cid,
            model=self.spec,
            recipe=self.cfg.train,
            seed=seed,
            budget=self.budget_settings,
            **fields,
        )

    def make_task(self, cid: str, rnd: int, statistics: bool = True) -> tuple[TaskMessage, bytes]:
        """The task for client ``cid`` in round ``rnd`` and its payload. ``statistics=False``:
        a pruned client's slice and update leave out the BatchNorm running statistics."""
        rec, p, strat = self.clients[cid], self.cfg.pruning, self.strategy
        kind, plan, payload = "state", None, None
        if strat.dense:
            keep = None
        elif strat.site == "coordinator":
            keep = min(rec.keep, 1.0)
            if keep < 1:
                if self._plan_due(rec, rnd):
                    self._coordinator_plan(rec, rnd)
                kind, payload = "slice", self._slice(rec, statistics)
        elif self._plan_due(rec, rnd):
            keep = None if self.self_budget else min(rec.keep, 1.0)
            if keep is None or keep < 1:
                plan = PlanSettings(
                    scorer=strat.scorer,
                    allocation=self._allocation(),
                    score_batches=p.score_batches,
                    floor=p.floor,
                    multiple=p.multiple,
                    interactions=p.interactions,
                    first_order=p.first_order,
                    gradient=p.gradient,
                    refresh_period=p.refresh_period,
                    amortize_scoring=p.amortize_scoring,
                    budget_uplink=self.cfg.uplink_capped(),
                    coverage_weight=p.coverage_weight if strat.name == "cahfp" else 0.0,
                    temperature=self._temperature(rnd) if strat.name == "cahfp" else 0.0,
                    anchor_weight=p.anchor_weight if strat.name == "cahfp" else 0.0,
                )
        else:  # between refreshes: the slice of the client's current plan
            keep = rec.keep_achieved
            if rec.index_map:
                kind, payload = "slice", self._slice(rec, statistics)
        if payload is None:
            payload = self._dense_payload(rnd, self._sides(plan))
        task = self._task(
            cid,
            rnd,
            keep=keep,
            payload=kind,
            plan=plan,
            deadline_s=self.cfg.federation.deadline_s,
            statistics=statistics,
        )
        return task, payload

    # ------------------------------------------------------------------ one round

    def run_round(self, rnd: int) -> RoundRecord:
        start, cpu_start = time.perf_counter(), time.process_time()
        selected = self.select(rnd)
        self.on_event("round_start", {"round": rnd, "selected": selected})
        sent: dict[str, tuple[TaskMessage, int]] = {}
        statistics = self.statistics_wanted(selected)
        for cid in selected:
            task, payload = self.make_task(cid, rnd, statistics)
            # the transport may need the payload again (resend after a reconnect): rebuild it
            # then instead of holding one payload per client in memory
            self.transport.send(task, payload, rebuild=self._rebuilder(task))
            sent[task.task_id] = (task, len(payload))
            del payload
        a = self.cfg.aggregation
        agg = Aggregator(
            self.state, a.uncovered_weight, self.stat_keys, a.exact_stats, a.pooled_variance
        )
        if self.groups is not None:
            self._round_cover = {
                g.gid: torch.zeros(g.size, dtype=torch.float64) for g in self.groups
            }
            self._round_scores = {
                g.gid: torch.zeros(g.size, dtype=torch.float64) for g in self.groups
            }
            self._round_score_weight = 0.0
        outcomes: dict[str, ClientOutcome] = {}
        agg_seconds = 0.0
        need = min(self.cfg.federation.min_updates, max(len(selected), 1))
        for attempt in range(2):  # the deadline, then one extension if too few updates came
            deadline = time.monotonic() + self.cfg.federation.deadline_s
            task_of = {task.client_id: t for t, (task, _) in sent.items()}
            pending = {
                t
                for t, (task, _) in sent.items()
                if outcomes.get(task.client_id) is None
                or outcomes[task.client_id].status == "rejected"
            }
            for item in self.transport.collect(pending, deadline):
                t0 = time.perf_counter()
                if isinstance(item, Rejected):
                    outcome = self._transport_rejection(item, sent, outcomes)
                else:
                    outcome = self.accept(item[0], item[1], sent, agg, outcomes)
                agg_seconds += time.perf_counter() - t0
                if outcome is not None:
                    outcomes[outcome.client_id] = outcome
                    self.on_event("client_done", {"round": rnd, "outcome": outcome})
                    if outcome.status != "rejected":  # a final answer; after a rejection the
                        pending.discard(task_of[outcome.client_id])  # genuine one may follow
            if self.transport.stopped():
                raise RoundInterrupted(f"round {rnd} abandoned: stopped while collecting")
            if agg.count >= need or not selected or attempt == 1:
                break
            if all(o.status in ("ok", "declined", "failed") for o in outcomes.values()) and len(
                outcomes
            ) == len(sent):
                break  # everybody answered: waiting longer cannot help
            self.on_event("extended", {"round": rnd, "updates": agg.count, "need": need})
        for task, down in sent.values():
            if task.client_id not in outcomes:
                outcomes[task.client_id] = ClientOutcome(
                    task.client_id,
                    "missing",
                    "no update before the deadline",
                    keep_target=task.keep,
                    bytes_down=down,
                )
        cov_min, cov_mean = self._update_coverage(agg.total_weight)
        self._update_anchor()
        skipped = ""
        calibration_seconds = 0.0
        if agg.count >= need and agg.count:
            t0 = time.perf_counter()
            self.state = self.momentum.step(self.state, agg.result())
            self.model.load_state_dict(self.state)
            agg_seconds += time.perf_counter() - t0
            if self.cfg.aggregation.calibrate_statistics and self.stat_keys:
                t0 = time.perf_counter()
                self._calibrate(rnd, outcomes)
                calibration_seconds = time.perf_counter() - t0
        else:
            skipped = (
                f"only {agg.count} valid updates (need "
                f"{self.cfg.federation.min_updates}); global model unchanged"
            )
        accuracy = loss = None
        eval_seconds = 0.0
        if rnd % self.cfg.federation.eval_every == 0 or rnd == self.cfg.federation.rounds:
            t0 = time.perf_counter()
            res = self.evaluate(self.model)
            eval_seconds = time.perf_counter() - t0
            accuracy, loss = res.accuracy, res.loss
        self.round = rnd
        record = RoundRecord(
            rnd,
            accuracy,
            loss,
            time.perf_counter() - start,
            agg.count,
            skipped,
            [outcomes[c] for c in sorted(outcomes)],
            agg_seconds,
            eval_seconds,
            cov_min,
            cov_mean,
            time.process_time() - cpu_start,
            peak_rss_mb(),
            self.transport.stats(),
            calibration_seconds,
        )
        self.on_event("round_end", {"record": record})
        return record

    def _calibrate(self, rnd: int, outcomes: dict[str, ClientOutcome]) -> None:
        """The statistics phase: the round's dense participants (those that trained the whole
        model; at most ``calibration_clients`` of them, a seeded sample) measure the new global
        model's BatchNorm statistics on their data; the pooled result replaces the averaged
        statistics. Averaged statistics describe each client's own trained weights, not the
        aggregate, which pruned updates move away from all of them. Without a dense
        participant, or without a valid answer before the deadline, the averaged statistics
        stay. Bytes and FLOPs are added to each client's outcome."""
        calibrators = [
            cid
            for cid, o in sorted(outcomes.items())
            if o.status == "ok" and (o.keep_achieved is None or o.keep_achieved >= 1)
        ]
        cap = self.cfg.aggregation.calibration_clients
        if len(calibrators) > cap:
            rng = random.Random(self.cfg.federation.seed * 100_019 + rnd)
            calibrators = sorted(rng.sample(calibrators, cap))
        if not calibrators:
            return
        payload = encode_update(self.state, {})
        wait = min(self.cfg.aggregation.calibration_deadline_s, self.cfg.federation.deadline_s)
        sent: dict[str, TaskMessage] = {}
        for cid in calibrators:
            task = self._task(
                cid,
                rnd,
                keep=1.0,
                payload="state",
                purpose="statistics",
                deadline_s=wait,
                calibration_batches=self.cfg.aggregation.calibration_batches,
            )
            self.transport.send(task, payload, rebuild=lambda: payload)
            sent[task.task_id] = task
            outcomes[cid].bytes_down += len(payload)
            outcomes[cid].calibration = "no answer before the deadline"
        pool = StatisticsPool(self.state)
        pending = set(sent)
        for item in self.transport.collect(pending, time.monotonic() + wait):
            if isinstance(item, Rejected):
                self.on_event("rejected", {"client": item.client_id, "reason": item.reason})
                if item.task_id in sent:
                    outcomes[sent[item.task_id].client_id].calibration = item.reason
                continue
            msg, data = item
            problem = self._mismatch(msg, sent.get(msg.task_id))
            if problem:
                self._refuse(msg, problem)
                continue
            out = outcomes[msg.client_id]
            if out.calibration == "ok":
                self.transport.acknowledge(msg, True, "duplicate")
                continue
            if msg.status != "ok":  # a final answer: the client cannot measure
                out.calibration = f"{msg.status}: {msg.reason or msg.metrics.reason}"
                pending.discard(msg.task_id)
                self.transport.acknowledge(msg, True, "noted: " + msg.status)
                continue
            try:
                if data is None:
                    raise InvalidUpdate("status ok but no payload")
                stats, _ = decode_state(data)
                pool.add(stats, float(msg.metrics.samples))
            except CAHFPError as exc:  # the genuine answer may still follow
                out.calibration = f"rejected: {exc}"
                self._refuse(msg, str(exc))
                continue
            out.calibration = "ok"
            out.bytes_up += len(data)
            out.calibration_flops += msg.metrics.train_flops
            pending.discard(msg.task_id)
            self.transport.acknowledge(msg, True)
        measured = pool.result()
        self.on_event("calibrated", {"round": rnd, "clients": pool.count, "asked": len(sent)})
        if measured:
            self.state.update(measured)
            self.model.load_state_dict(self.state)

    def _transport_rejection(self, item: Rejected, sent, done) -> ClientOutcome | None:
        self.on_event("rejected", {"client": item.client_id, "reason": item.reason})
        task = next((t for t, _ in sent.values() if t.client_id == item.client_id), None)
        if task is None or item.client_id in done:
            return None
        return ClientOutcome(
            item.client_id,
            "rejected",
            item.reason,
            keep_target=task.keep,
            bytes_down=sent[task.task_id][1],
        )

    def _mismatch(self, msg: UpdateMessage, task: TaskMessage | None) -> str:
        """Why ``msg`` does not answer ``task`` (the task sent under its task id, None when
        none was), or "" when it does."""
        if msg.client_id not in self.clients:
            return f"unknown client {msg.client_id!r}"
        if task is None:
            return f"no task {msg.task_id[:12]} in round {self.round + 1} (stale or forged)"
        if msg.client_id != task.client_id or msg.round != task.round:
            return "client id or round does not match the task"
        return ""

    def _refuse(self, msg: UpdateMessage, reason: str) -> None:
        self.on_event("rejected", {"client": msg.client_id, "reason": reason})
        self.transport.acknowledge(msg, False, reason)

    def accept(
        self,
        msg: UpdateMessage,
        payload: bytes | None,
        sent,
        agg: Aggregator,
        done: dict[str, ClientOutcome],
    ) -> ClientOutcome | None:
        """Validate one answer and fold it into the aggregate; an invalid one is recorded as
        rejected (with the reason) and changes nothing."""
        problem = self._mismatch(msg, sent[msg.task_id][0] if msg.task_id in sent else None)
        if problem:
            self._refuse(msg, problem)
            return None
        task, down = sent[msg.task_id]
        if msg.client_id in done and done[msg.client_id].status == "ok":
            # a duplicate delivery counts once; confirm again so the client stops resending
            self.transport.acknowledge(msg, True, "duplicate")
            return None
        m = msg.metrics
        out = ClientOutcome(
            msg.client_id,
            msg.status,
            msg.reason or m.reason,
            keep_target=m.keep_target if m.keep_target is not None else task.keep,
            keep_achieved=m.keep_achieved,
            samples=m.samples,
            samples_trained=m.samples_trained,
            train_flops=m.train_flops,
            score_flops=m.score_flops,
            bytes_up=len(payload or b""),
            bytes_down=down,
            train_seconds=m.train_seconds,
            score_seconds=m.score_seconds,
            refreshed=m.refreshed,
        )
        if msg.status != "ok":
            self.transport.acknowledge(msg, True, "noted: " + msg.status)
            return out
        try:
            if payload is None:
                raise InvalidUpdate("status ok but no payload")
            compact, imap, meta = decode_update(payload, self.state)
            if m.samples < 1:
                raise InvalidUpdate("an update must report at least one sample")
            reported = self._reported_scores(meta["extras"], m.refreshed)
            if task.statistics and not meta["statistics"]:
                raise InvalidUpdate("update leaves out the BatchNorm statistics the task asked for")
            agg.add_compact(
                compact, imap, self._weight(compact, m.samples), statistics=meta["statistics"]
            )
        except CAHFPError as exc:
            out.status, out.reason = "rejected", str(exc)
            self._refuse(msg, str(exc))
            return out
        self.transport.acknowledge(msg, True)
        if reported is not None:
            for gid, s in reported.items():
                self._round_scores[gid] += m.samples * s.to(torch.float64)
            self._round_score_weight += m.samples
        if self._round_cover is not None:
            for gid, kept in kept_channels(self.model, self.groups, imap).items():
                self._round_cover[gid][kept] += m.samples
        rec = self.clients[msg.client_id]
        if m.keep_budget is not None and self.self_budget:
            self._adopt(rec, m.keep_budget)
        if self.strategy.site == "client" and not self.strategy.dense:
            rec.index_map, rec.keep_achieved = imap, m.keep_achieved
            if m.refreshed:
                rec.planned_keep = m.keep_target if m.keep_target is not None else rec.keep
                self._mark_planned(rec, task.round)
        return out

    def _weight(self, compact: dict[str, torch.Tensor], samples: int) -> float:
        """Aggregation weight: samples x (share of the parameters the update carries)^gamma
        (``aggregation.size_exponent``), the share counted from the decoded tensors themselves."""
        gamma = self.cfg.aggregation.size_exponent
        if gamma == 0:
            return float(samples)
        carried = sum(t.numel() for k, t in compact.items() if k in self.param_keys)
        return samples * (carried / self.param_count) ** gamma

    def _reported_scores(self, extras: dict, refreshed: bool) -> dict[int, torch.Tensor] | None:
        """A client's normalised channel scores (``score/<group root>``), checked in full
        before anything is folded in; None when it sent none, or when they were not asked for
        (no anchor configured, or the client did not re-plan this round): those are ignored."""
        if not any(k.startswith("score/") for k in extras) or self.groups is None:
            return None
        if self.cfg.pruning.anchor_weight <= 0 or not refreshed:
            return None
        out = {}
        for g in self.groups:
            s = extras.get(f"score/{g.name}")
            if s is None or s.shape != (g.size,) or s.dtype != torch.float32:
                raise InvalidUpdate(
                    f"reported scores for channel group {g.name} are missing, mis-shaped or "
                    "not float32"
                )
            if not torch.isfinite(s).all():
                raise InvalidUpdate(f"reported scores for channel group {g.name} are not finite")
            out[g.gid] = s
        # normalised_scores makes the mean magnitude over all channels 1 (or all scores 0)
        total = sum(float(s.abs().sum(dtype=torch.float64)) for s in out.values())
        if total > 1.001 * self.groups.num_channels:
            raise InvalidUpdate(
                f"reported scores are not normalised: mean magnitude "
                f"{total / self.groups.num_channels:.3g}, expected at most 1"
            )
        return out

    def _update_anchor(self) -> None:
        """Fold this round's reported scores into the decayed federation-wide anchor."""
        if self._round_score_weight <= 0:
            return
        decay = self.cfg.pruning.coverage_decay
        mean = {gid: v / self._round_score_weight for gid, v in self._round_scores.items()}
        if self.anchor is None:
            self.anchor = mean
        else:
            self.anchor = {gid: (1 - decay) * self.anchor[gid] + decay * mean[gid] for gid in mean}
        self._round_score_weight = 0.0

    def _update_coverage(self, total: float) -> tuple[float | None, float | None]:
        """Fold this round's covering shares into the decayed average; report min and mean."""
        if self._round_cover is None or total <= 0:
            return None, None
        decay = self.cfg.pruning.coverage_decay
        share = {gid: v / total for gid, v in self._round_cover.items()}
        if self.coverage is None:
            self.coverage = share
        else:
            self.coverage = {
                gid: (1 - decay) * self.coverage[gid] + decay * share[gid] for gid in share
            }
        flat = torch.cat(list(share.values()))
        return float(flat.min()), float(flat.mean())

    def run(self, rounds: int, start: int = 1) -> list[RoundRecord]:
        return [self.run_round(r) for r in range(start, rounds + 1)]

    def initial_record(self) -> RoundRecord:
        res = self.evaluate(self.model)
        return RoundRecord(0, res.accuracy, res.loss, 0.0, 0)
