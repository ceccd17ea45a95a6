"""HeteroFL: every layer keeps its first channels, a plan that depends on the keep alone."""

from __future__ import annotations

from cahfp.strategies.base import CoordinatorPlanned


class HeteroFL(CoordinatorPlanned):
    name = "heterofl"
    description = "HeteroFL: the first channels of every layer"
    scorer = "ordered"
    allocation = "uniform"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plans: dict[float, tuple] = {}  # keep -> (index map, keep achieved)

    def period_over(self, rec, rnd: int) -> bool:
        return False  # the first channels never change

    def server_plan(self, model, example, rec, rnd: int):
        if rec.keep in self._plans:
            rec.index_map, rec.keep_achieved = self._plans[rec.keep]
            rec.planned_keep = rec.keep
            self.mark_planned(rec, rnd)
            return None
        plan = super().server_plan(model, example, rec, rnd)
        self._plans[rec.keep] = (rec.index_map, rec.keep_achieved)
        return plan
