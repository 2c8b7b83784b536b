"""The optimizer factory: one table from names to constructors and defaults (timm style).

    build_optimizer("adashift", model, lr=3e-2)      # an nn.Module or parameters
    list_optimizers()                                 # {name: defaults}

Defaults are the paper's suggestions: AdaShift lr 1e-2, n 10, beta1 0.9, beta2 0.999
(Appendix I.2-I.3); Adam/AMSGrad lr 1e-3, (0.9, 0.999). Adam, AdamW, AMSGrad, NAdam and SGD
are torch.optim's own classes (AdamW with torch's defaults, weight decay 1e-2); ADOPT has the
official implementation's defaults (lr 1e-3, (0.9, 0.9999), eps 1e-6, clip k**0.25).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from adashift_pl.optim.adashift import AdaShift, AdaShiftSpatial
from adashift_pl.optim.adopt import ADOPT

__all__ = ["OptimInfo", "OPTIMIZERS", "ALIASES", "build_optimizer", "list_optimizers", "param_groups_weight_decay"]


@dataclass(frozen=True)
class OptimInfo:
    cls: type[torch.optim.Optimizer]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    # Arguments fixed by the name itself (amsgrad=True for "amsgrad"): not overridable.
    fixed: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimInfo] = {
    "adashift": OptimInfo(AdaShift, "max-AdaShift: temporal shift n + block max (Algorithm 2, Eq. 44)",
                          dict(lr=1e-2, betas=(0.9, 0.999), keep_num=10, window=None, eps=1e-10),
                          dict(spatial_op="max")),
    "adashift-mean": OptimInfo(AdaShift, "AdaShift with the block mean of g^2 as phi",
                               dict(lr=1e-2, betas=(0.9, 0.999), keep_num=10, window=None, eps=1e-10),
                               dict(spatial_op="mean")),
    "non-adashift": OptimInfo(AdaShift, "non-AdaShift / temporal-only: element-wise v from g_{t-n} (Appendix J)",
                              dict(lr=1e-3, betas=(0.9, 0.999), keep_num=10, window=None, eps=1e-10),
                              dict(spatial_op="none")),
    "adashift-spatial": OptimInfo(AdaShiftSpatial, "AdaShift spatial-only: block max of the current g^2, no shift "
                                  "(Appendix J)", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-10),
                                  dict(spatial_op="max")),
    "adam": OptimInfo(torch.optim.Adam, "torch.optim.Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
                      dict(amsgrad=False)),
    "amsgrad": OptimInfo(torch.optim.Adam, "torch.optim.Adam(amsgrad=True)",
                         dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), dict(amsgrad=True)),
    "nadam": OptimInfo(torch.optim.NAdam, "torch.optim.NAdam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
    "sgd": OptimInfo(torch.optim.SGD, "torch.optim.SGD (momentum/nesterov configurable)",
                     dict(lr=1e-1, momentum=0.0, nesterov=False)),
    "adamw": OptimInfo(torch.optim.AdamW, "torch.optim.AdamW (decoupled weight decay)",
                       dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)),
    "adopt": OptimInfo(ADOPT, "ADOPT (Taniguchi et al., NeurIPS 2024), the official algorithm with its clip",
                       dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_exp=0.25, weight_decay=0.0,
                            decouple=False)),
}
ALIASES = {"adashift-temporal": "non-adashift", "max-adashift": "adashift"}


def _resolve(name: str) -> tuple[str, OptimInfo]:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZERS:
        names = sorted([*OPTIMIZERS, *ALIASES])
        raise ValueError(f"unknown optimizer {name!r}: allowed are {', '.join(names)}")
    return key, OPTIMIZERS[key]


def list_optimizers() -> dict[str, dict[str, Any]]:
    """Every name (aliases too) with the defaults it builds with."""
    out = {name: {**info.defaults, **info.fixed} for name, info in OPTIMIZERS.items()}
    out.update({alias: out[target] for alias, target in ALIASES.items()})
    return out


def allowed_keys(name: str) -> list[str]:
    """The hyper-parameters `name` accepts as overrides."""
    _, info = _resolve(name)
    sig = inspect.signature(info.cls.__init__).parameters
    return sorted(k for k in sig if k not in ("self", "params") and k not in info.fixed)


def param_groups_weight_decay(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay for weights, none for biases and norm/1-d parameters (timm's rule)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, params: nn.Module | Iterable, **overrides) -> torch.optim.Optimizer:
    """Build optimizer `name` over `params` (an nn.Module or parameters / param groups).

    `overrides` replace the name's defaults; keys the optimizer does not take raise
    ValueError listing the valid ones. Given a module and weight_decay > 0, biases
    and norm parameters are excluded from weight decay.
    """
    key, info = _resolve(name)
    valid = allowed_keys(key)
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise ValueError(f"optimizer {key!r} does not take {', '.join(unknown)}: allowed are {', '.join(valid)}")
    kwargs = {**info.defaults, **overrides, **info.fixed}
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])  # YAML gives lists
    if isinstance(params, nn.Module):
        wd = kwargs.get("weight_decay", 0.0) or 0.0
        params = param_groups_weight_decay(params, wd) if wd > 0 else [p for p in params.parameters()
                                                                     if p.requires_grad]
    return info.cls(params, **kwargs)
