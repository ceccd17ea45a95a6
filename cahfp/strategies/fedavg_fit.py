"""FedAvg among the clients that can afford it: the realistic dense baseline."""

from cahfp.strategies.base import DenseStrategy


class FedAvgFit(DenseStrategy):
    name = "fedavg-fit"
    description = (
        "only clients whose budget admits the dense model take part (realistic dense baseline)"
    )

    def eligible(self, keep: float) -> bool:
        return keep >= 1.0
