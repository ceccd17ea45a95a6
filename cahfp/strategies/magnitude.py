"""L1-norm filter pruning of the global model, planned on the coordinator."""

from cahfp.strategies.base import CoordinatorPlanned


class Magnitude(CoordinatorPlanned):
    name = "magnitude"
    description = "L1-norm filter pruning of the global model"
    scorer = "magnitude"
    allocation = "uniform"
