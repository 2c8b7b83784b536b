"""MNIST logistic regression (Section 5.2, Figure 2; hyper-parameters in Table 5).

One linear layer from the 784 pixels to 10 logits, trained with cross-entropy.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adashift_pl.data.vision import MNISTDataModule
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer

DESCRIPTION = "MNIST logistic regression (paper Fig. 2, Table 5)"
MONITOR = ("val/acc", "max")


class MNISTLogReg(ImageClassifier):
    def __init__(self, optimizer: dict[str, Any] | None = None, num_classes: int = 10):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
        self._finish_init(channels_last=False)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[MNISTLogReg, MNISTDataModule]:
    return MNISTLogReg(optimizer=check_optimizer(optimizer), **model), MNISTDataModule(**data, seed=seed)
