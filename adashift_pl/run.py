"""The run directory's bookkeeping for `python -m adashift_pl.train`.

RunCallback: writes config.yaml and the TensorBoard hparams once, prints plain progress
lines when stdout is not a terminal, tracks the best monitored metric and divergence
(see `DIVERGE_FACTOR`), stops at a step boundary on SIGINT/SIGTERM/SIGHUP
(adashift_pl.stopping; the ranks of a DDP run agree on the step), saves
checkpoints/last.ckpt at the end of training and when stopped, stores the resolved
config inside every checkpoint (so --resume can check the hyper-parameters), reports a
full disk or a lost DDP rank in one line, and builds summary.json. AtomicCheckpointIO: every
checkpoint is written to a temporary file in the same directory and renamed into place, with
a sha256 digest file beside it (adashift_pl.files), so a crash never leaves a half-written
checkpoint and a checkpoint whose bytes changed later is refused on --resume.
StepTensorBoardLogger: TensorBoard's x-axis in the same step count as everything else
(optimizer steps taken, trainer.global_step).

Only rank 0 writes files (Lightning's own checkpoint saving is rank-0 already), except
that a surviving rank writes summary.json when rank 0 itself was lost.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adashift_pl.config import dump_yaml, plain
from adashift_pl.stopping import DDP_TIMEOUT_ENV, STATE, ddp_timeout_seconds, install_stop_handlers, signal_name
from adashift_pl.files import (
    DIGEST_SUFFIX,
    WriteError,
    atomic_write_text,
    atomic_write_with_digest,
    orphan_temporaries,
    remove_with_digest,
)


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
    """torch.save to a temporary file in the same directory, fsync, then os.replace into place;
    `NAME.sha256` beside it. Removing a checkpoint (Lightning's keep-the-latest-k) removes both."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write_with_digest(Path(path), lambda f: torch.save(checkpoint, f))

    def remove_checkpoint(self, path) -> None:
        remove_with_digest(Path(path))


# Under DDP the ranks must stop at the same step, so they agree through one small all_reduce of
# the signal about every STOP_CHECK_SECONDS (every batch when batches are slower; the interval
# in batches is the shortest any rank asks for, so all ranks check at the same batches).
STOP_CHECK_SECONDS = 0.5
STOP_CHECK_MAX_BATCHES = 1000


def is_lost_rank(e: BaseException) -> bool:
    """A collective failed: another rank died (connection reset/closed), or did not answer in time."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and re.search(
        r"gloo|nccl|connection (reset|closed) by peer|timed out|timeout", str(e), re.I) is not None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process whose parent has not reaped it yet is a zombie: gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


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
        self.interrupted: str | None = None  # "SIGINT" / "SIGTERM" / "SIGHUP" once the run stops for it
        self.error: str | None = None  # one line: why the run failed (summary.json "error")
        self.ddp_timeout = ddp_timeout_seconds()  # checked now: a bad value is a user error before training
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
        self._last_saved_step: int | None = None  # of the newest checkpoint this session wrote
        self._trackers_restored = False  # resumed, and Lightning restored which checkpoints it keeps
        self._rank0: dict | None = None  # rank 0's host and pid (DDP): is it still there when a collective fails?
        self._rank0_lost = False
        self._batches = self._next_check = self._check_batch = 0  # the DDP stop check's schedule
        self._check_t = 0.0

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

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks") or {}
        self._trackers_restored = all(isinstance(states.get(cb.state_key), dict)
                                      and states[cb.state_key].get("dirpath") == cb.dirpath
                                      for cb in trainer.checkpoint_callbacks)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.ckpt_key] = {"config": self.config, "run_dir": str(self.run_dir)}
        self._last_saved_step = int(trainer.global_step)

    # ---- start ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._t0 = time.time()
        self._take_over_signals(trainer)
        STATE.speak = trainer.global_rank == 0
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            if hasattr(torch.distributed, "set_timeout"):  # (recent torch); the start-up rendezvous keeps the default
                torch.distributed.set_timeout(_dt.timedelta(seconds=self.ddp_timeout))
            # Ranks started by torchrun/srun did not learn rank 0's run directory from it (Lightning's
            # own launcher passes it on in the environment): take it from rank 0 now.
            info = trainer.strategy.broadcast({"run_dir": str(self.run_dir), "host": socket.gethostname(),
                                               "pid": os.getpid()}, src=0)
            self.run_dir, self._rank0 = Path(info["run_dir"]), info
        for logger in trainer.loggers:
            if isinstance(logger, StepTensorBoardLogger):
                logger.step_trainer = trainer
                # Open the event file now: its first record (TensorBoard's file_version event) marks
                # this session's start, from which report's time-to-target counts.
                _ = logger.experiment
        if trainer.global_rank == 0:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.config))

    @staticmethod
    def _take_over_signals(trainer) -> None:
        """Let Lightning register its signal handlers (it restores the previous ones at teardown, and
        handles SLURM's requeue signal), then put ours back for SIGINT/SIGTERM/SIGHUP (adashift_pl.stopping)."""
        connector = getattr(trainer, "_signal_connector", None)
        if not hasattr(connector, "register_signal_handlers"):  # another Lightning: ours stay as they are
            install_stop_handlers()
            return
        if getattr(connector, "_adashift_pl_stop_signals", False):
            return
        register = connector.register_signal_handlers

        def register_then_ours():
            register()
            install_stop_handlers()

        connector.register_signal_handlers = register_then_ours
        connector._adashift_pl_stop_signals = True

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
        if trainer.global_rank == 0:
            self._tidy_checkpoints(trainer)
        self._batches, self._next_check, self._check_batch, self._check_t = 0, 1, 0, time.monotonic()
        STATE.deferred = True  # from here a signal stops the run at the next step boundary

    def _tidy_checkpoints(self, trainer) -> None:
        """What a killed earlier session of this run left in checkpoints/: temporary files of writes
        it did not finish, and checkpoints that Lightning's keep-the-latest-k no longer knows (written
        after the checkpoint this session resumed from, or lost track of when the process was killed
        between writing a periodic checkpoint and last.ckpt) -- they would never be rotated out."""
        ckpt_dir = self.run_dir / "checkpoints"
        if not ckpt_dir.is_dir():
            return
        known = {os.path.realpath(ckpt_dir / "last.ckpt")}  # ModelCheckpoint keeps real paths
        for cb in trainer.checkpoint_callbacks:
            known.update(os.path.realpath(p) for p in (*getattr(cb, "best_k_models", {}),
                                                       getattr(cb, "best_model_path", ""),
                                                       getattr(cb, "last_model_path", ""),
                                                       getattr(cb, "kth_best_model_path", "")) if p)
        stale = [p for p in ckpt_dir.glob("*.ckpt") if os.path.realpath(p) not in known]
        if not self._trackers_restored:  # Lightning did not restore what it tracks (e.g. the run dir moved)
            stale = []
        orphan_digests = [p for p in ckpt_dir.glob("*.ckpt" + DIGEST_SUFFIX)
                          if not p.with_name(p.name[:-len(DIGEST_SUFFIX)]).exists()]
        for p in orphan_temporaries(ckpt_dir) + orphan_temporaries(self.run_dir) + orphan_digests + stale:
            try:
                remove_with_digest(p)
            except OSError:  # a read-only checkpoints/: the first checkpoint write will say so
                pass
        if stale:
            print(f"removed {len(stale)} checkpoint file(s) of an earlier session that this one replaces: "
                  f"{', '.join(sorted(p.name for p in stale))}", flush=True)

    # ---- every step ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # A signal during step k -- its forward/backward, optimizer step, every on_train_batch_end hook,
        # the validation or checkpoint after it, an epoch's end -- stops the run here, before step k + 1
        # begins: step k is complete in every counter (the epoch's end included), so resume is exact.
        signum = self._agreed_stop(trainer)
        if signum:
            # Lightning's own way out of the loop at a step boundary; on_exception saves last.ckpt
            self.interrupted = signal_name(signum)
            raise SIGTERMException

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
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

    def _agreed_stop(self, trainer) -> int | None:
        """The stop signal every rank acts on after this batch, or None (adashift_pl.stopping).

        One process: the signal it received. DDP: one all_reduce (max) of [signal, -interval] about
        every STOP_CHECK_SECONDS -- no collective in between, and every rank checks at the same batch.
        """
        if trainer.world_size == 1:
            return STATE.signum
        self._batches += 1
        if self._batches < self._next_check:
            return None
        now = time.monotonic()
        per_batch = (now - self._check_t) / max(self._batches - self._check_batch, 1)
        # at most twice the last interval: a machine that slows down is followed within a few checks
        last = max(self._batches - self._check_batch, 1)
        want = int(min(max(STOP_CHECK_SECONDS / max(per_batch, 1e-9), 1), 2 * last, STOP_CHECK_MAX_BATCHES))
        t = torch.tensor([STATE.signum or 0, -want], dtype=torch.int64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        signum, neg_interval = t.tolist()
        self._check_t, self._check_batch, self._next_check = now, self._batches, self._batches - neg_interval
        if signum and STATE.signum is None:  # another rank's signal: this one stops too, and quietly waits
            STATE.signum = signum
        return signum or None

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
        # A signal after the last step (e.g. during the final validation): the fit is complete, but
        # the test is not started; all ranks agree on that (one last check).
        self._next_check = 0
        signum = self._agreed_stop(trainer)
        if signum:
            self.interrupted = signal_name(signum)
        STATE.deferred = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and STATE.deferred:
            # Raised at a step boundary (by on_train_batch_start, on every rank at the same batch):
            # the state is consistent, keep it.
            self.interrupted = self.interrupted or signal_name(STATE.signum or signal.SIGTERM)
            trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        STATE.deferred = False
        if isinstance(exception, Exception) and self.error is None:
            self.error = self.describe_failure(trainer, exception)
        if trainer.world_size > 1 and is_lost_rank(exception):
            launcher = trainer.strategy.launcher
            if trainer.global_rank == 0 and launcher is not None and getattr(launcher, "procs", None):
                # The ranks Lightning started from this process would otherwise wait (or, if stopped,
                # stay) forever; they hold no files.
                launcher.kill(signal.SIGKILL)

    def is_known_failure(self, trainer, e: BaseException) -> bool:
        """A fault of the machine, not of the code: reported in one line, no traceback."""
        return isinstance(e, WriteError) or (trainer.world_size > 1 and is_lost_rank(e))

    def describe_failure(self, trainer, e: BaseException) -> str:
        """One line for summary.json's "error" (and the terminal, for a known failure)."""
        if trainer.world_size > 1 and is_lost_rank(e):
            return self._lost_rank_message(trainer, e)
        if isinstance(e, WriteError):
            return f"{e}; the previous version of that file and the other checkpoints are kept"
        return " ".join(f"{type(e).__name__}: {e}".split())[:2000]

    def _lost_rank_message(self, trainer, exception) -> str:
        cause = " ".join(str(exception).split())
        cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)  # drop gloo's source-file prefix
        cause = re.split(r"\.\s", cause, maxsplit=1)[0][:200]  # and its advice
        newest = f" (the newest from step {self._last_saved_step})" if self._last_saved_step is not None else ""
        self._rank0_lost = self._rank0_exits()
        who = "rank 0 was lost" if self._rank0_lost else "another rank was lost"
        return (f"DDP: {who} at step {trainer.global_step} (killed, crashed, or not answering within "
                f"{self.ddp_timeout:g} s, see {DDP_TIMEOUT_ENV}); rank {trainer.global_rank} stopped: {cause}. "
                f"No checkpoint can be taken without all ranks; the ones saved so far are kept{newest}"
                + (f": continue with --resume {resume}" if (resume := self._newest_checkpoint()) else ""))

    def _newest_checkpoint(self) -> Path | None:
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        found = sorted((self.run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def _rank0_exits(self, within_s: float = 3.0) -> bool:
        """Rank 0 has exited, or does within a few seconds (a killed process closes its sockets, which
        is how this rank noticed, a moment before it is gone). Known only on rank 0's host."""
        r0 = self._rank0
        if not r0 or r0["pid"] == os.getpid() or r0["host"] != socket.gethostname():
            return False
        deadline = time.monotonic() + within_s
        while not _process_gone(int(r0["pid"])):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def writes_summary(self, trainer) -> bool:
        """Rank 0 writes summary.json; a surviving rank does when rank 0 itself was lost."""
        return trainer.global_rank == 0 or self._rank0_lost

    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.interrupted]) if self.interrupted else 130

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
            "seed": seed, "data_source": data_source, "status": status,
            "signal": self.interrupted if status == "interrupted" else None,
            "error": self.error if status == "failed" else None,
            "diverged": self.diverged,
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

    def write_summary(self, summary: dict) -> str | None:
        """Write summary.json; returns why it could not be written (disk full, ...), or None."""
        try:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        except WriteError as e:
            return str(e)
        return None


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
