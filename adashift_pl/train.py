"""`python -m adashift_pl.train` -- the one entry point for training.

    python -m adashift_pl.train --task counterexample --optimizer adashift
    python -m adashift_pl.train --task quadratic --optimizer adam --optimizer.lr 1e-3 --trainer.max_steps 500
    python -m adashift_pl.train --task quadratic --optimizer adam --resume last
    python -m adashift_pl.train --list

Flow: parse the command line -> load configs/<task>.yaml (or --config) -> merge the
overrides (code defaults < YAML < command line, left to right) -> check the
optimizer section by building it once on a dummy parameter -> build the task's
LightningModule and DataModule -> lightning.Trainer (TensorBoard logger, checkpoints,
the MomentCorrelation callback) -> fit -> summary.json in the run directory, whose path
is the last line printed.

User errors exit with code 2 and one line on stderr (no traceback). A completed run
exits 0; a run stopped by SIGINT/SIGTERM/SIGHUP exits 130/143/129 after saving
checkpoints/last.ckpt and a summary.json with status "interrupted" (adashift_pl.stopping);
a full or read-only disk or a lost DDP rank exits 1 with one line (status "failed").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from adashift_pl import checks
from adashift_pl.config import (
    flatten,
    load_yaml,
    merge,
    overrides_to_dict,
    plain,
    split_overrides,
    task_config_path,
)
from adashift_pl.errors import UserError, one_line
from adashift_pl.files import checkpoint_problem
from adashift_pl.stopping import STATE, RunFailed, Stopped, signal_name, stop_signals

# Code defaults: the lowest layer of the config.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_threads": None,  # torch.set_num_threads for this run (null: torch's default)
    "model": {},
    "data": {},
    "trainer": {"log_every_n_steps": 50},
    "optimizer": {},
    # Checkpoints besides last.ckpt: the `keep` latest periodic ones (every epoch, or every
    # N optimizer steps), and the best one by the task's MONITOR when it has one.
    "checkpoint": {"every_n_train_steps": None, "every_n_epochs": 1, "keep": 3},
}
TOP_LEVEL_KEYS = {"task", "seed", "num_threads", "model", "data", "trainer", "optimizer", "correlation", "checkpoint"}
# Sections that define *what* is trained: changing one of them on --resume would be silently
# overwritten by the checkpoint's state (optimizer param_groups, weights), so it is refused.
HPARAM_SECTIONS = ("seed", "model", "data", "optimizer")
# data keys that say where/how to load, not what is trained: free to change on --resume.
RESUME_FREE_DATA_KEYS = {"dir", "download", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
RUN_NAME_ENV = "ADASHIFT_PL_RUN_NAME"  # lets DDP worker processes agree on rank 0's run directory
CKPT_KEY = "adashift_pl"  # our entry in every checkpoint: the resolved config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (via UserError), no usage block
        raise UserError(f"{message} (see --help)")


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: allowed are true, false")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m adashift_pl.train",
        allow_abbrev=False,
        description="Train a task of the AdaShift paper with one optimizer. Dotted overrides "
        "--model.KEY V, --data.KEY V, --trainer.KEY V (any lightning.Trainer argument), "
        "--optimizer.KEY V, --correlation.KEY V, --checkpoint.KEY V take YAML values (1e-3, true, [0.9,0.999]).",
    )
    p.add_argument("--task", help="task name (see --list)")
    p.add_argument("--optimizer", help="optimizer name; picks that block of the config's optimizer: section")
    p.add_argument("--config", help="YAML config (default: configs/<task>.yaml)")
    p.add_argument("--seed", type=int, help="seed (default: the config's, else 0)")
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: the config's num_threads, else torch's)")
    p.add_argument("--resume", metavar="last|PATH", help="continue the latest run of task/optimizer, or a checkpoint")
    p.add_argument("--log-dir", default="logs", help="root of the run directories (default: logs)")
    p.add_argument("--run-name", help="run directory name (default: version_N)")
    p.add_argument("--correlation", type=_bool, default=True, metavar="true|false",
                   help="attach the MomentCorrelation callback (default: true)")
    p.add_argument("--test", type=_bool, default=True, metavar="true|false",
                   help="after a completed fit, evaluate the final weights on the task's test split (default: true)")
    p.add_argument("--list", action="store_true", help="list tasks, optimizers and their defaults, then exit")
    return p


def user_message(e: BaseException) -> str:
    """The one line to print for a UserError.

    A UserError raised inside a DataLoader worker reaches us re-raised by torch with the
    worker's whole traceback as its message ("Caught UserError in DataLoader worker process 0.
    Original Traceback (most recent call last): ... adashift_pl.errors.UserError: MESSAGE"):
    only its last line, without the exception's name, is meant for the user.
    """
    text = str(e)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            text = re.sub(r"^\s*(?:[\w.]+\.)?UserError:\s*", "", lines[-1])
    return one_line(text)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 failed, 2 user error, 130/143/129 interrupted
    by SIGINT/SIGTERM/SIGHUP)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with stop_signals():
        try:
            return _run(argv)
        except UserError as e:
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
            return 2
        except RunFailed as e:  # summary.json (where it could be written) says the same
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        except (KeyboardInterrupt, Stopped, Exception) as e:  # before the Trainer ran: nothing to save
            if isinstance(e, Stopped):
                signum = e.signum
            elif isinstance(e, KeyboardInterrupt):
                signum = signal.SIGINT
            elif STATE.signum is not None:
                # The signal's exception came inside code that turned it into another error (measured:
                # numpy's C extension mid-import gives "ImportError: cannot load module more than once").
                signum = STATE.signum
            else:
                raise
            print(f"stopped by {signal_name(signum)} during start-up: nothing new was trained or saved",
                  file=sys.stderr, flush=True)
            return 128 + signum


# ----------------------------------------------------------------------------------------------
# --list
# ----------------------------------------------------------------------------------------------
def _list() -> int:
    # Reads each task's DESCRIPTION from its source: importing the tasks (lightning, torchvision)
    # made --list take 15-20 s; only the optimizer table needs torch.
    from adashift_pl.optim import list_optimizers
    from adashift_pl.tasks import TASKS, describe

    print("tasks:")
    for name in TASKS:
        print(f"  {name:24s} {describe(name)}")
        try:
            path = task_config_path(name)
            blocks = ", ".join(load_yaml(path).get("optimizer") or {}) or "(none)"
            print(f"  {'':24s} {path}: optimizer blocks {blocks}")
        except UserError as e:  # a missing or broken config is listed, loudly
            print(f"  {'':24s} {one_line(e)}")
    print("optimizers (factory defaults; a config's optimizer: block overrides them):")
    for name, defaults in list_optimizers().items():
        print(f"  {name:24s} {', '.join(f'{k}={v}' for k, v in defaults.items())}")
    return 0


# ----------------------------------------------------------------------------------------------
# config resolution
# ----------------------------------------------------------------------------------------------
def resolve_optimizer(name: str, block: dict | None, cli: dict) -> dict:
    """{"name": X, **factory defaults, **config block X, **--optimizer.KEY overrides}, checked.

    The section is validated by building the optimizer once on a dummy parameter, so a bad
    value fails before any data is touched.
    """
    import torch

    from adashift_pl.optim import ALIASES, OPTIMIZERS, build_optimizer

    key = canonical_optimizer(name)
    if key not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}: allowed are {', '.join(sorted([*OPTIMIZERS, *ALIASES]))}")
    if block is not None and not isinstance(block, dict):
        raise UserError(f"config optimizer.{name} must be a mapping of hyper-parameters, got {block!r}")
    hp = merge(plain(dict(OPTIMIZERS[key].defaults)), merge(block or {}, cli))
    hp.pop("name", None)
    _check_optimizer_types(name, OPTIMIZERS[key], hp)
    checks.check_finite("optimizer", hp, f" for {name!r}")
    try:
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], **hp)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid optimizer setting for {name!r}: {one_line(e)}") from None
    return {"name": name, **hp}


def canonical_optimizer(name: str) -> str:
    """The factory's own name for `name`: ADAM -> adam, max-adashift -> adashift (unknown names lower-cased)."""
    from adashift_pl.optim import ALIASES

    return ALIASES.get(name.lower(), name.lower())


def optimizer_block(blocks: dict, name: str, where: str) -> dict | None:
    """The config's block for optimizer `name`, matched by canonical name, so `--optimizer ADAM`,
    `max-adashift` and `adashift-temporal` get the adam, adashift and non-adashift blocks."""
    key = canonical_optimizer(name)
    found = [b for b in blocks if canonical_optimizer(str(b)) == key]
    if len(found) > 1:
        raise UserError(f"{where} has {len(found)} optimizer blocks for {key!r} ({', '.join(map(str, found))}): "
                        f"allowed is one block per optimizer")
    return blocks[found[0]] if found else None


def _check_optimizer_types(name: str, info, hp: dict) -> None:
    """A value whose type does not match the constructor default's (`--optimizer.lr abc`) -> UserError
    naming the key; torch.optim's own classes would fail on it with a bare comparison TypeError."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    params = inspect.signature(info.cls.__init__).parameters
    for k, v in hp.items():
        if v is None and k in params and "None" in (_annotation_words(params[k]) or ()):
            continue  # null where the constructor allows None (ADOPT's clip_exp: no clip)
        default = info.defaults.get(k, params[k].default if k in params else None)
        if isinstance(default, bool):
            ok, what = isinstance(v, bool), "true or false"
        elif number(default):
            ok, what = number(v), "a number"
        elif isinstance(default, tuple) and all(number(d) for d in default):
            ok = isinstance(v, (list, tuple)) and len(v) == len(default) and all(number(x) for x in v)
            what = f"a list of {len(default)} numbers, e.g. {list(default)}"
        else:
            continue
        if not ok:
            raise UserError(f"invalid optimizer.{k} {v!r} for {name!r}: allowed is {what}")


def _trainer_keys() -> set[str]:
    import lightning

    return {k for k in inspect.signature(lightning.Trainer.__init__).parameters if k != "self"}


# Keys of `trainer:` that train.py sets itself.
_OWNED_TRAINER_KEYS = {"logger", "callbacks", "plugins", "default_root_dir"}


def check_trainer_section(trainer: dict) -> None:
    allowed = _trainer_keys() - _OWNED_TRAINER_KEYS
    unknown = sorted(set(trainer) - allowed)
    if unknown:
        raise UserError(f"unknown trainer key(s) {', '.join(unknown)}: allowed are lightning.Trainer arguments "
                        f"({', '.join(sorted(allowed))})")
    import lightning

    params = inspect.signature(lightning.Trainer.__init__).parameters
    _check_value_types("trainer", trainer, {k: [p] for k, p in params.items()}, "")
    checks.check_trainer(trainer)


def check_checkpoint_section(ck: dict) -> None:
    """checkpoint.keep: an integer >= -1 (-1 keeps all); every_n_train_steps: null or >= 1;
    every_n_epochs: null or >= 0 (0: none by epoch)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key, low, nullable, what in (("keep", -1, False, "an integer >= -1 (-1 keeps every periodic checkpoint)"),
                                     ("every_n_train_steps", 1, True, "null or an integer >= 1"),
                                     ("every_n_epochs", 0, True, "null or an integer >= 0")):
        v = ck.get(key)
        if not ((v is None and nullable) or (is_int(v) and v >= low)):
            raise UserError(f"invalid checkpoint.{key} {v!r}: allowed is {what}")


def check_strategy(trainer: dict, optimizer: dict) -> None:
    """Refuse sharding strategies when phi reduces over a block (it would reduce over a shard)."""
    strategy = str(trainer.get("strategy", "auto")).lower()
    if "fsdp" not in strategy and "deepspeed" not in strategy:
        return
    import torch

    from adashift_pl.optim import build_optimizer

    opt = build_optimizer(optimizer["name"], [torch.nn.Parameter(torch.zeros(2))],
                          **{k: v for k, v in optimizer.items() if k != "name"})
    spatial_op = opt.param_groups[0].get("spatial_op", "none")
    if spatial_op != "none":
        raise UserError(
            f"strategy {trainer['strategy']!r} shards parameters, so {optimizer['name']}'s spatial_op="
            f"{spatial_op!r} would reduce over a shard instead of a whole tensor: use strategy ddp, "
            f"or an optimizer with spatial_op none (non-adashift, adam, amsgrad, nadam, sgd)")


def _unexpected_kwarg(e: TypeError) -> str | None:
    m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
    return m.group(1) if m else None


def _init_params(task_module, base) -> dict[str, list[inspect.Parameter]]:
    """Constructor parameters of the task module's LightningModule/DataModule classes, by name."""
    params: dict[str, list[inspect.Parameter]] = {}
    for obj in vars(task_module).values():
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base:
            for k, p in inspect.signature(obj.__init__).parameters.items():
                if k not in ("self", "optimizer", "seed") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    params.setdefault(k, []).append(p)
    return params


def _init_keys(task_module, base) -> list[str]:
    """Constructor arguments of the task module's LightningModule/DataModule classes (for error messages)."""
    return sorted(_init_params(task_module, base))


# Annotation words the type check understands; an annotation with any other word is not checked.
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null"}


def _value_fits(value, words: set[str]) -> bool:
    if value is None:
        return "None" in words
    if isinstance(value, bool):
        return "bool" in words
    if isinstance(value, int):
        return "int" in words or "float" in words
    if isinstance(value, float):  # 1e4 is a float to YAML: fine where an integer is meant
        return "float" in words or ("int" in words and value.is_integer())
    if isinstance(value, str):
        return "str" in words
    return False


def _annotation_words(p: inspect.Parameter) -> set[str] | None:
    """{'int', 'None'} for `int | None` / Optional[int]; None when the annotation is not judged
    (missing, or naming any type besides int, float, bool, str and None)."""
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return None
    text = ann if isinstance(ann, str) else inspect.formatannotation(ann)
    words = set(re.findall(r"\w+", text.replace("NoneType", "None")))
    if "Optional" in words:
        words.add("None")
    words -= {"Optional", "Union", "typing"}
    return words if words and words <= set(_TYPE_WORDS) else None


def _describe(words: set[str]) -> str:
    shown = [w for w in _TYPE_WORDS if w in words and not (w == "int" and "float" in words)]
    return " or ".join(_TYPE_WORDS[w] for w in shown)


def _check_value_types(section: str, values: dict, params: dict[str, list[inspect.Parameter]], where: str) -> None:
    """A value that fits none of the annotations its key has -> UserError naming key, value and allowed.
    A number where only a string (or null) is allowed is taken as that string: YAML reads a directory
    named 2024 as an integer."""
    for key, value in list(values.items()):
        allowed = []
        for p in params.get(key, []):
            words = _annotation_words(p)
            if words is None or _value_fits(value, words):
                allowed = None  # not judged, or fits
                break
            if "str" in words and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = str(value)
                allowed = None
                break
            allowed.append(_describe(words))
        if allowed:
            raise UserError(f"invalid {section}.{key} {value!r}{where}: allowed is {allowed[0]}")


def check_task_values(task_name: str, task_module, cfg: dict) -> None:
    """A model/data value of the wrong type (`--model.cond abc`) -> UserError, judged by the
    constructor's annotation (int, float, bool, str, None and unions of them; others are not checked)."""
    import lightning

    for section, base in (("model", lightning.LightningModule), ("data", lightning.LightningDataModule)):
        _check_value_types(section, cfg[section], _init_params(task_module, base), f" for task {task_name}")
        checks.check_finite(section, cfg[section], f" for task {task_name}")


def build_task(task_name: str, task_module, cfg: dict):
    import lightning
    import torch

    try:
        return task_module.build(model=dict(cfg["model"]), data=dict(cfg["data"]),
                                 optimizer=dict(cfg["optimizer"]), seed=int(cfg["seed"]))
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise _too_big(task_name, cfg, e) from None
    except RuntimeError as e:  # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory"
        if "allocate" not in str(e):
            raise
        raise _too_big(task_name, cfg, e) from None
    except TypeError as e:
        key = _unexpected_kwarg(e)
        if key is None:
            raise
        # The same key may be valid in one section and not in the other (quadratic's batch_size
        # is a model key): blame the section where it is not a constructor argument.
        model_keys = _init_keys(task_module, lightning.LightningModule)
        data_keys = _init_keys(task_module, lightning.LightningDataModule)
        if key in cfg["data"] and key not in data_keys:
            section, allowed = "data", data_keys
        elif key in cfg["model"] and key not in model_keys:
            section, allowed = "model", model_keys
        else:
            raise
        raise UserError(f"unknown {section} key {key!r} for task {task_name}: allowed are "
                        f"{', '.join(allowed) or '(none)'}") from None


def _too_big(task_name: str, cfg: dict, e: BaseException) -> UserError:
    detail = re.search(r"tried to allocate [^.]*", str(e))
    return UserError(f"task {task_name} does not fit in memory with model {plain(cfg['model'])} and data "
                     f"{plain(cfg['data'])} ({detail.group(0) if detail else one_line(e) or type(e).__name__}): "
                     f"allowed are smaller model/data sizes")


def next_version(root: Path) -> str:
    """version_N with N one more than the largest existing (Lightning's own numbering)."""
    nums = [int(m.group(1)) for d in (root.iterdir() if root.is_dir() else [])
            if d.is_dir() and (m := re.fullmatch(r"version_(\d+)", d.name))]
    return f"version_{max(nums) + 1 if nums else 0}"


def claim_run_dir(root: Path, run_name: str | None) -> tuple[Path, bool]:
    """Make the run directory this run's alone: create its checkpoints/ with an exclusive mkdir
    (atomic), so two runs started at the same moment never share one. version_N moves on to the
    next N when another run got there first; a --run-name that holds a run is a UserError.
    Returns the run directory and whether it was created here (see release_run_dir)."""
    while True:
        run_dir = root / (run_name or next_version(root))
        try:
            try:
                run_dir.mkdir()
                created = True
            except FileExistsError:
                created = False
            (run_dir / "checkpoints").mkdir()
            return run_dir, created
        except FileExistsError:
            if run_name:
                raise UserError(f"run directory {run_dir} already holds a run: choose another --run-name, "
                                f"or continue it with --resume {run_dir / 'checkpoints' / 'last.ckpt'}") from None
        except OSError as e:
            raise UserError(f"cannot create the run directory {run_dir} ({one_line(e)}): allowed is a "
                            f"writable --log-dir and a plain --run-name") from None


def release_run_dir(run_dir: Path, created: bool) -> None:
    """Undo claim_run_dir when the command stopped before the run wrote anything there."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        untouched = ckpt_dir.is_dir() and not any(ckpt_dir.iterdir())
        if untouched and [p.name for p in run_dir.iterdir()] == ["checkpoints"]:
            ckpt_dir.rmdir()
            if created:
                run_dir.rmdir()
    except OSError:
        pass


def _rank_from_env() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def find_last_checkpoint(log_dir: Path, task: str, optimizer: str) -> Path:
    root = log_dir / task / optimizer
    candidates = [d / "checkpoints" / "last.ckpt" for d in (root.iterdir() if root.is_dir() else [])]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise UserError(f"--resume last: no run with checkpoints/last.ckpt under {root}; "
                        f"start a run without --resume, or pass a checkpoint path")
    return max(candidates, key=lambda c: c.stat().st_mtime)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the resolved config, {weight name: shape}) of a checkpoint written by this command.

    Loaded with torch's weights-only unpickler and nothing else: our checkpoints hold only
    tensors, numbers, strings, lists and dicts (Lightning's, the callbacks', ours), so a file that
    needs any other Python object is not one of ours and is refused before anything in it runs
    (a pickle can run arbitrary code when loaded). trainer.fit loads it the same way.
    """
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not found:  # not a pickle at all; torch's text wraps the reason in advice about weights_only
            reason = (str(e).partition("WeightsUnpickler error:")[2] or str(e)).partition("Check the documentation")[0]
            raise UserError(f"cannot read checkpoint {path}: not a checkpoint ({one_line(reason)[:200]})") from None
        what = found.group(1)
        raise UserError(f"checkpoint {path} is not one written by adashift_pl.train: it holds Python objects "
                        f"that only a full unpickler would load ({one_line(what)}), which could run code, so it "
                        f"is not loaded; allowed are this command's own checkpoints") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} was not written by adashift_pl.train (no {CKPT_KEY!r} entry): "
                        f"its hyper-parameters cannot be checked, so it cannot be resumed here")
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    return meta["config"], shapes


def hparam_differences(saved: dict, new: dict) -> list[str]:
    diffs = []
    for section in HPARAM_SECTIONS:
        a = flatten({section: saved.get(section)}) if isinstance(saved.get(section), dict) else {section: saved.get(section)}
        b = flatten({section: new.get(section)}) if isinstance(new.get(section), dict) else {section: new.get(section)}
        for k in sorted(set(a) | set(b)):
            if section == "data" and k.split(".", 1)[-1] in RESUME_FREE_DATA_KEYS:
                continue
            if plain(a.get(k)) != plain(b.get(k)):
                diffs.append(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}")
    return diffs


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def check(argv: list[str]) -> dict:
    """The resolved config of a train command line, after every check train makes before it creates
    the run directory (UserError otherwise), plus the model/data keys against the task's constructors
    and the correlation knobs. Nothing is created or trained: `compare` runs it on each combination of
    a sweep before it launches any."""
    return _run(list(argv), check_only=True)


def check_task_keys(task_name: str, task_module, cfg: dict) -> None:
    """A model/data key no constructor of the task takes -> UserError (a run finds it only in build).
    Not judged for a section whose constructors take **kwargs."""
    import lightning

    for section, base in (("model", lightning.LightningModule), ("data", lightning.LightningDataModule)):
        classes = [c for c in vars(task_module).values() if inspect.isclass(c) and issubclass(c, base) and c is not base]
        if any(p.kind is p.VAR_KEYWORD for c in classes for p in inspect.signature(c.__init__).parameters.values()):
            continue
        allowed = _init_keys(task_module, base)
        unknown = sorted(set(cfg[section]) - set(allowed))
        if unknown:
            raise UserError(f"unknown {section} key(s) {', '.join(unknown)} for task {task_name}: allowed are "
                            f"{', '.join(allowed) or '(none)'}")


def _run(argv: list[str], check_only: bool = False):
    rest, dotted = split_overrides(argv)
    args = make_parser().parse_args(rest)
    if args.list:
        return _list()
    cli = overrides_to_dict(dotted)

    from adashift_pl.tasks import get_task

    checks.check_log_dir(args.log_dir)
    checks.check_run_name(args.run_name)
    log_dir = Path(args.log_dir)
    resume_ckpt: Path | None = None
    saved_cfg: dict | None = None
    checkpoint_shapes: dict | None = None
    if args.resume is not None:
        if args.resume == "last":
            if not args.task or not args.optimizer:
                raise UserError("--resume last needs --task and --optimizer (to find logs/<task>/<optimizer>/)")
            resume_ckpt = find_last_checkpoint(log_dir, args.task, args.optimizer)
        else:
            resume_ckpt = Path(args.resume)
            if not resume_ckpt.is_file():
                raise UserError(f"--resume {args.resume}: no such checkpoint file (allowed: last, or a .ckpt path)")
        problem = checkpoint_problem(resume_ckpt)  # its bytes changed since it was saved (digest file)
        if problem:
            raise UserError(f"{problem}: resume from another checkpoint in {resume_ckpt.parent} (--resume PATH)")
        saved_cfg, checkpoint_shapes = read_checkpoint(resume_ckpt)
        saved_names = {"task": saved_cfg.get("task"), "optimizer": (saved_cfg.get("optimizer") or {}).get("name")}
        name_of = {"task": str, "optimizer": canonical_optimizer}  # max-adashift resumes an adashift run
        for flag, value in (("task", args.task), ("optimizer", args.optimizer)):
            if value is not None and name_of[flag](value) != name_of[flag](str(saved_names[flag])):
                raise UserError(f"--{flag} {value} differs from the checkpoint's {saved_names[flag]!r} "
                                f"({resume_ckpt}): resume with the same {flag}, or start a new run")
        args.task, args.optimizer = saved_cfg["task"], saved_cfg["optimizer"]["name"]

    # ---- config layers: code defaults < (checkpoint config on resume) < YAML < command line
    file_cfg: dict = {}
    if args.config:
        file_cfg = load_yaml(args.config)
    elif saved_cfg is None and args.task:
        get_task(args.task)  # an unknown name is refused as such, before its config is looked for
        file_cfg = load_yaml(task_config_path(args.task))
    task_name = args.task or file_cfg.get("task")
    if not task_name:
        raise UserError("no task given: use --task NAME (see --list)")
    if file_cfg.get("task") not in (None, task_name):
        raise UserError(f"config {args.config} is for task {file_cfg.get('task')!r}, not {task_name!r}")
    if not args.optimizer:
        raise UserError("no optimizer given: use --optimizer NAME (see --list)")
    task_module = get_task(task_name)

    blocks = merge(file_cfg.get("optimizer") or {}, {})
    if not isinstance(blocks, dict):
        raise UserError("the config's optimizer: section must map optimizer names to hyper-parameters")
    unknown = sorted(set(file_cfg) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"unknown top-level key(s) {', '.join(unknown)} in {args.config or 'the config'}: "
                        f"allowed are {', '.join(sorted(TOP_LEVEL_KEYS))}")
    for section in ("model", "data", "trainer", "checkpoint"):
        if file_cfg.get(section) is not None and not isinstance(file_cfg[section], dict):
            raise UserError(f"the config's {section}: section must be a mapping, got {file_cfg[section]!r}")
    if saved_cfg is not None:
        base = {k: v for k, v in saved_cfg.items() if k not in ("optimizer",)}
        opt_base = {k: v for k, v in saved_cfg["optimizer"].items() if k != "name"}
    else:
        base, opt_base = DEFAULTS, {}
    cfg = merge(base, {k: v for k, v in file_cfg.items() if k not in ("optimizer", "task")})
    corr_file = file_cfg.get("correlation", saved_cfg.get("correlation") if saved_cfg else None)
    cfg = merge(cfg, {k: v for k, v in cli.items() if k != "optimizer"})
    cfg["task"] = task_name
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.num_threads is not None:
        cfg["num_threads"] = args.num_threads
    checks.check_num_threads(cfg.get("num_threads"))
    checks.check_seed(cfg.get("seed"))
    block = optimizer_block(blocks, args.optimizer, args.config or "the config")
    opt_block = merge(opt_base, block or {}) if saved_cfg is None or block is not None else opt_base
    cfg["optimizer"] = resolve_optimizer(args.optimizer, opt_block, cli.get("optimizer", {}))
    corr_knobs = merge(corr_file or {}, cli.get("correlation", {})) if (corr_file or cli.get("correlation")) else None
    cfg["correlation"] = corr_knobs
    check_trainer_section(cfg["trainer"])
    check_task_values(task_name, task_module, cfg)  # before the resume comparison: it may turn 2024 into "2024"
    bad = sorted(set(cfg["checkpoint"]) - set(DEFAULTS["checkpoint"]))
    if bad:
        raise UserError(f"unknown checkpoint key(s) {', '.join(bad)}: allowed are "
                        f"{', '.join(DEFAULTS['checkpoint'])}")
    check_checkpoint_section(cfg["checkpoint"])
    check_strategy(cfg["trainer"], cfg["optimizer"])
    if saved_cfg is not None:
        diffs = hparam_differences(saved_cfg, cfg)
        if diffs:
            raise UserError(
                f"cannot resume {resume_ckpt} with changed hyper-parameters ({'; '.join(diffs)}): the checkpoint's "
                f"state would silently replace them. Resume without those flags (trainer settings such as "
                f"--trainer.max_steps may change), or start a new run without --resume")
    if check_only:
        check_task_keys(task_name, task_module, cfg)
        if args.correlation:
            make_correlation_callback(cfg.get("correlation"))
        return cfg

    # ---- run directory (rank 0 decides; DDP workers inherit the name through the environment)
    optimizer_name = args.optimizer
    if resume_ckpt is not None and resume_ckpt.parent.name == "checkpoints" \
            and (resume_ckpt.parent.parent / "config.yaml").is_file():
        run_dir = resume_ckpt.parent.parent
        log_dir = run_dir.parent.parent.parent
        run_name = run_dir.name
        new_dir = False
        if args.run_name not in (None, run_name):
            raise UserError(f"--run-name {args.run_name} differs from the resumed run {run_dir}: a resumed run "
                            f"continues in its own directory; drop --run-name")
    else:
        inherited = os.environ.get(RUN_NAME_ENV) if _rank_from_env() > 0 else None  # a DDP worker
        run_name = args.run_name or inherited or next_version(log_dir / task_name / optimizer_name)
        run_dir = log_dir / task_name / optimizer_name / run_name
        new_dir = True
    try:  # a --log-dir that is a file or not writable: say so now, not in a traceback from the logger
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {run_dir.parent}")
    except OSError as e:
        raise UserError(f"cannot create the run directory under {log_dir} ({one_line(e)}): allowed is a "
                        f"writable directory for --log-dir") from None
    claimed = None
    if new_dir and _rank_from_env() == 0:  # rank 0 claims; other DDP ranks take its name (see RUN_NAME_ENV)
        run_dir, claimed = claim_run_dir(run_dir.parent, args.run_name)
        run_name = run_dir.name

    # Lightning's DDP launcher re-runs this command for ranks 1..N-1 with our environment: they
    # must use rank 0's run directory even if rank 0 creates it before they look.
    previous = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = run_name
    try:
        return _fit(args, argv, cfg, task_module, run_dir, run_name, log_dir, resume_ckpt, checkpoint_shapes)
    except BaseException:
        if claimed is not None:
            release_run_dir(run_dir, created=claimed)
        raise
    finally:
        if previous is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = previous


def _fit(args, argv, cfg, task_module, run_dir: Path, run_name: str, log_dir: Path, resume_ckpt: Path | None,
         checkpoint_shapes: dict | None) -> int:
    """_fit_inner with the config's torch thread count, restored afterwards."""
    import torch

    threads_before = torch.get_num_threads()
    if cfg.get("num_threads"):
        # Tiny tensors (the data-free tasks): intra-op threads only add synchronisation, and on a
        # busy machine a 64x10 matmul with 2 threads was measured 60x slower than with 1.
        torch.set_num_threads(cfg["num_threads"])
    try:
        return _fit_inner(args, argv, cfg, task_module, run_dir, run_name, log_dir, resume_ckpt, checkpoint_shapes)
    finally:
        torch.set_num_threads(threads_before)


def _fit_inner(args, argv, cfg, task_module, run_dir, run_name, log_dir, resume_ckpt, checkpoint_shapes) -> int:
    import lightning
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from adashift_pl.data.resumable import UnfinishedEpoch
    from adashift_pl.run import AtomicCheckpointIO, RunCallback, StepTensorBoardLogger, git_commit

    quiet_lightning()
    task_name, optimizer_name = cfg["task"], cfg["optimizer"]["name"]
    lightning.seed_everything(cfg["seed"], workers=True, verbose=False)
    module, datamodule = build_task(task_name, task_module, cfg)
    checks.check_with_model(cfg, module, checkpoint_shapes, resume_ckpt)
    data_source = getattr(datamodule, "data_source", None)
    n_params = sum(p.numel() for p in module.parameters())
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # train.py logs one complete hparams set itself (resolved config + counts + data source).
    module._log_hyperparams = False
    datamodule._log_hyperparams = False

    monitor = getattr(task_module, "MONITOR", None)
    ck = cfg["checkpoint"]
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list = []
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir, filename="periodic-{epoch}-{step}", monitor="step", mode="max",
        save_top_k=int(ck.get("keep", 3)), save_last=True,
        every_n_train_steps=ck.get("every_n_train_steps"),
        every_n_epochs=None if ck.get("every_n_train_steps") else ck.get("every_n_epochs", 1),
        auto_insert_metric_name=True,
    )
    callbacks.append(periodic)
    best = None
    if monitor:
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}-{step}", monitor=monitor[0],
                               mode=monitor[1], save_top_k=1)
        callbacks.append(best)
    callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(UnfinishedEpoch())  # a stop mid-epoch is resumed mid-epoch (exact resume)
    corr_cb = None
    if args.correlation:
        corr_cb = make_correlation_callback(cfg.get("correlation"))
        if corr_cb is not None:
            callbacks.append(corr_cb)
    hparams = tensorboard_hparams({
        **flatten({k: cfg[k] for k in ("seed", "num_threads", "model", "data", "optimizer", "trainer")}),
        "task": task_name, "run_name": run_name, "data_source": data_source,
        "params/total": n_params, "params/trainable": n_trainable,
    })
    trainer_kwargs = dict(cfg["trainer"])
    # Progress: Lightning's bar in a terminal, plain periodic lines (RunCallback) otherwise.
    trainer_kwargs.setdefault("enable_progress_bar", sys.stdout.isatty())
    trainer_kwargs.setdefault("enable_model_summary", sys.stdout.isatty())
    run_cb = RunCallback(run_dir=run_dir, config=cfg, hparams=hparams, monitor=monitor,
                         ckpt_key=CKPT_KEY, interactive=bool(trainer_kwargs["enable_progress_bar"]))
    callbacks.append(run_cb)
    logger = StepTensorBoardLogger(save_dir=str(log_dir), name=f"{task_name}/{optimizer_name}",
                                   version=run_name, default_hp_metric=False)
    try:
        trainer = lightning.Trainer(logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                                    default_root_dir=str(run_dir), **trainer_kwargs)
    except Exception as e:  # Lightning's MisconfigurationException/ValueError: a bad trainer value
        if type(e).__name__ in ("MisconfigurationException", "ValueError", "TypeError", "RuntimeError"):
            raise UserError(f"invalid trainer setting: {one_line(e)}") from None
        raise

    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    provenance = {
        "command": [sys.executable, "-m", "adashift_pl.train", *argv],
        "versions": _versions(),
        "git_commit": git_commit(),
        "device": None,
        "precision": str(trainer.precision),
        "hostname": socket.gethostname(),
        "started_at": started_at,
    }

    status, code, failure, summary_error = "failed", 1, None, None
    t0 = time.time()
    try:
        # weights_only=True: Lightning's own load of the resumed checkpoint is as safe as read_checkpoint's
        # (its default, None, defers to torch, which an environment variable can turn to a full unpickle).
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None,
                    weights_only=True)
        status, code = ("interrupted", run_cb.exit_code()) if run_cb.interrupted else ("completed", 0)
        if status == "completed" and args.test and _has_test_split(module, datamodule):
            # The paper's test curves end here: the final weights on the test split (test/* metrics).
            run_cb.fit_metrics = dict(trainer.callback_metrics)  # trainer.test replaces them
            trainer.test(module, datamodule=datamodule, verbose=False)
    except KeyboardInterrupt:
        run_cb.interrupted = "SIGINT"
        status, code = "interrupted", 130
    except SystemExit:  # a stop signal at a step boundary (SIGTERMException), or Lightning's exit after a 2nd Ctrl-C
        run_cb.interrupted = run_cb.interrupted or "SIGINT"
        status, code = "interrupted", run_cb.exit_code()
    except Stopped as e:  # a signal during set-up, the sanity check or the test: stopped at once
        run_cb.interrupted = signal_name(e.signum)
        status, code = "interrupted", e.code
    except Exception as e:  # a disk that is full or read-only, a lost DDP rank: one line; anything else: a bug
        run_cb.error = run_cb.error or run_cb.describe_failure(trainer, e)
        if not run_cb.is_known_failure(trainer, e):
            raise
        failure = run_cb.error
    finally:
        if run_cb.writes_summary(trainer):
            provenance["device"] = _device_name(trainer)
            summary = run_cb.make_summary(
                trainer=trainer, task=task_name, optimizer=optimizer_name, run_name=run_name, seed=cfg["seed"],
                data_source=data_source, status=status, session_seconds=time.time() - t0,
                best_ckpt=best, correlation=corr_cb.summary() if corr_cb is not None else None,
                provenance=provenance, module=module)
            summary_error = run_cb.write_summary(summary)
            if status != "failed" and not summary_error:
                log_hparams_with_metrics(logger, hparams, summary)
                _print_summary(summary)
                print(str(run_dir), flush=True)
    if failure or summary_error:
        raise RunFailed("; ".join(m for m in (failure, summary_error and f"summary.json not written: {summary_error}")
                                  if m))
    return code


def tensorboard_hparams(hparams: dict) -> dict:
    """Values TensorBoard's HPARAMS tab can show: lists, mappings and null as text."""
    return {k: (str(v) if isinstance(v, (list, tuple, dict)) or v is None else v) for k, v in hparams.items()}


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The run's results as HPARAMS columns: hp/<metric> for each final metric (lr-* and corr/*
    curves left out), hp/best/<monitor> and hp/diverged (1 or 0). Own hp/ tags, so the curves of
    the metrics themselves get no extra point."""
    metrics = {f"hp/{k}": float(v) for k, v in sorted(summary["final_metrics"].items())
               if isinstance(v, (int, float)) and not k.startswith(("lr-", "corr/"))}
    if summary.get("best_metric"):
        metrics[f"hp/best/{summary['best_metric']['name']}"] = float(summary["best_metric"]["value"])
    metrics["hp/diverged"] = float(bool(summary.get("diverged")))
    return metrics


def log_hparams_with_metrics(logger, hparams: dict, summary: dict) -> None:
    """Write the hparams record TensorBoard's HPARAMS tab reads, now that the results are known.

    Lightning writes that record only when log_hyperparams gets metrics (or with its placeholder
    hp_metric, which default_hp_metric=False turns off); RunCallback logged the hparams without
    them at the start (hparams.yaml). After fit the logger's writer is closed: this opens a second
    events file in the run directory, which TensorBoard reads together with the first.
    """
    logger.log_hyperparams(hparams, metrics=hparam_metrics(summary), step=int(summary["global_step"]))
    logger.finalize(summary["status"])


# Lightning messages that are not the user's business (name, why), matched at their start.
# Kept: the device lines (GPU available/used), `Trainer.fit` stopped, real warnings about the run.
_LIGHTNING_NOISE = (
    ("💡 Tip", "an advertisement for Lightning's cloud logger"),
    ("TPU available:", "always 'False, using: 0 TPU cores' off TPU machines"),
    ("HPU available:", "likewise"),
)
_WARNING_NOISE = (
    # SLURM: printed on login/compute nodes where srun exists; a SLURM job runs under srun anyway.
    r"The `srun` command is available on your system but is not used",
    # a deprecation inside Lightning's own code (torch.utils._pytree), nothing the user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # resume continues in its own run directory on purpose
    r"Checkpoint directory .* exists and is not empty",
    # training/* metrics are logged by global step, across epochs: short epochs lose nothing
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


class _DropNoise:
    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(tuple(m for m, _ in _LIGHTNING_NOISE))


def quiet_lightning() -> None:
    """Silence the Lightning messages in _LIGHTNING_NOISE/_WARNING_NOISE (idempotent)."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    for pattern in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def _has_test_split(module, datamodule) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("test_step", module) and is_overridden("test_dataloader", datamodule)


def make_correlation_callback(knobs: dict | None):
    """MomentCorrelation(**knobs) from the config's correlation: section (no section: its defaults)."""
    try:
        from adashift_pl.callbacks import MomentCorrelation
    except ImportError:
        try:
            from adashift_pl.callbacks.correlation import MomentCorrelation
        except ImportError:
            print("warning: adashift_pl.callbacks.MomentCorrelation is not available; running without it",
                  file=sys.stderr)
            return None
    try:
        return MomentCorrelation(**(knobs or {}))
    except TypeError as e:
        key = _unexpected_kwarg(e)
        allowed = [k for k in inspect.signature(MomentCorrelation.__init__).parameters if k != "self"]
        raise UserError(f"unknown correlation key {key!r}: allowed are {', '.join(allowed)}") from None
    except ValueError as e:
        raise UserError(f"invalid correlation setting: {one_line(e)}") from None


def _versions() -> dict:
    import lightning
    import torch

    import adashift_pl

    return {"torch": torch.__version__, "lightning": lightning.__version__, "adashift_pl": adashift_pl.__version__}


def _device_name(trainer) -> str:
    import torch

    dev = trainer.strategy.root_device
    name = str(dev)
    if dev.type == "cuda":
        name += f" ({torch.cuda.get_device_name(dev)})"
    if trainer.world_size > 1:
        name += f" x{trainer.world_size} ({type(trainer.strategy).__name__})"
    return name


def _print_summary(s: dict) -> None:
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(s["final_metrics"].items())
                        if not k.startswith(("lr-", "corr/")))
    # A run that finished but whose loss went non-finite or exploded says so first (summary.json:
    # status completed, diverged true).
    label = "diverged" if s["diverged"] and s["status"] == "completed" else s["status"]
    reason = f"  ({s['diverged_reason']})" if s["diverged"] and s.get("diverged_reason") else ""
    print(f"{label}: {s['task']} / {s['optimizer']}  step {s['global_step']}  "
          f"{s['wall_seconds']:.1f} s  data {s['data_source']}{reason}", flush=True)
    if metrics:
        print(f"final: {metrics}", flush=True)
    if s.get("best_metric"):
        b = s["best_metric"]
        print(f"best {b['name']} ({b['mode']}) = {b['value']:.6g} at step {b['step']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
