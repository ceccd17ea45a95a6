"""In-process transport for simulation: clients run one after another in this process, with
the very same messages (serialised to JSON and back) and payload bytes as over MQTT."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from cahfp.client_round import ClientState, Result, run_task
from cahfp.messages import TaskMessage, UpdateMessage
from coordinator.transport import Received, Transport


class InProcessTransport(Transport):
    def __init__(
        self, states: dict[str, ClientState], on_result: Callable[[str, Result], None] | None = None
    ):
        self.states = states
        self.queue: list[tuple[str, bytes]] = []
        self.on_result = on_result

    def clients(self) -> list[str]:
        return list(self.states)

    def send(self, task: TaskMessage, payload: bytes, rebuild=None) -> None:
        self.queue.append((task.model_dump_json(), payload))

    def collect(self, pending: set[str], deadline: float) -> Iterator[Received]:
        queue, self.queue = self.queue, []
        for raw, payload in queue:
            task = TaskMessage.model_validate_json(raw)
            if task.task_id not in pending or time.monotonic() > deadline:
                continue
            result = run_task(self.states[task.client_id], task, payload)
            if self.on_result:
                self.on_result(task.client_id, result)
            if result.message.metrics.total_seconds > task.deadline_s:
                continue  # (emulated) device time ran past the deadline: the update is late
            yield (
                UpdateMessage.model_validate_json(result.message.model_dump_json()),
                result.payload,
            )
