"""`compare --launcher slurm` on a real one-node SLURM (tests/cluster/slurm.sh up; SLURM_CONF set).

Every test is a real job array on the cluster: a sweep gives the same per-run results as the local
launcher; a task signalled with `scancel --signal=USR1 --batch` or by its time limit saves, is
requeued, resumes and ends bit-identical to an uninterrupted run; a run failing with a user error
is reported failed once and not requeued; a sweep of 2-process DDP runs (gloo, srun) completes.
Runs are counterexample trainings sized from a measured step rate (a few tens of seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--task", "counterexample", "--model.warmup_steps", "0", "--model.replicas", "4",
         "--trainer.log_every_n_steps", "10", "--correlation", "false", "--num-threads", "1"]


@pytest.fixture(scope="session", autouse=True)
def cluster():
    """The cluster tests/cluster/slurm.sh brings up: SLURM_CONF (default its folder's) and an idle node."""
    conf = os.environ.get("SLURM_CONF") or "/tmp/adashift-slurm/slurm.conf"
    os.environ["SLURM_CONF"] = conf
    if shutil.which("sinfo") is None or not Path(conf).is_file():
        pytest.fail(f"no SLURM here (sinfo on PATH, {conf}): run tests/cluster/slurm.sh up first")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or not state.stdout.strip():
        pytest.fail(f"sinfo: {state.stderr.strip() or 'no node'}: run tests/cluster/slurm.sh up first")


@pytest.fixture
def sweeps(tmp_path):
    """Sweep directories for a test; whatever the test left in the queue is cancelled afterwards."""
    yield tmp_path
    for jobs in tmp_path.glob("*/slurm/jobs.json"):
        ids = [s["job_id"] for s in json.loads(jobs.read_text())["submissions"]]
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def compare(*args: str, timeout: float = 600, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "adashift_pl.compare", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def steps_per_second(tmp_path_factory) -> float:
    """The counterexample's training speed on this machine now (1 thread), to size runs in seconds."""
    log = tmp_path_factory.mktemp("rate")
    proc = subprocess.run([sys.executable, "-m", "adashift_pl.train", *SMALL, "--optimizer", "adam",
                           "--trainer.max_steps", "400", "--data.steps_per_epoch", "50", "--log-dir", str(log),
                           "--run-name", "rate"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(next(log.glob("*/*/rate/summary.json")).read_text())
    return summary["global_step"] / summary["wall_seconds"]


def steps_for(rate: float, seconds: float) -> int:
    return max(200, int(rate * seconds) // 50 * 50)


def job_of(sweep: Path) -> str:
    return json.loads((sweep / "slurm" / "jobs.json").read_text())["submissions"][-1]["job_id"]


def assert_same_final_state(a: Path, b: Path) -> None:
    """Two runs' last.ckpt hold the same weights and optimizer state, bit for bit, and the same step."""
    ca = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cb = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"]):
        for p in sa["state"]:
            for k, v in sa["state"][p].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][p][k])), (p, k)
    fa = json.loads((a / "summary.json").read_text())["final_metrics"]
    fb = json.loads((b / "summary.json").read_text())["final_metrics"]
    assert fa == fb


def test_sweep_on_slurm_reports_what_the_local_launcher_reports(sweeps):
    common = [*SMALL, "--optimizers", "adam,adashift", "--seeds", "2", "--trainer.max_steps", "40",
              "--data.steps_per_epoch", "20", "--jobs", "2"]
    on_slurm = compare(*common, "--launcher", "slurm", "--slurm.poll", "2", "--out", str(sweeps / "slurm"))
    assert on_slurm.returncode == 0, on_slurm.stdout[-3000:] + on_slurm.stderr[-3000:]
    out = on_slurm.stdout
    assert "4 runs: 0 pending, 0 running, 0 done, 0 failed, 4 not submitted" in out
    assert "0 pending, 0 running, 4 done, 0 failed" in out and out.count("\ndone    ") == 4
    local = compare(*common, "--out", str(sweeps / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    runs = {}
    for where in ("slurm", "local"):
        report = json.loads((sweeps / where / "report" / "report.json").read_text())
        runs[where] = {r["name"]: (r["status"], r["final"]) for r in report["runs"]}
    assert len(runs["slurm"]) == 4 and runs["slurm"] == runs["local"]
    assert all(status == "completed" for status, _ in runs["slurm"].values())
    sweep = sweeps / "slurm"
    job = job_of(sweep)
    assert sorted(p.name for p in (sweep / "slurm" / "logs").iterdir()) == [f"{job}_{i}.out" for i in range(4)]
    assert (sweep / "slurm" / "submit-1.sbatch").is_file()
    # again: everything is done, nothing is submitted
    again = compare(*common, "--launcher", "slurm", "--slurm.poll", "2", "--out", str(sweep), "--no-report")
    assert again.returncode == 0 and "4 runs: 0 pending, 0 running, 4 done, 0 failed" in again.stdout
    assert "submitted" not in again.stdout
    assert len(json.loads((sweep / "slurm" / "jobs.json").read_text())["submissions"]) == 1


def _interrupted_then_resumed(sweep: Path, name: str, log: str) -> dict:
    record = json.loads((sweep / "runs" / name / "compare.json").read_text())
    assert record["exit_code"] == 0 and record["slurm"]["restarts"] >= 1, record
    assert "scontrol requeue" in log and ": done" in log and f"resume {name}" in log, log
    return record


def test_scancel_signal_checkpoints_requeues_resumes_bit_identical(sweeps, steps_per_second):
    steps = steps_for(steps_per_second, 25)
    common = [*SMALL, "--optimizers", "adam", "--seeds", "1", "--trainer.max_steps", str(steps),
              "--data.steps_per_epoch", "50"]
    sweep = sweeps / "slurm"
    baseline = compare(*common, "--out", str(sweeps / "local"), wait=False)  # uninterrupted, meanwhile
    submitted = compare(*common, "--launcher", "slurm", "--no-wait", "--out", str(sweep), "--no-report")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.strip().splitlines()[-1]
    assert job == job_of(sweep)
    name = "adam__seed0"
    run_dir = sweep / "runs" / name / "counterexample" / "adam" / name
    wait_for(lambda: any((run_dir / "checkpoints").glob("periodic-*.ckpt")), 300, "the task to train")
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    follow = compare(*common, "--launcher", "slurm", "--slurm.poll", "2", "--out", str(sweep), timeout=900)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "submitted" not in follow.stdout  # it was pending or running: followed, not resubmitted
    log = (sweep / "slurm" / "logs" / f"{job}_0.out").read_text()
    _interrupted_then_resumed(sweep, name, log)
    assert "SIGUSR1" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == steps
    assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 2  # two processes wrote the run
    out, _ = baseline.communicate(timeout=600)
    assert baseline.returncode == 0, out[-3000:]
    assert_same_final_state(run_dir, sweeps / "local" / "runs" / name / "counterexample" / "adam" / name)


def _scontrol_show(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _seconds(text: str) -> int:
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def test_time_limit_checkpoints_requeues_resumes_bit_identical(sweeps, steps_per_second):
    """A running task's time limit comes near: SLURM's --signal=B:USR1@120 warning makes the run save,
    the task is requeued, resumes and ends as the uninterrupted run. SLURM sends that warning up to
    ~30 s early, so the test shortens the limit of a task that is training (scontrol update) instead
    of guessing a start-up time, and gives the requeued task its long limit back."""
    steps = steps_for(steps_per_second, 60)
    common = [*SMALL, "--optimizers", "adashift", "--seeds", "1", "--trainer.max_steps", str(steps),
              "--data.steps_per_epoch", "50"]
    sweep = sweeps / "slurm"
    baseline = compare(*common, "--out", str(sweeps / "local"), wait=False)
    submitted = compare(*common, "--launcher", "slurm", "--slurm.time", "10", "--no-wait", "--out", str(sweep),
                        "--no-report")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    task = f"{job_of(sweep)}_0"
    name = "adashift__seed0"
    run_dir = sweep / "runs" / name / "counterexample" / "adashift" / name
    wait_for(lambda: any((run_dir / "checkpoints").glob("periodic-*.ckpt")), 300, "the task to train")
    elapsed = _seconds(_scontrol_show(task)["RunTime"])
    minutes = (elapsed + 120) // 60  # the warning (120 s before the end) is due now, the end >= 60 s away
    assert subprocess.run(["scontrol", "update", f"JobId={task}", f"TimeLimit={minutes}"]).returncode == 0
    wait_for(lambda: int(_scontrol_show(task).get("Restarts", 0)) >= 1, 300, "the task to be requeued")
    assert subprocess.run(["scontrol", "update", f"JobId={task}", "TimeLimit=10"]).returncode == 0
    follow = compare(*common, "--launcher", "slurm", "--slurm.time", "10", "--slurm.poll", "2", "--out", str(sweep),
                     timeout=900)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    log = (sweep / "slurm" / "logs" / f"{task}.out").read_text()
    _interrupted_then_resumed(sweep, name, log)
    assert "SIGUSR1" in log
    assert "#SBATCH --signal=B:USR1@120" in (sweep / "slurm" / "submit-1.sbatch").read_text()
    out, _ = baseline.communicate(timeout=600)
    assert baseline.returncode == 0, out[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == steps
    assert_same_final_state(run_dir, sweeps / "local" / "runs" / name / "counterexample" / "adashift" / name)


def test_a_run_failing_with_a_user_error_is_reported_failed_once(sweeps):
    sweep = sweeps / "slurm"
    # model.bound -1 passes the up-front checks (a value only the task's constructor judges) and fails
    run = compare(*SMALL, "--optimizers", "adam", "--grid", "model.bound=1,-1", "--trainer.max_steps", "20",
                  "--data.steps_per_epoch", "10", "--launcher", "slurm", "--slurm.poll", "2", "--out", str(sweep))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    bad = "adam__model.bound=-1__seed0"
    failed = [ln for ln in run.stdout.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED  {bad}  exit 2: error: invalid model.bound -1")
    assert "0 pending, 0 running, 1 done, 1 failed" in run.stdout
    record = json.loads((sweep / "runs" / bad / "compare.json").read_text())
    assert record["attempts"] == 1 and record["slurm"]["requeued"] is False
    job = job_of(sweep)
    index = json.loads((sweep / "slurm" / "jobs.json").read_text())["submissions"][0]["runs"].index(bad)
    state = subprocess.run(["squeue", "--noheader", "--array", "--states=all", f"--jobs={job}", "--format=%K|%T"],
                           capture_output=True, text=True).stdout.split()
    assert f"{index}|FAILED" in state  # SLURM's own verdict, within MinJobAge
    restarts = subprocess.run(["scontrol", "-o", "show", "job", f"{job}_{index}"], capture_output=True, text=True)
    assert "Restarts=0" in restarts.stdout
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert {r["name"]: r["status"] for r in report["runs"]}[bad] == "failed"


def test_a_sweep_of_two_process_ddp_runs_completes(sweeps):
    sweep = sweeps / "slurm"
    run = compare(*SMALL, "--optimizers", "adam", "--seeds", "2", "--trainer.max_steps", "20",
                  "--data.steps_per_epoch", "10", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", "--launcher", "slurm", "--slurm.poll", "2", "--out", str(sweep),
                  timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "#SBATCH --ntasks-per-node=2" in (sweep / "slurm" / "submit-1.sbatch").read_text()
    for seed in (0, 1):
        name = f"adam__seed{seed}"
        record = json.loads((sweep / "runs" / name / "compare.json").read_text())
        assert record["launcher"][0] == "srun" and record["exit_code"] == 0
        summary = json.loads((sweep / "runs" / name / "counterexample" / "adam" / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 20
        assert summary["provenance"]["device"] == "cpu x2 (DDPStrategy)"
