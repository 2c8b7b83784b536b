"""Config files and command-line overrides for `python -m adashift_pl.train`.

Precedence, left to right: code defaults < configs/<task>.yaml (or --config) <
command-line flags. Values on the command line are parsed as YAML, so `1e-3`,
`true`, `null` and `[0.9,0.999]` mean what they look like.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from adashift_pl.errors import UserError, one_line

SECTIONS = ("model", "data", "trainer", "optimizer", "correlation", "checkpoint")


# A config never needs more values than this; a YAML alias bomb (a few hundred bytes whose
# aliases expand to millions of values) is refused at load instead of exploding later.
MAX_CONFIG_VALUES = 100_000


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """The same key twice in one mapping (YAML itself would silently keep the last)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on a dot: `1.0e-3`) and
    refuses duplicate keys: `lr: 1e-3` twice in a block is a mistake, not an override."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` is a merge, not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not key_node.start_mark:
                raise DuplicateKeyError(f"while reading a mapping (first {key!r} at line {first.line + 1})",
                                        node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML: '1e-3' -> 0.001, 'true' -> True, '[0.9,0.999]' -> list."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as e:
        raise UserError(f"invalid value {text!r}: {one_line(e.problem)}") from None
    except yaml.YAMLError:
        return text  # not YAML (e.g. 'a: b: c'): keep the string
    check_size(value, f"value {text!r}")
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {one_line(e)}") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not a text file
        raise UserError(f"cannot read config file {path}: {one_line(e)}") from None
    check_size(cfg, f"config file {path}")
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must hold a mapping (task:, model:, data:, ...), got {type(cfg).__name__}")
    return cfg


def check_size(value: Any, what: str) -> None:
    """Refuse a value that expands to more than MAX_CONFIG_VALUES values (aliases counted each time used)."""
    budget = MAX_CONFIG_VALUES
    stack = [value]
    while stack:
        x = stack.pop()
        budget -= 1
        if budget < 0:
            raise UserError(f"{what} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?): "
                            f"allowed is a config of at most {MAX_CONFIG_VALUES:,} values")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


# ----------------------------------------------------------------------------------------------
# the configs shipped with the package
# ----------------------------------------------------------------------------------------------
def configs_dir() -> Path:
    """The paper's configs: `adashift_pl/configs/` of an installed wheel (package data), or the
    `configs/` beside the package in a source checkout (and so in an editable install)."""
    package = Path(__file__).resolve().parent
    installed, checkout = package / "configs", package.parent / "configs"
    if installed.is_dir():
        return installed
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise UserError(f"the package's configs are missing (neither {installed} nor {checkout} exists): "
                    f"reinstall adashift-pl, or pass --config FILE")


def task_config_path(task: str) -> Path:
    """configs/<task>.yaml of the package; a task without one is an installation error, said loudly
    (silently running on code defaults would not be the paper's settings)."""
    path = configs_dir() / f"{task}.yaml"
    if not path.is_file():
        raise UserError(f"the package's config for task {task} is missing ({path} does not exist): "
                        f"reinstall adashift-pl, or pass --config FILE")
    return path


def shipped_path(relative: str | os.PathLike) -> Path:
    """A path such as `configs/nmt_iwslt15.yaml` (as recipes name them) inside the installed package."""
    return configs_dir().parent / relative


def sweep_path(name: str) -> Path | None:
    """configs/sweeps/<name>.yaml of the package, or None."""
    path = configs_dir() / "sweeps" / f"{name}.yaml"
    return path if path.is_file() else None


def sweep_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "sweeps").glob("*.yaml"))


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; `override` wins, dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate dotted overrides (`--model.width 64`, `--trainer.max_steps=10`) from the other flags.

    Returns (the remaining argv for argparse, [(dotted key, raw value), ...]) in command-line order.
    """
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in head and head.split(".", 1)[0] in SECTIONS:
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value, e.g. {arg} 0.01")
                key, value = head, argv[i + 1]
                i += 1
            section, _, rest_key = key.partition(".")
            if not rest_key or any(not part for part in rest_key.split(".")):
                raise UserError(f"malformed override {arg!r}: allowed is --SECTION.KEY VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def overrides_to_dict(overrides: list[tuple[str, str]]) -> dict:
    """[('model.width', '64'), ('trainer.max_steps', '10')] -> {'model': {'width': 64}, 'trainer': {...}}."""
    out: dict = {}
    for key, raw in overrides:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parse_value(raw)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=None)


def _plain(x: Any) -> Any:
    """Tuples -> lists etc., so the resolved config dumps as plain YAML/JSON."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


plain = _plain
