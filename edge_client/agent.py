"""The device agent: connects to the broker, announces itself, waits for tasks, runs them with
the transport-agnostic client task, uploads the update and keeps going across broker and
coordinator restarts.

* presence: retained ``online``, refreshed every ``presence_every`` seconds (by its own thread,
  also while a task trains; the retained copy expires after ``PRESENCE_MISSES`` refreshes), last
  will ``offline``; hello (retained) with the device profile
  and, once the coordinator's retained status says which model the federation trains, the keep
  this device can afford;
* a task runs when both its control message and its payload have arrived (in any order);
  tasks already answered are answered again from memory (the coordinator resends after a
  reconnect), tasks for rounds the coordinator has moved past are skipped;
* the coordinator's run: the agent follows the run whose ``waiting`` / ``running`` status it
  sees (a new run replaces the old one); a ``finished`` or ``stopped`` status of another run
  (the retained end of an earlier run under the same federation name) is ignored, so
  ``--until-finished`` ends only with the run it took part in;
* an update is resent until the coordinator acknowledges it (after a reconnect, or when no
  acknowledgement arrives within ``resend_after`` seconds);
* on stop (SIGTERM) a running task is abandoned at its next training step and reported as
  failed, presence is set to offline and the connection closed;
* a model this device cannot build (your own model's module is missing here) or local data
  that cannot train it (other channels, image size, more classes), found when the retained
  status names the model: the hello says why
  (``problem``), so the coordinator never selects this device, and the agent stops
  (``problem`` is set).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from cahfp.client_round import (
    ClientState,
    announced_keep,
    data_mismatch,
    model_problem,
    run_task,
)
from cahfp.errors import CAHFPError
from cahfp.messages import BudgetSettings, ModelSpec, TaskMessage, UpdateMessage
from cahfp.mqtt.link import MqttLink
from cahfp.mqtt.protocol import (
    PRESENCE_EVERY,
    Ack,
    Hello,
    Presence,
    ProtocolError,
    Reassembler,
    Status,
    Topics,
    parse_json,
)
from cahfp.training import Recipe

log = logging.getLogger("cahfp.client")


@dataclass
class _Answer:
    message: UpdateMessage
    payload: bytes | None
    sent_at: float = 0.0
    acked: bool = False


@dataclass
class AgentStats:
    tasks: int = 0
    acked: int = 0
    rejected: int = 0
    last_reason: str = ""
    history: list[dict] = field(default_factory=list)


class Agent:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        state: ClientState,
        *,
        profile: dict | None = None,
        export_dir: str | Path | None = None,
        quantize: str | None = None,
        resend_after: float = 30.0,
        max_task_bytes: int = 256 << 20,
        calibrate_budget=None,
        until_finished: bool = False,
        presence_every: float = PRESENCE_EVERY,
    ):
        self.link, self.topics, self.state = link, topics, state
        self.me = state.client_id
        self.profile = profile or {}
        self.export_dir = Path(export_dir) if export_dir else None
        self.quantize = quantize  # "int8": exports calibrated on this board's own images
        self.resend_after = resend_after
        self.calibrate_budget = calibrate_budget  # callable(ModelSpec, Recipe) -> None
        self.until_finished = until_finished
        self.reassembler = Reassembler(max_bytes=max_task_bytes, max_transfers=4)
        self.tasks: OrderedDict[str, TaskMessage] = OrderedDict()  # transfer -> task
        self.payloads: OrderedDict[str, bytes] = OrderedDict()  # transfer -> payload
        self.answers: OrderedDict[str, _Answer] = OrderedDict()  # task id -> answer
        self.coordinator_round = -1
        self.run_id: str | None = None  # the coordinator run this agent follows
        self.presence_every = presence_every
        self.keep_estimate: float | None = None
        self.problem = ""  # why this device cannot take part (then the agent stops)
        # a device that measures itself says hello once it has measured (or failed to), so the
        # coordinator never registers it before its own choice of keep is known
        self.ready = calibrate_budget is None
        self.infeasible = ""  # why no keep fits the deadline and memory (logged once)
        self.stop = threading.Event()
        self.stats = AgentStats()
        self._connects = 0
        for topic in (
            topics.task(self.me),
            topics.task_data(self.me),
            topics.ack(self.me),
            topics.status,
        ):
            link.subscribe(topic, 1)

    # ------------------------------------------------------------------ lifecycle

    def hello(self) -> Hello:
        return Hello(
            client_id=self.me,
            samples=len(self.state.data),
            keep_estimate=self.keep_estimate,
            profile=self.profile,
            problem=self.problem,
        )

    def presence(self) -> None:
        """Publish that this client is online (retained; expires unless refreshed)."""
        p = Presence(client_id=self.me, status="online", every=self.presence_every)
        self.link.publish(
            self.topics.presence(self.me),
            p.model_dump_json(),
            qos=1,
            retain=True,
            expiry=p.alive_for(),
        )

    def _refresh_presence(self) -> None:
        while not self.stop.wait(self.presence_every):
            if self.link.connected.is_set():  # on reconnect the main loop announces anyway
                self.presence()

    def announce(self) -> None:
        self.presence()
        if self.ready or self.problem:
            self.link.publish(
                self.topics.hello(self.me), self.hello().model_dump_json(), qos=1, retain=True
            )

    def run(self, connect_timeout: float = 30.0, status_wait: float = 3.0) -> AgentStats:
        self.link.start(connect_timeout)
        self._connects = self.link.connects
        # the retained status names the federation's model: check the local data against it
        # before announcing, so that a device that cannot take part is never selected
        end = time.monotonic() + status_wait
        while self.coordinator_round < 0 and time.monotonic() < end and not self.stop.is_set():
            msg = self.link.get(0.1)
            if msg is not None:
                self._handle(msg.topic, msg.payload)
        self.announce()
        threading.Thread(target=self._refresh_presence, name="presence", daemon=True).start()
        log.info(
            "%s %s (%d local samples)",
            self.me,
            "ready"
            if self.ready
            else "connected, measures itself once the federation's model is known",
            len(self.state.data),
        )
        try:
            while not self.stop.is_set():
                msg = self.link.get(0.2)
                if self.link.connects != self._connects:  # reconnected: announce, resend
                    self._connects = self.link.connects
                    self.announce()
                    self._resend(force=True)
                if msg is not None:
                    self._handle(msg.topic, msg.payload)
                self._maybe_run()
                self._resend()
        finally:
            offline = Presence(client_id=self.me, status="offline").model_dump_json()
            self.link.stop(final=[(self.topics.presence(self.me), offline.encode(), True)])
        return self.stats

    # ------------------------------------------------------------------ messages

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            kind, _, data = self.topics.parse(topic)
            if kind == "status":
                if payload:
                    self._status(parse_json(Status, payload))
            elif kind == "task" and data:
                done = self.reassembler.add(payload)
                if done is not None:
                    self.payloads[done[0]] = done[1]
                    while len(self.payloads) > 4:
                        self.payloads.popitem(last=False)
            elif kind == "task":
                task = parse_json(TaskMessage, payload, max_bytes=256 << 10)
                if task.client_id != self.me or task.transfer is None:
                    raise ProtocolError("task is not addressed to this client or has no payload")
                if task.task_id in self.answers:  # the coordinator resent it: answer again
                    self._publish(self.answers[task.task_id])
                else:
                    self.tasks[task.transfer] = task
                    while len(self.tasks) > 4:
                        self.tasks.popitem(last=False)
            elif kind == "ack":
                ack = parse_json(Ack, payload)
                ans = self.answers.get(ack.task_id)
                if ans is not None and not ans.acked:
                    ans.acked = True
                    self.stats.acked += ack.accepted
                    self.stats.rejected += not ack.accepted
                    if not ack.accepted:
                        self.stats.last_reason = ack.reason
                        log.warning(
                            "%s: update for round %d rejected: %s",
                            self.me,
                            ans.message.round,
                            ack.reason,
                        )
        except ProtocolError as exc:
            log.warning("%s: ignored message on %s: %s", self.me, topic, exc)

    def _status(self, status: Status) -> None:
        if status.state in ("waiting", "running"):
            if status.run != self.run_id:
                log.info("%s: following the coordinator's run %s", self.me, status.run)
                self.run_id = status.run
        elif self.run_id is None or status.run != self.run_id:
            log.info(
                "%s: ignoring the %s status of run %s (not the run this client follows)",
                self.me,
                status.state,
                status.run,
            )
            return
        self.coordinator_round = status.round
        if status.state == "finished" and self.until_finished:
            log.info("%s: the federation has finished", self.me)
            self.stop.set()
            return
        if not status.model:
            return
        try:
            spec, recipe = ModelSpec(**status.model), Recipe(**status.recipe or {})
            budget = BudgetSettings(**status.budget or {})
        except (TypeError, ValueError) as exc:
            log.warning("%s: ignored a malformed status: %s", self.me, exc)
            return
        problem = model_problem(spec) or data_mismatch(spec, self.state.data)
        if problem:
            self.problem = problem
            log.error("%s: cannot take part: %s", self.me, problem)
            self.announce()  # the coordinator learns why, and never selects this device
            self.stop.set()
            return
        if self.state.device is None and self.calibrate_budget is not None:
            try:
                self.calibrate_budget(spec, recipe)
            except (CAHFPError, TypeError, ValueError) as exc:
                log.warning("%s: calibration failed: %s", self.me, exc)
        if self.state.device is not None and status.deadline_s:
            keep, reason = announced_keep(
                self.state, recipe, status.deadline_s, budget, status.score_samples
            )
            if keep == 0 and reason != self.infeasible:  # say why it is never selected
                log.warning("%s: no keep fits this device: %s", self.me, reason)
            self.infeasible = reason if keep == 0 else ""
            if keep != self.keep_estimate:
                self.keep_estimate = keep
                log.info("%s: measured; chooses keep %.2f for the next round", self.me, keep)
                self.announce()
        if not self.ready:  # measured (or failed to): now the hello says what it can afford
            self.ready = True
            self.announce()

    # ------------------------------------------------------------------ work

    def _maybe_run(self) -> None:
        for transfer in [t for t in self.tasks if t in self.payloads]:
            task, payload = self.tasks.pop(transfer), self.payloads.pop(transfer)
            if task.round < self.coordinator_round:
                log.info("%s: skipping stale task of round %d", self.me, task.round)
                continue
            self._execute(task, payload)

    def _execute(self, task: TaskMessage, payload: bytes) -> None:
        log.info(
            "%s: round %d task (%s, %.1f MB)", self.me, task.round, task.payload, len(payload) / 1e6
        )
        result = run_task(self.state, task, payload, should_stop=self.stop.is_set)
        self.stats.tasks += 1
        m = result.message.metrics
        log.info(
            "%s: round %d %s in %.1f s (score %.1f s, train %.1f s): %s",
            self.me,
            task.round,
            result.message.status,
            m.total_seconds,
            m.score_seconds,
            m.train_seconds,
            result.message.reason or m.reason or f"keep {m.keep_achieved:.2f}",
        )
        self.stats.history.append(
            {
                "round": task.round,
                "status": result.message.status,
                "keep": m.keep_achieved,
                "seconds": m.total_seconds,
                "bytes_up": len(result.payload or b""),
                "bytes_down": len(payload),
            }
        )
        if result.submodel is not None and self.export_dir is not None:
            self._export(task, result, payload)
        answer = _Answer(result.message, result.payload)
        self.answers[task.task_id] = answer
        while len(self.answers) > 8:
            self.answers.popitem(last=False)
        self._publish(answer)

    def _publish(self, answer: _Answer) -> None:
        msg = answer.message
        if answer.payload is not None:
            transfer, _ = self.link.publish_payload(
                self.topics.update_data(self.me), answer.payload
            )
            msg = msg.model_copy(update={"transfer": transfer})
        self.link.publish(self.topics.update(self.me), msg.model_dump_json(), qos=1)
        answer.sent_at = time.monotonic()

    def _resend(self, force: bool = False) -> None:
        now = time.monotonic()
        for ans in self.answers.values():
            if not ans.acked and (force or now - ans.sent_at > self.resend_after):
                self._publish(ans)

    def _export(self, task: TaskMessage, result, payload: bytes) -> None:
        import hashlib

        from cahfp.data.datasets import DatasetInfo
        from cahfp.export import export_submodel
        from cahfp.quantize import calibration_images
        from cahfp.training import measure_batchnorm_statistics

        d = self.state.data
        info = DatasetInfo(d.classes, d.mean, d.std, d.in_channels, d.image_size)
        # Statistics averaged over up to 8 batches of 64 local images under the final weights,
        # not the running average that trailed the weights through training (for a pruned
        # submodel, not those inherited from the dense model either).
        measured = measure_batchnorm_statistics(result.submodel, d, seed=task.round)
        try:
            int8 = calibration_images(d, seed=task.round) if self.quantize == "int8" else None
            exported = export_submodel(
                result.submodel,
                info,
                self.export_dir / "model.onnx",
                int8_images=int8,
                keep=result.message.metrics.keep_achieved,
                round=task.round,
                bn_statistics_images=measured,
                global_hash=hashlib.sha256(payload).hexdigest(),
                model=f"{task.model.name} x{task.model.width:g}",
            )
        except CAHFPError as exc:
            log.error("%s: ONNX export failed: %s", self.me, exc)
            return
        if exported.quantization:
            log.info(
                "%s: exported INT8 model (%.2f MB, float %.2f MB; top-1 agreement %.3f on %d "
                "local images)",
                self.me,
                exported.bytes / 1e6,
                exported.float_bytes / 1e6,
                exported.agreement,
                len(int8),
            )
