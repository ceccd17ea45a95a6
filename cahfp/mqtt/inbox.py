"""A first-in first-out inbox of received messages whose memory is bounded.

paho's network thread puts every message here as soon as it arrives, and the consumer (the
coordinator's round loop, the agent) takes them at its own pace. When a thousand boards upload at
once the consumer falls behind; the backlog must then wait somewhere. Holding it in memory made
the coordinator's resident size grow with the number of clients; acknowledging messages only once
consumed (broker-side flow control) made rounds several times slower. So payloads beyond a memory
budget wait in an unlinked temporary file and are read back in order: memory stays bounded, disk
(page cache) takes the burst, and nothing is dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("cahfp.inbox")

DEFAULT_MEMORY = 64 << 20


@dataclass
class Incoming:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class _Spooled:
    topic: str
    offset: int
    length: int
    retain: bool


class SpoolingInbox:
    """Thread-safe FIFO holding at most ``memory_bytes`` of payload in memory.

    Messages that do not fit wait in a temporary file in ``spool_dir`` (the system's temporary
    directory by default); the file is unlinked at creation, so nothing is left behind even after
    a crash, and it is truncated whenever the inbox drains. If the file cannot be written (disk
    full), the message is kept in memory rather than lost, and the failure is logged.
    """

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY, spool_dir: str | None = None):
        self.memory_bytes, self.spool_dir = memory_bytes, spool_dir
        self._items: collections.deque[Incoming | _Spooled] = collections.deque()
        self._cond = threading.Condition()
        self._file = None
        self._end = 0  # bytes written to the spool file since it was last emptied
        self._waiting_on_disk = 0  # spooled messages not taken yet
        self._closed = False
        self.in_memory = 0  # payload bytes held in memory now
        self.on_disk = 0  # payload bytes waiting in the spool file now
        # high-water marks and totals since the last reset_peaks()
        self.peak_in_memory = 0
        self.peak_on_disk = 0
        self.spooled_total = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def reset_peaks(self) -> None:
        """Start a new measurement period for the high-water marks and the spooled total."""
        with self._cond:
            self.peak_in_memory, self.peak_on_disk = self.in_memory, self.on_disk
            self.spooled_total = 0

    def put(self, item: Incoming) -> None:
        size = len(item.payload)
        with self._cond:
            if self.in_memory + size > self.memory_bytes and size > 0 and not self._closed:
                spooled = self._spool(item)
                if spooled is not None:
                    self._items.append(spooled)
                    self._cond.notify()
                    return
            self._items.append(item)
            self.in_memory += size
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            self._cond.notify()

    def get(self, timeout: float) -> Incoming | None:
        """The oldest message, waiting up to ``timeout`` seconds; None if none came."""
        end = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not self._items:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            while self._items:
                item = self._items.popleft()
                if isinstance(item, Incoming):
                    self.in_memory -= len(item.payload)
                    return item
                self._waiting_on_disk -= 1
                self.on_disk -= item.length
                try:
                    data = self._read(item)
                except OSError as exc:  # the spool file was damaged under us: say so, skip it
                    log.error("lost a spooled message on %s: %s", item.topic, exc)
                    continue
                finally:
                    if not self._waiting_on_disk:
                        self._reset_file()
                return Incoming(item.topic, data, item.retain)
            return None

    def close(self) -> None:
        """Drop what waits on disk and release the file; later messages stay in memory."""
        with self._cond:
            self._closed = True
            self._items = collections.deque(i for i in self._items if isinstance(i, Incoming))
            self._waiting_on_disk = self.on_disk = self._end = 0
            if self._file is not None:
                self._file.close()
                self._file = None

    # ------------------------------------------------------------------ spool file (lock held)

    def _spool(self, item: Incoming) -> _Spooled | None:
        try:
            if self._file is None:
                # closed by close(); a context manager cannot span the inbox's life
                self._file = tempfile.TemporaryFile(prefix="cahfp-inbox-", dir=self.spool_dir)  # noqa: SIM115
            fd = self._file.fileno()
            view, offset = memoryview(item.payload), self._end
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except (OSError, AttributeError) as exc:  # AttributeError: no os.pwrite (Windows)
            log.error(
                "cannot spool a %d-byte message to disk (%s); keeping it in memory",
                len(item.payload),
                exc,
            )
            return None
        spooled = _Spooled(item.topic, self._end, len(item.payload), item.retain)
        self._end += spooled.length
        self._waiting_on_disk += 1
        self.on_disk += spooled.length
        self.spooled_total += spooled.length
        self.peak_on_disk = max(self.peak_on_disk, self.on_disk)
        return spooled

    def _read(self, item: _Spooled) -> bytes:
        data = os.pread(self._file.fileno(), item.length, item.offset)
        if len(data) != item.length:
            raise OSError(
                f"spooled message on {item.topic} came back short "
                f"({len(data)} of {item.length} bytes)"
            )
        return data

    def _reset_file(self) -> None:
        """Empty the file once nothing in it is waiting (under a backlog that never drains the
        file keeps growing: the inbox bounds memory, not disk)."""
        try:
            self._file.truncate(0)
        except OSError as exc:
            log.warning("cannot truncate the inbox spool file: %s", exc)
        self._end = 0
