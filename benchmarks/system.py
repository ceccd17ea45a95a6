"""How the system's cost grows with its work, measured against the physical limits, in one run.

1. Local training step time of the compact submodel vs dense at keep 0.75 / 0.5 / 0.25 (VGG,
   ResNet): speed-up as a fraction of the ideal 1 / FLOPs fraction.
2. Uplink and downlink bytes per round vs the ideal (bytes of the kept parameters alone).
3. Scoring (curvature scores + planning + extraction) time as a fraction of local training time
   for the default recipe.
4. Coordinator scale: 10, 100, 1000 lightweight clients (real MQTT connections answering with
   valid random submodels of a 1M-parameter model) through one mosquitto, one round each.
5. Coordinator evaluation and checkpoint time per round vs aggregation time.

    python -m benchmarks.system            # writes benchmarks/results/system.md
    python -m benchmarks.system --quick
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import env_line, environment, md_table, write_results
from benchmarks.swarm import MAX_CLIENTS
from cahfp.config import PruningConfig
from cahfp.costs import flop_counter, training_flops
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.pruning.extract import slice_tensor
from cahfp.wire import encode_state, encode_update

KEEPS = (0.75, 0.5, 0.25)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="vgg11:1.0:3:32,resnet18:0.5:3:32,vgg11:0.25:1:28,resnet20:0.5:1:28"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--repeats", type=int, default=3, help="independent timings of each pair (median shown)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scale", default="10,100,1000")
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.scale, args.repeats = "vgg11:0.25:1:28", 3, "10", 1
    return args


def models(args):
    for spec in args.models.split(","):
        name, width, c, size = spec.split(":")
        yield name, float(width), int(c), int(size)


def _stepper(module, x, y):
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    module.train()

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    return step


BURSTS = 10  # alternations between the timed models


def interleaved_medians(runners, steps: int) -> list[float]:
    """Median seconds of each runner (a timed step), measured in alternating bursts so that all
    see the same machine conditions (a shared host's speed drifts by 20 % within a minute;
    timing one model after the other turns that drift into the ratio)."""
    times: list[list[float]] = [[] for _ in runners]
    per = max(1, steps // BURSTS)
    for _ in range(BURSTS):
        for run, ts in zip(runners, times, strict=True):
            ts += [run() for _ in range(per)]
    return [statistics.median(ts) for ts in times]


def interleaved_step_times(modules, x, y, steps: int) -> list[float]:
    """Median training-step seconds of each module on the same batch, interleaved."""
    return interleaved_medians([_stepper(m, x, y) for m in modules], steps)


def conv_runner(module, x, input_grad: bool = False):
    """A timed runner (seconds) that runs forward and backward of every Conv2d of ``module`` on
    its own, at the input shape it sees in the model, and the training FLOPs that costs: the
    convolution kernels' part of a step, without the rest of the model. The first layer's input
    (the image) needs no gradient unless ``input_grad``."""
    shapes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: shapes.append((m, i[0].shape, o.shape)))
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(x)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    # the first layer's input is the image, which needs no gradient
    work = [
        (
            copy.deepcopy(m),
            torch.randn(i, generator=gen).requires_grad_(n > 0 or input_grad),
            torch.randn(o, generator=gen),
        )
        for n, (m, i, o) in enumerate(shapes)
    ]

    def run() -> float:
        t0 = time.perf_counter()
        for conv, inp, grad in work:
            conv(inp).backward(grad)
        return time.perf_counter() - t0

    with flop_counter() as counter:
        run()
    for _ in range(2):
        run()
    return run, counter.get_total_flops()


KERNEL_LAYERS = ((8, 28), (16, 14), (32, 7))  # ResNet-20 x0.5's stages (channels, side) on FMNIST


def part_kernels(args) -> list[dict]:
    """One 3x3 convolution of a layer's shape (c -> c channels, batch ``args.batch``), forward
    and backward, at fractions of the layer's width: the time the kernel takes against the
    FLOPs it does."""
    rows = []
    for width, side in KERNEL_LAYERS:
        counts = sorted({max(1, round(width * f)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)})
        runners = [
            conv_runner(
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                torch.zeros(args.batch, c, side, side),
                input_grad=True,
            )
            for c in counts
        ]
        times = interleaved_medians([r for r, _ in runners], args.steps)
        for c, t in zip(counts, times, strict=True):
            rows.append(
                {
                    "width": width,
                    "side": side,
                    "channels": c,
                    "ms": t * 1e3,
                    "flops": (c / width) ** 2,
                    "time": t / times[-1],
                }
            )
    return rows


def fixed_step_share(model, x, y, steps: int) -> float:
    """The share of a training step that does not shrink with the work: from step times at
    batch 2 and at the full batch, ``t(b) = fixed + b * per_sample`` solved for ``fixed`` (op
    dispatch, allocation, the optimizer's per-tensor loop), over the full step. Pruning cannot
    remove it, so it bounds the speed-up of small models."""
    t2, tb = interleaved_medians([_stepper(model, x[:2], y[:2]), _stepper(model, x, y)], steps)
    per_sample = max(tb - t2, 0.0) / (len(x) - 2)
    return min(max(t2 - 2 * per_sample, 0.0), tb) / tb


def plans(model, x, y) -> dict[str, dict[float, object]]:
    """CA-HFP plans (global allocation) and, from the same scores, uniform plans per keep."""
    scores = score_groups(model, [(x, y)], "curvature")
    return {
        a: {k: make_plan(model, scores, k, allocation=a) for k in KEEPS}
        for a in ("global", "uniform")
    }


def part_training_and_bytes(args) -> tuple[list, list]:
    speed, wire = [], []
    for name, width, c, size in models(args):
        gen = torch.Generator().manual_seed(0)
        model = build_model(name, 10, c, width, seed=0)
        x = torch.randn(args.batch, c, size, size, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        dense_f = training_flops(model, x[:1])
        label = f"{name} x{width:g} ({c}x{size}x{size})"
        torch.manual_seed(0)  # scoring draws from the global generator
        by_allocation = plans(model, x, y)
        fixed = fixed_step_share(model, x, y, args.steps)
        for keep, plan in by_allocation["global"].items():
            sub = extract(model, plan)
            uni = extract(model, by_allocation["uniform"][keep]).module
            frac = training_flops(sub.module, x[:1]) / dense_f
            uni_frac = training_flops(uni, x[:1]) / dense_f
            # the ratio moves by several points between timings of the same pair on a shared
            # host: time it ``repeats`` times, keep the median timing and the range
            timings = sorted(
                (
                    interleaved_step_times([model, sub.module, uni], x, y, args.steps)
                    for _ in range(max(1, args.repeats))
                ),
                key=lambda ts: ts[0] / ts[1],
            )
            dense_t, t, uni_t = timings[len(timings) // 2]
            spread = [ts[0] / ts[1] * frac for ts in timings]
            (dense_convs, dense_cf), (convs, cf) = conv_runner(model, x), conv_runner(sub.module, x)
            dense_ct, ct = interleaved_medians([dense_convs, convs], args.steps)
            speed.append(
                {
                    "model": label,
                    "keep": keep,
                    "flops": frac,
                    "dense_ms": dense_t * 1e3,
                    "ms": t * 1e3,
                    "speedup": dense_t / t,
                    "of_ideal": dense_t / t * frac,
                    "of_ideal_range": [min(spread), max(spread)],
                    "uniform_of_ideal": dense_t / uni_t * uni_frac,
                    "fixed_share": fixed,
                    # the convolutions alone, each on its own: how far the kernels themselves
                    # turn fewer FLOPs into less time
                    "conv_flops": cf / dense_cf,
                    "conv_of_ideal": dense_ct / ct * cf / dense_cf,
                    # vs the best speed-up with the fixed share kept and the rest scaled by FLOPs
                    "of_bound": dense_t / t * (fixed + (1 - fixed) * frac),
                }
            )
            compact = sub.module.state_dict()
            params = sum(p.numel() * p.element_size() for p in sub.module.parameters())
            g = model.state_dict()
            sliced = {k: slice_tensor(v, sub.index_map.get(k, {})) for k, v in g.items()}

            def sizes(state, meta, imap=sub.index_map) -> list[int]:
                """Encoded bytes with and without the BatchNorm statistics."""
                return [len(encode_update(state, imap, meta, statistics=s)) for s in (True, False)]

            up = sizes(compact, {"round": 1, "client": "x"})
            down = sizes(sliced, {"keep_achieved": plan.flops_fraction})
            buffers = sum(b.numel() * b.element_size() for b in sub.module.buffers())
            wire.append(
                {
                    "model": label,
                    "keep": keep,
                    "param_bytes": params,
                    "up": up[0],
                    "down": down[0],
                    "buffers": buffers,
                    "up_overhead": up[0] / params - 1,
                    "down_overhead": down[0] / params - 1,
                    "lean_up": up[1],
                    "lean_up_overhead": up[1] / params - 1,
                    "lean_down_overhead": down[1] / params - 1,
                }
            )
        dense_params = sum(p.numel() * 4 for p in model.parameters())
        full = len(encode_update(model.state_dict(), {}))  # the dense model, both ways
        wire.append(
            {
                "model": label,
                "keep": 1.0,
                "param_bytes": dense_params,
                "up": full,
                "down": full,
                "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
                "up_overhead": full / dense_params - 1,
                "down_overhead": full / dense_params - 1,
                # a dense update always carries its statistics
                "lean_up": full,
                "lean_up_overhead": full / dense_params - 1,
                "lean_down_overhead": full / dense_params - 1,
            }
        )
        print(f"{label}: training speed-ups and bytes measured", flush=True)
    return speed, wire


SCORING_SAMPLES = (1000, 6000)


def part_scoring(args) -> list[dict]:
    """Default recipe: 1 epoch of batch 32 over a client's 1000 or 6000 samples at keep 0.5,
    plus scoring (4 batches of 32 on the dense model), planning and extraction."""
    from cahfp.data import load_dataset
    from cahfp.training import Recipe, train

    full = load_dataset("fmnist", "train", args.data_dir)
    out = []
    for (name, width), n in itertools.product(
        (("vgg11", 0.25), ("resnet20", 0.5), ("vgg11", 0.5)), SCORING_SAMPLES
    ):
        data = full.subset(range(n))
        model = build_model(name, 10, 1, width, seed=0)
        gen = torch.Generator().manual_seed(0)
        batches = data.batches(32, shuffle=True, generator=gen)
        # warm-up: the first call of each step pays one-time costs (group tracing, allocator)
        warm = score_groups(model, list(data.subset(range(64)).batches(32)), "curvature")
        extract(model, make_plan(model, warm, 0.5))
        t0 = time.perf_counter()
        scores = score_groups(model, batches, "curvature", num_batches=4)
        t1 = time.perf_counter()
        plan = make_plan(model, scores, 0.5)
        t2 = time.perf_counter()
        sub = extract(model, plan)
        t3 = time.perf_counter()
        res = train(sub.module, data, Recipe(epochs=1, batch_size=32), seed=0)
        out.append(
            {
                "model": f"{name} x{width:g}",
                "samples": n,
                "score_s": t1 - t0,
                "plan_s": t2 - t1,
                "extract_s": t3 - t2,
                "train_s": res.seconds,
                "fraction": (t3 - t0) / res.seconds,
            }
        )
    return out


def part_scale(args) -> list[dict]:
    """One coordinator round with N swarm clients; the coordinator in its own process."""
    from coordinator.broker import EmbeddedBroker

    rows = []
    with EmbeddedBroker("mosquitto") as broker, tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.scale.split(",")]:
            fed = f"scale{n}"
            cfg = Path(tmp) / f"{fed}.toml"
            cfg.write_text(
                f'[federation]\nname = "{fed}"\nrounds = 1\nclients = {n}\ndeadline_s = 900\n'
                'strategy = "fedavg"\nmin_updates = 1\n'
                '[model]\nname = "vgg11"\nwidth = 0.33\n'
                f'[data]\ndataset = "fmnist"\neval_samples = 1000\n'
                + (f'data_dir = "{args.data_dir}"\n' if args.data_dir else "")
            )
            swarms = []  # several processes: see benchmarks.swarm.MAX_CLIENTS
            for k in range(0, n, MAX_CLIENTS):
                swarms.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.swarm",
                            "--broker",
                            broker.url,
                            "--federation",
                            fed,
                            "--clients",
                            str(min(MAX_CLIENTS, n - k)),
                            "--prefix",
                            f"v{k // MAX_CLIENTS}-",
                            "--width",
                            "0.33",
                        ],
                        stdout=subprocess.PIPE,
                        stderr=open(Path(tmp) / f"swarm-{fed}-{k}.log", "w"),  # noqa: SIM115
                        text=True,
                    )
                )
            for swarm in swarms:
                line = swarm.stdout.readline()
                if "swarm ready" not in line:
                    swarm.kill()
                    logs = "".join(p.read_text()[-2000:] for p in Path(tmp).glob("swarm-*.log"))
                    raise RuntimeError(f"swarm did not start: {line} {logs}")
            run = Path(tmp) / fed
            t0 = time.perf_counter()
            coord = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cahfp.cli",
                    "coordinator",
                    "--broker",
                    broker.url,
                    "--config",
                    str(cfg),
                    "--out",
                    str(run),
                    "--registration-timeout",
                    "300",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(coord.pid, 0)
            coord.returncode = status
            wall = time.perf_counter() - t0
            for swarm in swarms:
                swarm.terminate()
                swarm.wait(60)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rec = lines[-1]
            oks = sum(c["status"] == "ok" for c in rec["clients"])
            rows.append(
                {
                    "clients": n,
                    "aggregated": rec["aggregated"],
                    "ok": oks,
                    "round_s": rec["seconds"],
                    "aggregate_s": rec["aggregate_seconds"],
                    "eval_s": rec["eval_seconds"],
                    "calibration_s": rec.get("calibration_seconds", 0.0),
                    "calibrated": sum(c.get("calibration") == "ok" for c in rec["clients"]),
                    "dense": sum((c.get("keep_achieved") or 0) >= 1 for c in rec["clients"]),
                    "cpu_round_s": rec["cpu_seconds"],
                    "cpu_per_update_ms": rec["cpu_seconds"] / max(rec["aggregated"], 1) * 1e3,
                    "updates_per_s": rec["aggregated"] / max(rec["seconds"], 1e-9),
                    # the coordinator's own high-water mark (its rusage counts this process's
                    # memory at the fork that started it)
                    "peak_rss_mb": rec["peak_rss_mb"],
                    "inbox_memory_mb": rec["transport"].get("inbox_peak_memory_mb", 0.0),
                    "spooled_mb": rec["transport"].get("inbox_peak_on_disk_mb", 0.0),
                    "process_wall_s": wall,
                    "process_cpu_s": usage.ru_utime + usage.ru_stime,
                }
            )
            print(f"scale {n}: {rows[-1]}", flush=True)
    return rows


def part_checkpoint() -> dict:
    from coordinator.records import atomic_write

    model = build_model("vgg11", 10, 1, 0.33, seed=0)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for _ in range(5):
            atomic_write(Path(tmp) / "g.safetensors", encode_state(model.state_dict(), {}))
        return {
            "params": params,
            "checkpoint_s": (time.perf_counter() - t0) / 5,
            "model_mb": params * 4 / 1e6,
        }


def report(args, env, seconds, speed, kernels, wire, scoring, scale, ck) -> str:
    cmd = "python -m benchmarks.system" + (" --quick" if args.quick else "")
    period = PruningConfig().refresh_period
    lines = [
        "# System performance and scale",
        "",
        f"Measured {env_line(env)}; run {seconds / 60:.1f} min. Reproduce: `{cmd}`.",
        "",
        "## 1. Training step: compact submodel vs dense",
        "",
        f"Median of {max(1, args.steps // BURSTS) * BURSTS} SGD steps per model "
        f"(batch {args.batch}) after warm-up, the dense and the "
        "pruned models timed in alternating bursts (so that drift in the shared host's speed "
        f"cancels out of the ratio). Each pair is timed {args.repeats} times: the row shows the "
        "timing with the median `of ideal`, and `range` the lowest and highest of them (on "
        "this shared host the ratio moves by several points between timings). Plans by the "
        "CA-HFP planner (curvature scores on random "
        "inputs, global allocation). `of ideal` = speed-up x training-FLOPs fraction (1.0 = time "
        "falls with FLOPs). `uniform` = the same for a plan that keeps the same fraction of every "
        "layer (same budget): the share of the loss that comes from the global plan's shape "
        "rather than from the model's size. `fixed share`: the part of the dense model's step "
        "that does not shrink with the work (op dispatch, allocation, the optimizer's loop over "
        "tensors), estimated from step times at batch 2 and at the full batch "
        "(`t(b) = fixed + b x per-sample`); `of bound` = speed-up / the best speed-up with that "
        "part kept and the rest scaled by FLOPs, `1 / (fixed + (1 - fixed) x FLOPs)`. "
        "`convs alone`: the same ratio for the model's convolutions only, each run forward and "
        "backward on its own at the input shape it has in the model (dense and pruned timed in "
        "alternating bursts, FLOPs counted by FlopCounterMode): how far this host's "
        "convolution kernels turn fewer channels into less time. Below 1 the kernels "
        "themselves do not scale (narrow layers run below the vector width and lose "
        "efficiency), which no plan that is budgeted in FLOPs can recover. Target ≥ 0.7.",
        "",
        md_table(
            [
                "model",
                "keep",
                "train FLOPs",
                "dense ms",
                "pruned ms",
                "speed-up",
                "of ideal",
                "range",
                "uniform: of ideal",
                "fixed share",
                "of bound",
                "convs alone: of ideal",
            ],
            [
                [
                    r["model"],
                    f"{r['keep']:g}",
                    f"{r['flops']:.3f}",
                    f"{r['dense_ms']:.1f}",
                    f"{r['ms']:.1f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['of_ideal']:.2f}",
                    "{:.2f}-{:.2f}".format(*r["of_ideal_range"]),
                    f"{r['uniform_of_ideal']:.2f}",
                    f"{r['fixed_share']:.0%}",
                    f"{r['of_bound']:.2f}",
                    f"{r['conv_of_ideal']:.2f}",
                ]
                for r in speed
            ],
        ),
        "",
        "**The convolution kernels at narrow widths.** One 3x3 convolution of each of "
        "ResNet-20 x0.5's layer shapes on 28x28 inputs (c -> c channels, batch "
        f"{args.batch}, forward and backward, timed in alternating bursts) with fewer "
        "channels: `time` is its step time over the full layer's, `FLOPs` its FLOPs over the "
        "full layer's. Where `time` stays far above `FLOPs`, removing channels from such a "
        "layer saves FLOPs but little time on this host.",
        "",
        md_table(
            ["layer (channels, side)", "channels kept", "FLOPs", "time", "ms"],
            [
                [
                    f"{r['width']} x {r['side']}x{r['side']}",
                    str(r["channels"]),
                    f"{r['flops']:.3f}",
                    f"{r['time']:.2f}",
                    f"{r['ms']:.2f}",
                ]
                for r in kernels
            ],
        ),
        "",
        "## 2. Bytes on the wire vs the kept parameters alone",
        "",
        "`up`: the client's update (compact tensors + index map + header); `down`: the slice "
        "the coordinator sends between plan refreshes (keep 1.0: the dense state). "
        "`statistics`: the BatchNorm running statistics (buffers, not parameters). "
        "`with statistics`: what travels in a round where no participant trains the dense "
        "model (the aggregate then needs the pruned clients' statistics); `framing` is the "
        "header and index tables alone. `default`: a round with a dense participant, where "
        "pruned clients leave the statistics out (`aggregation.omit_pruned_stats`, "
        "docs/protocol.md; a dense update always carries them). Target: overhead ≤ 2 %.",
        "",
        md_table(
            [
                "model",
                "keep",
                "param bytes",
                "statistics",
                "with statistics: up",
                "down",
                "framing",
                "default: up bytes",
                "up overhead",
                "down overhead",
            ],
            [
                [
                    r["model"],
                    f"{r['keep']:g}",
                    f"{r['param_bytes']:,}",
                    f"{r['buffers']:,}",
                    f"{r['up_overhead']:+.2%}",
                    f"{r['down_overhead']:+.2%}",
                    f"{(r['up'] - r['param_bytes'] - r['buffers']) / r['param_bytes']:+.2%}",
                    f"{r['lean_up']:,}",
                    f"{r['lean_up_overhead']:+.2%}",
                    f"{r['lean_down_overhead']:+.2%}",
                ]
                for r in wire
            ],
        ),
        "",
        "## 3. Scoring vs local training (default recipe)",
        "",
        "One client with 1000 or 6000 Fashion-MNIST images (6000: FMNIST over 10 clients), "
        "keep 0.5: curvature scoring on 4 batches of 32 (dense model), planning, extraction, "
        "then 1 epoch of training (batch 32) of the submodel. `refresh round` = (score + plan "
        f"+ extract) / train; scoring only happens on plan-refresh rounds (every {period} "
        f"rounds by default), so `per round` = that / {period}. Target: ≤ 10 %.",
        "",
        md_table(
            [
                "model",
                "images",
                "score s",
                "plan s",
                "extract s",
                "train s",
                "refresh round",
                "per round",
            ],
            [
                [
                    r["model"],
                    str(r["samples"]),
                    f"{r['score_s']:.3f}",
                    f"{r['plan_s']:.3f}",
                    f"{r['extract_s']:.3f}",
                    f"{r['train_s']:.2f}",
                    f"{r['fraction']:.1%}",
                    f"{r['fraction'] / period:.1%}",
                ]
                for r in scoring
            ],
        ),
        "",
    ]
    if scale:
        lines += [
            "## 4. Coordinator scale (one round, 1M-parameter model)",
            "",
            f"VGG-11 x0.33 ({ck['params']:,} parameters, {ck['model_mb']:.1f} MB). Lightweight "
            "clients: real MQTT connections in separate processes (at most 250 each), each "
            "answering its task immediately with a valid random submodel (keep 0.34-1.0, one "
            "update in 8 dense) and its statistics task with valid random statistics; the "
            "coordinator (its own process) sends every client the dense model, then receives, "
            "reassembles, validates and aggregates every update, runs the statistics phase "
            "(`statistics`: clients asked of the dense participants, at most "
            "`aggregation.statistics_clients` = 8, and the phase's seconds: the dense model "
            "sent again to each, their answers validated and pooled), evaluates on 1000 images "
            "and checkpoints. `CPU/update` is the coordinator's process CPU time in the round "
            "divided by the updates; peak RSS "
            "is the coordinator process's own high-water resident memory at the end of the "
            "round (`VmHWM`; its `ru_maxrss` would also count this benchmark's memory at the "
            "fork that started it); "
            "`inbox MB` / `on disk MB`: the most received-but-unprocessed payload bytes held in "
            "memory (budget 64 MiB) and spooled to disk at once (docs/scaling.md).",
            "",
            md_table(
                [
                    "clients",
                    "aggregated",
                    "round s",
                    "updates/s",
                    "CPU s (round)",
                    "CPU/update ms",
                    "aggregation s",
                    "statistics",
                    "peak RSS MB",
                    "inbox MB",
                    "on disk MB",
                ],
                [
                    [
                        r["clients"],
                        f"{r['aggregated']} ({r['ok']} ok)",
                        f"{r['round_s']:.1f}",
                        f"{r['updates_per_s']:.1f}",
                        f"{r['cpu_round_s']:.1f}",
                        f"{r['cpu_per_update_ms']:.1f}",
                        f"{r['aggregate_s']:.2f}",
                        f"{r['calibrated']} of {r['dense']}, {r['calibration_s']:.2f} s",
                        f"{r['peak_rss_mb']:.0f}",
                        f"{r['inbox_memory_mb']:.0f}",
                        f"{r['spooled_mb']:.0f}",
                    ]
                    for r in scale
                ],
            ),
            "",
        ]
        lines += [
            "## 5. Evaluation, statistics phase and checkpoint vs aggregation",
            "",
            f"Checkpoint of the {ck['model_mb']:.1f} MB global state (safetensors, written "
            f"atomically with fsync): {ck['checkpoint_s'] * 1e3:.1f} ms. Evaluation on 1000 "
            "images, the statistics phase and aggregation per round, from the scale runs: "
            + "; ".join(
                f"{r['clients']} clients: eval {r['eval_s']:.2f} s, statistics phase "
                f"{r['calibration_s']:.2f} s ({r['calibrated']} clients), aggregation "
                f"{r['aggregate_s']:.2f} s"
                for r in scale
            )
            + ".",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    start = time.perf_counter()
    speed, wire = part_training_and_bytes(args)
    kernels = part_kernels(args)
    scoring = part_scoring(args)
    ck = part_checkpoint()
    scale = part_scale(args) if args.scale else []
    seconds = time.perf_counter() - start
    name = "system" + ("_quick" if args.quick else "")
    raw = {
        "env": env,
        "speed": speed,
        "kernels": kernels,
        "wire": wire,
        "scoring": scoring,
        "scale": scale,
        "checkpoint": ck,
    }
    path = write_results(
        name,
        report(args, env, seconds, speed, kernels, wire, scoring, scale, ck),
        raw,
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
