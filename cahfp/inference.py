"""On-device inference with an exported CA-HFP model: onnxruntime, numpy and Pillow only.

Nothing here imports torch, so an inference-only board needs neither torch nor torchvision.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cahfp.errors import CAHFPError


class ModelFileError(CAHFPError):
    """The file is not a readable CA-HFP ONNX model."""


class InputError(CAHFPError):
    """An input image or array does not fit the model."""


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]


class OnnxClassifier:
    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(
                f"{self.path} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("cahfp.format") is None:
            raise ModelFileError(
                f"{self.path} is an ONNX model but not one exported by CA-HFP "
                "(no cahfp.* metadata: class names and normalisation unknown)"
            )
        try:
            self.classes = json.loads(meta["cahfp.classes"])
            self.input_shape = tuple(json.loads(meta["cahfp.input_shape"]))
            self.mean = np.asarray(json.loads(meta["cahfp.mean"]), np.float32).reshape(-1, 1, 1)
            self.std = np.asarray(json.loads(meta["cahfp.std"]), np.float32).reshape(-1, 1, 1)
        except (KeyError, json.JSONDecodeError, ValueError) as exc:
            raise ModelFileError(f"{self.path} has malformed CA-HFP metadata: {exc}") from None
        self.metadata = meta
        self.input_name = self.session.get_inputs()[0].name

    @property
    def channels(self) -> int:
        return int(self.input_shape[0])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, C, H, W]`` to normalised float32."""
        return ((images.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def load_image(self, path: str | os.PathLike, fit: bool = False) -> np.ndarray:
        """One PNG/JPEG as uint8 ``[C, H, W]``. Without ``fit``, a size or channel mismatch is
        an error; with it, the image is converted and resized."""
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.input_shape
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                channels = len(img.getbands()) - (1 if img.mode in ("LA", "RGBA", "PA") else 0)
                if not fit and (img.size != (w, h) or channels != c):
                    raise InputError(
                        f"{path}: image is {img.size[0]}x{img.size[1]} with {channels} channel(s) "
                        f"({mode}); the model expects {w}x{h} with {c} (use --fit to convert and "
                        "resize)"
                    )
                img = img.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from None
        return arr.reshape(h, w, c).transpose(2, 0, 1)

    def load_array(self, path: str | os.PathLike) -> np.ndarray:
        """A ``.npy`` batch: uint8 pixels ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, or
        already-normalised float32 ``[N, C, H, W]``. Returns model input (float32)."""
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        c, h, w = self.input_shape
        if arr.dtype == np.uint8:
            if arr.ndim == 3 and c == 1:
                arr = arr[:, None]
            elif arr.ndim == 4 and arr.shape[1:] == (h, w, c) and arr.shape[1:] != (c, h, w):
                arr = arr.transpose(0, 3, 1, 2)
            if arr.ndim != 4 or arr.shape[1:] != (c, h, w):
                raise InputError(
                    f"{path}: uint8 array of shape {arr.shape} does not hold images of {c}x{h}x{w}"
                )
            return self.normalize(arr)
        if arr.dtype in (np.float32, np.float64):
            if arr.ndim != 4 or arr.shape[1:] != (c, h, w):
                raise InputError(
                    f"{path}: float array of shape {arr.shape}, expected "
                    f"[N, {c}, {h}, {w}] (already normalised)"
                )
            return arr.astype(np.float32)
        raise InputError(f"{path}: unsupported dtype {arr.dtype} (uint8 pixels or float32)")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def predict(self, batch: np.ndarray, top_k: int = 3) -> list[list[tuple[str, float]]]:
        z = self.logits(batch)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        k = min(top_k, p.shape[1])
        order = np.argsort(-p, axis=1)[:, :k]
        return [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]

    def classify(self, sources: list[str], top_k: int = 3, fit: bool = False) -> list[Prediction]:
        out = []
        for src in sources:
            if str(src).endswith(".npy"):
                batch = self.load_array(src)
                names = [f"{src}[{i}]" for i in range(len(batch))]
            else:
                batch = self.normalize(self.load_image(src, fit)[None])
                names = [str(src)]
            for name, top in zip(names, self.predict(batch, top_k), strict=True):
                out.append(Prediction(name, top))
        return out

    def benchmark(self, batch: int = 1, iterations: int = 50, warmup: int = 5) -> dict:
        """Latency percentiles and throughput on random inputs."""
        x = np.random.default_rng(0).standard_normal((batch, *self.input_shape), np.float32)
        for _ in range(warmup):
            self.logits(x)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.logits(x)
            times.append(time.perf_counter() - t0)
        t = np.asarray(times)
        return {
            "batch": batch,
            "p50_ms": float(np.percentile(t, 50) * 1e3),
            "p95_ms": float(np.percentile(t, 95) * 1e3),
            "throughput": float(batch / np.median(t)),
        }
