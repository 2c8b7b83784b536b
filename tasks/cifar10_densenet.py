"""DenseNet-BC (depth 100, growth rate 12) on CIFAR-10 (Section 5.3, Figure 5; hyper-parameters in Table 9).

DenseNet-BC of Huang et al. (2017) for 32x32 inputs: a 3x3 convolution to 2k
channels, three dense blocks of (depth - 4) / 6 = 16 bottleneck layers
(BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k) joined by transitions that halve
the channels (compression 0.5) and the resolution, then BN-ReLU, global
average pool and a linear layer: 769,162 parameters ("0.8M" in Huang et al.).
`depth` / `growth_rate` shrink it for quick tests; `memory_efficient` recomputes
each layer's concatenation in backward (linear instead of quadratic activation
memory; BatchNorm running statistics then see each batch twice, as in
torchvision's memory-efficient DenseNet). The same network serves
Tiny-ImageNet (tasks/tinyimagenet_densenet.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adashift_pl.data.vision import CIFAR10DataModule
from adashift_pl.errors import UserError
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer

DESCRIPTION = "CIFAR-10 DenseNet-BC-100, k=12 (paper Fig. 5, Table 9)"
MONITOR = ("val/acc", "max")


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k) on the concatenation of all earlier features, then BN-ReLU-Conv3x3 (k)."""

    def __init__(self, in_ch: int, growth_rate: int, memory_efficient: bool = False):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, 4 * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(F.relu(self.norm1(torch.cat(features, 1))))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled():
            # Recompute the concatenation + BN + ReLU + 1x1 conv in backward instead of storing them: activation
            # memory grows linearly with depth instead of quadratically (Pleiss et al., 2017), for ~20 % more time.
            out = checkpoint(self._bottleneck, *features, use_reentrant=False)
        else:
            out = self._bottleneck(*features)
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.ModuleList):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNetBC(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 100, growth_rate: int = 12, compression: float = 0.5,
                 stem_stride: int = 1, memory_efficient: bool = False):
        super().__init__()
        if not isinstance(depth, int) or (depth - 4) % 6 or depth < 10:
            raise UserError(f"invalid model.depth {depth!r}: DenseNet-BC depth is 6n + 4 with n >= 1 (e.g. 100)")
        if stem_stride not in (1, 2):
            raise UserError(f"invalid model.stem_stride {stem_stride!r}: allowed are 1, 2")
        n = (depth - 4) // 6
        ch = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, stem_stride, 1, bias=False)]
        for block in range(3):
            layers.append(DenseBlock([DenseLayer(ch + i * growth_rate, growth_rate, memory_efficient)
                                      for i in range(n)]))
            ch += n * growth_rate
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
                 compression: float = 0.5, num_classes: int = 10, channels_last: bool = False,
                 memory_efficient: bool = False):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = DenseNetBC(num_classes, depth, growth_rate, compression, memory_efficient=memory_efficient)
        self._finish_init(channels_last)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[CIFAR10DenseNet, CIFAR10DataModule]:
    return CIFAR10DenseNet(optimizer=check_optimizer(optimizer), **model), CIFAR10DataModule(**data, seed=seed)
