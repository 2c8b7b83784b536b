"""The benchmark tasks, one module each, found by name.

Contract of a task module `tasks/<name>.py` (installed as `adashift_pl.tasks.<name>`):

    DESCRIPTION: str               one line for `python -m adashift_pl.train --list` (a string
                                   literal: --list reads it from the source, without importing)
    MONITOR: tuple[str, str] | None  metric that picks the best checkpoint, e.g. ("val/acc", "max")

    def build(model: dict, data: dict, optimizer: dict, seed: int)
            -> tuple[lightning.LightningModule, lightning.LightningDataModule]

`model` and `data` are the resolved `model:` and `data:` sections of the config
(`configs/<name>.yaml` merged with command-line overrides); `optimizer` is
{"name": <factory name>, **hyper-parameters}, which the LightningModule passes to
`adashift_pl.optim.build_optimizer(params=self, **optimizer)` in
`configure_optimizers` -- a task never knows which optimizer runs it.
The DataModule exposes `data_source` ("real", "synthetic" or "builtin" for tasks
whose data is defined by the problem itself), fixed by the time `build` returns.
An unknown key in `model`/`data` is a user error: raise `adashift_pl.errors.UserError`
(a TypeError from the constructor is turned into one by the caller).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from types import ModuleType

from adashift_pl.errors import UserError

TASKS = (
    "counterexample",
    "counterexample_seq",
    "quadratic",
    "mnist_logreg",
    "mnist_mlp",
    "cifar10_resnet18",
    "cifar10_densenet",
    "tinyimagenet_densenet",
    "wgan_gp",
    "nmt",
)


def get_task(name: str) -> ModuleType:
    """The task module called `name`; a UserError listing the tasks if there is none."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: allowed are {', '.join(TASKS)}")
    return importlib.import_module(f"adashift_pl.tasks.{name}")


def describe(name: str) -> str:
    """The task's DESCRIPTION, read from its source without importing it (so without torch,
    lightning or torchvision: `--list` stays fast)."""
    try:
        spec = importlib.util.find_spec(f"adashift_pl.tasks.{name}")
        tree = ast.parse(spec.loader.get_source(spec.name))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DESCRIPTION" for t in node.targets):
                return str(ast.literal_eval(node.value))
    except Exception as e:  # a missing or unreadable task module is still listed
        return f"(not available: {' '.join(str(e).split())})"
    return "(no DESCRIPTION)"
