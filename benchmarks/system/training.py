"""Parts 1 and 2: compact vs dense step time, and the bytes of an update."""

from __future__ import annotations

import torch

from benchmarks.system.options import KEEPS, models
from benchmarks.system.timing import (
    conv_runner,
    interleaved_medians,
    interleaved_step_times,
    stepper,
)
from cahfp.costs import training_flops
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.pruning.extract import slice_tensor
from cahfp.wire import encode_update


def fixed_step_share(model, x, y, steps: int) -> float:
    """The share of a training step that does not shrink with the work: from step times at
    batch 2 and at the full batch, ``t(b) = fixed + b * per_sample`` solved for ``fixed`` (op
    dispatch, allocation, the optimizer's per-tensor loop), over the full step. Pruning cannot
    remove it, so it bounds the speed-up of small models."""
    t2, tb = interleaved_medians([stepper(model, x[:2], y[:2]), stepper(model, x, y)], steps)
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
