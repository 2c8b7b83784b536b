"""The training command: parsing, config layering, user errors, outputs of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adashift_pl import train
from adashift_pl.config import merge, overrides_to_dict, parse_value, split_overrides

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--correlation", "false", "--trainer.log_every_n_steps", "5"]


def run(tmp_path, *argv) -> int:
    return train.main(["--log-dir", str(tmp_path / "logs"), *argv])


def last_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    return out[-1]


# ---- parsing ------------------------------------------------------------------------------------
def test_values_parse_as_yaml():
    assert parse_value("1e-3") == 1e-3
    assert parse_value("1.0e-3") == 1e-3
    assert parse_value("true") is True and parse_value("false") is False
    assert parse_value("[0.9,0.999]") == [0.9, 0.999]
    assert parse_value("null") is None
    assert parse_value("ddp") == "ddp"
    assert parse_value("16-mixed") == "16-mixed"
    assert parse_value("10") == 10


def test_split_overrides_both_forms_and_order():
    rest, ov = split_overrides(["--task", "quadratic", "--optimizer", "adam", "--optimizer.lr", "1e-2",
                                "--trainer.max_steps=5", "--model.dim", "3", "--optimizer.lr", "2e-2"])
    assert rest == ["--task", "quadratic", "--optimizer", "adam"]
    d = overrides_to_dict(ov)
    assert d == {"optimizer": {"lr": 2e-2}, "trainer": {"max_steps": 5}, "model": {"dim": 3}}  # left to right


def test_merge_is_deep_and_right_wins():
    assert merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}, "d": 1}


def test_every_config_loads_and_builds_its_task():
    from adashift_pl.tasks import get_task

    mine = ["counterexample", "counterexample_seq", "quadratic"]
    for name in mine:
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert cfg["task"] == name
        for opt in cfg["optimizer"]:
            resolved = train.resolve_optimizer(opt, cfg["optimizer"][opt], {})
            module, dm = get_task(name).build(model=cfg["model"], data=cfg["data"], optimizer=resolved, seed=0)
            assert dm.data_source == "builtin"
            assert sum(p.numel() for p in module.parameters()) > 0


def test_resolved_optimizer_precedence():
    r = train.resolve_optimizer("adam", {"lr": 1e-3, "betas": [0.0, 0.999]}, {"lr": 5e-3})
    assert r == {"name": "adam", "lr": 5e-3, "betas": [0.0, 0.999], "eps": 1e-8}  # factory < block < CLI


def test_list(capsys):
    assert train.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "counterexample" in out and "quadratic" in out and "adashift" in out and "amsgrad" in out


# ---- user errors: exit 2, one line, no traceback ------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--task", "nope", "--optimizer", "adam"], "unknown task 'nope'"),
    (["--task", "quadratic", "--optimizer", "nope"], "unknown optimizer 'nope'"),
    (["--task", "quadratic", "--optimizer", "adam", "--optimizer.lr", "-1"], "Invalid learning rate"),
    (["--task", "quadratic", "--optimizer", "adam", "--optimizer.keep_num", "3"], "keep_num"),
    (["--task", "quadratic", "--optimizer", "adam", "--model.widht", "3"], "unknown model key 'widht'"),
    (["--task", "quadratic", "--optimizer", "adam", "--data.sorce", "x"], "unknown data key 'sorce'"),
    (["--task", "quadratic", "--optimizer", "adam", "--trainer.max_stepz", "3"], "unknown trainer key(s) max_stepz"),
    (["--task", "quadratic", "--optimizer", "adam", "--config", "/nonexistent.yaml"], "config file not found"),
    (["--task", "quadratic", "--optimizer", "adam", "--checkpoint.evry", "3"], "unknown checkpoint key(s) evry"),
    (["--task", "quadratic", "--optimizer", "adam", "--bogus"], "unrecognized arguments: --bogus"),
    (["--task", "quadratic", "--optimizer", "adam", "--seed", "x"], "invalid int value"),
    (["--task", "quadratic", "--optimizer", "adashift", "--trainer.strategy", "fsdp"], "shards parameters"),
    (["--task", "quadratic", "--optimizer", "adam", "--resume", "last"], "no run with checkpoints/last.ckpt"),
    (["--task", "quadratic", "--optimizer", "adam", "--resume", "/nonexistent.ckpt"], "no such checkpoint"),
    (["--task", "quadratic", "--optimizer", "adam", "--model.lr_schedule", "cosine"], "invalid model.lr_schedule"),
    (["--task", "counterexample", "--optimizer", "adashift", "--optimizer.spatial_block", "tensor",
      "--trainer.max_steps", "2"], "would couple them"),
    # values of the wrong type, judged by the task constructors' annotations (were tracebacks)
    (["--task", "quadratic", "--optimizer", "adam", "--model.cond", "abc"], "invalid model.cond 'abc'"),
    (["--task", "quadratic", "--optimizer", "adam", "--model.batch_size", "2.5"], "allowed is an integer"),
    (["--task", "quadratic", "--optimizer", "adam", "--data.steps_per_epoch", "x"], "invalid data.steps_per_epoch"),
    (["--task", "counterexample", "--optimizer", "adam", "--model.C", "abc"], "invalid model.C 'abc'"),
    # a key valid in one section but given in the other is blamed on the section it was given in
    (["--task", "quadratic", "--optimizer", "adam", "--data.batch_size", "8"], "unknown data key 'batch_size'"),
    (["--task", "quadratic", "--optimizer", "adam", "--checkpoint.keep", "x"], "invalid checkpoint.keep 'x'"),
    (["--task", "quadratic", "--optimizer", "adam", "--optimizer.lr", "abc"], "invalid optimizer.lr 'abc'"),
    (["--task", "quadratic", "--optimizer", "adam", "--trainer.max_epochs", "abc"],
     "invalid trainer.max_epochs 'abc': allowed is an integer or null"),
    (["--task", "quadratic", "--optimizer", "adam", "--trainer.gradient_clip_val", "x"], "allowed is a number or null"),
    (["--task", "quadratic", "--optimizer", "adam", "--run-name", "a/b"], "invalid --run-name 'a/b'"),
    (["--task", "quadratic", "--optimizer", "adam", "--optimizer.betas", "abc"], "invalid optimizer.betas 'abc'"),
    (["--task", "quadratic", "--optimizer", "sgd", "--optimizer.nesterov", "maybe"], "invalid optimizer.nesterov"),
    (["--task", "quadratic", "--optimizer", "adashift", "--optimizer.eps", "x"], "invalid optimizer.eps 'x'"),
    (["--task", "quadratic", "--optimizer", "adam", "--checkpoint.every_n_train_steps", "-1"],
     "invalid checkpoint.every_n_train_steps -1"),
])
def test_user_errors(tmp_path, capsys, argv, needle):
    assert run(tmp_path, *argv, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and needle in err[-1], err
    assert not any("Traceback" in line for line in err), "\n".join(err)


def test_unreadable_config_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00binary")
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "adam", "--config", str(bad)) == 2
    assert capsys.readouterr().err.startswith("error: cannot read config file")


def test_log_dir_that_is_a_file_is_a_user_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert train.main(["--log-dir", str(afile), "--task", "quadratic", "--optimizer", "adam"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the run directory") and len(err.splitlines()) == 1


def test_a_number_where_a_string_is_meant_is_taken_as_the_string():
    """YAML reads --data.dir 2024 as an int; a str-annotated argument gets "2024"."""
    import inspect

    cfg = {"dir": 2024, "steps": 3}
    params = {k: [p] for k, p in inspect.signature(lambda dir="data", steps=1: None).parameters.items()}
    params["dir"] = [params["dir"][0].replace(annotation="str | None")]
    params["steps"] = [params["steps"][0].replace(annotation="int")]
    train._check_value_types("data", cfg, params, "")
    assert cfg == {"dir": "2024", "steps": 3}


def test_integral_float_accepted_where_an_integer_is_meant(tmp_path, capsys):
    """YAML reads 1e1 as a float; the type check lets it through for an int argument."""
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "adam", "--model.dim", "1e1",
               "--trainer.max_steps", "1", *FAST) == 0


def test_user_error_exit_code_in_a_subprocess(tmp_path):
    p = subprocess.run([sys.executable, "-m", "adashift_pl.train", "--task", "nope", "--optimizer", "adam"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # one line
    assert "unknown task 'nope'" in p.stderr and "quadratic" in p.stderr and "Traceback" not in p.stderr


def test_unknown_top_level_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: quadratic\ntrainr: {max_steps: 3}\n")
    assert run(tmp_path, "--config", str(cfg), "--optimizer", "adam", *FAST) == 2
    assert "unknown top-level key(s) trainr" in capsys.readouterr().err


def test_config_file_and_cli_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: quadratic\nmodel: {dim: 3, cond: 10}\ntrainer: {max_steps: 4}\n"
                   "optimizer:\n  adam: {lr: 1e-2, betas: [0.5, 0.9]}\n")
    assert run(tmp_path, "--config", str(cfg), "--optimizer", "adam", "--optimizer.lr", "2e-2",
               "--model.dim", "2", *FAST) == 0
    resolved = yaml.safe_load((Path(last_line(capsys)) / "config.yaml").read_text())
    assert resolved["optimizer"] == {"name": "adam", "lr": 2e-2, "betas": [0.5, 0.9], "eps": 1e-8}
    assert resolved["model"] == {"dim": 2, "cond": 10} and resolved["trainer"]["max_steps"] == 4
    assert resolved["trainer"]["log_every_n_steps"] == 5  # code default < YAML < CLI


def test_fsdp_allowed_without_block_reduction(tmp_path):
    cfg = {"strategy": "fsdp"}
    assert train.check_strategy(cfg, {"name": "non-adashift"}) is None  # phi = none: fine
    assert train.check_strategy(cfg, {"name": "adam"}) is None
    from adashift_pl.errors import UserError

    for strategy, name in (("fsdp", "adashift-spatial"), ("deepspeed_stage_2", "adashift"), ("FSDP", "adashift-mean")):
        with pytest.raises(UserError, match="shards parameters"):
            train.check_strategy({"strategy": strategy}, {"name": name})


# ---- a short run writes the contract's outputs -------------------------------------------------
@pytest.mark.parametrize("task, optimizer", [("quadratic", "adashift"), ("counterexample", "amsgrad"),
                                             ("counterexample_seq", "adam")])
def test_short_run_outputs(tmp_path, capsys, task, optimizer):
    extra = ["--model.warmup_steps", "3", "--model.replicas", "4"] if task == "counterexample" else []
    rc = run(tmp_path, "--task", task, "--optimizer", optimizer, "--trainer.max_steps", "12",
             "--data.steps_per_epoch", "5", "--optimizer.lr", "1e-2", *extra, *FAST)
    assert rc == 0
    run_dir = Path(last_line(capsys))
    assert run_dir == tmp_path / "logs" / task / optimizer / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "hparams.yaml").is_file()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["optimizer"]["lr"] == 1e-2 and cfg["optimizer"]["name"] == optimizer and cfg["task"] == task
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert train.read_checkpoint(run_dir / "checkpoints" / "last.ckpt")[0]["task"] == task  # loads weights-only
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("task", "optimizer", "run_name", "run_dir", "seed", "data_source", "status", "diverged",
                "global_step", "epochs", "wall_seconds", "hparams", "final_metrics", "best_metric", "correlation",
                "last_checkpoint", "best_checkpoint", "provenance", "extra"):
        assert key in s, key
    assert s["status"] == "completed" and s["global_step"] == 12 and s["data_source"] == "builtin"
    assert s["hparams"]["optimizer"]["lr"] == 1e-2 and not s["diverged"]
    assert s["provenance"]["versions"]["torch"] == torch.__version__
    assert s["provenance"]["precision"] and s["provenance"]["device"].startswith("cpu")
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave nothing behind
    if task == "quadratic":
        assert s["best_metric"]["name"] == "val/loss" and s["best_checkpoint"]
        assert "train/grad_norm" in s["final_metrics"] and "val/loss" in s["final_metrics"]
    # a second run gets the next version
    rc = run(tmp_path, "--task", task, "--optimizer", optimizer, "--trainer.max_steps", "2", *extra, *FAST)
    assert rc == 0 and last_line(capsys).endswith("version_1")


def test_hparams_hold_config_counts_and_data_source(tmp_path, capsys):
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "adam", "--trainer.max_steps", "2",
               "--run-name", "hp", *FAST) == 0
    hp = yaml.safe_load((Path(last_line(capsys)) / "hparams.yaml").read_text())
    assert hp["data_source"] == "builtin" and hp["params/total"] == 200 and hp["optimizer.name"] == "adam"
    assert hp["model.cond"] == 1e5


def test_run_name_is_not_reused(tmp_path, capsys):
    argv = ["--task", "counterexample_seq", "--optimizer", "sgd", "--trainer.max_steps", "2", "--run-name", "x", *FAST]
    assert run(tmp_path, *argv) == 0
    assert run(tmp_path, *argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_correlation_callback_feeds_summary(tmp_path, capsys):
    try:
        from adashift_pl.callbacks import MomentCorrelation  # noqa: F401
    except ImportError:
        pytest.skip("MomentCorrelation not available yet")
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "adashift", "--trainer.max_steps", "15",
               "--trainer.log_every_n_steps", "5") == 0
    s = json.loads((Path(last_line(capsys)) / "summary.json").read_text())
    assert isinstance(s["correlation"], dict)


def test_plain_progress_lines_without_a_terminal(tmp_path, capsys):
    assert run(tmp_path, "--task", "counterexample_seq", "--optimizer", "adam", "--trainer.max_steps", "40",
               *FAST) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("training counterexample_seq with adam: 40 steps")
    steps = [line for line in out if line.startswith("step ")]
    assert steps and steps[-1].startswith("step 40/40") and "theta/value=" in steps[-1]
    assert out[-3].startswith("completed: counterexample_seq / adam  step 40")


def test_divergence_is_flagged(tmp_path, capsys):
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "sgd", "--optimizer.lr", "100",
               "--trainer.max_steps", "30", "--data.steps_per_epoch", "10", *FAST) == 0
    s = json.loads((Path(last_line(capsys)) / "summary.json").read_text())
    assert s["status"] == "completed" and s["diverged"] is True


@pytest.mark.parametrize("test_flag", ["true", "false"])
def test_completed_run_is_tested_on_the_test_split(tmp_path, capsys, test_flag):
    """Tasks with a test split are evaluated at the end; fit metrics stay in the summary too."""
    code = run(tmp_path, "--task", "mnist_logreg", "--optimizer", "adam", "--trainer.max_steps", "3",
               "--test", test_flag, *FAST)
    assert code == 0
    summary = json.loads((Path(last_line(capsys)) / "summary.json").read_text())
    metrics = summary["final_metrics"]
    assert "train/loss" in metrics
    assert ("test/acc" in metrics) == (test_flag == "true")


def test_exploded_but_finite_loss_is_flagged(tmp_path, capsys):
    """SGD at lr 0.4 on the quadratic: train/loss ~3.7e9 after 7 steps, still finite."""
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "sgd", "--optimizer.lr", "0.4",
               "--trainer.max_steps", "7", "--data.steps_per_epoch", "10", *FAST) == 0
    s = json.loads((Path(last_line(capsys)) / "summary.json").read_text())
    loss = s["final_metrics"]["train/loss"]
    assert isinstance(loss, float) and loss > 1e6  # finite: the old non-finite-only rule missed it
    assert s["diverged"] is True and "train/loss" in s["diverged_reason"]


def test_divergence_rule_and_its_state():
    from adashift_pl.run import DIVERGE_FACTOR, RunCallback

    def cb():
        return RunCallback(run_dir=Path("unused"), config={}, hparams={}, monitor=None, ckpt_key="k",
                           interactive=False)

    a = cb()
    a.check_losses({"train/loss": 2.3}, 1)
    a.check_losses({"train/loss": 2.3 * DIVERGE_FACTOR * 0.99, "val/loss": None}, 2)
    assert not a.diverged and a.diverged_reason is None  # below the factor
    b = cb()  # the reference survives resume: a fresh callback loaded from the state flags the jump
    b.load_state_dict(a.state_dict())
    b.check_losses({"train/loss": 2.3 * DIVERGE_FACTOR * 1.01}, 3)
    assert b.diverged and "step 3" in b.diverged_reason
    c = cb()  # a loss that starts at ~0 (the counterexamples) is judged against a floor of 1
    c.check_losses({"train/loss": 0.0}, 1)
    c.check_losses({"train/loss": -0.5 * DIVERGE_FACTOR}, 2)
    assert not c.diverged
    c.check_losses({"train/loss": -2.0 * DIVERGE_FACTOR}, 3)
    assert c.diverged
    from adashift_pl.run import is_loss_key

    assert all(map(is_loss_key, ("train/loss", "val/expected_loss", "train/loss_step", "train/loss_epoch")))
    assert not any(map(is_loss_key, ("val/acc", "train/grad_norm", "lossy/x")))
    d = cb()
    d.check_losses({"val/loss": float("nan")}, 4)
    assert d.diverged and "nan" in d.diverged_reason
    assert RunCallback.load_state_dict(cb(), {"best": None, "diverged": False, "wall_seconds": 1.0}) is None  # old ckpts


class _RaisesUserError(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from adashift_pl.errors import UserError

        raise UserError("data dir nowhere: allowed is an existing directory")


def _worker_error():
    from adashift_pl.errors import UserError

    loader = torch.utils.data.DataLoader(_RaisesUserError(), num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch re-raises: the worker's traceback
    return info.value


def test_user_error_from_a_dataloader_worker_prints_its_last_line(monkeypatch, capsys):
    err = _worker_error()
    assert train.user_message(err) == "data dir nowhere: allowed is an existing directory"

    def fail(argv):
        raise err

    monkeypatch.setattr(train, "_run", fail)
    assert train.main([]) == 2
    assert capsys.readouterr().err == "error: data dir nowhere: allowed is an existing directory\n"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from adashift_pl.files import atomic_write_text
    from adashift_pl.run import AtomicCheckpointIO

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, ckpt)
    with pytest.raises(RuntimeError, match="crash while writing"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "bad": Unpicklable()}, ckpt)
    assert torch.load(ckpt, weights_only=True) == {"step": 1}
    atomic_write_text(tmp_path / "summary.json", "{}\n")
    assert (tmp_path / "summary.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256", "summary.json"]


# ---- bad input found by a fault-injection pass: one line, exit 2, checked before training ----------
Q = ["--task", "quadratic", "--optimizer", "adam"]


@pytest.mark.parametrize("argv, needle", [
    # were tracebacks
    (["--task", "quadratic", "--optimizer", "adashift", "--optimizer.keep_num", "1000000000000"],
     "invalid optimizer.keep_num 1000000000000 for 'adashift': its history would need"),
    ([*Q, "--model.dim", "1000000"], "task quadratic does not fit in memory"),
    ([*Q, "--seed", "-1"], "invalid seed -1: allowed is an integer from 0 to 4294967295"),
    ([*Q, "--seed", "1180591620717411303424"], "invalid seed 1180591620717411303424"),
    ([*Q, "--trainer.val_check_interval", "0"], "invalid trainer.val_check_interval 0"),
    ([*Q, "--trainer.accelerator", "tpu"], "invalid trainer.accelerator 'tpu': not available on this machine"),
    ([*Q, "--run-name", "r" * 250], "invalid --run-name 'rrrr"),
    (["--task", "wgan_gp", "--optimizer", "adam", "--trainer.gradient_clip_val", "1"],
     "invalid trainer.gradient_clip_val 1 for task wgan_gp: it steps its optimizers itself"),
    # were accepted silently
    ([*Q, "--optimizer.lr", ".inf"], "invalid optimizer.lr inf for 'adam': allowed is a finite number"),
    ([*Q, "--optimizer.eps", ".inf"], "invalid optimizer.eps inf"),  # trained nothing, reported completed
    (["--task", "quadratic", "--optimizer", "adashift", "--optimizer.eps", ".nan"], "invalid optimizer.eps nan"),
    ([*Q, "--optimizer.weight_decay", ".inf"], "invalid optimizer.weight_decay inf"),
    ([*Q, "--optimizer.betas", "[0.9, .nan]"], "invalid optimizer.betas[1] nan"),
    ([*Q, "--model.init_scale", ".nan"], "invalid model.init_scale nan for task quadratic: allowed is a finite"),
    ([*Q, "--model.cond", ".inf"], "invalid model.cond inf for task quadratic"),
    ([*Q, "--trainer.log_every_n_steps", "-1"], "invalid trainer.log_every_n_steps -1"),
    ([*Q, "--trainer.gradient_clip_val", "-1"], "invalid trainer.gradient_clip_val -1"),
    ([*Q, "--log-dir", ""], "invalid --log-dir ''"),  # wrote into the working directory
    ([*Q, "--run-name", "a\nb"], "invalid --run-name 'a\\nb'"),  # broke "the last line is the run dir"
])
def test_bad_values_are_refused_up_front(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)  # whatever the old code wrote lands here
    assert run(tmp_path, *FAST, "--trainer.max_steps", "2", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.rglob("summary.json"))  # nothing ran


def test_thread_count_beyond_the_machine_is_refused(tmp_path):
    """--num-threads 100000 made libgomp abort the process: a subprocess, asserting on its exit status."""
    p = subprocess.run([sys.executable, "-m", "adashift_pl.train", *Q, "--num-threads", "100000",
                        "--trainer.max_steps", "2", "--log-dir", str(tmp_path / "logs"), *FAST],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "invalid num_threads 100000: allowed is an integer from 1 to" in p.stderr


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("task: quadratic\noptimizer:\n  adam: {lr: 1.0e-3}\n  adam: {lr: 1.0e-2}\n")
    assert run(tmp_path, "--config", str(cfg), "--optimizer", "adam", *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "found duplicate key 'adam'" in err[0] and "line 4" in err[0], err
    assert run(tmp_path, *Q, "--optimizer.betas", "{a: 1, a: 2}", *FAST) == 2  # a command-line value too
    assert "found duplicate key 'a'" in capsys.readouterr().err


def test_yaml_alias_bomb_gives_a_short_line(tmp_path, capsys):
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\ntask: quadratic\nmodel: {dim: *i}\n")  # 9**9 values, ~400 bytes
    assert run(tmp_path, "--config", str(cfg), "--optimizer", "adam", *FAST) == 2
    err = capsys.readouterr().err
    assert len(err) < 500 and "expands to more than 100,000 values" in err, err[:500]


def test_optimizer_aliases_get_their_optimizers_block(tmp_path, capsys):
    """--optimizer ADAM / max-adashift / adashift-temporal skipped the config's adam / adashift /
    non-adashift blocks (mnist_logreg ran with beta1 0.9 instead of 0 and n 10 instead of 1)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: quadratic\noptimizer:\n  adam: {betas: [0.0, 0.999]}\n"
                   "  adashift: {betas: [0.0, 0.999], keep_num: 1}\n  non-adashift: {keep_num: 2}\n")
    for name, expect in (("ADAM", {"betas": [0.0, 0.999]}), ("max-adashift", {"betas": [0.0, 0.999], "keep_num": 1}),
                         ("adashift-temporal", {"keep_num": 2})):
        assert run(tmp_path, "--config", str(cfg), "--optimizer", name, "--trainer.max_steps", "1", *FAST) == 0
        resolved = yaml.safe_load((Path(last_line(capsys)) / "config.yaml").read_text())["optimizer"]
        assert {k: resolved[k] for k in expect} == expect, name
    cfg.write_text("task: quadratic\noptimizer:\n  adashift: {keep_num: 1}\n  max-adashift: {keep_num: 2}\n")
    assert run(tmp_path, "--config", str(cfg), "--optimizer", "adashift", *FAST) == 2
    assert "2 optimizer blocks for 'adashift'" in capsys.readouterr().err


# ---- --resume loads nothing but our own checkpoints ----------------------------------------------------
def _quadratic_checkpoint(tmp_path, capsys) -> Path:
    assert run(tmp_path, *Q, "--trainer.max_steps", "2", "--run-name", "src", *FAST) == 0
    capsys.readouterr()
    return tmp_path / "logs" / "quadratic" / "adam" / "src" / "checkpoints" / "last.ckpt"


class _Payload:
    """Unpickling this runs exec(): the crafted checkpoint writes a file when fully unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_resume_of_a_crafted_pickle_runs_nothing(tmp_path, capsys):
    ckpt = torch.load(_quadratic_checkpoint(tmp_path, capsys), weights_only=True)
    marker = tmp_path / "payload-ran"
    ckpt["payload"] = _Payload(marker)
    bad = tmp_path / "crafted.ckpt"
    torch.save(ckpt, bad)
    assert run(tmp_path, "--resume", str(bad), *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one written by adashift_pl.train" in err[0] and "exec" in err[0], err
    assert not marker.exists()
    bad.write_bytes(b"not a checkpoint at all")
    assert run(tmp_path, "--resume", str(bad), *FAST) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_every_load_of_a_resumed_checkpoint_is_weights_only(tmp_path, capsys, monkeypatch):
    """read_checkpoint's load and Lightning's own in trainer.fit(ckpt_path=...) (its default defers to
    torch, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickle)."""
    ckpt = _quadratic_checkpoint(tmp_path, capsys)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert run(tmp_path, "--resume", str(ckpt), "--trainer.max_steps", "4", *FAST) == 0
    assert len(calls) >= 2 and all(c is True for c in calls), calls


def test_resume_of_another_tasks_checkpoint_is_refused(tmp_path, capsys):
    """A checkpoint whose weights are not this task's model was Lightning's "Unexpected key(s)" traceback."""
    ckpt = torch.load(_quadratic_checkpoint(tmp_path, capsys), weights_only=True)
    ckpt["adashift_pl"]["config"].update(task="counterexample_seq", model={})
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    assert run(tmp_path, "--resume", str(other), *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not hold weights of task counterexample_seq's model" in err[0], err
    assert "missing theta" in err[0] and "unexpected" in err[0]


# ---- what the user sees --------------------------------------------------------------------------------
def test_tensorboard_hparams_tab_shows_the_run_with_its_final_metrics(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert run(tmp_path, *Q, "--trainer.max_steps", "20", "--data.steps_per_epoch", "10", *FAST) == 0
    run_dir = Path(last_line(capsys))
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = EventAccumulator(str(run_dir))  # every events file of the run, as TensorBoard reads it
    acc.Reload()
    records = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in acc.PluginTagToContent("hparams").items()}
    scalars = {t: acc.Scalars(t)[-1] for t in acc.Tags()["scalars"]}
    start = records["_hparams_/session_start_info"].session_start_info.hparams
    assert start["optimizer.name"].string_value == "adam" and start["model.cond"].number_value == 1e5
    assert start["params/total"].number_value == 200 and start["data_source"].string_value == "builtin"
    columns = {m.name.tag for m in records["_hparams_/experiment"].experiment.metric_infos}
    assert {"hp/val/loss", "hp/train/loss", "hp/best/val/loss", "hp/diverged"} <= columns
    for column in columns:  # each column has its value, the summary's
        assert column in scalars and scalars[column].step == 20, column
    assert scalars["hp/val/loss"].value == pytest.approx(summary["final_metrics"]["val/loss"])
    assert scalars["hp/best/val/loss"].value == pytest.approx(summary["best_metric"]["value"])
    assert scalars["hp/diverged"].value == 0.0


def test_a_diverged_run_says_diverged_on_the_terminal(tmp_path, capsys):
    assert run(tmp_path, "--task", "quadratic", "--optimizer", "sgd", "--optimizer.lr", "100",
               "--trainer.max_steps", "30", "--data.steps_per_epoch", "10", *FAST) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary_line = next(line for line in out if line.startswith(("completed:", "diverged:")))
    assert summary_line.startswith("diverged: quadratic / sgd  step 30") and "train/loss" in summary_line
    s = json.loads((Path(out[-1]) / "summary.json").read_text())
    assert s["status"] == "completed" and s["diverged"]  # the summary's contract is unchanged


def test_list_imports_no_task_and_no_lightning(tmp_path):
    """--list took 16-22 s importing every task (lightning, torchvision); it now reads their sources."""
    code = ("import sys\nfrom adashift_pl import train\nassert train.main(['--list']) == 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'torchvision', 'torchmetrics', 'matplotlib', 'tensorboard') or m.startswith('adashift_pl.tasks.'))\n"
            "print('HEAVY', heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "HEAVY []"
    from adashift_pl.tasks import TASKS, get_task

    for name in TASKS:  # and every description is there
        assert f"  {name:24s} {get_task(name).DESCRIPTION}" in p.stdout


def test_lightning_noise_is_silenced_and_the_device_line_kept(tmp_path, fake_srun):
    """Tips, the TPU line, Lightning's internal deprecation, the srun hint and the checkpoint-directory
    warning on resume are not the user's business; a fresh process, as a user sees it."""
    logs = str(tmp_path / "logs")
    code = ("from adashift_pl import train\n"
            f"args = ['--log-dir', {logs!r}, '--run-name', 'r', '--correlation', 'false']\n"
            "assert train.main(['--task', 'quadratic', '--optimizer', 'adam', '--trainer.max_steps', '12', "
            "'--data.steps_per_epoch', '5', *args]) == 0\n"
            f"assert train.main(['--resume', {logs + '/quadratic/adam/r/checkpoints/last.ckpt'!r}, "
            "'--trainer.max_steps', '20', '--correlation', 'false']) == 0\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "PATH": f"{tmp_path}:{os.environ.get('PATH', '')}"})
    assert p.returncode == 0, p.stderr[-3000:]
    for noise in ("Tip:", "litlogger", "TPU available", "LeafSpec", "`srun` command", "exists and is not empty",
                  "smaller than the logging interval"):
        assert noise not in p.stderr, (noise, p.stderr)
    assert "GPU available:" in p.stderr  # the device line stays


@pytest.fixture
def fake_srun(tmp_path):
    """An `srun` on PATH, so Lightning's hint about it would print."""
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    return srun
