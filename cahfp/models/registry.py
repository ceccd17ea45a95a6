"""One registry of model builders, keyed by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cahfp.errors import UnknownName

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(num_classes, in_channels, width)`` to the registry."""

    def deco(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return deco


def model_names() -> list[str]:
    _load_builtin()
    return sorted(MODELS)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    seed: int | None = 0,
) -> nn.Module:
    """Build a registered model; with ``seed`` set, initialisation is deterministic and the
    global RNG state is left untouched."""
    _load_builtin()
    if name not in MODELS:
        raise UnknownName(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if not (0 < width <= 4):
        raise ValueError(f"model width must be in (0, 4], got {width}")
    if num_classes < 2 or in_channels < 1:
        raise ValueError(
            f"need num_classes >= 2 and in_channels >= 1, got {num_classes}, {in_channels}"
        )
    if seed is None:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width)


def scaled(channels: int, width: float) -> int:
    """Channel count after applying a width multiplier (at least 1)."""
    return max(1, round(channels * width))


def _load_builtin() -> None:
    # Importing the modules registers their builders.
    from cahfp.models import resnet, vgg  # noqa: F401
