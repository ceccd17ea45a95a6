"""Federation configuration: a TOML file validated with pydantic, plus command-line overrides.

Errors name the offending key and value, e.g.
``config error: pruning.tiers.0 = 1.5: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cahfp.device.boards import DEFAULT_BOARDS
from cahfp.device.select import check_device_spec
from cahfp.errors import CAHFPError, ConfigError, UnknownName  # noqa: F401 (ConfigError re-exported)
from cahfp.messages import BudgetSettings
from cahfp.pruning.options import PlanKnobs
from cahfp.training import Recipe

log = logging.getLogger("cahfp.config")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson images)
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientResources(_Strict):
    """Ray resources for one worker, which trains one client at a time (Flower's
    ``client_resources``): fractional GPUs share a card."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs (also its torch threads, at least 1)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs; 0.25 puts four workers on one card")


class FederationConfig(_Strict):
    name: str = Field(
        "federation",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="also the federation id in MQTT topics",
    )
    rounds: int = Field(20, ge=1)
    clients: int = Field(10, ge=1)
    participation: float = Field(1.0, gt=0, le=1, description="fraction of clients per round")
    seed: int = 0
    strategy: str = "cahfp"
    eval_every: int = Field(1, ge=1)
    deadline_s: float = Field(600.0, gt=0)
    min_updates: int = Field(1, ge=1)
    backend: Literal["auto", "inprocess", "processes", "ray"] = Field(
        "auto",
        description="simulation: a round's clients one after another in this process "
        "(inprocess), in parallel in worker processes (processes) or on Ray actors, on this "
        "machine or the cluster at RAY_ADDRESS (ray); auto = processes when more than one "
        "core is free",
    )
    workers: int = Field(
        0,
        ge=0,
        le=1024,
        description="processes/ray backends: workers (0 = as many as fit: one per free "
        "core, or per client_resources on Ray; at most a round's clients)",
    )
    client_resources: ClientResources = Field(
        default_factory=lambda: ClientResources(),
        description="ray backend: what each worker (one client at a time) reserves",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from cahfp.strategies import get_strategy

        try:
            get_strategy(v)
        except UnknownName as exc:
            raise ValueError(str(exc)) from None
        return v


class ModelConfig(_Strict):
    name: str = "vgg11"
    width: float = Field(0.25, gt=0, le=4)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from cahfp.models.registry import check_model_name

        try:
            return check_model_name(v)
        except UnknownName as exc:
            raise ValueError(str(exc)) from None


class DataConfig(_Strict):
    dataset: str = "fmnist"
    partition: str = "dirichlet:0.5"
    train_samples: int | None = Field(
        None, ge=1, description="use a seeded subset of the training set before partitioning"
    )
    min_samples: int = Field(10, ge=1)
    eval_samples: int | None = Field(2000, ge=1)
    eval_split: Literal["test", "validation"] = Field(
        "test",
        description="evaluate on the test set, or on held-out training images that no client "
        "holds (for choosing settings without looking at the test set)",
    )
    distill_samples: int = Field(
        0,
        ge=0,
        description="training images the coordinator keeps, unlabelled, for "
        "aggregation.distill_steps: those after the clients' data.train_samples in the same "
        "seeded order, so no client holds them and the clients' split does not change",
    )
    data_dir: str | None = None
    download: bool = False

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v in ("fmnist", "cifar10", "cifar100") or v.startswith("imagefolder:"):
            return v
        raise ValueError("unknown dataset; known: fmnist, cifar10, cifar100, imagefolder:PATH")

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, v: str) -> str:
        from cahfp.data.partition import partition

        partition([0, 1, 0, 1], 2, v, seed=0, min_samples=1)  # raises on a bad spec
        return v


class PruningConfig(PlanKnobs):
    """The ``[pruning]`` table: the planning knobs (``PlanKnobs``, whose defaults are the
    defaults here) and how the federation uses them."""

    tiers: list[float] = Field(
        default_factory=lambda: [1.0, 0.6, 0.4, 0.2],
        min_length=1,
        description="with clients.budget = 'fixed-tiers' only (simulation, benchmarks): the "
        "keep fractions assigned to clients in turn",
    )
    allocation: Literal["auto", "global", "uniform"] = Field(
        "auto", description="auto: the strategy's own allocation"
    )
    budget_uplink: bool | None = Field(
        None,
        description="the plan's parameters (what the update carries) also stay within the keep "
        "fraction; unset: the strategy's default (on for cahfp); only for strategies whose "
        "clients plan",
    )
    gradient: Literal["signed", "absolute", "off"] = Field(
        "signed", description="how the joint planner uses the first-order term"
    )
    temperature_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="CA-HFP: linear lowers the temperature from its value in round 1 to 0 in "
        "the last round (sample early, settle late)",
    )
    stagger_refresh: bool = Field(
        True, description="spread clients' plan refreshes evenly over the refresh period"
    )
    coverage_decay: float = Field(
        0.5,
        gt=0,
        le=1,
        description="weight of the latest round in the federation-wide averages (coverage, "
        "anchor scores)",
    )
    od_keeps: list[float] | None = Field(
        None,
        description="fjord: the keeps whose widths clients draw from (each up to its own; the "
        "dense width always included); unset: the tiers",
    )
    kd_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fjord-kd: share of the distillation term in a narrower width's loss",
    )
    kd_temperature: float = Field(1.0, gt=0, le=100, description="fjord-kd: softmax temperature")
    fiarse_threshold: Literal["global", "layerwise"] = Field(
        "layerwise",
        description="fiarse: the same kept fraction of every layer (its own threshold each; "
        "chosen on validation, docs/method.md), or one importance threshold for all layers",
    )
    fiarse_ste: bool = Field(
        True,
        description="fiarse: train through the threshold function (its surrogate gradient); "
        "false: plain masked gradients, what the official code computes",
    )

    @field_validator("tiers", "od_keeps")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        for t in v or ():
            if not 0 < t <= 1:
                raise ValueError(f"every tier is a keep fraction in (0, 1], got {t}")
        return v


BUDGET_ALIASES = {"profiles": "measured", "tiers": "fixed-tiers"}  # names before protocol 6


class ClientsConfig(_Strict):
    budget: Literal["measured", "fixed-tiers"] = Field(
        "measured",
        description="measured: every client measures its own device (in simulation: emulates "
        "its clients.profiles board) and chooses its own keep, capped at clients.max_keep; "
        "fixed-tiers (simulation and benchmarks): the coordinator gives client i the keep "
        "pruning.tiers[i mod len], whatever its device measured",
    )
    profiles: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOARDS),
        min_length=1,
    )
    safety: float = Field(0.8, gt=0, le=1, description="share of deadline and memory to plan for")
    min_keep: float = Field(0.1, gt=0, le=1, description="the smallest keep a device may choose")
    max_keep: float = Field(
        1.0, gt=0, le=1, description="federation-wide cap on the keep a device may choose"
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _old_names(cls, v):
        return BUDGET_ALIASES.get(v, v)

    @model_validator(mode="after")
    def _keep_range(self) -> ClientsConfig:
        if self.min_keep > self.max_keep:
            raise ValueError(f"min_keep {self.min_keep} is above max_keep {self.max_keep}")
        return self

    def settings(self) -> BudgetSettings:
        """What a self-measuring client needs of these settings (sent with every task)."""
        return BudgetSettings(safety=self.safety, min_keep=self.min_keep, max_keep=self.max_keep)

    @field_validator("profiles")
    @classmethod
    def _known_profiles(cls, v: list[str]) -> list[str]:
        from cahfp.device.profiles import profile_names

        unknown = [p for p in v if p not in profile_names()]
        if unknown:
            raise ValueError(
                f"unknown device profiles {unknown}; known: {', '.join(profile_names())}"
            )
        return v


# [aggregation] keys renamed when "calibrate" came to mean only a device's speed measurement:
# the old names keep working for one release, with a warning naming the new key
RENAMED_AGGREGATION = {
    "calibrate_statistics": "measure_statistics",
    "calibration_batches": "statistics_batches",
    "calibration_clients": "statistics_clients",
    "calibration_deadline_s": "statistics_deadline_s",
}


class AggregationConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED_AGGREGATION.items():
            if old in data:
                log.warning(
                    "config key aggregation.%s is deprecated (removed in the next release): "
                    "use aggregation.%s",
                    old,
                    new,
                )
                value = data.pop(old)
                data.setdefault(new, value)
        return data

    uncovered_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="vote of uncovered coordinates for the current global value (0 = none)",
    )
    exact_stats: bool = Field(
        True, description="BatchNorm statistics from dense updates when any arrived"
    )
    omit_pruned_stats: bool = Field(
        True,
        description="with exact_stats: in a round where a participant is expected to train the "
        "dense model, pruned clients' slices and updates leave out BatchNorm running statistics "
        "(the aggregate would not use them)",
    )
    size_exponent: float = Field(
        0.0,
        ge=0,
        le=4,
        description="an update's weight is its samples x (its share of the model's parameters) "
        "to this power (0 = samples alone)",
    )
    pooled_variance: bool = Field(
        False,
        description="BatchNorm variances as the variance of the clients' pooled activations "
        "(mean of variances + spread of means) instead of the mean of their variances",
    )
    server_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="the coordinator moves the global model by this times its previous step "
        "plus the round's aggregated step (FedAvgM, server learning rate 1); 0 = the aggregate",
    )
    measure_statistics: bool = Field(
        True,
        description="after aggregation, the round's dense participants recompute the new "
        "global model's BatchNorm statistics on their data (a statistics task); they replace "
        "the averaged ones",
    )
    statistics_batches: int = Field(
        2, ge=1, le=1024, description="local batches each client measures in a statistics task"
    )
    statistics_clients: int = Field(
        8,
        ge=1,
        description="at most this many of the round's dense participants are asked to "
        "measure statistics (a seeded sample of them; 8 clients x 2 batches of 32 images "
        "estimate them well), so that a large federation's phase costs a constant",
    )
    statistics_deadline_s: float = Field(
        120.0,
        gt=0,
        description="how long the statistics phase waits for answers (at most the round's "
        "deadline); a client that left after training then stalls the round this long at most",
    )
    distill_steps: int = Field(
        0,
        ge=0,
        le=100_000,
        description="after aggregation, distil the round's accepted submodels (their mean "
        "outputs) into the global model on the coordinator's unlabelled images "
        "(data.distill_samples) for this many steps (FedDF-style ensemble distillation; 0 = off)",
    )
    distill_lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate of distillation")
    distill_temperature: float = Field(1.0, gt=0, le=100)
    distill_batch_size: int = Field(64, ge=2, le=4096)


class TrainConfig(Recipe):
    """The ``[train]`` table: the training recipe every client gets (``recipe()``: what a task
    carries) and the device this process computes on (``device``: never sent, every board
    chooses its own with ``cahfp client --device``)."""

    device: str = Field(
        "auto",
        description="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N: where "
        "training, scoring, evaluation and the statistics phase run (transfers and aggregation "
        "stay on the CPU)",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        try:
            return check_device_spec(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def recipe(self) -> Recipe:
        """The recipe alone, as tasks and the status carry it."""
        return Recipe(**self.model_dump(exclude={"device"}))


class Config(_Strict):
    federation: FederationConfig = Field(default_factory=FederationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)

    @model_validator(mode="after")
    def _distillation_needs_images(self) -> Config:
        if self.aggregation.distill_steps and not (
            self.data.distill_samples and self.data.train_samples
        ):
            raise ValueError(
                "aggregation.distill_steps needs data.distill_samples and data.train_samples "
                "(the unlabelled images are those after the clients' subset)"
            )
        return self

    @model_validator(mode="after")
    def _uplink_cap_needs_client_plans(self) -> Config:
        from cahfp.strategies import STRATEGIES, get_strategy

        if self.pruning.budget_uplink and not get_strategy(self.federation.strategy).client_plans:
            planners = [n for n, s in STRATEGIES.items() if s.client_plans]
            raise ValueError(
                f"pruning.budget_uplink = true applies to strategies whose clients plan "
                f"({', '.join(planners)}), not {self.federation.strategy!r}"
            )
        return self

    def strategy(self):
        """The configured strategy, ready for a federation (``cahfp.strategies``)."""
        from cahfp.strategies import get_strategy

        cls = get_strategy(self.federation.strategy)
        return cls(self.pruning, rounds=self.federation.rounds, seed=self.federation.seed)

    def profile_of(self, client_index: int) -> str:
        """The device profile of a simulated client (profiles cycle over clients)."""
        return self.clients.profiles[client_index % len(self.clients.profiles)]

    def keep_of(self, client_index: int) -> float:
        """The keep fraction of a client's fixed tier (tiers cycle over clients)."""
        return self.pruning.tiers[client_index % len(self.pruning.tiers)]

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}{shown}: {msg}" if loc else msg)
    return "; ".join(lines)


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``set_path(d, "federation.rounds", 5)``."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a table")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply dotted-key overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}); TOML files must be UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"config error{where}: {_describe(exc)}") from None
