"""ResNet-18 on CIFAR-10 (Section 5.3, Figure 4; hyper-parameters in Table 9).

The CIFAR variant of ResNet-18 (He et al., 2016): a 3x3 stride-1 stem and no
max-pool (32x32 inputs are too small for the ImageNet 7x7/2 stem + pool), then
four stages of two BasicBlocks with 64/128/256/512 channels, global average
pool and a linear layer: 11,173,962 parameters. `width` scales the channels
(64 is ResNet-18; smaller widths are for quick tests only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adashift_pl.data.vision import CIFAR10DataModule
from adashift_pl.errors import UserError
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer

DESCRIPTION = "CIFAR-10 ResNet-18, CIFAR stem (paper Fig. 4, Table 9)"
MONITOR = ("val/acc", "max")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # projection shortcut (option B of He et al.)
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18CIFAR(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, in_ch = [], width
        for i, n in enumerate(blocks):
            out_ch = width * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(in_ch, out_ch, stride=2 if i > 0 and j == 0 else 1))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class CIFAR10ResNet18(ImageClassifier):
    def __init__(self, optimizer: dict[str, Any] | None = None, width: int = 64, num_classes: int = 10,
                 channels_last: bool = False):
        super().__init__(num_classes)
        if not isinstance(width, int) or width < 1:
            raise UserError(f"invalid model.width {width!r}: a positive integer (64 is ResNet-18)")
        self.save_hyperparameters()
        self.net = ResNet18CIFAR(num_classes, width)
        self._finish_init(channels_last)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[CIFAR10ResNet18, CIFAR10DataModule]:
    return CIFAR10ResNet18(optimizer=check_optimizer(optimizer), **model), CIFAR10DataModule(**data, seed=seed)
