"""Compare optimizers like the paper does: `python -m adashift_pl.compare`.

Runs every combination of optimizer × grid point × seed as an ordinary, isolated
`python -m adashift_pl.train` process (one failure does not stop the sweep), one
directory per combination, then writes the report (`python -m adashift_pl.report`).

    python -m adashift_pl.compare --task counterexample --optimizers adam,amsgrad,adashift \\
        --seeds 3 --grid optimizer.lr=1e-3,1e-2 --trainer.max_steps 20000 --jobs 2
    python -m adashift_pl.compare --recipe fig4          # configs/sweeps/fig4.yaml
    python -m adashift_pl.compare --recipe fig4 --launcher slurm --slurm.partition gpu  # adashift_pl/slurm.py

Before anything launches, every combination (seeds aside) goes through train's own checks
(`adashift_pl.train.check`): a key the optimizer or task does not take stops the sweep, exit 2.

Sweep directory (default sweeps/<recipe> or sweeps/<task>-<timestamp>):

    sweep.json                the plan: task, fixed flags, every combination and its command
    runs/<combo>/             one combination: stdout.log, stderr.log, compare.json (exit code,
                              run directory, time), error.txt (stderr tail, if it failed) and the
                              run itself under <task>/<optimizer>/<combo>/ (train.py's layout,
                              with --log-dir runs/<combo> --run-name <combo>: compare reads its
                              summary.json there)
    slurm/                    --launcher slurm: batch scripts, jobs.json, the tasks' logs
    report/                   report.md, report.json and the figures

Re-running the same command resumes the sweep: a combination whose summary.json says
"completed" is skipped, an interrupted one continues from its last checkpoint
(`--resume`), a failed one is tried again.

Grid values: `--grid KEY=V1,V2` (commas inside [...] do not split, so
`--grid optimizer.betas=[0,0.999],[0.9,0.999]` has two points); `--grid OPT:KEY=...` sets
a grid for one optimizer only (the paper's lr grids differ per optimizer). Every other
`--trainer.* --model.* --data.* --optimizer.* --correlation* --checkpoint.*` flag,
`--num-threads` and `--config` go unchanged to every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from adashift_pl.config import SECTIONS, load_yaml, parse_value, shipped_path, split_overrides, sweep_names, sweep_path
from adashift_pl.errors import UserError
from adashift_pl.files import atomic_write_text, read_json
from adashift_pl.stopping import INTERRUPTED_EXIT_CODES

STDERR_TAIL_LINES = 40
# train.py flags (besides the dotted overrides) that go unchanged to every run, with an example value
TRAIN_FLAGS = {"--correlation": "false", "--num-threads": "4"}


# --------------------------------------------------------------------------- planning


def split_values(text: str) -> list[str]:
    """'1e-3,1e-2' -> ['1e-3', '1e-2']; commas inside [...] or {...} do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if depth != 0 or any(v == "" for v in out):
        raise UserError(f"bad grid values {text!r}: expected V1,V2,... (lists as [a,b])")
    return out


def check_key(key: str, where: str) -> str:
    section = key.split(".", 1)[0]
    if "." not in key or section not in SECTIONS:
        raise UserError(f"bad {where} key {key!r}: expected SECTION.KEY with SECTION one of {', '.join(SECTIONS)} "
                        "(e.g. optimizer.lr)")
    return key


def parse_grid(specs: Sequence[str]) -> dict[str | None, dict[str, list]]:
    """['optimizer.lr=1e-3,1e-2', 'adashift:optimizer.keep_num=1,10'] ->
    {None: {'optimizer.lr': [0.001, 0.01]}, 'adashift': {'optimizer.keep_num': [1, 10]}}."""
    grids: dict[str | None, dict[str, list]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserError(f"bad --grid {spec!r}: expected KEY=V1,V2 or OPTIMIZER:KEY=V1,V2")
        opt, _, key = key.rpartition(":") if ":" in key else (None, None, key)
        grids.setdefault(opt or None, {})[check_key(key.strip(), "--grid")] = \
            [parse_value(v) for v in split_values(values)]
    return grids


def parse_seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '0,4,7' or '5,' -> those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(s) for s in text.split(",") if s.strip()]
        if not seeds:
            raise ValueError
        return list(dict.fromkeys(seeds))
    except ValueError:
        raise UserError(f"bad --seeds {text!r}: a count (3 = seeds 0,1,2) or a list (0,4,7; '5,' for one seed)") \
            from None


def to_cli(value: Any) -> str:
    """A parsed value back to a command-line string train.py parses (as YAML) to the same value."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def _name_value(v: Any) -> str:
    """A grid value as it appears in a run name: 0.001, (0, 0.999) (before _slug)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_name_value(x) for x in v) + ")"
    return str(v)


def combo_name(optimizer: str, params: dict, seed: int) -> str:
    """adam__lr=0.001__seed0 (the optimizer. prefix dropped; other sections kept)."""
    parts = [_slug(optimizer)]
    for k, v in params.items():
        parts.append(f"{_slug(k.removeprefix('optimizer.'))}={_slug(_name_value(v))}")
    return "__".join(parts + [f"seed{seed}"])


def combo_flags(fixed: dict, params: dict) -> list[str]:
    """The per-combination train.py flags: the optimizer's fixed settings, then its grid point."""
    return [x for k, v in {**fixed, **params}.items() for x in (f"--{k}", to_cli(v))]


@dataclass
class Combo:
    name: str
    optimizer: str
    params: dict            # the grid point: {"optimizer.lr": 0.01, ...}
    fixed: dict             # per-optimizer fixed overrides from the recipe
    seed: int

    def flags(self) -> list[str]:
        return combo_flags(self.fixed, self.params)

    def to_json(self, task: str) -> dict:
        return {"name": self.name, "optimizer": self.optimizer, "params": self.params, "fixed": self.fixed,
                "seed": self.seed, "run_dir": f"runs/{self.name}/{task}/{self.optimizer}/{self.name}"}


def find_recipe(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = sweep_path(name)  # the package's configs/sweeps/, in a checkout or an installed wheel
    if cand is not None:
        return cand
    raise UserError(f"unknown recipe {name!r}: allowed are {', '.join(sweep_names()) or '(none found)'} "
                    "or a path to a .yaml file")


def load_recipe(name: str) -> dict:
    path = find_recipe(name)
    recipe = load_yaml(path)
    allowed = {"title", "expect", "task", "seeds", "optimizers", "grid", "set", "target", "baseline", "select",
               "config", "notes", "slurm"}
    unknown = set(recipe) - allowed
    if unknown:
        raise UserError(f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed are "
                        f"{', '.join(sorted(allowed))}")
    if "task" not in recipe or "optimizers" not in recipe:
        raise UserError(f"recipe {path} needs task: and optimizers:")
    opts = recipe["optimizers"]
    if isinstance(opts, list):
        recipe["optimizers"] = {o: {} for o in opts}
    for o, spec in recipe["optimizers"].items():
        spec = spec or {}
        bad = set(spec) - {"grid", "set"}
        if bad:
            raise UserError(f"recipe {path}: optimizer {o}: unknown key(s) {', '.join(sorted(bad))}; allowed are grid, set")
        recipe["optimizers"][o] = spec
    for section in [recipe.get("grid") or {}, recipe.get("set") or {}] + \
            [s.get(k) or {} for s in recipe["optimizers"].values() for k in ("grid", "set")]:
        for key, values in section.items():
            check_key(key, f"recipe {path.name}")
    for o, spec in recipe["optimizers"].items():
        for key, values in (spec.get("grid") or {}).items():
            if not isinstance(values, list) or not values:
                raise UserError(f"recipe {path}: {o}.grid.{key} must be a non-empty list of values")
    recipe["_path"] = str(path)
    recipe["_name"] = path.stem
    return recipe


def _recipe_config(config: str, recipe_path: str) -> str:
    """A recipe's `config:` as an absolute path: as given if absolute or present from the working
    directory, else relative to the package the recipe ships with (configs/nmt_iwslt15.yaml works
    from any directory, as the recipe name does)."""
    p = Path(config)
    if not p.is_absolute() and not p.is_file():
        p = shipped_path(config)
    if not p.is_file():
        raise UserError(f"recipe {recipe_path}: config {config!r} not found")
    return str(p.resolve())


def plan_combos(optimizers: dict[str, dict], grid: dict[str, list], cli_grids: dict[str | None, dict],
                fixed_keys: set[str], seeds: list[int]) -> list[Combo]:
    """Every optimizer × its grid points × seed. Precedence per key: recipe grid < recipe per-optimizer
    grid < --grid KEY < --grid OPT:KEY; a key given as a plain --KEY flag is fixed, not a grid axis."""
    combos, names = [], set()
    for opt, spec in optimizers.items():
        g = {**grid, **(spec.get("grid") or {}), **cli_grids.get(None, {}), **cli_grids.get(opt, {})}
        g = {k: v for k, v in g.items() if k not in fixed_keys}
        fixed = {k: v for k, v in (spec.get("set") or {}).items() if k not in fixed_keys and k not in g}
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            params = dict(zip(keys, values))
            for seed in seeds:
                name = combo_name(opt, params, seed)
                if name in names:
                    continue  # the same point written twice (1e-3 and 0.001)
                names.add(name)
                combos.append(Combo(name, opt, params, fixed, seed))
    return combos


# --------------------------------------------------------------------------- one run (both launchers)


def run_dir_of(sweep_dir: Path, combo: dict) -> Path:
    """Where train puts a combination's run: fixed by --log-dir runs/<combo> --run-name <combo>
    (a resumed run continues in its checkpoint's directory, the same one)."""
    return sweep_dir / combo["run_dir"]


def run_state(sweep_dir: Path, combo: dict) -> tuple[str, Path | None]:
    """('completed', run_dir) | ('resume', last.ckpt) | ('new', None) for one combination, from its
    summary.json and checkpoints."""
    run_dir = run_dir_of(sweep_dir, combo)
    summary = read_json(run_dir / "summary.json")
    if summary and summary.get("status") == "completed":
        return "completed", run_dir
    ckpt = None
    if summary and summary.get("last_checkpoint"):
        ckpt = Path(summary["last_checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() else run_dir / ckpt
    if ckpt is None or not ckpt.is_file():
        ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return "resume", ckpt
    return "new", None


def train_command(plan: dict, sweep_dir: Path, combo: dict, resume: Path | None,
                  python: str = sys.executable) -> list[str]:
    """The `python -m adashift_pl.train` command of one combination, with its fixed run name."""
    # On resume the checkpoint names the optimizer (train.py reads it from there).
    opt = ["--optimizer", combo["optimizer"]] if resume is None else []
    cmd = [python, "-m", "adashift_pl.train", "--task", plan["task"], *opt,
           "--seed", str(combo["seed"]), "--log-dir", str((sweep_dir / "runs" / combo["name"]).resolve()),
           "--run-name", combo["name"]]
    cmd += plan.get("passthrough", []) + combo_flags(combo.get("fixed", {}), combo["params"])
    if resume is not None:
        cmd += ["--resume", str(resume.resolve())]
    return cmd


def check_plan(plan: dict, sweep_dir: Path) -> list[dict]:
    """Every distinct combination (seeds aside) through train's own checks, before anything
    launches: a key the optimizer or task does not take, or a value of the wrong kind, is one
    UserError naming the run instead of N runs that start and fail. Returns the resolved configs."""
    from adashift_pl import train

    configs: dict[str, dict] = {}
    for combo in plan["combos"]:
        key = json.dumps([combo["optimizer"], combo.get("fixed"), combo["params"]], sort_keys=True)
        if key not in configs:
            try:
                configs[key] = train.check(train_command(plan, sweep_dir, combo, None)[3:])
            except UserError as e:
                raise UserError(f"run {combo['name']}: {e}") from None
    return list(configs.values())


def prepare_start(sweep_dir: Path, combo: dict) -> Path | None:
    """Before a combination (re)starts: the last.ckpt it resumes from, or None -- and then the
    leftovers of a failed attempt are moved aside, kept (train refuses a --run-name whose directory
    already holds a run)."""
    state, path = run_state(sweep_dir, combo)
    if state == "resume":
        return path
    expected = run_dir_of(sweep_dir, combo)
    if state == "new" and expected.exists():
        k = 1
        while expected.with_name(f"{expected.name}.failed-{k}").exists():
            k += 1
        expected.rename(expected.with_name(f"{expected.name}.failed-{k}"))
    return None


def run_logged(cmd: list[str], combo_dir: Path, env: dict,
               on_start: Callable[[subprocess.Popen], None] = lambda proc: None) -> tuple[int, str]:
    """Run `cmd` with its output appended to combo_dir/stdout.log and stderr.log (after a header
    line with the time and command); on_start(proc) is called once it runs (it may watch it until
    it ends). Returns (exit code, the last lines it wrote to stderr)."""
    combo_dir.mkdir(parents=True, exist_ok=True)
    with open(combo_dir / "stdout.log", "ab") as out, open(combo_dir / "stderr.log", "ab") as err:
        header = f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {shlex.join(cmd)}\n"
        out.write(header.encode())
        err.write(header.encode())
        out.flush()
        err.flush()
        err_start = err.tell()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            err.write(f"could not start: {e}\n".encode())
            rc = 127
        else:
            on_start(proc)
            rc = proc.wait()
    stderr_new = (combo_dir / "stderr.log").read_bytes()[err_start:].decode(errors="replace")
    return rc, "\n".join(stderr_new.rstrip().splitlines()[-STDERR_TAIL_LINES:])


def outcome(rc: int | None, summary: dict | None) -> str:
    """completed | interrupted (stopped by a signal, last.ckpt saved) | failed."""
    status = (summary or {}).get("status")
    if rc == 0 and status == "completed":
        return "completed"
    if status == "interrupted" and rc in INTERRUPTED_EXIT_CODES:
        return "interrupted"
    return "failed"


def record_run(sweep_dir: Path, combo: dict, cmd: list[str], rc: int, seconds: float, tail: str,
               **extra) -> tuple[str, dict]:
    """Write runs/<combo>/compare.json (and error.txt for a failure) after one attempt; the run's
    own summary.json says how it ended. Returns (outcome, summary)."""
    combo_dir = sweep_dir / "runs" / combo["name"]
    previous = read_json(combo_dir / "compare.json") or {}
    record = {"command": cmd, "exit_code": rc, "seconds": round(seconds, 3), "run_dir": combo["run_dir"],
              "attempts": int(previous.get("attempts", 0)) + 1,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
    if rc != 0:
        record["stderr_tail"] = tail
        atomic_write_text(combo_dir / "error.txt", f"exit code {rc}\n$ {shlex.join(cmd)}\n\n{tail}\n")
    else:
        (combo_dir / "error.txt").unlink(missing_ok=True)
    atomic_write_text(combo_dir / "compare.json", json.dumps(record, indent=2, allow_nan=True))
    summary = read_json(run_dir_of(sweep_dir, combo) / "summary.json") or {}
    return outcome(rc, summary), summary


def headline(summary: dict, select: str | None = None) -> str:
    """'  val/acc=0.91': the metric a finished run is shown with -- the sweep's --select metric, else
    the task's monitor (the summary's best_metric), else val/loss, a val/*loss*, train/loss."""
    metrics = summary.get("final_metrics") or {}
    names = [select.partition(":")[0]] if select else []
    names += [(summary.get("best_metric") or {}).get("name"), "val/loss",
              *sorted(k for k in metrics if k.startswith("val/") and "loss" in k), "train/loss"]
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)):
            return f"  {name}={value:.4g}"
    return ""


def last_error_line(tail: str) -> str:
    """The line that says why a run failed: the last of its stderr, skipping the launcher's own
    notices (srun's 'task 0: Exited with exit code 2')."""
    lines = [ln for ln in tail.splitlines() if ln.strip() and not ln.startswith(("srun: ", "slurmstepd"))]
    return lines[-1][:300] if lines else "(no stderr)"


def outcome_line(result: str, name: str, sweep_dir: Path, *, rc: int | None, seconds: float | None,
                 summary: dict, tail: str = "", select: str | None = None) -> str:
    """One line for a run that ended: done / interrupted / FAILED."""
    took = f"  {seconds:.1f} s" if seconds is not None else ""
    if result == "completed":
        return f"done    {name}{took}{headline(summary, select)}{'  DIVERGED' if summary.get('diverged') else ''}"
    if result == "interrupted":
        return f"interrupted {name} (exit {rc}); re-run to resume"
    return f"FAILED  {name}  exit {rc}: {last_error_line(tail)}  [{Path('runs', name, 'error.txt')}]"


# --------------------------------------------------------------------------- the local launcher


class Sweep:
    """Runs the planned combinations as local processes, `jobs` at a time, and records each outcome."""

    def __init__(self, sweep_dir: Path, plan: dict, *, jobs: int = 1, gpus: Sequence[str] = (),
                 python: str = sys.executable, echo: Callable[[str], None] = print):
        self.dir = sweep_dir
        self.plan = plan
        self.jobs = max(1, jobs)
        self.echo = echo
        self.python = python
        self.lock = threading.Lock()
        self.gpus: queue.Queue | None = None
        if gpus:
            self.gpus = queue.Queue()
            for g in gpus:
                self.gpus.put(g)
        self.done = 0
        self.outcomes: dict[str, str] = {}
        self.procs: set[subprocess.Popen] = set()

    def terminate(self) -> None:
        """SIGTERM to the running runs: each saves checkpoints/last.ckpt and exits (train.py)."""
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()

    def command(self, combo: dict, resume: Path | None) -> list[str]:
        return train_command(self.plan, self.dir, combo, resume, self.python)

    def _say(self, text: str) -> None:
        with self.lock:
            self.echo(text)

    def run_all(self) -> dict[str, str]:
        todo = []
        for combo in self.plan["combos"]:
            state, path = run_state(self.dir, combo)
            if state == "completed":
                self.outcomes[combo["name"]] = "skipped"
            else:
                todo.append((combo, path if state == "resume" else None))
        skipped = len(self.plan["combos"]) - len(todo)
        self.total = len(todo)
        self._say(f"sweep {self.dir}: {len(self.plan['combos'])} runs, {skipped} already completed (skipped), "
                  f"{sum(r is not None for _, r in todo)} to resume, {self.total} to run, {self.jobs} at a time")
        if not todo:
            return self.outcomes
        env = dict(os.environ)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            # J CPU-bound processes share the cores instead of each grabbing all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = [pool.submit(self._run_one, combo, env) for combo, _ in todo]
        try:
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            # Ctrl-C reached the runs too (same process group); SIGTERM was forwarded by the handler in
            # main(). Either way each run saves a checkpoint: wait for them, start nothing new.
            self._say("interrupted: waiting for the running runs to save their checkpoints; "
                      "re-run the same command to resume")
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return self.outcomes

    def _run_one(self, combo: dict, base_env: dict) -> None:
        name = combo["name"]
        previous = read_json(self.dir / "runs" / name / "compare.json") or {}
        resume = prepare_start(self.dir, combo)
        env = dict(base_env)
        gpu = self.gpus.get() if self.gpus else None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = self.command(combo, resume)
        verb = "resume" if resume is not None else ("retry " if previous.get("exit_code") not in (None, 0) else "start ")
        self._say(f"{verb} {name}" + (f" (from {resume.name})" if resume else "") +
                  (f" [CUDA_VISIBLE_DEVICES={gpu}]" if gpu is not None else ""))
        started = time.time()

        def track(proc):
            with self.lock:
                self.procs.add(proc)

        try:
            rc, tail = run_logged(cmd, self.dir / "runs" / name, env, track)
        finally:
            with self.lock:
                self.procs = {p for p in self.procs if p.poll() is None}
            if self.gpus is not None and gpu is not None:
                self.gpus.put(gpu)
        seconds = time.time() - started
        result, summary = record_run(self.dir, combo, cmd, rc, seconds, tail)
        with self.lock:
            self.done += 1
            self.outcomes[name] = result
            self.echo(f"[{self.done}/{self.total}] " + outcome_line(
                result, name, self.dir, rc=rc, seconds=seconds, summary=summary, tail=tail,
                select=self.plan.get("select")))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adashift_pl.compare", allow_abbrev=False,
        description="Run a grid of optimizers × hyper-parameters × seeds (each an isolated "
                    "`python -m adashift_pl.train` run), then write plots and report.md. "
                    "Other --trainer.*/--model.*/--data.*/--optimizer.*/--correlation* flags go to every run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m adashift_pl.compare --task counterexample --optimizers adam,amsgrad,adashift "
               "--seeds 3 --grid optimizer.lr=1e-3,1e-2 --jobs 2")
    p.add_argument("--task", help="task name (see python -m adashift_pl.train --list)")
    p.add_argument("--recipe", help="a paper figure's sweep: configs/sweeps/NAME.yaml (e.g. fig4) or a path")
    p.add_argument("--optimizers", help="comma-separated optimizer names, e.g. adam,amsgrad,adashift")
    p.add_argument("--seeds", default=None, help="count (3 = seeds 0,1,2) or list (0,4,7); default 1 or the recipe's")
    p.add_argument("--grid", action="append", default=[], metavar="[OPT:]KEY=V1,V2",
                   help="grid axis, repeatable; OPT: limits it to one optimizer")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default 1, or one per --gpus id; slurm: the array's %%N, default no limit)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids; each job gets one (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--out", type=Path, default=None,
                   help="sweep directory (default sweeps/<recipe> or sweeps/<task>-<timestamp>)")
    p.add_argument("--config", default=None, help="config file for every run (default configs/<task>.yaml)")
    p.add_argument("--target", action="append", default=None, metavar="METRIC=VALUE",
                   help="report steps and time to reach it, e.g. val/acc=0.9 (repeatable)")
    p.add_argument("--baseline", default=None, help="optimizer the others are paired against (default adam)")
    p.add_argument("--select", default=None, metavar="METRIC[:min|max]",
                   help="metric that picks each optimizer's best grid point (default: the task's monitor)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: runs as processes here (default); slurm: one job array on a SLURM cluster, "
                        "scheduler options as --slurm.KEY V (see README 'Sweeps on a cluster')")
    p.add_argument("--no-wait", action="store_true",
                   help="with --launcher slurm: submit, print the job id and return (re-run to follow or report)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the commands (slurm: the batch script), run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p


def _passthrough(rest: list[str]) -> tuple[list[str], set[str]]:
    """The flags every run gets, and the dotted keys they fix."""
    remaining, overrides = split_overrides(rest)
    flags, i = [], 0
    while i < len(remaining):
        arg = remaining[i]
        flag = arg.split("=", 1)[0]
        if flag in TRAIN_FLAGS:
            if "=" in arg:
                flags.append(arg)
            elif i + 1 < len(remaining):
                flags += [arg, remaining[i + 1]]
                i += 1
            else:
                raise UserError(f"{arg} needs a value, e.g. {arg} {TRAIN_FLAGS[flag]}")
        else:
            hint = " (did you mean --seeds?)" if arg.startswith("--seed") else ""
            raise UserError(f"unknown argument {arg!r}{hint}: compare takes the flags in --help and passes "
                            f"--SECTION.KEY VALUE (SECTION one of {', '.join(SECTIONS)}) to every run")
        i += 1
    for key, value in overrides:
        flags += [f"--{key}", value]
    return flags, {k for k, _ in overrides}


def make_plan(args: argparse.Namespace, rest: list[str]) -> tuple[dict, Path]:
    recipe = load_recipe(args.recipe) if args.recipe else {}
    task = args.task or recipe.get("task")
    if not task:
        raise UserError("give --task TASK or --recipe NAME")
    if recipe and args.task and args.task != recipe["task"]:
        raise UserError(f"--task {args.task} contradicts recipe {recipe['_name']} (task {recipe['task']})")
    from adashift_pl.tasks import TASKS

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: allowed are {', '.join(TASKS)}")
    optimizers: dict[str, dict] = dict(recipe.get("optimizers") or {})
    if args.optimizers:
        names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
        optimizers = {o: optimizers.get(o, {}) for o in names}
    if not optimizers:
        raise UserError("give --optimizers a,b,c (e.g. adam,amsgrad,adashift)")
    from adashift_pl.optim import list_optimizers

    known = list_optimizers()
    bad = [o for o in optimizers if o not in known]
    if bad:
        raise UserError(f"unknown optimizer(s) {', '.join(bad)}: allowed are {', '.join(known)}")
    rseeds = recipe.get("seeds", 1)
    seeds = parse_seeds(args.seeds) if args.seeds else \
        (parse_seeds(",".join(map(str, rseeds)) + ",") if isinstance(rseeds, list) else parse_seeds(str(rseeds)))
    cli_grids = parse_grid(args.grid)
    stray = [o for o in cli_grids if o is not None and o not in optimizers]
    if stray:
        raise UserError(f"--grid for optimizer(s) {', '.join(stray)} not in --optimizers {', '.join(optimizers)}")
    flags, fixed_keys = _passthrough(rest)
    both = sorted({k for g in cli_grids.values() for k in g} & fixed_keys)
    if both:
        raise UserError(f"{', '.join(both)} given both as --grid and as a fixed --KEY flag: give one")
    recipe_set = [(k, to_cli(v)) for k, v in (recipe.get("set") or {}).items() if k not in fixed_keys]
    config = args.config or (_recipe_config(recipe["config"], recipe["_path"]) if recipe.get("config") else None)
    passthrough = (["--config", str(config)] if config else []) + \
        [x for k, v in recipe_set for x in (f"--{k}", v)] + flags
    combos = plan_combos(optimizers, recipe.get("grid") or {}, cli_grids, fixed_keys, seeds)
    if args.out is not None:
        out = args.out
    elif recipe:
        out = Path("sweeps") / recipe["_name"]
    else:
        out = Path("sweeps") / f"{task}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    targets = args.target if args.target is not None else \
        ([recipe["target"]] if isinstance(recipe.get("target"), str) else list(recipe.get("target") or []))
    plan = {
        "task": task, "recipe": recipe.get("_name"), "title": recipe.get("title"), "expect": recipe.get("expect"),
        "optimizers": list(optimizers), "seeds": seeds, "passthrough": passthrough,
        "baseline": args.baseline or recipe.get("baseline") or ("adam" if "adam" in optimizers else list(optimizers)[0]),
        "targets": targets, "select": args.select or recipe.get("select"),
        "combos": [c.to_json(task) for c in combos],
    }
    if recipe.get("slurm") is not None:
        plan["slurm"] = recipe["slurm"]  # the recipe's cluster settings (--slurm.KEY flags override them)
    return plan, out


def merge_with_existing(plan: dict, out: Path) -> dict:
    """Re-running into an existing sweep: same task and fixed flags required; new combinations are
    added, old ones kept (they are in the directory and in the report)."""
    old = read_json(out / "sweep.json")
    if old is None:
        return plan
    for key in ("task", "passthrough"):
        if old.get(key) != plan.get(key):
            raise UserError(f"{out} holds a sweep with a different {key} ({old.get(key)!r} there, "
                            f"{plan.get(key)!r} now): its completed runs would not match; use another --out")
    names = {c["name"] for c in plan["combos"]}
    plan["combos"] += [c for c in old.get("combos", []) if c["name"] not in names]
    plan["optimizers"] = list(dict.fromkeys(plan["optimizers"] + old.get("optimizers", [])))
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        from adashift_pl import slurm

        slurm_flags, rest = slurm.split_args(rest)
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if args.jobs is not None and args.jobs < 1:
            raise UserError(f"invalid --jobs {args.jobs}: allowed is an integer >= 1")
        if args.launcher == "local":
            if slurm_flags:
                raise UserError(f"--slurm.{slurm_flags[0][0]} needs --launcher slurm")
            if args.no_wait:
                raise UserError("--no-wait needs --launcher slurm (local runs are this process's children)")
        else:
            if gpus:
                raise UserError("--gpus is for --launcher local: on SLURM give --slurm.gpus_per_node N")
            if not args.dry_run:
                slurm.require_clients()
        plan, out = make_plan(args, rest)
        plan = merge_with_existing(plan, out)
        configs = check_plan(plan, out)  # every run's keys and values, before anything starts

        def save_plan() -> None:
            out.mkdir(parents=True, exist_ok=True)
            plan["created_at"] = (read_json(out / "sweep.json") or {}).get(
                "created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            atomic_write_text(out / "sweep.json", json.dumps(plan, indent=2, allow_nan=True))

        started = time.time()
        if args.launcher == "slurm":
            opts = slurm.settings(plan.get("slurm"), slurm_flags)
            try:
                outcomes = slurm.launch(out, plan, opts, configs, throttle=args.jobs, wait=not args.no_wait,
                                        dry_run=args.dry_run, save_plan=save_plan)
            except KeyboardInterrupt:
                print("stopped following the sweep; its jobs keep running (squeue; slurm/jobs.json has the ids): "
                      "re-run the same command to follow them again", file=sys.stderr)
                return 130
            if outcomes is None:
                return 0
        else:
            jobs = args.jobs if args.jobs is not None else max(1, len(gpus))
            sweep = Sweep(out, plan, jobs=jobs, gpus=gpus)
            if args.dry_run:
                print(f"sweep {out}: {len(plan['combos'])} runs")
                for combo in plan["combos"]:
                    state, path = run_state(out, combo)
                    print(f"{state:9s} {shlex.join(sweep.command(combo, path if state == 'resume' else None))}")
                return 0
            save_plan()

            def on_sigterm(signum, frame):  # e.g. a cancelled SLURM job: stop the runs cleanly, then us
                sweep.terminate()
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, on_sigterm)
            try:
                outcomes = sweep.run_all()
            except KeyboardInterrupt:
                return 130
            finally:
                signal.signal(signal.SIGTERM, previous)
        failed = sorted(n for n, o in outcomes.items() if o in ("failed", "interrupted"))
        ran = sum(o != "skipped" for o in outcomes.values())
        print(f"sweep finished in {time.time() - started:.1f} s: {ran} ran, "
              f"{sum(o == 'skipped' for o in outcomes.values())} skipped, {len(failed)} failed or interrupted"
              + (f" ({', '.join(failed)})" if failed else ""))
        if not args.no_report:
            from adashift_pl.report import build_report

            print(build_report(out))
        return 1 if failed else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
