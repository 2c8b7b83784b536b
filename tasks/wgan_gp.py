"""WGAN-GP (Gulrajani et al., 2017): the critic benchmark of the paper's Figure 7a, and full WGAN-GP training.

Modes (`model.mode`)
  fixed_generator  Section 5.5 / Figure 7a: the generator is fixed (random init, or loaded from
                   `model.generator_checkpoint`) and only the critic trains, so the critic's loss
                   E[D(G(z))] - E[D(x)] + lambda * GP is an optimization benchmark with a fixed target.
                   One training step = one critic step.
  full             ordinary WGAN-GP: one training step = `n_critic` critic steps + one generator step.

`--optimizer` drives the critic; the generator's optimizer is `model.generator_optimizer`
(Adam(1e-4, betas (0.5, 0.9)) by default, Gulrajani et al.), built by the same factory.

Step counting. Lightning's global_step counts every `optimizer.step()` made through a
LightningOptimizer (`fit_loop.epoch_loop.manual_optimization.optim_step_progress`), so a
plain n_critic loop would advance it n_critic + 1 times per generator step. Here exactly
one step per training step is counted -- the generator's in `full` mode, the critic's in
`fixed_generator` mode -- and the n_critic critic steps of `full` mode go through
`trainer.strategy.optimizer_step` (the same precision plugin, hooks and AMP scaler, but no
progress count). So `--trainer.max_steps N`, `log_every_n_steps`, checkpoint intervals and
`summary.json`'s global_step count generator iterations (critic iterations in fixed_generator
mode). The data loader yields n_critic real batches per training step (one in fixed_generator).

Randomness. The noise z, the interpolation weights and the 2-D mixture's batches are drawn
from generators seeded by (seed, rank, step), so a resumed run draws exactly what the
uninterrupted run would have drawn (the image data sets shuffle like any Lightning run).

Data (`data.dataset`): gaussians8 / gaussians25 (2-D mixtures, built in, the WGAN-GP toy
problems) with MLPs, or mnist / cifar10 (adashift_pl.data.vision) with DCGAN-style networks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adashift_pl.data.resumable import ResumableDataModule
from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer

DESCRIPTION = "WGAN-GP: critic vs a fixed generator (Figure 7a) or full training; 2-D mixtures, MNIST, CIFAR-10"
MONITOR = None  # a GAN has no validation metric that picks a best checkpoint

MODES = ("fixed_generator", "full")
MIXTURES = ("gaussians8", "gaussians25")
IMAGES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
DATASETS = (*MIXTURES, *IMAGES)
DEFAULT_GENERATOR_OPTIMIZER = {"name": "adam", "lr": 1e-4, "betas": [0.5, 0.9]}  # Gulrajani et al., 2017
_DATA, _NOISE, _FIXED = 1, 2, 3  # random streams


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator whose state is a function of the integer keys only (e.g. seed, stream, rank, step)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32 | int(state[1])) % 2**63)


# --------------------------------------------------------------------------- 2-D mixtures

def mixture(name: str) -> tuple[Tensor, float]:
    """(centers (K, 2), std) of the WGAN-GP toy mixtures: 8 on a circle of radius 2, or a 5x5 grid, rescaled."""
    if name == "gaussians8":
        angles = torch.arange(8) * (2 * math.pi / 8)
        return 2 * torch.stack([angles.cos(), angles.sin()], 1) / 1.414, 0.02 / 1.414
    grid = torch.arange(-2, 3, dtype=torch.float32) * 2
    return torch.cartesian_prod(grid, grid) / 2.828, 0.05 / 2.828


def sample_mixture(name: str, n: int, generator: torch.Generator) -> Tensor:
    centers, std = mixture(name)
    idx = torch.randint(len(centers), (n,), generator=generator)
    return centers[idx] + std * torch.randn(n, 2, generator=generator)


def mode_stats(name: str, samples: Tensor) -> dict[str, Tensor]:
    """How close samples are to the mixture: mean distance to the nearest mode (in units of the mode's std),
    fraction within 3 std of a mode ("high quality"), and how many modes have such a sample (no host sync)."""
    centers, std = mixture(name)
    dist, nearest = torch.cdist(samples.float(), centers.to(samples.device)).min(1)
    good = (dist < 3 * std).float()
    hits = torch.zeros(len(centers), device=samples.device).index_add_(0, nearest, good)
    return {"mode_distance": dist.mean() / std, "high_quality": good.mean(), "modes_covered": (hits > 0).sum().float()}


class MixtureStream:
    """Batches of a 2-D mixture; batch i is a function of (seed, rank, i) only, and a stream built after a
    resume starts at the resumed step, so it continues exactly. `length` batches make one epoch."""

    def __init__(self, name: str, batch_size: int, seed: int, rank: int, start: int, length: int):
        self.name, self.batch_size, self.seed, self.rank = name, batch_size, seed, rank
        self.next, self.length = start, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            gen = seeded(self.seed, _DATA, self.rank, self.next)
            self.next += 1
            yield sample_mixture(self.name, self.batch_size, gen)

    # Resumable by construction (the position comes from global_step, see train_dataloader), so there is
    # nothing to save; declaring it tells Lightning a mid-epoch checkpoint resumes reliably.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MixtureDataModule(L.LightningDataModule):
    """The 2-D mixture: each training batch holds `batches_per_step` x `batch_size` points."""

    def __init__(self, dataset: str, batch_size: int, batches_per_step: int, seed: int, epoch_length: int = 1000):
        super().__init__()
        self.dataset, self.batch_size, self.batches_per_step = dataset, batch_size, batches_per_step
        self.seed, self.epoch_length = seed, epoch_length
        self.data_source = "builtin"

    def train_dataloader(self) -> MixtureStream:
        # Lightning restores the loops before asking for loaders: global_step = training steps done.
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        return MixtureStream(self.dataset, self.batch_size * self.batches_per_step, self.seed, rank, start,
                             self.epoch_length)


# --------------------------------------------------------------------------- images

class _TanhRange(Dataset):
    """A vision data set's normalised images mapped to [-1, 1] (the generator's tanh range), labels dropped."""

    def __init__(self, base: Dataset, mean: tuple[float, ...], std: tuple[float, ...]):
        self.base = base
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Tensor:
        image, _ = self.base[i]
        return (image * self.std + self.mean) * 2 - 1


class ImageGANDataModule(ResumableDataModule):
    """MNIST / CIFAR-10 from adashift_pl.data.vision (download, checksums, synthetic stand-in, splits), served
    as unlabelled images in [-1, 1], `batches_per_step` x `batch_size` per training batch (drop_last)."""

    def __init__(self, dataset: str, batch_size: int, batches_per_step: int, seed: int, **vision: Any):
        super().__init__()
        from adashift_pl.data.vision import CIFAR10DataModule, MNISTDataModule

        cls = MNISTDataModule if dataset == "mnist" else CIFAR10DataModule
        vision.setdefault("augment", False)
        vision.setdefault("val_size", 0)  # nothing is validated: train on the whole training set
        self.inner = cls(batch_size=batch_size, seed=seed, **vision)
        self.batch_size, self.batches_per_step, self.seed = batch_size, batches_per_step, seed
        self.data_source = self.inner.data_source

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def train_dataloader(self) -> DataLoader:
        inner = self.inner  # resumes mid-epoch exactly (adashift_pl.data.resumable), augmentation keyed by epoch
        return self.resumable_loader(_TanhRange(inner.train_set, inner.mean, inner.std), seed=self.seed,
                                     yield_epoch=True, batch_size=self.batch_size * self.batches_per_step,
                                     drop_last=True, num_workers=inner.num_workers,
                                     persistent_workers=inner.num_workers > 0)


# --------------------------------------------------------------------------- networks

def mlp(n_in: int, hidden: int, n_out: int, depth: int = 3) -> nn.Sequential:
    """The WGAN-GP toy networks: `depth` ReLU layers of width `hidden`."""
    layers, width = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class DCGANGenerator(nn.Module):
    """z -> (C, S, S) in [-1, 1]: a linear map to a (width*2^k, S/2^k, S/2^k) map, then k stride-2 transposed
    convolutions with BatchNorm + ReLU (k = 2 for 28x28, 3 for 32x32)."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        channels, size = shape[0], shape[1]
        ups = 2 if size == 28 else 3
        start, c = size >> ups, width * 2 ** (ups - 1)
        self.start, self.c = start, c
        self.project = nn.Sequential(nn.Linear(latent_dim, c * start * start), nn.BatchNorm1d(c * start * start),
                                     nn.ReLU())
        layers: list[nn.Module] = []
        for i in range(ups):
            out = channels if i == ups - 1 else c // 2
            layers.append(nn.ConvTranspose2d(c, out, 4, 2, 1))
            layers += [nn.BatchNorm2d(out), nn.ReLU()] if i < ups - 1 else [nn.Tanh()]
            c = out
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(len(z), self.c, self.start, self.start))


class DCGANCritic(nn.Module):
    """(C, S, S) -> score: three stride-2 convolutions with LeakyReLU, no normalisation (the gradient
    penalty is per sample, so no BatchNorm -- Gulrajani et al., Section 4), then a linear layer."""

    def __init__(self, shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, *shape)).shape[1]
        self.score = nn.Linear(n, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(self.features(x))


# --------------------------------------------------------------------------- the gradient penalty

def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor, scaler: Any = None) -> Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake (Gulrajani et al., Algorithm 1).

    With an AMP GradScaler (16-mixed) the scaled output is differentiated and the gradient unscaled, as in
    PyTorch's "Automatic Mixed Precision examples: gradient penalty" recipe, so small fp16 gradients do not
    underflow; an inf there makes the loss inf and the scaler skips the step.
    """
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    out = critic(x_hat).sum()
    if scaler is not None:
        (grad,) = torch.autograd.grad(scaler.scale(out), x_hat, create_graph=True)
        grad = grad / scaler.get_scale()
    else:
        (grad,) = torch.autograd.grad(out, x_hat, create_graph=True)
    norm = grad.float().flatten(1).pow(2).sum(1).add(1e-12).sqrt()  # +1e-12: finite derivative at grad = 0
    return (norm - 1).pow(2).mean()


def _no_closure() -> None:
    return None


# --------------------------------------------------------------------------- the LightningModule

class WGANGP(L.LightningModule):
    """Critic (+ generator) with the gradient penalty, trained by manual optimization (see the module docstring).

    >>> WGANGP(optimizer={"name": "adam"}).critic[0]
    Linear(in_features=2, out_features=512, bias=True)
    """

    def __init__(self, optimizer: dict, dataset: str = "gaussians8", mode: str = "fixed_generator",
                 n_critic: int = 5, gp_lambda: float = 10.0, latent_dim: int | None = None, hidden: int = 512,
                 width: int = 64, generator_optimizer: dict | None = None, generator_checkpoint: str | None = None,
                 sample_every_n_steps: int = 500, num_samples: int = 512, seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"invalid model.mode {mode!r}: allowed are {', '.join(MODES)}")
        if dataset not in DATASETS:
            raise UserError(f"invalid data.dataset {dataset!r} for wgan_gp: allowed are {', '.join(DATASETS)}")
        for key, value in (("n_critic", n_critic), ("hidden", hidden), ("width", width),
                           ("sample_every_n_steps", sample_every_n_steps), ("num_samples", num_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"invalid model.{key} {value!r}: an integer >= 1")
        if not gp_lambda >= 0:
            raise UserError(f"invalid model.gp_lambda {gp_lambda!r}: a number >= 0")
        if generator_optimizer is None:
            generator_optimizer = dict(DEFAULT_GENERATOR_OPTIMIZER)
        latent_dim = latent_dim or (2 if dataset in MIXTURES else 128)
        self.save_hyperparameters()
        self.automatic_optimization = False

        if dataset in MIXTURES:
            self.generator = mlp(latent_dim, hidden, 2)
            self.critic = mlp(2, hidden, 1)
        else:
            self.generator = DCGANGenerator(latent_dim, IMAGES[dataset], width)
            self.critic = DCGANCritic(IMAGES[dataset], width)
        if generator_checkpoint:
            self._load_generator(generator_checkpoint)
        if mode == "fixed_generator":
            # Lightning keeps submodule modes (and warns that one is in eval mode: intended here).
            self.generator.requires_grad_(False).eval()
        # Samples for the pictures always come from the same noise, so they show the generator's progress.
        self.register_buffer("fixed_noise", torch.randn(num_samples, latent_dim, generator=seeded(seed, _FIXED)),
                             persistent=False)

    def _load_generator(self, path: str) -> None:
        """Generator weights from a wgan_gp Lightning checkpoint (keys "generator.*") or a plain state_dict."""
        if not Path(path).is_file():
            raise UserError(f"model.generator_checkpoint {path!r} is not a file: give a wgan_gp .ckpt or a "
                            f"generator state_dict saved with torch.save")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if any(k.startswith("generator.") for k in state):
            state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
        try:
            self.generator.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"model.generator_checkpoint {path!r} does not fit this generator (dataset "
                            f"{self.hparams.dataset}, latent_dim {self.hparams.latent_dim}, hidden/width): "
                            f"{str(err).splitlines()[0]}") from err

    def train(self, mode: bool = True) -> "WGANGP":
        # A fixed generator is fixed: BatchNorm uses (and never updates) its running statistics.
        super().train(mode)
        if self.hparams.mode == "fixed_generator":
            self.generator.eval()
        return self

    def configure_optimizers(self):
        critic_opt = build_optimizer(params=self.critic, **self.hparams.optimizer)
        if self.hparams.mode == "fixed_generator":
            return critic_opt
        return critic_opt, build_optimizer(params=self.generator, **self.hparams.generator_optimizer)

    def setup(self, stage: str) -> None:
        if self.trainer.accumulate_grad_batches != 1:
            raise UserError(f"trainer.accumulate_grad_batches {self.trainer.accumulate_grad_batches} is not "
                            f"supported by wgan_gp (manual optimization): allowed is 1")
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)  # None: not DDP (or a newer Lightning)
        if (self.hparams.mode == "full" and isinstance(self.trainer.strategy, DDPStrategy)
                and ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False)):
            # Each backward leaves the other network's (toggled-off) parameters unused.
            raise UserError("wgan_gp full mode under DDP needs --trainer.strategy ddp_find_unused_parameters_true "
                            "(each backward uses only the critic's or only the generator's parameters)")

    # -- one training step = one counted iteration
    def noise(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.randn(n, self.hparams.latent_dim, generator=gen).to(self.device)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        gen = seeded(self.hparams.seed, _NOISE, self.global_rank, self.global_step)
        stats: dict[str, Tensor] = {}
        if self.hparams.mode == "fixed_generator":
            steps = [self.critic_step(self.optimizers(), batch, gen, counted=True)]
        else:
            critic_opt, generator_opt = self.optimizers()
            chunks = batch.chunk(self.hparams.n_critic)
            steps = [self.critic_step(critic_opt, real, gen, counted=False) for real in chunks]
            stats["generator_loss"] = self.generator_step(generator_opt, len(chunks[0]), gen)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            # 16-mixed: a step whose scaled gradients overflowed is skipped by the GradScaler, and its loss
            # (inf/nan through the penalty) says nothing about the critic, so it is not logged; the scale is.
            steps = [s for s in steps if torch.isfinite(s["loss"])]
            stats["amp_scale"] = torch.tensor(scaler.get_scale())
        if steps:
            stats.update({k: torch.stack([s[k] for s in steps]).mean() for k in steps[0]})
        # train/loss is the critic's loss, the quantity of Figure 7a.
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, prog_bar=True)

    def critic_step(self, opt, real: Tensor, gen: torch.Generator, counted: bool) -> dict[str, Tensor]:
        n = len(real)
        eps = torch.rand(n, *[1] * (real.dim() - 1), generator=gen).to(real)
        z = self.noise(n, gen)
        with torch.no_grad():
            fake = self.generator(z).to(real.dtype)
        self.toggle_optimizer(opt)
        real_score, fake_score = self.critic(torch.cat([real, fake])).float().view(2, n).mean(1)
        penalty = gradient_penalty(self.critic, real, fake, eps, getattr(self.trainer.precision_plugin, "scaler", None))
        loss = fake_score - real_score + self.hparams.gp_lambda * penalty
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if counted:
            opt.step()
        else:  # the same precision plugin, hooks and scaler as opt.step(), without advancing global_step
            self.trainer.strategy.optimizer_step(opt.optimizer, _no_closure)
        self.untoggle_optimizer(opt)
        return {"loss": loss.detach(), "wasserstein": (real_score - fake_score).detach(),
                "gradient_penalty": penalty.detach()}

    def generator_step(self, opt, n: int, gen: torch.Generator) -> Tensor:
        z = self.noise(n, gen)
        self.toggle_optimizer(opt)
        loss = -self.critic(self.generator(z)).float().mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.untoggle_optimizer(opt)
        return loss.detach()

    # -- pictures
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        picture = step == 1 or step % self.hparams.sample_every_n_steps == 0
        # Lightning writes logged values every log_every_n_steps (and re-writes stale ones), so the sample
        # scalars are computed on exactly those steps (2-D, full mode: a fixed generator's are constant).
        scalars = (self.hparams.dataset in MIXTURES and self.hparams.mode == "full"
                   and step % self.trainer.log_every_n_steps == 0)
        if picture or scalars:
            self.log_samples(step, picture, scalars)

    @torch.no_grad()
    def log_samples(self, step: int, picture: bool = True, scalars: bool = True) -> None:
        """Sample-quality scalars on every rank; the picture to TensorBoard from rank 0."""
        dataset = self.hparams.dataset
        noise = self.fixed_noise if dataset in MIXTURES else self.fixed_noise[:64]
        training = self.generator.training
        self.generator.eval()  # BatchNorm (DCGAN): running statistics, and sampling must not update them
        fake = self.generator(noise).float()
        self.generator.train(training)
        if scalars:
            self.log_dict({f"samples/{k}": v for k, v in mode_stats(dataset, fake).items()})
        if not picture or self.global_rank != 0:
            return
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            if dataset in MIXTURES:
                logger.experiment.add_figure("samples", self.mixture_figure(fake.cpu()), step)
            else:
                from torchvision.utils import make_grid

                grid = make_grid(fake.cpu(), nrow=8, normalize=True, value_range=(-1, 1))
                logger.experiment.add_image("samples", grid, step)

    def mixture_figure(self, fake: Tensor):
        """Generated points (orange) over real points (grey) and the critic's value (contours)."""
        from matplotlib.figure import Figure

        real = sample_mixture(self.hparams.dataset, len(fake), seeded(self.hparams.seed, _FIXED, 1))
        lim = 2.0 if self.hparams.dataset == "gaussians8" else 2.2
        axis = torch.linspace(-lim, lim, 64)
        grid = torch.cartesian_prod(axis, axis)
        score = self.critic(grid.to(self.device)).float().view(64, 64).cpu()
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
        contours = ax.contourf(axis.numpy(), axis.numpy(), score.T.numpy(), levels=20, cmap="Blues")
        fig.colorbar(contours, ax=ax, label="critic D(x)", shrink=0.8)
        ax.scatter(real[:, 0], real[:, 1], s=4, c="0.3", label="data")
        ax.scatter(fake[:, 0], fake[:, 1], s=4, c="tab:orange", label="generated")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.legend(loc="upper right", fontsize="small")
        ax.set_title(f"{self.hparams.mode}, step {self.global_step}")
        return fig


# --------------------------------------------------------------------------- the task contract

# Keys of configs/wgan_gp.yaml that only one kind of data set uses are accepted (and ignored) by the other,
# so `--data.dataset mnist` works with the default config.
_SHARED_KEYS = {"dataset", "batch_size", "source", "epoch_length", "dir", "download", "num_workers"}
_VISION_KEYS = _SHARED_KEYS | {"augment", "val_size", "pin_memory", "persistent_workers", "synthetic_sizes",
                               "eval_batch_size", "verify_checksums"}


def build(model: dict, data: dict, optimizer: dict, seed: int) -> tuple[WGANGP, L.LightningDataModule]:
    data = dict(data)
    dataset = data.pop("dataset", "gaussians8")
    batch_size = data.pop("batch_size", 256)
    module = WGANGP(optimizer=dict(optimizer), dataset=dataset, seed=seed, **model)
    full = module.hparams.mode == "full"
    if full:
        try:  # a bad generator optimizer fails now, not after the data is loaded
            build_optimizer(params=module.generator, **module.hparams.generator_optimizer)
        except (ValueError, TypeError) as err:
            raise UserError(f"invalid model.generator_optimizer {module.hparams.generator_optimizer!r}: "
                            f"{err}") from err
    per_step = module.hparams.n_critic if full else 1
    if dataset in MIXTURES:
        unknown = sorted(set(data) - _SHARED_KEYS)
        if unknown:
            raise UserError(f"unknown data key(s) {', '.join(unknown)} for {dataset}: allowed are "
                            f"{', '.join(sorted(_SHARED_KEYS))}")
        for key in ("dir", "download", "num_workers"):  # image data sets only
            data.pop(key, None)
        source = data.pop("source", "auto")
        if source not in ("auto", "builtin"):
            raise UserError(f"invalid data.source {source!r} for {dataset}: the mixture is built in; allowed are "
                            f"auto, builtin")
        return module, MixtureDataModule(dataset, batch_size, per_step, seed, **data)
    unknown = sorted(set(data) - _VISION_KEYS)
    if unknown:
        raise UserError(f"unknown data key(s) {', '.join(unknown)} for {dataset}: allowed are "
                        f"{', '.join(sorted(_VISION_KEYS))}")
    data.pop("epoch_length", None)
    return module, ImageGANDataModule(dataset, batch_size, per_step, seed, **data)
