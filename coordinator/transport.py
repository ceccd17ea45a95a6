"""The interface between the round engine and whatever carries messages to clients."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from cahfp.messages import TaskMessage, UpdateMessage


@dataclass(frozen=True)
class Rejected:
    """A message the transport itself refused (malformed JSON, bad chunk, oversize payload),
    attributed to the client whose topic it came from."""

    client_id: str
    reason: str
    task_id: str | None = None


Received = tuple[UpdateMessage, bytes | None] | Rejected


class Transport(ABC):
    """Delivers tasks (control message + payload bytes) and yields the answers."""

    #: once set (an operator's stop), ``collect`` and any waiting end within about a second
    stop: threading.Event | None = None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @abstractmethod
    def clients(self) -> list[str]:
        """Ids of the clients available for selection now."""

    def keep_estimate(self, client_id: str) -> float | None:
        """What a client said it can afford when it registered (None: unknown)."""
        return None

    def acknowledge(self, message: UpdateMessage, accepted: bool, reason: str = "") -> None:  # noqa: B027
        """Tell the client whether its update was taken."""

    @abstractmethod
    def send(self, task: TaskMessage, payload: bytes, rebuild=None) -> None:
        """Queue or deliver one task. ``rebuild()`` returns the same payload again if the
        transport needs to resend it (so it need not keep every payload in memory)."""

    @abstractmethod
    def collect(self, pending: set[str], deadline: float) -> Iterator[Received]:
        """Yield answers to the tasks in ``pending`` (task ids) as they arrive, until
        ``pending`` is empty, ``time.monotonic()`` passes ``deadline`` or ``stop`` is set. The
        engine removes a task from ``pending`` (the same set object) once it has accepted a final
        answer to it, so a rejected (possibly forged) answer does not end the wait for the genuine
        one. May also yield messages that do not belong to ``pending`` (late, duplicated or
        forged): the engine checks them."""

    def stats(self) -> dict:
        """Counters worth recording with each round (e.g. inbound backlog), measured since the
        previous call (the engine calls it once at the end of every round); JSON-serializable."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
