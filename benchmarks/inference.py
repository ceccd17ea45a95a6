"""On-device inference speed of pruned models exported to ONNX (onnxruntime, CPU).

For a VGG and a ResNet at keep 1.0 / 0.75 / 0.5 / 0.25 (training-FLOPs budgets planned by
CA-HFP's planner): forward FLOPs fraction (FlopCounterMode), ONNX file size, onnxruntime latency
with 1 and 2 threads at batch 1 and 32, the speed-up over the dense model and that speed-up as a
fraction of the ideal 1 / FLOPs fraction. All numbers from one run.

    python -m benchmarks.inference           # writes benchmarks/results/inference.md
    python -m benchmarks.inference --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import env_line, environment, md_table, write_results
from cahfp.costs import forward_flops
from cahfp.data.datasets import DatasetInfo
from cahfp.export import export_submodel
from cahfp.inference import OnnxClassifier
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups

TARGET = 0.8  # of ideal, at keep 0.5


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default="vgg11:1.0:3:32,resnet18:0.5:3:32,vgg11:0.25:1:28",
        help="NAME:WIDTH:CHANNELS:SIZE, comma-separated (default %(default)s)",
    )
    p.add_argument("--keeps", default="1.0,0.75,0.5,0.25")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.iterations = "vgg11:0.25:1:28", 5
    return args


def measure(args) -> list[dict]:
    rows = []
    keeps = [float(k) for k in args.keeps.split(",")]
    for spec in args.models.split(","):
        name, width, channels, size = spec.split(":")
        width, channels, size = float(width), int(channels), int(size)
        model = build_model(name, 10, channels, width, seed=0).eval()
        info = DatasetInfo(
            [str(i) for i in range(10)], (0.5,) * channels, (0.5,) * channels, channels, size
        )
        gen = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randn(32, channels, size, size, generator=gen),
                torch.randint(0, 10, (32,), generator=gen),
            )
            for _ in range(4)
        ]
        scores = score_groups(model, batches, "curvature")
        x1 = torch.zeros(1, channels, size, size)
        dense_fwd = forward_flops(model, x1)
        base = {}
        for keep in keeps:
            sub = model if keep >= 1 else extract(model, make_plan(model, scores, keep)).module
            sub.eval()
            fraction = forward_flops(sub, x1) / dense_fwd
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.onnx"
                exported = export_submodel(sub, info, path, keep=keep)
                row = {
                    "model": f"{name} x{width:g} ({channels}x{size}x{size})",
                    "keep": keep,
                    "flops_fraction": fraction,
                    "mb": exported.bytes / 1e6,
                }
                for threads in (1, 2):
                    clf = OnnxClassifier(path, threads=threads)
                    for batch in (1, 32):
                        b = clf.benchmark(batch, iterations=args.iterations)
                        key = (threads, batch)
                        row[f"p50_{threads}t_b{batch}"] = b["p50_ms"]
                        if keep >= 1:
                            base[key] = b["p50_ms"]
                        speedup = base[key] / b["p50_ms"]
                        row[f"speedup_{threads}t_b{batch}"] = speedup
                        row[f"ideal_{threads}t_b{batch}"] = speedup * fraction
            rows.append(row)
            print(
                f"{row['model']} keep {keep:g}: FLOPs {fraction:.3f}, {row['mb']:.2f} MB, "
                + ", ".join(
                    f"{t}t/b{b} {row[f'p50_{t}t_b{b}']:.3f} ms "
                    f"({row[f'ideal_{t}t_b{b}']:.2f} of ideal)"
                    for t in (1, 2)
                    for b in (1, 32)
                ),
                flush=True,
            )
    return rows


def report(rows, args, env, seconds) -> str:
    cmd = "python -m benchmarks.inference" + (" --quick" if args.quick else "")
    headers = ["model", "keep", "fwd FLOPs", "ONNX MB"]
    for t in (1, 2):
        for b in (1, 32):
            headers += [f"{t} thr b{b} p50 ms", "speed-up (of ideal)"]
    table = []
    for r in rows:
        line = [r["model"], f"{r['keep']:g}", f"{r['flops_fraction']:.3f}", f"{r['mb']:.2f}"]
        for t in (1, 2):
            for b in (1, 32):
                line += [
                    f"{r[f'p50_{t}t_b{b}']:.3f}",
                    f"{r[f'speedup_{t}t_b{b}']:.2f}x ({r[f'ideal_{t}t_b{b}']:.2f})",
                ]
        table.append(line)
    checks = []
    for r in rows:
        if r["keep"] == 0.5:
            fr = [r[f"ideal_{t}t_b{b}"] for t in (1, 2) for b in (1, 32)]
            checks.append(
                f"- {r['model']}: fraction of ideal at keep 0.5 is "
                f"{min(fr):.2f}-{max(fr):.2f} over the four thread/batch settings "
                + (
                    "(target 0.8 met)"
                    if min(fr) >= TARGET
                    else "(target 0.8 met in " + f"{sum(f >= TARGET for f in fr)}/4)"
                )
            )
    return "\n".join(
        [
            "# On-device inference of pruned models (onnxruntime, CPU)",
            "",
            f"Measured {env_line(env)}; run {seconds:.0f} s. Reproduce: `{cmd}`.",
            "",
            "Plans: CA-HFP planner (curvature scores on random inputs: only the channel counts "
            "matter for speed), global allocation, channel counts in multiples of 8 in layers of "
            "32 or more. `fwd FLOPs` is the forward FLOPs fraction of the dense model "
            "(FlopCounterMode); latency is the median of "
            f"{args.iterations} runs after warm-up (onnxruntime CPU provider, given intra-op "
            "threads); speed-up is dense latency / pruned latency in the same setting, and "
            "`of ideal` is speed-up x FLOPs fraction (1.0 = speed-up equals 1 / FLOPs fraction).",
            "",
            md_table(headers, table),
            "",
            "## Target (at least 0.8 of ideal at keep 0.5)",
            "",
            *checks,
            "",
            "Small models (the CPU-sized FMNIST VGG at width 0.25, 1x28x28) are dominated by "
            "per-operator overhead at batch 1, so removing channels saves less time than FLOPs "
            "there; larger models and batches approach the ideal.",
            "",
        ]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    start = time.perf_counter()
    rows = measure(args)
    seconds = time.perf_counter() - start
    name = "inference" + ("_quick" if args.quick else "")
    path = write_results(
        name, report(rows, args, env, seconds), {"env": env, "rows": rows}, args.out_dir
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
