"""Accelerators: INT8 against float32 on this host's CPU, and, where torch sees a GPU, the
training speed-up of pruned submodels on it and one federated round there. All numbers from one
run; rows this machine cannot measure say so (a GPU row is never guessed).

INT8: VGG-11 x0.25 trained for one epoch on 6000 Fashion-MNIST images, cut to keep 1.0 / 0.5 /
0.25 by CA-HFP's planner (curvature scores, BatchNorm statistics re-measured), exported as
float32 and as static INT8 (calibrated on 256 training images); size, accuracy on the first
1000 test images, and onnxruntime latency (p50, 1 thread, batch 1 and 32; float and INT8
measured alternately so that both see the same machine state).

    python -m benchmarks.accelerators            # writes benchmarks/results/accelerators.md
    python -m benchmarks.accelerators --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import simulation_backends
from benchmarks.common import env_line, environment, md_table, write_results
from cahfp.data import load_dataset
from cahfp.data.datasets import dataset_info
from cahfp.export import export_submodel
from cahfp.inference import OnnxClassifier
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.quantize import calibration_images, onnx_accuracy
from cahfp.training import Recipe, measure_batchnorm_statistics, train

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keeps", default="1.0,0.5,0.25")
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    b = p.add_argument_group("simulation backends (benchmarks.simulation_backends)")
    b.add_argument("--no-backends", dest="backends", action="store_false")
    b.add_argument("--no-flower", dest="flower", action="store_false")
    b.add_argument("--no-ray", dest="ray", action="store_false")
    b.add_argument("--flower-venv", default=str(REPO / ".venv-flower"))
    b.add_argument("--backend-rounds", type=int, default=10)
    b.add_argument("--backend-train-samples", type=int, help="(this project's runs only)")
    b.add_argument("--repeats", type=int, default=1, help="interleaved passes")
    args = p.parse_args(argv)
    if args.quick:
        args.keeps, args.train_samples, args.test_samples, args.iterations = "1.0,0.5", 600, 200, 5
        args.backend_rounds, args.backend_train_samples = 1, 1000
        args.flower = args.ray = False
    return args


def int8_rows(args) -> list[dict]:
    """Float32 against INT8 at each keep: size, accuracy, latency."""
    train_set = load_dataset("fmnist", "train", args.data_dir).subset(range(args.train_samples))
    test = load_dataset("fmnist", "test", args.data_dir)
    info = dataset_info("fmnist")
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    train(model, train_set, Recipe(epochs=1, lr=0.02), seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batches = list(train_set.batches(32, shuffle=True, generator=gen, augment=False))[:4]
    scores = score_groups(model, batches, "curvature")
    images = calibration_images(train_set)
    rows = []
    for keep in [float(k) for k in args.keeps.split(",")]:
        sub = model
        if keep < 1:
            sub = extract(model, make_plan(model, scores, keep)).module.eval()
            measure_batchnorm_statistics(sub, train_set, 8)
        with tempfile.TemporaryDirectory() as tmp:
            fp = export_submodel(sub, info, Path(tmp) / "f.onnx", keep=keep)
            q = export_submodel(sub, info, Path(tmp) / "q.onnx", int8_images=images, keep=keep)
            row = {
                "keep": keep,
                "float_mb": fp.bytes / 1e6,
                "int8_mb": q.bytes / 1e6,
                "float_acc": onnx_accuracy(fp.path.read_bytes(), test, args.test_samples),
                "int8_acc": onnx_accuracy(q.path.read_bytes(), test, args.test_samples),
                "agreement": q.agreement,
            }
            models = {
                "float": OnnxClassifier(fp.path, threads=1),
                "int8": OnnxClassifier(q.path, threads=1),
            }
            for batch in (1, 32):
                for kind in models:
                    row[f"{kind}_b{batch}"] = []
                for _ in range(3):  # alternate, so both see the same machine state
                    for kind, clf in models.items():
                        b = clf.benchmark(batch, iterations=args.iterations)
                        row[f"{kind}_b{batch}"].append(b["p50_ms"])
                for kind in models:
                    row[f"{kind}_b{batch}"] = sorted(row[f"{kind}_b{batch}"])[1]  # median of 3
        rows.append(row)
        print(
            f"keep {keep:g}: {row['float_mb']:.2f} -> {row['int8_mb']:.2f} MB, accuracy "
            f"{row['float_acc']:.4f} -> {row['int8_acc']:.4f}, b1 {row['float_b1']:.3f} -> "
            f"{row['int8_b1']:.3f} ms, b32 {row['float_b32']:.3f} -> {row['int8_b32']:.3f} ms",
            flush=True,
        )
    return rows


def _speed_note(rows) -> str:
    slower = [
        f"keep {r['keep']:g} batch {b}"
        for r in rows
        for b in (1, 32)
        if r[f"int8_b{b}"] > r[f"float_b{b}"]
    ]
    here = (
        "INT8 is faster than float32 on this host at every keep and batch measured"
        if not slower
        else "INT8 is slower than float32 on this host at " + ", ".join(slower)
    )
    return (
        f"{here}. On ARM cores without integer dot-product instructions (the Raspberry Pi 4's "
        "Cortex-A72) INT8 is reported to run slower than float32 (not measured here: no such "
        "board), and `cahfp infer --benchmark` says so on such a CPU."
    )


def gpu_section() -> list[str]:
    """The GPU rows: ``results/gpu.md`` as the accelerator machine's script wrote it
    (``python -m benchmarks.gpu``), else what is not measured and why."""
    measured = REPO / "benchmarks" / "results" / "gpu.md"
    if measured.is_file():
        return [measured.read_text().strip()]
    return [
        "Not measured: no GPU was lent (the device tool lends an accelerator machine by chance; "
        "none was lent to the sessions so far, and this machine has none). The training "
        "speed-up of pruned submodels on CUDA, the simulation throughput on a GPU and the "
        "CIFAR-10-sized round are measured by `python -m benchmarks.gpu` on such a machine, "
        "which writes `benchmarks/results/gpu.md`; this section then shows it.",
    ]


def report(rows, backends, args, env, seconds) -> str:
    cmd = "python -m benchmarks.accelerators" + (" --quick" if args.quick else "")
    table = [
        [
            f"{r['keep']:g}",
            f"{r['float_mb']:.2f}",
            f"{r['int8_mb']:.2f} ({r['int8_mb'] / r['float_mb']:.2f})",
            f"{r['float_acc']:.4f}",
            f"{r['int8_acc']:.4f} ({(r['int8_acc'] - r['float_acc']) * 100:+.1f})",
            f"{r['agreement']:.3f}",
            f"{r['float_b1']:.3f}",
            f"{r['int8_b1']:.3f} ({r['float_b1'] / r['int8_b1']:.2f}x)",
            f"{r['float_b32']:.3f}",
            f"{r['int8_b32']:.3f} ({r['float_b32'] / r['int8_b32']:.2f}x)",
        ]
        for r in rows
    ]
    headers = [
        "keep", "float MB", "INT8 MB (ratio)", "float acc", "INT8 acc (points)",
        "top-1 agreement", "float b1 p50 ms", "INT8 b1 p50 ms (speed-up)", "float b32 p50 ms",
        "INT8 b32 p50 ms (speed-up)",
    ]  # fmt: skip
    return "\n".join(
        [
            "# Accelerators",
            "",
            f"Measured {env_line(env)}; {seconds:.0f} s. Reproduce: `{cmd}`.",
            "",
            "## INT8 against float32 (onnxruntime, CPU, 1 thread)",
            "",
            f"VGG-11 x0.25 on Fashion-MNIST ({args.train_samples} training images, one epoch), "
            f"accuracy on the first {args.test_samples} test images; INT8 is a static QDQ model "
            "with per-channel weights, activations calibrated on 256 training images "
            "(`cahfp export --quantize int8`).",
            "",
            md_table(headers, table),
            "",
            _speed_note(rows),
            "",
            "## Simulation backends on this host",
            "",
            *(simulation_backends.section(backends) if backends else ["Not run."]),
            "",
            "## GPU",
            "",
            *gpu_section(),
            "",
        ]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    env["torch_threads"] = 1
    start = time.perf_counter()
    backends = simulation_backends.run(args) if args.backends else None
    rows = int8_rows(args)
    seconds = time.perf_counter() - start
    name = "accelerators_quick" if args.quick else "accelerators"
    raw = {"env": env, "int8": rows, "backends": backends}
    path = write_results(name, report(rows, backends, args, env, seconds), raw, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
