"""The training command: parsing, config layering, user errors, outputs of a run."""

from __future__ import annotations

import json
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
    assert not any("Traceback" in line for line in err)


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
