"""The accelerator machine's script: what `benchmarks/results/accelerators.md` reports for a GPU,
measured where the device tool lends one (under 8 minutes on one H100/H200). All from one run:

1. Training speed-up of pruned submodels on the device: VGG-11 x1 and ResNet-18 at 32x32x3,
   keep 1.0 / 0.5 / 0.25 (CA-HFP's curvature plan on one batch), SGD steps of batch 128 timed
   after warm-up (``torch.cuda.synchronize`` around them), against the ratio of training FLOPs.
2. Simulation throughput in clients per second: ``cahfp simulate`` on Fashion-MNIST (10
   clients, 10,000 images, CA-HFP with fixed tiers) in process on the device, and on Ray with
   fractional GPUs (4 workers of a quarter GPU each) when Ray is installed.
3. The budget model on the device: a client's calibration there (``calibrate``), its predicted
   training seconds and memory for one epoch at keep 1.0 / 0.5 / 0.25 (VGG-11 x0.25,
   Fashion-MNIST), against the measured seconds and, on CUDA, the peak allocated memory.
4. One round of the CIFAR-10-sized setting: ResNet-18 x1, 10 clients sharing 50,000 images of
   CIFAR-10's shape (random pixels: timing only, no accuracy is read from it), CA-HFP with
   fixed tiers, evaluation on 10,000.

    python -m benchmarks.gpu --out-dir $OUT        # on the GPU machine
    python -m benchmarks.gpu --device cpu --quick  # the same code on a CPU, small
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import env_line, environment, md_table, write_results
from cahfp.costs import training_flops
from cahfp.device.select import resolve_device
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the code path")
    args = p.parse_args(argv)
    args.models = [("vgg11", 1.0), ("resnet18", 1.0)]
    args.batch, args.steps, args.rounds, args.budget_samples = 128, 30, 3, 4000
    args.cifar_train, args.cifar_test, args.cifar_model = 50_000, 10_000, ("resnet18", 1.0)
    if args.quick:
        args.models = [("vgg11", 0.25)]
        args.batch, args.steps, args.rounds, args.budget_samples = 16, 2, 1, 200
        args.cifar_train, args.cifar_test, args.cifar_model = 400, 100, ("resnet20", 0.25)
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speedup_rows(args, device: torch.device) -> list[dict]:
    """Step time of each model's submodels at each keep, against their FLOP ratio."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    for name, width in args.models:
        model = build_model(name, 10, 3, width, seed=0)
        scores = score_groups(model, [(x[:32], y[:32])], "curvature", example_input=x[:1])
        dense = training_flops(model, x[:1])
        base_ms = None
        for keep in (1.0, 0.5, 0.25):
            sub = model if keep == 1 else extract(model, make_plan(model, scores, keep)).module
            flops = training_flops(sub, x[:1])
            sub = copy.deepcopy(sub).to(device).train()
            opt = torch.optim.SGD(sub.parameters(), lr=0.01, momentum=0.9)
            xb, yb = x.to(device), y.to(device)

            def step(sub=sub, opt=opt, xb=xb, yb=yb):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(sub(xb), yb).backward()
                opt.step()

            for _ in range(max(2, args.steps // 5)):  # warm-up (cuDNN picks its kernels)
                step()
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            ms = (time.perf_counter() - start) / args.steps * 1e3
            base_ms = base_ms or ms
            rows.append({"model": f"{name} x{width:g}", "keep": keep, "flops_ratio": flops / dense,
                         "step_ms": ms, "speedup": base_ms / ms})  # fmt: skip
            print(f"{name} keep {keep}: {ms:.2f} ms/step, FLOPs {flops / dense:.2f}", flush=True)
    return rows


def budget_rows(args, device: torch.device) -> list[dict]:
    """The budget model's predicted training time and memory on ``device`` against measured."""
    from cahfp.data import load_dataset
    from cahfp.device.budget import BudgetModel
    from cahfp.device.calibrate import calibrate
    from cahfp.messages import ModelSpec
    from cahfp.training import Recipe, train

    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    data = load_dataset("fmnist", "train", args.data_dir).subset(range(args.budget_samples))
    budget = BudgetModel(calibrate(spec, 32, use_cache=False, device=device))
    model = build_model("vgg11", 10, 1, 0.25, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = list(data.batches(32, shuffle=True, generator=gen, augment=False))[:4]
    scores = score_groups(model, batches, "curvature")
    rows = []
    for keep in (1.0, 0.5, 0.25):
        sub = model if keep == 1 else extract(model, make_plan(model, scores, keep)).module
        sub = copy.deepcopy(sub).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        train(sub, data, Recipe(epochs=1, batch_size=32, lr=0.02), seed=0)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({"keep": keep, "predicted_s": budget.train_seconds(keep, len(data)),
                     "measured_s": time.perf_counter() - start,
                     "predicted_mb": budget.memory(keep, 32) / 2**20,
                     "measured_mb": peak / 2**20 if peak is not None else None})  # fmt: skip
    return rows


def _simulate(overrides: dict, out: Path) -> dict:
    from cahfp.config import load_config
    from coordinator.simulation import simulate

    simulate(load_config(None, overrides), out, quiet=True)
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    seconds = sum(r["seconds"] for r in rounds)
    clients = sum(r["aggregated"] for r in rounds)
    return {"round_s": seconds / len(rounds), "clients_per_s": clients / seconds}


def throughput_rows(args, device: torch.device, tmp: Path) -> list[dict]:
    """Clients trained per second in process on the device, and on Ray with GPU shares."""
    base = {
        "federation.clients": 10, "federation.rounds": args.rounds,
        "federation.strategy": "cahfp", "clients.budget": "fixed-tiers",
        "data.train_samples": 1000 if args.quick else 10_000, "data.data_dir": args.data_dir,
        "train.device": str(device),
    }  # fmt: skip
    inprocess = _simulate({**base, "federation.backend": "inprocess"}, tmp / "inprocess")
    rows = [{"backend": f"in process on {device}", **inprocess}]
    try:
        import ray  # noqa: F401
    except ImportError:
        rows.append({"backend": "Ray", "skipped": "Ray is not installed (cahfp-edge[ray])"})
        return rows
    gpus = 0.25 if device.type == "cuda" else 0.0
    ray_cfg = {**base, "federation.backend": "ray", "federation.workers": 4 if gpus else 2,
               "federation.client_resources.num_gpus": gpus}  # fmt: skip
    name = "Ray, 4 workers x 0.25 GPU" if gpus else "Ray, 2 workers on the CPU"
    if args.quick:  # Ray's start costs more than the quick run; its configuration is checked
        from cahfp.config import load_config

        load_config(None, ray_cfg)
        rows.append({"backend": name, "skipped": "not run with --quick (configuration checked)"})
    else:
        rows.append({"backend": name, **_simulate(ray_cfg, tmp / "ray")})
    return rows


def cifar_round(args, device: torch.device, tmp: Path) -> dict:
    """One round of the CIFAR-10-sized setting, on synthetic images of CIFAR-10's shape."""
    from cahfp.data import datasets
    from cahfp.data.datasets import ImageData, resolve_data_dir

    root = tmp / "cifar-shaped"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", args.cifar_train), ("test", args.cifar_test)):
        datasets._CACHE[("cifar10", split, str(resolve_data_dir(root)), None, None)] = ImageData(
            images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            targets=torch.randint(0, 10, (n,), generator=gen),
            classes=[f"class{i}" for i in range(10)],
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            name="cifar10 (synthetic, timing only)",
            augment=split == "train",
        )
    name, width = args.cifar_model
    out = _simulate(
        {"federation.clients": 10, "federation.rounds": 1, "federation.strategy": "cahfp",
         "clients.budget": "fixed-tiers", "data.dataset": "cifar10", "data.data_dir": str(root),
         "data.eval_samples": args.cifar_test, "model.name": name, "model.width": width,
         "train.device": str(device), "federation.backend": "inprocess"},
        tmp / "cifar",
    )  # fmt: skip
    return {"model": f"{name} x{width:g}", "train_images": args.cifar_train, **out}


def report(speed, budget, throughput, cifar, env, seconds, args) -> str:
    cmd = "python -m benchmarks.gpu" + (" --device cpu --quick" if args.quick else "")
    speed_table = [[r["model"], f"{r['keep']:g}", f"{r['flops_ratio']:.2f}",
                    f"{r['step_ms']:.2f}", f"{r['speedup']:.2f}x",
                    f"{1 / r['flops_ratio']:.2f}x"] for r in speed]  # fmt: skip
    budget_table = [[f"{r['keep']:g}", f"{r['predicted_s']:.2f}", f"{r['measured_s']:.2f}",
                     f"{r['measured_s'] / r['predicted_s']:.2f}", f"{r['predicted_mb']:.0f}",
                     "-" if r["measured_mb"] is None else f"{r['measured_mb']:.0f}"]
                    for r in budget]  # fmt: skip
    sim_table = [[r["backend"], f"{r['round_s']:.2f}", f"{r['clients_per_s']:.2f}"]
                 if "skipped" not in r else [r["backend"], "-", r["skipped"]]
                 for r in throughput]  # fmt: skip
    budget_headers = ["keep", "predicted s", "measured s", "measured / predicted",
                      "predicted MB", "measured MB"]  # fmt: skip
    speed_headers = ["model", "keep", "FLOPs vs dense", "ms per step", "speed-up",
                     "FLOP-ratio speed-up"]  # fmt: skip
    lines = [
        f"Measured on {env['gpu']}, {env_line(env)}; {seconds:.0f} s. Reproduce: `{cmd}`.",
        "",
        f"Training step of batch {args.batch} at 32x32x3 (SGD, momentum):",
        "",
        md_table(speed_headers, speed_table),
        "",
        f"The budget model on this device (VGG-11 x0.25, one epoch of {args.budget_samples} "
        "Fashion-MNIST images, batch 32; memory: peak allocated on CUDA):",
        "",
        md_table(budget_headers, budget_table),
        "",
        "Simulation throughput (Fashion-MNIST, 10 clients, CA-HFP, fixed tiers):",
        "",
        md_table(["backend", "s per round", "clients per s"], sim_table),
        "",
        f"One round of the CIFAR-10-sized setting ({cifar['model']}, 10 clients sharing "
        f"{cifar['train_images']} images of CIFAR-10's shape, random pixels, timing only): "
        f"{cifar['round_s']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    env = environment()
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    start = time.perf_counter()
    speed = speedup_rows(args, device)
    budget = budget_rows(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        throughput = throughput_rows(args, device, Path(tmp))
        cifar = cifar_round(args, device, Path(tmp))
    seconds = time.perf_counter() - start
    raw = {"env": env, "speedup": speed, "budget": budget, "throughput": throughput,
           "cifar_round": cifar}  # fmt: skip
    name = "gpu_quick" if args.quick else "gpu"
    path = write_results(name, report(speed, budget, throughput, cifar, env, seconds, args), raw,
                         args.out_dir)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
