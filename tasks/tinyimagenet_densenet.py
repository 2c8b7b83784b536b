"""DenseNet-BC on Tiny-ImageNet-200 (Section 5.4, Figure 6; hyper-parameters in Table 9).

The DenseNet-BC of tasks/cifar10_densenet.py (depth 100, growth rate 12 by
default -- the paper does not give the Tiny-ImageNet configuration) applied to
64x64 inputs with 200 classes. `stem_stride: 1` keeps full resolution (three
dense blocks at 64/32/16 pixels, about 4x the CIFAR compute); `stem_stride: 2`
downsamples first and costs about the same as CIFAR. Logs top-5 accuracy too.
"""

from __future__ import annotations

from typing import Any

from adashift_pl.data.vision import TinyImageNetDataModule
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer
from adashift_pl.tasks.cifar10_densenet import DenseNetBC

DESCRIPTION = "Tiny-ImageNet-200 DenseNet-BC-100, k=12, 64x64 (paper Fig. 6, Table 9)"
MONITOR = ("val/acc", "max")


class TinyImageNetDenseNet(ImageClassifier):
    def __init__(self, optimizer: dict[str, Any] | None = None, depth: int = 100, growth_rate: int = 12,
                 compression: float = 0.5, stem_stride: int = 1, num_classes: int = 200,
                 channels_last: bool = False, memory_efficient: bool = False):
        super().__init__(num_classes, top5=True)
        self.save_hyperparameters()
        self.net = DenseNetBC(num_classes, depth, growth_rate, compression, stem_stride, memory_efficient)
        self._finish_init(channels_last)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[TinyImageNetDenseNet, TinyImageNetDataModule]:
    return (TinyImageNetDenseNet(optimizer=check_optimizer(optimizer), **model),
            TinyImageNetDataModule(**data, seed=seed))
