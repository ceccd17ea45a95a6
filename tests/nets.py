"""Small networks the tests define themselves (not in the registry)."""

import torch
from torch import nn

from examples.mobilenet_like import MobileNetLike  # noqa: F401  (the documented own-model example)


class CustomResidualNet(nn.Module):
    """Conv/Linear/BatchNorm network with residual adds (one branch without BatchNorm), a
    concatenation and a hidden linear layer, for checking that pruning is not tied to our
    models."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.plain = nn.Conv2d(12, 12, 3, padding=1)  # residual branch, no BatchNorm
        self.b1 = nn.Conv2d(12, 20, 1, bias=False)
        self.bnb = nn.BatchNorm2d(20)
        self.b2 = nn.Conv2d(20, 12, 3, padding=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.side = nn.Conv2d(12, 6, 1)
        self.down = nn.Conv2d(18, 24, 3, padding=1, stride=2)
        self.bnd = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn(self.stem(x)))
        out = out + self.plain(out)
        out = self.relu(out + self.bn2(self.b2(self.relu(self.bnb(self.b1(out))))))
        out = torch.cat([out, self.relu(self.side(out))], dim=1)
        out = self.relu(self.bnd(self.down(out)))
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc2(self.relu(self.fc1(out)))


class TwoConvNet(nn.Module):
    """Two plain convolutions of ``channels`` channels and a linear classifier: coarse, few
    groups."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, stride=2)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class ResidualConcatNet(nn.Module):
    """``channels``-wide convolutions with a residual add (stem and block share one group) and a
    concatenation of two branches."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 48):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c))
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )
        self.left = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.right = nn.Conv2d(c, c // 2, 1, stride=2)
        self.mix = nn.Conv2d(c + c // 2, c, 3, padding=1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.body(x))
        x = torch.relu(torch.cat([self.left(x), self.right(x)], dim=1))
        x = torch.relu(self.mix(x))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)
    return model
