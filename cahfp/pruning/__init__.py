"""Structured pruning with curvature-aware scores, compact submodels and exact reconstruction.

scores = score_groups(model, batches, method="curvature", example_input=x)
plan = make_plan(model, scores, keep=0.5, example_input=x)
sub = extract(model, plan)
upd = reconstruct(sub, model.state_dict())
"""

from cahfp.pruning.extract import IndexMap, Submodel, build_compact, extract, index_map_for
from cahfp.pruning.groups import ChannelGroup, GroupSet, find_groups
from cahfp.pruning.options import PlanKnobs, PlanOptions
from cahfp.pruning.plan import ALLOCATIONS, Plan, make_plan, normalised_scores
from cahfp.pruning.reconstruct import Update, check_compact, reconstruct, reconstruct_compact
from cahfp.pruning.scores import METHODS, Scores, score_groups

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "ChannelGroup",
    "GroupSet",
    "IndexMap",
    "Plan",
    "PlanKnobs",
    "PlanOptions",
    "Scores",
    "Submodel",
    "Update",
    "build_compact",
    "check_compact",
    "extract",
    "find_groups",
    "index_map_for",
    "make_plan",
    "normalised_scores",
    "reconstruct",
    "reconstruct_compact",
    "score_groups",
]
