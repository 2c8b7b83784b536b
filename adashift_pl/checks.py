"""Up-front checks of a run's resolved config: the values torch, numpy or Lightning would accept
silently (an lr of inf, a negative clip value) or fail on deep inside a run with a traceback
(seed -1, val_check_interval 0, a keep_num whose history cannot fit in memory).

Each check raises UserError with one line naming the value and what is allowed (exit code 2).
train.py runs them in two places: `check_config` right after the config layers are merged,
before anything is built, and `check_with_model` once the task's model exists (the checks that
need its parameters), before the Trainer touches any data. Type checks (a string where a number
is meant) come first, in train.py; the checks here assume the types are right.
"""

from __future__ import annotations

import math
import os
from typing import Any

from adashift_pl.errors import UserError, one_line

SEED_MAX = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) range: 0 .. 2**32 - 1
# NAME_MAX is 255 bytes; files derived from the run name (temporaries, claims) need a few more.
RUN_NAME_MAX_BYTES = 200


def _whole(v) -> bool:
    """An integer, or a float with an integral value (YAML reads 1e4 as a float)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- the command line's own values -------------------------------------------------------------
def check_seed(seed) -> None:
    if not (_whole(seed) and 0 <= seed <= SEED_MAX):
        raise UserError(f"invalid seed {seed!r}: allowed is an integer from 0 to {SEED_MAX}")


def check_num_threads(n) -> None:
    cpus = os.cpu_count() or 1
    if n is not None and not (_whole(n) and 1 <= n <= cpus):
        raise UserError(f"invalid num_threads {n!r}: allowed is an integer from 1 to {cpus} (this machine's CPUs), "
                        f"or null for torch's default")


def check_log_dir(text: str) -> None:
    if not text.strip() or not text.isprintable():
        raise UserError(f"invalid --log-dir {text!r}: allowed is a directory path (not empty, no control "
                        f"characters such as newlines)")


def check_run_name(name: str | None) -> None:
    """A plain directory name that prints on one line (the last line printed is the run directory)."""
    if name is None:
        return
    if (name in ("", ".", "..") or "/" in name or os.sep in name or not name.isprintable()
            or name != name.strip() or len(name.encode()) > RUN_NAME_MAX_BYTES):
        raise UserError(f"invalid --run-name {one_line(repr(name))}: allowed is a plain directory name of at most "
                        f"{RUN_NAME_MAX_BYTES} bytes (no '/', no control characters such as newlines, "
                        f"no leading or trailing spaces)")


# ---- sections of the config --------------------------------------------------------------------
def check_finite(section: str, values: Any, where: str = "") -> None:
    """Every number in `values` (nested lists and mappings too) is finite: an lr, eps or weight
    decay of inf/nan, or a model constant of inf, trains nothing or NaNs and reports success."""
    stack = [(section, values)]
    while stack:
        key, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{key}.{k}", x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{key}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"invalid {key} {v!r}{where}: allowed is a finite number")


def _at_least(low: int, *, null: bool = False):
    def rule(v):
        return (null and v is None) or (_whole(v) and v >= low)
    return rule


def _batches(*, zero: bool):
    """Lightning's batch-count-or-fraction values: a count >= 1 (or >= 0), or a fraction in (0, 1] ([0, 1])."""
    def rule(v):
        if v is None:
            return True
        if _whole(v) and v > 1:
            return True
        return _number(v) and (0 <= v <= 1 if zero else 0 < v <= 1)
    return rule


def _clip(v) -> bool:
    return v is None or (_number(v) and math.isfinite(v) and v >= 0)


# Trainer arguments with a numeric range Lightning does not check itself (it divides by zero,
# or quietly does something else). Anything not listed is Lightning's to check.
TRAINER_RULES = {
    "max_steps": (_at_least(-1), "an integer >= -1 (-1: no limit)"),
    "min_steps": (_at_least(0, null=True), "null or an integer >= 0"),
    "max_epochs": (_at_least(-1, null=True), "null or an integer >= -1 (-1: no limit)"),
    "min_epochs": (_at_least(0, null=True), "null or an integer >= 0"),
    "log_every_n_steps": (_at_least(0, null=True), "null or an integer >= 0 (0: never)"),
    "check_val_every_n_epoch": (_at_least(1, null=True), "null or an integer >= 1"),
    "num_sanity_val_steps": (_at_least(-1, null=True), "null or an integer >= -1 (-1: all)"),
    "accumulate_grad_batches": (_at_least(1), "an integer >= 1"),
    "num_nodes": (_at_least(1), "an integer >= 1"),
    "reload_dataloaders_every_n_epochs": (_at_least(0), "an integer >= 0"),
    "gradient_clip_val": (_clip, "null or a finite number >= 0"),
    "val_check_interval": (_batches(zero=False),
                           "null, a number of training batches >= 1, a fraction of the epoch in (0.0, 1.0], "
                           "or a time 'DD:HH:MM:SS'"),
    **{k: (_batches(zero=True), "null, a number of batches >= 0, or a fraction in [0.0, 1.0]")
       for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                 "overfit_batches")},
}
# Keys whose value may also be a string or mapping Lightning parses itself (a time interval).
_TRAINER_TEXT_OK = {"val_check_interval"}


def check_trainer(trainer: dict) -> None:
    for key, (ok, allowed) in TRAINER_RULES.items():
        if key not in trainer:
            continue
        v = trainer[key]
        if key in _TRAINER_TEXT_OK and isinstance(v, (str, dict)):
            continue
        if not ok(v):
            raise UserError(f"invalid trainer.{key} {v!r}: allowed is {allowed}")
    check_accelerator(trainer.get("accelerator", "auto"))


def check_accelerator(name) -> None:
    """A named accelerator that this machine has (Lightning raises an ImportError for 'tpu' without
    torch_xla). Accelerator objects and unknown names are left to Lightning's own message."""
    if not isinstance(name, str) or name.lower() == "auto":
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    available = sorted(n for n in AcceleratorRegistry.available_accelerators() if _accelerator_available(n))
    here = ", ".join(["auto", *available] + (["gpu"] if {"cuda", "mps"} & set(available) else []))
    key = name.lower()
    if key == "gpu":
        ok = bool({"cuda", "mps"} & set(available))
    elif key in AcceleratorRegistry.available_accelerators():
        ok = key in available
    else:
        raise UserError(f"invalid trainer.accelerator {name!r}: allowed are {here} on this machine "
                        f"(Lightning knows {', '.join(sorted(AcceleratorRegistry.available_accelerators()))}, gpu)")
    if not ok:
        raise UserError(f"invalid trainer.accelerator {name!r}: not available on this machine; allowed here are {here}")


def _accelerator_available(name: str) -> bool:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    try:
        return bool(AcceleratorRegistry[name]["accelerator"].is_available())
    except Exception:  # a backend whose package is missing or broken is not available
        return False


# ---- checks that need the built model ----------------------------------------------------------
# Trainer settings Lightning refuses for a module with manual optimization (WGAN-GP): (key, the
# value that means "off", what is allowed).
MANUAL_OPTIMIZATION_TRAINER_KEYS = (
    ("gradient_clip_val", 0, "null or 0"),
    ("accumulate_grad_batches", 1, "1"),
)


def check_with_model(cfg: dict, module, checkpoint_shapes: dict | None, checkpoint_path=None) -> None:
    """After the task is built, before the Trainer runs: settings the model cannot take."""
    if not getattr(module, "automatic_optimization", True):
        for key, default, allowed in MANUAL_OPTIMIZATION_TRAINER_KEYS:
            v = cfg["trainer"].get(key, default)
            if v not in (None, default):
                raise UserError(f"invalid trainer.{key} {v!r} for task {cfg['task']}: it steps its optimizers "
                                f"itself (manual optimization), which Lightning cannot combine with it; "
                                f"allowed is {allowed}")
    check_optimizer_memory(cfg["optimizer"], module)
    check_optimizer_on_model(cfg["optimizer"], module)
    if checkpoint_shapes is not None:
        check_checkpoint_matches(checkpoint_shapes, module, cfg["task"], checkpoint_path)


def check_optimizer_on_model(optimizer: dict, module) -> None:
    """Build the optimizer once on the real parameters (construction allocates no state): a value
    that only fails with this model's parameters fails here, not inside the Trainer."""
    from adashift_pl.optim import build_optimizer

    if next(iter(module.parameters()), None) is None:
        return  # a network built in setup() (NMT): its parameters do not exist yet
    hp = {k: v for k, v in optimizer.items() if k != "name"}
    try:
        build_optimizer(optimizer["name"], module, **hp)
    except (ValueError, TypeError, RuntimeError, MemoryError) as e:
        raise UserError(f"invalid optimizer setting for {optimizer['name']!r} on this model: {one_line(e)}") from None


def adashift_state_bytes(params, keep_num: int, window: int | None, spatial_op: str, spatial_block: str) -> int:
    """AdaShift's state for `params`, by the layout its docstring gives: a history of m (phi none:
    n) gradient-sized buffers plus the running sum S, and for phi max/mean n block scalars."""
    slots = keep_num if spatial_op == "none" else (window or keep_num)
    total = 0
    for p in params:
        total += (slots + 1) * p.numel() * p.element_size()
        if spatial_op != "none":
            blocks = p.shape[0] if spatial_block == "row" and p.dim() >= 2 else 1
            total += keep_num * blocks * p.element_size()
    return total


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def check_optimizer_memory(optimizer: dict, module) -> None:
    """A keep_num (AdaShift's shift n) whose history cannot fit in this machine's memory: refused
    with the largest n that would, instead of an allocation failure at the first step."""
    keep = optimizer.get("keep_num")
    memory = physical_memory_bytes()
    if keep is None or memory is None:
        return
    from adashift_pl.optim import ALIASES, OPTIMIZERS

    info = OPTIMIZERS[ALIASES.get(optimizer["name"].lower(), optimizer["name"].lower())]
    op = info.fixed.get("spatial_op", optimizer.get("spatial_op", "max"))
    block = optimizer.get("spatial_block", "tensor")
    params = [p for p in module.parameters() if p.requires_grad]

    def need(n: int) -> int:
        return adashift_state_bytes(params, n, optimizer.get("window"), op, block)

    if need(keep) <= memory:
        return
    low, high = 0, keep  # the largest n with need(n) <= memory (0: not even n = 1 fits)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if need(mid) <= memory else (low, mid - 1)
    n_params = sum(p.numel() for p in params)
    raise UserError(f"invalid optimizer.keep_num {keep!r} for {optimizer['name']!r}: its history would need "
                    f"{need(keep) / 2**30:,.1f} GiB for this model's {n_params:,} parameters, more than this "
                    f"machine's {memory / 2**30:,.1f} GiB; allowed is keep_num <= {low:,} here")


def check_checkpoint_matches(shapes: dict, module, task: str, path) -> None:
    """--resume of a checkpoint whose weights do not fit this task's model (another task's, or a
    different model config): refused by name, not as Lightning's "Unexpected key(s) in state_dict"."""
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not mine:
        return  # a network built in setup() (NMT): nothing to compare yet
    missing = sorted(set(mine) - set(shapes))
    unexpected = sorted(set(shapes) - set(mine))
    wrong = sorted(k for k in set(mine) & set(shapes) if tuple(shapes[k]) != mine[k])
    if not (missing or unexpected or wrong):
        return

    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = ([f"missing {some(missing)}"] if missing else []) + \
        ([f"unexpected {some(unexpected)}"] if unexpected else []) + \
        ([f"shape of {wrong[0]} is {tuple(shapes[wrong[0]])}, the model's {mine[wrong[0]]}"] if wrong else [])
    raise UserError(f"checkpoint {path} does not hold weights of task {task}'s model ({'; '.join(parts)}): "
                    f"allowed is a checkpoint of this task with the same model settings")
