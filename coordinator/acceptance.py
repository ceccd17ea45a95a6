"""Update acceptance: does an answer belong to a task sent this round, is its payload valid
(decodable against the global model, with samples, the statistics the task asked for and the
strategy's side tensors in order), and with what weight it enters the aggregate. An invalid
answer is refused with the reason and changes nothing."""

from __future__ import annotations

import torch

from cahfp.aggregation import Aggregator
from cahfp.errors import CAHFPError, InvalidUpdate
from cahfp.messages import TaskMessage, UpdateMessage
from cahfp.wire import decode_update
from coordinator.records import ClientOutcome
from coordinator.transport import Rejected


class UpdateAcceptance:
    """Mixed into ``RoundEngine``: uses its ``cfg``, ``clients``, ``state``, ``model``,
    ``param_keys``, ``param_count``, ``strategy``, ``transport``, ``self_budget``, ``round``,
    ``distiller``, ``_adopt`` and ``on_event``."""

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
            checked = self.strategy.check_update(meta["extras"], m.refreshed)
            if task.statistics and not meta["statistics"]:
                raise InvalidUpdate("update leaves out the BatchNorm statistics the task asked for")
            agg.add_compact(
                compact, imap, self._weight(compact, m.samples), statistics=meta["statistics"]
            )
            if self.distiller is not None:
                self.distiller.add(compact, imap, msg.client_id)
        except CAHFPError as exc:
            out.status, out.reason = "rejected", str(exc)
            self._refuse(msg, str(exc))
            return out
        self.transport.acknowledge(msg, True)
        rec = self.clients[msg.client_id]
        if m.keep_budget is not None and self.self_budget:
            self._adopt(rec, m.keep_budget)
        self.strategy.observe(self.model, rec, imap, m, checked, task.round)
        return out

    def _weight(self, compact: dict[str, torch.Tensor], samples: int) -> float:
        """Aggregation weight: samples x (share of the parameters the update carries)^gamma
        (``aggregation.size_exponent``), the share counted from the decoded tensors themselves."""
        gamma = self.cfg.aggregation.size_exponent
        if gamma == 0:
            return float(samples)
        carried = sum(t.numel() for k, t in compact.items() if k in self.param_keys)
        return samples * (carried / self.param_count) ** gamma
