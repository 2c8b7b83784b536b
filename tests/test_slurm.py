"""compare --launcher slurm without a cluster: option parsing, the batch script, the up-front errors,
the state bookkeeping against a fake sbatch/squeue/scontrol/scancel on PATH (tiny shell scripts), and
the array task's wrapper (`python -m adashift_pl.slurm task`) signalled in a subprocess. The same
paths against a real one-node SLURM: tests/cluster/ (README "Sweeps on a cluster")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adashift_pl import compare as C
from adashift_pl import slurm as S
from adashift_pl.errors import UserError

TINY = ["--model.warmup_steps", "0", "--model.replicas", "4", "--trainer.max_steps", "20",
        "--data.steps_per_epoch", "10", "--trainer.log_every_n_steps", "5", "--correlation", "false"]

FAKE = {
    # sbatch --test-only refuses partition "nope" (as SLURM does); sbatch --parsable prints a new job id
    "sbatch": r'''
echo "sbatch $*" >> "$FAKE_SLURM_DIR/calls"
if [[ " $* " == *" --test-only "* ]]; then
  if grep -q -- "--partition=nope" ; then
    echo "sbatch: error: invalid partition specified: nope" >&2
    echo "allocation failure: Invalid partition name specified" >&2
    exit 1
  fi
  echo "sbatch: Job 1 to start at 2026-01-01T00:00:00" >&2
  exit 0
fi
n=$(cat "$FAKE_SLURM_DIR/next-id" 2>/dev/null || echo 100)
echo $((n + 1)) > "$FAKE_SLURM_DIR/next-id"
cp "${@: -1}" "$FAKE_SLURM_DIR/submitted-$n.sbatch"
echo "$n"
''',
    # squeue prints queue.K (%F|%K|%T|%r|%e rows) on its K-th call (the last one again after that);
    # no file: nothing queued
    "squeue": r'''
echo "squeue $*" >> "$FAKE_SLURM_DIR/calls"
k=$(( $(cat "$FAKE_SLURM_DIR/squeue-calls" 2>/dev/null || echo 0) + 1 ))
echo $k > "$FAKE_SLURM_DIR/squeue-calls"
f="$FAKE_SLURM_DIR/queue.$k"
while [[ ! -f $f && $k -gt 1 ]]; do k=$((k - 1)); f="$FAKE_SLURM_DIR/queue.$k"; done
[[ -f $f ]] && cat "$f"
exit 0
''',
    "scontrol": 'echo "scontrol $*" >> "$FAKE_SLURM_DIR/calls"\n',
    "scancel": 'echo "scancel $*" >> "$FAKE_SLURM_DIR/calls"\n',
}


def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """SLURM's client commands as tiny scripts that log their calls to <dir>/calls."""
    d = tmp_path / "fake-slurm"
    (d / "bin").mkdir(parents=True)
    for name, body in FAKE.items():
        p = d / "bin" / name
        p.write_text("#!/bin/bash\n" + body)
        p.chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM_DIR", str(d))
    monkeypatch.setenv("PATH", f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return d


def calls(d: Path) -> list[str]:
    return (d / "calls").read_text().splitlines() if (d / "calls").exists() else []


# --------------------------------------------------------------------------- options


def test_settings_from_recipe_and_flags():
    pairs, rest = S.split_args(["--slurm.partition", "gpu", "--trainer.max_steps", "5", "--slurm.time=1-12",
                                "--slurm.extra", "--exclusive", "--slurm.extra=--mail-type=END",
                                "--slurm.gpus-per-node", "a100:4"])
    assert rest == ["--trainer.max_steps", "5"]
    opts = S.settings({"partition": "cpu", "mem": "32G", "extra": ["--comment=fig4"], "cpus_per_task": 8}, pairs)
    assert opts["partition"] == "gpu" and opts["time"] == "1-12" and opts["mem"] == "32G"
    assert opts["gpus_per_node"] == "a100:4" and opts["cpus_per_task"] == 8
    assert opts["extra"] == ["--comment=fig4", "--exclusive", "--mail-type=END"]
    assert opts["signal_seconds"] == 120 and opts["nodes"] is None
    assert S._time_seconds("90") == 5400 and S._time_seconds("1:30") == 90 and S._time_seconds("2:00:00") == 7200
    assert S._time_seconds("1-12") == 129600 and S._time_seconds("1-0:30:05") == 88205
    assert S._time_seconds("UNLIMITED") is None


@pytest.mark.parametrize("pairs, message", [
    ([("partiton", "gpu")], "unknown --slurm key 'partiton': allowed are partition, time, nodes"),
    ([("nodes", "0")], "invalid --slurm.nodes '0': allowed is an integer >= 1"),
    ([("time", "abc")], "invalid --slurm.time 'abc': allowed is a SLURM time"),
    ([("mem", "lots")], "invalid --slurm.mem 'lots'"),
    ([("gpus_per_node", "a100")], "invalid --slurm.gpus_per_node 'a100': allowed is N or TYPE:N"),
    ([("extra", "exclusive")], "invalid --slurm.extra 'exclusive': allowed is sbatch options"),
    ([("partition", "a b")], "invalid --slurm.partition 'a b'"),
    ([("time", "2")], "--slurm.signal_seconds 120 is not shorter than --slurm.time 2 (120 s)"),
])
def test_settings_errors(pairs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S.settings(None, pairs)
    with pytest.raises(UserError, match="unknown recipe slurm key 'gpus'"):
        S.settings({"gpus": 1}, [])


def test_shape_follows_lightnings_one_task_per_device():
    opts = S.settings(None, [])
    trainer = lambda **kw: [{"trainer": kw}]  # noqa: E731
    assert S.shape(opts, trainer()) == (1, 1)
    assert S.shape(opts, trainer(devices=2, strategy="ddp")) == (1, 2)
    assert S.shape(opts, trainer(devices="4", num_nodes=2)) == (2, 4)
    assert S.shape(S.settings(None, [("gpus_per_node", "a100:4")]), trainer(devices="auto")) == (1, 4)
    assert S.shape(S.settings(None, [("ntasks_per_node", "2"), ("nodes", "3")]), trainer()) == (3, 2)
    with pytest.raises(UserError, match="--slurm.ntasks_per_node 2 but trainer.devices 4"):
        S.shape(S.settings(None, [("ntasks_per_node", "2")]), trainer(devices=4))
    with pytest.raises(UserError, match="--slurm.nodes 2 but trainer.num_nodes 1"):
        S.shape(S.settings(None, [("nodes", "2")]), trainer(num_nodes=1))
    with pytest.raises(UserError, match="the same trainer.devices"):
        S.shape(opts, trainer(devices=1) + trainer(devices=2))


def _plan(argv, tmp_path):
    args, rest = C.build_parser().parse_known_args(argv)
    return C.make_plan(args, rest)


def test_batch_script_runs_the_local_launchers_commands(tmp_path):
    sweep = tmp_path / "sweep"
    plan, _ = _plan(["--task", "counterexample", "--optimizers", "adam,adashift", "--seeds", "2",
                     "--out", str(sweep), *TINY], tmp_path)
    names = [c["name"] for c in plan["combos"]][1:]
    opts = S.settings({"partition": "gpu", "time": "4:00:00", "extra": ["--exclusive"]},
                      [("gpus_per_node", "1"), ("cpus_per_task", "8"), ("signal_seconds", "300")])
    script = S.batch_script(sweep, plan, names, opts, nodes=1, tasks=1, throttle=2, number=3)
    lines = script.splitlines()
    for expected in ["#SBATCH --array=0-2%2", f"#SBATCH --output={sweep}/slurm/logs/%A_%a.out",
                     "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                     "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00", "#SBATCH --gpus-per-node=1",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --exclusive", "#SBATCH --job-name=adashift-sweep", f"#SBATCH --chdir={Path.cwd()}"]:
        assert expected in lines, expected
    # array index i -> names[i], listed with exactly the command the local launcher runs
    sweep_local = C.Sweep(sweep, plan)
    for i, name in enumerate(names):
        combo = next(c for c in plan["combos"] if c["name"] == name)
        import shlex

        assert f"  {name}  # {i}: {shlex.join(sweep_local.command(combo, None))}" in lines
    assert lines[-1].startswith("exec ") and '"${RUNS[$SLURM_ARRAY_TASK_ID]}"' in lines[-1]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # the RUNS array picks the right run in bash
    probe = script.rsplit("\n# one CPU", 1)[0] + '\necho "${RUNS[$SLURM_ARRAY_TASK_ID]}"\n'
    got = subprocess.run(["bash", "-c", probe], env={**os.environ, "SLURM_ARRAY_TASK_ID": "2"},
                         capture_output=True, text=True).stdout.strip()
    assert got == names[2]


def test_recipe_slurm_block_and_dry_run(tmp_path, monkeypatch, capsys):
    """A recipe's slurm: block sets the cluster options, --slurm.KEY flags override them; --dry-run
    prints the batch script and needs no SLURM at all."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("title: t\nexpect: e\ntask: counterexample\noptimizers: [adam]\nseeds: 2\n"
                      "slurm: {partition: gpu, time: '2:00:00', extra: ['--exclusive']}\n")
    assert C.main(["--recipe", str(recipe), "--launcher", "slurm", "--dry-run", "--out", str(tmp_path / "s"),
                   "--slurm.time", "30", *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --exclusive", "#SBATCH --array=0-1"):
        assert expected in lines, expected
    assert not (tmp_path / "s").exists()
    recipe.write_text(recipe.read_text().replace("partition: gpu", "queue: gpu"))
    assert C.main(["--recipe", str(recipe), "--launcher", "slurm", "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert "unknown recipe slurm key 'queue'" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors before anything is submitted


SWEEP = ["--task", "counterexample", "--optimizers", "adam,adashift", "--seeds", "2", *TINY]


def test_no_sbatch_on_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert C.main([*SWEEP, "--launcher", "slurm", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sbatch, squeue, scontrol, scancel not found on PATH: --launcher slurm needs")
    assert "\n" not in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, message", [
    (["--slurm.partiton", "gpu"], "error: unknown --slurm key 'partiton': allowed are partition, time"),
    (["--slurm.partition", "nope"], "error: SLURM rejects the job (sbatch: error: invalid partition specified: nope; "
                                    "allocation failure: Invalid partition name specified)"),
    (["--gpus", "0,1"], "error: --gpus is for --launcher local"),
    (["--trainer.devices", "2", "--slurm.ntasks_per_node", "3"],
     "error: --slurm.ntasks_per_node 3 but trainer.devices 2"),
])
def test_user_errors_exit_2_before_submitting(extra, message, tmp_path, monkeypatch, capsys):
    d = fake_slurm(tmp_path, monkeypatch)
    assert C.main([*SWEEP, "--launcher", "slurm", "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not any("--parsable" in c for c in calls(d)) and not (tmp_path / "s").exists()


def test_slurm_flags_need_the_slurm_launcher(tmp_path, capsys):
    assert C.main([*SWEEP, "--out", str(tmp_path / "s"), "--slurm.partition", "gpu"]) == 2
    assert "--slurm.partition needs --launcher slurm" in capsys.readouterr().err
    assert C.main([*SWEEP, "--out", str(tmp_path / "s"), "--no-wait"]) == 2
    assert "--no-wait needs --launcher slurm" in capsys.readouterr().err


@pytest.mark.parametrize("grid, message", [
    ("optimizer.lrr=1e-3,1e-2", "run adam__lrr=0.001__seed0: invalid optimizer setting for 'adam': optimizer 'adam' "
                                "does not take lrr"),
    ("optimizer.lr=abc", "run adam__lr=abc__seed0: invalid optimizer.lr 'abc' for 'adam': allowed is a number"),
    ("optimizer.lr=1e-2,-1", "run adam__lr=-1__seed0: invalid optimizer setting for 'adam': Invalid learning rate: -1"),
    ("model.widthh=3", "run adam__model.widthh=3__seed0: unknown model key(s) widthh for task counterexample"),
    ("trainer.max_stepz=3", "run adam__trainer.max_stepz=3__seed0: unknown trainer key(s) max_stepz"),
])
@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_grid_keys_and_values_are_checked_before_anything_launches(grid, message, launcher, tmp_path, capsys,
                                                                  monkeypatch):
    """A key the optimizer or task does not take, or a value of the wrong kind, is one line and exit 2
    before a single run starts (each run used to start and fail the same way)."""
    d = fake_slurm(tmp_path, monkeypatch)  # a SLURM that must not be asked anything
    sweep = tmp_path / "sweep"
    argv = ["--task", "counterexample", "--optimizers", "adam", "--grid", grid, "--out", str(sweep),
            "--launcher", launcher, *TINY]
    assert C.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not sweep.exists() and calls(d) == []


# --------------------------------------------------------------------------- state bookkeeping (fake SLURM)


def _finish(sweep: Path, plan: dict, name: str, job: str, *, rc: int, status: str | None) -> None:
    """What an array task leaves behind: summary.json (if train got that far) and compare.json."""
    combo = next(c for c in plan["combos"] if c["name"] == name)
    run_dir = sweep / combo["run_dir"]
    if status:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": status, "global_step": 20, "final_metrics": {"val/expected_loss": 0.25}}))
    record = {"command": ["python"], "exit_code": rc, "seconds": 1.5, "run_dir": combo["run_dir"],
              "slurm": {"job": job}}
    if rc:
        record["stderr_tail"] = "error: something the user got wrong"
    (sweep / "runs" / name).mkdir(parents=True, exist_ok=True)
    (sweep / "runs" / name / "compare.json").write_text(json.dumps(record))


def test_submit_report_state_and_resubmit_only_what_is_missing_or_failed(tmp_path, monkeypatch, capsys):
    d = fake_slurm(tmp_path, monkeypatch)
    sweep = tmp_path / "sweep"
    argv = [*SWEEP, "--launcher", "slurm", "--out", str(sweep), "--jobs", "2", "--no-wait", "--slurm.poll", "0.01"]
    assert C.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "100"  # --no-wait: the job id, last
    assert "4 runs: 0 pending, 0 running, 0 done, 0 failed, 4 not submitted" in out[0]
    jobs = json.loads((sweep / "slurm" / "jobs.json").read_text())["submissions"]
    names = jobs[0]["runs"]
    assert jobs[0]["job_id"] == "100" and jobs[0]["script"] == "slurm/submit-1.sbatch" and len(names) == 4
    assert (sweep / "slurm" / "submit-1.sbatch").read_text() == (d / "submitted-100.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in (sweep / "slurm" / "submit-1.sbatch").read_text()
    assert (sweep / "slurm" / "logs").is_dir() and (sweep / "sweep.json").is_file()
    plan = json.loads((sweep / "sweep.json").read_text())

    # run 0 completed, run 1 failed on its own, run 2 still running, run 3 was cancelled while pending
    _finish(sweep, plan, names[0], "100_0", rc=0, status="completed")
    _finish(sweep, plan, names[1], "100_1", rc=2, status=None)
    (d / "queue.1").write_text("100|0|COMPLETED|None|2020-01-01T00:00:00\n"
                               "100|1|FAILED|NonZeroExitCode|2020-01-01T00:00:00\n"
                               "100|2|RUNNING|None|N/A\n"
                               "100|3|CANCELLED|None|2020-01-01T00:00:00\n")
    assert C.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "4 runs: 0 pending, 1 running, 1 done, 2 failed" in out[0]
    assert out[-1] == "101"
    second = json.loads((sweep / "slurm" / "jobs.json").read_text())["submissions"][1]
    assert second["runs"] == [names[1], names[3]] and second["job_id"] == "101"
    assert "#SBATCH --array=0-1%2" in (sweep / "slurm" / "submit-2.sbatch").read_text()

    # waiting (no --no-wait): the resubmitted runs and the running one end; each ending is said once
    for k, rows in enumerate([
        ["100|2|RUNNING|None|N/A", "101|0|PENDING|Priority|N/A", "101|1|PENDING|Priority|N/A"],
        ["100|2|RUNNING|None|N/A", "101|0|RUNNING|None|N/A", "101|1|PENDING|Resources|N/A"],
        ["100|2|COMPLETED|None|2020-01-01T00:00:00", "101|0|RUNNING|None|N/A", "101|1|RUNNING|None|N/A"],
        ["100|2|COMPLETED|None|2020-01-01T00:00:00", "101|0|FAILED|None|2020-01-01T00:00:00",
         "101|1|COMPLETED|None|2020-01-01T00:00:00"],
    ], start=1):
        (d / f"queue.{k}").write_text("\n".join(rows) + "\n")
    (d / "squeue-calls").write_text("0")
    _finish(sweep, plan, names[2], "100_2", rc=0, status="completed")
    _finish(sweep, plan, names[1], "101_0", rc=2, status=None)
    _finish(sweep, plan, names[3], "101_1", rc=0, status="completed")
    # (the files are there from the start: the queue decides while a task is pending or running)
    assert C.main(argv[:-3] + ["--no-report", "--slurm.poll", "0.01"]) == 1  # one run failed
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    # the state on arrival submits nothing new: run 1 is pending again under job 101
    assert "4 runs: 2 pending, 1 running, 1 done, 0 failed" in lines[0] and "submitted" not in text
    assert any(ln.endswith("] 1 pending, 2 running, 1 done, 0 failed") for ln in lines)
    assert any(ln.endswith("0 pending, 0 running, 3 done, 1 failed") for ln in lines)
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    assert failed == [f"FAILED  {names[1]}  exit 2: error: something the user got wrong  "
                      f"[runs/{names[1]}/error.txt]  [job 101_0]"]
    assert sorted(ln.split()[1] for ln in lines if ln.startswith("done")) == sorted([names[2], names[3]])
    assert f"1 failed or interrupted ({names[1]})" in lines[-1]


def test_a_task_killed_without_a_record_is_failed_with_slurms_state(tmp_path, monkeypatch):
    d = fake_slurm(tmp_path, monkeypatch)
    sweep = tmp_path / "sweep"
    plan, _ = _plan([*SWEEP, "--out", str(sweep)], tmp_path)
    (sweep / "slurm").mkdir(parents=True)
    names = [c["name"] for c in plan["combos"]]
    (sweep / "slurm" / "jobs.json").write_text(json.dumps({"submissions": [{"job_id": "7", "runs": names}]}))
    # task 0 started (the wrapper's start record) and was killed at its time limit; task 1 was never started
    (sweep / "runs" / names[0]).mkdir(parents=True)
    (sweep / "runs" / names[0] / "compare.json").write_text(json.dumps({"slurm": {"job": "7_0"}, "attempts": 0}))
    (d / "queue.1").write_text("7|0|TIMEOUT|TimeLimit|2020-01-01T00:00:00\n7|1|CANCELLED|None|2020-01-01T00:00:00\n"
                               "7|2|RUNNING|None|N/A\n7|3|PENDING|Priority|N/A\n")
    status = S.sweep_status(sweep, plan)
    assert [status[n].state for n in names] == ["failed", "failed", "running", "pending"]
    assert status[names[0]].detail.startswith("ended TIMEOUT without a record from the run")
    assert status[names[1]].detail == "never started (CANCELLED)"
    record = json.loads((sweep / "runs" / names[0] / "compare.json").read_text())
    assert record["exit_code"] == -1 and "TIMEOUT" in record["stderr_tail"]
    # a task that ended a moment ago is not judged until its files can have arrived (shared file systems)
    just_now = time.strftime("%Y-%m-%dT%H:%M:%S")
    (sweep / "runs" / names[2]).mkdir(parents=True)
    (sweep / "runs" / names[2] / "compare.json").write_text(json.dumps({"slurm": {"job": "7_2"}}))
    (d / "queue.2").write_text(f"7|2|FAILED|NonZeroExitCode|{just_now}\n")
    assert S.sweep_status(sweep, plan)[names[2]].state == "running"
    assert "exit_code" not in json.loads((sweep / "runs" / names[2] / "compare.json").read_text())
    # the report lists it as failed (it reads compare.json as for a local sweep)
    (sweep / "sweep.json").write_text(json.dumps(plan))
    from adashift_pl.report import load_runs

    runs = {r.name: r for r in load_runs(sweep)[0]}
    assert runs[names[0]].status == "failed" and "TIMEOUT" in runs[names[0]].error_tail


# --------------------------------------------------------------------------- the array task's wrapper


def _task_env(d: Path, job: str = "77", restarts: int | None = None) -> dict:
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "78",
           "SLURM_NTASKS": "1", "OMP_NUM_THREADS": "1"}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    return env


def _task(sweep: Path, name: str, env: dict) -> subprocess.Popen:
    """The array task's command, in its own process group (the test kills what is left of it)."""
    return subprocess.Popen([sys.executable, "-m", "adashift_pl.slurm", "task", str(sweep), name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _sweep_on_disk(tmp_path, steps: int) -> tuple[Path, dict]:
    sweep = tmp_path / "sweep"
    plan, _ = _plan(["--task", "counterexample", "--optimizers", "adam", "--out", str(sweep),
                     "--model.warmup_steps", "0", "--model.replicas", "4", "--trainer.max_steps", str(steps),
                     "--data.steps_per_epoch", "50", "--trainer.log_every_n_steps", "10", "--correlation", "false",
                     "--num-threads", "1"], tmp_path)
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps(plan))
    return sweep, plan


def test_task_saves_and_requeues_on_sigusr1(tmp_path, monkeypatch):
    """SIGUSR1 to the task (SLURM's --signal=B:USR1@N): SIGTERM to the training, which saves last.ckpt
    and exits 143; the task records it and requeues itself (scontrol requeue ARRAYJOB_TASK)."""
    d = fake_slurm(tmp_path, monkeypatch)
    sweep, plan = _sweep_on_disk(tmp_path, steps=10**6)
    combo = plan["combos"][0]
    proc = _task(sweep, combo["name"], _task_env(d))
    ckpts = sweep / combo["run_dir"] / "checkpoints"
    try:
        _wait_for(lambda: any(ckpts.glob("periodic-*.ckpt")), 180, "the first periodic checkpoint (training)")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, out
    assert "scontrol requeue 77_0" in calls(d)
    record = json.loads((sweep / "runs" / combo["name"] / "compare.json").read_text())
    assert record["exit_code"] == 143 and record["slurm"]["requeued"] is True and record["slurm"]["job"] == "77_0"
    assert record["command"] == C.train_command(plan, sweep, combo, None)
    summary = json.loads((sweep / combo["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["global_step"] < 10**6
    assert (sweep / combo["run_dir"] / "checkpoints" / "last.ckpt").is_file()
    assert "SIGUSR1: the run saves last.ckpt" in out and "scontrol requeue 77_0: done" in out


def test_task_requeued_without_progress_gives_up(tmp_path, monkeypatch):
    """A task signalled before it trains a step (each time) is not requeued forever: after MAX_STALLS
    requeues in a row without progress it is recorded as failed."""
    d = fake_slurm(tmp_path, monkeypatch)
    sweep, plan = _sweep_on_disk(tmp_path, steps=20)
    name = plan["combos"][0]["name"]
    (sweep / "runs" / name).mkdir(parents=True)
    (sweep / "runs" / name / "compare.json").write_text(json.dumps(
        {"attempts": 2, "slurm": {"job": "77_0", "stalls": S.MAX_STALLS - 1}}))
    proc = _task(sweep, name, _task_env(d, restarts=2))
    try:
        _wait_for(lambda: (sweep / "runs" / name / "stdout.log").exists(), 60, "the run to start")
        proc.send_signal(signal.SIGUSR1)  # the training is still importing: killed by SIGTERM, nothing saved
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    record = json.loads((sweep / "runs" / name / "compare.json").read_text())
    assert record["slurm"]["requeued"] is False and record["slurm"]["stalls"] == S.MAX_STALLS, out
    assert record["exit_code"] == 1 and proc.returncode == 1
    assert "without training a step" in record["stderr_tail"]
    assert not any("requeue" in c for c in calls(d))
