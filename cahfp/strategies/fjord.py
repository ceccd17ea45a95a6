"""FjORD (Horváth et al., "FjORD: Fair and Accurate Federated Learning under heterogeneous
targets with Ordered Dropout", NeurIPS 2021): nested widths. A client whose budget affords width
``p_max`` gets the first ``ceil(p_max x size)`` channels of every group (HeteroFL's slice) and
trains, per batch, a width drawn uniformly from the federation's widths up to its own
(ordered dropout, ``cahfp.local_rules.ordered_dropout``), so every client trains the thin
widths that the thinnest boards run. ``fjord-kd`` adds the paper's self-distillation from the
client's widest width. Aggregation is the coverage-weighted mean of every strategy here, which
equals the reference code's nested per-width averaging (docs/method.md)."""

from __future__ import annotations

from cahfp.local_rules import LocalRule
from cahfp.pruning import index_map_for
from cahfp.pruning.widths import flops_fraction, prefix_index, width_for_keep
from cahfp.strategies.base import CoordinatorPlanned


class FjORD(CoordinatorPlanned):
    name = "fjord"
    description = "FjORD: nested widths, each batch trains a width up to the client's own"
    scorer = "ordered"
    allocation = "uniform"
    distill = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._widths: dict[float, float] = {}  # keep -> widest width it affords
        self._maps: dict[float, tuple] = {}  # width -> (index map, FLOPs fraction)

    def width(self, keep: float) -> float:
        """The widest width whose training FLOPs fit ``keep``."""
        keep = min(keep, 1.0)
        if keep not in self._widths:
            self._widths[keep] = width_for_keep(self.groups, keep)
        return self._widths[keep]

    def grid(self) -> list[float]:
        """The widths clients draw from: those of ``pruning.od_keeps`` (else the tiers), and 1."""
        keeps = self.pruning.od_keeps or self.pruning.tiers
        return sorted({self.width(k) for k in keeps} | {1.0})

    def period_over(self, rec, rnd: int) -> bool:
        return False  # a width's channels never change

    def server_plan(self, model, example, rec, rnd: int):
        p = self.width(rec.keep)
        if p not in self._maps:
            imap = index_map_for(model, self.groups, prefix_index(self.groups, p))
            self._maps[p] = (imap, flops_fraction(self.groups, p))
        rec.index_map, rec.keep_achieved = self._maps[p]
        rec.planned_keep = rec.keep
        self.mark_planned(rec, rnd)
        return None

    def local_training(self, rec, rnd: int) -> LocalRule:
        # the width of the slice sent: the budget its plan was made for (a budget that moved
        # within plan_due's dead band keeps its plan)
        p_max = self.width(rec.keep if rec.planned_keep is None else rec.planned_keep)
        return LocalRule(
            kind="ordered-dropout",
            widths=(*[p for p in self.grid() if p < p_max], p_max),
            group_sizes={g.name: g.size for g in self.groups},
            distill=self.distill,
            kd_weight=self.pruning.kd_weight,
            kd_temperature=self.pruning.kd_temperature,
        )


class FjORDKD(FjORD):
    name = "fjord-kd"
    description = "FjORD with self-distillation from the client's widest width"
    distill = True
