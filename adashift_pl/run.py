"""The run directory's bookkeeping for `python -m adashift_pl.train`.

RunCallback: writes config.yaml and the TensorBoard hparams once, prints plain progress
lines when stdout is not a terminal, tracks the best monitored metric and divergence
(see `DIVERGE_FACTOR`),
stops cleanly on SIGINT, saves checkpoints/last.ckpt at the end of training and on
SIGTERM, stores the resolved config inside every checkpoint (so --resume can check the
hyper-parameters), and builds summary.json. AtomicCheckpointIO: every checkpoint is
written to a temporary file in the same directory and renamed into place, so a crash
never leaves a half-written checkpoint. StepTensorBoardLogger: TensorBoard's x-axis in
the same step count as everything else (optimizer steps taken, trainer.global_step).

Only rank 0 writes files (Lightning's own checkpoint saving is rank-0 already).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adashift_pl.config import dump_yaml, plain
from adashift_pl.files import atomic_write, atomic_write_text


# A run has diverged when a logged loss (a metric whose name ends in "loss") is non-finite, or
# when its magnitude exceeds DIVERGE_FACTOR times that loss's first logged magnitude (floored
# at 1, so a loss that starts near 0 -- the counterexamples' -- is not flagged for ordinary
# growth). An exploded loss stays finite long before it overflows: non-AdaShift on mnist_mlp
# at Table 6's settings went from ~2.3 to ~3e10 with no inf/NaN.
DIVERGE_FACTOR = 1e4


def is_loss_key(name: str) -> bool:
    """train/loss, val/expected_loss, ... and Lightning's forked train/loss_step, train/loss_epoch."""
    return name.endswith(("loss", "loss_step", "loss_epoch"))

class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, fsync, then os.replace into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), binary=True)


def planned_steps(trainer) -> int | None:
    """The optimizer steps this run will have taken when it ends: Lightning's estimate, i.e.
    max_steps or max_epochs x (batches per epoch / accumulation), whichever comes first (None when
    unbounded). Call it once the train loader exists (on_train_start): earlier, Lightning builds the
    loader itself and a resumed run's saved loader state is then never restored into it."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total > 0 else None


class StepTensorBoardLogger(TensorBoardLogger):
    """TensorBoard with one x-axis: the optimizer steps taken when the value was recorded
    (trainer.global_step), the same count as summary.json, checkpoint names and the progress line.

    Lightning itself writes a training step's metrics and an in-training validation at
    global_step - 1 (its batch counter, advanced at the very end of the batch) but epoch-end metrics
    at global_step. Here train/loss at step N is the loss of the batch the N-th step descended on
    (the first point is step 1), val/* at N is measured on the weights after N steps, and lr-* at
    N is the learning rate the next step will use. RunCallback.setup binds the trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_trainer = None

    def log_metrics(self, metrics, step=None) -> None:
        if self.step_trainer is not None:
            step = self.step_trainer.global_step
        super().log_metrics(metrics, step)


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from (None when installed from a wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
        if commit:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _scalar(v) -> float | None:
    try:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                return None
            v = v.detach().float().item()
        return float(v)
    except (TypeError, ValueError):
        return None


class RunCallback(Callback):
    def __init__(self, run_dir: Path, config: dict, hparams: dict, monitor: tuple[str, str] | None,
                 ckpt_key: str, interactive: bool):
        self.run_dir = Path(run_dir)
        self.config = plain(config)
        self.hparams = hparams
        self.monitor = monitor
        self.ckpt_key = ckpt_key
        self.interactive = interactive
        self.interrupted: str | None = None  # "SIGINT" / "SIGTERM" once a signal arrived
        self.best: dict | None = None
        self.diverged = False
        self.diverged_reason: str | None = None
        self.loss_reference: dict[str, float] = {}  # first finite |value| of each loss metric
        self.fit_metrics: dict = {}  # callback_metrics at the end of fit (trainer.test replaces them)
        self.prior_seconds = 0.0  # wall seconds of earlier sessions of this run (restored on resume)
        self._t0 = time.time()
        self.total_steps: int | None = None  # planned_steps(), known from on_train_start
        self._last_print_step = -1
        self._print_t = time.time()
        self._print_step = 0
        self._previous_sigint = None

    # ---- state across --resume -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"best": self.best, "diverged": self.diverged, "diverged_reason": self.diverged_reason,
                "loss_reference": dict(self.loss_reference),
                "wall_seconds": self.prior_seconds + (time.time() - self._t0)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
        self.diverged = bool(state_dict.get("diverged", False))
        self.diverged_reason = state_dict.get("diverged_reason")
        self.loss_reference = {str(k): float(v) for k, v in (state_dict.get("loss_reference") or {}).items()}
        self.prior_seconds = float(state_dict.get("wall_seconds", 0.0))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.ckpt_key] = {"config": self.config, "run_dir": str(self.run_dir)}

    # ---- start ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._t0 = time.time()
        for logger in trainer.loggers:
            if isinstance(logger, StepTensorBoardLogger):
                logger.step_trainer = trainer
                # Open the event file now: its first record (TensorBoard's file_version event) marks
                # this session's start, from which report's time-to-target counts.
                _ = logger.experiment
        if trainer.global_rank == 0:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.config))

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:  # rank-zero-only inside the logger
            logger.log_hyperparams({k: (str(v) if isinstance(v, (list, tuple, dict)) or v is None else v)
                                    for k, v in self.hparams.items()})

    def on_train_start(self, trainer, pl_module) -> None:
        self.total_steps = planned_steps(trainer)
        if trainer.global_rank == 0 and not self.interactive:
            planned = f"{self.total_steps} steps" if self.total_steps else "no step limit"
            print(f"training {self.config['task']} with {self.config['optimizer']['name']}: "
                  f"{planned}, run dir {self.run_dir}", flush=True)
        self._print_t, self._print_step = time.time(), trainer.global_step
        self._install_sigint()

    def _install_sigint(self) -> None:
        """While training: first Ctrl-C finishes the step, saves last.ckpt, exits 130; a second aborts.

        Installed only around the training loop, so Ctrl-C during set-up (e.g. a download) acts at once.
        """
        if threading.current_thread() is not threading.main_thread() or self._previous_sigint is not None:
            return

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = "SIGINT"
            print("\ninterrupt: stopping after this step and saving checkpoints/last.ckpt "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

        self._previous_sigint = signal.signal(signal.SIGINT, handler)

    def restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    # ---- every step ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(bool(self.interrupted), all=False)
            if flag and not self.interrupted:
                self.interrupted = "SIGINT"
        if self.interrupted:
            trainer.should_stop = True
        step = trainer.global_step
        if not self.loss_reference:
            # Until a loss has been logged, look every step: the divergence reference is the
            # *first* logged loss, not the one at the first progress line (already exploded).
            self._check_finite(trainer)
        every = self._print_every(trainer)
        if step % every == 0 and step != self._last_print_step:
            self._last_print_step = step
            self._check_finite(trainer)
            if trainer.global_rank == 0 and not self.interactive:
                self._print_progress(trainer)

    def _print_every(self, trainer) -> int:
        n = max(1, trainer.log_every_n_steps or 1)
        if self.total_steps:
            n = max(n, self.total_steps // 20)
        return n

    def _print_progress(self, trainer) -> None:
        now = time.time()
        rate = (trainer.global_step - self._print_step) / max(now - self._print_t, 1e-9)
        self._print_t, self._print_step = now, trainer.global_step
        total = self.total_steps
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        shown = ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())
                          if v is not None and not k.startswith(("corr/", "lr-")))
        print(f"step {trainer.global_step}{f'/{total}' if total else ''} epoch {trainer.current_epoch} "
              f"({rate:.0f} steps/s) {shown}", flush=True)

    def _check_finite(self, trainer) -> None:
        self.check_losses({k: _scalar(v) for k, v in trainer.callback_metrics.items() if is_loss_key(k)},
                          trainer.global_step)

    def check_losses(self, losses: dict[str, float | None], step: int) -> None:
        """Flag divergence (see DIVERGE_FACTOR); the first finite value of each loss is its reference."""
        for k, v in losses.items():
            if v is None or self.diverged:
                continue
            if not math.isfinite(v):
                self.diverged, self.diverged_reason = True, f"{k} = {v} at step {step}"
                continue
            ref = self.loss_reference.setdefault(k, abs(v))
            if abs(v) > DIVERGE_FACTOR * max(ref, 1.0):
                self.diverged = True
                self.diverged_reason = (f"{k} = {v:.6g} at step {step}, over {DIVERGE_FACTOR:g}x its first "
                                        f"logged magnitude {ref:.6g}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._check_finite(trainer)
        if self.monitor and self.monitor[0] in trainer.callback_metrics:
            value = _scalar(trainer.callback_metrics[self.monitor[0]])
            if value is not None and math.isfinite(value):
                better = self.best is None or (value > self.best["value"] if self.monitor[1] == "max"
                                               else value < self.best["value"])
                if better:
                    self.best = {"name": self.monitor[0], "mode": self.monitor[1], "value": value,
                                 "step": trainer.global_step}

    # ---- end -----------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        # The final state as last.ckpt (Lightning's save_last only fires with a periodic save).
        trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        self.restore_sigint()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            # Raised by Lightning's loop at a step boundary: the state is consistent, keep it.
            self.interrupted = "SIGTERM"
            trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt", weights_only=False)

    def make_summary(self, *, trainer, task, optimizer, run_name, seed, data_source, status, session_seconds,
                     best_ckpt, correlation, provenance, module) -> dict:
        final = {}
        for k, v in {**self.fit_metrics, **trainer.callback_metrics}.items():
            s = _scalar(v)
            if s is not None:
                final[k] = s
        self.check_losses({k: v for k, v in final.items() if is_loss_key(k)}, int(trainer.global_step))
        last = self.run_dir / "checkpoints" / "last.ckpt"
        extra = {}
        if hasattr(module, "summary_extra"):
            try:
                extra = plain(module.summary_extra())
            except Exception as e:  # never lose the summary over an extra
                extra = {"error": str(e)}
        return {
            "task": task, "optimizer": optimizer, "run_name": run_name, "run_dir": str(self.run_dir),
            "seed": seed, "data_source": data_source, "status": status, "diverged": self.diverged,
            "diverged_reason": self.diverged_reason,
            "global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch),
            "wall_seconds": round(self.prior_seconds + session_seconds, 3),
            "hparams": {k: self.config.get(k) for k in ("optimizer", "model", "data", "trainer")},
            "final_metrics": final,
            "best_metric": self.best,
            "correlation": correlation,
            "last_checkpoint": str(last) if last.is_file() else None,
            "best_checkpoint": (best_ckpt.best_model_path or None) if best_ckpt is not None else None,
            "provenance": provenance,
            "extra": extra,
        }

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _json_safe(x.item())
    return str(x)
