"""The sequential online counterexample of Eq. 6 (Reddi et al., 2018; Appendix A, Figure 8a).

    f_t(θ) = C·θ  if t mod d = 1,   −θ otherwise        (t = 1, 2, ...)

Each d-step epoch has total gradient C − (d − 1); with C > d − 1 the correct direction
is to decrease θ. Appendix A uses C = d = 6 (epoch gradient +1), θ_1 = 0 and 2000
steps, and maps the final θ of Adam over (β1, β2). The problem is deterministic, so
there is one θ (a scalar parameter); the paper does not run AdaShift here because the
sequence is not temporally independent (end of Section 5.1).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer
from adashift_pl.tasks.counterexample import StepDataModule

DESCRIPTION = "Eq. 6 sequential online counterexample (Appendix A: C = d = 6): one scalar θ"
MONITOR = None


class CounterexampleSeq(L.LightningModule):
    def __init__(self, optimizer: dict, seed: int = 0, C: float = 6.0, d: int = 6, theta0: float = 0.0,
                 project: bool = False, bound: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        if int(d) < 2:
            raise UserError(f"invalid model.d {d!r}: allowed is an integer >= 2 (the epoch length)")
        if not float(bound) > 0:  # clamp(-b, b) with b <= 0 would pin theta to a point
            raise UserError(f"invalid model.bound {bound!r}: allowed is a number > 0 (the half-width of [-bound, bound])")
        self.theta = nn.Parameter(torch.tensor(float(theta0)))

    def gradient_at(self, step: int) -> float:
        """∂f_t/∂θ for the 0-based optimizer step `step` (t = step + 1)."""
        return float(self.hparams.C) if step % int(self.hparams.d) == 0 else -1.0

    def training_step(self, batch, batch_idx):
        loss = self.gradient_at(self.global_step) * self.theta
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/loss", loss.detach(), batch_size=1)
            self.log("theta/value", self.theta.detach(), batch_size=1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.hparams.project:
            with torch.no_grad():
                self.theta.clamp_(-float(self.hparams.bound), float(self.hparams.bound))

    def validation_step(self, batch, batch_idx):
        # Average loss over one epoch of the sequence: θ·(C − (d − 1))/d.
        C, d = float(self.hparams.C), int(self.hparams.d)
        self.log("val/theta", self.theta.detach(), batch_size=1)
        self.log("val/epoch_loss", self.theta.detach() * (C - (d - 1)) / d, batch_size=1)

    def configure_optimizers(self):
        return build_optimizer(params=self, **self.hparams.optimizer)

    def summary_extra(self) -> dict:
        return {"theta": self.theta.detach().item(), "epoch_gradient": float(self.hparams.C) - (int(self.hparams.d) - 1)}


def build(model: dict, data: dict, optimizer: dict, seed: int):
    return CounterexampleSeq(optimizer=dict(optimizer), seed=seed, **model), StepDataModule(**data)
