"""The five vision tasks: architectures (parameter counts), configs, metrics, and a few training steps.

Training runs on the synthetic stand-ins with shrunk networks (ResNet width 8,
DenseNet depth 10) so the whole file stays fast on 2 CPU cores; the full
architectures are checked by their parameter counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer
from adashift_pl.tasks import get_task
from adashift_pl.tasks._classifier import num_parameters
from adashift_pl.tasks.cifar10_densenet import DenseNetBC
from adashift_pl.tasks.cifar10_resnet18 import ResNet18CIFAR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


VISION = ["mnist_logreg", "mnist_mlp", "cifar10_resnet18", "cifar10_densenet", "tinyimagenet_densenet"]


def test_parameter_counts_match_the_architectures():
    assert num_parameters(ResNet18CIFAR()) == 11_173_962  # ResNet-18, CIFAR stem: "11.17M"
    assert num_parameters(DenseNetBC()) == 769_162  # DenseNet-BC-100 k=12: "0.8M" (Huang et al., Table 2)
    assert num_parameters(DenseNetBC(200)) == 769_162 + 343 * 190  # same body, 200-way classifier
    logreg, _ = get_task("mnist_logreg").build({}, {"source": "synthetic"}, {"name": "sgd"}, 0)
    assert num_parameters(logreg) == 784 * 10 + 10
    mlp, _ = get_task("mnist_mlp").build({}, {"source": "synthetic"}, {"name": "sgd"}, 0)
    assert num_parameters(mlp) == (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert not any(isinstance(m, torch.nn.ReLU) for m in mlp.modules())  # Section 5.2: no activation


def test_resnet_has_cifar_stem_and_densenet_handles_64px():
    net = ResNet18CIFAR()
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    with torch.no_grad():
        assert DenseNetBC(200, depth=10, growth_rate=4)(torch.zeros(2, 3, 64, 64)).shape == (2, 200)


def test_memory_efficient_densenet_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, efficient = DenseNetBC(10, depth=10, growth_rate=4), DenseNetBC(10, depth=10, growth_rate=4,
                                                                          memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain(x).square().sum().backward()
    efficient(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_channels_last_gives_the_same_logits():
    module, _ = get_task("cifar10_resnet18").build({"width": 4}, {"source": "synthetic"}, {"name": "adam"}, 0)
    nhwc, _ = get_task("cifar10_resnet18").build({"width": 4, "channels_last": True}, {"source": "synthetic"},
                                                 {"name": "adam"}, 0)
    nhwc.load_state_dict(module.state_dict())
    assert nhwc.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module.eval()(x), nhwc.eval()(x), atol=1e-5)


@pytest.mark.parametrize("task", VISION)
def test_config_builds_and_every_optimizer_block_is_valid(task):
    cfg = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    assert cfg["task"] == task
    module, dm = get_task(task).build(cfg["model"], {**cfg["data"], "source": "synthetic"},
                                      {"name": "adam"}, cfg["seed"])
    assert dm.data_source == "synthetic"
    assert get_task(task).MONITOR == ("val/acc", "max")
    for name, hyper in cfg["optimizer"].items():
        opt = build_optimizer(name, module, **hyper)
        assert opt.param_groups[0]["lr"] == hyper["lr"]


def test_paper_hyper_parameters_in_configs():
    read = lambda t: yaml.safe_load((CONFIGS / f"{t}.yaml").read_text())["optimizer"]  # noqa: E731
    t5, t6, t9 = read("mnist_logreg"), read("mnist_mlp"), read("cifar10_resnet18")
    assert t5["adashift"] == {"lr": 1e-2, "betas": [0.0, 0.999], "keep_num": 1}  # Table 5
    assert t5["sgd"]["lr"] == 0.1 and t5["non-adashift"]["lr"] == 1e-3  # Table 5
    assert t6["sgd"]["lr"] == 1e-3 and t6["non-adashift"]["lr"] == 5e-4  # Table 6
    assert t9["adashift"] == {"lr": 1e-2, "betas": [0.9, 0.999], "keep_num": 10}  # Table 9
    assert read("cifar10_densenet") == t9 == read("tinyimagenet_densenet")


def test_no_weight_decay_on_biases_and_norm_parameters():
    module, _ = get_task("cifar10_resnet18").build(
        {"width": 4}, {"source": "synthetic"}, {"name": "adam", "weight_decay": 5e-4}, 0)
    opt = module.configure_optimizers()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in module.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name  # conv/linear weights only


def test_bad_model_settings():
    with pytest.raises(UserError, match="activation"):
        get_task("mnist_mlp").build({"activation": "swish"}, {"source": "synthetic"}, {"name": "adam"}, 0)
    with pytest.raises(UserError, match="depth"):
        get_task("cifar10_densenet").build({"depth": 99}, {"source": "synthetic"}, {"name": "adam"}, 0)
    with pytest.raises(TypeError):  # unknown key: the training command turns this into a UserError
        get_task("cifar10_resnet18").build({"depht": 3}, {"source": "synthetic"}, {"name": "adam"}, 0)


class _Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


# (model overrides, synthetic sizes, batch size, optimizer, steps). The conv nets are shrunk and see the
# same 16 images repeatedly, so a dozen steps is enough to show the loss going down.
TRAIN_CASES = {
    "mnist_logreg": ({}, [256, 32, 32], 32, {"name": "adashift", "lr": 1e-2, "betas": [0.0, 0.999], "keep_num": 1}, 24),
    "mnist_mlp": ({}, [256, 32, 32], 32, {"name": "adashift", "lr": 1e-2, "betas": [0.0, 0.999], "keep_num": 1}, 24),
    "cifar10_resnet18": ({"width": 8}, [16, 8, 8], 8, {"name": "adam", "lr": 1e-2}, 12),
    # 20 steps: with crop + flip, 12 steps cut the loss by only 8-15 % (seeds 0-3), too close to the 10 % asked
    "cifar10_densenet": ({"depth": 10, "growth_rate": 8}, [16, 8, 8], 8, {"name": "adam", "lr": 1e-2}, 20),
    "tinyimagenet_densenet": ({"depth": 10, "growth_rate": 8, "stem_stride": 2}, [16, 8, 8], 8,
                              {"name": "adam", "lr": 1e-2}, 12),
}


@pytest.mark.parametrize("task", VISION)
def test_a_few_steps_reduce_the_training_loss(task, tmp_path):
    model, sizes, batch, optimizer, steps = TRAIN_CASES[task]
    L.seed_everything(0, verbose=False)
    module, dm = get_task(task).build(model, {"source": "synthetic", "dir": str(tmp_path), "synthetic_sizes": sizes,
                                              "batch_size": batch}, optimizer, 0)
    losses = _Losses()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
                        num_sanity_val_steps=0, val_check_interval=steps, check_val_every_n_epoch=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
        fit_keys = set(trainer.logged_metrics)
        val_acc = float(trainer.callback_metrics["val/acc"])
        trainer.test(module, dm, verbose=False)
    k = 4
    first, last = sum(losses.values[:k]) / k, sum(losses.values[-k:]) / k
    assert len(losses.values) == steps and last < 0.9 * first, losses.values
    top5 = task == "tinyimagenet_densenet"
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} | ({"val/acc_top5"} if top5 else set()) == fit_keys
    assert {"test/loss", "test/acc"} | ({"test/acc_top5"} if top5 else set()) == set(trainer.logged_metrics)
    assert 0.0 <= val_acc <= 1.0


def test_bf16_mixed_and_channels_last_train(tmp_path):
    # The GPU settings of a paper-scale run (bf16-mixed, channels_last) exercised on CPU.
    L.seed_everything(0, verbose=False)
    module, dm = get_task("cifar10_resnet18").build(
        {"width": 4, "channels_last": True},
        {"source": "synthetic", "dir": str(tmp_path), "synthetic_sizes": [8, 4, 4], "batch_size": 4},
        {"name": "adashift", "keep_num": 1}, 0)
    losses = _Losses()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[losses], num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    assert len(losses.values) == 3 and all(torch.isfinite(torch.tensor(losses.values)))
