"""MNIST multilayer perceptron (Section 5.2, Figure 3; hyper-parameters in Table 6).

Two hidden layers of 256 units "with no internal activation" as in the paper
(so the network is a product of three linear maps -- linear in its input, but
not in its parameters, which is what makes the optimizers differ); set
`activation` to relu/tanh/sigmoid/gelu for the usual non-linear MLP. This is
also the network of the paper's g_t / v_t correlation study (Appendix C,
second hidden layer).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from adashift_pl.data.vision import MNISTDataModule
from adashift_pl.errors import UserError
from adashift_pl.tasks._classifier import ImageClassifier, check_optimizer

DESCRIPTION = "MNIST MLP, two hidden layers of 256, no activation (paper Fig. 3, Table 6)"
MONITOR = ("val/acc", "max")

ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class MNISTMLP(ImageClassifier):
    def __init__(self, optimizer: dict[str, Any] | None = None, hidden: Sequence[int] = (256, 256),
                 activation: str = "none", num_classes: int = 10):
        super().__init__(num_classes)
        if activation not in ACTIVATIONS:
            raise UserError(f"invalid model.activation {activation!r}: allowed are {', '.join(ACTIVATIONS)}")
        if isinstance(hidden, int) or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise UserError(f"invalid model.hidden {hidden!r}: a list of positive layer widths, e.g. [256, 256]")
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self._finish_init(channels_last=False)


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[MNISTMLP, MNISTDataModule]:
    return MNISTMLP(optimizer=check_optimizer(optimizer), **model), MNISTDataModule(**data, seed=seed)
