"""The statistics phase after aggregation: a few of the round's dense participants measure the
new global model's BatchNorm running statistics on their data, and the pooled result replaces
the averaged statistics. ("Calibrate", in this project, means only a device's speed
measurement, ``cahfp.device.calibrate``.)"""

from __future__ import annotations

import random
import time

from cahfp.aggregation import StatisticsPool
from cahfp.errors import CAHFPError, InvalidUpdate
from cahfp.messages import TaskMessage
from cahfp.wire import decode_state, encode_update
from coordinator.records import ClientOutcome
from coordinator.transport import Rejected


class StatisticsPhase:
    """Mixed into ``RoundEngine``: uses its ``cfg``, ``clients``, ``state``, ``model``,
    ``strategy``, ``transport``, ``_task``, ``_mismatch``, ``_refuse`` and ``on_event``."""

    def statistics_wanted(self, selected: list[str]) -> bool:
        """Whether this round's pruned clients must send (and receive) BatchNorm running
        statistics. With ``exact_stats`` the aggregate takes them from dense updates whenever one
        arrives, so a pruned client's are wasted bytes in a round where some participant is
        expected to train the dense model (its keep, or its last reported budget, is 1).
        ``aggregation.omit_pruned_stats`` turns the saving on."""
        a = self.cfg.aggregation
        if not (a.omit_pruned_stats and a.exact_stats) or not self.strategy.prunes:
            return True
        return not any(self.clients[c].keep >= 1 for c in selected)

    def _measure_statistics(self, rnd: int, outcomes: dict[str, ClientOutcome]) -> None:
        """The statistics phase: the round's dense participants (those that trained the whole
        model; at most ``statistics_clients`` of them, a seeded sample) measure the new global
        model's BatchNorm statistics on their data; the pooled result replaces the averaged
        statistics. Averaged statistics describe each client's own trained weights, not the
        aggregate, which pruned updates move away from all of them. Without a dense
        participant, or without a valid answer before the deadline, the averaged statistics
        stay. Bytes and FLOPs are added to each client's outcome (its ``statistics`` fields,
        the metrics' names)."""
        measurers = [
            cid
            for cid, o in sorted(outcomes.items())
            if o.status == "ok" and (o.keep_achieved is None or o.keep_achieved >= 1)
        ]
        a = self.cfg.aggregation
        if len(measurers) > a.statistics_clients:
            rng = random.Random(self.cfg.federation.seed * 100_019 + rnd)
            measurers = sorted(rng.sample(measurers, a.statistics_clients))
        if not measurers:
            return
        payload = encode_update(self.state, {})
        wait = min(a.statistics_deadline_s, self.cfg.federation.deadline_s)
        sent: dict[str, TaskMessage] = {}
        for cid in measurers:
            task = self._task(
                cid,
                rnd,
                keep=1.0,
                payload="state",
                purpose="statistics",
                deadline_s=wait,
                calibration_batches=a.statistics_batches,
            )
            self.transport.send(task, payload, rebuild=lambda: payload)
            sent[task.task_id] = task
            outcomes[cid].bytes_down += len(payload)
            outcomes[cid].statistics = "no answer before the deadline"
        pool = StatisticsPool(self.state)
        pending = set(sent)
        for item in self.transport.collect(pending, time.monotonic() + wait):
            if isinstance(item, Rejected):
                self.on_event("rejected", {"client": item.client_id, "reason": item.reason})
                if item.task_id in sent:
                    outcomes[sent[item.task_id].client_id].statistics = item.reason
                continue
            msg, data = item
            problem = self._mismatch(msg, sent.get(msg.task_id))
            if problem:
                self._refuse(msg, problem)
                continue
            out = outcomes[msg.client_id]
            if out.statistics == "ok":
                self.transport.acknowledge(msg, True, "duplicate")
                continue
            if msg.status != "ok":  # a final answer: the client cannot measure
                out.statistics = f"{msg.status}: {msg.reason or msg.metrics.reason}"
                pending.discard(msg.task_id)
                self.transport.acknowledge(msg, True, "noted: " + msg.status)
                continue
            try:
                if data is None:
                    raise InvalidUpdate("status ok but no payload")
                stats, _ = decode_state(data)
                pool.add(stats, float(msg.metrics.samples))
            except CAHFPError as exc:  # the genuine answer may still follow
                out.statistics = f"rejected: {exc}"
                self._refuse(msg, str(exc))
                continue
            out.statistics = "ok"
            out.bytes_up += len(data)
            out.statistics_flops += msg.metrics.train_flops
            pending.discard(msg.task_id)
            self.transport.acknowledge(msg, True)
        measured = pool.result()
        self.on_event("statistics", {"round": rnd, "clients": pool.count, "asked": len(sent)})
        if measured:
            self.state.update(measured)
            self.model.load_state_dict(self.state)
