"""The federated strategies, one module each behind one interface (``base.Strategy``); one
config key (``federation.strategy``) picks one and every strategy sees the same client budgets.
Adding a strategy is one new module and one line in ``STRATEGIES`` (see docs/strategies.md)."""

from __future__ import annotations

from cahfp.errors import UnknownName
from cahfp.strategies.base import (
    Assignment,
    ClientPlanned,
    CoordinatorPlanned,
    DenseStrategy,
    Strategy,
)
from cahfp.strategies.cahfp import CAHFP
from cahfp.strategies.fedavg import FedAvg
from cahfp.strategies.fedavg_fit import FedAvgFit
from cahfp.strategies.fedrolex import FedRolex
from cahfp.strategies.fiarse import FIARSE
from cahfp.strategies.fjord import FjORD, FjORDKD
from cahfp.strategies.heterofl import HeteroFL
from cahfp.strategies.magnitude import Magnitude
from cahfp.strategies.random_channels import RandomChannels
from cahfp.strategies.taylor import Taylor

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make ``cls`` selectable by its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


register(FedAvg)
register(FedAvgFit)
register(HeteroFL)
register(FedRolex)
register(FjORD)
register(FjORDKD)
register(FIARSE)
register(Magnitude)
register(RandomChannels)
register(Taylor)
register(CAHFP)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class named ``name`` (``UnknownName`` lists the known ones)."""
    if name not in STRATEGIES:
        raise UnknownName(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def descriptions() -> dict[str, str]:
    """Every strategy's one-line description, by name (for --help and docs)."""
    return {name: cls.description for name, cls in STRATEGIES.items()}


__all__ = [
    "STRATEGIES",
    "Assignment",
    "ClientPlanned",
    "CoordinatorPlanned",
    "DenseStrategy",
    "Strategy",
    "descriptions",
    "get_strategy",
    "register",
]
