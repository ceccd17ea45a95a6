"""PNG plots of one run and comparisons of several (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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


def plot_run(run_dir: Path, records: list[dict], title: str = "") -> list[Path]:
    rounds, acc, up = _series(records)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, acc, marker="o", ms=3)
    ax.set(xlabel="round", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, run_dir / "accuracy_vs_round.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(up, acc, marker="o", ms=3)
    ax.set(xlabel="cumulative uplink (MB)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, run_dir / "accuracy_vs_uplink.png"))
    keeps: dict[str, tuple[list, list]] = {}
    for r in records:
        for c in r["clients"]:
            if c["status"] == "ok":
                xs, ys = keeps.setdefault(c["client_id"], ([], []))
                xs.append(r["round"])
                ys.append(c["keep_achieved"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for cid, (xs, ys) in sorted(keeps.items()):
        ax.plot(xs, ys, marker=".", label=cid)
    ax.set(xlabel="round", ylabel="keep achieved (training FLOPs)", ylim=(0, 1.05), title=title)
    if 0 < len(keeps) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, run_dir / "client_keeps.png"))
    return paths


def plot_compare(runs: dict[str, list[dict]], out: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        rounds, acc, up = _series(records)
        a1.plot(rounds, acc, label=name)
        a2.plot(up, acc, label=name)
    a1.set(xlabel="round", ylabel="test accuracy")
    a2.set(xlabel="cumulative uplink (MB)", ylabel="test accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
