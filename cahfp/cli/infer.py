"""``cahfp infer``: classify images with an exported model (onnxruntime only)."""

from __future__ import annotations

import argparse
import sys

from cahfp.errors import CAHFPError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="classify images with an exported model (onnxruntime only)")
    p.add_argument("model", help="an .onnx file written by cahfp")
    p.add_argument("inputs", nargs="*", help="PNG/JPEG images or .npy batches")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse images whose size or channels differ from the model input (default: "
        "convert to grey/RGB and resize them, with a note on stderr)",
    )
    p.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)  # now the default
    p.add_argument("--benchmark", action="store_true", help="print latency and throughput")
    p.add_argument("--batch", type=int, default=32, help="benchmark batch size")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda", "tensorrt"],
        default="cpu",
        help="onnxruntime execution provider (cuda and tensorrt need onnxruntime-gpu)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cahfp.inference import OnnxClassifier

    if not args.inputs and not args.benchmark:
        raise CAHFPError(
            "nothing to do: give images or .npy batches to classify "
            "(cahfp infer MODEL IMAGE...), or --benchmark"
        )
    clf = OnnxClassifier(args.model, threads=args.threads, provider=args.provider)
    if not clf.verified:
        print(
            f"note: {args.model} carries no weights digest (exported before digests); "
            "its integrity is not checked",
            file=sys.stderr,
        )
    if args.benchmark:
        if clf.metadata.get("cahfp.quantization") and not int8_dot_product():
            print(
                "note: this ARM CPU has no dot-product instructions (asimddp, e.g. the "
                "Raspberry Pi 4's Cortex-A72): INT8 can be slower than float32 here; compare "
                "with the float export",
                file=sys.stderr,
            )
        for batch in dict.fromkeys([1, args.batch]):
            b = clf.benchmark(batch, iterations=args.iterations)
            print(
                f"batch {batch:>3}: p50 {b['p50_ms']:.3f} ms, p95 {b['p95_ms']:.3f} ms, "
                f"{b['throughput']:.1f} images/s"
            )
    for pred in clf.classify(args.inputs, args.top_k, strict=args.strict):
        if pred.note:
            print(f"note: {pred.note}", file=sys.stderr)
        labels = ", ".join(f"{label} {p:.3f}" for label, p in pred.top)
        print(f"{pred.source}: {labels}")
    return 0


def int8_dot_product(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """False on an ARM CPU without the dot-product extension (``asimddp`` among the features
    of ``cpuinfo``, default /proc/cpuinfo), where onnxruntime's INT8 kernels lose their
    advantage; True elsewhere (``machine``, default this one's)."""
    import platform
    from pathlib import Path

    machine = (machine or platform.machine()).lower()
    if machine not in ("aarch64", "arm64", "armv7l", "armv8l"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return "asimddp" in cpuinfo.split()
