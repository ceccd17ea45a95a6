"""Compute and size accounting measured with torch's ``FlopCounterMode``.

FLOPs are what the counter reports for matrix products and convolutions (forward and, for
training, backward); element-wise work (BatchNorm, activations, pooling) is not counted.
Convolutions are counted with our own formula (``conv_pass_flops``): torch's backward formula
ignores ``groups`` in the weight gradient, which makes a depthwise layer of C channels cost
C + 2 forward passes of training instead of 3.
"""

from __future__ import annotations

import copy
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cahfp.device.select import model_device

aten = torch.ops.aten


def conv_pass_flops(w_shape, conv_spatial, batch: int) -> int:
    """FLOPs of one pass (forward, input gradient or weight gradient) of a convolution whose
    weight has shape ``w_shape`` (``[out, in / groups, *kernel]``, or ``[in, out / groups,
    *kernel]`` when transposed): every one of the ``batch x prod(conv_spatial)`` positions of
    the regular convolution's output (a transposed one's input) multiplies each of the
    ``out x in / groups x kernel`` weights once, 2 FLOPs per multiply-add."""
    return 2 * batch * prod(w_shape) * prod(conv_spatial)


def _conv_forward(x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, *_a, **kw):
    spatial = (x_shape if transposed else kw["out_shape"])[2:]
    return conv_pass_flops(w_shape, spatial, x_shape[0])


def _conv_backward(grad_out_shape, x_shape, w_shape, *args, **_kw) -> int:
    # args: bias sizes, stride, padding, dilation, transposed, output padding, groups, mask
    transposed, output_mask = args[4], args[7]
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    one = conv_pass_flops(w_shape, spatial, x_shape[0])
    return one * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_FORMULAS = {
    aten.convolution: _conv_forward,
    aten._convolution: _conv_forward,
    aten.convolution_backward: _conv_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that counts convolutions with ``conv_pass_flops``."""
    return FlopCounterMode(display=False, custom_mapping=_FORMULAS)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _counted(module: nn.Module, example_input: torch.Tensor, backward: bool) -> FlopCounterMode:
    model = copy.deepcopy(module)
    model.train(backward)
    x = example_input.detach().to(model_device(model))
    if x.shape[0] < 2:  # BatchNorm in train mode needs two samples
        x = x.expand(2, *x.shape[1:]).contiguous()
    counter = flop_counter()
    with counter:
        out = model(x)
        if backward:
            out.backward(torch.ones_like(out))  # the loss itself does no counted work
    counter.batch = x.shape[0]
    return counter


def forward_flops(module: nn.Module, example_input: torch.Tensor) -> float:
    """Inference FLOPs per sample (eval mode)."""
    with torch.no_grad():
        counter = _counted(module, example_input, backward=False)
    return counter.get_total_flops() / counter.batch


def training_flops(module: nn.Module, example_input: torch.Tensor) -> float:
    """Training FLOPs per sample: forward plus backward."""
    counter = _counted(module, example_input, backward=True)
    return counter.get_total_flops() / counter.batch


def training_flops_by_module(module: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """Training FLOPs per sample of every module that owns parameters, keyed by its name in
    ``module.named_modules()``.

    Each module is counted on its own, on the inputs it saw in a real forward pass, with a
    backward pass that computes exactly the gradients training computes (no input gradient for
    the first layer). FlopCounterMode's own per-module attribution is not used: it misattributes
    backward work across residual branches.
    """
    model = copy.deepcopy(module).train()
    x = example_input.detach().to(model_device(model))
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    seen: list[tuple[str, nn.Module, tuple]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, _out, name=name: seen.append((name, mod, args)))
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, float] = {}
    for name, mod, args in seen:
        inputs = tuple(
            a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        counter = flop_counter()
        with counter:
            y = mod(*inputs)
            y.backward(torch.ones_like(y))
        out[name] = out.get(name, 0.0) + counter.get_total_flops() / x.shape[0]
    return out
