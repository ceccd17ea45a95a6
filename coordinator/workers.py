"""Simulation over several cores: the clients of a round run in parallel in persistent worker
processes (``federation.backend = "processes"``), each holding the data of its share of the
clients. The coordinator's copy of every ``ClientState`` stays the one that counts (checkpoints
read it, resume restores it): each task carries the client's current plan state to its worker
and each answer brings the new state back. Answers are yielded in the order the tasks were
sent, so aggregation folds them exactly as the in-process transport does, and the result is
bitwise the same as a sequential run with the workers' torch thread count."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait

from cahfp.client_round import ClientState, Result, run_task
from cahfp.errors import CAHFPError
from cahfp.messages import TaskMessage, UpdateMessage
from coordinator.inprocess import InProcessTransport
from coordinator.snapshot import BUDGET_FIELDS
from coordinator.transport import Received


def _plan_state(state: ClientState) -> dict:
    """What a round changes in a client's state (besides caches)."""
    budget = None
    if state.device is not None:
        budget = {f: getattr(state.device.model, f) for f in BUDGET_FIELDS}
    return {
        "index_map": state.index_map,
        "keep_achieved": state.keep_achieved,
        "statistics": state.statistics,
        "budget": budget,
    }


def _apply(state: ClientState, plan: dict) -> None:
    state.index_map = plan["index_map"]
    state.keep_achieved = plan["keep_achieved"]
    state.statistics = plan["statistics"]
    if plan["budget"] is not None and state.device is not None:
        for f, v in plan["budget"].items():
            setattr(state.device.model, f, v)


def _worker(conn: Connection, states: dict[str, ClientState], threads: int) -> None:
    """A worker's loop: run each (task, payload, plan state) it receives on its client."""
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        raw, payload, plan = item
        task = TaskMessage.model_validate_json(raw)
        state = states[task.client_id]
        _apply(state, plan)
        try:
            result = run_task(state, task, payload)
        except BaseException as exc:  # run_task answers bad input itself; this is a crash
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))
            return
        conn.send((result.message.model_dump_json(), result.payload, _plan_state(state)))


class ProcessTransport(InProcessTransport):
    """The in-process transport (its queue, messages and payload bytes), with the round's
    clients run by ``workers`` processes of ``threads`` torch threads each (client ``i`` in
    sorted order on worker ``i % workers``)."""

    def __init__(
        self,
        states: dict[str, ClientState],
        workers: int,
        threads: int = 1,
        on_result: Callable[[str, Result], None] | None = None,
    ):
        if workers < 1:
            raise CAHFPError(f"the processes backend needs at least one worker, got {workers}")
        super().__init__(states, on_result)
        order = sorted(states)
        self.worker_of = {cid: i % workers for i, cid in enumerate(order)}
        ctx = mp.get_context("spawn")  # no forked torch thread pools
        self.conns: list[Connection] = []
        self.procs = []
        for w in range(workers):
            mine = {cid: s for cid, s in states.items() if self.worker_of[cid] == w}
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(child, mine, threads), daemon=True, name=f"cahfp-worker-{w}"
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def collect(self, pending: set[str], deadline: float) -> Iterator[Received]:
        queue, self.queue = self.queue, []
        tasks: list[tuple[TaskMessage, str, bytes]] = []
        for raw, payload in queue:
            task = TaskMessage.model_validate_json(raw)
            if task.task_id in pending and time.monotonic() <= deadline:
                tasks.append((task, raw, payload))
        # one task in flight per worker (a pipe holds a few MB: two at once could deadlock
        # with the worker's answer); answers are yielded in the order the tasks were queued,
        # the same fold as in-process
        todo = {w: [i for i, t in enumerate(tasks) if self.worker_of[t[0].client_id] == w]
                for w in range(len(self.conns))}  # fmt: skip
        busy: dict[Connection, tuple[int, int]] = {}

        def dispatch(w: int) -> None:
            if todo[w]:
                i = todo[w].pop(0)
                task, raw, payload = tasks[i]
                plan = _plan_state(self.states[task.client_id])
                try:
                    self.conns[w].send((raw, payload, plan))
                except (BrokenPipeError, ConnectionError, OSError):
                    raise self._died(w) from None
                busy[self.conns[w]] = (w, i)

        for w in todo:
            dispatch(w)
        answers: dict[int, tuple] = {}
        next_out = 0
        try:
            while next_out < len(tasks):
                for conn in wait(list(busy)):
                    w, i = busy.pop(conn)
                    answers[i] = self._receive(w)
                    dispatch(w)
                while next_out in answers:
                    task = tasks[next_out][0]
                    message_json, payload, plan = answers.pop(next_out)
                    next_out += 1
                    _apply(self.states[task.client_id], plan)
                    message = UpdateMessage.model_validate_json(message_json)
                    if self.on_result:
                        self.on_result(task.client_id, Result(message, payload))
                    if message.metrics.total_seconds > task.deadline_s:
                        continue  # (emulated) device time ran past the deadline: late
                    yield message, payload
        finally:  # the engine stopped listening: finish what is in flight, run nothing more
            for w, i in list(busy.values()):
                if self.conns:
                    _apply(self.states[tasks[i][0].client_id], self._receive(w)[2])
            for i in sorted(answers):
                _apply(self.states[tasks[i][0].client_id], answers[i][2])

    def _receive(self, w: int):
        try:
            answer = self.conns[w].recv()
        except (EOFError, ConnectionError, OSError):
            raise self._died(w) from None
        if answer[0] == "crashed":
            raise CAHFPError(f"simulation worker {w} crashed: {answer[1]}")
        return answer

    def _died(self, w: int) -> CAHFPError:
        self.procs[w].join(timeout=1)
        code = self.procs[w].exitcode
        return CAHFPError(f"simulation worker {w} died (exit code {code}; out of memory?)")

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
