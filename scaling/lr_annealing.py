"""A training run's loss curve under any learning-rate schedule (Tissue et al. 2024).

Tissue, Wang, Zhong, Chen & Wu 2024, "Scaling Law with Learning Rate Annealing" (arXiv:2408.11029): the loss
after step s is ``L(s) = L0 + A S1^-alpha - C S2``, where

- ``S1(s) = sum_{t <= s} eta_t`` is the *forward area*, the learning rate summed over the steps so far, and
- ``S2(s) = sum_{t <= s} m_t``, ``m_t = lam m_{t-1} + (eta_{t-1} - eta_t)``, is the *annealing area*: every
  drop of the learning rate lowers the loss, with a delay set by the momentum ``lam`` (0.999 in the paper).

This module turns schedules into the law's inputs; the law itself is ``scaling.laws`` "lr_annealing", fitted
by ``scaling.fit`` like any other (Huber loss on log residuals, multi-start, variable projection over the
exponent, bootstrap). Fitted on one or two runs (e.g. a constant and a cosine schedule), it predicts the
whole curve of another schedule (a warmup-stable-decay cooldown of any length) without training it::

    res = fit_annealing([(lr_const, steps_a, loss_a), (lr_cos, steps_b, loss_b)])
    res.predict(lr_wsd)              # the loss after every step of the WSD run
    res.params, res.decay, res.objective_by_decay
    boot = res.bootstrap(1000)       # circular blocks of each curve, the momentum re-chosen per replicate
    boot.band(lr_wsd, level=0.9)     # {"lower", "median", "upper"} of the predicted curve

``fit_annealing`` also chooses the momentum ``lam`` by profiling: the paper's 0.999 delays an anneal's
effect by about 1/(1 - lam) = 1000 steps, which suits runs of tens of thousands of steps, not short ones.

Warmup: the steps before the schedule first reaches its peak add to the forward area (Luo et al. 2025's
S_W does the same) but not to the annealing area: a rising learning rate is not an anneal, and counting it
as a negative one would add a spurious bump to every curve.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from scaling.bootstrap import bootstrap, series_blocks
from scaling.curve_bootstrap import CurveBootstrap
from scaling.fit import FitResult, fit

__all__ = ["annealing_areas", "annealing_data", "schedule_drops", "step_index", "checked_curves",
           "AnnealingFit", "fit_annealing"]

DECAYS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)  # delays of 1/(1 - lam): 1 to 1000 steps


def annealing_areas(lr, *, decay: float = 0.999, warmup: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Forward and annealing areas ``(S1, S2)`` after every step of a schedule.

    Args:
      lr: the learning rate each update used, in order ([T]; ``lr[0]`` is the first step's).
      decay: the momentum ``lam`` of the annealing area (Tissue et al. use 0.999; 0 makes S2 the plain drop
        of the learning rate so far, ``eta_peak - eta_s``).
      warmup: steps before the peak, which count in S1 only; default: the steps before the first maximum.

    Returns:
      ``S1, S2`` [T]: entry ``s - 1`` holds the areas after step s.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1); got {decay}")
    eta, drop = schedule_drops(lr, warmup=warmup)
    momentum = lfilter([1.0], [1.0, -decay], drop)  # m_t = decay m_{t-1} + drop_t, without a Python loop
    return np.cumsum(eta), np.cumsum(momentum)


def schedule_drops(lr, *, warmup: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The validated per-step learning rates ``eta`` [T] and their drops ``eta_{t-1} - eta_t`` [T] after the
    warmup (default: the steps before the first maximum), 0 before: the anneals both loss-curve laws sum."""
    eta = np.asarray(lr, dtype=np.float64)
    if eta.ndim != 1 or eta.size == 0:
        raise ValueError(f"lr must be a non-empty 1-D array of per-step learning rates; got {eta.shape}")
    bad = np.flatnonzero(~np.isfinite(eta) | (eta < 0))
    if bad.size:
        raise ValueError(f"lr must be finite and >= 0; steps {(bad[:10] + 1).tolist()} (1-based) hold "
                         f"{eta[bad[:3]].tolist()}")
    w = int(np.argmax(eta)) if warmup is None else int(warmup)
    if not 0 <= w < eta.size:
        raise ValueError(f"warmup must be in [0, {eta.size}) for a {eta.size}-step schedule; got {warmup}")
    drop = np.zeros_like(eta)
    drop[w + 1:] = eta[w:-1] - eta[w + 1:]  # warmup's rise is no anneal
    return eta, drop


def annealing_data(curves: Sequence[tuple], *, decay: float = 0.999, warmup: int | None = None) -> dict:
    """The law's fit data from measured loss curves.

    Args:
      curves: ``(lr, steps, loss)`` per run: its per-step schedule [T], the steps after which the loss was
        measured (1-based update counts, 1..T) and the losses there.
      decay, warmup: as in ``annealing_areas`` (the same for every curve).

    Returns:
      ``{"S1", "S2", "loss", "curve"}``: arrays over all measurements, ``curve`` the index of each one's run
      (for a fit on some curves and a check on others).
    """
    parts: dict[str, list] = {"S1": [], "S2": [], "loss": [], "curve": []}
    for i, (eta, idx, loss) in enumerate(checked_curves(curves)):
        s1, s2 = annealing_areas(eta, decay=decay, warmup=warmup)
        parts["S1"].append(s1[idx])
        parts["S2"].append(s2[idx])
        parts["loss"].append(loss)
        parts["curve"].append(np.full(loss.size, i))
    return {k: np.concatenate(v) for k, v in parts.items()}


def step_index(steps, n: int) -> np.ndarray:
    """0-based indices of ``steps`` (1-based update counts) into an ``n``-step schedule, checked: whole
    numbers within 1..n."""
    steps = np.asarray(steps)
    if not np.issubdtype(steps.dtype, np.integer) and not np.array_equal(steps, np.round(steps)):
        raise ValueError("steps must be whole update counts")
    steps = steps.astype(np.int64)
    out = np.flatnonzero((steps < 1) | (steps > n))
    if out.size:
        raise ValueError(f"steps {steps[out[:5]].tolist()} lie outside 1..{n} (the length of the schedule)")
    return steps - 1


def checked_curves(curves: Sequence[tuple]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(eta, step index, loss)`` per measured curve ``(lr, steps, loss)``, each checked as both loss-curve
    laws need it (``schedule_drops``, ``step_index``, losses finite and > 0); a message names the curve."""
    if not curves:
        raise ValueError("no curves given")
    out = []
    for i, curve in enumerate(curves):
        if len(curve) != 3:
            raise ValueError(f"curve {i} must be (lr, steps, loss); got {len(curve)} items")
        lr, steps, loss = curve
        loss = np.asarray(loss, dtype=np.float64).ravel()
        if np.ndim(steps) != 1 or np.size(steps) != loss.size:
            raise ValueError(f"curve {i}: {np.size(steps)} steps but {loss.size} losses")
        try:
            eta, _ = schedule_drops(lr)
            idx = step_index(steps, eta.size)
        except ValueError as e:
            raise ValueError(f"curve {i}: {e}") from None
        bad = np.flatnonzero(~np.isfinite(loss) | (loss <= 0))
        if bad.size:
            at = (idx[bad[:5]] + 1).tolist()
            raise ValueError(f"curve {i}: losses at steps {at} are not finite and > 0")
        out.append((eta, idx, loss))
    return out


@dataclass
class AnnealingFit:
    """The "lr_annealing" law fitted at the momentum that fits best.

    Attributes:
      decay: the chosen momentum ``lam``; warmup: as passed (None: each schedule's steps before its peak).
      fits_by_decay: the ``scaling.fit`` result at every momentum tried; curve: each fitted point's curve.
    """

    decay: float
    warmup: int | None
    fits_by_decay: dict[float, FitResult] = field(repr=False)
    curve: np.ndarray = field(repr=False)

    @property
    def result(self) -> FitResult:
        """The fit at ``decay`` (params, objective, diagnostics). For intervals use ``bootstrap``, which
        resamples blocks of each curve: ``result.bootstrap`` would resample single points as if independent,
        which points along a curve are not."""
        return self.fits_by_decay[self.decay]

    @property
    def objective_by_decay(self) -> dict[float, float]:
        """The fit's objective at every momentum tried (a flat profile: ``lam`` is not identified)."""
        return {lam: float(res.objective) for lam, res in self.fits_by_decay.items()}

    @property
    def params(self) -> dict[str, float]:
        return self.result.params

    @property
    def decay_at_edge(self) -> bool:
        """Whether the chosen momentum is the smallest or largest tried: the best may lie beyond the grid."""
        tried = sorted(self.objective_by_decay)
        return len(tried) > 1 and self.decay in (tried[0], tried[-1])

    def predict(self, lr, steps=None) -> np.ndarray:
        """The loss after each of ``steps`` (1-based; default every step) of a run with schedule ``lr``."""
        s1, s2 = _areas_at(lr, steps, decay=self.decay, warmup=self.warmup)
        return self.result.predict(S1=s1, S2=s2)

    def bootstrap(self, n: int = 1000, *, block: int | None = None, seed: int = 0) -> CurveBootstrap:
        """Refit on ``n`` circular block resamples of each curve (``scaling.bootstrap``, ``kind="blocks"``;
        ``block`` points per block, default ``scaling.bootstrap.block_length`` of each curve's residuals), at
        every momentum tried, each replicate keeping the momentum that fits it best: the choice of ``lam`` is
        part of the uncertainty. ``params`` holds L0, A, alpha, C and decay per replicate."""
        decays = sorted(self.fits_by_decay)
        fit = self.result
        w = np.asarray(fit.data["weights"])
        # one block length per curve for every momentum (from the chosen fit's residuals by default), and the
        # same seed: every momentum refits the same resamples, so their objectives compare per replicate
        blocks = series_blocks(fit.residuals, w, self.curve, block)
        boots = [bootstrap(self.fits_by_decay[lam], n, "blocks", groups=self.curve, block=blocks, seed=seed)
                 for lam in decays]
        obj_DxB = np.array([np.where(b.converged, b.objective, np.inf) for b in boots])
        best_B = np.argmin(obj_DxB, axis=0)
        ok = np.isfinite(obj_DxB.min(axis=0))
        rows = np.arange(n)
        params = {k: np.where(ok, np.array([b.values[k] for b in boots])[best_B, rows], np.nan)
                  for k in self.params}
        params["decay"] = np.where(ok, np.asarray(decays)[best_B], np.nan)
        return CurveBootstrap(params=params, converged=ok, residuals=fit.residuals[w > 0],
                              curve_fn=self._curves, blocks=blocks, seed=seed)

    def _curves(self, params: dict, lr, steps=None) -> np.ndarray:
        """[B, M] curves for replicate params (with per-replicate ``decay``), as ``predict`` gives one."""
        areas = {lam: _areas_at(lr, steps, decay=float(lam), warmup=self.warmup)
                 for lam in np.unique(params["decay"])}
        out = np.empty((params["decay"].size, next(iter(areas.values()))[0].size))
        law = self.result.law
        for lam, (s1, s2) in areas.items():
            rows = params["decay"] == lam
            p = {k: params[k][rows][:, None] for k in law.params}
            out[rows] = np.asarray(law.predict(p, S1=s1, S2=s2))
        return out

    def to_dict(self) -> dict:
        return {"law": "lr_annealing", "params": dict(self.params), "decay": self.decay,
                "warmup": self.warmup, "objective": self.result.objective, "converged": self.result.converged,
                "n_points": self.result.n_points, "decay_at_edge": self.decay_at_edge,
                "objective_by_decay": {str(k): v for k, v in self.objective_by_decay.items()}}


def _areas_at(lr, steps, *, decay: float, warmup: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``annealing_areas`` after each of ``steps`` (1-based, checked; None: every step)."""
    s1, s2 = annealing_areas(lr, decay=decay, warmup=warmup)
    if steps is None:
        return s1, s2
    idx = step_index(steps, s1.size)
    return s1[idx], s2[idx]


def fit_annealing(curves: Sequence[tuple], *, decays: Sequence[float] = DECAYS, warmup: int | None = None,
                  **fit_kwargs) -> AnnealingFit:
    """Fit Tissue et al.'s loss-curve law to measured curves, choosing the momentum ``lam`` from ``decays``.

    Args:
      curves: ``(lr, steps, loss)`` per run, as in ``annealing_data``. Curves under at least two schedules
        (e.g. constant and cosine) separate the forward term from the annealing term; a single constant-LR
        curve cannot identify C.
      decays: momenta to try; the one with the smallest objective wins (a profile over ``lam``).
      warmup: as in ``annealing_areas``.
      fit_kwargs: passed to ``scaling.fit`` (default: Huber delta 1e-3 on log residuals, as for Chinchilla).
    """
    if not len(decays):
        raise ValueError("decays is empty")
    warn = fit_kwargs.pop("warn", True)
    fits: dict[float, FitResult] = {}
    for lam in decays:
        data = annealing_data(curves, decay=lam, warmup=warmup)
        fits[float(lam)] = fit("lr_annealing", {k: data[k] for k in ("S1", "S2", "loss")}, warn=False,
                               **fit_kwargs)
    best = min(fits, key=lambda lam: fits[lam].objective)  # ties: the first momentum tried
    res = AnnealingFit(decay=best, warmup=warmup, fits_by_decay=fits, curve=data["curve"])
    if warn:  # the chosen fit's diagnostics only, not those of every momentum tried
        for msg in res.result.warnings:
            warnings.warn(f"fit_annealing (decay {res.decay}): {msg}", RuntimeWarning, stacklevel=2)
    return res
