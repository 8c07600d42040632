"""A width-scaled CIFAR ResNet-18: the architecture of the embedded demo model and of the
benchmarks' CIFAR-10 models (``--factory calibrate.cifar_resnet:cifar_resnet18``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTH = 16


class BasicBlock(nn.Module):
    """ResNet basic block; two ReLU call sites (after bn1 and after the residual add)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """Standard CIFAR ResNet-18 (3x3 stem, no max-pool) with channel width ``width, 2w, 4w, 8w``.

    It takes raw [0, 1] pixels (no normalisation layer), so a guard sees exactly what the
    classifier sees. There are exactly 17 ReLU call sites: the stem plus two per block.
    """

    def __init__(self, num_classes: int = 10, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 2]
        in_ch = width
        stages = []
        for out_ch, stride in zip(channels, strides, strict=True):
            stages.append(
                nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))
            )
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def cifar_resnet18(num_classes: int = 10, width: int = DEFAULT_WIDTH) -> CifarResNet18:
    """Factory referenced by name (``calibrate.cifar_resnet:cifar_resnet18``) in model specs."""
    return CifarResNet18(num_classes=num_classes, width=width)
