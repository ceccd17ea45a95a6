"""FIARSE (Wu et al., "FIARSE: Model-Heterogeneous Federated Learning via Importance-Aware
Submodel Extraction", NeurIPS 2024): every round the coordinator keeps, for each budget, the
channels of the current global model whose importance (mean ``|w|`` of their producing weights)
passes the smallest threshold that fits the budget (``cahfp.pruning.threshold``; one threshold
for all layers, or per layer with ``pruning.fiarse_threshold = "layerwise"``), and the client
trains its slice through the threshold gate (``cahfp.local_rules.threshold_gate``): a kept
channel whose importance falls below the threshold drops out. Where this differs from the
official code, and why: docs/method.md."""

from __future__ import annotations

from cahfp.local_rules import LocalRule
from cahfp.pruning import index_map_for
from cahfp.pruning.threshold import channel_scores, threshold_plan
from cahfp.strategies.base import CoordinatorPlanned


class FIARSE(CoordinatorPlanned):
    name = "fiarse"
    description = "FIARSE: channels whose magnitude passes a budget threshold, gated in training"
    scorer = "magnitude"
    allocation = "global"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (round, keep) -> (plan, index map, thresholds): one plan per budget and round
        self._plans: dict[tuple[int, float], tuple] = {}
        # client index -> its thresholds and its kept channels' importances, by group
        self._thresholds: dict[int, tuple[dict[str, float], dict[str, list[float]]]] = {}

    def plan_due(self, rec, rnd: int) -> bool:
        if rec.index_map is None or rec.planned_round is None:
            return True
        return rnd != rec.planned_round  # the global model, and so the threshold, moved

    def server_plan(self, model, example, rec, rnd: int):
        keep = min(rec.keep, 1.0)
        if (rnd, keep) not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k[0] == rnd}
            scores = channel_scores(model, self.groups)
            plan, thresholds = threshold_plan(
                model,
                self.groups,
                keep,
                self.pruning.floor,
                layerwise=self.pruning.fiarse_threshold == "layerwise",
                scores=scores,
            )
            imap = index_map_for(model, self.groups, plan.kept)
            kept = {  # the slice keeps each group's channels in index order
                g.name: scores[g.gid][plan.kept[g.gid].sort().values].tolist() for g in self.groups
            }
            self._plans[(rnd, keep)] = (plan, imap, (thresholds, kept))
        plan, rec.index_map, self._thresholds[rec.index] = self._plans[(rnd, keep)]
        rec.keep_achieved, rec.planned_keep = plan.flops_fraction, rec.keep
        self.mark_planned(rec, rnd)
        return plan

    def local_training(self, rec, rnd: int) -> LocalRule | None:
        if min(rec.keep, 1.0) >= 1:
            return None  # the dense model: nothing is gated
        thresholds, scores = self._thresholds[rec.index]
        return LocalRule(
            kind="threshold-gate", thresholds=thresholds, scores=scores, ste=self.pruning.fiarse_ste
        )
