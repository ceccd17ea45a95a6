"""What a running federation is doing, for the dashboard and Prometheus: fed by the round
engine's events (chained before the progress view's), read as one JSON snapshot. Boards' online
state, profile and chosen keep come from the transport's registry where it has one (MQTT); a
simulation's clients are always online."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cahfp.config import Config

ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)


class Metrics:
    """The Prometheus metrics of one coordinator (a private registry: two federations in one
    process do not mix)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("cahfp_rounds_completed", "Rounds completed", registry=r)
        self.round_seconds = Histogram(
            "cahfp_round_duration_seconds", "Wall time of a round", buckets=ROUND_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.updates = Counter(
            "cahfp_updates", "Client answers by status and reason", ["status", "reason"],
            registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "cahfp_bytes", "Payload bytes by direction (in: from boards)", ["direction"],
            registry=r,
        )  # fmt: skip
        self.boards_online = Gauge("cahfp_boards_online", "Boards online", registry=r)
        self.spool = Gauge("cahfp_inbox_spool_bytes", "Inbox bytes spooled to disk", registry=r)
        self.rss = Gauge("cahfp_coordinator_rss_bytes", "Coordinator resident memory", registry=r)
        self.accuracy = Gauge("cahfp_accuracy", "Accuracy of the global model", registry=r)
        self.round = Gauge("cahfp_round", "The round in progress or last completed", registry=r)
        process = psutil.Process()
        self.rss.set_function(lambda: process.memory_info().rss)


def _reason(text: str) -> str:
    """A short, bounded label for a rejection reason (its first words)."""
    head = text.split(":", 1)[0].strip().lower()
    return " ".join(head.split()[:4])[:48] or "-"


class Monitor:
    """The federation's state as the engine reports it. ``registry``: a callable giving the
    transport's view of the boards ({id: {"online", "profile", "keep_estimate", "samples",
    "problem"}}), None for a simulation. ``spool``: bytes the inbox holds on disk."""

    def __init__(
        self,
        cfg: Config,
        registry: Callable[[], dict] | None = None,
        spool: Callable[[], float] | None = None,
    ):
        self.cfg = cfg
        self.registry = registry
        self.metrics = Metrics()
        if spool is not None:
            self.metrics.spool.set_function(spool)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.version = 0
        self.started = time.time()
        self.round = 0
        self.round_started: float | None = None
        self.selected: list[str] = []
        self.history: list[dict] = []
        self.boards: dict[str, dict] = {}

    def event(self, kind: str, data: dict) -> None:
        with self.lock:
            if kind == "initial":
                self._round_end(data["record"], count=False)
            elif kind == "round_start":
                self.round, self.round_started = data["round"], time.time()
                self.selected = list(data["selected"])
                self.metrics.round.set(self.round)
                for cid in self.selected:
                    self._board(cid)["state"] = "training"
            elif kind == "client_done":
                self._client(data["outcome"])
            elif kind == "rejected":
                b = self._board(data["client"])
                b["last_error"] = data["reason"]
                self.metrics.updates.labels("rejected", _reason(data["reason"])).inc()
            elif kind == "round_end":
                self._round_end(data["record"])
            else:
                return
            self.version += 1
            self.changed.notify_all()

    def _board(self, cid: str) -> dict:
        return self.boards.setdefault(
            cid, {"id": cid, "state": "idle", "keep": None, "keep_target": None,
                  "last_seconds": None, "bytes_up": 0, "bytes_down": 0, "rounds": 0,
                  "last_status": "", "last_error": ""},
        )  # fmt: skip

    def _client(self, o) -> None:
        b = self._board(o.client_id)
        b["state"] = "done"
        b["last_status"] = o.status
        b["keep_target"] = o.keep_target
        if o.keep_achieved is not None:
            b["keep"] = o.keep_achieved
        b["last_seconds"] = o.train_seconds + o.score_seconds
        b["bytes_up"] += o.bytes_up
        b["bytes_down"] += o.bytes_down
        b["rounds"] += o.status == "ok"
        if o.status != "ok":
            b["last_error"] = o.reason or o.status
        self.metrics.updates.labels(o.status, _reason(o.reason) if o.reason else "-").inc()
        self.metrics.bytes.labels("in").inc(o.bytes_up)
        self.metrics.bytes.labels("out").inc(o.bytes_down)

    def _round_end(self, rec, count: bool = True) -> None:
        self.history.append({
            "round": rec.round, "accuracy": rec.accuracy, "loss": rec.loss,
            "seconds": rec.seconds, "aggregate_seconds": rec.aggregate_seconds,
            "statistics_seconds": rec.statistics_seconds, "eval_seconds": rec.eval_seconds,
            "updates": rec.aggregated, "skipped": rec.skipped,
        })  # fmt: skip
        self.round, self.round_started = rec.round, None
        self.metrics.round.set(rec.round)
        if rec.accuracy is not None:
            self.metrics.accuracy.set(rec.accuracy)
        for cid in self.selected:
            if self._board(cid)["state"] == "training":
                self._board(cid)["state"] = "idle"
        if count:
            self.metrics.rounds.inc()
            self.metrics.round_seconds.observe(rec.seconds)

    def snapshot(self) -> dict:
        """The whole state as JSON-ready data."""
        known = self.registry() if self.registry else {}
        with self.lock:
            boards = []
            for cid in sorted(set(self.boards) | set(known)):
                b = dict(self._board(cid))
                reg = known.get(cid)
                b["online"] = True if self.registry is None else bool(reg and reg["online"])
                b.update({k: reg.get(k) for k in ("profile", "keep_estimate", "samples", "problem")}
                         if reg else {})  # fmt: skip
                boards.append(b)
            self.metrics.boards_online.set(sum(b["online"] for b in boards))
            f = self.cfg.federation
            deadline = f.deadline_s
            ends = None if self.round_started is None else self.round_started + deadline
            return {
                "federation": f.name,
                "strategy": f.strategy,
                "model": f"{self.cfg.model.name} x{self.cfg.model.width:g}",
                "dataset": self.cfg.data.dataset,
                "rounds": f.rounds,
                "round": self.round,
                "in_round": self.round_started is not None,
                "round_started": self.round_started,
                "deadline_s": deadline,
                "deadline_at": ends,
                "now": time.time(),
                "history": list(self.history),
                "boards": boards,
                "version": self.version,
            }

    def wait(self, version: int, timeout: float) -> int:
        """Block until the state changes past ``version`` (or ``timeout``); the new version."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version, timeout)
            return self.version
