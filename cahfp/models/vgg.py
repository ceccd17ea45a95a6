"""VGG with BatchNorm and a CIFAR-style head (one linear classifier after global pooling).

At ``width=1`` and 3 input channels these are exactly the VGG variants of kuangliu/pytorch-cifar
(VGG-11: 9,231,114 parameters, VGG-16: 14,728,266 for 10 classes). Max-pools use ``ceil_mode`` so
28x28 inputs (Fashion-MNIST) reach 1x1 after the fifth pool just as 32x32 inputs do.
"""

from __future__ import annotations

from torch import nn

from cahfp.models.registry import register_model, scaled

CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    def __init__(self, config: list[int | str], num_classes: int, in_channels: int, width: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = scaled(int(item), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg11")
def vgg11(num_classes: int, in_channels: int, width: float) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes, in_channels, width)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int, width: float) -> VGG:
    return VGG(CONFIGS["vgg16"], num_classes, in_channels, width)
