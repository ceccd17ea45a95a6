"""The planning options: every knob of ``make_plan`` and of a client's plan refresh, with its
default, in one place. The configuration's ``[pruning]`` table shares these fields
(``cahfp.config.PruningConfig``), a strategy turns it into the options of a plan
(``cahfp.strategies``), and a task carries them to a client that plans itself."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PlanKnobs(BaseModel):
    """The planning knobs the configuration and a plan's options share (one set of defaults)."""

    model_config = ConfigDict(extra="forbid")
    refresh_period: int = Field(5, ge=1, description="rounds between a client's plan refreshes")
    score_batches: int = Field(4, ge=1, description="local batches a client scores on")
    floor: float = Field(0.1, gt=0, le=1, description="smallest share of a layer's channels kept")
    multiple: int = Field(8, ge=1, description="channels leave wide layers in blocks of this")
    interactions: bool = Field(
        False, description="joint (second-order set) objective where scores allow it"
    )
    first_order: bool = True
    gradient: str = Field("signed", description="how the joint planner uses the first-order term")
    amortize_scoring: bool = Field(
        True,
        description="clients that score on their data count "
        "the scoring passes, spread over the refresh period, in "
        "their FLOPs budget",
    )
    coverage_weight: float = Field(
        0.0,
        ge=0,
        description="CA-HFP: price (in typical channel "
        "losses) of dropping under-covered channels; 0 = off",
    )
    temperature: float = Field(
        0.0,
        ge=0,
        description="CA-HFP: Gumbel noise on channel costs, "
        "in typical channel losses (0 = deterministic plans; see docs/method.md section 5)",
    )
    rotation: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="CA-HFP: share of each layer's kept channels given to a window that rotates, "
        "refresh by refresh, through the channels the curvature plan drops (coverage-aware "
        "rotation; 0 = off; docs/method.md)",
    )
    anchor_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="CA-HFP: weight of the federation-wide average of the clients' normalised "
        "channel scores in each client's plan (0 = local scores only; docs/method.md section 5)",
    )


class PlanOptions(PlanKnobs):
    """How one plan is made: the knobs, plus the scorer, the allocation and whether the plan's
    parameters stay within the keep. Made by a strategy from the configuration
    (``Strategy.plan_options``), consumed by ``make_plan``, and sent in a task
    (``TaskMessage.plan``) when the client plans itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scorer: str = "curvature"
    allocation: str = "global"
    budget_uplink: bool = False

    @classmethod
    def of(cls, knobs: PlanKnobs, **fields) -> PlanOptions:
        """The options with ``knobs``' values (e.g. the ``[pruning]`` table) and ``fields``."""
        shared = {k: getattr(knobs, k) for k in PlanKnobs.model_fields}
        return cls(**{**shared, **fields})

    def but(self, **fields) -> PlanOptions:
        """These options with ``fields`` changed (validated)."""
        return PlanOptions(**{**self.model_dump(), **fields}) if fields else self
