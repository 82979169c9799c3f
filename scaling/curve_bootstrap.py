"""Uncertainty of a loss-curve law's fit: block-bootstrap replicates and the bands they give a new schedule.

The points along one loss curve are not independent draws: evaluations a few steps apart share the same
data order, the same weights' drift and the law's own misfit, so a bootstrap that resamples single points
(``kind="points"``) treats a curve of 40 evaluations as 40 independent facts and gives intervals that are too
narrow. Both loss-curve laws (``scaling.lr_annealing``, ``scaling.multipower``) therefore refit on circular
block resamples of each curve (``scaling.bootstrap.block_weights``), and this class holds the replicates:
parameter intervals and, for any schedule, a band for the predicted curve.

The bands are conditional on the law's form. Where a held-out schedule is predicted badly, the error is the
law's (its form does not extrapolate to that schedule), not noise, and no resampling of the fitted curves can
show it: ``experiments.lr_annealing_check`` reports how often held-out curves fall inside their bands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from scaling.intervals import percentile_interval, tail_quantiles

__all__ = ["CurveBootstrap"]


@dataclass
class CurveBootstrap:
    """Replicate fits of a loss-curve law.

    Attributes:
      params: name -> [B] each replicate's parameters (NaN where its refit did not converge).
      converged: [B] whether each replicate's refit converged (only those enter intervals and bands).
      residuals: the full fit's log residuals (log measured - log predicted) on the points it fitted, which
        ``band(noise=True)`` adds to the curve to bound a new *measurement* rather than the law's curve.
      curve_fn: ``curve_fn(params, lr, steps)`` -> [B', M]: the law's curve for replicate params (dict of [B']
        arrays) after ``steps`` (1-based; None: every step) of schedule ``lr``, both checked by the law.
      blocks: {curve index: block length} the resamples used; seed: the resampling seed.
    """

    params: dict[str, np.ndarray]
    converged: np.ndarray
    residuals: np.ndarray
    curve_fn: Callable[[dict, np.ndarray, np.ndarray], np.ndarray]
    blocks: dict[int, int] = field(default_factory=dict)
    seed: int = 0

    @property
    def n(self) -> int:
        return int(self.converged.size)

    @property
    def n_converged(self) -> int:
        return int(np.sum(self.converged))

    def ci(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Percentile interval of every parameter over the converged replicates."""
        tail_quantiles(level)
        ok = self._ok()
        return {k: tuple(float(x) for x in percentile_interval(v[ok], level)) for k, v in self.params.items()}

    def band(self, lr, steps=None, *, level: float = 0.9, noise: bool = False,
             n_resid: int = 32) -> dict[str, np.ndarray]:
        """Pointwise ``{"lower", "median", "upper"}`` of the loss after each of ``steps`` (1-based; default
        every step) of a run with schedule ``lr``, over the replicates' curves.

        ``noise=False`` bounds the law's curve (parameter uncertainty only); ``noise=True`` also multiplies
        each replicate's curve by ``n_resid`` residuals drawn from the full fit's, bounding a measured loss.
        """
        lo_q, hi_q = tail_quantiles(level)
        ok = self._ok()
        curves_BxM = np.asarray(self.curve_fn({k: v[ok] for k, v in self.params.items()}, lr, steps))
        B, M = curves_BxM.shape
        if noise:
            rng = np.random.default_rng(self.seed + 1)
            eps_BxR = rng.choice(self.residuals, size=(B, n_resid))
            curves_BxM = (curves_BxM[:, None, :] * np.exp(eps_BxR[:, :, None])).reshape(-1, M)
        lo, med, hi = np.quantile(curves_BxM, [lo_q, 0.5, hi_q], axis=0)
        return {"lower": lo, "median": med, "upper": hi}

    def _ok(self) -> np.ndarray:
        ok = np.asarray(self.converged, bool)
        if not ok.any():
            raise ValueError(f"none of the {ok.size} bootstrap refits converged")
        return ok
