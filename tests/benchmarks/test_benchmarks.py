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
        low, high = r["of_ideal_range"]
        assert low <= r["of_ideal"] <= high
        # the convolutions alone: a fraction of the dense convolutions' FLOPs close to the
        # whole model's (the classifier is the rest)
        assert abs(r["conv_flops"] - r["flops"]) < 0.05 and r["conv_of_ideal"] > 0, r
    kernels = raw["kernels"]
    assert {(r["width"], r["side"]) for r in kernels} == {(8, 28), (16, 14), (32, 7)}
    for r in kernels:
        assert r["ms"] > 0 and 0 < r["flops"] <= 1, r
        if r["channels"] == r["width"]:
            assert r["flops"] == r["time"] == 1.0, r
    for r in raw["wire"]:
        framing = r["up"] - r["param_bytes"] - r["buffers"]
        assert 0 < framing < 4096 and r["up_overhead"] < 0.05, r
        if r["keep"] < 1:  # without the statistics: the parameters and the framing alone
            assert r["lean_up"] - r["param_bytes"] < framing, r
        else:
            assert r["lean_up"] == r["up"], r
    assert {r["samples"] for r in raw["scoring"]} == {1000, 6000}
    (scale,) = raw["scale"]
    assert scale["clients"] == scale["aggregated"] == scale["ok"] == 10


def test_shaped_link_transfer_is_limited_by_the_link_and_cleans_up(broker):
    """The transfer benchmark's emulated-link part: a sender in its own namespace behind a
    tbf-limited veth gets both payloads through at about the link's rate, and nothing of the
    emulation is left behind."""
    import os

    from benchmarks.shaped_link import bench_link
    from deploy.testbed.emulation import sh
    from tests.conftest import missing

    if os.geteuid() != 0:
        out = bench_link(1 << 20, 1 << 18, 1, rates=(50,))
        assert "root" in out["skipped"]
        missing("the emulated link needs root")
    size = 2 * 1024 * 1024
    out = bench_link(size, 1 << 18, 1, rates=(50,))
    r = out["rates"][50]
    assert out["size"] == size
    for mode in ("raw", "protocol"):
        # 2 MiB at 50 Mbit/s take at least 0.3 s (the bucket's 64 kB burst aside)
        assert 0.3 < r["median"][mode] < 5, r
    assert 0.5 < r["ratio"] < 1.5, r
    assert "cahfp-tb" not in sh("ip", "netns", "list", check=False).stdout


def test_accelerators_quick_run_measures_int8_against_float(fmnist_root, tmp_path):
    """``python -m benchmarks.accelerators --quick``: float and INT8 rows at two keeps, the
    INT8 file a quarter of the float one, the in-process and worker-process backends timed
    (whole process trees: the workers' memory counted), and the GPU rows marked not measured
    without one."""
    import json

    from benchmarks import accelerators

    argv = ["--quick", "--data-dir", str(fmnist_root), "--out-dir", str(tmp_path)]
    assert accelerators.main(argv) == 0
    raw = json.loads((tmp_path / "accelerators_quick.json").read_text())
    assert [r["keep"] for r in raw["int8"]] == [1.0, 0.5]
    for r in raw["int8"]:
        assert r["int8_mb"] < 0.35 * r["float_mb"] and r["agreement"] > 0.9
        assert r["float_b1"] > 0 and r["int8_b32"] > 0
    inprocess, workers = raw["backends"]["rows"]
    assert "in process" in inprocess["name"] and "2 worker processes" in workers["name"]
    for r in (inprocess, workers):
        assert r["round_s"] > 0 and r["startup_s"] > 0 and 0 < r["accuracy"] <= 1
        assert r["peak_rss_mb"] >= r["peak_pss_mb"] > 100
    assert workers["processes"] >= inprocess["processes"] + 2
    md = (tmp_path / "accelerators_quick.md").read_text()
    assert "## INT8 against float32" in md and "Flower not run" in md
    gpu_measured = (accelerators.REPO / "benchmarks" / "results" / "gpu.md").is_file()
    assert ("Not measured: no GPU was lent" in md) == (not gpu_measured)


def test_the_gpu_script_runs_its_whole_path_on_a_cpu(fmnist_root, tmp_path):
    """``python -m benchmarks.gpu --device cpu --quick``: the accelerator machine's script
    (speed-up of pruned submodels, the budget model against measured training, simulation
    throughput in process with Ray's configuration checked, the CIFAR-10-sized round) on the
    CPU, small, so that it is known to run before a GPU is lent."""
    import json

    from benchmarks import gpu

    argv = ["--device", "cpu", "--quick", "--data-dir", str(fmnist_root), "--out-dir",
            str(tmp_path)]  # fmt: skip
    assert gpu.main(argv) == 0
    raw = json.loads((tmp_path / "gpu_quick.json").read_text())
    keeps = [r["keep"] for r in raw["speedup"]]
    assert keeps == [1.0, 0.5, 0.25]
    ratios = [r["flops_ratio"] for r in raw["speedup"]]
    assert ratios[0] == 1 and 0.15 < ratios[1] < 0.6 and ratios[2] < ratios[1]
    assert [r["keep"] for r in raw["budget"]] == [1.0, 0.5, 0.25]
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in raw["budget"])
    assert [r["backend"] for r in raw["throughput"]] == [
        "in process on cpu", "Ray, 2 workers on the CPU"
    ]  # fmt: skip
    assert raw["throughput"][0]["clients_per_s"] > 0
    assert raw["throughput"][1]["skipped"].startswith("not run with --quick")
    assert raw["cifar_round"]["round_s"] > 0
    assert "One round of the CIFAR-10-sized setting" in (tmp_path / "gpu_quick.md").read_text()
