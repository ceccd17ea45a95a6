"""What a federated strategy decides, behind one interface (``Strategy``); the round engine
(``coordinator.engine``) calls it and holds no strategy names.

A strategy says, for one client in one round: whether it takes part (``eligible``), what the
coordinator plans for it (``server_plan``) or what the client plans itself (``client_plan``:
the options the task carries), when its plan is due again (``plan_due``), which per-channel side
tensors travel with the dense model (``side_tensors``) and back (``check_update``), and what
happens at the end of a round (``end_round``). Three families share most of it:
``DenseStrategy`` (no pruning), ``CoordinatorPlanned`` (plans from the global model alone, sent
as a slice) and ``ClientPlanned`` (the client scores its data and plans, sent the dense model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from cahfp.config import PruningConfig
from cahfp.local_rules import LocalRule
from cahfp.pruning import find_groups, index_map_for, make_plan, score_groups
from cahfp.pruning.extract import IndexMap, kept_channels
from cahfp.pruning.groups import GroupSet
from cahfp.pruning.options import PlanOptions


class PlannedClient(Protocol):
    """What a strategy reads and writes of the coordinator's record of one client
    (``coordinator.records.ClientRecord``)."""

    index: int  # fixes its seeds and its place in the refresh schedule
    keep: float  # its budget: fraction of dense training FLOPs
    index_map: IndexMap | None
    keep_achieved: float
    planned_round: int | None  # round its current plan was made
    planned_keep: float | None  # the budget its current plan was made for


@dataclass(frozen=True)
class Assignment:
    """A client's work in a round: its keep (None: the device decides), the payload it gets
    (``state``: the dense model; ``slice``: its current plan's slice) and, when it plans
    itself this round, the options of that plan."""

    keep: float | None
    payload: str = "state"
    plan: PlanOptions | None = None


class Strategy:
    """A federated strategy. Subclasses set ``name``, ``description`` and usually ``scorer``
    (a ``cahfp.pruning`` scoring method; None trains the dense model) and ``allocation``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    scorer: ClassVar[str | None] = None
    allocation: ClassVar[str] = "global"
    client_plans: ClassVar[bool] = False  # the client scores its own data and plans
    uplink_cap: ClassVar[bool] = False  # default of pruning.budget_uplink

    def __init__(self, pruning: PruningConfig, rounds: int = 1, seed: int = 0):
        """``pruning``: the configuration's ``[pruning]`` table; ``rounds`` and ``seed``: the
        federation's (``Config.strategy()`` passes all three)."""
        self.pruning = pruning
        self.rounds = rounds
        self.seed = seed
        self.groups: GroupSet | None = None
        self.coverage: dict[int, torch.Tensor] | None = None  # decayed average share per channel
        self._round_cover: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ setup and options

    @property
    def prunes(self) -> bool:
        return self.scorer is not None

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        """Called once with the global model: find its channel groups when this prunes."""
        self.groups = find_groups(model, example) if self.prunes else None

    def plan_options(self, rnd: int) -> PlanOptions:
        """The options of this strategy's plans in round ``rnd`` (``make_plan``'s knobs)."""
        alloc = self.pruning.allocation
        return PlanOptions.of(
            self.pruning,
            **({"scorer": self.scorer} if self.scorer else {}),
            allocation=self.allocation if alloc == "auto" else alloc,
            budget_uplink=self.uplink_capped(),
            coverage_weight=0.0,
            rotation=0.0,
            temperature=0.0,
            anchor_weight=0.0,
        )

    def uplink_capped(self) -> bool:
        """Whether plans keep each update's parameters within the client's keep fraction."""
        cap = self.pruning.budget_uplink
        return self.uplink_cap if cap is None else bool(cap)

    # ------------------------------------------------------------------ who and what

    def eligible(self, keep: float) -> bool:
        """Whether a client whose budget is ``keep`` (> 0: the engine never selects a device
        that can afford nothing) may be selected."""
        return True

    def assign(self, rec: PlannedClient, rnd: int, self_budget: bool) -> Assignment:
        """What ``rec`` does in round ``rnd`` (``self_budget``: devices choose their keep)."""
        raise NotImplementedError

    def server_plan(self, model: nn.Module, example: torch.Tensor, rec: PlannedClient, rnd: int):
        """Plan ``rec``'s submodel on the coordinator (sets its index map); None: not here."""
        return None

    def client_plan(self, rnd: int) -> PlanOptions | None:
        """The options a client plans with in round ``rnd``; None: it does not plan."""
        return None

    def local_training(self, rec: PlannedClient, rnd: int) -> LocalRule | None:
        """How ``rec`` trains its submodel in round ``rnd`` (after its plan is made); None:
        plain cross-entropy steps."""
        return None

    # ------------------------------------------------------------------ when masks refresh

    def plan_due(self, rec: PlannedClient, rnd: int) -> bool:
        """Whether ``rec`` needs a new plan in round ``rnd``: it has none, its budget moved
        away from the one its plan was made for, or the refresh period has passed."""
        if rec.index_map is None or rec.planned_round is None:
            return True
        planned = rec.keep_achieved if rec.planned_keep is None else rec.planned_keep
        shrank = rec.keep < planned - 0.05  # the device can no longer afford its plan
        grew = rec.keep > planned + 0.1 and rec.keep_achieved < 1
        if shrank or grew:
            return True
        return self.period_over(rec, rnd)

    def period_over(self, rec: PlannedClient, rnd: int) -> bool:
        return rnd - rec.planned_round >= self.pruning.refresh_period

    def mark_planned(self, rec: PlannedClient, rnd: int) -> None:
        """Record that ``rec``'s plan was made in ``rnd``. With staggering, a client's first plan
        counts as made ``index mod period`` rounds earlier, so that refreshes spread evenly over
        the rounds (each refresh then sees coverage that includes the others' recent choices)."""
        first = rec.planned_round is None
        period = self.pruning.refresh_period
        stagger = self.pruning.stagger_refresh
        rec.planned_round = rnd - (rec.index % period if first and stagger else 0)

    # ------------------------------------------------------------------ side tensors

    def side_names(self, plan: PlanOptions | None) -> tuple[str, ...]:
        """The per-channel side tensors a dense task planned with ``plan`` carries."""
        return ()

    def side_tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named side tensors, as payload extras (``<name>/<group root>``)."""
        return {
            f"{n}/{g.name}": getattr(self, n)[g.gid].float() for n in names for g in self.groups
        }

    def check_update(self, extras: dict, refreshed: bool):
        """Validate what an update carries for this strategy, before anything is folded in
        (raises ``InvalidUpdate``); returns what ``observe`` folds in."""
        return None

    # ------------------------------------------------------------------ the round

    def begin_round(self) -> None:
        if self.groups is not None:
            self._round_cover = {
                g.gid: torch.zeros(g.size, dtype=torch.float64) for g in self.groups
            }

    def observe(
        self,
        model: nn.Module,
        rec: PlannedClient,
        imap: IndexMap,
        metrics,
        checked,
        rnd: int,
    ) -> None:
        """Fold in an accepted update (``metrics``: its ``Metrics``; ``checked``: what
        ``check_update`` returned): the channels it covers, weighted by its samples."""
        if self._round_cover is not None:
            for gid, kept in kept_channels(model, self.groups, imap).items():
                self._round_cover[gid][kept] += metrics.samples

    def end_round(self, total_weight: float) -> tuple[float | None, float | None]:
        """Fold this round's covering shares into the decayed average; report min and mean."""
        if self._round_cover is None or total_weight <= 0:
            return None, None
        decay = self.pruning.coverage_decay
        share = {gid: v / total_weight for gid, v in self._round_cover.items()}
        if self.coverage is None:
            self.coverage = share
        else:
            self.coverage = {
                gid: (1 - decay) * self.coverage[gid] + decay * share[gid] for gid in share
            }
        flat = torch.cat(list(share.values()))
        return float(flat.min()), float(flat.mean())

    # ------------------------------------------------------------------ checkpoints

    STATE: ClassVar[tuple[str, ...]] = ("coverage",)

    def state(self) -> dict[str, dict[int, torch.Tensor]]:
        """The federation-wide state a checkpoint keeps (per-channel tensors by group id)."""
        return {k: getattr(self, k) for k in self.STATE if getattr(self, k) is not None}

    def load_state(self, saved: dict[str, dict[int, torch.Tensor]]) -> None:
        for k in self.STATE:
            setattr(self, k, saved.get(k) or None)


class DenseStrategy(Strategy):
    """Every selected client trains the dense model."""

    def assign(self, rec: PlannedClient, rnd: int, self_budget: bool) -> Assignment:
        return Assignment(None)


class CoordinatorPlanned(Strategy):
    """The coordinator plans each client's submodel from the global model alone and sends the
    slice; a client whose budget admits the dense model gets the dense model."""

    def assign(self, rec: PlannedClient, rnd: int, self_budget: bool) -> Assignment:
        keep = min(rec.keep, 1.0)
        if keep >= 1:
            return Assignment(keep)
        return Assignment(keep, "slice")

    def score_seed(self, rec: PlannedClient, rnd: int) -> int:
        return self.seed * 7919 + rec.index + rnd * 104_729

    def server_plan(self, model: nn.Module, example: torch.Tensor, rec: PlannedClient, rnd: int):
        scores = score_groups(
            model,
            None,
            self.scorer,
            example_input=example,
            round_idx=rnd,
            seed=self.score_seed(rec, rnd),
        )
        plan = make_plan(model, scores, rec.keep, self.plan_options(rnd))
        rec.index_map = index_map_for(model, plan.groups, plan.kept)
        rec.keep_achieved, rec.planned_keep = plan.flops_fraction, rec.keep
        self.mark_planned(rec, rnd)
        return plan


class ClientPlanned(Strategy):
    """Each client scores the dense model on its own data and plans under its budget on plan
    refresh rounds (sent the dense model); between refreshes it gets its plan's slice."""

    client_plans = True

    def assign(self, rec: PlannedClient, rnd: int, self_budget: bool) -> Assignment:
        if self.plan_due(rec, rnd):
            keep = None if self_budget else min(rec.keep, 1.0)
            plan = self.client_plan(rnd) if keep is None or keep < 1 else None
            return Assignment(keep, "state", plan)
        # between refreshes: the slice of the client's current plan
        return Assignment(rec.keep_achieved, "slice" if rec.index_map else "state")

    def client_plan(self, rnd: int) -> PlanOptions | None:
        return self.plan_options(rnd)

    def observe(self, model, rec, imap, metrics, checked, rnd) -> None:
        super().observe(model, rec, imap, metrics, checked, rnd)
        rec.index_map, rec.keep_achieved = imap, metrics.keep_achieved
        if metrics.refreshed:
            target = metrics.keep_target
            rec.planned_keep = target if target is not None else rec.keep
            self.mark_planned(rec, rnd)


__all__ = [
    "Assignment",
    "ClientPlanned",
    "CoordinatorPlanned",
    "DenseStrategy",
    "PlannedClient",
    "Strategy",
]
