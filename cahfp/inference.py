"""On-device inference with an exported CA-HFP model: onnxruntime, numpy and Pillow only.

Nothing here imports torch, so an inference-only board needs neither torch nor torchvision.
Before a model is used its ``cahfp.sha256`` metadata entry is checked against the file's bytes,
and every output is checked to be finite: a corrupted file is refused, never silently wrong.
"""

from __future__ import annotations

import hashlib
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


class InferenceError(CAHFPError):
    """The model computed something unusable (non-finite outputs)."""


DIGEST_KEY = "cahfp.sha256"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def digest_tail(digest: str) -> bytes:
    """The serialized ``metadata_props`` entry ``cahfp.sha256 = digest`` (ModelProto field 14,
    key field 1, value field 2): the exporter writes it as the file's last bytes, after the
    bytes it digests."""
    return _field(14, _field(1, DIGEST_KEY.encode()) + _field(2, digest.encode()))


def verify_digest(data: bytes, digest: str | None) -> bool:
    """Whether ``data`` (an ONNX file) ends with the entry for ``digest`` and the bytes before it
    hash to ``digest``; False when the file carries no digest (exported before digests)."""
    if digest is None:
        return False
    tail = digest_tail(digest)
    if not data.endswith(tail) or hashlib.sha256(data[: -len(tail)]).hexdigest() != digest:
        raise ModelFileError(
            f"does not match the weights digest in its metadata ({digest[:12]}...): the file was "
            "corrupted or modified after export; copy it again"
        )
    return True


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]
    note: str = ""  # how the input was converted to fit the model, if it was


# --provider name -> (onnxruntime execution provider, what to install where it is missing)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu (pip install onnxruntime-gpu) and CUDA"),
    "tensorrt": (
        "TensorrtExecutionProvider",
        "onnxruntime-gpu built with TensorRT (pip install onnxruntime-gpu) and NVIDIA TensorRT",
    ),
}


def session_providers(provider: str) -> list[str]:
    """The onnxruntime providers for ``--provider`` (the CPU behind any GPU one, for the
    operators it does not run); one line naming what to install when it is not there."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise CAHFPError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    name, package = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise CAHFPError(
            f"the {provider} provider ({name}) is not in this onnxruntime "
            f"{ort.__version__} (it has {', '.join(available)}): install {package}"
        )
    return [name] if provider == "cpu" else [name, "CPUExecutionProvider"]


class OnnxClassifier:
    def __init__(self, path: str | os.PathLike, threads: int | None = None, provider: str = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        providers = session_providers(provider)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(
                f"{self.path} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.verified = verify_digest(self.path.read_bytes(), meta.get(DIGEST_KEY))
        except ModelFileError as exc:
            raise ModelFileError(f"{self.path} {exc}") from None
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
        shape = self.session.get_outputs()[0].shape
        self.outputs = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        if self.outputs is not None and self.outputs != len(self.classes):
            raise ModelFileError(
                f"{self.path} lists {len(self.classes)} class names in its metadata but the "
                f"model has {self.outputs} outputs"
            )

    @property
    def channels(self) -> int:
        return int(self.input_shape[0])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, C, H, W]`` to normalised float32."""
        return ((images.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def load_image(self, path: str | os.PathLike, strict: bool = False) -> tuple[np.ndarray, str]:
        """One PNG/JPEG as uint8 ``[C, H, W]`` and a note saying how it was converted ("" when
        it fit as it was). An image of other channels or size is converted (to grey or RGB) and
        resized; with ``strict`` that is an error instead."""
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.input_shape
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                channels = len(img.getbands()) - (1 if img.mode in ("LA", "RGBA", "PA") else 0)
                found = f"{img.size[0]}x{img.size[1]} with {channels} channel(s) ({mode})"
                want = f"{w}x{h} with {c} channel(s)"
                note = ""
                if img.size != (w, h) or channels != c:
                    if strict:
                        raise InputError(
                            f"{path}: image is {found}; the model expects {want} (without "
                            "--strict it is converted and resized)"
                        )
                    note = f"{path}: image is {found}, converted and resized to {want}"
                img = img.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from None
        return arr.reshape(h, w, c).transpose(2, 0, 1), note

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

    def predict(
        self, batch: np.ndarray, top_k: int = 3, source: str = "input"
    ) -> list[list[tuple[str, float]]]:
        z = self.logits(batch)
        if z.ndim != 2 or z.shape[1] != len(self.classes):
            raise InferenceError(
                f"{self.path} gives {z.shape[-1]} outputs for {source} but lists "
                f"{len(self.classes)} class names"
            )
        if not np.isfinite(z).all():
            raise InferenceError(
                f"{self.path} computed non-finite outputs for {source} (corrupt weights or an "
                "input far outside the training range); no prediction"
            )
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        k = min(top_k, p.shape[1])
        order = np.argsort(-p, axis=1)[:, :k]
        return [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]

    def classify(
        self, sources: list[str], top_k: int = 3, strict: bool = False
    ) -> list[Prediction]:
        """Top-k predictions for images and ``.npy`` batches; images of another size or
        channel count are converted unless ``strict`` (each such prediction has a ``note``)."""
        out = []
        for src in sources:
            note = ""
            if str(src).endswith(".npy"):
                batch = self.load_array(src)
                names = [f"{src}[{i}]" for i in range(len(batch))]
            else:
                image, note = self.load_image(src, strict)
                batch = self.normalize(image[None])
                names = [str(src)]
            for name, top in zip(names, self.predict(batch, top_k, str(src)), strict=True):
                out.append(Prediction(name, top, note))
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
