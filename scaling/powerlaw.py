"""Straight-line fits in log-log space: y = coef * x**exponent.

This is the last step of every isoFLOP analysis (Hoffmann et al. 2022, Approaches 1 and 2; Porian et al.
2024): regress log N*(C) (or log D*(C)) on log C. Ordinary or weighted least squares, with the classical
standard error of the slope and a Student-t confidence interval. Bootstrap intervals are built by the callers
(they know what to resample); this module stays a pure, fast, closed-form regression.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["PowerLawFit", "fit_power_law"]


@dataclass(frozen=True)
class PowerLawFit:
    """Result of fitting log y = log coef + exponent * log x.

    `exponent_se` / `exponent_ci` are the classical (W)LS standard error and t-interval; `r2` is the
    unweighted coefficient of determination in log space (what sklearn's `score` reports, so it matches
    Porian et al.'s stored r2 values).
    """

    exponent: float
    coef: float
    r2: float
    exponent_se: float
    exponent_ci: tuple[float, float]
    n_points: int
    weighted: bool
    ci_level: float = 0.95

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exponent_ci"] = list(self.exponent_ci)
        return d

    def summary(self) -> str:
        lo, hi = self.exponent_ci
        kind = "WLS" if self.weighted else "OLS"
        return (
            f"y = {self.coef:.4g} * x^{self.exponent:.4f}  ({kind}, n={self.n_points}, r2={self.r2:.4f}, "
            f"{self.ci_level:.0%} CI [{lo:.4f}, {hi:.4f}])"
        )


class AllocationLaws:
    """For results that hold ``n_fit`` / ``d_fit``, the power laws N*(C) = k C^a and D*(C) = k' C^b fitted by
    the Hoffmann approaches: the exponents ``a``, ``b`` and ``predict(C)``, written once for all of them."""

    @property
    def a(self) -> float:
        return self.n_fit.exponent

    @property
    def b(self) -> float:
        return self.d_fit.exponent

    def predict(self, C) -> tuple[np.ndarray, np.ndarray]:
        """(N*(C), D*(C)) from the fitted power laws."""
        return self.n_fit.predict(C), self.d_fit.predict(C)


def fit_power_law(x, y, weights=None, ci_level: float = 0.95) -> PowerLawFit:
    """Fit y = coef * x**exponent by (weighted) least squares on (log x, log y).

    weights: per-point weights on the squared log-residuals (e.g. 1/std(log y)^2, as Porian et al. 2024 do
    with their bootstrap standard deviations of log N*). Rows where any input is NaN are dropped, as pandas'
    `dropna` does in the reference implementation.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"fit_power_law: x and y have different lengths ({x.size} vs {y.size})")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w is not None and w.shape != x.shape:
        raise ValueError(f"fit_power_law: weights has length {w.size}, expected {x.size}")
    if w is not None and np.any(np.isinf(w)):
        raise ValueError(
            f"fit_power_law: weights are infinite in rows {np.flatnonzero(np.isinf(w)).tolist()} (an "
            f"inverse variance from a zero standard deviation?); NaN weights drop their rows, inf are errors"
        )
    keep = np.isfinite(x) & np.isfinite(y) & (True if w is None else np.isfinite(w))
    x, y = x[keep], y[keep]
    w = None if w is None else w[keep]
    bad = np.flatnonzero((x <= 0) | (y <= 0))
    if bad.size:
        raise ValueError(
            f"fit_power_law: x and y must be positive for a log-log fit; bad rows {bad.tolist()}"
        )
    if w is not None and np.any(w < 0):
        raise ValueError("fit_power_law: weights must be non-negative")
    if x.size < 2:
        raise ValueError(f"fit_power_law: need at least 2 finite points, got {x.size}")
    lx, ly = np.log(x), np.log(y)
    ww = np.ones_like(lx) if w is None else w
    # Weighted normal equations in closed form (2 parameters): stable enough after centring.
    xm = np.sum(ww * lx) / np.sum(ww)
    ym = np.sum(ww * ly) / np.sum(ww)
    sxx = np.sum(ww * (lx - xm) ** 2)
    if sxx <= 0:
        raise ValueError("fit_power_law: all x values are identical; the exponent is not identifiable")
    slope = float(np.sum(ww * (lx - xm) * (ly - ym)) / sxx)
    intercept = float(ym - slope * xm)
    resid = ly - (intercept + slope * lx)
    dof = lx.size - 2
    if dof > 0:
        sigma2 = float(np.sum(ww * resid**2) / dof)
        se = math.sqrt(sigma2 / sxx)
        t = float(stats.t.ppf(0.5 + ci_level / 2, dof))
        ci = (slope - t * se, slope + t * se)
    else:
        se, ci = float("nan"), (float("nan"), float("nan"))
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    return PowerLawFit(
        exponent=slope,
        coef=math.exp(intercept),
        r2=r2,
        exponent_se=se,
        exponent_ci=ci,
        n_points=int(lx.size),
        weighted=w is not None,
        ci_level=ci_level,
    )
