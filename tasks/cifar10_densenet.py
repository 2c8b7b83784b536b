"""DenseNet-BC (depth 100, growth rate 12) on CIFAR-10 (Section 5.3, Figure 5; hyper-parameters in Table 9).

DenseNet-BC of Huang et al. (2017) for 32x32 inputs: a 3x3 convolution to 2k
channels, three dense blocks of (depth - 4) / 6 = 16 bottleneck layers
(BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k) joined by transitions that halve
the channels (compression 0.5) and the resolution, then BN-ReLU, global
average pool and a linear layer: 769,162 parameters ("0.8M" in Huang et al.).
`depth` / `growth_rate` shrink it for quick tests. The same network serves
Tiny-ImageNet (tasks/tinyimagenet_densenet.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adashift_pl.data.vision import CIFAR10DataModule
from adashift_pl.errors import UserError
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer

DESCRIPTION = "CIFAR-10 DenseNet-BC-100, k=12 (paper Fig. 5, Table 9)"
MONITOR = ("val/acc", "max")


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, growth_rate: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, 4 * growth_rate, 1, bias=False),
            nn.BatchNorm2d(4 * growth_rate), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def _transition(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNetBC(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 100, growth_rate: int = 12, compression: float = 0.5,
                 stem_stride: int = 1):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise UserError(f"invalid model.depth {depth!r}: DenseNet-BC depth is 6n + 4 with n >= 1 (e.g. 100)")
        if stem_stride not in (1, 2):
            raise UserError(f"invalid model.stem_stride {stem_stride!r}: allowed are 1, 2")
        n = (depth - 4) // 6
        ch = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, stem_stride, 1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(Bottleneck(ch, growth_rate))
                ch += growth_rate
            if block < 2:
                out = int(ch * compression)
                layers.append(_transition(ch, out))
                ch = out
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CIFAR10DenseNet(ImageClassifier):
    def __init__(self, optimizer: dict[str, Any] | None = None, depth: int = 100, growth_rate: int = 12,
                 compression: float = 0.5, num_classes: int = 10, channels_last: bool = False):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = DenseNetBC(num_classes, depth, growth_rate, compression)
        self._finish_init(channels_last)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[CIFAR10DenseNet, CIFAR10DataModule]:
    return CIFAR10DenseNet(optimizer=check_optimizer(optimizer), **model), CIFAR10DataModule(**data, seed=seed)
