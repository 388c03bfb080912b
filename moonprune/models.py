"""Small reference architectures: the demo CNN and tiny versions of common families.

They exist so that the demo, the tests and the benchmarks run in seconds on a CPU,
and so a user can see which shapes of model moonprune handles (plain CNN,
CIFAR-style ResNet with residual connections, MobileNet-style depthwise network,
a classifier inside ``nn.Sequential``, a bias-free classifier). Every factory
takes ``num_classes`` and ``in_channels`` keyword arguments.

Example::

    >>> import torch
    >>> from moonprune import models
    >>> models.resnet20(num_classes=10, in_channels=3)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

#: The factories of this module: a checkpoint may name these without ``--arch`` (they
#: are moonprune's own code); any other factory it names is called only when the user
#: names it on the command line (see :mod:`moonprune.trust`).
BUILTIN_FACTORIES = ("demo_cnn", "resnet8", "resnet20", "mobilenet_tiny", "mlp_biasfree")


def _conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DemoCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, CIFAR variant)."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = _conv_bn(in_channels, width)
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class MobileNetTiny(nn.Module):
    """Depthwise-separable blocks (MobileNet v1 style) with a Sequential classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(in_channels, width)]
        c = width
        for c_out, stride in ((2 * width, 2), (2 * width, 1), (4 * width, 2)):
            blocks += [
                _conv_bn(c, c, stride=stride, groups=c),
                nn.Sequential(nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()),
            ]
            c = c_out
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def demo_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DemoCNN:
    """The demo's CNN (about 100k parameters at width 32)."""
    return DemoCNN(num_classes=num_classes, in_channels=in_channels, width=width)


def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR-style ResNet-8."""
    return CifarResNet(8, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR-style ResNet-20 (about 0.27M parameters at width 16)."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, width=width)


def mobilenet_tiny(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> MobileNetTiny:
    """A MobileNet-style network with depthwise convolutions."""
    return MobileNetTiny(num_classes=num_classes, in_channels=in_channels, width=width)


def mlp_biasfree(num_classes: int = 10, in_channels: int = 1, size: int = 8) -> nn.Sequential:
    """A whole-Sequential MLP whose final classifier has no bias."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * size * size, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes, bias=False),
    )
