"""report.py: statistics on fabricated numbers, and a report built from fabricated run
directories (summary.json + TensorBoard events written with SummaryWriter) -- no training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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


def test_no_bootstrap_ci_from_fewer_than_three_seeds():
    two = R.paired_comparison({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.5}, "max")
    assert two["finite_pairs"] == 2 and math.isnan(two["ci_low"]) and math.isnan(two["ci_high"])
    three = R.paired_comparison({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.7, 1: 0.5, 2: 0.6}, "max")
    assert three["ci_low"] <= three["mean_diff"] <= three["ci_high"]


def test_counts_and_seconds_print_as_numbers_not_exponents():
    assert R.fmt_count(40000) == "40000" and R.fmt_count(40000.0) == "40000" and R.fmt_count(15.5) == "15.5"
    assert R.fmt_mean_std([40000, 40000], R.fmt_count) == "40000 ± 0"
    assert R.fmt_seconds(12345.6) == "12346" and R.fmt_seconds(2.3456) == "2.35"
    assert R.fmt_count(None) == "—" and R.fmt_count(float("nan")) == "nan"


def test_paired_comparison_direction():
    up = R.paired_comparison({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.6}, "max")
    assert up["wins"] == 2 and up["win_rate"] == 1.0 and up["mean_diff"] == pytest.approx(0.2)
    down = R.paired_comparison({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.6}, "min")
    assert down["losses"] == 2 and down["win_rate"] == 0.0


def test_time_to_target():
    steps, walls, start = [10, 20, 30, 40], [100.0, 101.5, 103.0, 104.0], 96.0
    assert R.time_to_target(steps, [0.5, 0.8, 0.95, 0.97], walls, 0.9, "max", start=start) == (30, 7.0)
    assert R.time_to_target(steps, [0.5, 0.8, 0.85, 0.86], walls, 0.9, "max", start=start) is None
    assert R.time_to_target(steps, [2.0, 1.0, 0.4, 0.1], walls, 0.5, "min", start=start) == (30, 7.0)
    assert R.time_to_target(steps, [2.0, float("nan"), 0.4, 0.1], walls, 0.5, "min", start=start) is None
    assert R.time_to_target([], [], [], 0.5, "min", start=start) is None
    # reached at the first point: the time it took from the run's start, not 0 s
    assert R.time_to_target(steps, [0.1, 1.0, 1.0, 1.0], walls, 0.5, "min", start=start) == (10, 4.0)


def _writer(log_dir, opened: float):
    """A SummaryWriter whose event file is opened (its first record written) at unix time `opened`."""
    import types

    from tensorboard.summary.writer import event_file_writer
    from torch.utils.tensorboard import SummaryWriter

    real = event_file_writer.time
    event_file_writer.time = types.SimpleNamespace(time=lambda: opened)
    try:
        return SummaryWriter(log_dir=str(log_dir))
    finally:
        event_file_writer.time = real


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
    """A run started at t=995, first logged at 1000, interrupted after step 40 and resumed (from its
    step-30 checkpoint) an hour later writes a second event file; time-to-target counts from the
    run's start and counts training time, not the hour the run sat waiting."""
    segments = [(995.0, 1000.0, [(10, 0.1), (20, 0.2), (30, 0.3), (40, 0.4), (50, 0.5)]),
                (4998.0, 5000.0, [(40, 0.4), (50, 0.5), (60, 0.6), (70, 0.7)])]
    for k, (opened, t0, points) in enumerate(segments):
        writer = _writer(tmp_path / f"w{k}", opened)
        for i, (step, value) in enumerate(points):
            writer.add_scalar("val/acc", value, global_step=step, walltime=t0 + i)
        writer.close()
        (event,) = (tmp_path / f"w{k}").glob("events.out.tfevents.*")
        event.rename(tmp_path / f"events.out.tfevents.{int(opened)}.host.{k}.0")  # the process start time
    s = R.read_scalars(tmp_path)["val/acc"]
    assert s.start == 995.0
    assert s.steps.tolist() == [10, 20, 30, 40, 50, 60, 70]
    assert s.values.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # the resumed process's start follows the interrupted one's last point directly; its own
    # start-up (4998 -> 5000) is training time
    assert s.wall_times.tolist() == pytest.approx([1000, 1001, 1002, 1006, 1007, 1008, 1009])
    assert R.time_to_target(s.steps, s.values, s.wall_times, 0.65, "max", start=s.start) == (70, pytest.approx(14.0))
    assert R.time_to_target(s.steps, s.values, s.wall_times, 0.05, "max", start=s.start) == (10, pytest.approx(5.0))


# --------------------------------------------------------------------------- fabricated sweep


STEP = 10_000  # optimizer steps between two logged points of a fabricated run
OPENED = 995.0  # when a fabricated run's event file is opened; its points are logged at 1000, 1001, ...


def _write_run(sweep, name, optimizer, params, seed, *, curve, final, status="completed", diverged=False,
               corr=None, best=True):
    combo = sweep / "runs" / name
    run_dir = combo / "counterexample" / optimizer / name
    run_dir.mkdir(parents=True)
    writer = _writer(run_dir, OPENED)
    for k, v in enumerate(curve):
        step, wall = (k + 1) * STEP, 1000.0 + k
        writer.add_scalar("train/loss", v, global_step=step, walltime=wall)
        writer.add_scalar("val/loss", v + 0.1, global_step=step, walltime=wall)
        if corr is not None:
            writer.add_scalar("corr/g2_v/overall", corr, global_step=step, walltime=wall)
            writer.add_scalar("corr/g2_v/theta.0", corr, global_step=step, walltime=wall)
    writer.close()
    summary = {
        "task": "counterexample", "optimizer": optimizer, "run_name": name, "run_dir": str(run_dir),
        "seed": seed, "data_source": "builtin", "status": status, "diverged": diverged,
        "global_step": STEP * len(curve), "epochs": 1, "wall_seconds": 12345.6 + seed,
        "hparams": {"optimizer": {"name": optimizer, **{k.split(".", 1)[1]: v for k, v in params.items()}}},
        "final_metrics": {"train/loss": final, "val/loss": final + 0.1},
        "best_metric": {"name": "val/loss", "mode": "min", "value": final + 0.05, "step": STEP} if best else None,
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
    # diverged: the loss exploded (finite in the curve, so a figure could average it in by mistake)
    combos.append(_write_run(sweep, "adam__lr=0.1__seed1", "adam", {"optimizer.lr": 0.1}, 1,
                             curve=[1.0, 50.0, 3.0], final=float("nan"), diverged=True))
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
    assert paired[0][3] == "n/a (2 seeds; needs ≥ 3)"  # no "95% CI" from two seeds
    assert math.isnan(json.loads((out / "report.json").read_text())["paired"]["adashift"]["ci_low"])
    # target train/loss <= 0.5 (from sweep.json): adam at its third point (step 30000) on both seeds,
    # 1002 - 995 = 7 s after the run started (not 2 s after its first logged point)
    target = {r[0]: r for r in _table_rows(md, "Steps and time to target")}
    assert target["Adam"][1:4] == ["2 / 2", "30000", "7"]
    assert target["AdaShift"][4] == "20000, 20000, —" and target["AdaShift"][1] == "2 / 2"
    assert target["AdaShift"][3] == "6"
    # counts as integers, long wall times in seconds (not 3e+04, 1.235e+04)
    assert main["Adam"][-2:] == ["30000 ± 0", "12346 ± 0.707"]
    assert runs["adam__lr=0.01__seed0"][5:7] == ["30000", "12346"]
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


def _spy_lines(monkeypatch) -> list[tuple[str, list[list[float]], dict]]:
    """Every line the figures draw: (label, the values of each series averaged into it, style)."""
    drawn, real = [], R._plot_band

    def spy(ax, series, label, *args, **kwargs):
        drawn.append((label, [s.values.tolist() for s in series], kwargs))
        return real(ax, series, label, *args, **kwargs)

    monkeypatch.setattr(R, "_plot_band", spy)
    return drawn


def test_figures_leave_out_diverged_seeds_and_say_so(fabricated, monkeypatch):
    drawn = _spy_lines(monkeypatch)
    md = R.build_report(fabricated).read_text()
    adam01 = [(label, series) for label, series, _ in drawn if label.startswith("Adam lr=0.1 ")]
    assert len(adam01) == 2  # grid_train_loss.png and grid_val_loss.png
    for label, series in adam01:
        assert len(series) == 1 and 50.0 not in series[0] and 50.1 not in series[0]  # the diverged seed is out
        assert "(n=1; not drawn: 1 diverged)" in label
    # the interrupted AdaShift seed is left out of the curves, as out of the tables
    adashift = [(label, series) for label, series, _ in drawn if label.startswith("AdaShift (n=")]
    assert adashift and all(len(series) == 2 and "1 interrupted" in label for label, series in adashift)
    assert "Curves average the runs the tables average" in md
    assert "- Adam lr=0.1: averaged over 1 run(s); not drawn: 1 diverged." in md


def test_an_optimizer_keeps_its_look_in_every_report(fabricated, tmp_path, monkeypatch):
    drawn = _spy_lines(monkeypatch)
    R.build_report(fabricated, out_dir=tmp_path / "a")
    first = {label.split(" (")[0]: {k: v for k, v in style.items() if k != "mark_slot"} for label, _, style in drawn}
    plan = json.loads((fabricated / "sweep.json").read_text())
    plan["optimizers"] = ["adashift", "adam"]  # another report, the optimizers in the other order
    (fabricated / "sweep.json").write_text(json.dumps(plan))
    drawn.clear()
    R.build_report(fabricated, out_dir=tmp_path / "b")
    second = {label.split(" (")[0]: {k: v for k, v in style.items() if k != "mark_slot"} for label, _, style in drawn}
    assert first["Adam"] == second["Adam"] == R.look("adam")
    assert first["AdaShift"]["color"] == second["AdaShift"]["color"] == R.look("adashift")["color"]
    for key in ("color", "linestyle", "marker"):
        assert first["Adam"][key] != first["AdaShift"][key]
    # one table: every name of the factory has its own colour, dash pattern or marker
    looks = {name: R.look(name) for name in ("adam", "amsgrad", "adashift", "non-adashift", "adashift-spatial",
                                              "adashift-mean", "sgd", "nadam")}
    assert len({(v["color"], str(v["linestyle"]), v["marker"]) for v in looks.values()}) == len(looks)
    assert R.look("some-new-optimizer") == R.look("some-new-optimizer")  # unknown names: fixed by the name


def test_identical_curves_are_drawn_apart_and_named(tmp_path, monkeypatch):
    """Adam and AMSGrad with beta1 = 0 often give exactly the same curve: both stay visible."""
    sweep = tmp_path / "sweep"
    combos = []
    for opt in ("adam", "amsgrad"):
        for seed in (0, 1, 2):
            combos.append(_write_run(sweep, f"{opt}__seed{seed}", opt, {}, seed,
                                     curve=[1.0, 0.5 - 0.1 * seed, 0.2], final=0.2 + 0.01 * seed))
    (sweep / "sweep.json").write_text(json.dumps({"task": "counterexample", "optimizers": ["adam", "amsgrad"],
                                                  "baseline": "adam", "combos": combos}))
    drawn = _spy_lines(monkeypatch)
    md = R.build_report(sweep).read_text()
    assert "- AMSGrad: identical to Adam (the lines coincide; told apart by dash pattern and markers)." in md
    lines = {label.split(" (")[0]: (series, style) for label, series, style in drawn if "train" not in label}
    (adam, a_style), (ams, m_style) = lines["Adam"], lines["AMSGrad"]
    assert adam == ams
    assert a_style["linestyle"] != m_style["linestyle"] and a_style["marker"] != m_style["marker"]
    assert a_style["mark_slot"] != m_style["mark_slot"]  # markers shifted against each other
    paired = _table_rows(md, "Seed-paired comparison")
    assert paired[0][3] == "[0, 0]"  # three seeds: an interval is given


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


# --------------------------------------------------------------------------- a real run


def test_a_trained_run_counts_steps_one_way(tmp_path, capsys, one_thread):
    """summary.json, the progress lines, TensorBoard and the report count the same thing: optimizer
    steps taken (trainer.global_step; the first step is 1). The total shown is the steps the run will
    take: here max_epochs (2 epochs of 10 steps) stops it long before max_steps 500."""
    from adashift_pl import train

    assert train.main(["--log-dir", str(tmp_path / "logs"), "--task", "quadratic", "--optimizer", "adam",
                       "--trainer.max_steps", "500", "--trainer.max_epochs", "2", "--data.steps_per_epoch", "10",
                       "--trainer.log_every_n_steps", "5", "--correlation.log_every_n_steps", "10",
                       "--correlation.every_n_steps", "1", "--correlation.lags", "[1]"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("training quadratic with adam: 20 steps")
    assert [line.split()[1] for line in out if line.startswith("step ")] == ["5/20", "10/20", "15/20", "20/20"]
    run_dir = Path(out[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["best_metric"]["step"] in (10, 20)
    scalars = R.read_scalars(run_dir)
    assert scalars["train/loss"].steps.tolist() == [5, 10, 15, 20]  # Lightning alone: 4, 9, 14, 19
    assert scalars["val/loss"].steps.tolist() == [10, 20]  # after each epoch's 10 steps
    assert scalars["corr/g2_v/overall"].steps.tolist() == [10, 20]
    assert max(int(s.steps.max()) for s in scalars.values()) == summary["global_step"]
    # any val/loss reaches 1e9: at the first validation (step 10), some time after the run started
    md = R.build_report(tmp_path / "logs", targets=["val/loss=1e9"]).read_text()
    target = _table_rows(md, "Steps and time to target")[0]
    assert target[1:3] == ["1 / 1", "10"] and 0 < float(target[3]) <= summary["wall_seconds"]
    assert _table_rows(md, "Results")[0][-2] == "20"
