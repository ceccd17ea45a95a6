"""FedAvg: every client trains the dense model, whatever its budget (the accuracy reference)."""

from cahfp.strategies.base import DenseStrategy


class FedAvg(DenseStrategy):
    name = "fedavg"
    description = "every client trains the dense model, ignoring its budget (accuracy reference)"
