"""The system benchmark's Markdown report."""

from __future__ import annotations

from benchmarks.common import env_line, md_table
from benchmarks.system.timing import (
    BURSTS,
)
from cahfp.config import PruningConfig


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
                        f"{r['measured_statistics']} of {r['dense']}, {r['statistics_s']:.2f} s",
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
                f"{r['statistics_s']:.2f} s ({r['measured_statistics']} clients), aggregation "
                f"{r['aggregate_s']:.2f} s"
                for r in scale
            )
            + ".",
            "",
        ]
    return "\n".join(lines)
