"""A run's directory: resolved config, one metrics line per round, checkpoints after every
round (written atomically), the final model, a summary and plots.

    runs/NAME/config.toml          resolved configuration
    runs/NAME/metrics.jsonl        one JSON object per round (round 0 = initial model)
    runs/NAME/checkpoint/          state.json of the last completed round, and its
                                   global-<round>.safetensors (+ server-<round>.safetensors)
    runs/NAME/model.safetensors    final global model
    runs/NAME/summary.json         headline numbers
    runs/NAME/*.png                plots
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from cahfp.config import Config
from cahfp.errors import CAHFPError
from cahfp.wire import decode_state, encode_state
from coordinator.engine import RoundRecord


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
        if not resume:
            self.metrics.write_text("")
        atomic_write(self.dir / "config.toml", config.to_toml())

    def round(
        self,
        rec: RoundRecord,
        state: dict[str, torch.Tensor],
        extra: dict | None = None,
        server: dict[str, torch.Tensor] | None = None,
    ) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record_dict(rec)) + "\n")
        if rec.round > 0:
            self.checkpoint(rec.round, state, extra, server)

    def checkpoint(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        extra: dict | None = None,
        server: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The global state and the coordinator's own tensors (``server``: the momentum buffer)
        in files named by the round, then ``state.json``, which names the round, and only then
        are the previous round's files removed: a crash at any point leaves a whole checkpoint."""
        ck = self.dir / "checkpoint"
        keep = {f"global-{rnd}.safetensors"}
        atomic_write(ck / f"global-{rnd}.safetensors", encode_state(state, {"round": rnd}))
        if server:
            keep.add(f"server-{rnd}.safetensors")
            atomic_write(ck / f"server-{rnd}.safetensors", encode_state(server, {"round": rnd}))
        atomic_write(ck / "state.json", json.dumps({"round": rnd, **(extra or {})}))
        for old in ck.glob("*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def truncate_after(self, rnd: int) -> None:
        """Drop metrics lines of rounds after ``rnd`` (written before a crash that came before
        their checkpoint), so a resumed run's metrics stay continuous."""
        lines = self.metrics.read_text().splitlines() if self.metrics.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["round"] <= rnd]
        atomic_write(self.metrics, "".join(ln + "\n" for ln in kept))

    def finish(self, state: dict[str, torch.Tensor], wall_seconds: float) -> dict:
        atomic_write(self.dir / "model.safetensors", encode_state(state))
        records = load_metrics(self.dir)
        summary = summarize(records, self.config, self.dense_flops, wall_seconds)
        atomic_write(self.dir / "summary.json", json.dumps(summary, indent=1))
        from coordinator.plots import plot_run

        plot_run(
            self.dir,
            records,
            title=f"{self.config.federation.name} ({self.config.federation.strategy})",
        )
        return summary


def load_checkpoint(run_dir: str | Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """The last completed round, its global state and the extra round state saved with it."""
    ck = Path(run_dir) / "checkpoint"
    try:
        meta = json.loads((ck / "state.json").read_text())
        weights = ck / f"global-{meta.get('round')}.safetensors"
        if not weights.is_file():  # written before the files were named by round
            weights = ck / "global.safetensors"
        state, header = decode_state(weights.read_bytes())
    except (OSError, json.JSONDecodeError, CAHFPError) as exc:
        raise CAHFPError(f"no usable checkpoint in {ck}: {exc}") from None
    if header.get("round") != meta.get("round"):
        raise CAHFPError(
            f"checkpoint in {ck} is inconsistent (weights of round "
            f"{header.get('round')}, state of round {meta.get('round')})"
        )
    return int(meta["round"]), state, meta


def load_server_state(run_dir: str | Path, rnd: int) -> dict[str, torch.Tensor]:
    """The coordinator's own tensors saved with round ``rnd``'s checkpoint (empty if none)."""
    path = Path(run_dir) / "checkpoint" / f"server-{rnd}.safetensors"
    if not path.is_file():
        return {}
    try:
        state, header = decode_state(path.read_bytes())
    except (OSError, CAHFPError) as exc:
        raise CAHFPError(f"unreadable server state {path}: {exc}") from None
    if header.get("round") != rnd:
        raise CAHFPError(
            f"server state {path} is of round {header.get('round')}, the checkpoint of round {rnd}"
        )
    return state


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CAHFPError(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict], config: Config, dense_flops: float, wall: float) -> dict:
    evaluated = [r for r in records if r["accuracy"] is not None]
    trained = [r for r in records if r["round"] > 0]
    ok = [c for r in trained for c in r["clients"] if c["status"] == "ok"]
    rel_flops = [
        (c["train_flops"] + c["score_flops"] + c.get("calibration_flops", 0.0))
        / (dense_flops * c["samples_trained"])
        for c in ok
        if c["samples_trained"]
    ]
    tail = evaluated[-3:]
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
            statistics.fmean(r["accuracy"] for r in evaluated[-10:]) if evaluated else None
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
