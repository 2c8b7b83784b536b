"""AdaShift and its variants as torch.optim optimizers, and the optimizer factory."""

from adashift_pl.optim.adashift import AdaShift, AdaShiftSpatial, adashift
from adashift_pl.optim.factory import ALIASES, OPTIMIZERS, build_optimizer, list_optimizers, param_groups_weight_decay

__all__ = ["AdaShift", "AdaShiftSpatial", "adashift", "build_optimizer", "list_optimizers",
           "param_groups_weight_decay", "OPTIMIZERS", "ALIASES"]
