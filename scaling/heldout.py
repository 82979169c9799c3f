"""Held-out evaluation of a scaling-law fit (Choshen et al. 2024, "A Hitchhiker's Guide to Scaling Law
Estimation", arXiv:2410.11840): fit on a subset — all but the largest models, or all but the last compute
budget — and report the absolute relative error (ARE) |yhat - y| / y on the held-out points, plus the
empirical coverage of bootstrap prediction intervals there.  ``drop_first`` discards the first fraction of
each training curve (early checkpoints are far from the law; the guide recommends dropping them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from scaling.fit import FitResult, fit


def largest_mask(values, n_largest: int = 1) -> np.ndarray:
    """True for points whose value is among the ``n_largest`` distinct largest values (e.g. of N or C)."""
    v = np.asarray(values, np.float64)
    uniq = np.unique(v)
    if n_largest >= len(uniq):
        raise ValueError(f"cannot hold out the {n_largest} largest of only {len(uniq)} distinct values")
    return v >= uniq[-n_largest]


def drop_first_fraction(groups, order, fraction: float) -> np.ndarray:
    """Keep-mask dropping the first ``fraction`` of each run's points; runs: ``groups``, order: ``order``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups, order = np.asarray(groups), np.asarray(order, np.float64)
    if len(groups) != len(order):
        raise ValueError(f"groups ({len(groups)}) and order ({len(order)}) lengths differ")
    keep = np.ones(len(groups), bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[np.argsort(order[idx], kind="stable")]
        keep[idx[: int(np.floor(fraction * len(idx)))]] = False
    return keep


@dataclass
class HeldoutReport:
    fit: FitResult
    heldout_mask: np.ndarray
    y: np.ndarray  # held-out targets
    prediction: np.ndarray
    are: np.ndarray  # absolute relative error per held-out point
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    level: float | None = None

    @property
    def mean_are(self) -> float:
        return float(np.mean(self.are))

    @property
    def max_are(self) -> float:
        return float(np.max(self.are))

    @property
    def coverage(self) -> float | None:
        """Fraction of held-out points inside the prediction interval (compare with ``level``)."""
        if self.lower is None:
            return None
        return float(np.mean((self.y >= self.lower) & (self.y <= self.upper)))

    def summary(self) -> str:
        s = f"held-out: {len(self.y)} points; mean ARE {self.mean_are:.4%}, max ARE {self.max_are:.4%}"
        if self.coverage is not None:
            s += f"; {self.level:.0%} prediction-interval coverage {self.coverage:.0%}"
        return s


def heldout_eval(
    law,
    data: Mapping,
    *,
    heldout=None,
    by: str | None = None,
    n_largest: int = 1,
    drop_first: float = 0.0,
    groups=None,
    order: str | None = None,
    level: float | None = 0.9,
    n_boot: int = 200,
    seed: int = 0,
    **fit_kw,
) -> HeldoutReport:
    """Fit on the complement of the held-out set and score the held-out points.

    ``heldout``: boolean mask; or ``by`` (e.g. "N" or "C") with ``n_largest`` distinct largest values held
    out.  ``drop_first`` (with ``groups`` run ids and ``order`` field, e.g. "D") drops the start of each
    training curve from the *training* set.  With ``level``, a points bootstrap of ``n_boot`` refits gives
    prediction intervals and their coverage.
    """
    data = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))
    if heldout is None:
        if by is None:
            raise ValueError("give heldout= (mask) or by= (field whose largest values are held out)")
        heldout = largest_mask(data[by], n_largest)
    heldout = np.asarray(heldout, bool)
    if heldout.shape != (n,):
        raise ValueError(f"heldout mask has shape {heldout.shape}, expected ({n},)")
    train = ~heldout
    if drop_first > 0:
        if groups is None or order is None:
            raise ValueError("drop_first needs groups= (run ids) and order= (field, e.g. 'D' or 'step')")
        train &= drop_first_fraction(np.asarray(groups), data[order], drop_first)
    if fit_kw.get("weights") is not None:  # per-point weights follow their points into the training set
        w = np.asarray(fit_kw["weights"], np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights has shape {w.shape}, expected ({n},): one per point of data")
        fit_kw = {**fit_kw, "weights": w[train]}
    res = fit(law, {k: v[train] for k, v in data.items()}, **fit_kw)
    tgt = fit_kw.get("target") or res.law.target  # the column the fit used (fit's own default: law.target)
    X_te = {k: data[k][heldout] for k in res.law.inputs}
    y_te = data[tgt][heldout].astype(np.float64)
    pred = res.predict(**X_te)
    are = np.abs(pred - y_te) / np.abs(y_te)
    lo = hi = None
    if level is not None:
        pi = res.bootstrap(n_boot, seed=seed).prediction_interval(level, **X_te)
        lo, hi = pi["lower"], pi["upper"]
    return HeldoutReport(
        fit=res, heldout_mask=heldout, y=y_te, prediction=pred, are=are, lower=lo, upper=hi, level=level
    )
