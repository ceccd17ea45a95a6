"""Strategies are objects behind one interface; the engine holds no strategy name; one planning
options object; the renamed statistics config keys keep working with a deprecation warning."""

import ast
import json
import logging

import pytest
import torch

from cahfp.config import PruningConfig, load_config
from cahfp.errors import ConfigError, UnknownName
from cahfp.messages import TaskMessage
from cahfp.models import build_model
from cahfp.pruning import PlanKnobs, PlanOptions, make_plan, score_groups
from cahfp.strategies import STRATEGIES, CoordinatorPlanned, get_strategy, register
from coordinator.simulation import simulate
from tests.conftest import REPO
from tests.coordinator.test_federation import small_config

ENGINE_FILES = ["engine.py", "registry.py", "acceptance.py", "statistics.py", "payloads.py"]


def test_every_strategy_is_registered_with_a_description():
    assert list(STRATEGIES) == [
        "fedavg",
        "fedavg-fit",
        "heterofl",
        "fedrolex",
        "fjord",
        "fjord-kd",
        "fiarse",
        "magnitude",
        "random",
        "taylor",
        "cahfp",
    ]
    assert all(cls.description and cls.name == name for name, cls in STRATEGIES.items())
    table = (REPO / "docs" / "strategies.md").read_text()
    assert all(f"| `{name}` |" in table for name in STRATEGIES)
    readme = (REPO / "README.md").read_text().split("Strategies: ", 1)[1].split(".", 1)[0]
    assert all(f"`{name}`" in readme for name in STRATEGIES)
    with pytest.raises(UnknownName, match="unknown strategy 'nope'; known: fedavg"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match=r"federation\.strategy = 'nope': unknown strategy"):
        load_config(None, {"federation.strategy": "nope"})


@pytest.mark.parametrize("name", ENGINE_FILES)
def test_the_round_engine_holds_no_strategy_name_nor_scorer_branch(name):
    tree = ast.parse((REPO / "coordinator" / name).read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert not strings & set(STRATEGIES), strings & set(STRATEGIES)
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attributes & {"scorer", "site", "fit_only", "dense", "coverage", "anchor"}


def test_plan_defaults_live_in_one_place_and_travel_in_the_task():
    cfg = PruningConfig()
    knobs = PlanKnobs.model_fields
    assert {k: getattr(cfg, k) for k in knobs} == {k: getattr(PlanOptions(), k) for k in knobs}
    options = get_strategy("cahfp")(cfg).plan_options(1)
    assert options.refresh_period == 5 and options.amortize_scoring  # no second set of defaults
    assert options.budget_uplink and options.scorer == "curvature"
    spec = {"name": "vgg11", "width": 0.25, "num_classes": 10, "in_channels": 1, "image_size": 28}
    task = TaskMessage.model_validate_json(
        TaskMessage(
            task_id="t",
            round=1,
            client_id="c",
            model=spec,
            recipe={},
            payload="state",
            deadline_s=9,
            plan=options,
        ).model_dump_json()
    )
    assert task.plan == options
    # make_plan takes the options object; its keyword knobs override the same fields
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    scores = score_groups(model, None, "magnitude", example_input=torch.zeros(2, 1, 28, 28))
    uniform = PlanOptions(allocation="uniform", floor=0.2)
    by_options = make_plan(model, scores, 0.4, uniform)
    by_knobs = make_plan(model, scores, 0.4, allocation="uniform", floor=0.2)
    assert by_options.counts() == by_knobs.counts() != make_plan(model, scores, 0.4).counts()


@pytest.mark.parametrize(
    "old,new,value",
    [
        ("calibrate_statistics", "measure_statistics", False),
        ("calibration_batches", "statistics_batches", 5),
        ("calibration_clients", "statistics_clients", 3),
        ("calibration_deadline_s", "statistics_deadline_s", 7.0),
    ],
)
def test_renamed_statistics_keys_still_work_with_a_one_line_warning(
    old, new, value, caplog, tmp_path
):
    path = tmp_path / "old.toml"
    path.write_text(f"[aggregation]\n{old} = {json.dumps(value)}\n")
    with caplog.at_level(logging.WARNING, logger="cahfp.config"):
        cfg = load_config(path)
    assert getattr(cfg.aggregation, new) == value
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"aggregation.{old} is deprecated" in line and f"use aggregation.{new}" in line
    assert "\n" not in line
    assert old not in cfg.to_toml() and new in cfg.to_toml()


class OncePlanned(CoordinatorPlanned):
    """A strategy written for this test: L1-norm channels planned once per budget."""

    name = "once-planned-test"
    description = "L1-norm channels, planned once (test)"
    scorer = "magnitude"
    allocation = "uniform"

    def period_over(self, rec, rnd):
        return False  # the plan never changes unless the budget does


def test_a_strategy_is_one_class_and_one_registry_line(fmnist_root, tmp_path):
    register(OncePlanned)
    try:
        cfg = small_config(fmnist_root, "once-planned-test", rounds=2)
        summary = simulate(cfg, tmp_path / "run", quiet=True)
    finally:
        STRATEGIES.pop("once-planned-test")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pruned = [c for r in records[1:] for c in r["clients"] if c["keep_target"] < 1]
    assert pruned and all(c["status"] == "ok" and c["keep_achieved"] < 1 for c in pruned)
    assert summary["final_accuracy"] > summary["initial_accuracy"]
