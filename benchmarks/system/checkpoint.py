"""Part 5: the coordinator's evaluation and checkpoint time per round."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cahfp.models import build_model
from cahfp.wire import encode_state


def part_checkpoint() -> dict:
    from coordinator.records import atomic_write

    model = build_model("vgg11", 10, 1, 0.33, seed=0)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for _ in range(5):
            atomic_write(Path(tmp) / "g.safetensors", encode_state(model.state_dict(), {}))
        return {
            "params": params,
            "checkpoint_s": (time.perf_counter() - t0) / 5,
            "model_mb": params * 4 / 1e6,
        }
