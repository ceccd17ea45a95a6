"""PNG plots of one run and comparisons of several (matplotlib, no display needed). Every panel
has a legend, round axes have integer ticks, and plots carry the model, dataset and strategy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def run_title(config) -> str:
    """``name: strategy, model xW on dataset (partition)`` for a run's ``Config``."""
    f, m, d = config.federation, config.model, config.data
    return f"{f.name}: {f.strategy}, {m.name} x{m.width:g} on {d.dataset} ({d.partition})"


def _series(records: list[dict]):
    rounds, acc, up = [], [], []
    total = 0.0
    for r in records:
        total += sum(c["bytes_up"] for c in r["clients"]) / 1e6
        if r["accuracy"] is not None:
            rounds.append(r["round"])
            acc.append(r["accuracy"])
            up.append(total)
    return rounds, acc, up


def _rounds_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(run_dir: Path, records: list[dict], title: str = "", label: str = "") -> list[Path]:
    """Accuracy against round and against uplink, and each client's keep (achieved, solid;
    the coordinator's target where it set one, dashed)."""
    rounds, acc, up = _series(records)
    label = label or "global model"
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, acc, marker="o", ms=3, label=label)
    ax.set(xlabel="round", ylabel="test accuracy", title=title)
    _rounds_axis(ax)
    _finish(ax)
    paths.append(_save(fig, run_dir / "accuracy_vs_round.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(up, acc, marker="o", ms=3, label=label)
    ax.set(xlabel="cumulative uplink (MB)", ylabel="test accuracy", title=title)
    _finish(ax)
    paths.append(_save(fig, run_dir / "accuracy_vs_uplink.png"))
    keeps: dict[str, tuple[list, list, list]] = {}
    for r in records:
        for c in r["clients"]:
            if c["status"] == "ok":
                xs, ys, targets = keeps.setdefault(c["client_id"], ([], [], []))
                xs.append(r["round"])
                ys.append(c["keep_achieved"])
                targets.append(c.get("keep_target"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for cid, (xs, ys, targets) in sorted(keeps.items()):
        (line,) = ax.plot(xs, ys, marker=".", label=cid)
        if any(t is not None for t in targets):
            ts = [float("nan") if t is None else min(t, 1.0) for t in targets]
            ax.plot(xs, ts, ls="--", lw=1, color=line.get_color(), label=f"{cid} target")
    ax.set(xlabel="round", ylabel="keep (training FLOPs)", ylim=(0, 1.05), title=title)
    _rounds_axis(ax)
    _finish(ax, ncol=2 if len(keeps) > 6 else 1)
    paths.append(_save(fig, run_dir / "client_keeps.png"))
    return paths


def plot_compare(runs: dict[str, list[dict]], out: Path, title: str = "") -> Path:
    """Accuracy of each run against round and against uplink, side by side."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        rounds, acc, up = _series(records)
        a1.plot(rounds, acc, label=name)
        a2.plot(up, acc, label=name)
    a1.set(xlabel="round", ylabel="test accuracy")
    a2.set(xlabel="cumulative uplink (MB)", ylabel="test accuracy")
    _rounds_axis(a1)
    for a in (a1, a2):
        _finish(a)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _finish(ax, ncol: int = 1) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=ncol)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
