"""Bytes on the wire: safetensors only (no pickle), with JSON metadata.

* a *state* (global model or a slice of it): tensors by state-dict key;
* an *update*: the compact tensors of a submodel plus its index map. Index vectors are int32 and
  stored once however many tensors share them (a conv's output indices also index its bias and
  BatchNorm), so the overhead over the kept parameters alone stays small.

Decoding validates structure and raises ``InvalidUpdate`` with the reason; it never executes
code from the payload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from cahfp.errors import InvalidUpdate
from cahfp.pruning.extract import IndexMap

STATE_FORMAT = "cahfp.state/1"
UPDATE_FORMAT = "cahfp.update/1"


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


EXTRA = "x:"  # prefix of side tensors (e.g. the coordinator's channel coverage); state-dict keys
# never contain ':'


def encode_state(
    state: Mapping[str, torch.Tensor],
    meta: dict | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    header = {"format": STATE_FORMAT, **(meta or {})}
    tensors = {k: _tensor(v) for k, v in state.items()}
    tensors.update({EXTRA + k: _tensor(v) for k, v in (extras or {}).items()})
    return save(tensors, metadata={"cahfp": json.dumps(header)})


def _load(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidUpdate("payload must be bytes")
    data = bytes(data)  # safetensors reads bytes (no copy when given bytes, as the protocol does)
    try:
        tensors = load(data)
        raw_meta = _metadata(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise InvalidUpdate(f"payload is not valid safetensors: {exc}") from None
    try:
        meta = json.loads(raw_meta.get("cahfp", ""))
    except json.JSONDecodeError:
        raise InvalidUpdate("payload lacks valid cahfp metadata") from None
    if not isinstance(meta, dict):
        raise InvalidUpdate("payload metadata must be a JSON object")
    return tensors, meta


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors header."""
    if len(data) < 8:
        raise ValueError("too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds payload")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and metadata; side tensors are in ``meta["extras"]``."""
    tensors, meta = _load(data)
    if meta.get("format") != STATE_FORMAT:
        raise InvalidUpdate(f"expected a {STATE_FORMAT} payload, got {meta.get('format')!r}")
    meta["extras"] = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}, meta


def encode_update(
    compact: Mapping[str, torch.Tensor], imap: IndexMap, meta: dict | None = None
) -> bytes:
    tensors = {f"t:{k}": _tensor(v) for k, v in compact.items()}
    index: dict[str, dict[str, str]] = {}
    seen: dict[bytes, str] = {}
    for key, dims in imap.items():
        for dim, idx in dims.items():
            vec = idx.to(torch.int32).contiguous()
            fingerprint = vec.numpy().tobytes()
            if fingerprint not in seen:
                seen[fingerprint] = f"i:{len(seen)}"
                tensors[seen[fingerprint]] = vec.clone()
            index.setdefault(key, {})[str(dim)] = seen[fingerprint]
    header = {"format": UPDATE_FORMAT, "index": index, **(meta or {})}
    return save(tensors, metadata={"cahfp": json.dumps(header)})


def decode_update(data: bytes) -> tuple[dict[str, torch.Tensor], IndexMap, dict]:
    tensors, meta = _load(data)
    if meta.get("format") != UPDATE_FORMAT:
        raise InvalidUpdate(f"expected a {UPDATE_FORMAT} payload, got {meta.get('format')!r}")
    index = meta.pop("index", None)
    if not isinstance(index, dict):
        raise InvalidUpdate("update metadata lacks its index map")
    compact = {k[2:]: v for k, v in tensors.items() if k.startswith("t:")}
    imap: IndexMap = {}
    try:
        for key, dims in index.items():
            imap[key] = {}
            for dim, name in dims.items():
                vec = tensors[name]
                if vec.dtype != torch.int32 or vec.dim() != 1:
                    raise InvalidUpdate(f"index vector {name} must be 1-D int32")
                imap[key][int(dim)] = vec.to(torch.int64)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidUpdate(f"malformed index map in update: {exc!r}") from None
    return compact, imap, meta
