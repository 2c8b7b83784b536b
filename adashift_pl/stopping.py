"""How a training command stops on SIGINT, SIGTERM and SIGHUP (kept free of torch imports).

SIGINT (Ctrl-C), SIGTERM (kill, a scheduler's time limit: SLURM) and SIGHUP (a closed terminal or
ssh session) stop a run the same way: during training, the run finishes the current step (its
hooks, and any validation, checkpoint or epoch end after it), stops before the next one begins,
saves checkpoints/last.ckpt and a summary with status "interrupted", and exits 128 + the signal's
number (130, 143, 129). During start-up, the sanity check or the final test nothing new is there
to save, so the command stops at once with one line and the same exit code. A second Ctrl-C
while training aborts without saving; further SIGTERM/SIGHUP are ignored (already stopping).
A signal whose handler was SIG_IGN when the command started (nohup) stays ignored.

Lightning's own SIGTERM handler is replaced while a Trainer runs (adashift_pl.run.RunCallback):
it runs a torch.distributed broadcast inside the signal handler, which deadlocks when the DDP
ranks receive different numbers of signals (rank 0 forwards SIGTERM to the ranks it started,
which SLURM has signalled already) or are inside another collective at that moment. Here a
handler only notes the signal; the ranks agree on it at a step boundary.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading

from adashift_pl.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The exit codes of a run stopped by one of them, with last.ckpt saved (128 + signal number).
INTERRUPTED_EXIT_CODES = tuple(128 + int(s) for s in STOP_SIGNALS)

# The longest any rank waits in a collective (gloo/NCCL process-group timeout) before the run is
# declared failed: a rank that was killed is noticed at once (connection reset), one that is stopped
# (SIGSTOP) or hung only after this. Long enough for rank 0 to write a big checkpoint while the others
# wait at the barrier; downloads in prepare_data do not count (Lightning waits for them separately).
DDP_TIMEOUT_ENV = "ADASHIFT_PL_DDP_TIMEOUT"
DEFAULT_DDP_TIMEOUT_S = 300.0


class Stopped(BaseException):
    """A stop signal outside the training loop: stop at once (BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = int(signum)

    @property
    def code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _StopState:
    """What the signal handler knows: the first stop signal, and whether a training loop will act on it."""

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False  # True while a training loop runs: note the signal, stop at the step boundary
        self.speak = True  # rank 0 tells the user; the other ranks stay quiet


STATE = _StopState()  # one per process
_ignored_at_start: set[int] = set()


def _on_stop_signal(signum, frame) -> None:
    if STATE.signum is not None:  # already stopping
        if signum == signal.SIGINT and STATE.deferred:
            raise KeyboardInterrupt  # a second Ctrl-C while training: abort without saving
        return
    STATE.signum = signum
    if not STATE.deferred:
        raise Stopped(signum)
    if STATE.speak:  # os.write: print() is not safe inside a signal handler (reentrant buffered stream)
        os.write(2, f"\n{signal_name(signum)}: stopping after this step and saving checkpoints/last.ckpt "
                    f"(Ctrl-C again to abort without saving)\n".encode())


def install_stop_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        if s not in _ignored_at_start:
            signal.signal(s, _on_stop_signal)


@contextlib.contextmanager
def stop_signals():
    """Around a whole training command: SIGINT/SIGTERM/SIGHUP stop it (as the module docstring says),
    and DataLoader worker processes forked meanwhile do not see them (the main process stops them).
    The previous handlers are restored afterwards (train.main runs in-process in the tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _ignored_at_start.clear()
    _ignored_at_start.update(s for s, h in previous.items() if h is signal.SIG_IGN)
    STATE.__init__()
    install_stop_handlers()
    _quiet_forks.active = True
    try:
        yield
    finally:
        _quiet_forks.active = False
        for s, h in previous.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, h)


class _QuietForks:
    """Forked children (DataLoader workers) start with the stop signals blocked.

    Ctrl-C reaches every process of the terminal's process group and SLURM signals every process
    of a job step: a worker killed by it takes a half-sent batch with it and the main process
    fails with a worker traceback instead of stopping cleanly. Blocked signals stay pending and
    never run; the main process shuts its workers down (and they exit when it dies). The signals
    are blocked in the parent across fork() so none slips into the child before the mask is set.
    """

    def __init__(self):
        self.active = False
        self._blocked = False
        os.register_at_fork(before=self._before, after_in_parent=self._after_parent,
                            after_in_child=self._after_child)

    def _before(self):
        self._blocked = self.active and threading.current_thread() is threading.main_thread()
        if self._blocked:
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def _after_parent(self):
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def _after_child(self):
        if self._blocked:
            self.active = False  # the child keeps the signals blocked and forks nothing of its own


_quiet_forks = _QuietForks()


def ddp_timeout_seconds() -> float:
    text = os.environ.get(DDP_TIMEOUT_ENV)
    if text is None:
        return DEFAULT_DDP_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"invalid {DDP_TIMEOUT_ENV} {text!r}: allowed is a number of seconds > 0")
    return value


class RunFailed(Exception):
    """The run could not go on (a file could not be written, a DDP rank was lost): the message is
    the one line to print; summary.json says the same, and the checkpoints saved so far are kept."""
