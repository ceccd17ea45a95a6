"""Bytes on the wire: safetensors only (no pickle), with JSON metadata.

* a *state* (global model or a slice of it): tensors by state-dict key;
* an *update*: the compact tensors of a submodel plus its index map, packed (one blob per dtype,
  tensors by position, not by name; see ``encode_update``). Index vectors are small integers,
  stored once however many tensors share them (a conv's output indices also index its bias and
  BatchNorm), so the overhead over the kept parameters alone stays small.

Decoding validates structure and raises ``InvalidUpdate`` with the reason; it never executes
code from the payload.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from cahfp.errors import InvalidUpdate
from cahfp.pruning.extract import IndexMap
from cahfp.pruning.reconstruct import is_statistic

STATE_FORMAT = "cahfp.state/1"
UPDATE_FORMAT = "cahfp.update/2"


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


EXTRA = "x:"  # prefix of side tensors (e.g. the coordinator's channel coverage); state-dict keys
# never contain ':'


def encode_state(
    state: Mapping[str, torch.Tensor],
    meta: dict | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    header = {**(meta or {}), "format": STATE_FORMAT}
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
    except (SafetensorError, ValueError, OSError, RuntimeError, KeyError, TypeError) as exc:
        # KeyError: a dtype the safetensors format names but torch's loader lacks (e.g. F8_E8M0)
        raise InvalidUpdate(f"payload is not valid safetensors: {exc!r}") from None
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
    compact: Mapping[str, torch.Tensor],
    imap: IndexMap,
    meta: dict | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
    statistics: bool = True,
) -> bytes:
    """Pack a compact state and its index map (``cahfp.update/2``).

    Tensors go in sorted-key order into one flat blob per dtype (``d:float32``, ...); the keys and
    shapes are not sent: the receiver derives them from its own copy of the model (``layout`` in
    ``decode_update``), each sliced dimension taking the length of its index vector. The distinct
    index vectors are concatenated into one blob ``i`` with offsets ``o``; ``m`` has one row
    ``(tensor position, dim, vector)`` per sliced dimension; each of the three is stored in the
    narrowest of uint8, int16 and int32 that holds its values. The header stays a few hundred bytes
    whatever the number of tensors. With an empty index map it carries a whole state (the dense
    model sent to a client). ``extras`` travel as named side tensors ``x:<name>``.

    With ``statistics=False`` the BatchNorm running statistics (``is_statistic``) carry no data,
    only their index-map rows, and the header says so (``"statistics": false``)."""
    keys = sorted(compact)
    position = {k: i for i, k in enumerate(keys)}
    blobs: dict[str, list[torch.Tensor]] = {}
    for k in keys:
        if not statistics and is_statistic(k):
            continue
        t = compact[k].detach().to("cpu")
        blobs.setdefault(_dtype_name(t.dtype), []).append(t.reshape(-1))
    tensors = {f"d:{name}": torch.cat(parts).contiguous() for name, parts in blobs.items()}
    vectors: list[torch.Tensor] = []
    seen: dict[bytes, int] = {}
    rows: list[tuple[int, int, int]] = []
    for key in sorted(imap):
        if key not in position:
            raise ValueError(f"index map entry {key!r} has no tensor in the update")
        for dim, idx in sorted(imap[key].items()):
            vec = idx.detach().to("cpu", torch.int32).contiguous()
            fingerprint = vec.numpy().tobytes()
            if fingerprint not in seen:
                seen[fingerprint] = len(vectors)
                vectors.append(vec)
            rows.append((position[key], int(dim), seen[fingerprint]))
    flat = torch.cat(vectors) if vectors else torch.zeros(0, dtype=torch.int32)
    offsets = torch.tensor([0] + [len(v) for v in vectors], dtype=torch.int64).cumsum(0)
    tensors["i"] = flat.to(_small_int(int(flat.max()) if len(flat) else 0))
    tensors["o"] = offsets.to(_small_int(int(offsets[-1])))
    top = max((max(r) for r in rows), default=0)
    tensors["m"] = torch.tensor(rows, dtype=_small_int(top)).reshape(-1, 3)
    tensors.update({EXTRA + k: _tensor(v) for k, v in (extras or {}).items()})
    header = {
        **(meta or {}),
        "format": UPDATE_FORMAT,
        "tensors": len(keys),
        "keys": _fingerprint(keys),
    }
    if not statistics:
        header["statistics"] = False
    return save(tensors, metadata={"cahfp": json.dumps(header)})


def decode_update(
    data: bytes, layout: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], IndexMap, dict]:
    """Unpack an update against ``layout``, the receiver's state dict of the dense model (only
    its keys, shapes and dtypes are read; a ``meta``-device model will do). Raises
    ``InvalidUpdate`` naming what does not fit: another model, blobs too short or too long, a
    dtype the model lacks, index tables pointing outside themselves, indices out of range or
    repeated. Side tensors are returned in ``meta["extras"]``. ``meta["statistics"]`` is False
    when the sender left out the BatchNorm running statistics (then absent from the tensors
    returned; their index-map entries are there); whether that is acceptable is the caller's
    call."""
    tensors, meta = _load(data)
    if meta.get("format") != UPDATE_FORMAT:
        raise InvalidUpdate(f"expected a {UPDATE_FORMAT} payload, got {meta.get('format')!r}")
    statistics = meta.setdefault("statistics", True)
    if not isinstance(statistics, bool):
        raise InvalidUpdate(
            f"update header's statistics flag must be true or false: {statistics!r}"
        )
    keys = sorted(layout)
    count, fingerprint = meta.pop("tensors", None), meta.pop("keys", None)
    if count != len(keys) or fingerprint != _fingerprint(keys):
        raise InvalidUpdate(
            f"update was packed for a different model: it holds {count!r} tensors, the model "
            f"has {len(keys)} (or their names differ)"
        )
    unknown = [n for n in tensors if n not in _PACKED and not n.startswith(("d:", EXTRA))]
    if unknown:
        raise InvalidUpdate(f"update holds unexpected tensors {sorted(unknown)[:5]}")
    meta["extras"] = {n[len(EXTRA) :]: t for n, t in tensors.items() if n.startswith(EXTRA)}
    imap = _unpack_index(tensors, keys, layout)
    compact: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}
    for k in keys:
        if not statistics and is_statistic(k):
            continue
        ref = layout[k]
        shape = list(ref.shape)
        for dim, idx in imap.get(k, {}).items():
            shape[dim] = len(idx)
        name = _dtype_name(ref.dtype)
        blob = tensors.get(f"d:{name}")
        n = math.prod(shape)
        at = offsets.get(name, 0)
        if blob is None or blob.dim() != 1 or blob.dtype != ref.dtype or at + n > len(blob):
            have = "none" if blob is None else f"{blob.numel()} {blob.dtype}"
            raise InvalidUpdate(
                f"update's {name} data ({have}) is too short for {k} of shape {shape}"
            )
        compact[k] = blob[at : at + n].view(shape)
        offsets[name] = at + n
    for name, blob in tensors.items():
        if name.startswith("d:") and offsets.get(name[2:], 0) != blob.numel():
            raise InvalidUpdate(
                f"update's {name[2:]} data holds {blob.numel()} values, the shapes of the "
                f"model's tensors take {offsets.get(name[2:], 0)}"
            )
    return compact, imap, meta


def _unpack_index(
    tensors: dict[str, torch.Tensor], keys: list[str], layout: Mapping[str, torch.Tensor]
) -> IndexMap:
    flat, offsets, rows = tensors.get("i"), tensors.get("o"), tensors.get("m")
    if flat is None or offsets is None or rows is None:
        raise InvalidUpdate("update lacks its index map (tensors i, o, m)")
    if flat.dtype not in _INDEX_DTYPES or flat.dim() != 1:
        raise InvalidUpdate("index vectors (i) must be a 1-D uint8, int16 or int32 tensor")
    if offsets.dtype not in _INDEX_DTYPES or offsets.dim() != 1 or len(offsets) < 1:
        raise InvalidUpdate(
            "index offsets (o) must be a non-empty 1-D uint8, int16 or int32 tensor"
        )
    if rows.dtype not in _INDEX_DTYPES or rows.dim() != 2 or rows.shape[1] != 3:
        raise InvalidUpdate("index rows (m) must be an [n, 3] uint8, int16 or int32 tensor")
    if len(rows) > sum(t.dim() for t in layout.values()):
        raise InvalidUpdate(f"index map has {len(rows)} rows, more than the model has dimensions")
    if len(offsets) > len(rows) + 1:
        raise InvalidUpdate(f"index map has {len(offsets) - 1} vectors for {len(rows)} rows")
    bounds = offsets.to(torch.int64)
    if bounds[0] != 0 or bounds[-1] != len(flat) or bool((bounds[1:] < bounds[:-1]).any()):
        raise InvalidUpdate("index offsets (o) do not partition the index vectors")
    imap: IndexMap = {}
    for pos, dim, vec in rows.tolist():
        if not (0 <= pos < len(keys) and 0 <= vec < len(bounds) - 1):
            raise InvalidUpdate(f"index row ({pos}, {dim}, {vec}) points outside the update")
        key = keys[pos]
        if not 0 <= dim < len(layout[key].shape) or dim in imap.get(key, {}):
            raise InvalidUpdate(f"index row for {key} names dimension {dim} twice or out of range")
        idx = flat[bounds[vec] : bounds[vec + 1]].to(torch.int64)
        size = layout[key].shape[dim]
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise InvalidUpdate(f"index vector for {key} dim {dim} leaves the range [0, {size})")
        if len(torch.unique(idx)) != len(idx):
            raise InvalidUpdate(f"index vector for {key} dim {dim} repeats an index")
        imap.setdefault(key, {})[dim] = idx
    return imap


_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32)


def _small_int(top: int) -> torch.dtype:
    """The narrowest index dtype that holds 0..``top``."""
    return torch.uint8 if top < 2**8 else torch.int16 if top < 2**15 else torch.int32


_PACKED = ("i", "o", "m")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint(keys: list[str]) -> str:
    """A short hash of the sorted tensor names, so that an update packed for another model is
    refused instead of misread."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
