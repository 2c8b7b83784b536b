"""Sweeps on a SLURM cluster: `python -m adashift_pl.compare ... --launcher slurm`.

A submission is one plain `sbatch --array` script, written into the sweep directory before it is
submitted (slurm/submit-N.sbatch; it can be read, and resubmitted by hand with `sbatch`). Array task
i runs one combination through `python -m adashift_pl.slurm task SWEEP_DIR NAME`, which

- runs exactly the train command the local launcher runs (compare.train_command, fixed run name),
  with `--resume .../last.ckpt` when the run has one -- under `srun` when the task has several
  processes (a DDP run: Lightning's SLURMEnvironment reads the ranks from srun);
- appends its output to runs/<combo>/stdout.log and stderr.log and writes runs/<combo>/compare.json
  (as the local launcher does, so `report` reads a SLURM sweep unchanged);
- on SIGUSR1 (SLURM sends it `signal_seconds` before the time limit: `--signal=B:USR1@N`, or
  `scancel --signal=USR1 --batch JOB_TASK`) sends SIGTERM to the training, which saves last.ckpt and
  exits 143 (train.py's contract), then requeues its own array task, which resumes from last.ckpt.
  A run that fails on its own (any other exit) is not requeued, and a run requeued MAX_STALLS times
  in a row without training a step is recorded as failed.

SIGTERM to the batch shell (scancel, preemption, the time limit itself) is left to SLURM: it
signals the training processes too, they save last.ckpt; the run is "interrupted" and the next
`compare` resubmits it (a preemption with PreemptMode=REQUEUE requeues it by itself).

Sweep directory additions: slurm/submit-N.sbatch, slurm/jobs.json (every submission: job id,
script, the run of each array index, the settings), slurm/logs/<array job>_<task>.out (what the
task printed: the command, signals, requeues). The scheduler's view comes from squeue (no
accounting database needed); a run that left the queue is judged by its files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from adashift_pl.compare import (
    outcome,
    outcome_line,
    prepare_start,
    record_run,
    run_dir_of,
    run_logged,
    run_state,
    train_command,
)
from adashift_pl.errors import UserError
from adashift_pl.files import atomic_write_text, read_json
from adashift_pl.stopping import INTERRUPTED_EXIT_CODES

REQUEUE_SIGNAL = signal.SIGUSR1  # the batch shell's "save and requeue" (Lightning's choice too)
MAX_STALLS = 3  # requeues in a row without a trained step before the run counts as failed
# A task that ended this recently and whose files do not say "done" yet is not judged yet: what a
# compute node wrote can reach the login node's view of a shared file system late (NFS caches).
SETTLE_SECONDS = 60
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel")

# --slurm.KEY: (sbatch option or None for compare's own, kind, default, help). One table: parsing,
# validation, the batch script and --help all read it.
OPTIONS: dict[str, tuple[str | None, str, Any, str]] = {
    "partition": ("--partition", "name", None, "partition (queue), e.g. gpu"),
    "time": ("--time", "time", None, "time limit of one task, e.g. 24:00:00, 2-00:00:00 or minutes"),
    "nodes": ("--nodes", "count", None, "nodes per run (default: trainer.num_nodes, else 1)"),
    "ntasks_per_node": ("--ntasks-per-node", "count", None,
                        "processes per node, one per device (default: trainer.devices, else gpus_per_node, else 1)"),
    "gpus_per_node": ("--gpus-per-node", "gpus", None, "GPUs per node: N or TYPE:N"),
    "cpus_per_task": ("--cpus-per-task", "count", None, "CPUs per process (also its OMP_NUM_THREADS)"),
    "mem": ("--mem", "mem", None, "memory per node, e.g. 32G"),
    "account": ("--account", "name", None, "account charged"),
    "qos": ("--qos", "name", None, "quality of service"),
    "constraint": ("--constraint", "name", None, "node features, e.g. a100"),
    "job_name": ("--job-name", "name", None, "job name (default adashift-<sweep directory name>)"),
    "extra": (None, "lines", [], "more sbatch options, one per flag, e.g. --exclusive (repeatable)"),
    "signal_seconds": (None, "count", 120, "seconds before the time limit a run is told to save and requeue"),
    "poll": (None, "seconds", 30, "seconds between squeue calls while compare waits"),
}

# squeue states (%T) of a task that is not running yet / has ended; anything else counts as running
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


# --------------------------------------------------------------------------- settings


def split_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """['--slurm.partition', 'gpu', '--trainer.max_steps', '5'] -> ([('partition', 'gpu')], [...rest])."""
    pairs, rest, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--slurm.") or arg == "--slurm":
            key, sep, value = arg[len("--slurm."):].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value, e.g. {arg} {_example(key)}")
                value = argv[i + 1]
                i += 1
            pairs.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return pairs, rest


def _example(key: str) -> str:
    return {"time": "24:00:00", "mem": "32G", "gpus_per_node": "1", "extra": "--exclusive"}.get(key, "gpu")


def _time_seconds(text: str) -> int | None:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds; None for unlimited."""
    if text.lower() in ("infinite", "unlimited"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def _check_value(key: str, value: Any) -> Any:
    kind = OPTIONS[key][1]
    text = str(value).strip()
    try:
        if kind == "count":
            n = int(text)
            if n < 1 or isinstance(value, (bool, float)):
                raise ValueError
            return n
        if kind == "seconds":
            x = float(text)
            if not x > 0:
                raise ValueError
            return x
        if kind == "time":
            _time_seconds(text)
            return text
        if kind == "mem" and not re.fullmatch(r"\d+[KMGT]?B?", text, re.I):
            raise ValueError
        if kind == "gpus" and not re.fullmatch(r"(?:[\w.-]+:)?\d+", text):
            raise ValueError
        if kind == "lines":
            lines = value if isinstance(value, list) else [value]
            out = [str(v).strip() for v in lines]
            if any(not v.startswith(("--", "#SBATCH ")) or "\n" in v for v in out):
                raise ValueError
            return out
        if not text or any(c.isspace() for c in text):
            raise ValueError
        return text
    except ValueError:
        allowed = {"count": "an integer >= 1", "seconds": "a number of seconds > 0",
                   "time": "a SLURM time (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S)",
                   "mem": "a size such as 32G or 4000M", "gpus": "N or TYPE:N (e.g. 4 or a100:4)",
                   "lines": "sbatch options such as --exclusive or --mail-type=END (one line each)",
                   "name": "a name without spaces"}[kind]
        raise UserError(f"invalid --slurm.{key} {value!r}: allowed is {allowed}") from None


def settings(recipe_block: dict | None, cli: Sequence[tuple[str, str]]) -> dict:
    """The SLURM settings: defaults < the recipe's `slurm:` block < --slurm.KEY flags (extra lines add up)."""
    out = {k: (list(v[2]) if isinstance(v[2], list) else v[2]) for k, v in OPTIONS.items()}
    if recipe_block is not None and not isinstance(recipe_block, dict):
        raise UserError(f"the recipe's slurm: block must map keys to values, got {recipe_block!r}")
    given = [(str(k), v, "recipe slurm") for k, v in (recipe_block or {}).items()] + \
            [(k, v, "--slurm") for k, v in cli]
    for key, value, where in given:
        key = key.replace("-", "_")
        if key not in OPTIONS:
            raise UserError(f"unknown {where} key {key!r}: allowed are {', '.join(OPTIONS)}")
        value = _check_value(key, value)
        out[key] = out[key] + value if key == "extra" and where == "--slurm" else value
    limit = _time_seconds(out["time"]) if out["time"] else None
    if limit is not None and out["signal_seconds"] >= limit:
        raise UserError(f"--slurm.signal_seconds {out['signal_seconds']} is not shorter than --slurm.time "
                        f"{out['time']} ({limit} s): allowed is a warning well inside the time limit")
    return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def shape(opts: dict, configs: Sequence[dict]) -> tuple[int, int]:
    """(nodes, tasks per node) of every run: Lightning under SLURM wants one task per device
    (trainer.devices) on trainer.num_nodes nodes, and refuses a mismatch in every run -- here it is
    one line before anything is submitted."""
    trainers = {json.dumps([c["trainer"].get("devices"), c["trainer"].get("num_nodes")]) for c in configs}
    if len(trainers) > 1:
        raise UserError("the runs of one SLURM sweep need the same trainer.devices and trainer.num_nodes "
                        f"(found {', '.join(sorted(trainers))}): give them as fixed flags, not a grid")
    devices, num_nodes = json.loads(trainers.pop()) if trainers else (None, None)
    devices, num_nodes = _as_int(devices), _as_int(num_nodes)
    gpus = _as_int(str(opts["gpus_per_node"]).rpartition(":")[2]) if opts["gpus_per_node"] else None
    nodes = opts["nodes"] or num_nodes or 1
    tasks = opts["ntasks_per_node"] or devices or gpus or 1
    if num_nodes is not None and num_nodes != nodes:
        raise UserError(f"--slurm.nodes {nodes} but trainer.num_nodes {num_nodes}: Lightning needs them equal")
    if devices is not None and devices != tasks:
        raise UserError(f"--slurm.ntasks_per_node {tasks} but trainer.devices {devices}: Lightning runs one "
                        "SLURM task per device, give them equal")
    return nodes, tasks


# --------------------------------------------------------------------------- the batch script


def slurm_dir(sweep_dir: Path) -> Path:
    return sweep_dir / "slurm"


def batch_script(sweep_dir: Path, plan: dict, names: Sequence[str], opts: dict, nodes: int, tasks: int,
                 throttle: int | None, number: int, python: str = sys.executable) -> str:
    """The sbatch script of one submission: one array task per run in `names`."""
    sweep = sweep_dir.resolve()
    combos = {c["name"]: c for c in plan["combos"]}
    array = f"0-{len(names) - 1}" + (f"%{throttle}" if throttle else "")
    flags = [("--job-name", opts["job_name"] or f"adashift-{sweep.name}"), ("--array", array),
             ("--output", f"{sweep}/slurm/logs/%A_%a.out"), ("--open-mode", "append"),  # a requeue appends
             ("--requeue", None), ("--signal", f"B:{REQUEUE_SIGNAL.name.removeprefix('SIG')}@{opts['signal_seconds']}"),
             ("--chdir", str(Path.cwd())), ("--nodes", nodes), ("--ntasks-per-node", tasks)]
    flags += [(OPTIONS[k][0], opts[k]) for k in OPTIONS
              if OPTIONS[k][0] and k not in ("job_name", "nodes", "ntasks_per_node") and opts[k] is not None]
    lines = [
        "#!/bin/bash",
        f"# Sweep {sweep}, submission {number}: {len(names)} run(s) as one job array, written by",
        "# `python -m adashift_pl.compare --launcher slurm` (README: \"Sweeps on a cluster\").",
        "# Array task i runs RUNS[i] below through `python -m adashift_pl.slurm task`: the train command",
        "# listed with it (plus --resume <its last.ckpt> when it has one; under srun when a run has",
        "# several processes), output in runs/<run>/stdout.log and stderr.log, outcome in compare.json.",
        f"# SIGUSR1 ({opts['signal_seconds']} s before the time limit, or `scancel --signal=USR1 --batch JOB_TASK`):",
        "# the run saves last.ckpt and the task is requeued; it resumes from there.",
        "# Resubmit by hand: sbatch [--array=INDICES] <this file>",
    ]
    lines += [f"#SBATCH {flag}" + (f"={shlex.quote(str(value))}" if value is not None else "") for flag, value in flags]
    lines += [x if x.startswith("#SBATCH ") else f"#SBATCH {x}" for x in opts["extra"]]
    lines += ["", "RUNS=("]
    for i, name in enumerate(names):
        cmd = shlex.join(train_command(plan, sweep, combos[name], None, python))
        lines += [f"  {shlex.quote(name)}  # {i}: {cmd}"]
    lines += [")", "",
              "# one CPU thread per allocated CPU, unless the environment says otherwise",
              'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
              f'exec {shlex.quote(python)} -m adashift_pl.slurm task {shlex.quote(str(sweep))} '
              '"${RUNS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- talking to SLURM


def require_clients() -> None:
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not found on PATH: --launcher slurm needs SLURM's commands "
                        f"({', '.join(CLIENTS)}); run compare on a login node of the cluster, or use --launcher local")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def test_only(script: str) -> None:
    """`sbatch --test-only` reads the script from stdin: SLURM checks partition, time, resources,
    account and options against the cluster without submitting anything."""
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"SLURM rejects the job ({_one_line(proc.stderr or proc.stdout)}): check the --slurm.* "
                        "settings (sbatch --test-only)")


def submit(sweep_dir: Path, script: str, names: Sequence[str], opts: dict, number: int) -> str:
    """Write the script and submit it; record the job in slurm/jobs.json. Returns the array job id."""
    sdir = slurm_dir(sweep_dir)
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    path = sdir / f"submit-{number}.sbatch"
    atomic_write_text(path, script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"sbatch {path} failed: {_one_line(proc.stderr or proc.stdout)}")
    job_id = proc.stdout.strip().split(";")[0]
    jobs = read_json(sdir / "jobs.json") or {"submissions": []}
    jobs["submissions"].append({"job_id": job_id, "script": str(path.relative_to(sweep_dir)), "runs": list(names),
                                "settings": opts,
                                "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    atomic_write_text(sdir / "jobs.json", json.dumps(jobs, indent=2))
    return job_id


def queue(job_ids: Sequence[str], attempts: int = 3) -> dict[str, tuple[str, str, float | None]]:
    """{'123_4': (state, reason, seconds since it ended or None)} for the array tasks of these jobs
    that SLURM still knows (pending, running, or ended within MinJobAge). A failing squeue
    (slurmctld restarting) is asked again."""
    if not job_ids:
        return {}
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%F|%K|%T|%r|%e",
           f"--jobs={','.join(sorted(set(job_ids)))}"]
    for attempt in range(attempts):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0 or "Invalid job id" in proc.stderr:
            break  # (every one of them has left the queue)
        if attempt + 1 == attempts:
            raise UserError(f"squeue failed: {_one_line(proc.stderr)}; the jobs are not affected: re-run the "
                            "same command to follow them")
        time.sleep(5)
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            out[f"{parts[0]}_{parts[1]}"] = (parts[2], parts[3], _seconds_since(parts[4]))
    return out


def _seconds_since(text: str) -> float | None:
    try:  # squeue prints the cluster's local time, e.g. 2026-12-02T05:00:30 (N/A before the end)
        return time.time() - datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------- state of a sweep


@dataclass
class RunStatus:
    state: str           # pending | running | done | failed | unsubmitted
    job: str | None      # the array task, e.g. "123_4"
    detail: str = ""     # scheduler state/reason, or how it failed


def latest_jobs(sweep_dir: Path) -> dict[str, str]:
    """Each run's latest array task ('123_4'): from slurm/jobs.json, or from its compare.json when the
    task started from a submission made by hand."""
    latest: dict[str, str] = {}
    for sub in (read_json(slurm_dir(sweep_dir) / "jobs.json") or {}).get("submissions", []):
        for i, name in enumerate(sub["runs"]):
            latest[name] = f"{sub['job_id']}_{i}"
    for rec in (sweep_dir / "runs").glob("*/compare.json"):
        job = ((read_json(rec) or {}).get("slurm") or {}).get("job")
        name = rec.parent.name
        if job and (name not in latest or _job_order(job) > _job_order(latest[name])):
            latest[name] = job
    return latest


def _job_order(job: str) -> tuple[int, int]:
    a, _, b = job.partition("_")
    return (int(a), int(b or 0)) if a.isdigit() else (-1, -1)


def sweep_status(sweep_dir: Path, plan: dict) -> dict[str, RunStatus]:
    """Every run's state: the queue's while SLURM has it pending or running, else its files'."""
    latest = latest_jobs(sweep_dir)
    in_queue = queue([j.partition("_")[0] for j in latest.values()])
    out = {}
    for combo in plan["combos"]:
        name, job = combo["name"], latest.get(combo["name"])
        state, reason, ended = in_queue.get(job, (None, "", None)) if job else (None, "", None)
        if state in PENDING_STATES:
            out[name] = RunStatus("pending", job, reason if reason not in ("None", "") else state)
        elif state is not None and state not in ENDED_STATES:
            out[name] = RunStatus("running", job, state)
        else:
            out[name] = _ended_status(sweep_dir, combo, job, state,
                                      settled=ended is None or ended >= SETTLE_SECONDS)
    return out


def _ended_status(sweep_dir: Path, combo: dict, job: str | None, queue_state: str | None,
                  settled: bool = True) -> RunStatus:
    record = read_json(sweep_dir / "runs" / combo["name"] / "compare.json") or {}
    finished = "exit_code" in record
    if run_state(sweep_dir, combo)[0] == "completed" and record.get("exit_code") in (None, 0):
        return RunStatus("done", job)
    if not settled:
        return RunStatus("running", job, f"{queue_state}, its files not settled yet")
    if job is None:
        if finished:  # ran before (e.g. through --launcher local) and failed
            return RunStatus("failed", None, f"exit {record['exit_code']}")
        return RunStatus("unsubmitted", None)
    mine = (record.get("slurm") or {}).get("job") == job
    if mine and finished:
        result = outcome(record["exit_code"], read_json(run_dir_of(sweep_dir, combo) / "summary.json"))
        return RunStatus("failed", job, f"{result}, exit {record['exit_code']}")
    what = queue_state or "no longer in the queue"
    if mine:  # started but left no record: killed (time limit, memory, node failure)
        detail = f"ended {what} without a record from the run (see slurm/logs/{job}.out)"
        record.update(exit_code=-1, stderr_tail=detail,
                      finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_text(sweep_dir / "runs" / combo["name"] / "compare.json", json.dumps(record, indent=2))
        return RunStatus("failed", job, detail)
    return RunStatus("failed", job, f"never started ({what})")


def counts(status: dict[str, RunStatus]) -> str:
    c = Counter(s.state for s in status.values())
    text = ", ".join(f"{c[k]} {k}" for k in ("pending", "running", "done", "failed"))
    return text + (f", {c['unsubmitted']} not submitted" if c["unsubmitted"] else "")


# --------------------------------------------------------------------------- compare --launcher slurm


def launch(sweep_dir: Path, plan: dict, opts: dict, configs: Sequence[dict], *, throttle: int | None,
           wait: bool, dry_run: bool, save_plan: Callable[[], None],
           echo: Callable[[str], None] = print) -> dict[str, str] | None:
    """Submit the runs that are missing or failed as one job array (SLURM checks it first with
    --test-only; sweep.json is written only then), then -- unless wait is False -- follow the sweep
    until no run is pending or running. Returns {run: completed|failed}, or None when not waiting."""
    nodes, tasks = shape(opts, configs)
    if dry_run:
        names = [c["name"] for c in plan["combos"]]
        echo(batch_script(sweep_dir, plan, names, opts, nodes, tasks, throttle, 1))
        return None
    status = sweep_status(sweep_dir, plan)
    todo = [n for n, s in status.items() if s.state in ("failed", "unsubmitted")]
    echo(f"sweep {sweep_dir}: {len(status)} runs: {counts(status)}")
    if todo:
        number = len((read_json(slurm_dir(sweep_dir) / "jobs.json") or {}).get("submissions", [])) + 1
        script = batch_script(sweep_dir, plan, todo, opts, nodes, tasks, throttle, number)
        test_only(script)
        save_plan()
        job_id = submit(sweep_dir, script, todo, opts, number)
        echo(f"submitted job {job_id}: {len(todo)} run(s) as array 0-{len(todo) - 1}"
             f"{f'%{throttle}' if throttle else ''}; script {slurm_dir(sweep_dir) / f'submit-{number}.sbatch'}, "
             f"task logs {slurm_dir(sweep_dir) / 'logs'}/{job_id}_<i>.out")
        if not wait:
            echo(job_id)
    else:
        save_plan()
    if not wait:
        return None
    active = {n for n, s in status.items() if s.state in ("pending", "running")}
    return follow(sweep_dir, plan, opts["poll"], echo, set(todo) | active)


def follow(sweep_dir: Path, plan: dict, poll: float, echo: Callable[[str], None], watched: set[str]) -> dict[str, str]:
    """Poll the queue until no run is pending or running; say each change of the counts and each run
    that ends (once)."""
    shown, last = set(), None
    while True:
        status = sweep_status(sweep_dir, plan)
        for name in sorted(watched - shown):
            s = status[name]
            if s.state in ("done", "failed"):
                shown.add(name)
                echo(_ended_line(sweep_dir, plan, name, s))
        line = counts(status)
        if line != last:
            echo(f"[{datetime.now().strftime('%H:%M:%S')}] {line}")
            last = line
        if not any(s.state in ("pending", "running") for s in status.values()):
            return {n: ("completed" if s.state == "done" else "failed") for n, s in status.items()}
        time.sleep(poll)


def _ended_line(sweep_dir: Path, plan: dict, name: str, s: RunStatus) -> str:
    combo = next(c for c in plan["combos"] if c["name"] == name)
    record = read_json(sweep_dir / "runs" / name / "compare.json") or {}
    summary = read_json(run_dir_of(sweep_dir, combo) / "summary.json") or {}
    result = "completed" if s.state == "done" else outcome(record.get("exit_code"), summary)
    line = outcome_line(result, name, sweep_dir, rc=record.get("exit_code"), seconds=record.get("seconds"),
                        summary=summary, tail=record.get("stderr_tail") or s.detail, select=plan.get("select"))
    return f"{line}  [job {s.job}]" if s.job else line


# --------------------------------------------------------------------------- inside an array task


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_task(sweep_dir: Path, name: str, echo: Callable[[str], None] = print) -> int:
    """One array task: run the combination `name` of the sweep, save-and-requeue on SIGUSR1."""
    plan = read_json(sweep_dir / "sweep.json")
    combo = next((c for c in (plan or {}).get("combos", []) if c["name"] == name), None)
    if combo is None:
        echo(f"error: no run {name!r} in {sweep_dir / 'sweep.json'}")
        return 2
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', os.environ.get('SLURM_JOB_ID', '?'))}_" \
          f"{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if run_state(sweep_dir, combo)[0] == "completed":
        echo(f"{name}: already completed, nothing to do")
        return 0
    combo_dir = sweep_dir / "runs" / name
    previous = read_json(combo_dir / "compare.json") or {}
    resume = prepare_start(sweep_dir, combo)
    step_before = _trained_step(sweep_dir, combo) if resume is not None else -1
    cmd = train_command(plan, sweep_dir, combo, resume)
    several = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    launcher = _srun() if several else []
    slurm_info = {"job": job, "job_id": os.environ.get("SLURM_JOB_ID"), "restarts": restarts,
                  "host": socket.gethostname(), "stalls": int((previous.get("slurm") or {}).get("stalls", 0))}
    # what is running now (report sees no exit code: the run is not failed while it retries)
    atomic_write_text(combo_dir / "compare.json", json.dumps(
        {"command": cmd, "run_dir": combo["run_dir"], "attempts": previous.get("attempts", 0),
         "started_at": _now(), "slurm": slurm_info}, indent=2))
    echo(f"{_now()} {'resume' if resume else 'start'} {name} in job {job} (restart {restarts}): "
         f"{shlex.join(launcher + cmd)}")

    asked = {"requeue": False, "sent": False}
    child: dict[str, subprocess.Popen] = {}

    def stop_training() -> None:
        """SIGTERM to the training (train saves last.ckpt and exits 143): the child itself, or the
        ranks of the srun step (scancel without --batch signals the job's steps, not this shell)."""
        if asked["sent"] or "proc" not in child:
            return
        if several:
            if not _has_step(os.environ["SLURM_JOB_ID"]):
                return  # srun has not started the step yet: try again in a moment
            subprocess.run(["scancel", "--signal=TERM", os.environ["SLURM_JOB_ID"]], timeout=60)
        else:
            child["proc"].send_signal(signal.SIGTERM)
        asked["sent"] = True

    def on_requeue_signal(signum, frame):
        asked["requeue"] = True
        echo(f"{_now()} {signal.Signals(signum).name}: the run saves last.ckpt (SIGTERM), then the task is requeued")

    def on_sigterm(signum, frame):  # SLURM signals the training too; wait for it to save
        echo(f"{_now()} SIGTERM (cancelled, preempted or out of time): waiting for the run to save last.ckpt")

    signal.signal(REQUEUE_SIGNAL, on_requeue_signal)
    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()

    def watch(proc: subprocess.Popen) -> None:
        child["proc"] = proc
        while proc.poll() is None:
            if asked["requeue"]:
                stop_training()
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    rc, tail = run_logged(launcher + cmd, combo_dir, dict(os.environ), watch)
    if rc < 0:  # killed by a signal: the shell's convention, as srun reports it
        rc = 128 - rc
    step_after = _trained_step(sweep_dir, combo)
    requeue = asked["requeue"] and rc in INTERRUPTED_EXIT_CODES
    if requeue:
        slurm_info["stalls"] = 0 if step_after > step_before else slurm_info["stalls"] + 1
        if slurm_info["stalls"] >= MAX_STALLS:
            requeue = False
            tail += f"\nrequeued {MAX_STALLS} times in a row without training a step: not requeued again"
            rc = 1 if rc in INTERRUPTED_EXIT_CODES else rc
    slurm_info["requeued"] = requeue
    result, _ = record_run(sweep_dir, combo, cmd, rc, time.time() - started, tail, launcher=launcher,
                           started_at=datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                           slurm=slurm_info)
    echo(f"{_now()} {name}: exit code {rc} ({result}), trained up to step {step_after}")
    if requeue:
        target = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" \
            if os.environ.get("SLURM_ARRAY_JOB_ID") else os.environ.get("SLURM_JOB_ID", "")
        proc = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
        echo(f"{_now()} scontrol requeue {target}: " + ("done" if proc.returncode == 0 else
                                                       f"failed ({_one_line(proc.stderr)}); re-run compare to resume"))
        return 0 if proc.returncode == 0 else rc
    return rc


def _srun() -> list[str]:
    """srun for a task of several processes: one per allocated task (the job's --ntasks-per-node x
    --nodes); since SLURM 22.05 srun does not inherit --cpus-per-task, so it is passed on."""
    cmd = ["srun", "--kill-on-bad-exit=1"]
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return cmd


def _has_step(job_id: str) -> bool:
    proc = subprocess.run(["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i"],
                          capture_output=True, text=True, timeout=60)
    return any(re.search(r"\.\d+$", s.strip()) for s in proc.stdout.splitlines())  # 123.0, not 123.batch


def _trained_step(sweep_dir: Path, combo: dict) -> int:
    summary = read_json(run_dir_of(sweep_dir, combo) / "summary.json") or {}
    step = summary.get("global_step")
    return int(step) if isinstance(step, int) else -1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "task":
        print("usage: python -m adashift_pl.slurm task SWEEP_DIR RUN_NAME  (the batch scripts of "
              "`python -m adashift_pl.compare --launcher slurm` call it)", file=sys.stderr)
        return 2
    return run_task(Path(argv[1]), argv[2], echo=lambda text: print(text, flush=True))


if __name__ == "__main__":
    sys.exit(main())
