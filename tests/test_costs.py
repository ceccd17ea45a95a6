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
