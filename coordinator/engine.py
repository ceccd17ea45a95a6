"""The round loop: select participants, send each a task, gather and validate updates until the
deadline, aggregate them (streaming), run the statistics phase, evaluate, record. What the
strategy decides (who plans, when, with which side tensors) is asked of its object
(``cahfp.strategies``); the client registry, update acceptance, the statistics phase and the
payload cache are the mixins this class is made of (``coordinator.registry``,
``coordinator.acceptance``, ``coordinator.statistics``, ``coordinator.payloads``)."""

from __future__ import annotations

import resource
import time
import uuid
from collections.abc import Callable

import torch
from torch import nn

from cahfp.aggregation import Aggregator
from cahfp.config import Config
from cahfp.costs import training_flops
from cahfp.data import ImageData
from cahfp.distillation import EnsembleDistillation
from cahfp.errors import ConfigError
from cahfp.messages import ModelSpec, TaskMessage
from cahfp.models import build_model
from cahfp.momentum import ServerMomentum
from cahfp.seeds import stream
from cahfp.training import EvalResult
from coordinator.acceptance import UpdateAcceptance
from coordinator.payloads import PayloadCache
from coordinator.records import ClientOutcome, ClientRecord, RoundRecord
from coordinator.registry import ClientRegistry
from coordinator.statistics import StatisticsPhase
from coordinator.transport import Rejected, Transport

__all__ = [
    "ClientOutcome",
    "ClientRecord",
    "RoundEngine",
    "RoundInterrupted",
    "RoundRecord",
    "task_seed",
]


def task_seed(federation_seed: int, rnd: int, client_index: int) -> int:
    """The seed of the client ``client_index``'s tasks in round ``rnd`` (its scoring, planning,
    training and statistics draws)."""
    return federation_seed * 1_000_003 + rnd * 1009 + client_index


class RoundInterrupted(Exception):
    """The transport was stopped while a round waited for its answers: the round is abandoned
    (nothing of it is applied or recorded)."""


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


class RoundEngine(ClientRegistry, UpdateAcceptance, StatisticsPhase, PayloadCache):
    def __init__(
        self,
        config: Config,
        spec: ModelSpec,
        transport: Transport,
        evaluate: Callable[[nn.Module], EvalResult],
        client_keeps: dict[str, float],
        on_event: Callable[[str, dict], None] | None = None,
        distill_images: ImageData | None = None,
    ):
        """``distill_images``: the coordinator's unlabelled images, needed when
        ``aggregation.distill_steps`` > 0 (``coordinator.simulation.distillation_data``)."""
        self.cfg = config
        self.spec = spec
        self.transport = transport
        self.evaluate = evaluate
        self.strategy = config.strategy()
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
        a = config.aggregation
        if a.distill_steps and distill_images is None:
            raise ConfigError("aggregation.distill_steps needs the coordinator's unlabelled images")
        self.distiller = (
            EnsembleDistillation(
                distill_images, a.distill_steps, a.distill_lr, a.distill_temperature,
                a.distill_batch_size,
            )
            if a.distill_steps
            else None
        )  # fmt: skip
        self._announced: dict[str, float | None] = {}  # the keep each client last announced
        self.strategy.setup(self.model, self.example)

    def _task(self, cid: str, rnd: int, **fields) -> TaskMessage:
        """A task for ``cid`` in round ``rnd``: a fresh id, the model, the recipe and the
        client's seed for the round (training and statistics tasks alike), plus ``fields``."""
        seed = task_seed(self.cfg.federation.seed, rnd, self.clients[cid].index)
        return TaskMessage(
            task_id=uuid.uuid4().hex,
            round=rnd,
            client_id=cid,
            model=self.spec,
            recipe=self.cfg.train.recipe(),
            seed=seed,
            budget=self.budget_settings,
            **fields,
        )

    def make_task(self, cid: str, rnd: int, statistics: bool = True) -> tuple[TaskMessage, bytes]:
        """The task for client ``cid`` in round ``rnd`` and its payload, as the strategy
        assigns it (a due coordinator-side plan is made here). ``statistics=False``: a pruned
        client's slice and update leave out the BatchNorm running statistics."""
        rec = self.clients[cid]
        job = self.strategy.assign(rec, rnd, self.self_budget)
        if job.payload == "slice":
            if self.strategy.plan_due(rec, rnd):
                self.strategy.server_plan(self.model, self.example, rec, rnd)
            payload = self._slice(rec, statistics)
        else:
            payload = self._dense_payload(rnd, self.strategy.side_names(job.plan))
        task = self._task(
            cid,
            rnd,
            keep=job.keep,
            payload=job.payload,
            plan=job.plan,
            deadline_s=self.cfg.federation.deadline_s,
            statistics=statistics,
            training=self.strategy.local_training(rec, rnd),
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
        if self.distiller is not None:
            self.distiller.clear()  # nothing of an abandoned round
        agg = Aggregator(
            self.state, a.uncovered_weight, self.stat_keys, a.exact_stats, a.pooled_variance
        )
        self.strategy.begin_round()
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
        cov_min, cov_mean = self.strategy.end_round(agg.total_weight)
        skipped = ""
        statistics_seconds = 0.0
        if agg.count >= need and agg.count:
            t0 = time.perf_counter()
            self.state = self.momentum.step(self.state, agg.result())
            self.model.load_state_dict(self.state)
            if self.distiller is not None:  # the round's submodels, into the global model
                seed = stream(task_seed(self.cfg.federation.seed, rnd, 0), "distillation")
                self.distiller.apply(self.model, seed)
                self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            agg_seconds += time.perf_counter() - t0
            if self.cfg.aggregation.measure_statistics and self.stat_keys:
                t0 = time.perf_counter()
                self._measure_statistics(rnd, outcomes)
                statistics_seconds = time.perf_counter() - t0
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
            statistics_seconds,
        )
        self.on_event("round_end", {"record": record})
        return record

    def run(self, rounds: int, start: int = 1) -> list[RoundRecord]:
        return [self.run_round(r) for r in range(start, rounds + 1)]

    def initial_record(self) -> RoundRecord:
        res = self.evaluate(self.model)
        return RoundRecord(0, res.accuracy, res.loss, 0.0, 0)
