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

from adashift_pl.errors import UserError

SECTIONS = ("model", "data", "trainer", "optimizer", "correlation", "checkpoint")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on a dot: `1.0e-3`)."""


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
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # not YAML (e.g. 'a: b: c'): keep the string


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not a text file
        raise UserError(f"cannot read config file {path}: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must hold a mapping (task:, model:, data:, ...), got {type(cfg).__name__}")
    return cfg


def default_config_path(task: str) -> Path | None:
    """configs/<task>.yaml in the working directory, else beside the package (a checkout)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = root / "configs" / f"{task}.yaml"
        if p.is_file():
            return p
    return None


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
