"""Resume is exact, hyper-parameters are not silently replaced, signals leave a usable checkpoint,
DDP-2 equals one process with the same global batch, bf16-mixed runs on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adashift_pl import train

FAST = ["--correlation", "false", "--trainer.log_every_n_steps", "5", "--data.steps_per_epoch", "20"]


def run(log_dir, *argv) -> int:
    return train.main(["--log-dir", str(log_dir), *argv, *FAST])


def final_state(run_dir: Path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    return ckpt, summary


def assert_same_run(a: Path, b: Path):
    ca, sa = final_state(a)
    cb, sb = final_state(b)
    assert ca["global_step"] == cb["global_step"]
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k  # bit-for-bit
    for k, v in sa["final_metrics"].items():
        assert sb["final_metrics"][k] == pytest.approx(v, rel=0, abs=1e-12), k
    assert sa["best_metric"] == sb["best_metric"]


@pytest.mark.parametrize("task, optimizer, extra, stop", [
    ("quadratic", "adashift", ["--model.lr_schedule", "exp", "--model.lr_decay_steps", "60"], 29),
    # warm-up of 12 steps spans the interruption at step 7; replicas as scalars and as rows
    ("counterexample", "adashift", ["--model.warmup_steps", "12", "--model.replicas", "6", "--optimizer.lr", "0.1"], 7),
    ("counterexample", "amsgrad", ["--model.warmup_steps", "12", "--model.replicas", "3",
                                   "--model.layout", "scalars", "--optimizer.lr", "0.1"], 33),
])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, capsys, task, optimizer, extra, stop):
    base = ["--task", task, "--optimizer", optimizer, *extra]
    assert run(tmp_path / "full", *base, "--trainer.max_steps", "60") == 0
    assert run(tmp_path / "part", *base, "--trainer.max_steps", str(stop)) == 0
    assert run(tmp_path / "part", "--task", task, "--optimizer", optimizer, "--resume", "last",
               "--trainer.max_steps", "60") == 0
    out = capsys.readouterr().out.strip().splitlines()
    resumed_dir = Path(out[-1])
    assert resumed_dir == tmp_path / "part" / task / optimizer / "version_0"  # continued in the same run dir
    assert_same_run(tmp_path / "full" / task / optimizer / "version_0", resumed_dir)
    s = json.loads((resumed_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["global_step"] == 60


def test_resume_refuses_changed_hyperparameters_and_accepts_a_path(tmp_path, capsys):
    base = ["--task", "quadratic", "--optimizer", "adam"]
    assert run(tmp_path, *base, "--trainer.max_steps", "10", "--optimizer.lr", "1e-2") == 0
    capsys.readouterr()
    assert run(tmp_path, *base, "--resume", "last", "--optimizer.lr", "5e-2") == 2
    err = capsys.readouterr().err.strip()
    assert "optimizer.lr: checkpoint 0.01, now 0.05" in err and len(err.splitlines()) == 1
    assert run(tmp_path, *base, "--resume", "last", "--model.dim", "4") == 2
    assert run(tmp_path, *base, "--resume", "last", "--seed", "1") == 2
    assert run(tmp_path, *base, "--resume", "last", "--run-name", "other") == 2
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "sgd", "--resume",
               str(tmp_path / "quadratic" / "adam" / "version_0" / "checkpoints" / "last.ckpt")) == 2
    capsys.readouterr()
    # a checkpoint path alone: task and optimizer come from it; trainer settings may change
    ckpt = tmp_path / "quadratic" / "adam" / "version_0" / "checkpoints" / "last.ckpt"
    assert run(tmp_path, "--resume", str(ckpt), "--trainer.max_steps", "15") == 0
    s = json.loads((tmp_path / "quadratic" / "adam" / "version_0" / "summary.json").read_text())
    assert s["global_step"] == 15 and s["hparams"]["optimizer"]["lr"] == 1e-2


def test_sigint_stops_at_a_step_and_saves(tmp_path, capsys, monkeypatch):
    from adashift_pl.run import RunCallback

    original = RunCallback.on_train_batch_end

    def interrupt_at_7(self, trainer, *args):
        if trainer.global_step == 7 and not self.interrupted:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to train.py's handler
        return original(self, trainer, *args)

    monkeypatch.setattr(RunCallback, "on_train_batch_end", interrupt_at_7)
    base = ["--task", "quadratic", "--optimizer", "adashift"]
    assert run(tmp_path / "part", *base, "--trainer.max_steps", "30") == 130
    run_dir = tmp_path / "part" / "quadratic" / "adashift" / "version_0"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["global_step"] == 7
    monkeypatch.setattr(RunCallback, "on_train_batch_end", original)
    assert run(tmp_path / "part", *base, "--resume", "last") == 0
    assert run(tmp_path / "full", *base, "--trainer.max_steps", "30") == 0
    assert_same_run(tmp_path / "full" / "quadratic" / "adashift" / "version_0", run_dir)


def test_sigterm_leaves_a_usable_checkpoint(tmp_path):
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "adashift_pl.train", "--task", "quadratic", "--optimizer", "adam",
           "--log-dir", str(log_dir), "--trainer.max_steps", "1000000", "--checkpoint.every_n_train_steps", "20",
           *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt_dir = log_dir / "quadratic" / "adam" / "version_0" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_dir.glob("periodic-*.ckpt")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    run_dir = ckpt_dir.parent
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["global_step"] > 0
    assert out.strip().splitlines()[-1] == str(run_dir)
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == s["global_step"]
    assert not list(ckpt_dir.glob("*.tmp"))
    # and it resumes (in-process: fast)
    assert train.main(["--log-dir", str(log_dir), "--task", "quadratic", "--optimizer", "adam", "--resume", "last",
                       "--trainer.max_steps", str(s["global_step"] + 5), *FAST]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == s["global_step"] + 5


def test_bf16_mixed_on_cpu(tmp_path, capsys):
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "adashift", "--trainer.max_steps", "20",
               "--trainer.precision", "bf16-mixed") == 0
    s = json.loads((Path(capsys.readouterr().out.strip().splitlines()[-1]) / "summary.json").read_text())
    assert s["provenance"]["precision"] == "bf16-mixed" and s["status"] == "completed" and not s["diverged"]


def test_ddp_two_processes_equal_one_process(tmp_path, capsys):
    base = ["--task", "quadratic", "--optimizer", "adashift", "--trainer.max_steps", "20", "--model.batch_size", "32"]
    assert run(tmp_path / "one", *base) == 0
    p = subprocess.run([sys.executable, "-m", "adashift_pl.train", "--log-dir", str(tmp_path / "two"), *base, *FAST,
                        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    two = tmp_path / "two" / "quadratic" / "adashift" / "version_0"
    assert p.stdout.strip().splitlines()[-1] == str(two)
    assert not (tmp_path / "two" / "quadratic" / "adashift" / "version_1").exists()  # ranks agreed on the dir
    c1, s1 = final_state(tmp_path / "one" / "quadratic" / "adashift" / "version_0")
    c2, s2 = final_state(two)
    assert "x2" in s2["provenance"]["device"]
    for k in ("W1", "W2"):
        torch.testing.assert_close(c2["state_dict"][k], c1["state_dict"][k], rtol=1e-5, atol=1e-6)
    assert s2["final_metrics"]["val/loss"] == pytest.approx(s1["final_metrics"]["val/loss"], rel=1e-4)
