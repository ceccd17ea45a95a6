"""The MQTT protocol as data: topic names, the chunk format for large payloads, and a bounded
reassembler. No sockets here; ``cahfp.mqtt.link`` carries these bytes over paho-mqtt.

Topics (``<fed>`` = federation id, ``<c>`` = client id = MQTT username):

====================================  ===========  ===  ======  ==============================
topic                                 direction    QoS  retain  payload
====================================  ===========  ===  ======  ==============================
cahfp/<fed>/presence/<c>              client→all   1    yes     Presence JSON (last will:
                                                                 ``offline``)
cahfp/<fed>/hello/<c>                 client→coord 1    yes     Hello JSON (device profile)
cahfp/<fed>/task/<c>                  coord→client 1    no      TaskMessage JSON
cahfp/<fed>/task/<c>/data             coord→client 1    no      chunks of the task's payload
cahfp/<fed>/update/<c>                client→coord 1    no      UpdateMessage JSON
cahfp/<fed>/update/<c>/data           client→coord 1    no      chunks of the update payload
cahfp/<fed>/ack/<c>                   coord→client 1    no      Ack JSON
cahfp/<fed>/model                     coord→all    1    yes     ModelAnnouncement JSON
cahfp/<fed>/status                    coord→all    1    yes     Status JSON
====================================  ===========  ===  ======  ==============================

A chunk is ``b"CHFP" | u32 header length (big-endian) | JSON header | data`` with header fields
``transfer`` (hex id), ``index``, ``count``, ``size`` (total bytes) and ``sha256`` (of the whole
payload). Every decoding step raises ``ProtocolError`` (a ``CAHFPError``) on bad input.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cahfp.errors import CAHFPError
from cahfp.messages import _Message

MAGIC = b"CHFP"
PREFIX = "cahfp"
DEFAULT_CHUNK = 1 << 20
PRESENCE_EVERY = 30.0  # seconds between a client's presence refreshes (default)
PRESENCE_MISSES = 3  # refreshes missed before the coordinator counts a client as gone
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Every MQTT connection sends CLIENT_ID_PREFIX + its name as its client id. The generated broker
# configuration refuses any other client id before it reads the credentials (``clientid_prefixes``)
# and then replaces the id by the username; ':' never occurs in a name (NAME_RE), so no session
# is ever keyed by a prefixed id. Why: docs/deploy.md, threat model (a refused connection must
# not be able to name another client's session).
CLIENT_ID_PREFIX = "cahfp:"


# Broker accounts that are never boards: the coordinator, and the read-only observer that
# `cahfp status` uses. A board may not take these names, and the coordinator ignores anything
# published under them on board topics (the broker's per-user patterns let every account write
# its own presence, hello and update topics).
RESERVED_NAMES = ("coordinator", "observer")


class ProtocolError(CAHFPError):
    """A message, chunk or transfer violates the protocol."""


def check_name(kind: str, value: str) -> str:
    """Federation and client ids become topic levels and MQTT usernames: keep them plain."""
    if not NAME_RE.match(value or ""):
        raise ProtocolError(
            f"{kind} {value!r} must be 1-64 characters of letters, digits, "
            "'_', '-', '.', starting with a letter or digit"
        )
    if kind in ("client id", "device name") and value in RESERVED_NAMES:
        raise ProtocolError(f"{kind} {value!r} is reserved (names kept for broker accounts: "
                            f"{', '.join(RESERVED_NAMES)})")  # fmt: skip
    return value


@dataclass(frozen=True)
class Topics:
    fed: str

    def __post_init__(self):
        check_name("federation id", self.fed)

    def _t(self, *parts: str) -> str:
        return "/".join((PREFIX, self.fed, *parts))

    def presence(self, c: str = "+") -> str:
        return self._t("presence", c)

    def hello(self, c: str = "+") -> str:
        return self._t("hello", c)

    def task(self, c: str = "+") -> str:
        return self._t("task", c)

    def task_data(self, c: str = "+") -> str:
        return self._t("task", c, "data")

    def update(self, c: str = "+") -> str:
        return self._t("update", c)

    def update_data(self, c: str = "+") -> str:
        return self._t("update", c, "data")

    def ack(self, c: str = "+") -> str:
        return self._t("ack", c)

    @property
    def model(self) -> str:
        return self._t("model")

    @property
    def status(self) -> str:
        return self._t("status")

    def parse(self, topic: str) -> tuple[str, str | None, bool]:
        """(kind, client id or None, is chunk data) of a topic of this federation."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != PREFIX or parts[1] != self.fed:
            raise ProtocolError(f"topic {topic!r} is not in federation {self.fed!r}")
        kind = parts[2]
        if kind in ("model", "status") and len(parts) == 3:
            return kind, None, False
        if len(parts) == 4 or (len(parts) == 5 and parts[4] == "data"):
            return kind, parts[3], len(parts) == 5
        raise ProtocolError(f"unknown topic {topic!r}")


# ------------------------------------------------------------------ small JSON messages


class Presence(_Message):
    """Retained. ``online`` is refreshed every ``every`` seconds while connected (a client
    whose connection ends without its last will, e.g. revoked at a broker reload, stops
    refreshing and counts as gone after ``PRESENCE_MISSES`` refreshes); ``offline``: stopped."""

    kind: Literal["presence"] = "presence"
    client_id: str
    status: Literal["online", "offline"]
    every: float | None = Field(None, gt=0, le=3600)

    def alive_for(self) -> float | None:
        """Seconds this message vouches for the client (None: until an ``offline``)."""
        return None if self.every is None else PRESENCE_MISSES * self.every


class Hello(_Message):
    kind: Literal["hello"] = "hello"
    client_id: str
    samples: int = Field(ge=0)
    keep_estimate: float | None = Field(None, ge=0, le=1)
    profile: dict = Field(default_factory=dict)
    max_chunk: int = Field(DEFAULT_CHUNK, ge=1024)
    problem: str = Field(
        "", max_length=500, description="why this device cannot take part (never selected)"
    )


class Ack(_Message):
    kind: Literal["ack"] = "ack"
    task_id: str
    client_id: str
    accepted: bool
    reason: str = ""


RUN_ID = r"^[0-9a-f]{8,64}$"


class ModelAnnouncement(_Message):
    kind: Literal["model"] = "model"
    run: str | None = Field(None, pattern=RUN_ID)  # the run it belongs to (Status.run)
    round: int
    sha256: str
    bytes: int
    accuracy: float | None = None


class Status(_Message):
    """Retained: where the federation is, and what a new client needs to estimate its budget
    before its first task (model, recipe, deadline). ``run`` names the coordinator's run (kept
    across ``--resume``): a retained status of another run (an earlier one under the same
    federation name) is history, not an instruction."""

    kind: Literal["status"] = "status"
    run: str | None = Field(None, pattern=RUN_ID)
    round: int
    state: Literal["waiting", "running", "finished", "stopped"]
    detail: str = ""
    model: dict | None = None
    recipe: dict | None = None
    deadline_s: float | None = None
    budget: dict | None = None  # BudgetSettings
    score_samples: int = Field(0, ge=0, description="samples a plan refresh scores")


def parse_json(model: type[BaseModel], payload: bytes, max_bytes: int = 1 << 20):
    """Validate a small JSON control message; any problem is a ``ProtocolError``."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{model.__name__} message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"malformed {model.__name__}: {where}: {first['msg']}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed {model.__name__}: {exc}") from None


# ------------------------------------------------------------------ chunks


class ChunkHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    transfer: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def split_payload(
    data: bytes,
    chunk_size: int = DEFAULT_CHUNK,
    transfer: str | None = None,
    digest: str | None = None,
) -> tuple[str, list[bytes]]:
    """Encode ``data`` as chunk messages; returns (transfer id, messages). ``digest`` (the
    payload's sha256, hex) may be passed when already known."""
    transfer, chunks = iter_chunks(data, chunk_size, transfer, digest)
    return transfer, list(chunks)


def iter_chunks(
    data: bytes,
    chunk_size: int = DEFAULT_CHUNK,
    transfer: str | None = None,
    digest: str | None = None,
) -> tuple[str, Iterator[bytes]]:
    """Like ``split_payload``, but builds each chunk message only when asked for it (a sender
    can publish the first chunk while the next is being built)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    transfer = transfer or uuid.uuid4().hex
    digest = digest or hashlib.sha256(data).hexdigest()
    count = max(1, -(-len(data) // chunk_size))
    view = memoryview(data)

    def chunks() -> Iterator[bytes]:
        for i in range(count):
            header = json.dumps(
                {
                    "transfer": transfer,
                    "index": i,
                    "count": count,
                    "size": len(data),
                    "sha256": digest,
                }
            ).encode()
            piece = view[i * chunk_size : (i + 1) * chunk_size]  # copied once, by the join
            yield b"".join((MAGIC, len(header).to_bytes(4, "big"), header, piece))

    return transfer, chunks()


def decode_chunk(message: bytes) -> tuple[ChunkHeader, memoryview]:
    """The chunk's header and its data (a view into ``message``, not a copy)."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise ProtocolError("chunk must be bytes")
    if not isinstance(message, bytes):  # views into a mutable buffer could change under us
        message = bytes(message)
    message = memoryview(message)
    if len(message) < 8 or bytes(message[:4]) != MAGIC:
        raise ProtocolError("not a CA-HFP chunk (bad magic)")
    n = int.from_bytes(bytes(message[4:8]), "big")
    if n > 4096 or 8 + n > len(message):
        raise ProtocolError(f"chunk header length {n} is invalid")
    try:
        header = ChunkHeader.model_validate_json(bytes(message[8 : 8 + n]))
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed chunk header: {str(exc).splitlines()[0]}") from None
    if header.index >= header.count:
        raise ProtocolError(f"chunk index {header.index} >= count {header.count}")
    return header, message[8 + n :]


@dataclass
class _Partial:
    header: ChunkHeader
    pieces: list[memoryview] = field(default_factory=list)  # the contiguous prefix so far
    early: dict[int, memoryview] = field(default_factory=dict)  # chunks ahead of the prefix
    next: int = 0  # index of the chunk that extends the prefix
    received: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)  # sha256 of the prefix
    started: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects chunks into payloads with bounded memory: a transfer larger than ``max_bytes``
    is refused up front, at most ``max_transfers`` are open at once (the oldest is dropped),
    incomplete transfers expire after ``timeout`` seconds, redelivered chunks are ignored, and a
    completed payload must match its sha256.

    Chunks arriving in order (the usual case: QoS 1 from one publisher) are hashed as they
    come, so the check at the end costs nothing extra, and their data is copied once, into the
    payload (``bytes``) when the last one arrives; chunks ahead of their turn wait until the gap
    is filled."""

    def __init__(self, max_bytes: int = 256 << 20, max_transfers: int = 8, timeout: float = 600.0):
        self.max_bytes, self.max_transfers, self.timeout = max_bytes, max_transfers, timeout
        self.open: dict[str, _Partial] = {}
        self.done: dict[str, float] = {}  # completed transfer ids (to ignore late duplicates)

    @property
    def buffered_bytes(self) -> int:
        return sum(p.received for p in self.open.values())

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        old = [t for t, p in self.open.items() if now - p.started > self.timeout]
        for t in old:
            del self.open[t]
        for t in [t for t, when in self.done.items() if now - when > self.timeout]:
            del self.done[t]
        return old

    def add(self, message: bytes) -> tuple[str, bytes] | None:
        """Feed one chunk message; returns (transfer id, payload) when a transfer completes."""
        header, data = decode_chunk(message)
        self.expire()
        t = header.transfer
        if t in self.done:
            return None  # duplicate of a finished transfer (QoS 1 redelivery)
        if header.size > self.max_bytes:
            raise ProtocolError(
                f"transfer {t[:8]} of {header.size} bytes exceeds the limit of "
                f"{self.max_bytes} bytes; refused"
            )
        partial = self.open.get(t)
        if partial is None:
            if len(self.open) >= self.max_transfers:
                oldest = min(self.open, key=lambda k: self.open[k].started)
                del self.open[oldest]
            partial = self.open[t] = _Partial(header)
        elif (partial.header.count, partial.header.size, partial.header.sha256) != (
            header.count,
            header.size,
            header.sha256,
        ):
            del self.open[t]
            raise ProtocolError(f"transfer {t[:8]}: chunks disagree on count, size or hash")
        if header.index < partial.next or header.index in partial.early:
            return None  # redelivered chunk
        if partial.received + len(data) > header.size:
            del self.open[t]
            raise ProtocolError(f"transfer {t[:8]}: more data than its declared size")
        partial.received += len(data)
        partial.early[header.index] = data
        while partial.next in partial.early:  # extend the prefix, hashing as we go
            piece = partial.early.pop(partial.next)
            partial.pieces.append(piece)
            partial.hasher.update(piece)
            partial.next += 1
        if partial.next < header.count:
            return None
        del self.open[t]
        if partial.received != header.size:
            raise ProtocolError(
                f"transfer {t[:8]}: {partial.received} bytes, declared {header.size}"
            )
        if partial.hasher.hexdigest() != header.sha256:
            raise ProtocolError(f"transfer {t[:8]}: sha256 mismatch; payload discarded")
        self.done[t] = time.monotonic()
        return t, b"".join(partial.pieces)  # the one copy of the data
