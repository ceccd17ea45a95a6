import pytest
import torch
from torch import nn

from cahfp.costs import forward_flops, param_count, training_flops, training_flops_by_module
from cahfp.models import build_model


def test_single_conv_flops_match_the_convolution_count():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.zeros(1, 3, 10, 10)
    macs = 8 * 3 * 9 * 10 * 10
    assert forward_flops(conv, x) == 2 * macs
    # first layer: backward computes the weight gradient only (the input needs none)
    assert training_flops(conv, x) == 4 * macs


def test_per_module_training_flops_add_up_to_the_total():
    for name in ("vgg11", "resnet20"):
        model = build_model(name, 10, 1, 0.25)
        x = torch.zeros(1, 1, 28, 28)
        per_module = training_flops_by_module(model, x)
        assert abs(sum(per_module.values()) - training_flops(model, x)) < 1e-6 * training_flops(
            model, x
        )
        assert all(v >= 0 for v in per_module.values())


def test_param_count_and_width():
    assert param_count(nn.Linear(4, 3)) == 15
    a = training_flops(build_model("vgg11", 10, 1, 0.25), torch.zeros(1, 1, 28, 28))
    b = training_flops(build_model("vgg11", 10, 1, 0.5), torch.zeros(1, 1, 28, 28))
    assert 3.5 < b / a < 4.1  # FLOPs grow with the square of the width


class PerGroup(nn.Module):
    """A grouped convolution computed as ``groups`` ordinary convolutions, one per group."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d):
        super().__init__()
        g = conv.groups
        cls = type(conv)
        self.convs = nn.ModuleList(
            cls(
                conv.in_channels // g,
                conv.out_channels // g,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                bias=False,
            )
            for _ in range(g)
        )

    def forward(self, x):
        parts = x.chunk(len(self.convs), dim=1)
        return torch.cat([c(p) for c, p in zip(self.convs, parts, strict=True)], dim=1)


def stock_flops(module: nn.Module, x: torch.Tensor, backward: bool, input_grad: bool) -> float:
    """torch's own FlopCounterMode (right for groups=1) on a forward (and backward) pass."""
    from torch.utils.flop_counter import FlopCounterMode

    x = x.clone().requires_grad_(input_grad)
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        if backward:
            out.backward(torch.ones_like(out))
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False), (2, 128, 28, 28)),
        (lambda: nn.Conv2d(12, 24, 3, stride=2, padding=1, groups=4, bias=False), (2, 12, 9, 9)),
        (lambda: nn.Conv2d(8, 8, 5, groups=2, bias=False), (2, 8, 11, 11)),
        (lambda: nn.ConvTranspose2d(16, 8, 3, stride=2, groups=4, bias=False), (2, 16, 7, 7)),
    ],
)
def test_grouped_convolution_flops_match_a_per_group_loop_and_the_formula(make, shape):
    conv = make()
    x = torch.zeros(shape)
    loop = PerGroup(conv)
    n, cin, cout = shape[0], conv.in_channels, conv.out_channels
    with torch.no_grad():
        y = conv(x)
    big = (x if conv.transposed else y).shape[2:]  # the spatial size each weight sweeps
    one_pass = 2 * n * cout * (cin // conv.groups) * conv.weight[0, 0].numel() * big.numel()
    assert forward_flops(conv, x) * n == one_pass == stock_flops(loop, x, False, False)
    # first layer: weight gradient only; inside a network: input gradient too
    assert training_flops(conv, x) * n == 2 * one_pass == stock_flops(loop, x, True, False)
    inner = nn.Sequential(nn.Identity(), conv)
    with_input = flop_total(inner, x.clone().requires_grad_(True))
    assert with_input == 3 * one_pass == stock_flops(loop, x, True, True)


def flop_total(module: nn.Module, x: torch.Tensor) -> float:
    from cahfp.costs import flop_counter

    with flop_counter() as counter:
        out = module(x)
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def test_depthwise_layer_costs_three_passes_of_training_not_c_plus_two():
    # the case: 3x3 depthwise, 128 channels at 28x28, inside a network
    model = nn.Sequential(
        nn.Conv2d(1, 128, 1, bias=False), nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False)
    )
    x = torch.zeros(1, 1, 28, 28)
    per_module = training_flops_by_module(model, x)
    depthwise = 2 * 128 * 9 * 28 * 28
    assert per_module["1"] == 3 * depthwise  # about 5.4 MFLOPs, not 234.8
    assert training_flops(model, x) == pytest.approx(sum(per_module.values()))
