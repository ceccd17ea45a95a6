"""CA-HFP: curvature (Fisher block) scores on each client's data, joint second-order planning,
reconstruction; optionally steered by the federation's channel coverage (``coverage_weight``),
a window of channels rotating through those the plan drops (``rotation``),
a federation-wide anchor of the clients' normalised scores (``anchor_weight``) and Gumbel noise
(``temperature``, with its schedule). The coverage and anchor state live here."""

from __future__ import annotations

import torch

from cahfp.pruning.options import PlanOptions
from cahfp.pruning.sides import checked_sides
from cahfp.strategies.base import ClientPlanned


class CAHFP(ClientPlanned):
    name = "cahfp"
    description = (
        "CA-HFP: curvature (Fisher block) scores on local data, joint second-order planning, "
        "reconstruction"
    )
    scorer = "curvature"
    uplink_cap = True
    STATE = ("coverage", "anchor")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # decayed, sample-weighted average of the clients' normalised scores
        self.anchor: dict[int, torch.Tensor] | None = None
        self._round_scores: dict[int, torch.Tensor] = {}
        self._round_score_weight = 0.0

    def temperature(self, rnd: int) -> float:
        """The plan temperature for round ``rnd`` (1-based) under the configured schedule."""
        t = self.pruning.temperature
        if self.pruning.temperature_schedule == "linear":
            return t * max(0.0, (self.rounds - rnd) / max(self.rounds - 1, 1))
        return t

    def plan_options(self, rnd: int) -> PlanOptions:
        return (
            super()
            .plan_options(rnd)
            .but(
                coverage_weight=self.pruning.coverage_weight,
                rotation=self.pruning.rotation,
                temperature=self.temperature(rnd),
                anchor_weight=self.pruning.anchor_weight,
            )
        )

    def side_names(self, plan: PlanOptions | None) -> tuple[str, ...]:
        if plan is None:
            return ()
        wanted = (("coverage", plan.coverage_weight), ("anchor", plan.anchor_weight))
        return tuple(n for n, w in wanted if w > 0 and getattr(self, n) is not None)

    def check_update(self, extras: dict, refreshed: bool):
        """A client's normalised channel scores (``score/<group root>``), checked in full; None
        when it sent none, or when they were not asked for (no anchor configured, or the
        client did not re-plan this round): those are ignored."""
        if self.groups is None or self.pruning.anchor_weight <= 0 or not refreshed:
            return None
        # normalised_scores makes the mean magnitude over all channels 1 (or all scores 0)
        return checked_sides(self.groups, extras, "score", torch.float32, max_mean=1.0)

    def begin_round(self) -> None:
        super().begin_round()
        self._round_scores = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in self.groups}
        self._round_score_weight = 0.0

    def observe(self, model, rec, imap, metrics, checked, rnd) -> None:
        super().observe(model, rec, imap, metrics, checked, rnd)
        if checked is not None:
            for gid, s in checked.items():
                self._round_scores[gid] += metrics.samples * s.to(torch.float64)
            self._round_score_weight += metrics.samples

    def end_round(self, total_weight: float) -> tuple[float | None, float | None]:
        out = super().end_round(total_weight)
        if self._round_score_weight > 0:  # fold the round's scores into the decayed anchor
            decay = self.pruning.coverage_decay
            mean = {gid: v / self._round_score_weight for gid, v in self._round_scores.items()}
            if self.anchor is None:
                self.anchor = mean
            else:
                self.anchor = {
                    gid: (1 - decay) * self.anchor[gid] + decay * mean[gid] for gid in mean
                }
            self._round_score_weight = 0.0
        return out
