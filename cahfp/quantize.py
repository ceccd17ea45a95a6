"""INT8 for boards without a GPU: a static QDQ model (``onnxruntime.quantization``) with
per-channel int8 weights and int8 activations whose ranges are calibrated on the exporter's
own images (MinMax over ``images``; a board calibrates on its own data, ``cahfp export`` on the
config's training images). ``cahfp.export`` signs and checks the result like a float model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from cahfp.errors import CAHFPError

QUANTIZATIONS = ("int8",)
CALIBRATION_BATCH = 32


class _Batches:
    """``onnxruntime.quantization.CalibrationDataReader`` over ``images`` in fixed batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._chunks = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self):
        chunk = next(self._chunks, None)
        return None if chunk is None else {"input": chunk}


def quantize_int8(model: onnx.ModelProto, images: np.ndarray) -> onnx.ModelProto:
    """``model`` (float, input named ``input``) as a static QDQ int8 model: weights per output
    channel (symmetric int8), activations int8 with ranges measured on ``images`` (float32,
    normalised, ``[N, C, H, W]``, at least one). The float model is pre-processed (shape
    inference, graph optimisation) first, as onnxruntime recommends."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise CAHFPError(
            f"INT8 calibration needs a batch of images [N, C, H, W], got {images.shape}"
        )
    if not np.isfinite(images).all():
        raise CAHFPError("INT8 calibration images hold NaN or infinite values")
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Batches(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        quantized = onnx.load(out)
    del quantized.metadata_props[:]  # the exporter writes (and signs) its own
    return quantized


def top1_agreement(float_bytes: bytes, int8_bytes: bytes, images: np.ndarray) -> float:
    """Share of ``images`` on which the two models predict the same class."""
    import onnxruntime as ort

    runs = []
    for data in (float_bytes, int8_bytes):
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        runs.append(
            np.concatenate(
                [
                    session.run(None, {"input": images[i : i + 256]})[0].argmax(1)
                    for i in range(0, len(images), 256)
                ]
            )
        )
    return float((runs[0] == runs[1]).mean())


def calibration_images(data, count: int = 256, seed: int = 0) -> np.ndarray:
    """``count`` of ``data``'s images (an ``ImageData``; a seeded sample, no augmentation),
    normalised as the model sees them."""
    import torch

    if len(data) == 0:
        raise CAHFPError("INT8 calibration needs images, and the data holds none")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data), generator=gen)[:count]
    return data.normalize(data.images[pick]).numpy().astype(np.float32)


def onnx_accuracy(model_bytes: bytes, data, count: int = 1000) -> float:
    """Top-1 accuracy of an ONNX model on the first ``count`` images of ``data``."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    n = min(count, len(data))
    x = data.normalize(data.images[:n]).numpy().astype(np.float32)
    y = data.targets[:n].numpy()
    pred = np.concatenate(
        [session.run(None, {"input": x[i : i + 256]})[0].argmax(1) for i in range(0, n, 256)]
    )
    return float((pred == y).mean())
