"""The accuracy benchmark in pieces: a smoke piece runs what is missing (a second invocation
runs nothing), evaluates the tiers' submodels of a dense, a coordinator-planned and a
client-planned strategy, and ``--report`` merges the pieces into the table and the goal check."""

import json

import pytest


@pytest.mark.slow
def test_a_piece_runs_only_what_is_missing_and_the_report_merges_it(
    fmnist_root, tmp_path, monkeypatch, capsys
):
    from benchmarks import accuracy

    monkeypatch.setitem(accuracy.QUICK, "tier_test_samples", 500)
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--quick", "--runs-dir", str(runs), "--out-dir", str(out)]
    argv += ["--data-dir", str(fmnist_root)]
    assert accuracy.main(argv) == 0
    assert "3 of 3 runs to do" in capsys.readouterr().out
    piece = json.loads((out / "accuracy_pieces" / "vgg11-0.25-a0.5-quick.json").read_text())
    assert piece["quick"] and piece["eval_split"] == "test"
    assert piece["description"].endswith("800 training images over 10 clients, 2 rounds")
    by = {r["label"]: r for r in piece["runs"]}
    assert set(by) == {"fedavg", "heterofl", "cahfp"}
    planners = {"fedavg": "export default (curvature)", "heterofl": "coordinator"}
    for label, r in by.items():
        assert r["summary"]["rounds"] == 2 and r["commit"], r
        tiers = r["tiers"]
        assert tiers["planner"] == planners.get(label, "client")
        assert tiers["eval_images"] == 500 and tiers["plan_round"] == 3
        assert sorted(tiers["tiers"]) == ["0.2", "0.4", "0.6"]
        for keep, t in tiers["tiers"].items():
            # clients 1, 5, 9 hold keep 0.6; 2, 6 keep 0.4; 3, 7 keep 0.2
            assert len(t["clients"]) == (3 if keep == "0.6" else 2)
            for c in t["clients"]:
                assert 0 < c["flops_fraction"] <= float(keep) + 0.03, (label, keep, c)
                assert 0 <= c["global"] <= 1 and 0 <= c["personalised"] <= 1
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    md = (out / "accuracy_quick.md").read_text()
    assert "| heterofl | coordinator | 1 |" in md and "keep 0.2 personalised" in md

    assert accuracy.main(argv) == 0  # resumable: everything is there
    said = capsys.readouterr().out
    assert "0 of 3 runs to do" in said and "tier submodels of 0 runs" in said
    assert stamps == {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}

    # the report merges test-set pieces (a smoke piece stands in for the main setting here)
    piece.update(quick=False, piece="vgg11-0.25-a0.5", setting="vgg11-0.25-a0.5")
    (out / "accuracy_pieces" / "vgg11-0.25-a0.5.json").write_text(json.dumps(piece))
    assert accuracy.main(["--report", "--out-dir", str(out)]) == 0
    md = (out / "accuracy.md").read_text()
    raw = json.loads((out / "accuracy.json").read_text())
    assert set(raw["pieces"]) == {"vgg11-0.25-a0.5", "vgg11-0.25-a0.5-quick"}
    assert "## vgg11-0.25-a0.5\n" in md and "## vgg11-0.25-a0.5-quick" not in md
    check = md.split("## Target check")[1]
    assert "ahead of every other pruning strategy** " in check
    assert "0 of 4" in check and "resnet20-0.5-a0.1: not met: cahfp not run" in check
    assert "fewer than 3 seeds: cahfp (1)" in check  # one seed decides nothing
    assert "vgg11-0.25-a0.5, keep 0.2: global cahfp" in check
    gap = by["fedavg"]["summary"]["final3_accuracy"] - by["cahfp"]["summary"]["final3_accuracy"]
    assert f"{gap * 100:+.2f} points behind (target ≤ 1.5)" in check


def test_the_runs_already_made_keep_their_configuration():
    """The pieces' overrides of the 10-client settings are those the first runs were made with
    (so that finished runs count); cross-device uses every training image."""
    from benchmarks.accuracy import base_overrides, parse_args
    from cahfp.config import load_config

    args = parse_args(["--setting", "vgg11-0.25-a0.1"])
    ov = base_overrides("resnet20-0.5-a0.1", 2, args)
    assert ov == {
        "federation.name": "resnet20-a0.1-s2",
        "federation.rounds": 30,
        "federation.clients": 10,
        "federation.seed": 2,
        "model.name": "resnet20",
        "model.width": 0.5,
        "data.dataset": "fmnist",
        "data.partition": "dirichlet:0.1",
        "data.train_samples": 6000,
        "data.eval_samples": 2000,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.lr": 0.05,
        "clients.budget": "fixed-tiers",
        "pruning.tiers": [1.0, 0.6, 0.4, 0.2],
        "pruning.refresh_period": 5,
    }
    cfg = load_config(None, base_overrides("cross-device", 0, args))
    assert cfg.data.train_samples is None and cfg.federation.clients == 100
    assert cfg.federation.participation == 0.1 and cfg.federation.rounds == 100
    val = parse_args(["--setting", "cross-device", "--eval-split", "validation"])
    assert base_overrides("cross-device", 0, val)["data.eval_split"] == "validation"


def test_ablations_can_be_narrowed_to_some_variants_and_every_variant_loads():
    """``--ablations --only FIARSE`` runs the FIARSE threshold choice alone, on validation
    images; every variant's overrides make a valid configuration."""
    from benchmarks.accuracy import ABLATIONS, jobs_for, parse_args
    from cahfp.config import load_config

    args = parse_args(["--ablations", "--only", "FIARSE", "--ablation-seeds", "0,1"])
    jobs = jobs_for(args)
    assert sorted({j["label"] for j in jobs}) == [
        "reference: FIARSE, layerwise thresholds",
        "reference: FIARSE, one global threshold",
    ]
    assert len(jobs) == 4 and all(j["run_dir"].split("/")[-2] == "ablations-val" for j in jobs)
    for j in jobs_for(parse_args(["--ablations"])):
        cfg = load_config(None, j["overrides"])
        assert cfg.data.eval_split == "validation"
    assert len(ABLATIONS) == len({j["label"] for j in jobs_for(parse_args(["--ablations"]))})


def test_ablations_run_in_another_setting_in_their_own_piece():
    """``--ablation-setting vgg11-0.25-a0.1`` runs the variants under strong skew, in their own
    runs directory and piece, so a default is not chosen from the main setting alone."""
    from benchmarks.accuracy import jobs_for, parse_args, piece_name
    from cahfp.config import load_config

    args = parse_args(
        ["--ablations", "--ablation-setting", "vgg11-0.25-a0.1", "--only", "rotation"]
    )
    assert piece_name(args) == "ablations-vgg11-0.25-a0.1-val"
    jobs = jobs_for(args)
    assert {j["label"] for j in jobs} == {
        "coverage-aware rotation 0.25",
        "coverage-aware rotation 0.5",
    }
    for j in jobs:
        cfg = load_config(None, j["overrides"])
        assert cfg.data.partition == "dirichlet:0.1" and cfg.data.eval_split == "validation"
        assert cfg.pruning.rotation in (0.25, 0.5)
        assert j["run_dir"].split("/")[-2] == "ablations-vgg11-0.25-a0.1-val"
    with pytest.raises(SystemExit):
        parse_args(["--ablations", "--ablation-setting", "cross-device"])
