"""Turn a sweep directory into figures and a report: `python -m adashift_pl.report SWEEP_DIR`.

Reads every run's `summary.json` and its TensorBoard scalars (tensorboard's own
EventAccumulator), then writes into SWEEP_DIR/report/:

    report.md                 tables: per optimizer at its best grid point (mean ± std over
                              seeds), seed-paired comparison against a baseline (bootstrap CI,
                              win rate), steps-/time-to-target, every grid point, every run,
                              failed runs; links to the figures below
    report.json               the same numbers, machine-readable
    curves_<metric>.png       one curve per optimizer (its best grid point), mean over seeds
                              with a ±std band -- Figures 1-7 of the paper
    grid_<metric>.png         one curve per grid point (Appendix I, Figures 9-15)
    sensitivity_<key>.png     final selection metric against a grid axis (log x for lr)
    correlation.png           the corr/* scalars of the MomentCorrelation callback

Figures average the runs the tables average (completed, not diverged; the legend counts the
others), against optimizer steps taken -- the step count of summary.json and TensorBoard.
Every optimizer has one look (OPTIMIZER_LOOKS: colour, dash pattern, marker) in every report,
and a curve identical to another is named as such. Time-to-target counts from the run's start.

"Best grid point" follows Section 5 ("the best we have found via parameter grid search"):
the final value of the task's monitor metric (summary.json `best_metric` name and mode),
else val/loss (min), else train/loss (min). A run that diverged (summary `diverged`, or a
non-finite final value) is a miss: it is flagged and counted, never dropped. A run that
failed (crash, bad flag) has no result; it is listed with its exit code and stderr tail.

The sweep directory is what `python -m adashift_pl.compare` writes (sweep.json + runs/);
any directory of run directories (e.g. `logs/counterexample`) works too: runs are found
by their summary.json and grouped by optimizer and the hyper-parameters that differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from adashift_pl.errors import UserError
from adashift_pl.files import atomic_write_text, read_json

REPORT_SUBDIR = "report"
MAX_FACETS = 12  # at most this many corr/* tags in correlation.png (the rest are listed)
# A bootstrap CI needs at least this many seed pairs: from 2 values the resampled means take only
# 3 values (a, (a+b)/2, b), so the "95 % interval" is just [min, max] of the two -- no interval at all.
MIN_CI_PAIRS = 3

# --------------------------------------------------------------------------- statistics
# Pure functions on plain numbers, unit-tested on fabricated data (tests/test_report.py).


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values, and how many there were."""
    v = np.array([x for x in values if is_finite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (resampling the values with
    replacement). Deterministic for a given `seed`. NaN bounds for no values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_comparison(candidate: dict[int, float | None], baseline: dict[int, float | None],
                      mode: str, *, level: float = 0.95, n_boot: int = 10_000) -> dict:
    """Compare two optimizers seed by seed (the same seed = the same data order and init).

    Values are final metrics keyed by seed; a non-finite value is a miss (the run diverged).
    `None` means no result (the run failed or was not run): that seed is excluded and counted.
    Returns the mean difference candidate - baseline over seeds where both are finite with its
    bootstrap CI (NaN bounds below MIN_CI_PAIRS such seeds), and the win rate over all seeds
    with a result on both sides: a win is a better finite value or a finite value against a
    baseline miss; both missing is a tie (1/2).
    """
    seeds = sorted(set(candidate) & set(baseline))
    diffs, wins, ties, losses, excluded = [], 0, 0, 0, 0
    cand_miss = base_miss = 0
    for s in seeds:
        c, b = candidate[s], baseline[s]
        if c is None or b is None:
            excluded += 1
            continue
        cf, bf = is_finite(c), is_finite(b)
        cand_miss += not cf
        base_miss += not bf
        if cf and bf:
            diffs.append(c - b)
            if c == b:
                ties += 1
            elif better(c, b, mode):
                wins += 1
            else:
                losses += 1
        elif cf:
            wins += 1
        elif bf:
            losses += 1
        else:
            ties += 1
    excluded += len(set(candidate) ^ set(baseline))
    n = wins + ties + losses
    lo, hi = bootstrap_ci(diffs, level=level, n_boot=n_boot) if len(diffs) >= MIN_CI_PAIRS else (math.nan, math.nan)
    return {
        "pairs": n,
        "finite_pairs": len(diffs),
        "mean_diff": float(np.mean(diffs)) if diffs else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": (wins + 0.5 * ties) / n if n else math.nan,
        "candidate_misses": cand_miss,
        "baseline_misses": base_miss,
        "excluded": excluded,
    }


def reaches(value: float, target: float, mode: str) -> bool:
    return value >= target if mode == "max" else value <= target


def time_to_target(steps: Sequence[int], values: Sequence[float], wall_times: Sequence[float],
                   target: float, mode: str, *, start: float) -> tuple[int, float] | None:
    """The first logged step whose value reaches `target` (>= for mode max, <= for min) and the
    seconds from `start` (the run's start, on the wall-time clock: Scalar.start) to it; None if
    never reached or if the series became non-finite first (a diverged run misses the target)."""
    for step, value, wall in zip(steps, values, wall_times):
        if not math.isfinite(value):
            return None
        if reaches(value, target, mode):
            return int(step), float(wall - start)
    return None


def metric_mode(name: str, monitor: tuple[str, str] | None = None) -> str:
    """max for accuracy-like metrics (acc, bleu, score, fid is min), min for everything else."""
    if monitor and monitor[0] == name:
        return monitor[1]
    last = name.rsplit("/", 1)[-1].lower()
    return "max" if any(k in last for k in ("acc", "bleu", "score", "auc", "f1")) else "min"


def parse_target(text: str) -> tuple[str, float]:
    """'val/acc=0.9' -> ('val/acc', 0.9)."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise UserError(f"bad --target {text!r}: expected METRIC=VALUE, e.g. val/acc=0.9") from None


# --------------------------------------------------------------------------- loading


@dataclass
class Scalar:
    steps: np.ndarray       # optimizer steps taken when the value was recorded
    values: np.ndarray
    wall_times: np.ndarray  # seconds on the clock of `start`, the pauses of interruptions removed
    start: float = math.nan  # when the run started (its first event-file record), same clock


@dataclass
class Run:
    name: str
    optimizer: str
    params: dict              # the grid point, e.g. {"optimizer.lr": 0.01}
    seed: int | None
    run_dir: Path | None
    summary: dict | None = None
    exit_code: int | None = None
    error_tail: str | None = None
    error_file: Path | None = None
    _scalars: dict | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        """completed | interrupted | failed | missing (no summary and no recorded exit)."""
        if self.summary is not None:
            status = self.summary.get("status", "completed")
            if status == "completed" and self.exit_code not in (None, 0):
                return "failed"
            return status
        return "missing" if self.exit_code is None else "failed"

    @property
    def point(self) -> tuple:
        return (self.optimizer, params_key(self.params))

    def final(self, metric: str) -> float | None:
        """Final value of `metric`: summary final_metrics, else the last logged scalar.
        None when the run has no result (failed, interrupted: a partial run would bias the
        mean; it is listed instead); NaN when it diverged (a miss)."""
        if self.summary is None or self.status != "completed":
            return None
        value = (self.summary.get("final_metrics") or {}).get(metric)
        if value is None:
            s = self.scalars().get(metric)
            value = float(s.values[-1]) if s is not None and len(s.values) else None
        if value is None:
            return math.nan if self.diverged else None
        # A run that saw a non-finite loss is a miss even if its last value looks finite.
        return math.nan if self._diverged_flag() else float(value)

    def _diverged_flag(self) -> bool:
        return bool(self.summary and self.summary.get("diverged"))

    @property
    def diverged(self) -> bool:
        if self.summary is None:
            return False
        if self._diverged_flag():
            return True
        return any(not is_finite(v) for v in (self.summary.get("final_metrics") or {}).values()
                   if isinstance(v, (int, float)) or v is None)

    def is_miss(self, metric: str) -> bool:
        """A miss counts against its optimizer: the run failed, or finished with a non-finite
        value (diverged). Interrupted or not-yet-run runs are neither results nor misses."""
        if self.status == "failed":
            return True
        v = self.final(metric)
        return v is not None and not math.isfinite(v)

    def scalars(self) -> dict[str, Scalar]:
        if self._scalars is None:
            self._scalars = read_scalars(self.run_dir) if self.run_dir else {}
        return self._scalars


def params_key(params: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in params.items()))


def format_params(params: dict) -> str:
    if not params:
        return "(defaults)"
    return ", ".join(f"{k.removeprefix('optimizer.')}={format_value(v)}" for k, v in params.items())


def _sort_params(params: dict) -> tuple:
    return tuple((k, (0, v, "") if _numeric([v]) else (1, 0, json.dumps(v))) for k, v in sorted(params.items()))


def format_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(format_value(x) for x in v) + ")"
    return str(v)


def _event_file_order(path: Path) -> tuple:
    """events.out.tfevents.<unix time>.<host>.<pid>.<n>: the order the processes wrote them in."""
    parts = path.name.split(".")
    try:
        return (float(parts[3]), path.name)
    except (IndexError, ValueError):
        return (math.inf, path.name)


def read_scalars(run_dir: Path) -> dict[str, Scalar]:
    """All scalar series in the run directory's TensorBoard event files, by tag.

    A resumed run has several event files (one per process); a step logged twice keeps its
    last value. The run starts at its first event file's first record (TensorBoard writes one
    when the file is opened; `train` opens it when training set-up begins), else at its first
    point. Wall times are *training* time: the pause between one process's last logged point
    and the start of the next (resumed) process -- the run sat interrupted -- is subtracted, so
    time-to-target does not count the hours a job waited in a queue."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not run_dir.is_dir():
        return {}
    files = sorted((p for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents") and p.is_file()),
                   key=_event_file_order)
    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    paused, last_wall, start = 0.0, None, None
    for f in files:
        acc = ea.EventAccumulator(str(f), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        events = {tag: acc.Scalars(tag) for tag in acc.Tags().get("scalars", [])}
        walls = [e.wall_time for es in events.values() for e in es]
        if not walls:
            continue  # a process that logged nothing: no training time to count
        opened = min(acc.FirstEventTimestamp(), min(walls))
        if last_wall is not None and opened > last_wall:
            paused += opened - last_wall
        if start is None:
            start = opened
        last_wall = max(max(walls), last_wall if last_wall is not None else -math.inf)
        for tag, es in events.items():
            series = by_tag.setdefault(tag, {})
            for e in es:
                series[int(e.step)] = (float(e.value), float(e.wall_time) - paused)
    out = {}
    for tag, by_step in by_tag.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = Scalar(steps, np.array([by_step[s][0] for s in steps]),
                          np.array([by_step[s][1] for s in steps]), start)
    return out


def load_runs(sweep_dir: Path) -> tuple[list[Run], dict]:
    """The runs of a sweep (from sweep.json) or of any directory holding run directories."""
    plan = read_json(sweep_dir / "sweep.json")
    if plan is not None:
        return [_run_from_plan(sweep_dir, c) for c in plan.get("combos", [])], plan
    summaries = sorted(sweep_dir.rglob("summary.json"))
    if not summaries:
        raise UserError(f"no sweep.json and no run (summary.json) under {sweep_dir}: "
                        "give a directory written by `python -m adashift_pl.compare` or holding runs")
    return _runs_from_summaries(sweep_dir, summaries), {}


def _run_from_plan(sweep_dir: Path, combo: dict) -> Run:
    combo_dir = sweep_dir / "runs" / combo["name"]
    record = read_json(combo_dir / "compare.json") or {}
    run_dir = None
    for candidate in (record.get("run_dir"), combo.get("run_dir")):
        if candidate:
            p = Path(candidate)
            p = p if p.is_absolute() else sweep_dir / p
            if (p / "summary.json").exists() or run_dir is None:
                run_dir = p
    if run_dir is None or not (run_dir / "summary.json").exists():
        found = sorted(combo_dir.rglob("summary.json"))
        if found:
            run_dir = found[0].parent
    summary = read_json(run_dir / "summary.json") if run_dir else None
    error_file = combo_dir / "error.txt"
    exit_code = record.get("exit_code")
    return Run(
        name=combo["name"], optimizer=combo["optimizer"], params=combo.get("params", {}),
        seed=combo.get("seed"), run_dir=run_dir, summary=summary, exit_code=exit_code,
        error_tail=record.get("stderr_tail") if exit_code not in (None, 0) else None,
        error_file=error_file if error_file.exists() else None,
    )


def _runs_from_summaries(root: Path, paths: list[Path]) -> list[Run]:
    loaded = [(p.parent, read_json(p)) for p in paths]
    loaded = [(d, s) for d, s in loaded if s is not None]
    by_opt: dict[str, list] = {}
    for d, s in loaded:
        by_opt.setdefault(s.get("optimizer", "?"), []).append((d, s))
    runs = []
    for opt, items in by_opt.items():
        hps = [((s.get("hparams") or {}).get("optimizer") or {}) for _, s in items]
        keys = sorted({k for h in hps for k in h if k != "name"})
        varying = [k for k in keys if len({json.dumps(h.get(k), sort_keys=True) for h in hps}) > 1]
        for (d, s), h in zip(items, hps):
            params = {f"optimizer.{k}": h.get(k) for k in varying}
            runs.append(Run(name=str(d.relative_to(root)), optimizer=opt, params=params,
                            seed=s.get("seed"), run_dir=d, summary=s))
    return runs


# --------------------------------------------------------------------------- analysis


@dataclass
class Point:
    """One optimizer at one grid point, over its seeds."""
    optimizer: str
    params: dict
    runs: list[Run]

    def finals(self, metric: str) -> dict[int, float | None]:
        return {r.seed: r.final(metric) for r in self.runs}

    def misses(self, metric: str) -> int:
        return sum(r.is_miss(metric) for r in self.runs)

    def score(self, metric: str, mode: str) -> tuple:
        """Sort key, smaller is better: first fewer misses (diverged, failed), then the
        mean final value over the finite seeds (sign-flipped for max)."""
        values = [r.final(metric) for r in self.runs]
        misses = self.misses(metric)
        m, _, n = mean_std(values)
        if n == 0:
            return (misses, 1, 0.0)
        return (misses, 0, -m if mode == "max" else m)

    @property
    def label(self) -> str:
        return self.optimizer if not self.params else f"{self.optimizer} {format_params(self.params)}"


def group_points(runs: list[Run]) -> list[Point]:
    points: dict[tuple, Point] = {}
    for r in runs:
        points.setdefault(r.point, Point(r.optimizer, r.params, [])).runs.append(r)
    for p in points.values():
        p.runs.sort(key=lambda r: (r.seed is None, r.seed))
    return list(points.values())


def choose_metric(runs: list[Run], select: str | None = None) -> tuple[str, str]:
    """(name, mode) of the metric that ranks grid points (see the module docstring)."""
    if select:
        name, _, mode = select.partition(":")
        if mode not in ("", "min", "max"):
            raise UserError(f"bad --select {select!r}: expected METRIC or METRIC:min or METRIC:max")
        return name, mode or metric_mode(name)
    for r in runs:
        bm = (r.summary or {}).get("best_metric")
        if bm and bm.get("name"):
            return bm["name"], bm.get("mode") or metric_mode(bm["name"])
    finals = {k for r in runs for k in ((r.summary or {}).get("final_metrics") or {}) if _is_metric(k)}
    val_losses = sorted(k for k in finals if k.startswith("val/") and "loss" in k)
    for name in ["val/loss"] + val_losses + ["train/loss"]:
        if name in finals:
            return name, "min"
    if finals:
        name = sorted(finals)[0]
        return name, metric_mode(name)
    return "val/loss", "min"


def _is_metric(key: str) -> bool:
    """A task metric (not the lr monitor's lr-*, not corr/* diagnostics, not epoch)."""
    return not key.startswith(("lr-", "lr/", "corr/", "hp/", "hp_metric")) and key not in ("epoch", "step")


def best_points(points: list[Point], metric: str, mode: str) -> dict[str, Point]:
    best: dict[str, Point] = {}
    for p in points:
        if p.optimizer not in best or p.score(metric, mode) < best[p.optimizer].score(metric, mode):
            best[p.optimizer] = p
    return best


def aggregate_curves(series: list[Scalar]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean and std over seeds on the union of logged steps (each seed interpolated inside its
    own range only); non-finite values are left out of the mean. Returns steps, mean, std, n."""
    series = [s for s in series if len(s.steps)]
    if not series:
        return np.array([]), np.array([]), np.array([]), 0
    steps = np.unique(np.concatenate([s.steps for s in series]))
    rows = []
    for s in series:
        v = np.where(np.isfinite(s.values), s.values, np.nan)
        row = np.interp(steps, s.steps, v, left=np.nan, right=np.nan)
        if len(s.steps) == 1:
            row = np.where(steps == s.steps[0], v[0], np.nan)
        rows.append(row)
    a = np.vstack(rows)
    count = np.isfinite(a).sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(count > 0, np.nansum(a, axis=0) / np.maximum(count, 1), np.nan)
        var = np.where(count > 1, np.nansum((a - mean) ** 2, axis=0) / np.maximum(count - 1, 1), 0.0)
    return steps, mean, np.sqrt(var), len(series)


# --------------------------------------------------------------------------- figures

# One table for how an optimizer appears in every report: its name in the paper and a look fixed
# by its name (so a colour means the same optimizer in every figure of every sweep), with a dash
# pattern and marker of its own, so that two identical curves (Adam and AMSGrad often coincide)
# still show as two lines. Aliases look like the optimizer they name.
DASHES = {"solid": "-", "dashed": (0, (5, 2)), "dotted": (0, (1, 1.5)), "dashdot": (0, (6, 2, 1, 2)),
          "long": (0, (10, 3)), "dashdotdot": (0, (6, 2, 1, 2, 1, 2)), "loose": (0, (2, 3))}
OPTIMIZER_LOOKS = {  # name: (paper name, colour (tab10), dash pattern, marker)
    "adam":              ("Adam",                     "#1f77b4", "solid",      "o"),
    "amsgrad":           ("AMSGrad",                  "#ff7f0e", "dashed",     "s"),
    "adashift":          ("AdaShift",                 "#2ca02c", "dashdot",    "^"),
    "max-adashift":      ("max-AdaShift",             "#2ca02c", "dashdot",    "^"),
    "non-adashift":      ("non-AdaShift",             "#d62728", "long",       "v"),
    "adashift-temporal": ("AdaShift (temporal-only)", "#d62728", "long",       "v"),
    "adashift-spatial":  ("AdaShift (spatial-only)",  "#9467bd", "dashdotdot", "D"),
    "adashift-mean":     ("mean-AdaShift",            "#8c564b", "loose",      "P"),
    "sgd":               ("SGD",                      "#7f7f7f", "dotted",     "x"),
    "nadam":             ("NAdam",                    "#e377c2", "dashed",     "*"),
    "adamw":             ("AdamW",                    "#17becf", "dotted",     "<"),
    "adopt":             ("ADOPT",                    "#bcbd22", "dashdot",    ">"),
}
SPARE_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
SPARE_MARKERS = ("h", "p", "X", "d", "8", "H")


def pretty(optimizer: str) -> str:
    return OPTIMIZER_LOOKS.get(optimizer, (optimizer,))[0]


def look(optimizer: str) -> dict:
    """matplotlib kwargs (color, linestyle, marker) of `optimizer`: from OPTIMIZER_LOOKS, else
    picked by a hash of the name (the same in every report)."""
    if optimizer in OPTIMIZER_LOOKS:
        _, colour, dash, marker = OPTIMIZER_LOOKS[optimizer]
    else:
        h = zlib.crc32(optimizer.encode())
        colour, dash = SPARE_COLOURS[h % len(SPARE_COLOURS)], list(DASHES)[h // 7 % len(DASHES)]
        marker = SPARE_MARKERS[h // 53 % len(SPARE_MARKERS)]
    return {"color": colour, "linestyle": DASHES[dash], "marker": marker}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _new_figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _use_log_y(values: Iterable[np.ndarray]) -> bool:
    v = np.concatenate([np.asarray(x, float).ravel() for x in values] or [np.array([])])
    v = v[np.isfinite(v)]
    return v.size > 0 and bool((v > 0).all()) and v.max() / v.min() > 100


def _wrap(title: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def _axis_label(metric: str) -> str:
    stage, _, name = metric.partition("/")
    if not name:
        return metric
    unit = {"acc": " (fraction correct)", "bleu": " (BLEU)"}.get(name, "")
    stage_word = {"train": "training", "val": "validation", "test": "test"}.get(stage, stage)
    return f"{stage_word} {name.replace('_', ' ')}{unit}"


STEP_AXIS = "optimizer steps taken"
MARKS_PER_LINE = 8  # markers along a line; each line's are shifted so coinciding lines show all of them


def drawn_runs(runs: list[Run]) -> tuple[list[Run], str]:
    """The runs a figure averages -- the same the tables average: completed, not diverged -- and
    what was left out, e.g. "1 diverged, 1 interrupted" ("" when nothing was)."""
    kept = [r for r in runs if r.status == "completed" and not r.diverged]
    left = {"diverged": sum(r.diverged for r in runs)}
    for status in ("interrupted", "failed", "missing"):
        left[status] = sum(r.status == status and not r.diverged for r in runs)
    return kept, ", ".join(f"{n} {what}" for what, n in left.items() if n)


def _plot_band(ax, series: list[Scalar], label: str, color=None, linestyle="-", marker=None, mark_slot=(0, 1)):
    """Mean over seeds with a ±std band. mark_slot (k, of): this is line k of `of` -- its markers
    are shifted by k/of of their spacing, so identical curves show every line's markers."""
    steps, mean, std, n = aggregate_curves(series)
    if not len(steps):
        return None
    every = max(1, len(steps) // MARKS_PER_LINE)
    offset = (mark_slot[0] * every) // max(mark_slot[1], 1)
    (line,) = ax.plot(steps, mean, label=label, color=color, linestyle=linestyle, lw=1.5, marker=marker,
                      markersize=5, markevery=(min(offset, len(steps) - 1), every), fillstyle="none")
    if n > 1:
        lo, hi = mean - std, mean + std
        if ax.get_yscale() == "log":
            lo = np.where(lo > 0, lo, mean)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return line


def _same_curve(a: list[Scalar], b: list[Scalar]) -> bool:
    sa, ma, _, _ = aggregate_curves(a)
    sb, mb, _, _ = aggregate_curves(b)
    return len(sa) > 0 and np.array_equal(sa, sb) and np.allclose(ma, mb, rtol=1e-9, atol=1e-12, equal_nan=True)


def plot_curves(path: Path, metric: str, groups: list[tuple[str, list[Run], dict]],
                title: str) -> tuple[bool, list[str]]:
    """One curve per group (label, runs, look), mean over seeds with a ±std band. Only the runs
    the tables average are drawn (drawn_runs); the legend counts the ones left out. Returns
    whether a figure was written and notes for report.md: groups with nothing to draw, and
    curves identical to another group's (drawn on top of each other; told apart by the dash
    pattern and the markers)."""
    data, notes = [], []
    for label, runs, style in groups:
        kept, left = drawn_runs(runs)
        series = [r.scalars()[metric] for r in kept if metric in r.scalars()]
        if series:
            data.append((label, series, left, style))
            if left:
                notes.append(f"{label}: averaged over {len(series)} run(s); not drawn: {left}.")
        elif left and any(metric in r.scalars() for r in runs):
            notes.append(f"{label}: not drawn ({left}, no other seed).")
    if not data:
        return False, notes
    fig = _new_figure()
    ax = fig.subplots()
    if _use_log_y(s.values for d in data for s in d[1]):
        ax.set_yscale("log")
    for k, (label, series, left, style) in enumerate(data):
        twin = next((d[0] for d in data[:k] if _same_curve(d[1], series)), None)
        if twin:
            notes.append(f"{label}: identical to {twin} (the lines coincide; told apart by dash pattern and markers).")
        extra = f" (n={len(series)}" + (f"; not drawn: {left}" if left else "") + ")"
        extra += f" = {twin}" if twin else ""
        _plot_band(ax, series, label + extra, **style, mark_slot=(k, len(data)))
    ax.set_xlabel(STEP_AXIS)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)
    fig.savefig(path, dpi=120)
    return True, notes


def plot_lr(path: Path, groups: list[tuple[str, list[Run], dict]], title: str) -> bool:
    """The lr-* scalars (one tag per optimizer class) as one figure; only when the lr changes
    during a run (a schedule or warm-up) -- a constant lr is in the tables already."""
    data = []
    for label, runs, style in groups:
        series = [next((s for t, s in r.scalars().items() if t.startswith("lr-")), None) for r in drawn_runs(runs)[0]]
        series = [s for s in series if s is not None and len(s.steps) > 1]
        if series:
            data.append((label, series, style))
    if not any(len(np.unique(s.values)) > 1 for _, ss, _ in data for s in ss):
        return False
    fig = _new_figure()
    ax = fig.subplots()
    if _use_log_y(s.values[s.values > 0] for _, ss, _ in data for s in ss):
        ax.set_yscale("log")
    for k, (label, series, style) in enumerate(data):
        _plot_band(ax, series, label, **style, mark_slot=(k, len(data)))
    ax.set_xlabel(STEP_AXIS)
    ax.set_ylabel("learning rate")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return True


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sensitivity(path: Path, key: str, points: list[Point], metric: str, mode: str,
                     title: str) -> bool:
    """Final `metric` against grid axis `key`: one line per optimizer (and per value of the
    other grid keys), mean ± std over seeds; log x when the axis spans a decade or more."""
    lines: dict[tuple, list[Point]] = {}
    for p in points:
        if key not in p.params or not any(r.summary is not None for r in p.runs):
            continue  # a point whose runs all failed has nothing to show (listed in the report)
        others = {k: v for k, v in p.params.items() if k != key}
        lines.setdefault((p.optimizer, params_key(others)), []).append(p)
    lines = {k: v for k, v in lines.items() if len(v) > 1}
    if not lines:
        return False
    all_x = [p.params[key] for ps in lines.values() for p in ps]
    numeric = _numeric(all_x)
    if not numeric:
        cats = []
        for x in all_x:
            if format_value(x) not in cats:
                cats.append(format_value(x))
    fig = _new_figure()
    ax = fig.subplots()
    if numeric and min(all_x) > 0 and max(all_x) / min(all_x) >= 10:
        ax.set_xscale("log")
    for (opt, _), ps in lines.items():
        ps = sorted(ps, key=lambda p: p.params[key] if numeric else cats.index(format_value(p.params[key])))
        xs, ms, ss, notes = [], [], [], []
        for p in ps:
            m, s, n = mean_std(p.finals(metric).values())
            xs.append(p.params[key] if numeric else cats.index(format_value(p.params[key])))
            ms.append(m)
            ss.append(s)
            misses = p.misses(metric)
            notes.append(f"{misses}/{len(p.runs)} miss" if misses else "")
        others = {k: v for k, v in ps[0].params.items() if k != key}
        label = pretty(opt) + (f" ({format_params(others)})" if others else "")
        ax.errorbar(xs, ms, yerr=ss, capsize=3, label=label, **look(opt))
        for x, m, note in zip(xs, ms, notes):
            if note:
                ax.annotate(note, (x, m if math.isfinite(m) else 0), fontsize=7, color="red",
                            textcoords="offset points", xytext=(4, 4))
    if not numeric:
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(key.removeprefix("optimizer.") + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"final {_axis_label(metric)} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)
    fig.savefig(path, dpi=120)
    return True


CORR_NAMES = {"g2_v": "corr(g_t², v_t)", "absg_step": "corr(|g_t|, lr/√v_t)",
              "spatial": "spatial corr(g_t[i], g_t-n[j])"}


def _corr_title(tag: str) -> str:
    """corr/g2_v/overall -> 'corr(g_t², v_t) — overall' (MomentCorrelation's tags)."""
    parts = tag.split("/")
    if len(parts) >= 3:
        m = parts[1]
        name = CORR_NAMES.get(m) or m
        if m.startswith("temporal_lag"):
            name = f"corr(g_t, g_t-{m.removeprefix('temporal_lag')})"
        elif m.startswith("spatial_lag"):
            name = f"corr(g_t[i], g_t-{m.removeprefix('spatial_lag')}[j])"
        return f"{name} — {'/'.join(parts[2:])}"
    return tag


def _corr_order(tag: str) -> tuple:
    """g2_v, absg_step, then temporal and spatial by lag number (lag2 before lag10)."""
    m = tag.split("/")[1] if tag.count("/") >= 2 else tag
    kind = next((i for i, k in enumerate(("g2_v", "absg_step", "temporal", "spatial")) if m.startswith(k)), 4)
    lag = re.search(r"(\d+)$", m)
    return (kind, int(lag.group(1)) if lag else 0, tag)


def plot_correlation(path: Path, tags: list[str], groups: list[tuple[str, list[Run]]], title: str) -> bool:
    if not tags:
        return False
    ncols = min(3, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig = _new_figure(max(6.4, 4.2 * ncols), 3.4 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, tag in zip(axes, tags):
        shown = []
        for k, (label, runs, style) in enumerate(groups):
            series = [r.scalars()[tag] for r in drawn_runs(runs)[0] if tag in r.scalars()]
            if series:
                _plot_band(ax, series, label, **style, mark_slot=(k, len(groups)))
                shown += series
        # y range from the settled part: the first few percent of steps are a noisy few-sample transient
        steps = np.concatenate([s.steps for s in shown]) if shown else np.array([])
        if steps.size:
            start = steps.min() + 0.05 * (steps.max() - steps.min())
            settled = np.concatenate([s.values[(s.steps >= start) & np.isfinite(s.values)] for s in shown])
            if settled.size:
                lo, hi = float(settled.min()), float(settled.max())
                pad = 0.2 * max(hi - lo, 1e-3)
                ax.set_ylim(max(-1.05, min(lo - pad, -pad)), min(1.05, max(hi + pad, pad)))
        ax.axhline(0.0, color="gray", lw=0.8, ls=":")
        ax.set_title(_corr_title(tag), fontsize=9)
        ax.set_xlabel(STEP_AXIS)
        ax.set_ylabel("correlation")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(tags):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(_wrap(title, 100), fontsize=10)
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------- report


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def fmt_count(x) -> str:
    """Steps and other counts: an integer as an integer (40000, not 4e+04); a mean or a median
    of counts that is not whole with one decimal."""
    if x is None or not is_finite(x):
        return fmt(x)
    return str(int(round(x))) if float(x).is_integer() else f"{x:.1f}"


def fmt_seconds(x) -> str:
    """Wall times: three significant digits below 100 s, whole seconds above (12345, not 1.234e+04)."""
    if x is None or not is_finite(x):
        return fmt(x)
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def fmt_mean_std(values: Iterable[float], number=None) -> str:
    """mean ± std over the finite values (just the value for one); `number` formats both
    (default: 4 significant digits for the mean, 2 for the std)."""
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    if number is not None:
        return number(m) if n == 1 else f"{number(m)} ± {number(s)}"
    return fmt(m) if n == 1 else f"{fmt(m)} ± {fmt(s, 2)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows] + [""])


def _rel(path: Path | None, base: Path) -> str:
    """A markdown link to `path` relative to the report's directory (moves with the sweep)."""
    if path is None or not Path(path).exists():
        return "—"
    rel = os.path.relpath(Path(path).resolve(), base.resolve())
    return f"[{Path(path).name}]({rel})"


def _curve_tags(runs: list[Run]) -> list[str]:
    """Scalars worth a curve: logged at two or more steps, not corr/*, hp/*, epoch."""
    tags: dict[str, int] = {}
    for r in runs:
        for tag, s in r.scalars().items():
            tags[tag] = max(tags.get(tag, 0), len(s.steps))
    skip = ("corr/", "hp/", "hp_metric", "epoch", "lr-")  # lr-* (LearningRateMonitor): one lr figure
    order = {"train": 0, "val": 1, "test": 2}
    keep = [t for t, n in tags.items() if n >= 2 and not t.startswith(skip)]
    return sorted(keep, key=lambda t: (order.get(t.split("/")[0], 3), t))


@dataclass
class Analysis:
    """A sweep's runs grouped into grid points, with the selection metric and the chosen points."""
    sweep_dir: Path
    out: Path
    plan: dict
    runs: list[Run]
    metric: str
    mode: str
    baseline: str
    targets: list[tuple[str, float]]
    task: str
    title: str
    points: list[Point]
    best: dict[str, Point]        # optimizer -> its chosen grid point
    optimizers: list[str]         # in the sweep's order, those with a point
    finals_keys: list[str]        # the selection metric first, then the other final metrics

    @property
    def results(self) -> list[Run]:
        return [r for r in self.runs if r.summary is not None]


def analyse(sweep_dir: Path, out: Path, *, baseline: str | None, targets: Sequence[str] | None,
            select: str | None) -> Analysis:
    runs, plan = load_runs(sweep_dir)
    metric, mode = choose_metric(runs, select or plan.get("select"))
    task = plan.get("task") or next((r.summary.get("task") for r in runs if r.summary), "?")
    points = group_points(runs)
    best = best_points(points, metric, mode)
    optimizers = [o for o in dict.fromkeys(plan.get("optimizers", []) + [p.optimizer for p in points]) if o in best]
    finals = sorted({k for r in runs if r.summary for k in (r.summary.get("final_metrics") or {}) if _is_metric(k)})
    return Analysis(
        sweep_dir=sweep_dir, out=out, plan=plan, runs=runs, metric=metric, mode=mode,
        baseline=baseline or plan.get("baseline") or "adam",
        targets=[parse_target(t) for t in (targets if targets is not None else plan.get("targets", []))],
        task=task, title=plan.get("title") or task, points=points, best=best, optimizers=optimizers,
        finals_keys=[metric] + [k for k in finals if k != metric])


def _header(a: Analysis) -> list[str]:
    counts = {s: sum(r.status == s for r in a.runs) for s in ("completed", "interrupted", "failed", "missing")}
    lines = [f"# Optimizer comparison: {a.title}", "",
             f"Sweep `{a.sweep_dir.name}`, task `{a.task}`: {len(a.runs)} runs: {counts['completed']} completed, "
             f"{counts['interrupted']} interrupted, {counts['failed']} failed, {counts['missing']} not run; "
             f"{sum(r.diverged for r in a.runs)} diverged (counted as misses).", ""]
    if a.plan.get("expect"):
        lines += [f"Paper: {a.plan['expect']}", ""]
    sources = sorted({str(r.summary.get("data_source")) for r in a.results if r.summary.get("data_source")})
    if "synthetic" in sources:
        lines += ["> **Data: SYNTHETIC stand-in** (the real data set was not on disk). These numbers say "
                  "nothing about the paper's benchmark; see the task's README section to get the real data.", ""]
    elif sources:
        lines += [f"Data source: {', '.join(sources)}.", ""]
    lines += [f"Each optimizer's grid point is chosen by the final `{a.metric}` ({a.mode}imized, mean over "
              "seeds; a point with a diverged or failed seed ranks below one without), as in Section 5 of "
              "the paper. Values are mean ± sample std over seeds of the final value; 'best' is the best "
              "value seen during the run (summary.json `best_metric`); interrupted runs are left out.", ""]
    return lines


def _stats(values: Iterable[float | None]) -> dict:
    return dict(zip(("mean", "std", "n"), mean_std(values)))


def _results_section(a: Analysis) -> tuple[list[str], dict]:
    header = ["optimizer", "chosen hyper-parameters", "seeds ok / run"] + [f"final {k}" for k in a.finals_keys]
    has_best = any(r.summary.get("best_metric") for r in a.results)
    header += ([f"best {a.metric}"] if has_best else []) + ["steps", "wall time (s)"]
    rows, data, resolved = [], {}, []
    for opt in a.optimizers:
        p = a.best[opt]
        done = [r for r in p.runs if r.status == "completed"]
        ok = sum(not r.diverged for r in done)
        entry = {"params": p.params, "seeds": [r.seed for r in p.runs], "ok": ok,
                 "final": {k: _stats(r.final(k) for r in p.runs) for k in a.finals_keys}}
        row = [pretty(opt), format_params(p.params), f"{ok} / {len(p.runs)}"]
        row += [fmt_mean_std(r.final(k) for r in p.runs) for k in a.finals_keys]
        if has_best:
            bvals = [(r.summary.get("best_metric") or {}).get("value") for r in done]
            bvals = [float(v) if v is not None else None for v in bvals]
            row.append(fmt_mean_std(bvals))
            entry["best"] = _stats(bvals)
        steps = [float(r.summary["global_step"]) for r in done if r.summary.get("global_step") is not None]
        walls = [float(r.summary["wall_seconds"]) for r in done if r.summary.get("wall_seconds") is not None]
        row += [fmt_mean_std(steps, fmt_count), fmt_mean_std(walls, fmt_seconds)]
        entry["wall_seconds"] = _stats(walls)
        rows.append(row)
        data[opt] = entry
        hp = next(((r.summary.get("hparams") or {}).get("optimizer") or {} for r in done), {})
        hp = {k: v for k, v in hp.items() if k != "name"}
        if hp:
            resolved.append(f"- {pretty(opt)} (`{opt}`): " + ", ".join(f"{k}={format_value(v)}" for k, v in hp.items()))
    lines = ["## Results (best grid point per optimizer)", ""] + _table(header, rows)
    if resolved:
        lines += ["Resolved optimizer settings of the chosen points (summary.json `hparams.optimizer`):", ""]
        lines += resolved + [""]
    return lines, data


def _paired_section(a: Analysis) -> tuple[list[str], dict]:
    if len(a.optimizers) < 2:
        return [], {}
    if a.baseline not in a.best:
        return [f"(No seed-paired comparison: baseline `{a.baseline}` is not in this sweep; "
                "pass --baseline NAME.)", ""], {}
    base = a.best[a.baseline]
    rows, data = [], {}
    for opt in a.optimizers:
        if opt == a.baseline:
            continue
        res = paired_comparison(a.best[opt].finals(a.metric), base.finals(a.metric), a.mode)
        data[opt] = res
        ci = (f"[{fmt(res['ci_low'])}, {fmt(res['ci_high'])}]" if res["finite_pairs"] >= MIN_CI_PAIRS
              else f"n/a ({res['finite_pairs']} seeds; needs ≥ {MIN_CI_PAIRS})")
        rows.append([pretty(opt), str(res["pairs"]), fmt(res["mean_diff"]), ci,
                     f"{res['wins']}-{res['ties']}-{res['losses']}", fmt(res["win_rate"], 3),
                     str(res["candidate_misses"]), str(res["baseline_misses"]), str(res["excluded"])])
    name = pretty(a.baseline)
    lines = [f"## Seed-paired comparison against {name}", "",
             f"Per seed, final `{a.metric}` of the optimizer minus that of {name} (same seed: same "
             f"initialisation and data order); {'higher' if a.mode == 'max' else 'lower'} is better. 95% "
             "percentile-bootstrap CI of the mean difference over seeds where both runs finished with a finite "
             f"value, given from {MIN_CI_PAIRS} such seeds on (from 2 values a bootstrap interval is just their "
             "range). Win rate over all seeds with a result on both sides: a diverged run loses to a finite one; "
             "two diverged runs tie. Excluded: seeds where either run failed, was interrupted or was not run.", ""]
    lines += _table(["optimizer", "pairs", "mean diff", "95% CI", "W-T-L", "win rate", "misses (opt)",
                     f"misses ({name})", "excluded"], rows)
    return lines, data


def _target_sections(a: Analysis) -> tuple[list[str], dict]:
    lines, data = [], {}
    for tmetric, tvalue in a.targets:
        tmode = metric_mode(tmetric, (a.metric, a.mode))
        rows, key = [], f"{tmetric}={tvalue:g}"
        data[key] = {}
        for opt in a.optimizers:
            p = a.best[opt]
            # completed runs: a hit or a miss; failed: a miss; interrupted or not run: no verdict yet
            counted = [r for r in p.runs if r.status in ("completed", "failed")]
            hits = {}
            for r in counted:
                s = r.scalars().get(tmetric) if r.status == "completed" and not r.diverged else None
                hits[r.seed] = (time_to_target(s.steps, s.values, s.wall_times, tvalue, tmode, start=s.start)
                                if s else None)
            got = [h for h in hits.values() if h is not None]
            med_steps = float(np.median([h[0] for h in got])) if got else math.nan
            med_secs = float(np.median([h[1] for h in got])) if got else math.nan
            data[key][opt] = {"hits": len(got), "runs": len(counted), "per_seed": {str(k): h for k, h in hits.items()},
                              "median_steps": med_steps, "median_seconds": med_secs}
            per_seed = ", ".join("—" if r.seed not in hits else ("miss" if hits[r.seed] is None else
                                                               str(hits[r.seed][0])) for r in p.runs)
            rows.append([pretty(opt), f"{len(got)} / {len(counted)}", fmt_count(med_steps) if got else "never",
                         fmt_seconds(med_secs) if got else "never", per_seed])
        lines += [f"## Steps and time to target {tmetric} {'≥' if tmode == 'max' else '≤'} {tvalue:g}", "",
                  "First logged step reaching the target (AlgoPerf's time-to-result), in optimizer steps taken; "
                  "time is wall clock from the run's start (its event file is opened when training set-up "
                  "begins), without the pause between an interruption and its resume. A run that never reaches "
                  "the target, diverges, or fails is a miss; an interrupted run (—) is not counted yet.", ""]
        lines += _table(["optimizer", "reached", "median steps", "median seconds", "steps per seed"], rows)
    return lines, data


def _figures_section(a: Analysis) -> tuple[list[str], list[str]]:
    out, best = a.out, a.best
    figures: list[tuple[str, str, list[str]]] = []  # caption, file, notes
    groups = [(pretty(o), best[o].runs, look(o)) for o in a.optimizers]
    tags = _curve_tags(a.results)
    for tag in tags:
        name = f"curves_{_slug(tag)}.png"
        drawn, notes = plot_curves(out / name, tag, groups, f"{a.title}: {tag} (best grid point per optimizer)")
        if drawn:
            figures.append((f"{tag}, best grid point per optimizer", name, notes))
    if plot_lr(out / "curves_lr.png",
               [(best[o].label.replace(o, pretty(o), 1), best[o].runs, look(o)) for o in a.optimizers],
               f"{a.title}: learning rate (LearningRateMonitor), best grid point per optimizer"):
        figures.append(("learning rate schedule", "curves_lr.png", []))
    if any(len([p for p in a.points if p.optimizer == o]) > 1 for o in a.optimizers):
        # colour and marker = optimizer, dash pattern = grid point; the chosen point is marked
        all_groups, dashes = [], list(DASHES.values())
        for opt in a.optimizers:
            mine = sorted((p for p in a.points if p.optimizer == opt), key=lambda p: _sort_params(p.params))
            for j, p in enumerate(mine):
                chosen = " (chosen)" if best[opt] is p else ""
                all_groups.append((f"{pretty(opt)} {format_params(p.params)}{chosen}", p.runs,
                                   {**look(opt), "linestyle": dashes[j % len(dashes)]}))
        for tag in tags:
            name = f"grid_{_slug(tag)}.png"
            drawn, notes = plot_curves(out / name, tag, all_groups, f"{a.title}: {tag}, every grid point")
            if drawn:
                figures.append((f"{tag}, every grid point", name, notes))
        for key in dict.fromkeys(k for p in a.points for k in p.params):
            short = key.removeprefix("optimizer.")
            name = f"sensitivity_{_slug(short)}.png"
            if plot_sensitivity(out / name, key, a.points, a.metric, a.mode, f"{a.title}: sensitivity to {short}"):
                figures.append((f"final {a.metric} against {key}", name, []))
    corr_tags = sorted({t for r in a.results for t in r.scalars() if t.startswith("corr/")}, key=_corr_order)
    omitted = []
    overall = [t for t in corr_tags if t.endswith("/overall")]  # MomentCorrelation: corr/<m>/overall|<param>
    if overall:
        corr_tags, omitted = overall, [t for t in corr_tags if t not in overall]
    if len(corr_tags) > MAX_FACETS:
        corr_tags.sort(key=lambda t: (t.count("/"), t.count("."), t))
        corr_tags, omitted = sorted(corr_tags[:MAX_FACETS], key=_corr_order), omitted + corr_tags[MAX_FACETS:]
    if plot_correlation(out / "correlation.png", corr_tags, groups, f"{a.title}: correlations (MomentCorrelation)"):
        figures.append(("correlation scalars (corr/*)", "correlation.png", []))
    lines = []
    if figures:
        lines += ["## Figures", "",
                  f"x-axis: {STEP_AXIS}. Curves average the runs the tables average (completed, not diverged); "
                  "the legend counts the runs left out. Each optimizer keeps its colour, dash pattern and marker "
                  "in every report, so lines that coincide stay visible.", ""]
        for caption, name, notes in figures:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
            lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        if omitted:
            lines += [f"Correlation tags not plotted (per-parameter, see TensorBoard): {len(omitted)}.", ""]
    return lines, [name for _, name, _ in figures]


def _correlation_section(a: Analysis) -> list[str]:
    def numbers(r: Run) -> dict:
        c = (r.summary or {}).get("correlation") if r.status == "completed" else None
        c = c.get("overall", c) if isinstance(c, dict) else {}  # MomentCorrelation.summary()["overall"]
        return {k: v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    keys = sorted({k for opt in a.optimizers for r in a.best[opt].runs for k in numbers(r)})[:8]
    if not keys:
        return []
    rows = [[pretty(opt)] + [fmt_mean_std(numbers(r).get(k) for r in a.best[opt].runs) for k in keys]
            for opt in a.optimizers]
    return (["## Correlation summary (summary.json `correlation.overall`, mean ± std over seeds)", ""]
            + _table(["optimizer"] + keys, rows))


def _grid_section(a: Analysis) -> list[str]:
    rows = []
    for p in sorted(a.points, key=lambda p: (p.optimizer, p.score(a.metric, a.mode))):
        walls = [float(r.summary["wall_seconds"]) for r in p.runs
                 if r.status == "completed" and r.summary.get("wall_seconds") is not None]
        rows.append([pretty(p.optimizer), format_params(p.params), str(len(p.runs)),
                     fmt_mean_std(p.finals(a.metric).values()), str(p.misses(a.metric)),
                     "yes" if a.best.get(p.optimizer) is p else "", fmt_mean_std(walls, fmt_seconds)])
    return ["## Every grid point", ""] + _table(
        ["optimizer", "hyper-parameters", "seeds", f"final {a.metric}", "misses", "chosen", "wall time (s)"], rows)


def _runs_section(a: Analysis) -> list[str]:
    rows = []
    for r in sorted(a.runs, key=lambda r: r.name):
        s = r.summary or {}
        rows.append([r.name, pretty(r.optimizer), str(r.seed), r.status + (" (diverged)" if r.diverged else ""),
                     fmt(r.final(a.metric), 6), fmt_count(s.get("global_step")), fmt_seconds(s.get("wall_seconds")),
                     _rel(r.run_dir, a.out)])
    lines = ["## Every run", ""] + _table(["run", "optimizer", "seed", "status", f"final {a.metric}", "steps",
                                            "wall time (s)", "run directory"], rows)
    failed = [r for r in a.runs if r.status in ("failed", "missing", "interrupted")]
    if failed:
        lines += ["## Failed, interrupted or missing runs", "",
                  "Re-run the same `python -m adashift_pl.compare` command to retry them "
                  "(completed runs are skipped, interrupted ones resume from their last checkpoint).", ""]
        rows = []
        for r in failed:
            last = (r.error_tail or "").strip().splitlines()
            rows.append([r.name, r.status, str(r.exit_code) if r.exit_code is not None else "—",
                         last[-1][:200] if last else "—", _rel(r.error_file, a.out)])
        lines += _table(["run", "status", "exit code", "last stderr line", "stderr tail"], rows)
    return lines


def build_report(sweep_dir: Path | str, *, baseline: str | None = None,
                 targets: Sequence[str] | None = None, select: str | None = None,
                 out_dir: Path | str | None = None) -> Path:
    """Write report.md, report.json and the figures; return the path of report.md."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory {sweep_dir} does not exist")
    out = Path(out_dir) if out_dir else sweep_dir / REPORT_SUBDIR
    a = analyse(sweep_dir, out, baseline=baseline, targets=targets, select=select)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    results, results_json = _results_section(a)
    paired, paired_json = _paired_section(a)
    target, target_json = _target_sections(a)
    figures, figure_names = _figures_section(a)
    lines = (_header(a) + results + paired + target + figures + _correlation_section(a)
             + _grid_section(a) + _runs_section(a))
    report_md = out / "report.md"
    atomic_write_text(report_md, "\n".join(lines))
    report = {
        "sweep_dir": str(sweep_dir), "task": a.task, "metric": a.metric, "mode": a.mode, "baseline": a.baseline,
        "optimizers": results_json, "paired": paired_json, "targets": target_json, "figures": figure_names,
        "runs": [{"name": r.name, "optimizer": r.optimizer, "params": r.params, "seed": r.seed,
                  "status": r.status, "diverged": r.diverged, "exit_code": r.exit_code,
                  "final": {k: r.final(k) for k in a.finals_keys} if r.summary else None,
                  "run_dir": str(r.run_dir) if r.run_dir else None} for r in a.runs],
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default, allow_nan=True))
    return report_md


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adashift_pl.report",
        description="Figures and report.md for a sweep directory (written by `python -m adashift_pl.compare`) "
                    "or any directory of runs.")
    parser.add_argument("sweep_dir", type=Path, help="sweep directory (holds sweep.json and runs/)")
    parser.add_argument("--baseline", default=None, help="optimizer the others are paired against (default adam)")
    parser.add_argument("--target", action="append", default=None, metavar="METRIC=VALUE",
                        help="steps/time to reach it, e.g. val/acc=0.9 (repeatable)")
    parser.add_argument("--select", default=None, metavar="METRIC[:min|max]",
                        help="metric that picks each optimizer's best grid point (default: the task's monitor)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.sweep_dir, baseline=args.baseline, targets=args.target,
                            select=args.select, out_dir=args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
