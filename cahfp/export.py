"""Export a (compact) model to ONNX for on-device inference, and prove it matches torch: the
compact submodel a client holds (``export_submodel``), or a checkpoint pruned to a keep fraction
on demand (``export_checkpoint``, ``cahfp export``).

The exporter is chosen explicitly: torch's TorchScript-based exporter (``dynamo=False``), which
needs nothing beyond torch and onnx and handles these CNNs exactly; the opset is pinned. The
batch axis is dynamic. Metadata (``cahfp.*`` keys) carries what ``cahfp infer`` needs: class
names, input shape, normalisation, and where the model came from (keep fraction, round, global
model hash). The last metadata entry, ``cahfp.sha256``, is the SHA-256 of every byte of the file
before that entry (the graph, its weights and the other metadata): ``cahfp infer`` recomputes it
without the ``onnx`` package and refuses a file that does not match (``digest_tail``). Right
after export, onnxruntime runs the file on random inputs and the result must match torch within
``atol`` or the export fails loudly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from cahfp.config import load_config
from cahfp.costs import training_flops
from cahfp.data import load_dataset
from cahfp.data.datasets import DatasetInfo, dataset_info
from cahfp.device.select import resolve_device
from cahfp.errors import CAHFPError
from cahfp.inference import DIGEST_KEY, digest_tail
from cahfp.models import build_model
from cahfp.pruning import extract
from cahfp.quantize import QUANTIZATIONS, calibration_images, onnx_accuracy
from cahfp.submodels import DATA_SCORERS, EXPORT_SCORER, STATISTICS_BATCHES, export_plan
from cahfp.training import measure_batchnorm_statistics
from cahfp.wire import decode_state

OPSET = 17
FORMAT = "1"


class ExportError(CAHFPError):
    """The exported model does not reproduce the torch model."""


@dataclass
class Exported:
    path: Path
    bytes: int
    max_abs_diff: float  # float model against torch on random inputs
    quantization: str | None = None  # "int8": a static QDQ model
    float_bytes: int | None = None  # the float model's size, for a quantized export
    agreement: float | None = None  # int8 against float: top-1 agreement on calibration images
    accuracy: dict | None = None  # float and int8 accuracy on test images (cahfp export)


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    path: str | os.PathLike,
    *,
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    extra: dict | None = None,
    atol: float = 1e-4,
    int8_images: np.ndarray | None = None,
) -> Exported:
    """Write ``module`` (eval mode) to ``path`` as ONNX with metadata; verify with onnxruntime.
    With ``int8_images`` (normalised float32 ``[N, C, H, W]``, the exporter's own images) the
    file is the static INT8 QDQ model calibrated on them (``cahfp.quantize``); the float model
    is still exported and checked against torch first, and the INT8 model's top-1 agreement
    with it on those images is returned."""
    module = module.eval()
    graph = _torch_to_onnx(module, input_shape)
    meta = {
        "cahfp.format": FORMAT,
        "cahfp.classes": json.dumps(list(classes)),
        "cahfp.input_shape": json.dumps(list(input_shape)),
        "cahfp.mean": json.dumps(list(mean)),
        "cahfp.std": json.dumps(list(std)),
        **{
            f"cahfp.{k}": v if isinstance(v, str) else json.dumps(v)
            for k, v in (extra or {}).items()
        },
    }
    float_data = _signed(graph, meta)
    diff = parity(module, float_data, input_shape)
    if diff > atol:
        raise ExportError(
            f"onnxruntime output differs from torch by {diff:.2e} (> {atol:.0e}); "
            "the export is not trustworthy"
        )
    data, quantization, agreement = float_data, None, None
    if int8_images is not None:
        from cahfp.quantize import quantize_int8, top1_agreement

        quantized = quantize_int8(graph, int8_images)
        quantization = "int8"
        data = _signed(
            quantized,
            {
                **meta,
                "cahfp.quantization": "int8 static QDQ, per-channel weights",
                "cahfp.calibration_images": str(len(int8_images)),
            },
        )
        agreement = top1_agreement(float_data, data, np.asarray(int8_images, dtype=np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return Exported(
        path,
        len(data),
        diff,
        quantization,
        len(float_data) if quantization else None,
        agreement,
    )


def _torch_to_onnx(module: nn.Module, input_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """``module`` as an ONNX graph (pinned opset, dynamic batch), without metadata."""
    example = torch.zeros(1, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


def _signed(graph: onnx.ModelProto, meta: dict[str, str]) -> bytes:
    """``graph`` with ``meta`` and, last, the digest of everything before it, checked."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    body = model.SerializeToString()
    digest = hashlib.sha256(body).hexdigest()
    entry = model.metadata_props.add()
    entry.key, entry.value = DIGEST_KEY, digest
    data = model.SerializeToString()
    if data != body + digest_tail(digest):  # metadata_props must be the file's last field
        raise ExportError("the weights digest is not the ONNX file's last field; cannot sign it")
    return data


def parity(module: nn.Module, onnx_bytes: bytes, input_shape, batches=(1, 5), seed=0) -> float:
    """Largest absolute difference between torch and onnxruntime outputs on random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, *input_shape, generator=gen)
        with torch.no_grad():
            ref = module(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def export_submodel(
    module: nn.Module, info: DatasetInfo, path, int8_images: np.ndarray | None = None, **provenance
) -> Exported:
    """Export a (compact) model with the dataset's metadata and its provenance (keep fraction,
    round, global model hash, ...); with ``int8_images``, as INT8 calibrated on them."""
    return export_onnx(
        module,
        (info.channels, info.image_size, info.image_size),
        path,
        classes=info.classes,
        mean=info.mean,
        std=info.std,
        extra=provenance,
        int8_images=int8_images,
    )


def export_checkpoint(
    config_path,
    checkpoint,
    keep: float,
    out,
    scorer: str = EXPORT_SCORER,
    data_dir=None,
    statistics_batches: int = STATISTICS_BATCHES,
    device: str | None = None,
    quantize: str | None = None,
    test_images: int = 1000,
) -> Exported:
    """Prune a global checkpoint to ``keep`` of its training FLOPs and export it. A pruned model's
    BatchNorm statistics are recomputed from ``statistics_batches`` batches of the config's
    training data (0: keep the inherited ones; a data-free scorer then needs no dataset).
    Scoring and the statistics run on ``device`` (else the config's ``train.device``); the
    ONNX export itself on the CPU. ``quantize="int8"``: a static INT8 model whose activation
    ranges are calibrated on the config's training images; its accuracy and the float model's
    on the first ``test_images`` test images are then measured (``Exported.accuracy``)."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise CAHFPError(f"unknown quantization {quantize!r}; known: {', '.join(QUANTIZATIONS)}")
    cfg = load_config(config_path)
    dev = resolve_device(device or cfg.train.device)
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
    model.eval().to(dev)
    x = torch.zeros(2, info.channels, info.image_size, info.image_size)
    fraction = 1.0
    measured = 0
    data = None
    if keep < 1 or quantize:
        needs_data = quantize or scorer in DATA_SCORERS or statistics_batches > 0
        data = load_dataset(cfg.data.dataset, "train", data_dir) if needs_data else None
    if keep < 1:
        plan = export_plan(model, keep, cfg.pruning, x, data, scorer, cfg.train.batch_size)
        model = extract(model, plan).module.eval()
        fraction = plan.flops_fraction
        if data is not None:
            measured = measure_batchnorm_statistics(model, data, statistics_batches)
    model.cpu()
    dense = build_model(cfg.model.name, len(info.classes), info.channels, cfg.model.width)
    int8 = calibration_images(data) if quantize else None
    exported = export_submodel(
        model,
        info,
        out,
        int8_images=int8,
        keep=keep,
        flops_fraction=fraction,
        round=meta.get("round", "final"),
        model=f"{cfg.model.name} x{cfg.model.width:g}",
        scorer=scorer,
        bn_statistics_images=measured,
        global_hash=hashlib.sha256(raw).hexdigest(),
        train_flops_ratio=training_flops(model, x[:1]) / training_flops(dense, x[:1]),
    )
    if quantize:
        test = load_dataset(cfg.data.dataset, "test", data_dir)
        int8_accuracy = onnx_accuracy(exported.path.read_bytes(), test, test_images)
        with torch.no_grad():
            n = min(test_images, len(test))
            logits = model.eval()(test.normalize(test.images[:n]))
        float_accuracy = float((logits.argmax(1) == test.targets[:n]).double().mean())
        exported.accuracy = {"float": float_accuracy, "int8": int8_accuracy, "images": n}
    return exported
