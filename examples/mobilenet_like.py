"""A MobileNet-style network to use as your own model in CA-HFP Edge (docs/own-model.md).

Depthwise-separable convolutions, an inverted residual block with a residual add, and two
branches joined by a concatenation. Use it with ``model.name = "examples.mobilenet_like:build"``
(the repository root on ``PYTHONPATH``). The file imports only torch: a board needs nothing
else to build it.
"""

from __future__ import annotations

import torch
from torch import nn


def _c(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
    """Convolution, BatchNorm, ReLU6."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 projection, added to the block's input."""

    def __init__(self, channels: int, expanded: int):
        super().__init__()
        self.expand = conv_bn(channels, expanded)
        self.depthwise = conv_bn(expanded, expanded, 3, groups=expanded)
        self.project = nn.Sequential(
            nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNetLike(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = _c(32, width), _c(64, width), _c(128, width)
        self.stem = conv_bn(in_channels, c1, 3, stride=2)
        self.block = InvertedResidual(c1, 2 * c1)
        # depthwise-separable downsampling: 3x3 depthwise at stride 2, then 1x1 pointwise
        self.down = nn.Sequential(conv_bn(c1, c1, 3, stride=2, groups=c1), conv_bn(c1, c2))
        # two branches of the same input, concatenated along channels
        self.wide = nn.Sequential(conv_bn(c2, c2, 3, groups=c2), conv_bn(c2, c2))
        self.narrow = conv_bn(c2, c2 // 2)
        self.head = nn.Sequential(
            conv_bn(c2 + c2 // 2, c2 + c2 // 2, 3, stride=2, groups=c2 + c2 // 2),
            conv_bn(c2 + c2 // 2, c3),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = self.down(x)
        x = torch.cat([self.wide(x), self.narrow(x)], dim=1)
        x = self.head(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """The builder CA-HFP Edge calls: ``build(num_classes=..., in_channels=..., width=...)``."""
    return MobileNetLike(num_classes, in_channels, width)
