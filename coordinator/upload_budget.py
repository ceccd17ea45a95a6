"""A per-device byte budget for what devices publish on their update topics, enforced in the
MQTT network thread before anything is buffered.

A device may publish on its own ``update/<id>`` and ``update/<id>/data`` topics as fast as its
link allows (hundreds of MB/s on a LAN), and mosquitto 2.0 has no per-client ingress rate limit.
Without a budget every byte of such a flood is queued in the coordinator's inbox (memory, then
its spool file) and checked one message at a time, while real answers wait behind it. With it,
each device may send per round what its answers can need (a few times the payloads of the tasks
it was sent this round, plus a small allowance for control messages and stray chunks); the rest
is counted and dropped on arrival, at the cost of reading it off the socket.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

log = logging.getLogger("cahfp.coordinator.mqtt")

FLOOR = 1 << 20  # bytes every device may send per round without a task (control messages)
# an answer and its resends, per byte of the tasks it was sent; generous, so that forgeries in a
# device's name on a broker without ACL (tests/system/test_mqtt.py's saboteur) leave it room
FACTOR = 8


class UploadBudget:
    """Counts update bytes per device for the current round; ``admit`` says whether one more
    message fits. Thread-safe: ``admit`` runs in paho's thread, the rest in the round loop."""

    def __init__(self, prefix: str, floor: int = FLOOR, factor: float = FACTOR):
        self.prefix = prefix  # the update topics' common start, cahfp/<fed>/update/
        self.floor, self.factor = floor, factor
        self._lock = threading.Lock()
        self.round = 0
        self._allowed: dict[str, float] = defaultdict(float)
        self._used: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)  # since the last take_dropped()

    def expect(self, client_id: str, rnd: int, payload_bytes: int) -> None:
        """A task of round ``rnd`` with a payload of ``payload_bytes`` was sent to the client; a
        new round starts every device's count afresh."""
        with self._lock:
            if rnd != self.round:
                self.round = rnd
                self._allowed.clear()
                self._used.clear()
            self._allowed[client_id] += self.factor * payload_bytes

    def admit(self, topic: str, size: int) -> bool:
        if not topic.startswith(self.prefix):
            return True
        client_id = topic[len(self.prefix) :].split("/", 1)[0]
        with self._lock:
            used = self._used[client_id] = self._used[client_id] + size
            if used <= self.floor + self._allowed.get(client_id, 0.0):
                return True
            first = client_id not in self.dropped
            self.dropped[client_id] += size
        if first:
            log.warning(
                "%s sent more than its upload budget for round %d: dropping the rest",
                client_id,
                self.round,
            )
        return False

    def take_dropped(self) -> dict[str, int]:
        """Bytes dropped per device since the previous call."""
        with self._lock:
            out, self.dropped = dict(self.dropped), defaultdict(int)
        return out
