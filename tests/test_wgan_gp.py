"""WGAN-GP task: gradient penalty by hand, n_critic scheduling and step counting, the fixed generator stays
fixed, a short full run learns the 2-D mixture, resume is exact."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from adashift_pl.errors import UserError
from adashift_pl.tasks import wgan_gp
from adashift_pl.tasks.wgan_gp import gradient_penalty, mode_stats

ADAM = {"name": "adam", "lr": 1e-3, "betas": [0.5, 0.9]}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


def trainer(max_steps: int, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, "log_every_n_steps": 1, **kw}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, **kw)


def small(mode: str, optimizer: dict = ADAM, seed: int = 0, epoch_length: int = 4, **model):
    L.seed_everything(seed)
    model = {"mode": mode, "hidden": 32, "n_critic": 5, "sample_every_n_steps": 1000, "num_samples": 256, **model}
    return wgan_gp.build(model, {"batch_size": 64, "epoch_length": epoch_length}, optimizer, seed)


# --------------------------------------------------------------------------- gradient penalty

def test_gradient_penalty_linear_critic_by_hand():
    critic = nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        critic.bias.fill_(0.5)
    real, fake, eps = torch.randn(7, 2), torch.randn(7, 2), torch.rand(7, 1)
    gp = gradient_penalty(critic, real, fake, eps)
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2, rel=1e-6)  # grad_x (w.x + b) = w, ||w|| = 5
    gp.backward()  # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    torch.testing.assert_close(critic.weight.grad, torch.tensor([[4.8, 6.4]]))
    assert critic.bias.grad is None  # the penalty does not depend on the bias


def test_gradient_penalty_interpolates_by_hand():
    class HalfSquare(nn.Module):  # D(x) = ||x||^2 / 2, so grad_x D(x_hat) = x_hat
        def forward(self, x):
            return 0.5 * x.pow(2).sum(1, keepdim=True)

    real = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    fake = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    eps = torch.tensor([[0.5], [1.0], [0.2]])
    # x_hat = (0.5, 0), (0, 2), (0.6, 0.8): norms 0.5, 2, 1 -> ((-.5)^2 + 1^2 + 0^2) / 3
    expected = (0.25 + 1.0 + 0.0) / 3
    assert gradient_penalty(HalfSquare(), real, fake, eps).item() == pytest.approx(expected, rel=1e-6)
    # The AMP recipe (differentiate the scaled output, unscale the gradient) gives the same number.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    assert gradient_penalty(HalfSquare(), real, fake, eps, scaler).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- step scheduling

class CountSteps(Callback):
    """Records which optimizer stepped, in order, through torch's step post-hooks."""

    def on_fit_start(self, trainer, pl_module):
        self.calls = []
        for i, opt in enumerate(trainer.optimizers):
            opt.register_step_post_hook(lambda *_, i=i: self.calls.append(i))


def test_full_mode_runs_n_critic_critic_steps_per_counted_generator_step():
    module, data = small("full", n_critic=3)
    counter = CountSteps()
    t = trainer(4, callbacks=[counter])
    t.fit(module, data)
    assert counter.calls == [0, 0, 0, 1] * 4  # optimizer 0 = critic, 1 = generator
    assert t.global_step == 4  # max_steps counts generator iterations
    assert t.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed == 4


def test_fixed_generator_mode_counts_critic_steps_and_never_changes_the_generator():
    module, data = small("fixed_generator")
    generator_before = copy.deepcopy(module.generator.state_dict())
    critic_before = copy.deepcopy(module.critic.state_dict())
    counter = CountSteps()
    t = trainer(6, callbacks=[counter])
    t.fit(module, data)
    assert counter.calls == [0] * 6 and len(t.optimizers) == 1
    assert t.global_step == 6
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, generator_before[key]), key
    assert any(not torch.equal(v, critic_before[k]) for k, v in module.critic.state_dict().items())


def test_fixed_dcgan_generator_keeps_its_batchnorm_statistics(tmp_path):
    """The image path (synthetic MNIST stand-in, DCGAN nets): a fixed generator's BatchNorm buffers stay put."""
    L.seed_everything(0)
    model = {"mode": "fixed_generator", "width": 8, "latent_dim": 16, "sample_every_n_steps": 1000,
             "num_samples": 16}
    data = {"dataset": "mnist", "batch_size": 8, "source": "synthetic", "dir": str(tmp_path),
            "synthetic_sizes": [64, 8, 8]}
    module, dm = wgan_gp.build(model, data, ADAM, 0)
    assert dm.data_source == "synthetic"
    before = copy.deepcopy(module.generator.state_dict())
    t = trainer(3)
    t.fit(module, dm)
    assert t.global_step == 3
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert module.generator(module.fixed_noise).shape == (16, 1, 28, 28)


# --------------------------------------------------------------------------- learning and resuming

class Record(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses = getattr(self, "losses", []) + [trainer.callback_metrics["train/loss"].item()]


def test_short_full_run_lowers_the_critic_loss_and_moves_samples_toward_the_modes():
    module, data = small("full", optimizer={"name": "adam", "lr": 1e-3, "betas": [0.5, 0.9]},
                         generator_optimizer={"name": "adam", "lr": 1e-3, "betas": [0.5, 0.9]},
                         hidden=64, epoch_length=1000)
    with torch.no_grad():
        before = mode_stats("gaussians8", module.generator(module.fixed_noise))
    record = Record()
    trainer(150, callbacks=[record]).fit(module, data)
    with torch.no_grad():
        after = mode_stats("gaussians8", module.generator(module.fixed_noise))
    first, last = record.losses[0], sum(record.losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    assert after["mode_distance"] < 0.5 * before["mode_distance"], (before, after)


@pytest.mark.parametrize("mode", ["full", "fixed_generator"])
def test_resume_continues_exactly(tmp_path, mode):
    adashift = {"name": "adashift", "lr": 1.5e-4, "betas": [0.0, 0.999], "keep_num": 1}  # Table 7
    steps, cut = 7, 3  # epoch_length 4: the cut is mid-epoch and the run crosses an epoch boundary

    straight, data = small(mode, adashift)
    trainer(steps).fit(straight, data)

    first, data = small(mode, adashift)
    t = trainer(cut)
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "cut.ckpt")
    resumed, data = small(mode, adashift, seed=0)
    t = trainer(steps)
    t.fit(resumed, data, ckpt_path=tmp_path / "cut.ckpt")
    assert t.global_step == steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- user errors

@pytest.mark.parametrize("model, data, match", [
    ({"mode": "both"}, {}, "model.mode 'both'"),
    ({"n_critic": 0}, {}, "model.n_critic 0"),
    ({}, {"dataset": "svhn"}, "data.dataset 'svhn'"),
    ({}, {"source": "real"}, "data.source 'real'"),
    ({}, {"shuffle": True}, "unknown data key"),
    ({"mode": "full", "generator_optimizer": {"name": "rmsprop"}}, {}, "model.generator_optimizer"),
    ({"generator_checkpoint": "/nonexistent/g.ckpt"}, {}, "is not a file"),
])
def test_user_errors_name_the_value(model, data, match):
    with pytest.raises(UserError, match=match):
        wgan_gp.build(model, data, ADAM, 0)


def test_generator_checkpoint_loads_a_trained_generator(tmp_path):
    module, data = small("full", n_critic=1)
    t = trainer(2)
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "gan.ckpt")
    fixed, _ = small("fixed_generator", generator_checkpoint=str(tmp_path / "gan.ckpt"), seed=1)
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, fixed.generator.state_dict()[key]), key
    with pytest.raises(UserError, match="does not fit"):
        small("fixed_generator", generator_checkpoint=str(tmp_path / "gan.ckpt"), hidden=16)


def test_resume_through_train_py_continues_exactly(tmp_path):
    from adashift_pl.train import main

    common = ["--task", "wgan_gp", "--optimizer", "adashift", "--log-dir", str(tmp_path), "--model.mode", "full",
              "--model.hidden", "16", "--model.n_critic", "2", "--data.batch_size", "32", "--data.epoch_length", "4"]
    assert main([*common, "--run-name", "straight", "--trainer.max_steps", "7"]) == 0
    assert main([*common, "--run-name", "cut", "--trainer.max_steps", "3"]) == 0
    run = tmp_path / "wgan_gp" / "adashift"
    assert main(["--resume", str(run / "cut" / "checkpoints" / "last.ckpt"), "--log-dir", str(tmp_path),
                 "--trainer.max_steps", "7"]) == 0
    straight, resumed = (torch.load(run / name / "checkpoints" / "last.ckpt", weights_only=False)
                         for name in ("straight", "cut"))
    assert straight["global_step"] == resumed["global_step"] == 7
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs(precision):
    from lightning.pytorch.plugins import MixedPrecision

    module, data = small("full", n_critic=2)
    # On CPU Lightning turns 16-mixed into bf16-mixed; an explicit plugin with a CPU GradScaler exercises the
    # scaler path (the AMP gradient-penalty recipe) that 16-mixed takes on a GPU.
    kw = ({"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]} if precision == "16-mixed"
          else {"precision": precision})
    counter, record = CountSteps(), Record()
    t = trainer(4, callbacks=[counter, record], **kw)
    before = copy.deepcopy(module.critic.state_dict())
    t.fit(module, data)
    assert t.global_step == 4
    if precision == "bf16-mixed":
        assert counter.calls == [0, 0, 1] * 4
    else:  # the scaler skips the first critic step (overflow at scale 2^16) and halves the scale
        assert counter.calls == [0, 1] + [0, 0, 1] * 3 and t.precision_plugin.scaler.get_scale() == 2.0 ** 15
    assert all(math.isfinite(x) for x in record.losses)  # skipped steps are not logged
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in module.critic.state_dict().items())
