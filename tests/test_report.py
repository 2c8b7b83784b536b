"""report.py: statistics on fabricated numbers, and a report built from fabricated run
directories (summary.json + TensorBoard events written with SummaryWriter) -- no training."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from adashift_pl import report as R

# --------------------------------------------------------------------------- statistics


def test_mean_std_ignores_misses():
    assert R.mean_std([1.0, 3.0, float("nan"), None, float("inf")]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert R.mean_std([5.0]) == (5.0, 0.0, 1)
    m, s, n = R.mean_std([])
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_bootstrap_ci_constant_and_normal():
    assert R.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    assert R.bootstrap_ci([2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in R.bootstrap_ci([]))
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, size=400)
    lo, hi = R.bootstrap_ci(x, n_boot=4000)
    se = x.std(ddof=1) / math.sqrt(x.size)
    # the percentile bootstrap of a mean ~ mean ± 1.96 SE
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.35 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.35 * se)
    assert R.bootstrap_ci(x, n_boot=4000) == (lo, hi)  # deterministic
    lo90, hi90 = R.bootstrap_ci(x, level=0.9, n_boot=4000)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_coverage_is_about_nominal():
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(200):
        x = rng.normal(0.0, 1.0, size=30)
        lo, hi = R.bootstrap_ci(x, n_boot=1000, seed=int(rng.integers(1 << 30)))
        hits += lo <= 0.0 <= hi
    assert 0.86 <= hits / 200 <= 0.99


def test_paired_comparison_wins_misses_exclusions():
    nan = float("nan")
    cand = {0: 0.1, 1: 0.2, 2: nan, 3: 0.5, 4: None, 5: nan, 6: 0.4}
    base = {0: 0.3, 1: 0.1, 2: 0.2, 3: nan, 4: 0.1, 5: nan, 6: 0.4, 7: 0.9}
    res = R.paired_comparison(cand, base, "min")
    # seed 0 win, 1 loss, 2 loss (candidate diverged), 3 win (baseline diverged), 5 tie (both), 6 tie
    assert (res["wins"], res["ties"], res["losses"]) == (2, 2, 2)
    assert res["pairs"] == 6 and res["win_rate"] == pytest.approx(0.5)
    assert res["finite_pairs"] == 3
    assert res["mean_diff"] == pytest.approx(((0.1 - 0.3) + (0.2 - 0.1) + 0.0) / 3)
    assert res["candidate_misses"] == 2 and res["baseline_misses"] == 2
    assert res["excluded"] == 2  # seed 4 (candidate failed) and seed 7 (no candidate run)
    assert res["ci_low"] <= res["mean_diff"] <= res["ci_high"]


def test_paired_comparison_direction():
    up = R.paired_comparison({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.6}, "max")
    assert up["wins"] == 2 and up["win_rate"] == 1.0 and up["mean_diff"] == pytest.approx(0.2)
    down = R.paired_comparison({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.6}, "min")
    assert down["losses"] == 2 and down["win_rate"] == 0.0


def test_time_to_target():
    steps, walls = [10, 20, 30, 40], [100.0, 101.5, 103.0, 104.0]
    assert R.time_to_target(steps, [0.5, 0.8, 0.95, 0.97], walls, 0.9, "max") == (30, 3.0)
    assert R.time_to_target(steps, [0.5, 0.8, 0.85, 0.86], walls, 0.9, "max") is None
    assert R.time_to_target(steps, [2.0, 1.0, 0.4, 0.1], walls, 0.5, "min") == (30, 3.0)
    assert R.time_to_target(steps, [2.0, float("nan"), 0.4, 0.1], walls, 0.5, "min") is None  # diverged first
    assert R.time_to_target([], [], [], 0.5, "min") is None
    assert R.time_to_target(steps, [0.1, 1.0, 1.0, 1.0], walls, 0.5, "min") == (10, 0.0)


def test_metric_mode_and_target_parsing():
    assert R.metric_mode("val/acc") == "max" and R.metric_mode("val/bleu") == "max"
    assert R.metric_mode("train/loss") == "min"
    assert R.metric_mode("val/loss", ("val/loss", "max")) == "max"
    assert R.parse_target("val/acc=0.9") == ("val/acc", 0.9)
    with pytest.raises(R.UserError, match="METRIC=VALUE"):
        R.parse_target("val/acc")


def test_aggregate_curves_interpolates_and_skips_nonfinite():
    a = R.Scalar(np.array([0, 10, 20]), np.array([1.0, 2.0, 3.0]), np.zeros(3))
    b = R.Scalar(np.array([0, 20]), np.array([3.0, float("nan")]), np.zeros(2))
    steps, mean, std, n = R.aggregate_curves([a, b])
    assert list(steps) == [0, 10, 20] and n == 2
    assert mean[0] == pytest.approx(2.0) and std[0] == pytest.approx(math.sqrt(2))
    assert mean[2] == pytest.approx(3.0)  # b's NaN left out of the mean


def test_time_to_target_leaves_out_the_pause_of_a_resumed_run(tmp_path):
    """A run interrupted at step 40 and resumed (from its step-30 checkpoint) an hour later writes a
    second event file; time-to-target counts training time, not the hour the run sat waiting."""
    from torch.utils.tensorboard import SummaryWriter

    segments = [(1000.0, [(0, 0.1), (10, 0.2), (20, 0.3), (30, 0.4), (40, 0.5)]),
                (5000.0, [(30, 0.4), (40, 0.5), (50, 0.6), (60, 0.7)])]
    for k, (t0, points) in enumerate(segments):
        writer = SummaryWriter(log_dir=str(tmp_path / f"w{k}"))
        for i, (step, value) in enumerate(points):
            writer.add_scalar("val/acc", value, global_step=step, walltime=t0 + i)
        writer.close()
        (event,) = (tmp_path / f"w{k}").glob("events.out.tfevents.*")
        event.rename(tmp_path / f"events.out.tfevents.{int(t0)}.host.{k}.0")  # the process start time
    s = R.read_scalars(tmp_path)["val/acc"]
    assert s.steps.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert s.values.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # the resumed process's first point follows the interrupted one's last point directly
    assert s.wall_times.tolist() == pytest.approx([1000, 1001, 1002, 1004, 1005, 1006, 1007])
    assert R.time_to_target(s.steps, s.values, s.wall_times, 0.65, "max") == (60, pytest.approx(7.0))


# --------------------------------------------------------------------------- fabricated sweep


def _write_run(sweep, name, optimizer, params, seed, *, curve, final, status="completed", diverged=False,
               corr=None, best=True):
    from torch.utils.tensorboard import SummaryWriter

    combo = sweep / "runs" / name
    run_dir = combo / "counterexample" / optimizer / name
    run_dir.mkdir(parents=True)
    writer = SummaryWriter(log_dir=str(run_dir))
    for step, v in enumerate(curve):
        writer.add_scalar("train/loss", v, global_step=step * 10, walltime=1000.0 + step)
        writer.add_scalar("val/loss", v + 0.1, global_step=step * 10, walltime=1000.0 + step)
        if corr is not None:
            writer.add_scalar("corr/g2_v/overall", corr, global_step=step * 10, walltime=1000.0 + step)
            writer.add_scalar("corr/g2_v/theta.0", corr, global_step=step * 10, walltime=1000.0 + step)
    writer.close()
    summary = {
        "task": "counterexample", "optimizer": optimizer, "run_name": name, "run_dir": str(run_dir),
        "seed": seed, "data_source": "builtin", "status": status, "diverged": diverged,
        "global_step": 10 * (len(curve) - 1), "epochs": 1, "wall_seconds": 2.0 + seed,
        "hparams": {"optimizer": {"name": optimizer, **{k.split(".", 1)[1]: v for k, v in params.items()}}},
        "final_metrics": {"train/loss": final, "val/loss": final + 0.1},
        "best_metric": {"name": "val/loss", "mode": "min", "value": final + 0.05, "step": 10} if best else None,
        "correlation": ({"protocol": {"mode": "live"}, "samples": 3, "overall": {"g2_v": corr, "absg_step": -corr}}
                        if corr is not None else None),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (combo / "compare.json").write_text(json.dumps({"exit_code": 0, "run_dir": str(run_dir)}))
    return {"name": name, "optimizer": optimizer, "params": params, "seed": seed, "run_dir": str(run_dir)}


@pytest.fixture
def fabricated(tmp_path):
    sweep = tmp_path / "sweep"
    combos = []
    # adam: lr 0.01 is better (final 0.2/0.3) than lr 0.1 (one seed diverged)
    for seed in (0, 1):
        combos.append(_write_run(sweep, f"adam__lr=0.01__seed{seed}", "adam", {"optimizer.lr": 0.01}, seed,
                                 curve=[1.0, 0.6, 0.2 + 0.1 * seed], final=0.2 + 0.1 * seed, corr=0.05))
    combos.append(_write_run(sweep, "adam__lr=0.1__seed0", "adam", {"optimizer.lr": 0.1}, 0,
                             curve=[1.0, 0.3, 0.1], final=0.1))
    combos.append(_write_run(sweep, "adam__lr=0.1__seed1", "adam", {"optimizer.lr": 0.1}, 1,
                             curve=[1.0, float("nan"), float("nan")], final=float("nan"), diverged=True))
    # adashift: lr 0.1 best, better than adam on both seeds
    for seed in (0, 1):
        combos.append(_write_run(sweep, f"adashift__lr=0.1__seed{seed}", "adashift", {"optimizer.lr": 0.1}, seed,
                                 curve=[1.0, 0.4, 0.05 + 0.05 * seed], final=0.05 + 0.05 * seed, corr=0.0))
        combos.append(_write_run(sweep, f"adashift__lr=0.01__seed{seed}", "adashift", {"optimizer.lr": 0.01},
                                 seed, curve=[1.0, 0.8, 0.5], final=0.5, corr=0.0))
    # an interrupted run (a partial result): neither a result nor a miss, listed
    combos.append(_write_run(sweep, "adashift__lr=0.1__seed2", "adashift", {"optimizer.lr": 0.1}, 2,
                             curve=[1.0, 0.9], final=5.0, status="interrupted", corr=0.0))
    # a failed run: compare.json with exit code and an error file, no summary
    failed = sweep / "runs" / "adashift__lr=-1__seed0"
    failed.mkdir(parents=True)
    (failed / "compare.json").write_text(json.dumps({"exit_code": 2, "stderr_tail": "error: Invalid learning rate: -1"}))
    (failed / "error.txt").write_text("error: Invalid learning rate: -1\n")
    combos.append({"name": failed.name, "optimizer": "adashift", "params": {"optimizer.lr": -1}, "seed": 0})
    plan = {"task": "counterexample", "optimizers": ["adam", "adashift"], "baseline": "adam",
            "targets": ["train/loss=0.5"], "combos": combos}
    (sweep / "sweep.json").write_text(json.dumps(plan))
    return sweep


def _table_rows(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_report_from_fabricated_runs(fabricated):
    path = R.build_report(fabricated)
    md = path.read_text()
    out = path.parent
    # selection by the monitor val/loss (min): adam lr=0.01 (the diverged lr=0.1 point ranks below),
    # adashift lr=0.1
    main = {r[0]: r for r in _table_rows(md, "Results")}
    assert main["Adam"][1] == "lr=0.01" and main["AdaShift"][1] == "lr=0.1"
    assert main["Adam"][3] == f"{0.35:.4g} ± {np.std([0.3, 0.4], ddof=1):.2g}"
    assert main["Adam"][2] == "2 / 2" and main["AdaShift"][2] == "2 / 3"
    assert main["AdaShift"][3] == f"{0.175:.4g} ± {np.std([0.15, 0.2], ddof=1):.2g}"  # interrupted run left out
    # every run with its summary.json value; the diverged one flagged
    runs = {r[0]: r for r in _table_rows(md, "Every run")}
    assert runs["adam__lr=0.1__seed1"][3] == "completed (diverged)" and runs["adam__lr=0.1__seed1"][4] == "nan"
    assert float(runs["adashift__lr=0.1__seed1"][4]) == pytest.approx(0.2)
    assert runs["adashift__lr=-1__seed0"][3] == "failed"
    assert runs["adashift__lr=0.1__seed2"][3] == "interrupted" and runs["adashift__lr=0.1__seed2"][4] == "—"
    grid = {(r[0], r[1]): r for r in _table_rows(md, "Every grid point")}
    assert grid[("AdaShift", "lr=0.1")][4] == "0" and grid[("Adam", "lr=0.1")][4] == "1"  # misses
    # paired: adashift beats adam on both seeds
    paired = _table_rows(md, "Seed-paired comparison")
    assert paired[0][0] == "AdaShift" and paired[0][4] == "2-0-0" and paired[0][5] == "1"
    assert paired[0][8] == "1"  # seed 2: no adam run, adashift's interrupted
    # target train/loss <= 0.5 (from sweep.json): adam at step 20 on both seeds
    target = {r[0]: r for r in _table_rows(md, "Steps and time to target")}
    assert target["Adam"][1] == "2 / 2" and target["Adam"][2] == "20"
    assert target["AdaShift"][4] == "10, 10, —" and target["AdaShift"][1] == "2 / 2"
    # failures listed with their stderr
    failed = {r[0]: r for r in _table_rows(md, "Failed")}
    assert failed["adashift__lr=-1__seed0"][1:3] == ["failed", "2"]
    assert "Invalid learning rate: -1" in failed["adashift__lr=-1__seed0"][3]
    assert failed["adashift__lr=0.1__seed2"][1] == "interrupted"
    # figures exist and are linked with relative paths
    for name in ("curves_train_loss.png", "curves_val_loss.png", "grid_train_loss.png",
                 "sensitivity_lr.png", "correlation.png"):
        assert (out / name).stat().st_size > 5000, name
        assert f"]({name})" in md
    corr = {r[0]: r for r in _table_rows(md, "Correlation summary")}
    assert corr["Adam"][2] == "0.05 ± 0" and corr["AdaShift"][2] == "0 ± 0"  # columns: absg_step, g2_v
    assert "Correlation tags not plotted (per-parameter, see TensorBoard): 1." in md
    data = json.loads((out / "report.json").read_text())
    assert data["optimizers"]["adashift"]["final"]["val/loss"]["mean"] == pytest.approx(0.175)
    assert data["paired"]["adashift"]["win_rate"] == 1.0


def test_report_select_baseline_and_plain_run_dir(fabricated, tmp_path):
    # selecting by train/loss max turns the choice around
    md = R.build_report(fabricated, select="train/loss:max", baseline="adashift").read_text()
    main = {r[0]: r for r in _table_rows(md, "Results")}
    assert main["AdaShift"][1] == "lr=0.01"
    assert "against AdaShift" in md
    # a directory without sweep.json: runs found by summary.json, grouped by the varying lr
    md = R.build_report(fabricated / "runs", out_dir=tmp_path / "plain").read_text()
    grid = _table_rows(md, "Every grid point")
    assert {(r[0], r[1]) for r in grid} == {("Adam", "lr=0.01"), ("Adam", "lr=0.1"),
                                            ("AdaShift", "lr=0.01"), ("AdaShift", "lr=0.1")}


def test_report_cli_errors(tmp_path, capsys):
    assert R.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert R.main([str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err
