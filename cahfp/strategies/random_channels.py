"""Random channels, redrawn at each mask refresh (the no-information baseline)."""

from cahfp.strategies.base import CoordinatorPlanned


class RandomChannels(CoordinatorPlanned):
    name = "random"
    description = "random channels, redrawn at each mask refresh"
    scorer = "random"
    allocation = "uniform"
