"""The coordinator service: the round engine over MQTT, with registration, retained status and
model announcements, checkpoints after every round and ``--resume``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
import uuid
from pathlib import Path

from cahfp.config import Config
from cahfp.errors import CAHFPError
from cahfp.messages import ModelSpec
from cahfp.mqtt.inbox import DEFAULT_MEMORY
from cahfp.mqtt.link import MqttLink, client_certificate, read_credentials
from cahfp.mqtt.protocol import RUN_ID, ModelAnnouncement, Status, Topics
from cahfp.training import evaluate
from cahfp.wire import encode_state
from coordinator.engine import RoundEngine, RoundInterrupted, RoundRecord
from coordinator.monitor import Monitor
from coordinator.mqtt_transport import MqttTransport
from coordinator.records import (
    NoCheckpoint,
    RunRecorder,
    check_new_run,
    load_checkpoint,
    load_server_state,
    record_dict,
    summarize,
)
from coordinator.simulation import distillation_data, evaluation_data

log = logging.getLogger("cahfp.coordinator")


class Coordinator:
    def __init__(
        self,
        cfg: Config,
        broker_url: str,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        force: bool = False,
        credentials: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        protocol: int = 5,
        on_event=None,
        inbox_memory: int = DEFAULT_MEMORY,
        spool_dir: str | None = None,
    ):
        self.cfg = cfg
        self.topics = Topics(cfg.federation.name)
        self.out_dir = Path(out_dir) if out_dir else None
        if resume and self.out_dir is None:
            raise CAHFPError("--resume needs the run directory (--out) of the interrupted run")
        if self.out_dir and not resume:
            check_new_run(self.out_dir, force)
        self.resume = resume
        user, password = read_credentials(credentials)
        cert_file, key_file = client_certificate(cert_file, key_file)
        self.link = MqttLink(
            broker_url,
            f"coordinator-{cfg.federation.name}",
            username=user,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            protocol=protocol,
            inbox_memory=inbox_memory,
            # the backlog beyond the memory budget waits on disk: by default next to the run
            # (the system temp directory may be RAM-backed tmpfs)
            spool_dir=spool_dir or (str(self.out_dir) if self.out_dir else None),
        )
        self.transport = MqttTransport(self.link, self.topics)
        # set by SIGTERM / SIGINT: the waiting ends within a second, the round in progress is
        # abandoned, the completed ones stay checkpointed
        self.stop = self.transport.stop = threading.Event()
        test = evaluation_data(cfg)  # the same set the simulation evaluates on
        self.spec = ModelSpec(
            name=cfg.model.name,
            width=cfg.model.width,
            num_classes=test.num_classes,
            in_channels=test.in_channels,
            image_size=test.image_size,
        )
        self.monitor = Monitor(cfg, self.transport.boards, self.transport.spooled_bytes)

        def events(kind: str, data: dict) -> None:
            self.monitor.event(kind, data)
            if on_event:
                on_event(kind, data)

        self.engine = RoundEngine(
            cfg,
            self.spec,
            self.transport,
            lambda m: evaluate(m, test),
            {},
            on_event=events,
            distill_images=distillation_data(cfg),  # the same images the simulation keeps
        )
        self.records: list[RoundRecord] = []
        # names this run in every retained status and model announcement, so that clients tell
        # it from an earlier run under the same federation name; kept across --resume
        self.run_id = uuid.uuid4().hex

    def _status(self, rnd: int, state: str, detail: str = ""):
        s = Status(
            round=rnd,
            state=state,
            run=self.run_id,
            detail=detail,
            model=self.spec.model_dump(),
            recipe=self.cfg.train.recipe().model_dump(),
            deadline_s=self.cfg.federation.deadline_s,
            budget=self.cfg.clients.settings().model_dump(),
            score_samples=self.cfg.pruning.score_batches * self.cfg.train.batch_size,
        )
        return self.link.publish(self.topics.status, s.model_dump_json(), qos=1, retain=True)

    def _announce_model(self, rec: RoundRecord) -> None:
        data = encode_state(self.engine.state)
        ann = ModelAnnouncement(
            run=self.run_id,
            round=rec.round,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
            accuracy=rec.accuracy,
        )
        self.link.publish(self.topics.model, ann.model_dump_json(), qos=1, retain=True)

    def _registry(self) -> dict:
        return {c: {"index": r.index, "keep": r.keep} for c, r in self.engine.clients.items()}

    def run(
        self,
        connect_timeout: float = 30.0,
        registration_timeout: float | None = None,
        final_timeout: float = 30.0,
    ) -> dict:
        start_time = time.perf_counter()
        start_round = 1
        recorder = None
        if self.out_dir:
            recorder = RunRecorder(
                self.out_dir, self.cfg, self.engine.dense_flops, resume=self.resume
            )
        if self.resume:
            try:
                done, state, extra = load_checkpoint(self.out_dir, like=self.engine.state)
            except NoCheckpoint:
                # the service unit always passes --resume: its first start has nothing to resume
                log.info("no checkpoint in %s yet: starting a fresh run", self.out_dir)
                self.resume = recorder.resume = False
        if self.resume:
            self.engine.momentum.load(load_server_state(self.out_dir, done), state)
            self.engine.state = state
            self.engine.model.load_state_dict(state)
            self.engine.round = done
            for cid, info in sorted(
                extra.get("clients", {}).items(), key=lambda kv: kv[1]["index"]
            ):
                self.engine.register(cid, info.get("keep"), restored=True)
            recorder.truncate_after(done)
            start_round = done + 1
            if re.match(RUN_ID, str(extra.get("run", ""))):
                self.run_id = extra["run"]
            log.info("resuming after round %d (run %s)", done, self.run_id)
            if self.engine.momentum.beta > 0:
                restored = len(self.engine.momentum.buffer)
                log.info(
                    "server momentum: %s",
                    f"{restored} buffers restored"
                    if restored
                    else "no buffer in the checkpoint, it starts from zero",
                )
        # the last will: the run and the round it resumes from (a fixed "round 0" read after a
        # resume as if the run had restarted)
        lost = Status(
            round=start_round - 1,
            state="stopped",
            run=self.run_id,
            detail="coordinator connection lost",
        )
        self.link.set_will(self.topics.status, lost.model_dump_json().encode(), 1, True)
        self.link.start(connect_timeout)
        try:
            self._status(start_round - 1, "waiting", "waiting for clients")
            wait = (
                registration_timeout
                if registration_timeout is not None
                else self.cfg.federation.deadline_s
            )
            online = self.transport.wait_for_clients(self.cfg.federation.clients, wait)
            log.info("%d clients online: %s", len(online), ", ".join(online))
            if start_round == 1 and not self.stop.is_set():
                initial = self.engine.initial_record()
                self.engine.on_event("initial", {"record": initial})
                self.records.append(initial)
                if recorder:
                    recorder.round(initial, self.engine.state)
            for rnd in range(start_round, self.cfg.federation.rounds + 1):
                if self.stop.is_set():
                    break
                self._status(rnd, "running")
                try:
                    rec = self.engine.run_round(rnd)
                except RoundInterrupted as exc:
                    log.info("%s", exc)
                    break
                self.records.append(rec)
                if recorder:
                    recorder.round(
                        rec,
                        self.engine.state,
                        extra={"clients": self._registry(), "run": self.run_id},
                        server=self.engine.momentum.state(),
                    )
                self._announce_model(rec)
            if self.stop.is_set():
                log.info("stopped after round %d (completed rounds are kept)", self.engine.round)
                last = self._status(self.engine.round, "stopped", "stopped by the operator")
            else:
                last = self._status(self.engine.round, "finished")
            # the final status replaces the last will's "connection lost": make sure it left
            # (after a reconnect if the connection dropped meanwhile) before disconnecting
            with contextlib.suppress(RuntimeError, ValueError):
                last.wait_for_publish(timeout=final_timeout)
            if not last.is_published():
                log.warning("the final status was not confirmed by the broker")
        finally:
            self.transport.close()
        wall = time.perf_counter() - start_time
        if recorder:
            return recorder.finish(self.engine.state, wall)
        return summarize(
            [record_dict(r) for r in self.records], self.cfg, self.engine.dense_flops, wall
        )
