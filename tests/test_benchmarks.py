"""The system benchmark's quick run: every part runs and reports consistent numbers (the full
run takes minutes and its results are committed; this keeps the code that writes them working)."""

import json


def test_system_benchmark_quick_run_reports_every_part(fmnist_root, tmp_path, broker):
    from benchmarks import system

    # ``broker``: mosquitto is installed (the benchmark starts its own)
    argv = ["--quick", "--data-dir", str(fmnist_root), "--out-dir", str(tmp_path)]
    assert system.main(argv) == 0
    raw = json.loads((tmp_path / "system_quick.json").read_text())
    md = (tmp_path / "system_quick.md").read_text()
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert section in md
    assert sorted(r["keep"] for r in raw["speed"]) == [0.25, 0.5, 0.75]
    for r in raw["speed"]:
        assert abs(r["flops"] - r["keep"]) < 0.03, r
        assert r["ms"] > 0 and r["dense_ms"] > 0 and 0 <= r["fixed_share"] < 1
        assert r["of_bound"] >= r["of_ideal"] * (1 - 1e-9)  # the bound is below the ideal
    for r in raw["wire"]:
        framing = r["up"] - r["param_bytes"] - r["buffers"]
        assert 0 < framing < 4096 and r["up_overhead"] < 0.05, r
    assert {r["samples"] for r in raw["scoring"]} == {1000, 6000}
    (scale,) = raw["scale"]
    assert scale["clients"] == scale["aggregated"] == scale["ok"] == 10
