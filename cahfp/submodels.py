"""The pruned model a client of a given keep runs, and how well it does: the submodel its
strategy's own plan cuts out of a global model for that client (``client_submodel``), with its
BatchNorm statistics measured again on the client's data as ``cahfp export`` does, scored on a
test set globally and on the client's own label distribution (``personalised_accuracy``).

Which plan is the strategy's own is asked of its ``Strategy`` object, never of its name: one
whose clients plan (``client_plans``) scores and plans on the client's data exactly as a
client's round does (``cahfp.client_round.plan_on_data``); one that plans on the coordinator
makes its ``server_plan`` for the client's record; a dense strategy (``scorer`` None) has no plan
of its own, so its clients get what an operator would export, ``cahfp export``'s default plan
(``export_plan``: curvature scores on the client's data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cahfp.client_round import plan_on_data
from cahfp.costs import training_flops
from cahfp.data import ImageData
from cahfp.errors import CAHFPError
from cahfp.pruning import Plan, PlanKnobs, build_compact, extract, make_plan, score_groups
from cahfp.strategies.base import PlannedClient, Strategy
from cahfp.training import Recipe, label_frequencies, measure_batchnorm_statistics

STATISTICS_BATCHES = 8  # cahfp export's default: batches (64 images) re-measuring BatchNorm
EXPORT_SCORER = "curvature"  # cahfp export's default scorer
DATA_SCORERS = ("curvature", "taylor")  # the export's scorers that read data


def export_plan(
    model: nn.Module,
    keep: float,
    knobs: PlanKnobs,
    example: torch.Tensor,
    data: ImageData | None = None,
    scorer: str = EXPORT_SCORER,
    batch_size: int = 32,
) -> Plan:
    """``cahfp export``'s plan of ``model`` at ``keep``: ``scorer``'s channel scores (on
    ``knobs.score_batches`` shuffled batches of ``data`` for a scorer that reads data), planned
    with the configuration's floor and multiple and every other knob at its default."""
    batches = None
    if scorer in DATA_SCORERS:
        if data is None:
            raise CAHFPError(f"the {scorer} scorer needs data to score on")
        gen = torch.Generator().manual_seed(0)
        batches = data.batches(batch_size, shuffle=True, generator=gen, augment=False)
    scores = score_groups(
        model, batches, scorer, example_input=example, num_batches=knobs.score_batches
    )
    return make_plan(model, scores, keep, floor=knobs.floor, multiple=knobs.multiple)


@dataclass
class ClientSubmodel:
    """A client's pruned model: the module (BatchNorm statistics measured on its data), its
    training FLOPs as a fraction of the dense model's, and whose plan it is."""

    module: nn.Module
    flops_fraction: float
    planner: str  # "client" | "coordinator" | "export default (curvature)"
    statistics_images: int


def client_submodel(
    strategy: Strategy,
    model: nn.Module,
    data: ImageData,
    rec: PlannedClient,
    rnd: int,
    recipe: Recipe,
    seed: int,
    example: torch.Tensor,
    knobs: PlanKnobs,
    statistics_batches: int = STATISTICS_BATCHES,
) -> ClientSubmodel:
    """The submodel of ``model`` (the global model; not modified) that ``strategy`` plans in
    round ``rnd`` for the client ``rec`` (its ``keep`` < 1) holding ``data`` (``seed``: the
    client's seed for that round; ``recipe``: the federation's), its BatchNorm statistics then
    measured on ``statistics_batches`` batches of ``data``. A dense strategy's clients get
    ``export_plan`` with ``knobs`` (the configuration's ``[pruning]`` table). A strategy that
    prunes is set up on ``model`` here unless it already was; federation-wide state it plans
    with (e.g. CA-HFP's coverage) is whatever the caller loaded into it."""
    if not 0 < rec.keep < 1:
        raise CAHFPError(f"a client submodel needs a keep in (0, 1), got {rec.keep}")
    if strategy.prunes and strategy.groups is None:
        strategy.setup(model, example)
    if strategy.client_plans:
        options = strategy.client_plan(rnd)
        if options is None:
            raise CAHFPError(f"strategy {strategy.name!r} plans on clients but gave no options")
        # rotation is how a client trains; the model a board runs keeps its best channels
        options = options.but(rotation=0.0)
        extras = strategy.side_tensors(strategy.side_names(options))
        planned = plan_on_data(
            model, data, rec.keep, options, recipe, seed=seed, round_idx=rnd, extras=extras
        )
        module, planner = planned.submodel.module, "client"
    elif strategy.prunes:
        strategy.server_plan(model, example, rec, rnd)
        if rec.index_map is None:
            raise CAHFPError(f"strategy {strategy.name!r} made no plan for {rec.keep:g}")
        module, planner = build_compact(model, rec.index_map), "coordinator"
    else:
        plan = export_plan(model, rec.keep, knobs, example, data, batch_size=recipe.batch_size)
        module, planner = extract(model, plan).module, f"export default ({EXPORT_SCORER})"
    module.eval()
    images = measure_batchnorm_statistics(module, data, statistics_batches)
    fraction = training_flops(module, example[:1]) / training_flops(model, example[:1])
    return ClientSubmodel(module, fraction, planner, images)


def personalised_accuracy(per_class: torch.Tensor, client: ImageData) -> float:
    """Accuracy on the client's own label distribution: the sum over classes of the client's
    label frequency times the per-class accuracy (``cahfp.training.per_class_accuracy``)."""
    freq = label_frequencies(client).double()
    if len(freq) != len(per_class):
        raise CAHFPError(f"{len(per_class)} per-class accuracies for {len(freq)} classes")
    held = freq > 0
    if torch.isnan(per_class[held]).any():
        raise CAHFPError("the test set has no images of a class the client holds")
    return float((freq[held] * per_class[held]).sum())


__all__ = [
    "STATISTICS_BATCHES",
    "ClientSubmodel",
    "client_submodel",
    "export_plan",
    "personalised_accuracy",
]
