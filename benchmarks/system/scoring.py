"""Part 3: scoring (scores, plan, extraction) time against local training time."""

from __future__ import annotations

import itertools
import time

import torch

from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups

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
