"""Accuracy of the submodels the tiers run (issue 22, item 2), for one finished run directory.

For every keep below 1 among the run's tiers (0.6, 0.4, 0.2) and every client of that tier,
the run's strategy plans that client's submodel from the final global model as it would
(``cahfp.submodels.client_submodel``: its own plan on the client's data or on the coordinator;
``cahfp export``'s default for a dense strategy), its BatchNorm statistics are measured on the
client's data, and it is scored on the whole test set (global accuracy) and on the client's own
label distribution (personalised accuracy). The plan is the one the strategy would make in the
round after the last, with the federation-wide state (e.g. coverage) of the final checkpoint.
Results are averaged over the tier's clients and cached as ``tiers.json`` in the run directory.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from cahfp.config import Config, load_config
from cahfp.data import ImageData, load_dataset
from cahfp.models import build_model
from cahfp.strategies import Strategy
from cahfp.submodels import STATISTICS_BATCHES, client_submodel, personalised_accuracy
from cahfp.training import per_class_accuracy
from cahfp.wire import decode_state
from coordinator.engine import task_seed
from coordinator.records import (
    ClientRecord,
    NoCheckpoint,
    checkpoint_entry,
    load_checkpoint_tensors,
)
from coordinator.simulation import client_id, evaluation_data, federation_data
from coordinator.snapshot import load_strategy_state

TIERS_FILE = "tiers.json"
VERSION = 1


def tier_eval_set(cfg: Config, limit: int | None = None) -> ImageData:
    """What tier submodels are scored on: the whole test set, or with ``data.eval_split =
    "validation"`` the run's held-out training images; the first ``limit`` images with one."""
    if cfg.data.eval_split == "validation":
        data = evaluation_data(cfg)
    else:
        data = load_dataset(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.download)
    return data.subset(range(limit)) if limit and limit < len(data) else data


def federation_state(strategy: Strategy, run_dir: Path) -> int | None:
    """Load the strategy's federation-wide state from the run's last checkpoint; its round
    (None when the run kept no checkpoint)."""
    try:
        entry, _ = checkpoint_entry(run_dir)
    except NoCheckpoint:
        return None
    load_strategy_state(strategy, load_checkpoint_tensors(run_dir, entry["round"], "sim"))
    return entry["round"]


def evaluate_tiers(
    run_dir: str | Path, test_samples: int | None = None, max_clients: int | None = None
) -> dict:
    """Every tier's submodel accuracy (see the module docstring) for the run in ``run_dir``;
    with ``max_clients``, of the first that many clients of each tier only."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    clients, _, spec = federation_data(cfg)
    test = tier_eval_set(cfg, test_samples)
    model = build_model(spec.name, spec.num_classes, spec.in_channels, spec.width, seed=None)
    state, _ = decode_state((run_dir / "model.safetensors").read_bytes())
    model.load_state_dict(state)
    model.eval()
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
    strategy = cfg.strategy()
    if strategy.prunes:
        strategy.setup(model, example)
    state_round = federation_state(strategy, run_dir)
    rnd = cfg.federation.rounds + 1  # the plan the strategy would make next
    tiers: dict[str, dict] = {}
    planner = ""
    for keep in sorted({k for k in cfg.pruning.tiers if k < 1}):
        rows = []
        for i, data in enumerate(clients):
            if cfg.keep_of(i) != keep or (max_clients and len(rows) >= max_clients):
                continue
            rec = ClientRecord(client_id(i), i, keep)
            sub = client_submodel(
                strategy,
                model,
                data,
                rec,
                rnd,
                cfg.train,
                task_seed(cfg.federation.seed, rnd, i),
                example,
                cfg.pruning,
            )
            planner = sub.planner
            per_class = per_class_accuracy(sub.module, test)
            counts = torch.bincount(test.targets.long(), minlength=test.num_classes).double()
            rows.append(
                {
                    "client": rec.client_id,
                    "samples": len(data),
                    "flops_fraction": sub.flops_fraction,
                    "global": float((per_class.nan_to_num() * counts).sum() / counts.sum()),
                    "personalised": personalised_accuracy(per_class, data),
                }
            )
        if rows:
            tiers[f"{keep:g}"] = {
                **{k: statistics.fmean(r[k] for r in rows) for k in _MEANS},
                "clients": rows,
            }
    return {
        "version": VERSION,
        "planner": planner,
        "plan_round": rnd,
        "federation_state_round": state_round,
        "eval_split": cfg.data.eval_split,
        "eval_images": len(test),
        "statistics_batches": STATISTICS_BATCHES,
        "max_clients": max_clients,
        "tiers": tiers,
    }


_MEANS = ("flops_fraction", "global", "personalised")


def load_tiers(run_dir: str | Path) -> dict | None:
    """The cached tier results of a run (None when missing or of an older format)."""
    path = Path(run_dir) / TIERS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def ensure_tiers(
    run_dir: str | Path, test_samples: int | None = None, max_clients: int | None = None
) -> dict:
    """The run's tier results, computed and cached in ``tiers.json`` when missing."""
    cached = load_tiers(run_dir)
    if cached is not None:
        return cached
    result = evaluate_tiers(run_dir, test_samples, max_clients)
    path = Path(run_dir) / TIERS_FILE
    tmp = path.with_name(f".{TIERS_FILE}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result
