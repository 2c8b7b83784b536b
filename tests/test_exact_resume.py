"""DataLoader-based tasks resume bit-identically at any step (adashift_pl.data.resumable).

A run of N steps without interruption is compared with one stopped at step k and resumed to N:
every parameter and optimizer-state tensor (torch.equal), the global step, the epoch counter
(the loop's epoch progress, the checkpoint's epoch, summary.json) and the data position. Stops:
inside the first steps, exactly at an epoch's end, mid-epoch; by max_steps, by Ctrl-C (SIGINT),
by SIGTERM (in a subprocess), by resuming a periodic checkpoint (what a kill -9 leaves); resumed
with 0 or 2 DataLoader workers. Tasks: mnist_logreg, cifar10_resnet18 (random crop + flip; 10
batches an epoch like the others), nmt (dropout on). The data sets are the synthetic stand-ins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adashift_pl import train
from adashift_pl.data.resumable import ResumableSampler, keyed_seed
from adashift_pl.data.vision import CIFAR10DataModule

FAST = ["--correlation", "false", "--test", "false", "--trainer.log_every_n_steps", "5", "--optimizer", "adam"]
MNIST = ["--task", "mnist_logreg", "--data.source", "synthetic", "--data.synthetic_sizes", "[100,20,20]",
         "--data.batch_size", "10", "--trainer.val_check_interval", "7"]  # validation mid-epoch, across epochs
CIFAR = ["--task", "cifar10_resnet18", "--model.width", "4", "--data.source", "synthetic",
         "--data.synthetic_sizes", "[40,8,8]", "--data.batch_size", "4", "--data.num_workers", "0",
         "--trainer.val_check_interval", "7"]  # random crop + flip on
NMT = ["--task", "nmt", "--model.embed_dim", "8", "--model.hidden", "16", "--model.dropout", "0.2",
       "--model.beam_width", "1", "--data.synthetic_sizes", "[200,20,20]", "--data.batch_size", "20",
       "--data.eval_batch_size", "20", "--trainer.val_check_interval", "7"]  # dropout on


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


def fit(log_dir: Path, *argv: str) -> int:
    return train.main(["--log-dir", str(log_dir), *argv, *FAST])


# A subprocess that sends itself a real signal at the end of step argv[1] (the LightningModule's
# base-class on_train_batch_end: any task without its own); the rest of argv goes to train.main.
SIGNAL_AT_STEP = """
import os, signal, sys
import lightning
from adashift_pl import train
step, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
def hook(self, outputs, batch, batch_idx):
    if self.global_step == step:
        os.kill(os.getpid(), sig)
lightning.LightningModule.on_train_batch_end = hook
sys.exit(train.main(sys.argv[3:]))
"""


def ctrl_c_at(monkeypatch, step: int) -> None:
    """SIGINT to this process at the end of `step` (in-process is safe: train.py's handler only sets a flag)."""
    import lightning

    def hook(self, outputs, batch, batch_idx):
        if self.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(lightning.LightningModule, "on_train_batch_end", hook)


def fit_until_signal(log_dir: Path, step: int, sig: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, str(step), sig, "--log-dir", str(log_dir), *argv,
                           *FAST, "--num-threads", "1"], capture_output=True, text=True, timeout=600)


def run_dir(log_dir: Path) -> Path:
    (summary,) = log_dir.rglob("summary.json")
    return summary.parent


def final(log_dir: Path) -> tuple[dict, dict]:
    d = run_dir(log_dir)
    return (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False),
            json.loads((d / "summary.json").read_text()))


def data_position(ckpt: dict) -> dict:
    (key,) = [k for k in ckpt if k.endswith("DataModule")]
    return ckpt[key]["train_loader"]


def assert_same_state(a, b, where: str = "") -> None:
    """Equal nested structures; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_end(full_dir: Path, resumed_dir: Path) -> None:
    (ca, sa), (cb, sb) = final(full_dir), final(resumed_dir)
    assert cb["global_step"] == ca["global_step"] and sb["global_step"] == sa["global_step"]
    assert cb["epoch"] == ca["epoch"] and sb["epochs"] == sa["epochs"]  # the epoch counter
    ea, eb = (c["loops"]["fit_loop"]["epoch_progress"]["current"] for c in (ca, cb))
    assert eb == ea
    assert data_position(cb) == data_position(ca)
    assert_same_state(ca["state_dict"], cb["state_dict"], "state_dict")
    assert_same_state(ca["optimizer_states"], cb["optimizer_states"], "optimizer_states")


# --------------------------------------------------------------------------- the sampler and the loader

def test_every_rank_takes_its_share_of_one_permutation_per_epoch():
    data = range(23)  # not a multiple of 2 or 3: padded like DistributedSampler
    for world in (1, 2, 3):
        shares = [list(ResumableSampler(data, seed=5, num_replicas=world, rank=r)) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        interleaved = [shares[r][i] for i in range(len(shares[0])) for r in range(world)]
        perm = list(ResumableSampler(data, seed=5))  # world 1: the permutation itself
        assert sorted(perm) == list(data)
        assert interleaved == (perm + perm)[: len(interleaved)]  # the same permutation on every rank
    s = ResumableSampler(data, seed=5)
    epoch0 = list(s)
    s.set_epoch(1)
    assert list(s) != epoch0
    # keyed, not seed + epoch: seed 6's epoch 0 is not seed 5's epoch 1
    assert list(ResumableSampler(data, seed=6)) != list(s)
    assert keyed_seed(5, 1) != keyed_seed(6, 0)


def _cifar(tmp_path, **kw) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(dir=str(tmp_path), source="synthetic", synthetic_sizes=[20, 4, 4], batch_size=4,
                           pin_memory=False, **kw)
    dm.setup("fit")
    return dm


def _epochs(loader, n: int) -> list[torch.Tensor]:
    out = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        out += [x for x, _ in loader]
    return out


def test_augmented_batches_do_not_depend_on_workers_and_resume_mid_epoch(tmp_path):
    dm0, dm2 = _cifar(tmp_path), _cifar(tmp_path, num_workers=2, persistent_workers=False)
    plain = _epochs(dm0.train_dataloader(), 2)
    assert len(plain) == 10
    assert_same_state(plain, _epochs(dm2.train_dataloader(), 2))  # 2 workers: the same crops and flips
    # the augmentation is random: the same image in another epoch is cropped/flipped differently
    first = dm0.train_set[(0, 0)][0]
    assert torch.equal(first, dm0.train_set[(0, 0)][0]) and not torch.equal(first, dm0.train_set[(0, 1)][0])

    loader = dm0.train_dataloader()
    # before the first batch, mid-epoch, at the end of epoch 0 (resumes at epoch 1), mid epoch 1
    for epoch, done in ((0, 0), (0, 3), (0, 5), (1, 2)):
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        for _ in range(done):
            next(it)
        next_epoch = epoch + (done == 5)
        assert loader.position() == {"epoch": next_epoch, "batches": done % 5}
        resumed = _cifar(tmp_path, num_workers=2, persistent_workers=False)
        resumed.load_state_dict({"train_loader": loader.position()})
        rest = resumed.train_dataloader()
        rest.sampler.set_epoch(next_epoch)  # what the trainer does before an epoch
        assert_same_state([x for x, _ in rest], plain[5 * epoch + done: 5 * (next_epoch + 1)])


def test_the_loader_refuses_an_epoch_other_than_the_one_it_stopped_in(tmp_path):
    dm = _cifar(tmp_path)
    dm.load_state_dict({"train_loader": {"epoch": 0, "batches": 2}})
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match="resumed epoch 1, but .* stopped in epoch 0"):
        next(iter(loader))


def test_under_ddp_each_rank_resumes_its_own_share(tmp_path):
    """The DataModule asks the trainer for the rank's shard (Trainer.distributed_sampler_kwargs)."""
    batches = {}
    for rank in (0, 1):
        dm = _cifar(tmp_path)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.train_dataloader()
        assert len(loader) == 3  # 20 images / 2 ranks / batch 4, padded
        batches[rank] = [x for x, _ in loader]
        resumed = _cifar(tmp_path)
        resumed.trainer = dm.trainer
        resumed.load_state_dict({"train_loader": {"epoch": 0, "batches": 1}})
        assert_same_state([x for x, _ in resumed.train_dataloader()], batches[rank][1:])
    assert not any(torch.equal(a, b) for a in batches[0] for b in batches[1])


# --------------------------------------------------------------------------- whole runs

def test_mnist_stopped_by_max_steps_resumes_bit_identically(tmp_path):
    assert fit(tmp_path / "full", *MNIST, "--trainer.max_steps", "25") == 0
    for stop in (2, 10, 17):  # inside the first steps, at the end of epoch 0, mid-epoch
        part = tmp_path / f"part{stop}"
        assert fit(part, *MNIST, "--trainer.max_steps", str(stop)) == 0
        ckpt, _ = final(part)
        assert ckpt["epoch"] == stop // 10  # an epoch cut short is not counted as finished
        assert data_position(ckpt) == {"epoch": stop // 10, "batches": stop % 10}
        assert fit(part, "--task", "mnist_logreg", "--optimizer", "adam", "--resume", "last",
                   "--trainer.max_steps", "25") == 0
        assert_same_end(tmp_path / "full", part)


def test_an_epoch_shortened_by_limit_train_batches_resumes_bit_identically(tmp_path):
    limited = [*MNIST, "--trainer.limit_train_batches", "6"]  # epochs of 6 of the loader's 10 batches
    assert fit(tmp_path / "full", *limited, "--trainer.max_steps", "15") == 0
    assert fit(tmp_path / "part", *limited, "--trainer.max_steps", "6") == 0  # the end of epoch 0
    assert data_position(final(tmp_path / "part")[0]) == {"epoch": 1, "batches": 0}
    assert fit(tmp_path / "part", "--task", "mnist_logreg", "--optimizer", "adam", "--resume", "last",
               "--trainer.max_steps", "15") == 0
    assert_same_end(tmp_path / "full", tmp_path / "part")


def test_mnist_ctrl_c_at_an_epoch_end_resumed_with_two_workers_is_bit_identical(tmp_path, monkeypatch):
    assert fit(tmp_path / "full", *MNIST, "--trainer.max_steps", "25") == 0
    ctrl_c_at(monkeypatch, 10)
    assert fit(tmp_path / "part", *MNIST, "--trainer.max_steps", "25") == 130
    monkeypatch.undo()
    ckpt, summary = final(tmp_path / "part")
    # Ctrl-C in epoch 0's last step: the run stops before step 11, exactly at the end of epoch 0
    assert summary["status"] == "interrupted" and ckpt["global_step"] == 10 and ckpt["epoch"] == 1
    # resumed with 2 DataLoader workers (the first session had none): the same batches
    assert fit(tmp_path / "part", "--task", "mnist_logreg", "--optimizer", "adam", "--resume", "last",
               "--data.num_workers", "2") == 0
    assert_same_end(tmp_path / "full", tmp_path / "part")


def test_cifar_with_augmentation_sigterm_mid_epoch_resumed_with_two_workers_is_bit_identical(tmp_path):
    assert fit(tmp_path / "full", *CIFAR, "--trainer.max_steps", "14") == 0
    p = fit_until_signal(tmp_path / "part", 6, "SIGTERM", *CIFAR, "--trainer.max_steps", "14")
    assert p.returncode == 143, p.stderr[-3000:]
    ckpt, summary = final(tmp_path / "part")
    assert summary["status"] == "interrupted" and ckpt["global_step"] == 6 and data_position(ckpt) == {
        "epoch": 0, "batches": 6}
    assert fit(tmp_path / "part", "--task", "cifar10_resnet18", "--optimizer", "adam", "--resume", "last",
               "--data.num_workers", "2") == 0
    assert_same_end(tmp_path / "full", tmp_path / "part")


def test_epoch_based_run_interrupted_mid_epoch_resumes_bit_identically(tmp_path, monkeypatch):
    # max_steps -1: the progress line asks Lightning for estimated_stepping_batches before the
    # checkpoint's loops are restored, which loses a loader's own state (Lightning #20550).
    epochs = [*MNIST, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3"]
    assert fit(tmp_path / "full", *epochs) == 0
    ctrl_c_at(monkeypatch, 13)
    assert fit(tmp_path / "part", *epochs) == 130
    monkeypatch.undo()
    ckpt, _ = final(tmp_path / "part")
    assert ckpt["global_step"] == 13 and ckpt["epoch"] == 1  # the step the signal came in, mid-epoch 1
    assert fit(tmp_path / "part", "--task", "mnist_logreg", "--optimizer", "adam", "--resume", "last") == 0
    assert_same_end(tmp_path / "full", tmp_path / "part")
    assert final(tmp_path / "full")[1]["global_step"] == 30


def test_resuming_periodic_checkpoints_is_bit_identical(tmp_path):
    """What a kill -9 leaves: the latest periodic checkpoint; at an epoch's end and mid-epoch."""
    per_epoch = ["--trainer.val_check_interval", "1.0", "--trainer.check_val_every_n_epoch", "1",
                 "--checkpoint.keep", "-1"]
    assert fit(tmp_path / "full", *MNIST, *per_epoch, "--trainer.max_steps", "25") == 0
    steps = ["--checkpoint.every_n_train_steps", "3", "--checkpoint.keep", "-1"]
    assert fit(tmp_path / "steps", *MNIST, *steps, "--trainer.max_steps", "25") == 0
    for log_dir, name in ((tmp_path / "full", "periodic-epoch=0-step=10.ckpt"),  # saved at the epoch's end
                          (tmp_path / "steps", "periodic-epoch=1-step=15.ckpt")):  # mid-epoch
        killed = tmp_path / f"killed-{name}"
        shutil.copytree(run_dir(log_dir), killed / "mnist_logreg" / "adam" / "version_0")
        ckpt = killed / "mnist_logreg" / "adam" / "version_0" / "checkpoints" / name
        for other in ckpt.parent.glob("*.ckpt"):
            if other != ckpt:
                other.unlink()
        assert fit(killed, "--resume", str(ckpt), "--trainer.max_steps", "25") == 0
        assert_same_end(tmp_path / "full", killed)


def test_nmt_with_dropout_resumes_bit_identically(tmp_path):
    assert fit(tmp_path / "full", *NMT, "--trainer.max_steps", "25") == 0
    for stop in (10, 17):  # the end of epoch 0, mid-epoch
        part = tmp_path / f"part{stop}"
        assert fit(part, *NMT, "--trainer.max_steps", str(stop)) == 0
        assert data_position(final(part)[0]) == {"epoch": stop // 10, "batches": stop % 10}
        assert fit(part, "--task", "nmt", "--optimizer", "adam", "--resume", "last", "--trainer.max_steps", "25") == 0
        assert_same_end(tmp_path / "full", part)
