"""The ill-conditioned two-layer linear net of Appendix L (Eq. 45, Figures 21-24).

    L(W1, W2; A) = E_{x ~ N(0, I)} ‖W1 W2 x − A x‖²  =  ‖W1 W2 − A‖_F²

A is a fixed d×d matrix with singular values spread log-uniformly over
[1/cond, 1] (cond = 1e5 by default; the paper also uses 1e20, which needs
`--trainer.precision 64-true`), built from `matrix_seed` so every run of every
optimizer solves the same problem. W1 (d×h) and W2 (h×d) start from N(0, 1/d)
drawn from `seed`.

train/loss is the mini-batch estimate on x ~ N(0, I); val/loss is the exact expected
loss ‖W1 W2 − A‖_F² (no sampling noise). The batch of step t is a pure function of
(seed, t) -- the global batch is drawn once and each DDP rank takes its slice -- so
1 process and N processes see the same global batch, and a resumed run sees exactly
the data of an uninterrupted one.

Learning-rate schedules (Figures 21-23): `lr_schedule: fixed | linear | exp`; the
decaying ones go from the optimizer's lr to lr·`lr_final_factor` over
`lr_decay_steps` optimizer steps (default: trainer.max_steps) and stay there.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer
from adashift_pl.tasks.counterexample import StepDataModule, step_generator

DESCRIPTION = "Appendix L: ill-conditioned two-layer linear net ‖W1 W2 x − A x‖² (Eq. 45), cond(A) = 1e5"
MONITOR = ("val/loss", "min")

SCHEDULES = ("fixed", "linear", "exp")


def make_matrix(d: int, cond: float, matrix_seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ with s log-uniform from 1 down to 1/cond (float64)."""
    g = torch.Generator().manual_seed(int(matrix_seed))
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0.0, -math.log10(cond), d, dtype=torch.float64) if d > 1 else torch.ones(1, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


class LRSchedule:
    """lr factor of step s: fixed 1; linear 1 → f; exp 1 → f geometrically (over `steps`, then flat)."""

    def __init__(self, kind: str, steps: int, final_factor: float):
        self.kind, self.steps, self.final_factor = kind, max(1, int(steps)), float(final_factor)

    def __call__(self, step: int) -> float:
        r = min(step / self.steps, 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.final_factor) * r
        if self.kind == "exp":
            return self.final_factor ** r
        return 1.0


class Quadratic(L.LightningModule):
    def __init__(self, optimizer: dict, seed: int = 0, dim: int = 10, hidden: int | None = None,
                 cond: float = 1e5, matrix_seed: int = 0, batch_size: int = 64, lr_schedule: str = "fixed",
                 lr_decay_steps: int | None = None, lr_final_factor: float = 0.01, init_scale: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        if int(dim) < 1 or (hidden is not None and int(hidden) < 1):
            raise UserError(f"invalid model.dim/hidden {dim!r}/{hidden!r}: allowed are integers >= 1")
        if not float(cond) >= 1:
            raise UserError(f"invalid model.cond {cond!r}: allowed is a condition number >= 1")
        if lr_schedule not in SCHEDULES:
            raise UserError(f"invalid model.lr_schedule {lr_schedule!r}: allowed are {', '.join(SCHEDULES)}")
        if not 0 < float(lr_final_factor) <= 1:
            raise UserError(f"invalid model.lr_final_factor {lr_final_factor!r}: allowed is 0 < f <= 1")
        if int(batch_size) < 1:
            raise UserError(f"invalid model.batch_size {batch_size!r}: allowed is an integer >= 1")
        d, h = int(dim), int(hidden or dim)
        self.register_buffer("A", make_matrix(d, float(cond), matrix_seed))  # float64 always
        g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        std = float(init_scale) / math.sqrt(d)
        self.W1 = nn.Parameter(torch.randn(d, h, generator=g, dtype=torch.float64).float() * std)
        self.W2 = nn.Parameter(torch.randn(h, d, generator=g, dtype=torch.float64).float() * std)

    def batch_at(self, step: int) -> torch.Tensor:
        """This rank's slice of the global batch of step `step` (global batch = model.batch_size)."""
        B, d = int(self.hparams.batch_size), int(self.hparams.dim)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if B % world:
            raise UserError(f"model.batch_size {B} must be divisible by the number of processes ({world})")
        x = torch.randn(B, d, generator=step_generator(self.hparams.seed, step, salt=1), dtype=torch.float64)
        per = B // world
        return x[rank * per:(rank + 1) * per].to(self.device, self.W1.dtype)

    def training_step(self, batch, batch_idx):
        x = self.batch_at(self.global_step)
        residual = x @ (self.W1 @ self.W2 - self.A.to(self.W1.dtype)).T  # (W1 W2 − A) x, row-wise
        loss = residual.pow(2).sum(dim=1).mean()
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer):
        # After DDP's all-reduce and AMP unscaling: the gradient the optimizer will use.
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            norm = torch.sqrt(sum(p.grad.detach().float().pow(2).sum() for p in self.parameters()
                                  if p.grad is not None))
            self.log("train/grad_norm", norm, batch_size=1)

    def expected_loss(self) -> torch.Tensor:
        """‖W1 W2 − A‖_F² in float64: Eq. 45 without sampling."""
        return (self.W1.detach().double() @ self.W2.detach().double() - self.A.double()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.expected_loss(), batch_size=1)

    def configure_optimizers(self):
        opt = build_optimizer(params=self, **self.hparams.optimizer)
        steps = self.hparams.lr_decay_steps
        if steps is None:
            steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 \
                else self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, LRSchedule(self.hparams.lr_schedule, steps, self.hparams.lr_final_factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def summary_extra(self) -> dict:
        loss = self.expected_loss().item()
        return {"expected_loss": loss, "relative_error": math.sqrt(loss) / self.A.double().norm().item(),
                "cond": float(self.hparams.cond)}


def build(model: dict, data: dict, optimizer: dict, seed: int):
    return Quadratic(optimizer=dict(optimizer), seed=seed, **model), StepDataModule(**data)
