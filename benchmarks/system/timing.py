"""Timing helpers: interleaved medians of training steps and of single convolutions."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cahfp.costs import flop_counter


def stepper(module, x, y):
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
    return interleaved_medians([stepper(m, x, y) for m in modules], steps)


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
