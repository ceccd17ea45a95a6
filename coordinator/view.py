"""Live progress of a federation on a terminal (rounds, clients, accuracy), or log lines.

On a terminal the live view shows; anywhere else (a pipe, a file, journald) a line per round;
``--quiet`` silences both (warnings still show)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cahfp.config import Config
from coordinator.engine import RoundRecord

log = logging.getLogger("cahfp.federation")


def progress_logging(quiet: bool, console: Console | None = None) -> None:
    """Set up log lines on stderr for a federation's progress: INFO where the live view does not
    show (stderr is not a terminal), WARNING on a terminal or with ``quiet``."""
    console = console or Console(stderr=True)
    level = logging.WARNING if quiet or console.is_terminal else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")


class ProgressView:
    """Live progress on a terminal (rounds, clients, accuracy), or a log line per round.
    ``live`` None: the live view where ``console`` is a terminal; ``quiet``: neither."""

    def __init__(self, cfg: Config, console: Console, quiet: bool, live: bool | None = None):
        self.cfg, self.console, self.quiet = cfg, console, quiet
        self.live = (console.is_terminal if live is None else live) and not quiet
        self.progress: Progress | None = None

    def start(self, initial: RoundRecord, resumed: int = 0) -> None:
        """Announce the run; ``resumed``: the round it continues after (``initial`` then holds
        the last evaluated accuracy)."""
        where = f"resumed after round {resumed}, accuracy" if resumed else "initial accuracy"
        msg = (
            f"{self.cfg.federation.strategy}: {self.cfg.model.name} x{self.cfg.model.width:g}"
            f" on {self.cfg.data.dataset}, {self.cfg.federation.clients} clients, "
            f"{where} {initial.accuracy:.4f}"
        )
        if not self.live:
            if not self.quiet:
                log.info(msg)
            return
        self.console.print(msg)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.rounds = self.progress.add_task(
            "rounds", total=self.cfg.federation.rounds, completed=resumed, info=""
        )
        self.clients = self.progress.add_task("clients", total=1, info="")
        self.progress.start()

    def event(self, kind: str, data: dict) -> None:
        if kind == "initial":
            self.start(data["record"])
            return
        if kind == "registered":
            log.info(
                "client %s registered (keep %.2f, %s)",
                data["client"],
                data["keep"],
                data.get("source", ""),
            )
            return
        if kind == "extended":
            log.warning(
                "round %d: %d of %d updates at the deadline; waiting once more",
                data["round"],
                data["updates"],
                data["need"],
            )
            return
        if kind == "rejected":
            log.warning("rejected update from %s: %s", data["client"], data["reason"])
        if self.progress is None:
            if kind == "round_end" and not self.quiet:
                r = data["record"]
                acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
                log.info(
                    "round %d: accuracy %s, %d updates, %.1f s%s",
                    r.round,
                    acc,
                    r.aggregated,
                    r.seconds,
                    f" (skipped: {r.skipped})" if r.skipped else "",
                )
            return
        if kind == "round_start":
            self.progress.reset(self.clients, total=max(len(data["selected"]), 1), info="")
        elif kind == "client_done":
            o = data["outcome"]
            info = f"{o.client_id} keep {o.keep_achieved or 0:.2f} {o.status}"
            self.progress.update(self.clients, advance=1, info=info)
        elif kind == "round_end":
            r = data["record"]
            acc = "" if r.accuracy is None else f"accuracy {r.accuracy:.4f}"
            self.progress.update(self.rounds, advance=1, info=acc)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
