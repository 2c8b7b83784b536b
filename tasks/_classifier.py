"""The image-classification LightningModule shared by the five vision tasks (Sections 5.2-5.4).

A task subclasses `ImageClassifier`, builds `self.net` in its `__init__` and calls
`self.save_hyperparameters()`; training, validation, test, metrics and the
optimizer come from here:

    train/loss, train/acc        per step (the batch's values)
    val/loss, val/acc            per validation run (val/acc_top5 when top5=True)
    test/loss, test/acc          on the test split (test/acc_top5 when top5=True)

Accuracies are torchmetrics objects logged as objects (Lightning computes and
resets them; they sync themselves under DDP); losses of val/test are MeanMetrics
so the epoch value is the exact mean over images.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from adashift_pl.optim import build_optimizer


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier; the subclass sets `self.net` (images -> logits)."""

    net: nn.Module

    def __init__(self, num_classes: int, top5: bool = False):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss()
        acc = lambda k: MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = acc(1), acc(1), acc(1)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.top5 = top5
        if top5:
            self.val_acc_top5, self.test_acc_top5 = acc(5), acc(5)

    def _finish_init(self, channels_last: bool) -> None:
        """Call at the end of the subclass __init__, after `self.net` exists."""
        self.channels_last = channels_last
        if channels_last:  # NHWC weights + inputs: faster convolutions on tensor-core GPUs
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        # on_step only, so the logged keys are exactly train/loss and train/acc (no _step/_epoch suffix)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss_metric, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss_metric.update(self.criterion(logits, y), weight=len(y))
        acc.update(logits, y)
        self.log(f"{stage}/loss", loss_metric, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if self.top5:
            top5 = getattr(self, f"{stage}_acc_top5")
            top5.update(logits, y)
            self.log(f"{stage}/acc_top5", top5)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Passing the module lets the factory keep biases and norm parameters out of weight decay.
        return build_optimizer(params=self, **self.hparams.optimizer)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_optimizer(optimizer: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved optimizer section; a task built without one (tests, notebooks) trains with Adam."""
    return dict(optimizer) if optimizer else {"name": "adam"}
