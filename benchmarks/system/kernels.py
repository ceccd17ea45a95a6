"""Part 1b: one convolution's step time against its kept channel count."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.system.timing import (
    conv_runner,
    interleaved_medians,
)

KERNEL_LAYERS = ((8, 28), (16, 14), (32, 7))  # ResNet-20 x0.5's stages (channels, side) on FMNIST


def part_kernels(args) -> list[dict]:
    """One 3x3 convolution of a layer's shape (c -> c channels, batch ``args.batch``), forward
    and backward, at fractions of the layer's width: the time the kernel takes against the
    FLOPs it does."""
    rows = []
    for width, side in KERNEL_LAYERS:
        counts = sorted({max(1, round(width * f)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)})
        runners = [
            conv_runner(
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                torch.zeros(args.batch, c, side, side),
                input_grad=True,
            )
            for c in counts
        ]
        times = interleaved_medians([r for r, _ in runners], args.steps)
        for c, t in zip(counts, times, strict=True):
            rows.append(
                {
                    "width": width,
                    "side": side,
                    "channels": c,
                    "ms": t * 1e3,
                    "flops": (c / width) ** 2,
                    "time": t / times[-1],
                }
            )
    return rows
