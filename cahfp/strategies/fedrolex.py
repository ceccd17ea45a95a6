"""FedRolex: a window of channels that rolls by one every round."""

from __future__ import annotations

from cahfp.strategies.base import CoordinatorPlanned


class FedRolex(CoordinatorPlanned):
    name = "fedrolex"
    description = "FedRolex: a window of channels rolling by one each round"
    scorer = "rolling"
    allocation = "uniform"

    def plan_due(self, rec, rnd: int) -> bool:
        if rec.index_map is None or rec.planned_round is None:
            return True
        return rnd != rec.planned_round  # the window moves every round by definition
