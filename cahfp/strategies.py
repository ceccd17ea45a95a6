"""The federated strategies compared in this project, as data: which selector scores channels,
how widths are allocated, and where the plan is made. One config key (``strategy``) picks one;
every strategy sees the same client budgets."""

from __future__ import annotations

from dataclasses import dataclass

from cahfp.errors import UnknownName


@dataclass(frozen=True)
class Strategy:
    name: str
    scorer: str | None  # scoring method of cahfp.pruning; None = train the dense model
    allocation: str = "global"
    site: str = "coordinator"  # where the plan is made: "client" (needs local data) or here
    fit_only: bool = False  # only clients whose budget admits the dense model take part
    description: str = ""

    @property
    def dense(self) -> bool:
        return self.scorer is None


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "fedavg",
            None,
            description="every client trains the dense model, ignoring "
            "its budget (accuracy reference)",
        ),
        Strategy(
            "fedavg-fit",
            None,
            fit_only=True,
            description="only clients whose budget "
            "admits the dense model take part (realistic dense baseline)",
        ),
        Strategy(
            "heterofl",
            "ordered",
            "uniform",
            description="HeteroFL: the first channels of every layer",
        ),
        Strategy(
            "fedrolex",
            "rolling",
            "uniform",
            description="FedRolex: a window of channels rolling by one each round",
        ),
        Strategy(
            "magnitude",
            "magnitude",
            "uniform",
            description="L1-norm filter pruning of the global model",
        ),
        Strategy(
            "random",
            "random",
            "uniform",
            description="random channels, redrawn at each mask refresh",
        ),
        Strategy(
            "taylor",
            "taylor",
            "global",
            "client",
            description="first-order Taylor scores on each client's data",
        ),
        Strategy(
            "cahfp",
            "curvature",
            "global",
            "client",
            description="CA-HFP: curvature "
            "(Fisher block) scores on local data, joint second-order planning, "
            "reconstruction",
        ),
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UnknownName(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
