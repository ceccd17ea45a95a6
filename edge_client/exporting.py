"""ONNX export on the device: the compact submodel a client holds, or a checkpoint pruned to a
keep fraction on demand (``cahfp export``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from cahfp.config import load_config
from cahfp.costs import training_flops
from cahfp.data import load_dataset
from cahfp.data.datasets import DatasetInfo, dataset_info
from cahfp.errors import CAHFPError
from cahfp.export import Exported, export_onnx
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.training import measure_batchnorm_statistics
from cahfp.wire import decode_state


def export_submodel(module: nn.Module, info: DatasetInfo, path, **provenance) -> Exported:
    """Export a (compact) model with the dataset's metadata and its provenance (keep fraction,
    round, global model hash, ...)."""
    return export_onnx(
        module,
        (info.channels, info.image_size, info.image_size),
        path,
        classes=info.classes,
        mean=info.mean,
        std=info.std,
        extra=provenance,
    )


def export_checkpoint(
    config_path,
    checkpoint,
    keep: float,
    out,
    scorer: str = "curvature",
    data_dir=None,
    calibration_batches: int = 8,
) -> Exported:
    """Prune a global checkpoint to ``keep`` of its training FLOPs and export it. A pruned model's
    BatchNorm statistics are recomputed from ``calibration_batches`` batches of the config's
    training data (0: keep the inherited ones; a data-free scorer then needs no dataset)."""
    cfg = load_config(config_path)
    data_dir = data_dir or cfg.data.data_dir
    info = dataset_info(cfg.data.dataset, data_dir)
    model = build_model(cfg.model.name, len(info.classes), info.channels, cfg.model.width)
    raw = Path(checkpoint).read_bytes()
    try:
        state, meta = decode_state(raw)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CAHFPError(
            f"{checkpoint} does not fit {cfg.model.name} x{cfg.model.width:g}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    x = torch.zeros(2, info.channels, info.image_size, info.image_size)
    fraction = 1.0
    calibrated = 0
    if keep < 1:
        batches = None
        needs_data = scorer in ("curvature", "taylor") or calibration_batches > 0
        data = load_dataset(cfg.data.dataset, "train", data_dir) if needs_data else None
        if scorer in ("curvature", "taylor"):
            gen = torch.Generator().manual_seed(0)
            batches = data.batches(cfg.train.batch_size, shuffle=True, generator=gen, augment=False)
        scores = score_groups(
            model, batches, scorer, example_input=x, num_batches=cfg.pruning.score_batches
        )
        plan = make_plan(
            model, scores, keep, floor=cfg.pruning.floor, multiple=cfg.pruning.multiple
        )
        model = extract(model, plan).module.eval()
        fraction = plan.flops_fraction
        if data is not None:
            calibrated = measure_batchnorm_statistics(model, data, calibration_batches)
    dense = build_model(cfg.model.name, len(info.classes), info.channels, cfg.model.width)
    return export_submodel(
        model,
        info,
        out,
        keep=keep,
        flops_fraction=fraction,
        round=meta.get("round", "final"),
        model=f"{cfg.model.name} x{cfg.model.width:g}",
        scorer=scorer,
        bn_calibration_images=calibrated,
        global_hash=hashlib.sha256(raw).hexdigest(),
        train_flops_ratio=training_flops(model, x[:1]) / training_flops(dense, x[:1]),
    )
