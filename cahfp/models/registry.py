"""One registry of model builders, keyed by name; the one place a name becomes a model.

A name is a registered one (``vgg11``...) or the operator's own builder given as
``package.module:callable`` (imported on first use; docs/own-model.md).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import torch
from torch import nn

from cahfp.errors import ModelUnavailable, UnknownName

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


_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
OWN_MODEL = re.compile(rf"({_DOTTED}):({_DOTTED})")
OWN_MODEL_HINT = (
    "or give your own builder as 'package.module:callable' (importable: on PYTHONPATH or "
    "installed; see docs/own-model.md)"
)


def is_own_model(name: str) -> bool:
    """Whether ``name`` has the ``package.module:callable`` form of an operator's own model."""
    return OWN_MODEL.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    """``name`` if it is registered or of the ``package.module:callable`` form (not imported
    here), else ``UnknownName`` listing the known names."""
    if name in model_names() or is_own_model(name):
        return name
    known = ", ".join(model_names())
    raise UnknownName(f"unknown model {name!r}; known models: {known}; {OWN_MODEL_HINT}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_builder(name: str) -> Builder:
    """The builder of a registered name, or the callable that ``package.module:callable``
    names (``ModelUnavailable`` naming the module when it cannot be imported here)."""
    _load_builtin()
    if name in MODELS:
        return MODELS[name]
    check_model_name(name)
    module_name, attr = OWN_MODEL.fullmatch(name).groups()
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # the operator's code: any error while importing it
        raise ModelUnavailable(
            f"model {name!r}: cannot import module {module_name!r} ({_one_line(exc)}); put its "
            "directory on PYTHONPATH or install its package on this machine"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelUnavailable(f"model {name!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelUnavailable(f"model {name!r}: {attr!r} in {module_name!r} is not callable")
    return obj


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    seed: int | None = 0,
) -> nn.Module:
    """Build a registered model; with ``seed`` set, initialisation is deterministic and the
    global RNG state is left untouched."""
    builder = resolve_builder(name)
    if not (0 < width <= 4):
        raise ValueError(f"model width must be in (0, 4], got {width}")
    if num_classes < 2 or in_channels < 1:
        raise ValueError(
            f"need num_classes >= 2 and in_channels >= 1, got {num_classes}, {in_channels}"
        )
    if seed is None:
        return _call(name, builder, num_classes, in_channels, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _call(name, builder, num_classes, in_channels, width)


def _call(name: str, builder: Builder, num_classes: int, in_channels: int, width: float):
    if name in MODELS:
        return builder(num_classes=num_classes, in_channels=in_channels, width=width)
    try:  # the operator's code: report any failure in one line
        model = builder(num_classes=num_classes, in_channels=in_channels, width=width)
    except Exception as exc:
        raise ModelUnavailable(
            f"model {name!r} failed to build with num_classes={num_classes}, "
            f"in_channels={in_channels}, width={width:g}: {_one_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelUnavailable(
            f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def scaled(channels: int, width: float) -> int:
    """Channel count after applying a width multiplier (at least 1)."""
    return max(1, round(channels * width))


def _load_builtin() -> None:
    # Importing the modules registers their builders.
    from cahfp.models import resnet, vgg  # noqa: F401
