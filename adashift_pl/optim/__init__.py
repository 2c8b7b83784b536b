"""AdaShift and its variants, and ADOPT, as torch.optim optimizers, and the optimizer factory."""

from adashift_pl.optim.adashift import AdaShift, AdaShiftSpatial, adashift
from adashift_pl.optim.adopt import ADOPT, adopt
from adashift_pl.optim.factory import ALIASES, OPTIMIZERS, build_optimizer, list_optimizers, param_groups_weight_decay

__all__ = ["AdaShift", "AdaShiftSpatial", "adashift", "ADOPT", "adopt", "build_optimizer", "list_optimizers",
           "param_groups_weight_decay", "OPTIMIZERS", "ALIASES"]
