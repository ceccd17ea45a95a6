"""CIFAR-style ResNets: 3x3 stem, no max-pool, global average pooling.

``resnet18`` is the CIFAR ResNet-18 of kuangliu/pytorch-cifar (11,173,962 parameters at width 1,
3 input channels, 10 classes). ``resnet20`` is the thin 16-32-64 ResNet of He et al. (2016),
with 1x1-convolution projection shortcuts (option B) where the shape changes, because the
zero-padding shortcut (option A) is not a layer that channel pruning can follow.
"""

from __future__ import annotations

from torch import nn

from cahfp.models.registry import register_model, scaled


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        stages: list[tuple[int, int, int]],
        stem: int,
        num_classes: int,
        in_channels: int,
        width: float,
    ):
        """``stages``: (channels, blocks, first stride) per stage, before the width multiplier."""
        super().__init__()
        planes = scaled(stem, width)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        layers = []
        for channels, blocks, stride in stages:
            out = scaled(channels, width)
            blocks_ = []
            for i in range(blocks):
                blocks_.append(BasicBlock(planes, out, stride if i == 0 else 1))
                planes = out
            layers.append(nn.Sequential(*blocks_))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.classifier(self.pool(out).flatten(1))


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, width: float) -> ResNet:
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return ResNet(stages, 64, num_classes, in_channels, width)


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int, width: float) -> ResNet:
    stages = [(16, 3, 1), (32, 3, 2), (64, 3, 2)]
    return ResNet(stages, 16, num_classes, in_channels, width)
