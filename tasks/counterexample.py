"""The stochastic online counterexample of Eq. 7 (Section 5.1, Figure 1a).

At every step t each replica k draws f_t(θ) = C·θ with probability p = (1+δ)/(C+1),
else f_t(θ) = −θ. The expected cost is F(θ) = δ·θ, so a correct optimizer drives θ
down; Adam (β1 = 0, β2 = 0.999, C = 101) drives it up (Reddi et al., 2018).

Design choices (why):
- K replicas that must stay independent for every optimizer. AdaShift's φ (max/mean)
  reduces over a block, so K replicas in one (K,)-tensor block would be coupled by
  the max. Two exact layouts: `layout: rows` (default) keeps θ as one (K, 1) tensor and
  requires block-wise optimizers to use `spatial_block: row` (one block per replica --
  checked when the optimizer is built); `layout: scalars` gives every replica its own
  scalar parameter (independent for any optimizer, but per-parameter Python overhead
  makes it ~10x slower with K = 32).
- Common random numbers: the coin of replica k at step t is a pure function of
  (seed, t), drawn inside `training_step` from a counter-seeded generator. Every
  optimizer sees the same gradient sequence for the same seed, and a run resumed
  at any step sees exactly the data it would have seen (exact resume).
- Warm-up: as in the authors' script, the first `warmup_steps` steps update the
  optimizer state but not θ -- implemented exactly as lr = 0 for those steps
  (θ − 0·u = θ), through a LambdaLR whose state is checkpointed.
- θ starts at `theta0` (0), unconstrained; `project: true` clamps θ to
  [−bound, bound] after every step (Reddi et al.'s projected domain).
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer

LAYOUTS = ("rows", "scalars")

DESCRIPTION = "Eq. 7 stochastic online counterexample (Section 5.1, Fig. 1a): K independent replicas of θ"
MONITOR = None  # θ is not a metric to maximise; the last checkpoint is the result

_STEP_MIX = 0x9E3779B1  # Weyl increment: seeds of neighbouring (seed, step) pairs do not collide


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, salt): counter-based data."""
    key = (int(seed) * 1_000_003 + int(salt) * 7_919 + int(step) * _STEP_MIX) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


class _Steps(IterableDataset):
    """`length` placeholders per epoch; the tasks draw their data from the global step."""

    def __init__(self, length: int):
        self.length = length

    def __iter__(self):
        return (torch.tensor(i) for i in range(self.length))

    def __len__(self) -> int:
        return self.length


class StepDataModule(L.LightningDataModule):
    """Data module of the data-free tasks: an epoch is `steps_per_epoch` steps.

    The batches carry no data (the problem defines it; see `step_generator`), so the
    module is identical on every rank and needs no DistributedSampler. Validation is
    one placeholder batch: the tasks evaluate exact quantities of the parameters.
    """

    def __init__(self, steps_per_epoch: int = 1000):
        super().__init__()
        if int(steps_per_epoch) < 1:
            raise UserError(f"invalid data.steps_per_epoch {steps_per_epoch!r}: allowed is an integer >= 1")
        self.steps_per_epoch = int(steps_per_epoch)
        self.data_source = "builtin"
        # Lightning warns that __len__ of an IterableDataset may be wrong with workers; there are none.
        warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")

    def train_dataloader(self):
        return DataLoader(_Steps(self.steps_per_epoch), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_Steps(1), batch_size=None)


def warmup_lambda(warmup_steps: int):
    """lr factor 0 during the warm-up, 1 after (a top-level callable so LambdaLR pickles cleanly)."""
    return _Warmup(warmup_steps)


class _Warmup:
    def __init__(self, warmup_steps: int):
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.warmup_steps else 1.0


class Counterexample(L.LightningModule):
    def __init__(self, optimizer: dict, seed: int = 0, replicas: int = 64, C: float = 101.0, delta: float = 0.02,
                 warmup_steps: int = 10000, theta0: float = 0.0, project: bool = False, bound: float = 1.0,
                 smoothing: float = 0.99, layout: str = "rows"):
        super().__init__()
        self.save_hyperparameters()
        if int(replicas) < 1:
            raise UserError(f"invalid model.replicas {replicas!r}: allowed is an integer >= 1")
        if not 0 < delta < C:
            raise UserError(f"invalid model.delta {delta!r}: allowed is 0 < delta < C (C={C})")
        if not 0 <= smoothing < 1:
            raise UserError(f"invalid model.smoothing {smoothing!r}: allowed is 0 <= smoothing < 1")
        if layout not in LAYOUTS:
            raise UserError(f"invalid model.layout {layout!r}: allowed are {', '.join(LAYOUTS)}")
        if int(warmup_steps) < 0:
            raise UserError(f"invalid model.warmup_steps {warmup_steps!r}: allowed is an integer >= 0")
        if not float(bound) > 0:  # clamp(-b, b) with b <= 0 would pin theta to a point
            raise UserError(f"invalid model.bound {bound!r}: allowed is a number > 0 (the half-width of [-bound, bound])")
        self.p = (1.0 + delta) / (C + 1.0)  # probability of the C·θ branch, Eq. 7
        K = int(replicas)
        if layout == "rows":
            self.theta = nn.Parameter(torch.full((K, 1), float(theta0)))
        else:
            self.theta = nn.ParameterList(nn.Parameter(torch.tensor(float(theta0))) for _ in range(K))
        # Exponential moving average of mean θ (the smoothed curve); buffers so that it resumes exactly.
        self.register_buffer("theta_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema_weight", torch.zeros((), dtype=torch.float64))

    def thetas(self) -> torch.Tensor:
        """θ of the K replicas as a (K,) tensor (differentiable)."""
        if self.hparams.layout == "rows":
            return self.theta[:, 0]
        return torch.stack(list(self.theta))

    def gradients_at(self, step: int) -> torch.Tensor:
        """The K gradients ∂f_t/∂θ ∈ {C, −1} of step `step` (the same for every optimizer)."""
        u = torch.rand(self.hparams.replicas, generator=step_generator(self.hparams.seed, step), dtype=torch.float64)
        return torch.where(u < self.p, float(self.hparams.C), -1.0)

    def training_step(self, batch, batch_idx):
        coef = self.gradients_at(self.global_step).to(self.device, torch.float32)
        theta = self.thetas()
        losses = coef * theta  # f_t(θ_k) for each replica; the sum gives each θ_k its own gradient
        # Logged only on the steps Lightning writes: self.log costs more than the step itself here.
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_theta(theta.detach(), losses.detach())
        return losses.sum()

    def log_theta(self, theta: torch.Tensor, losses: torch.Tensor) -> None:
        self.log("train/loss", losses.mean(), batch_size=1)
        self.log("theta/mean", theta.mean(), batch_size=1)
        self.log("theta/std", theta.std(correction=0), batch_size=1)
        self.log("theta/mean_smoothed", (self.theta_ema / self.ema_weight.clamp_min(1e-300)).float(), batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            if self.hparams.project:
                b = float(self.hparams.bound)
                for p in self.parameters():
                    p.clamp_(-b, b)
            # Bias-corrected EMA of mean θ (counted from step 1, warm-up included).
            a = float(self.hparams.smoothing)
            self.theta_ema.mul_(a).add_(self.thetas().detach().double().mean(), alpha=1 - a)
            self.ema_weight.mul_(a).add_(1 - a)

    def validation_step(self, batch, batch_idx):
        theta = self.thetas().detach()
        self.log("val/theta_mean", theta.mean(), batch_size=1)
        self.log("val/expected_loss", float(self.hparams.delta) * theta.mean(), batch_size=1)  # F(θ) = δ·θ

    def configure_optimizers(self):
        opt = build_optimizer(params=self, **self.hparams.optimizer)
        if self.hparams.layout == "rows":
            check_row_blocks(opt, "model.layout rows")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(self.hparams.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def summary_extra(self) -> dict:
        theta = self.thetas().detach().double()
        return {"theta_mean": theta.mean().item(), "theta_std": theta.std(correction=0).item(),
                "theta_min": theta.min().item(), "theta_max": theta.max().item(), "replicas": len(theta)}


def check_row_blocks(opt: torch.optim.Optimizer, why: str) -> None:
    """Replicas are rows of one tensor: a block-wise φ must reduce per row, or it couples them."""
    for group in opt.param_groups:
        op, block = group.get("spatial_op", "none"), group.get("spatial_block", "tensor")
        if op != "none" and block != "row":
            raise UserError(
                f"{why}: replicas are the rows of one tensor, and spatial_op={op!r} over spatial_block={block!r} "
                f"would couple them: add --optimizer.spatial_block row, or use --model.layout scalars")


def build(model: dict, data: dict, optimizer: dict, seed: int):
    return Counterexample(optimizer=dict(optimizer), seed=seed, **model), StepDataModule(**data)
