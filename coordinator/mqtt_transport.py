"""The round engine's transport over MQTT: a registry of clients (from their retained hello and
presence), tasks published as a control message plus payload chunks, updates reassembled with
bounded memory, acknowledgements, and resending of unanswered tasks after a reconnect."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from cahfp.errors import CAHFPError
from cahfp.messages import TaskMessage, UpdateMessage
from cahfp.mqtt.link import MqttLink
from cahfp.mqtt.protocol import (
    DEFAULT_CHUNK,
    Ack,
    Hello,
    Presence,
    ProtocolError,
    Reassembler,
    Topics,
    check_name,
    parse_json,
)
from coordinator.transport import Received, Rejected, Transport
from coordinator.upload_budget import UploadBudget

log = logging.getLogger("cahfp.coordinator.mqtt")


GONE_AFTER = 5.0  # seconds a selected client may stay offline before its task is given up


@dataclass
class Registered:
    """What the registry knows of one client. Its presence decides whether it is online; its
    (retained) hello only describes it."""

    hello: Hello | None = None
    online: bool = False  # its last presence said online
    alive_until: float | None = None  # when that presence lapses (None: until an offline)
    offline_since: float = 0.0
    last_seen: float = 0.0

    def is_online(self, now: float) -> bool:
        return self.online and (self.alive_until is None or now < self.alive_until)

    def gone(self, now: float) -> bool:
        """Offline for good: its presence lapsed, or it said offline over GONE_AFTER s ago."""
        if self.online:
            return not self.is_online(now)
        return now - self.offline_since > GONE_AFTER


class MqttTransport(Transport):
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        chunk_size: int = DEFAULT_CHUNK,
        max_update_bytes: int = 256 << 20,
        transfer_timeout: float = 600.0,
    ):
        self.link, self.topics, self.chunk_size = link, topics, chunk_size
        self.registry: dict[str, Registered] = {}
        self.reassembler = Reassembler(
            max_bytes=max_update_bytes, max_transfers=64, timeout=transfer_timeout
        )
        # answers whose control message or payload has not fully arrived yet (bounded)
        self.controls: OrderedDict[str, UpdateMessage] = OrderedDict()
        self.payloads: OrderedDict[str, bytes] = OrderedDict()
        # task id -> (task, payload rebuilder, transfer id), for resends after a reconnect
        self.sent: dict[str, tuple[TaskMessage, object, str]] = {}
        self._inflight = None
        self.connects_seen = 0
        # a device's update bytes beyond what its tasks of the round justify are dropped in the
        # network thread, before they are buffered (a flooding device)
        self.upload_budget = UploadBudget(topics.update(""))
        link.admit = self.upload_budget.admit
        for topic in (topics.presence(), topics.hello(), topics.update(), topics.update_data()):
            link.subscribe(topic, 1)

    # ------------------------------------------------------------------ registry

    def clients(self) -> list[str]:
        self.poll(0.0)
        now = time.monotonic()
        return sorted(
            c
            for c, r in self.registry.items()
            if r.is_online(now) and r.hello is not None and not r.hello.problem
        )

    def boards(self) -> dict[str, dict]:
        """Each known client as monitoring shows it (read from another thread: a copy)."""
        now = time.monotonic()
        out = {}
        for cid, r in list(self.registry.items()):
            h = r.hello
            out[cid] = {
                "online": r.is_online(now),
                "profile": dict(h.profile) if h else {},
                "keep_estimate": h.keep_estimate if h else None,
                "samples": h.samples if h else None,
                "problem": h.problem if h else "",
            }
        return out

    def spooled_bytes(self) -> int:
        """Update bytes the inbox holds on disk now."""
        return self.link.inbox.on_disk

    def keep_estimate(self, client_id: str) -> float | None:
        r = self.registry.get(client_id)
        return r.hello.keep_estimate if r and r.hello else None

    def wait_for_clients(self, count: int, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.clients()) < count and not self.stopped():
            self.poll(0.2)
        return self.clients()

    # ------------------------------------------------------------------ sending

    def send(self, task: TaskMessage, payload: bytes, rebuild=None) -> None:
        # flow control: the previous task's last chunk must have reached the broker, so that
        # paho never queues more than about one payload in memory
        if self._inflight is not None:
            # while disconnected paho keeps the message queued and sends it on reconnect
            with contextlib.suppress(RuntimeError, ValueError):
                self._inflight.wait_for_publish(timeout=60)
        transfer, _infos = self.link.publish_payload(
            self.topics.task_data(task.client_id), payload, self.chunk_size
        )
        task = task.model_copy(update={"transfer": transfer})
        self.upload_budget.expect(task.client_id, task.round, len(payload))
        for old in [t for t, (o, _, _) in self.sent.items() if o.round < task.round]:
            del self.sent[old]  # earlier rounds are over: never resent
        self.sent[task.task_id] = (task, rebuild or (lambda: payload), transfer)
        self._inflight = self.link.publish(
            self.topics.task(task.client_id), task.model_dump_json(), qos=1
        )

    def _resend_unanswered(self, pending: set[str]) -> None:
        """After a reconnect, QoS 1 messages still queued in the broker or in paho will arrive;
        those lost with a crashed broker will not: send unanswered tasks again (clients ignore
        task ids they already hold)."""
        for task_id in pending:
            if task_id in self.sent:
                task, rebuild, transfer = self.sent[task_id]
                self.link.publish_payload(
                    self.topics.task_data(task.client_id),
                    rebuild(),
                    self.chunk_size,
                    transfer=transfer,
                )
                self.link.publish(self.topics.task(task.client_id), task.model_dump_json(), 1)

    def acknowledge(self, message: UpdateMessage, accepted: bool, reason: str = "") -> None:
        try:
            check_name("client id", message.client_id)
        except ProtocolError:
            return
        ack = Ack(
            task_id=message.task_id, client_id=message.client_id, accepted=accepted, reason=reason
        )
        self.link.publish(self.topics.ack(message.client_id), ack.model_dump_json(), qos=1)

    # ------------------------------------------------------------------ receiving

    def poll(self, timeout: float) -> int:
        """Process registrations and presence that arrived (waiting up to ``timeout`` for the
        first message), one message at a time. Answers found here belong to no round being
        collected (late ones, after their deadline): they are dropped as they complete, never
        accumulated. Returns how many were dropped."""
        dropped = 0
        msg = self.link.get(timeout)
        while msg is not None:
            for item in self._handle(msg.topic, msg.payload):
                dropped += 1
                if not isinstance(item, Rejected):
                    log.info(
                        "dropped a late answer from %s (round %d)", item[0].client_id, item[0].round
                    )
            msg = self.link.get(0.0)
        return dropped

    def _handle(self, topic: str, payload: bytes) -> list[Received]:
        try:
            kind, client, data = self.topics.parse(topic)
        except ProtocolError as exc:
            log.warning("ignored message: %s", exc)
            return []
        try:
            check_name("client id", client or "")
        except ProtocolError as exc:
            log.warning("ignored message on %s: %s", topic, exc)
            return []
        reg = self.registry.setdefault(client, Registered())
        reg.last_seen = time.monotonic()
        try:
            if kind == "presence":
                if payload:
                    self._presence(reg, parse_json(Presence, payload))
                return []
            if kind == "hello":
                if payload:
                    hello = parse_json(Hello, payload)
                    if hello.client_id != client:
                        raise ProtocolError(f"hello on {client}'s topic names {hello.client_id}")
                    if hello.problem and (reg.hello is None or reg.hello.problem != hello.problem):
                        log.warning("%s cannot take part: %s", client, hello.problem)
                    reg.hello = hello  # retained: it says nothing about being online now
                return []
            if kind == "update" and data:
                done = self.reassembler.add(payload)
                if done is None:
                    return []
                transfer, body = done
                self.payloads[transfer] = body
                self._trim()
                return self._match(transfer)
            if kind == "update":
                msg = parse_json(UpdateMessage, payload)
                if msg.client_id != client:
                    raise ProtocolError(f"update on {client}'s topic names {msg.client_id}")
                if msg.status != "ok" or msg.transfer is None:
                    return [(msg, None)]
                self.controls[msg.transfer] = msg
                self._trim()
                return self._match(msg.transfer)
        except ProtocolError as exc:
            log.warning("rejected message from %s on %s: %s", client, topic, exc)
            return [Rejected(client, str(exc))]
        return []

    def _presence(self, reg: Registered, presence: Presence) -> None:
        now = time.monotonic()
        if presence.status == "online":
            lasts = presence.alive_for()
            reg.online, reg.alive_until = True, None if lasts is None else now + lasts
        elif reg.online or not reg.offline_since:
            reg.online, reg.offline_since = False, now

    def _give_up_on_gone(self, pending: set[str]) -> None:
        """Stop waiting for tasks whose client has gone (the engine records them missing)."""
        now = time.monotonic()
        for task_id in list(pending):
            cid = self.sent[task_id][0].client_id if task_id in self.sent else None
            reg = self.registry.get(cid) if cid else None
            if reg is not None and reg.gone(now):
                pending.discard(task_id)
                log.info("%s has gone offline: not waiting for its answer", cid)

    def _match(self, transfer: str) -> list[Received]:
        if transfer in self.controls and transfer in self.payloads:
            return [(self.controls.pop(transfer), self.payloads.pop(transfer))]
        return []

    def _trim(self, keep: int = 256) -> None:
        while len(self.controls) > keep:
            self.controls.popitem(last=False)
        while len(self.payloads) > 16:  # completed payloads waiting for their control message
            self.payloads.popitem(last=False)

    def collect(self, pending: set[str], deadline: float) -> Iterator[Received]:
        self.connects_seen = self.link.connects
        checked = 0.0
        while pending and time.monotonic() < deadline and not self.stopped():
            if self.link.connects != self.connects_seen:  # reconnected meanwhile
                self.connects_seen = self.link.connects
                self._resend_unanswered(set(pending))
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                self._give_up_on_gone(pending)
                if not pending:
                    break
            # one message at a time: the backlog stays in the link's (memory-bounded) inbox
            # instead of being reassembled all at once
            msg = self.link.get(min(0.5, max(deadline - time.monotonic(), 0.0)))
            if msg is None:
                continue
            yield from self._handle(msg.topic, msg.payload)

    def stats(self) -> dict:
        inbox = self.link.inbox
        out = {
            "inbox_peak_memory_mb": round(inbox.peak_in_memory / 2**20, 3),
            "inbox_peak_on_disk_mb": round(inbox.peak_on_disk / 2**20, 3),
            "inbox_spooled_mb": round(inbox.spooled_total / 2**20, 3),
        }
        dropped = self.upload_budget.take_dropped()
        if dropped:  # devices that sent more than their upload budget: MB dropped
            out["over_budget_mb"] = {c: round(n / 2**20, 3) for c, n in sorted(dropped.items())}
        inbox.reset_peaks()
        return out

    def close(self) -> None:
        with contextlib.suppress(CAHFPError):
            self.link.stop()
