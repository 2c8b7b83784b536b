"""Training callbacks."""

from adashift_pl.callbacks.correlation import MomentCorrelation

__all__ = ["MomentCorrelation"]
