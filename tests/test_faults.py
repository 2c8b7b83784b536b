"""Faults lose nothing and leave nothing half-done: full and read-only disks, kill -9, signals
(with DataLoader workers, during start-up, SIGHUP), two runs started at once, DDP ranks that
are signalled, killed or stopped, and checkpoints whose bytes changed.

Everything that kills or signals a process runs the training command in a subprocess and
asserts on its exit status; a fault at an exact moment is injected by a few lines of Python
run before train.main (the `inject` fixture), never by a sleep.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adashift_pl import train

FAST = ["--correlation", "false", "--trainer.log_every_n_steps", "5", "--num-threads", "1"]
QUAD = ["--task", "quadratic", "--optimizer", "adam", *FAST]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def command(log_dir, *argv, script: Path | None = None) -> list[str]:
    entry = [str(script)] if script else ["-m", "adashift_pl.train"]
    return [sys.executable, *entry, "--log-dir", str(log_dir), *argv]


@pytest.fixture
def inject(tmp_path):
    """inject(code) -> a script that runs `code` (with os, signal, sys imported), then train.main."""
    def make(code: str) -> Path:
        path = tmp_path / f"inject_{len(list(tmp_path.glob('inject_*')))}.py"
        path.write_text("import os, signal, sys\n" + textwrap.dedent(code)
                        + "\nfrom adashift_pl import train\nsys.exit(train.main(sys.argv[1:]))\n")
        return path
    return make


def wait_for(condition, proc, seconds: float, what: str):
    """Poll `condition` until it holds; fail after `seconds`, or as soon as `proc` (if given) exits."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.1)


def finish(proc, seconds: float) -> tuple[str, str]:
    """The process's output once it exits; fails (and kills its group) if it takes longer than `seconds`."""
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running {seconds} s after the fault: {err[-3000:]}")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def ckpt_step(path: Path) -> int:
    from adashift_pl.files import checkpoint_problem

    assert checkpoint_problem(path) is None, path
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---- disk full, read-only checkpoints/ ---------------------------------------------------------
def _file_size_limit(nbytes: int):
    """preexec_fn: files may grow to `nbytes` (beyond: EFBIG, as a full disk gives ENOSPC)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.parametrize("limit, fails_first", [(4000, "checkpoints"), (100, "config.yaml")])
def test_full_disk_says_what_failed_and_keeps_the_previous_files(tmp_path, one_thread, limit, fails_first):
    """Checkpoints (~12 kB) cannot be written: summary.json still is; nothing can: the old one stays."""
    run_dir = tmp_path / "quadratic" / "adam" / "version_0"
    assert train.main(["--log-dir", str(tmp_path), *QUAD, "--trainer.max_steps", "10"]) == 0
    before = (run_dir / "summary.json").read_text()
    p = subprocess.run(command(tmp_path, *QUAD, "--resume", "last", "--trainer.max_steps", "40",
                               "--checkpoint.every_n_train_steps", "5"),
                       preexec_fn=_file_size_limit(limit), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    line = one_error_line(p.stderr)
    assert f"cannot write {run_dir}" in line and "File too large" in line and fails_first in line, line
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 10  # the previous last.ckpt, intact
    assert not list(run_dir.rglob("*.tmp"))
    if fails_first == "checkpoints":
        s = summary(run_dir)
        assert s["status"] == "failed" and "File too large" in s["error"]
    else:  # summary.json could not be written either: the previous one is kept, whole
        assert "summary.json not written" in line
        assert (run_dir / "summary.json").read_text() == before


def test_read_only_checkpoints_dir_says_what_failed(tmp_path, inject):
    # chmod does not stop root, so the kernel's answer for a read-only file system is injected
    # where a new file is created in checkpoints/
    script = inject("""
        import errno, tempfile
        real = tempfile.mkstemp
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.basename(str(dir)) == "checkpoints":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real(*args, dir=dir, **kwargs)
        tempfile.mkstemp = mkstemp
    """)
    p = subprocess.run(command(tmp_path, *QUAD, "--trainer.max_steps", "10", script=script),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    line = one_error_line(p.stderr)
    run_dir = tmp_path / "quadratic" / "adam" / "version_0"
    assert f"cannot write {run_dir / 'checkpoints'}" in line and "Read-only file system" in line, line
    assert summary(run_dir)["status"] == "failed" and "Read-only" in summary(run_dir)["error"]


# ---- kill -9 -----------------------------------------------------------------------------------
def test_killed_while_saving_leaves_nothing_behind_after_resume(tmp_path, inject, one_thread):
    """Killed inside the write of last.ckpt at step 15, just after periodic step 15 was written:
    the orphan temporary and the periodic checkpoint the resumed run no longer tracks must go,
    and checkpoint.keep must hold."""
    script = inject("""
        from lightning.pytorch.callbacks import ModelCheckpoint
        real = ModelCheckpoint._save_last_checkpoint
        def die_while_saving_last(self, trainer, candidates):
            if trainer.global_step == 15:
                os.fsync = lambda fd: os._exit(137)  # kill -9 in the middle of writing last.ckpt
            return real(self, trainer, candidates)
        ModelCheckpoint._save_last_checkpoint = die_while_saving_last
    """)
    args = [*QUAD, "--checkpoint.every_n_train_steps", "5", "--checkpoint.keep", "2"]
    p = subprocess.run(command(tmp_path, *args, "--trainer.max_steps", "100", script=script),
                       capture_output=True, text=True, timeout=300)
    ckpt_dir = tmp_path / "quadratic" / "adam" / "version_0" / "checkpoints"
    assert p.returncode == 137, p.stderr[-3000:]
    assert list(ckpt_dir.glob(".last.ckpt.*.tmp"))  # what a kill -9 leaves
    assert ckpt_step(ckpt_dir / "last.ckpt") == 10
    assert train.main(["--log-dir", str(tmp_path), *args, "--resume", "last", "--trainer.max_steps", "30"]) == 0
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert [n for n in names if n.startswith("periodic") and n.endswith(".ckpt")] == \
        ["periodic-epoch=0-step=25.ckpt", "periodic-epoch=0-step=30.ckpt"], names
    assert all(f"{n}.sha256" in names for n in names if n.endswith(".ckpt"))  # and no digest without its file
    assert len([n for n in names if n.endswith(".sha256")]) == len([n for n in names if n.endswith(".ckpt")])
    assert ckpt_step(ckpt_dir / "last.ckpt") == 30


# ---- signals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, task", [
    (signal.SIGINT, ["--task", "mnist_logreg", "--data.num_workers", "2", "--data.source", "synthetic"]),
    (signal.SIGTERM, ["--task", "mnist_logreg", "--data.num_workers", "2", "--data.source", "synthetic"]),
    (signal.SIGHUP, ["--task", "quadratic"]),
])
def test_signal_to_the_process_group_stops_at_a_step_with_a_checkpoint(tmp_path, sig, task):
    """As Ctrl-C in a terminal (SIGINT), SLURM (SIGTERM) or a closed ssh session (SIGHUP) do: the
    signal reaches every process of the group, DataLoader workers included."""
    name = task[1]
    proc = subprocess.Popen(command(tmp_path, *task, "--optimizer", "adam", *FAST, "--trainer.max_steps", "100000",
                                    "--checkpoint.every_n_train_steps", "20"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = tmp_path / name / "adam" / "version_0"
    wait_for(lambda: list((run_dir / "checkpoints").glob("periodic-*.ckpt")), proc, 240, "periodic checkpoint")
    os.killpg(proc.pid, sig)
    out, err = finish(proc, 120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["signal"] == signal.Signals(sig).name
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == s["global_step"] > 0
    assert out.strip().splitlines()[-1] == str(run_dir)


@pytest.mark.parametrize("sig,turned_into", [(signal.SIGINT, None), (signal.SIGTERM, "ImportError")])
def test_signal_during_start_up_is_one_line(tmp_path, inject, sig, turned_into):
    """turned_into: the code the signal interrupted turned its exception into another error (numpy's C
    extension mid-import raises "ImportError: cannot load module more than once per process")."""
    script = inject(f"""
        from adashift_pl import train as _train
        real = _train.build_task
        def build_task(*args, **kwargs):
            try:
                os.kill(os.getpid(), {int(sig)})  # arrives while the task is being built
            except BaseException:
                if {turned_into}:
                    raise {turned_into}("cannot load module more than once per process")
                raise
            return real(*args, **kwargs)
        _train.build_task = build_task
    """)
    p = subprocess.run(command(tmp_path, *QUAD, "--trainer.max_steps", "10", script=script),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 128 + sig, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == \
        f"stopped by {signal.Signals(sig).name} during start-up: nothing new was trained or saved"
    assert not (tmp_path / "quadratic" / "adam" / "version_0").exists()  # the claimed run directory is released


def test_sigterm_resume_is_bit_identical(tmp_path, inject, one_thread):
    """Stopped by SIGTERM at step 13 (between checkpoints), resumed: the same weights as one run."""
    script = inject("""
        from adashift_pl.run import RunCallback
        real = RunCallback.on_train_batch_end
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 13:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, trainer, *args)
        RunCallback.on_train_batch_end = on_train_batch_end
    """)
    args = ["--task", "quadratic", "--optimizer", "adashift", *FAST, "--data.steps_per_epoch", "10",
            "--model.lr_schedule", "exp", "--model.lr_decay_steps", "30"]
    p = subprocess.run(command(tmp_path / "part", *args, "--trainer.max_steps", "30", script=script),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 143, p.stderr[-3000:]
    part = tmp_path / "part" / "quadratic" / "adashift" / "version_0"
    assert summary(part)["global_step"] == 13 == ckpt_step(part / "checkpoints" / "last.ckpt")
    assert train.main(["--log-dir", str(tmp_path / "part"), *args, "--resume", "last"]) == 0
    assert train.main(["--log-dir", str(tmp_path / "full"), *args, "--trainer.max_steps", "30"]) == 0
    a = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "full" / "quadratic" / "adashift" / "version_0" / "checkpoints" / "last.ckpt",
                   weights_only=False)
    assert a["global_step"] == b["global_step"] == 30
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


# ---- two runs at once --------------------------------------------------------------------------
def test_two_runs_started_together_get_their_own_run_directories(tmp_path):
    procs = [subprocess.Popen(command(tmp_path, *QUAD, "--trainer.max_steps", "5", "--seed", str(seed)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    dirs = sorted(Path(out.strip().splitlines()[-1]) for out, _ in outs)
    assert [d.name for d in dirs] == ["version_0", "version_1"]
    for d in dirs:  # each directory holds one run, whole: its own config, summary and checkpoints
        s = summary(d)
        assert s["run_dir"] == str(d) and s["status"] == "completed"
        cfg = torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["adashift_pl"]["config"]
        assert cfg["seed"] == s["seed"]
    assert {summary(d)["seed"] for d in dirs} == {1, 2}


def test_claim_refuses_a_taken_run_name_and_releases_an_unused_one(tmp_path):
    run_dir, created = train.claim_run_dir(tmp_path, None)
    assert run_dir.name == "version_0" and created and (run_dir / "checkpoints").is_dir()
    assert train.claim_run_dir(tmp_path, None)[0].name == "version_1"
    with pytest.raises(train.UserError, match="already holds a run"):
        train.claim_run_dir(tmp_path, "version_0")
    train.release_run_dir(run_dir, created=True)
    assert not run_dir.exists()


# ---- checkpoints whose bytes changed -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["rot", "truncate"])
def test_a_damaged_checkpoint_is_named_and_not_loaded(tmp_path, capsys, one_thread, damage):
    assert train.main(["--log-dir", str(tmp_path), *QUAD, "--trainer.max_steps", "5"]) == 0
    last = tmp_path / "quadratic" / "adam" / "version_0" / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "rot":  # one flipped bit inside the tensor data: torch.load would not notice
        data[len(data) // 2] ^= 0x10
        last.write_bytes(bytes(data))
    else:
        last.write_bytes(bytes(data[: len(data) // 2]))
    capsys.readouterr()
    assert train.main(["--log-dir", str(tmp_path), *QUAD, "--resume", "last", "--trainer.max_steps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: checkpoint {last} is corrupt"), err


def test_digest_file_and_checkpoint_agree_after_a_crash_at_any_point(tmp_path, monkeypatch):
    import adashift_pl.files as files
    from adashift_pl.files import atomic_write_with_digest, checkpoint_problem, read_digests

    path = tmp_path / "last.ckpt"
    atomic_write_with_digest(path, lambda f: f.write(b"old"))
    assert read_digests(path) and checkpoint_problem(path) is None

    def crash(*args):
        raise KeyboardInterrupt  # anything, at this moment

    real_replace, real_write_digests = os.replace, files._write_digests
    # killed just before the checkpoint's rename: the old file, its digest still accepted
    monkeypatch.setattr(files.os, "replace", lambda a, b: crash() if str(b) == str(path) else real_replace(a, b))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_with_digest(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"old" and checkpoint_problem(path) is None
    monkeypatch.setattr(files.os, "replace", real_replace)
    # killed after it, before the old digest was dropped: the new file, accepted
    calls = []
    monkeypatch.setattr(files, "_write_digests", lambda p, d: crash() if calls.append(1) or len(calls) == 2
                        else real_write_digests(p, d))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_with_digest(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and checkpoint_problem(path) is None
    path.write_bytes(b"nex")  # and a later change is caught
    assert "is corrupt" in checkpoint_problem(path)
    assert not list(tmp_path.glob("*.tmp"))


# ---- DDP: 2 CPU processes over gloo ------------------------------------------------------------
def _start_ddp(tmp_path, env=None):
    proc = subprocess.Popen(command(tmp_path, *QUAD, *DDP, "--trainer.max_steps", "1000000",
                                    "--data.steps_per_epoch", "1000000", "--checkpoint.every_n_train_steps", "20"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    run_dir = tmp_path / "quadratic" / "adam" / "version_0"
    ckpt_dir = run_dir / "checkpoints"  # the first periodic checkpoint and last.ckpt beside it (saved just after)
    wait_for(lambda: list(ckpt_dir.glob("periodic-*.ckpt")) and (ckpt_dir / "last.ckpt").exists(),
             proc, 300, "periodic checkpoint and last.ckpt")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children  # rank 1, started by Lightning from rank 0
    return proc, int(children[0]), run_dir


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_ddp_sigterm_to_every_rank_stops_with_a_checkpoint(tmp_path, one_thread):
    """What SLURM does at a time limit. It deadlocked: Lightning's handler broadcasts inside the
    signal handler while the ranks are in another collective."""
    proc, rank1, run_dir = _start_ddp(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = finish(proc, 60)
    assert proc.returncode == 143, err[-3000:]
    wait_for(lambda: _gone(rank1), proc, 30, "rank 1 exit")
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["signal"] == "SIGTERM" and "x2" in s["provenance"]["device"]
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == s["global_step"] > 0
    assert out.strip().splitlines()[-1] == str(run_dir) and "Traceback" not in err
    # and it continues (in one process, in this one: trainer settings may change on resume)
    assert train.main(["--log-dir", str(tmp_path), *QUAD, "--resume", "last", "--trainer.devices", "1",
                       "--trainer.strategy", "auto", "--trainer.max_steps", str(s["global_step"] + 5)]) == 0
    assert summary(run_dir)["global_step"] == s["global_step"] + 5


def test_ddp_rank0_killed_the_survivor_writes_the_summary(tmp_path):
    proc, rank1, run_dir = _start_ddp(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = finish(proc, 60)  # until rank 1, which writes to the same pipes, has exited too
    line = one_error_line(err)
    assert "rank 0 was lost" in line and "rank 1 stopped" in line, line
    s = summary(run_dir)
    assert s["status"] == "failed" and "rank 0 was lost" in s["error"]
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") > 0  # the checkpoints saved so far are kept


def test_ddp_stopped_rank_fails_the_run_within_the_timeout(tmp_path):
    timeout = 20  # short, yet long enough for any collective of a healthy run on a busy 2-core machine
    proc, rank1, run_dir = _start_ddp(tmp_path, env={"ADASHIFT_PL_DDP_TIMEOUT": str(timeout)})
    os.kill(rank1, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out, err = finish(proc, 3 * timeout + 30)  # noticed after the timeout; exits within about twice it
        assert proc.returncode == 1, err[-3000:]
        line = one_error_line(err)
        assert f"not answering within {timeout} s" in line and "rank 0 stopped" in line, line
        assert timeout <= time.monotonic() - t0 < 2 * timeout + 20
        s = summary(run_dir)
        assert s["status"] == "failed" and f"not answering within {timeout} s" in s["error"], s["error"]
        wait_for(lambda: _gone(rank1), None, 30, "the stopped rank to be killed")
    finally:
        if not _gone(rank1):
            os.kill(rank1, signal.SIGKILL)
