"""Simulation over several cores: the clients of a round run in parallel on workers that each
hold the data of their share of the clients: local worker processes
(``federation.backend = "processes"``, here) or Ray actors (``"ray"``,
``coordinator.ray_workers``). The coordinator's copy of every ``ClientState`` stays the one
that counts (checkpoints read it, resume restores it): each task carries the client's current
plan state to its worker and each answer brings the new state back. Answers are yielded in the
order the tasks were sent, so aggregation folds them exactly as the in-process transport does,
and the result is bitwise the same as a sequential run with the workers' torch thread count."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable, Hashable, Iterator
from multiprocessing.connection import Connection, wait

from cahfp.client_round import ClientState, Result, run_task
from cahfp.errors import CAHFPError
from cahfp.messages import TaskMessage, UpdateMessage
from coordinator.inprocess import InProcessTransport
from coordinator.snapshot import BUDGET_FIELDS
from coordinator.transport import Received

#: What a worker is sent for one task: (task JSON, payload, the client's plan state).
Item = tuple[str, bytes, dict]
#: What it answers: (update JSON, payload, the client's new plan state).
Answer = tuple[str, bytes, dict]


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


def serve(states: dict[str, ClientState], item: Item) -> Answer:
    """Run one task on the worker's copy of its client (any worker backend calls this)."""
    raw, payload, plan = item
    task = TaskMessage.model_validate_json(raw)
    state = states[task.client_id]
    _apply(state, plan)
    result = run_task(state, task, payload)
    return result.message.model_dump_json(), result.payload, _plan_state(state)


def spread(states: dict[str, ClientState], workers: int) -> dict[str, int]:
    """Which worker holds each client: the largest clients first, each to the worker holding
    the fewest images so far (ties: the lower worker), so that a round's work is even when every
    client takes part. Deterministic; the result does not depend on it (answers are folded in
    task order)."""
    load = [0] * workers
    out = {}
    for cid in sorted(states, key=lambda c: (-_size(states[c]), c)):
        w = min(range(workers), key=lambda k: (load[k], k))
        out[cid] = w
        load[w] += _size(states[cid])
    return out


def _size(state: ClientState) -> int:
    try:
        return len(state.data)
    except (AttributeError, TypeError):  # a stand-in without data
        return 0


class ParallelTransport(InProcessTransport):
    """The in-process transport (its queue, messages and payload bytes), with the round's
    clients run by ``workers`` workers (``spread`` says which holds which), one task in flight
    per worker. A backend supplies ``_start`` (hand a
    worker an item, get a handle), ``_ready`` (the handles that have finished) and ``_answer``
    (a finished handle's answer, or a one-line ``CAHFPError``)."""

    def __init__(
        self,
        states: dict[str, ClientState],
        workers: int,
        on_result: Callable[[str, Result], None] | None = None,
    ):
        if workers < 1:
            raise CAHFPError(f"a parallel backend needs at least one worker, got {workers}")
        super().__init__(states, on_result)
        self.workers = workers
        self.worker_of = spread(states, workers)

    def _start(self, w: int, item: Item) -> Hashable:
        raise NotImplementedError

    def _ready(self, handles: list[Hashable]) -> list[Hashable]:
        raise NotImplementedError

    def _answer(self, w: int, handle: Hashable) -> Answer:
        raise NotImplementedError

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
                for w in range(self.workers)}  # fmt: skip
        busy: dict[Hashable, tuple[int, int]] = {}

        def dispatch(w: int) -> None:
            if todo[w]:
                i = todo[w].pop(0)
                task, raw, payload = tasks[i]
                plan = _plan_state(self.states[task.client_id])
                busy[self._start(w, (raw, payload, plan))] = (w, i)

        for w in todo:
            dispatch(w)
        answers: dict[int, Answer] = {}
        next_out = 0
        try:
            while next_out < len(tasks):
                for handle in self._ready(list(busy)):
                    w, i = busy.pop(handle)
                    answers[i] = self._answer(w, handle)
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
            for handle, (w, i) in list(busy.items()):
                with contextlib.suppress(CAHFPError):  # a dead worker: reported already
                    _apply(self.states[tasks[i][0].client_id], self._answer(w, handle)[2])
            for i in sorted(answers):
                _apply(self.states[tasks[i][0].client_id], answers[i][2])


def _worker(conn: Connection, states: dict[str, ClientState], threads: int) -> None:
    """A worker process's loop: serve each item it receives."""
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            answer = serve(states, item)
        except BaseException as exc:  # run_task answers bad input itself; this is a crash
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(answer)


class ProcessTransport(ParallelTransport):
    """Workers as local processes of ``threads`` torch threads each, started once (spawned:
    no forked torch thread pools) and fed over pipes."""

    def __init__(
        self,
        states: dict[str, ClientState],
        workers: int,
        threads: int = 1,
        on_result: Callable[[str, Result], None] | None = None,
    ):
        super().__init__(states, workers, on_result)
        ctx = mp.get_context("spawn")
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

    def _start(self, w: int, item: Item) -> Connection:
        try:
            self.conns[w].send(item)
        except (BrokenPipeError, ConnectionError, OSError):
            raise self._died(w) from None
        return self.conns[w]

    def _ready(self, handles: list[Hashable]) -> list[Hashable]:
        return wait(handles)

    def _answer(self, w: int, handle: Hashable) -> Answer:
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
