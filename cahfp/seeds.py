"""Independent random streams derived from one seed, so that two uses of a round's seed (a
client's data shuffle and its width draws, the coordinator's distillation batches) never share
a sequence."""

from __future__ import annotations

import hashlib


def stream(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose``'s generator, derived from ``seed`` (stable across runs,
    platforms and Python versions)."""
    digest = hashlib.sha256(f"{int(seed)}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
