"""Equal-tailed percentile intervals of bootstrap draws: the one place the tail split is written.

Every CI in ``scaling`` (fitted parameters, optima, exponents, downstream curves, pass rates, plot bands) is a
percentile interval of bootstrap draws (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13):
the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles over the draw axis.
"""

from __future__ import annotations

import numpy as np


def tail_quantiles(level: float) -> tuple[float, float]:
    """The two quantiles of an equal-tailed interval at ``level``; ValueError outside (0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return (1 - level) / 2, (1 + level) / 2


def percentile_interval(draws, level: float = 0.95, axis: int = 0, skip_nan: bool = False):
    """``(lo, hi)``: the equal-tailed percentile interval of ``draws`` over ``axis`` (the draw axis), arrays
    of the remaining shape (scalars for 1-D draws). ``skip_nan`` ignores NaN draws (failed replicates)."""
    quantile = np.nanquantile if skip_nan else np.quantile
    lo, hi = quantile(np.asarray(draws, dtype=np.float64), tail_quantiles(level), axis=axis)
    return lo, hi
