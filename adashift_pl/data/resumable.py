"""Exact resume at any step for the tasks that read a DataLoader (vision, NMT, WGAN-GP on images).

A resumed run must see the same batches, in the same order, with the same augmentation, as a run
that was never interrupted -- whatever the number of DataLoader workers. Nothing here keeps a
random-number generator's state; every random choice is a function of integer keys instead:

    the order of epoch e       a permutation drawn from a generator seeded by (seed, e), the same on
                               every rank; rank r takes every world_size-th element (DistributedSampler)
    the augmentation of        torch's RNG seeded by (seed, e, i) for that one call, so it does not
      sample i in epoch e      matter which worker, process or session draws it
    the position in the epoch  the number of batches the loader handed out, saved in the checkpoint

The position travels with the DataModule's own state (`ResumableDataModule.state_dict`), which
Lightning restores before it asks for any loader. (Lightning's other route, a loader with
`state_dict`, is restored only if no one touched the training loader before the loops were
restored; `trainer.estimated_stepping_batches` in an `on_fit_start` does -- Lightning issue #20550.)

`UnfinishedEpoch` is the trainer's half: Lightning counts an epoch cut short by `max_steps` or
`trainer.should_stop` (Ctrl-C) as finished, so a run resumed from such a checkpoint starts the
next epoch one too early -- a different data order, and an epoch counter one ahead; and with
`max_steps` set it runs an empty epoch after resuming from the end of one. The callback writes
checkpoint loop states Lightning resumes correctly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["keyed_seed", "seeded_call", "ResumableSampler", "ResumableLoader", "ResumableDataModule",
           "UnfinishedEpoch"]


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed that is a function of the integer keys only (well mixed: neighbouring keys
    give unrelated streams, unlike seed + epoch)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) % 2**63


def seeded_call(fn: Callable, arg: Any, *keys: int) -> Any:
    """`fn(arg)` with torch's CPU generator seeded by `keys` for the call and restored after it.

    Any torchvision transform draws from that generator, so a random crop/flip becomes a
    function of (seed, epoch, index) without rewriting it.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(keyed_seed(*keys))
    try:
        return fn(arg)
    finally:
        generator.set_state(state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler's contract (Lightning leaves it in place under DDP): each rank its share of
    one permutation per epoch (`set_epoch`), padded to equal shares, the same on every rank.

    The permutation of epoch e is drawn from `keyed_seed(seed, e)`. `start` (set by ResumableLoader)
    skips that many of this rank's samples in the next iteration. `yield_epoch` yields (index, epoch)
    pairs, for a data set whose augmentation is keyed by the epoch (vision's TransformSubset).
    """

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 yield_epoch: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.yield_epoch = yield_epoch
        self.start = 0

    def __iter__(self) -> Iterator:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(keyed_seed(self.seed, self.epoch)))
            order = order.tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n  # repeat the first ones until every rank has num_samples, as DistributedSampler
        if pad > 0:
            order += (order * math.ceil(pad / n))[:pad]
        share = order[self.rank:: self.num_replicas][self.start:]
        return iter([(i, self.epoch) for i in share] if self.yield_epoch else share)


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler that knows its position: the epoch and how many batches of
    it were handed out (to the training loop: DataLoader workers read ahead, so the sampler cannot tell).

    `resume(position)` before the next iteration makes it start there.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch, self._batches = getattr(sampler, "epoch", 0), 0
        self._resume_at: tuple[int, int] | None = None

    def position(self, epoch_length: int | None = None, trained: int | None = None) -> dict[str, int]:
        """Where the next batch comes from: {"epoch", "batches"}; after the epoch's last batch (the
        loader's length, or the trainer's `epoch_length` under limit_train_batches), the next epoch.

        `trained`: how many of this epoch's batches the trainer has trained on. A run stopped by a
        signal stops after Lightning fetched the next step's batch (adashift_pl.run.RunCallback
        .on_train_batch_start); that batch was handed out but not trained on, so it does not count."""
        batches = self._batches if trained is None else min(self._batches, trained)
        if batches >= (epoch_length or len(self)):
            return {"epoch": self._epoch + 1, "batches": 0}
        return {"epoch": self._epoch, "batches": batches}

    def resume(self, position: dict[str, int]) -> None:
        epoch, batches = int(position["epoch"]), int(position["batches"])
        self.sampler.set_epoch(epoch)
        self._epoch, self._batches, self._resume_at = epoch, batches, (epoch, batches)

    def __iter__(self) -> Iterator:
        # A generator: the body runs at the first next(), after the trainer's set_epoch for this epoch.
        if not isinstance(self.sampler, ResumableSampler):  # Lightning swapped it (overfit_batches): plain
            yield from super().__iter__()
            return
        epoch, skip = self.sampler.epoch, 0
        if self._resume_at is not None:
            if epoch != self._resume_at[0]:
                raise RuntimeError(
                    f"the trainer resumed epoch {epoch}, but the checkpoint's training data stopped in epoch "
                    f"{self._resume_at[0]}; add adashift_pl.data.resumable.UnfinishedEpoch() to the Trainer's "
                    f"callbacks (Lightning counts an epoch cut short as finished)")
            skip, self._resume_at = self._resume_at[1], None
        self.sampler.start = skip * (self.batch_size or 1)
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    # The position is saved by ResumableDataModule (see the module docstring). Declaring the Stateful
    # protocol here tells Lightning this loader resumes mid-epoch (it warns about a plain DataLoader).
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ResumableDataModule(L.LightningDataModule):
    """A LightningDataModule whose training loader, built by `resumable_loader`, resumes exactly:
    its position is the DataModule's state in every checkpoint."""

    _train_loader: ResumableLoader | None = None
    _resume_position: dict | None = None

    def resumable_loader(self, dataset: Dataset, *, seed: int, yield_epoch: bool = False,
                         **loader_kwargs: Any) -> ResumableLoader:
        """A shuffled training loader over `dataset` (this rank's share under DDP); loader_kwargs go to
        DataLoader (batch_size, num_workers, drop_last, ...)."""
        shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        sampler = ResumableSampler(dataset, seed=seed, yield_epoch=yield_epoch,
                                   num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0))
        # The generator only seeds the workers (base seed); nothing random is drawn in them but keyed.
        loader = ResumableLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                                 **loader_kwargs)
        if self._resume_position is not None:
            loader.resume(self._resume_position)
            self._resume_position = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        trainer, loader = self.trainer, self._train_loader
        if trainer is None:
            return {"train_loader": loader.position()}
        trained = None
        if trainer.training and loader._epoch == trainer.current_epoch:  # training the loader's epoch
            trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_loader": loader.position(trainer.num_training_batches, trained)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = state_dict.get("train_loader")


class UnfinishedEpoch(Callback):
    """Make every checkpoint's loop state resume at the right batch of the right epoch.

    Two states Lightning writes but cannot resume from (the batches trained, the data order and the
    epoch counter of the resumed run go wrong):

    - training stopped mid-epoch (max_steps, `trainer.should_stop` as on Ctrl-C): Lightning marks the
      epoch processed on its way out, so a resumed run would begin the next epoch. Recorded here as
      unfinished -- the state Lightning itself writes on SIGTERM -- so the resumed run finishes it.
      (An epoch ended on purpose by `on_train_batch_start` returning -1 is treated the same way.)
    - the epoch is complete (an epoch-end checkpoint, or max_steps at an epoch's last batch): with
      max_steps set, Lightning restores the finished epoch's batch count into the next epoch and runs
      that one empty (Lightning issue #19617). Recorded here as "next epoch not begun".
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed
        epochs = loop.epoch_progress.current
        total = trainer.num_training_batches
        marked_processed = epochs.processed == epochs.started
        if not marked_processed or done == 0 or not math.isfinite(total) or "loops" not in checkpoint:
            return  # mid-epoch or before the first batch: Lightning's own state resumes correctly
        state = checkpoint["loops"]["fit_loop"]
        progress = state["epoch_progress"]
        if done < total:  # cut short
            for part in ("total", "current"):
                progress[part]["processed"] -= 1
                progress[part]["completed"] = min(progress[part]["completed"], progress[part]["processed"])
            checkpoint["epoch"] = progress["current"]["completed"]
        else:  # complete: what the next epoch's start would do (FitLoop on_advance_end, TrainingEpochLoop.reset)
            for part in ("total", "current"):
                progress[part]["completed"] = progress[part]["processed"]
            batches = state["epoch_loop.batch_progress"]
            batches["current"] = {k: 0 for k in batches["current"]}
            batches["is_last_batch"] = False
