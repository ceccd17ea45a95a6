"""A run's directory: resolved config, one metrics line per round, checkpoints after every
round (written atomically), the final model, a summary and plots.

    runs/NAME/config.toml          resolved configuration
    runs/NAME/metrics.jsonl        one JSON object per round (round 0 = initial model)
    runs/NAME/checkpoint/          state.json and the files of the last two completed rounds:
                                   global-<round>.safetensors (+ server-<round>.safetensors, the
                                   momentum buffer; + sim-<round>.safetensors, a simulation's
                                   engine and client state)
    runs/NAME/model.safetensors    final global model
    runs/NAME/summary.json         headline numbers
    runs/NAME/*.png                plots

``state.json`` names the last completed round, the SHA-256 of each of its files and, under
``previous``, the same for the round before; files of older rounds are removed once the new
``state.json`` is in place. A resume checks the digests and falls back to the previous round
when a file of the last one is missing or does not match (a warning says so), so a file
damaged on disk is refused, never loaded. A torn last line of ``metrics.jsonl`` (a crash while
writing it) is dropped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cahfp.config import Config
from cahfp.errors import CAHFPError
from cahfp.pruning.extract import IndexMap
from cahfp.wire import decode_state, encode_state

log = logging.getLogger("cahfp.records")


@dataclass
class ClientRecord:
    """What the coordinator knows about one client."""

    client_id: str
    index: int
    keep: float  # its budget: fraction of dense training FLOPs
    index_map: IndexMap | None = None
    keep_achieved: float = 1.0
    planned_round: int | None = None  # round its current plan was made
    # the budget its current plan was made for (its FLOPs can be lower: scoring is amortized)
    planned_keep: float | None = None


@dataclass
class ClientOutcome:
    client_id: str
    status: str  # ok | declined | failed | rejected | missing
    reason: str = ""
    keep_target: float | None = None
    keep_achieved: float | None = None
    samples: int = 0
    samples_trained: int = 0
    train_flops: float = 0.0
    score_flops: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0
    score_seconds: float = 0.0
    refreshed: bool = False
    # its statistics task after aggregation (its bytes are counted in bytes_up/bytes_down):
    # "" = none sent, "ok", or why its answer was not used; and the FLOPs it reported
    statistics: str = ""
    statistics_flops: float = 0.0


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    loss: float | None
    seconds: float
    aggregated: int
    skipped: str = ""
    clients: list[ClientOutcome] = field(default_factory=list)
    aggregate_seconds: float = 0.0
    eval_seconds: float = 0.0
    coverage_min: float | None = None  # smallest share of the round's weight covering a channel
    coverage_mean: float | None = None
    cpu_seconds: float = 0.0  # coordinator process CPU time spent in this round
    peak_rss_mb: float = 0.0  # coordinator process peak resident memory so far
    transport: dict = field(default_factory=dict)  # the transport's own counters (Transport.stats)
    statistics_seconds: float = 0.0  # the statistics phase: tasks sent to answers pooled


class NoCheckpoint(CAHFPError):
    """The run directory holds no checkpoint yet (no ``checkpoint/state.json``)."""


RUN_FILES = ("metrics.jsonl", "config.toml", "checkpoint", "summary.json", "model.safetensors")


def check_new_run(run_dir: str | Path, force: bool = False) -> None:
    """Refuse to start a new run in a directory that holds one, unless ``force``: then the old
    run's records (metrics, config, checkpoints, summary, model) are removed first, so nothing
    of it can mix into the new run or be resumed by mistake."""
    d = Path(run_dir)
    found = [n for n in RUN_FILES if (d / n).exists()]
    if not found:
        return
    if not force:
        raise CAHFPError(
            f"{d} already holds a run ({', '.join(found)}): --resume continues it, "
            "--force starts over and deletes it"
        )
    import shutil

    log.warning("--force: removing the run in %s (%s)", d, ", ".join(found))
    for name in found:
        if (d / name).is_dir():
            shutil.rmtree(d / name)
        else:
            (d / name).unlink()


def atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_dict(rec: RoundRecord) -> dict:
    d = asdict(rec)
    d["clients"] = [asdict(c) for c in rec.clients]
    return d


class RunRecorder:
    def __init__(
        self, run_dir: str | Path, config: Config, dense_flops: float, resume: bool = False
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.dense_flops = dense_flops
        self.metrics = self.dir / "metrics.jsonl"
        self.resume = resume
        self._started = False  # nothing in the directory changes before the first record

    def _start(self) -> None:
        if not self._started:
            if not self.resume:
                self.metrics.write_text("")
            atomic_write(self.dir / "config.toml", self.config.to_toml())
            self._started = True

    def round(
        self,
        rec: RoundRecord,
        state: dict[str, torch.Tensor],
        extra: dict | None = None,
        server: dict[str, torch.Tensor] | None = None,
        more: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self._start()
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record_dict(rec)) + "\n")
        if rec.round > 0:
            self.checkpoint(rec.round, state, extra, server, more)

    def checkpoint(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        extra: dict | None = None,
        server: dict[str, torch.Tensor] | None = None,
        more: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """The global state, the coordinator's own tensors (``server``: the momentum buffer) and
        any ``more`` (kind -> tensors, e.g. ``sim``) in files named by the round, then
        ``state.json``, which names the round with the files' digests and keeps the previous
        round's entry, and only then are older rounds' files removed: a crash at any point
        leaves a whole checkpoint, and a damaged one leaves the round before."""
        ck = self.dir / "checkpoint"
        kinds = {"global": state, "server": server, **(more or {})}
        files = {}
        for kind, tensors in kinds.items():
            if tensors or kind == "global":
                data = encode_state(tensors, {"round": rnd})
                atomic_write(ck / f"{kind}-{rnd}.safetensors", data)
                files[f"{kind}-{rnd}.safetensors"] = hashlib.sha256(data).hexdigest()
        try:
            previous = _read_state(ck)
        except CAHFPError:
            previous = None
        if previous and previous["round"] >= rnd:  # after a fall-back: keep the good round
            previous = previous.get("previous")
        if previous:
            previous.pop("previous", None)
            if previous["round"] >= rnd or "files" not in previous:
                previous = None  # a checkpoint written before digests is not kept
        entry = {"round": rnd, **(extra or {}), "files": files}
        atomic_write(ck / "state.json", json.dumps({**entry, "previous": previous}))
        keep = set(files) | set(previous["files"] if previous else ())
        for old in ck.glob("*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def truncate_after(self, rnd: int) -> None:
        """Drop metrics lines of rounds after ``rnd`` (written before a crash that came before
        their checkpoint) and a torn last line, so a resumed run's metrics stay continuous."""
        records = load_metrics(self.dir) if self.metrics.is_file() else []
        kept = [r for r in records if r["round"] <= rnd]
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def finish(self, state: dict[str, torch.Tensor], wall_seconds: float) -> dict:
        self._start()
        atomic_write(self.dir / "model.safetensors", encode_state(state))
        records = load_metrics(self.dir)
        summary = summarize(records, self.config, self.dense_flops, wall_seconds)
        atomic_write(self.dir / "summary.json", json.dumps(summary, indent=1))
        from coordinator.plots import plot_run, run_title

        plot_run(self.dir, records, run_title(self.config), self.config.federation.strategy)
        return summary


def _read_state(ck: Path) -> dict:
    """``state.json`` as a dict, checked for the shape every reader relies on."""
    path = ck / "state.json"
    if not path.is_file():
        raise NoCheckpoint(f"no checkpoint in {ck} yet (no state.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CAHFPError(f"no usable checkpoint in {ck}: state.json is unreadable: {exc}") from None
    for entry, where in ((meta, "state.json"), (_get(meta, "previous"), "its previous entry")):
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise CAHFPError(
                f"no usable checkpoint in {ck}: {where} is a JSON {type(entry).__name__}, "
                "not an object naming the round"
            )
        if not isinstance(entry.get("round"), int) or entry["round"] < 1:
            raise CAHFPError(f"no usable checkpoint in {ck}: {where} names no round")
        files = entry.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise CAHFPError(f"no usable checkpoint in {ck}: {where} has malformed file digests")
        clients = entry.get("clients", {})
        if not isinstance(clients, dict):
            raise CAHFPError(f"no usable checkpoint in {ck}: {where} has a malformed client list")
        for cid, info in clients.items():
            if not isinstance(info, dict) or not isinstance(info.get("index"), int):
                raise CAHFPError(
                    f"no usable checkpoint in {ck}: client {cid!r} in {where} has no index"
                )
            if info.get("keep") is not None and not isinstance(info["keep"], (int, float)):
                raise CAHFPError(
                    f"no usable checkpoint in {ck}: client {cid!r} in {where} has keep "
                    f"{info['keep']!r}"
                )
    return meta


def _get(meta, key):
    return meta.get(key) if isinstance(meta, dict) else None


def _read_file(ck: Path, entry: dict, name: str) -> bytes:
    """One file of a checkpoint entry, checked against its digest when the entry has them."""
    try:
        data = (ck / name).read_bytes()
    except OSError as exc:
        raise CAHFPError(f"{name}: {exc.strerror or exc}") from None
    digest = entry.get("files", {}).get(name)
    if "files" in entry and digest is None:
        raise CAHFPError(f"{name} is not one of the files state.json records for its round")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CAHFPError(f"{name} does not match its digest in state.json (damaged on disk)")
    return data


def _weights_name(ck: Path, entry: dict) -> str:
    name = f"global-{entry['round']}.safetensors"
    if "files" not in entry and not (ck / name).is_file():
        return "global.safetensors"  # written before the files were named by round
    return name


def _load_entry(ck: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The global state of one checkpoint entry, after checking every file it records."""
    for name in entry.get("files", {}):
        _read_file(ck, entry, name)
    try:
        state, header = decode_state(_read_file(ck, entry, _weights_name(ck, entry)))
    except CAHFPError as exc:
        raise CAHFPError(str(exc)) from None
    if header.get("round") != entry["round"]:
        raise CAHFPError(
            f"inconsistent: weights of round {header.get('round')}, state of round {entry['round']}"
        )
    return state


def checkpoint_entry(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The newest checkpoint entry of ``state.json`` whose files are whole and match their
    digests (the last round, else the previous one, with a warning), and its global state.
    Raises ``NoCheckpoint`` when there is none yet, ``CAHFPError`` when none is usable."""
    ck = Path(run_dir) / "checkpoint"
    meta = _read_state(ck)
    entries = [e for e in (meta, meta.get("previous")) if e]
    problems = []
    for entry in entries:
        try:
            state = _load_entry(ck, entry)
        except CAHFPError as exc:
            problems.append(f"round {entry['round']}: {exc}")
            continue
        if problems:
            log.warning(
                "checkpoint of round %d refused (%s); falling back to round %d",
                entries[0]["round"],
                problems[0].split(": ", 1)[1],
                entry["round"],
            )
        return {k: v for k, v in entry.items() if k != "previous"}, state
    raise CAHFPError(f"no usable checkpoint in {ck}: " + "; ".join(problems))


def checkpoint_weights(run_dir: str | Path) -> tuple[int, Path]:
    """The round and global weights file of a run's last usable checkpoint (an unfinished
    run's best model file), checked like ``load_checkpoint``."""
    ck = Path(run_dir) / "checkpoint"
    try:
        entry, _ = checkpoint_entry(run_dir)
    except NoCheckpoint:
        raise NoCheckpoint(
            f"{run_dir} has neither model.safetensors nor a checkpoint (stopped before round 1 "
            "completed)"
        ) from None
    return entry["round"], ck / _weights_name(ck, entry)


def check_fits(
    state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], what: str
) -> None:
    """Refuse ``state`` unless it has exactly the tensors of ``like`` in the same shapes."""
    missing, unknown = sorted(set(like) - set(state)), sorted(set(state) - set(like))
    if missing or unknown:
        raise CAHFPError(
            f"{what} is of another model than the configured one: missing {missing[:3]}, "
            f"unknown {unknown[:3]}"
        )
    for k, ref in like.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CAHFPError(
                f"{what} is of another model than the configured one: {k} has shape "
                f"{tuple(state[k].shape)}, the configured model's {tuple(ref.shape)} "
                "(another model.width or model.name?)"
            )


def load_checkpoint(
    run_dir: str | Path, like: Mapping[str, torch.Tensor] | None = None
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """The last usable completed round, its global state and the extra round state saved with
    it (see ``checkpoint_entry``); with ``like`` (the configured model's state dict) a
    checkpoint of another architecture or width is refused before anything is loaded."""
    entry, state = checkpoint_entry(run_dir)
    if like is not None:
        check_fits(state, like, f"checkpoint of round {entry['round']} in {run_dir}")
    return entry["round"], state, entry


def load_checkpoint_tensors(run_dir: str | Path, rnd: int, kind: str) -> dict[str, torch.Tensor]:
    """The ``kind`` tensors (``server``, ``sim``) saved with round ``rnd``'s checkpoint, checked
    against their digest (empty when that round saved none)."""
    ck = Path(run_dir) / "checkpoint"
    name = f"{kind}-{rnd}.safetensors"
    meta = _read_state(ck)
    entry = next((e for e in (meta, meta.get("previous")) if e and e["round"] == rnd), {})
    recorded = name in entry["files"] if "files" in entry else (ck / name).is_file()
    if not recorded:  # that round saved none (a recorded file that is missing is an error)
        return {}
    try:
        state, header = decode_state(_read_file(ck, entry, name))
    except CAHFPError as exc:
        raise CAHFPError(f"unreadable {kind} state {ck / name}: {exc}") from None
    if header.get("round") != rnd:
        raise CAHFPError(
            f"{kind} state {ck / name} is of round {header.get('round')}, the checkpoint of "
            f"round {rnd}"
        )
    return state


def load_server_state(run_dir: str | Path, rnd: int) -> dict[str, torch.Tensor]:
    """The coordinator's own tensors saved with round ``rnd``'s checkpoint (empty if none)."""
    return load_checkpoint_tensors(run_dir, rnd, "server")


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics lines. A torn last line (a crash while writing it) is dropped with a
    warning; a bad line before the last is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CAHFPError(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise ValueError("not a round record")
        except ValueError:
            if i == len(lines):
                log.warning("%s: dropped a torn last line (%d bytes)", path, len(line))
                break
            raise CAHFPError(f"{path} line {i} is not a round record") from None
        records.append(_renamed(rec))
    return records


# metrics fields renamed since runs were written: old name -> new (the BatchNorm statistics
# phase was called "calibration" before 2026-12)
RENAMED = {
    "calibration": "statistics",
    "calibration_flops": "statistics_flops",
    "calibration_seconds": "statistics_seconds",
}


def _renamed(rec: dict) -> dict:
    """``rec`` (a round, or one of its clients) with the fields of older runs renamed."""
    for old, new in RENAMED.items():
        if old in rec and new not in rec:
            rec[new] = rec.pop(old)
    if isinstance(rec.get("clients"), list):
        rec["clients"] = [_renamed(c) if isinstance(c, dict) else c for c in rec["clients"]]
    return rec


def run_summary(run_dir: str | Path, config: Config) -> dict:
    """A run's headline numbers with ``finished``: its summary.json, or for an unfinished run
    (interrupted, or still running) the same numbers from its metrics so far (wall seconds:
    the sum of its rounds')."""
    path = Path(run_dir) / "summary.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "finished": True}
        except (OSError, json.JSONDecodeError) as exc:
            raise CAHFPError(f"{path} is unreadable: {exc}") from None
    from cahfp.costs import training_flops
    from cahfp.data.datasets import dataset_info
    from cahfp.models import build_model

    records = load_metrics(run_dir)
    info = dataset_info(config.data.dataset, config.data.data_dir)
    model = build_model(config.model.name, len(info.classes), info.channels, config.model.width)
    dense = training_flops(model, torch.zeros(1, info.channels, info.image_size, info.image_size))
    wall = sum(r.get("seconds", 0.0) for r in records)
    return {**summarize(records, config, dense, wall), "finished": False}


def summarize(records: list[dict], config: Config, dense_flops: float, wall: float) -> dict:
    evaluated = [r for r in records if r["accuracy"] is not None]
    trained = [r for r in records if r["round"] > 0]
    ok = [c for r in trained for c in r["clients"] if c["status"] == "ok"]
    rel_flops = [
        (c["train_flops"] + c["score_flops"] + c.get("statistics_flops", 0.0))
        / (dense_flops * c["samples_trained"])
        for c in ok
        if c["samples_trained"]
    ]
    scored = [r for r in evaluated if r["round"] > 0]  # trained rounds: round 0 is the start
    tail = scored[-3:]
    return {
        "name": config.federation.name,
        "strategy": config.federation.strategy,
        "model": f"{config.model.name} x{config.model.width:g}",
        "dataset": config.data.dataset,
        "partition": config.data.partition,
        "rounds": len(trained),
        "initial_accuracy": evaluated[0]["accuracy"] if evaluated else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "final3_accuracy": statistics.fmean(r["accuracy"] for r in tail) if tail else None,
        "final10_accuracy": (
            statistics.fmean(r["accuracy"] for r in scored[-10:]) if scored else None
        ),
        "best_accuracy": max(r["accuracy"] for r in evaluated) if evaluated else None,
        "final_loss": evaluated[-1]["loss"] if evaluated else None,
        "mean_client_flops_vs_dense": statistics.fmean(rel_flops) if rel_flops else None,
        "mean_keep_achieved": statistics.fmean(c["keep_achieved"] for c in ok) if ok else None,
        "mean_uplink_mb": statistics.fmean(c["bytes_up"] for c in ok) / 1e6 if ok else None,
        "mean_downlink_mb": statistics.fmean(c["bytes_down"] for c in ok) / 1e6 if ok else None,
        "client_updates": len(ok),
        "rejected_or_missing": sum(
            c["status"] in ("rejected", "missing", "failed") for r in trained for c in r["clients"]
        ),
        "total_uplink_mb": sum(c["bytes_up"] for r in trained for c in r["clients"]) / 1e6,
        "wall_seconds": wall,
    }
