"""compare.py: planning (no training), recipes, and a tiny real sweep on the counterexample task
(2 optimizers x 2 seeds x 2 lrs, 20 steps each, run as subprocesses 2 at a time)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adashift_pl import compare as C
from adashift_pl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.warmup_steps", "0", "--model.replicas", "4", "--trainer.max_steps", "20",
        "--data.steps_per_epoch", "10", "--trainer.log_every_n_steps", "5", "--correlation", "false"]

# --------------------------------------------------------------------------- planning


def test_split_values_and_grid():
    assert C.split_values("1e-3,1e-2") == ["1e-3", "1e-2"]
    assert C.split_values("[0,0.999],[0.9, 0.999]") == ["[0,0.999]", "[0.9, 0.999]"]
    with pytest.raises(UserError, match="bad grid values"):
        C.split_values("[0,1")
    with pytest.raises(UserError, match="bad grid values"):
        C.split_values("1,,2")
    g = C.parse_grid(["optimizer.lr=1e-3,1e-2", "adashift:optimizer.betas=[0,0.999],[0.9,0.999]"])
    assert g == {None: {"optimizer.lr": [0.001, 0.01]},
                 "adashift": {"optimizer.betas": [[0, 0.999], [0.9, 0.999]]}}
    with pytest.raises(UserError, match="SECTION.KEY"):
        C.parse_grid(["lr=1,2"])
    with pytest.raises(UserError, match="expected KEY=V1,V2"):
        C.parse_grid(["optimizer.lr"])


def test_parse_seeds():
    assert C.parse_seeds("3") == [0, 1, 2]
    assert C.parse_seeds("0,4,7") == [0, 4, 7]
    assert C.parse_seeds("5,") == [5]
    for bad in ("0", "x", ","):
        with pytest.raises(UserError, match="--seeds"):
            C.parse_seeds(bad)


def test_plan_precedence_and_names():
    optimizers = {"adam": {"grid": {"optimizer.lr": [0.1]}},
                  "adashift": {"grid": {"optimizer.lr": [0.5]}, "set": {"optimizer.keep_num": 1}}}
    cli = {None: {"optimizer.lr": [0.001, 0.01]}, "adashift": {"optimizer.window": [1]}}
    combos = C.plan_combos(optimizers, {}, cli, fixed_keys=set(), seeds=[0, 1])
    names = [c.name for c in combos]
    assert names == ["adam__lr=0.001__seed0", "adam__lr=0.001__seed1", "adam__lr=0.01__seed0", "adam__lr=0.01__seed1",
                     "adashift__lr=0.001__window=1__seed0", "adashift__lr=0.001__window=1__seed1",
                     "adashift__lr=0.01__window=1__seed0", "adashift__lr=0.01__window=1__seed1"]
    assert combos[-1].fixed == {"optimizer.keep_num": 1}
    assert combos[-1].flags() == ["--optimizer.keep_num", "1", "--optimizer.lr", "0.01", "--optimizer.window", "1"]
    # a plain --optimizer.lr flag fixes lr: the recipe's lr grid gives way
    fixed = C.plan_combos(optimizers, {}, {}, fixed_keys={"optimizer.lr"}, seeds=[0])
    assert [c.name for c in fixed] == ["adam__seed0", "adashift__seed0"]
    # list values get file-system-safe names and pass as YAML lists
    betas = C.plan_combos({"adam": {}}, {"optimizer.betas": [[0.0, 0.999]]}, {}, set(), [0])[0]
    assert betas.name == "adam__betas=0_0.999__seed0"
    assert betas.flags() == ["--optimizer.betas", "[0.0, 0.999]"]


def _plan(argv):
    parser = C.build_parser()
    args, rest = parser.parse_known_args(argv)
    return C.make_plan(args, rest)


def test_make_plan_passthrough_and_errors(tmp_path):
    plan, out = _plan(["--task", "counterexample", "--optimizers", "adam,adashift", "--seeds", "2",
                       "--grid", "optimizer.lr=1e-3,1e-2", "--out", str(tmp_path / "s"), *TINY])
    assert out == tmp_path / "s" and len(plan["combos"]) == 8 and plan["baseline"] == "adam"
    flags = plan["passthrough"]
    assert flags[flags.index("--correlation") + 1] == "false"
    assert flags[flags.index("--trainer.max_steps") + 1] == "20"
    errors = [
        (["--optimizers", "adam"], "give --task"),
        (["--task", "nope", "--optimizers", "adam"], "unknown task 'nope'"),
        (["--task", "counterexample", "--optimizers", "adam,rmsprop"], "unknown optimizer"),
        (["--task", "counterexample", "--optimizers", "adam", "--seed", "1"], "did you mean --seeds"),
        (["--task", "counterexample", "--optimizers", "adam", "--grid", "sgd:optimizer.lr=1"], "not in --optimizers"),
        (["--task", "counterexample", "--optimizers", "adam", "--grid", "optimizer.lr=1,2",
          "--optimizer.lr", "3"], "both as --grid"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
    ]
    for argv, message in errors:
        with pytest.raises(UserError, match=re.escape(message)):
            _plan(argv)


def test_cli_user_error_exit_code(capsys):
    assert C.main(["--task", "counterexample", "--optimizers", "adam", "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.yaml")))
def test_every_recipe_plans(recipe, tmp_path):
    """Each paper recipe loads, names a known task, optimizers and keys, and plans its grid."""
    from adashift_pl.optim import list_optimizers

    plan, out = _plan(["--recipe", recipe, "--out", str(tmp_path / recipe)])
    assert plan["title"] and plan["expect"], "README table needs title and expect"
    assert set(plan["optimizers"]) <= set(list_optimizers())
    seeds = len(plan["seeds"])
    assert len(plan["combos"]) % seeds == 0 and len(plan["combos"]) >= seeds
    for combo in plan["combos"]:
        window, keep = combo["params"].get("optimizer.window"), combo["params"].get("optimizer.keep_num")
        assert window is None or keep is None or window <= keep


def test_recipes_cover_the_paper_figures():
    names = {p.stem for p in (ROOT / "configs" / "sweeps").glob("*.yaml")}
    assert {"fig1a", "fig2", "fig3", "fig4", "fig5", "fig6", "fig7a", "fig7b",
            *(f"fig{i}" for i in range(9, 16))} <= names


@pytest.mark.parametrize("recipe", ["fig7b", "fig15"])
def test_nmt_recipes_run_the_table8_config_from_any_directory(recipe, tmp_path, monkeypatch):
    """Figures 7b/15 at paper scale: every run gets configs/nmt_iwslt15.yaml (the Table 8 model on real
    IWSLT'15), not the synthetic CPU demo of configs/nmt.yaml -- also when compare runs elsewhere."""
    monkeypatch.chdir(tmp_path)
    plan, _ = _plan(["--recipe", recipe, "--out", str(tmp_path / recipe)])
    i = plan["passthrough"].index("--config")
    assert Path(plan["passthrough"][i + 1]) == ROOT / "configs" / "nmt_iwslt15.yaml"
    # --config on the command line still wins
    plan, _ = _plan(["--recipe", recipe, "--out", str(tmp_path / "b"), "--config", "mine.yaml"])
    assert plan["passthrough"][:2] == ["--config", "mine.yaml"]


VISION_TASKS = {"cifar10_resnet18", "cifar10_densenet", "tinyimagenet_densenet"}


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.yaml")
                                          if C.load_recipe(p.stem)["task"] in VISION_TASKS))
def test_vision_recipes_run_at_paper_scale(recipe, tmp_path):
    """`--recipe fig4` (README: "a paper figure at paper scale") trains on the real data set for whole
    epochs, not the task config's 30-step CPU check on whatever data happens to be on disk; a flag on
    the command line still overrides the recipe."""
    plan, _ = _plan(["--recipe", recipe, "--out", str(tmp_path / recipe)])
    flags = dict(zip(plan["passthrough"][::2], plan["passthrough"][1::2]))
    assert flags["--data.source"] == "real"
    assert int(flags["--trainer.max_epochs"]) >= 100 and flags["--trainer.max_steps"] == "-1"
    plan, _ = _plan(["--recipe", recipe, "--out", str(tmp_path / "b"), "--trainer.max_epochs", "2",
                     "--data.source", "synthetic"])
    flags = dict(zip(plan["passthrough"][::2], plan["passthrough"][1::2]))
    assert plan["passthrough"].count("--trainer.max_epochs") == 1 and flags["--trainer.max_epochs"] == "2"
    assert flags["--data.source"] == "synthetic"


def test_run_state(tmp_path):
    combo = {"name": "adam__seed0", "run_dir": "runs/adam__seed0/t/adam/adam__seed0"}
    run_dir = tmp_path / combo["run_dir"]
    assert C.run_state(tmp_path, combo) == ("new", None)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert C.run_state(tmp_path, combo) == ("resume", run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert C.run_state(tmp_path, combo)[0] == "resume"
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert C.run_state(tmp_path, combo) == ("completed", run_dir)


# --------------------------------------------------------------------------- a real tiny sweep


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("runs/*/*/*/*/summary.json")}


def _table_rows(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_tiny_sweep_runs_resumes_and_reports(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    argv = ["--task", "counterexample", "--optimizers", "adam,adashift", "--seeds", "2",
            "--grid", "optimizer.lr=1e-3,1e-2", "--grid", "adashift:optimizer.keep_num=1",
            "--jobs", "2", "--out", str(sweep), "--target", "val/theta_mean=0.01", *TINY]
    assert C.main(argv) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(sweep / "report" / "report.md")
    assert "[8/8] done" in out
    summaries = _summaries(sweep)
    assert len(summaries) == 8 and all(s["status"] == "completed" for s in summaries.values())
    assert summaries["adashift__lr=0.01__keep_num=1__seed1"]["hparams"]["optimizer"]["keep_num"] == 1
    # the report's tables hold the summary.json values
    md = (sweep / "report" / "report.md").read_text()
    metric = "val/expected_loss"  # no MONITOR, no val/loss: the first val/*loss*
    assert f"final `{metric}`" in md
    runs = {r[0]: r for r in _table_rows(md, "Every run")}
    assert set(runs) == set(summaries)
    for name, s in summaries.items():
        assert float(runs[name][4]) == pytest.approx(s["final_metrics"][metric], rel=1e-5)
        assert runs[name][5] == "20"
    main = {r[0]: r for r in _table_rows(md, "Results")}
    for opt, row in main.items():
        key = "adam" if opt == "Adam" else "adashift"
        lr = row[1].split("lr=")[1].split(",")[0]
        vals = [s["final_metrics"][metric] for n, s in summaries.items()
                if n.startswith(f"{key}__lr={lr}__")]
        mean = sum(vals) / len(vals)
        assert float(row[3].split(" ± ")[0]) == pytest.approx(mean, rel=1e-3)
    assert "## Seed-paired comparison against Adam" in md and "## Steps and time to target" in md
    for png in ("curves_theta_mean.png", "curves_train_loss.png", "grid_theta_mean.png", "sensitivity_lr.png"):
        assert (sweep / "report" / png).stat().st_size > 5000, png
    # re-running the same command runs nothing new
    mtimes = {n: (sweep / "runs" / n / "compare.json").stat().st_mtime_ns for n in summaries}
    assert C.main(argv + ["--no-report"]) == 0
    out = capsys.readouterr().out
    assert "8 already completed (skipped)" in out and "0 to run" in out
    assert mtimes == {n: (sweep / "runs" / n / "compare.json").stat().st_mtime_ns for n in summaries}
    # a changed fixed setting into the same directory is refused
    assert C.main(argv[:-1] + ["true", "--dry-run"]) == 2
    assert "different passthrough" in capsys.readouterr().err
    # an interrupted run resumes from its last checkpoint (marked interrupted at its last step: the
    # resumed run has nothing left to train, and the report takes its values from the event files)
    name = "adam__lr=0.001__seed0"
    sfile = next(sweep.glob(f"runs/{name}/*/*/*/summary.json"))
    sfile.write_text(json.dumps({**summaries[name], "status": "interrupted"}))
    assert C.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resume {name} (from last.ckpt)" in out and "[1/1] done" in out
    assert json.loads(sfile.read_text())["status"] == "completed"
    md = (sweep / "report" / "report.md").read_text()
    runs = {r[0]: r for r in _table_rows(md, "Every run")}
    assert float(runs[name][4]) == pytest.approx(summaries[name]["final_metrics"][metric], rel=1e-5)


def test_failed_run_is_reported_not_fatal(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # model.bound -1 is refused by the run's task (exit 2, a check no up-front test makes: it is the
    # constructor's) while bound 1 trains: the sweep goes on and reports both
    argv = ["--task", "counterexample", "--optimizers", "adam", "--seeds", "1", "--grid", "model.bound=1,-1",
            "--jobs", "2", "--out", str(sweep), *TINY]
    bad = "adam__model.bound=-1__seed0"
    assert C.main(argv) == 1
    out = capsys.readouterr().out
    assert f"FAILED  {bad}  exit 2: error: invalid model.bound -1" in out
    assert "done    adam__model.bound=1__seed0" in out
    record = json.loads((sweep / "runs" / bad / "compare.json").read_text())
    assert record["exit_code"] == 2 and "invalid model.bound" in record["stderr_tail"]
    assert record["run_dir"] == f"runs/{bad}/counterexample/adam/{bad}"
    assert "invalid model.bound" in (sweep / "runs" / bad / "error.txt").read_text()
    md = (sweep / "report" / "report.md").read_text()
    failed = _table_rows(md, "Failed")
    assert failed[0][0] == bad and failed[0][1] == "failed" and failed[0][2] == "2"
    results = _table_rows(md, "Results")
    assert results[0][2] == "1 / 1"
