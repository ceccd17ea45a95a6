"""The interface between the round engine and whatever carries messages to clients."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from cahfp.messages import TaskMessage, UpdateMessage

Received = tuple[UpdateMessage, bytes | None]


class Transport(ABC):
    """Delivers tasks (control message + payload bytes) and yields the answers."""

    @abstractmethod
    def clients(self) -> list[str]:
        """Ids of the clients available for selection now."""

    @abstractmethod
    def send(self, task: TaskMessage, payload: bytes) -> None:
        """Queue or deliver one task."""

    @abstractmethod
    def collect(self, pending: set[str], deadline: float) -> Iterator[Received]:
        """Yield answers to the tasks in ``pending`` (task ids) as they arrive, until all have
        answered or ``time.monotonic()`` passes ``deadline``. May also yield messages that do
        not belong to ``pending`` (late, duplicated or forged): the engine checks them."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
