"""Downstream capability: accuracy vs compute, the two-step method, the per-item view, and PassUntil.

- Sigmoid fits of a bounded score (accuracy) against log compute with a chance floor and a ceiling,
  ``acc(C) = floor + (ceiling - floor) * sigmoid(slope * (ln C - ln C_mid))``; the same form as the registry's
  "sigmoid" law (R0 = floor, A = ceiling, B = slope; Khatri et al. 2025), here with the floor/ceiling fixable.
- Two-step prediction (e.g. Llama 3 Team 2024, Sec. 3.2.1; Bhagia et al. 2024, "Establishing Task Scaling
  Laws via Compute-Efficient Model Ladders"): compute -> loss by a power law ``L = E + A C^-alpha``, then
  loss -> accuracy by a sigmoid in L; uncertainty from a joint bootstrap over models that refits both steps.
- Per-item view (Schaeffer et al. 2024, "Why Has Predicting Downstream Capabilities of Frontier AI Models with
  Scale Remained Elusive?"): from per-item log-probabilities of the correct and incorrect choices, the chain
  log p_vocab(correct) -> p_choice(correct) (mass normalised over the choices) -> accuracy, each fitted
  separately, with the per-item correlation with compute at each stage.
- PassUntil (Hu et al. 2024, "Predicting Emergent Abilities with Infinite Resolution Evaluation"): sample
  until k passes; maximum-likelihood (negative-binomial) pass rate with exact confidence interval; scaling fit
  ``PU(X) = exp(-c X^-alpha)`` (linear in log(-log PU) vs log X).

All fits are small nonlinear least-squares problems solved by a Levenberg-Marquardt loop vectorised over many
starts and bootstrap replicates at once (numpy float64; no compilation, so tests stay fast).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from scipy.special import expit

from scaling.intervals import percentile_interval

__all__ = [
    "SigmoidFit",
    "fit_sigmoid",
    "fit_accuracy_vs_compute",
    "LossPowerLaw",
    "fit_loss_power_law",
    "TwoStepFit",
    "fit_two_step",
    "item_scores",
    "PerItemAnalysis",
    "per_item_analysis",
    "PassRate",
    "passuntil_estimate",
    "simulate_passuntil",
    "task_pass_rate",
    "PassUntilScaling",
    "fit_passuntil_scaling",
    "heldout_error",
]

Model = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (theta_SxP, x_SxN) -> prediction_SxN


# --- batched Levenberg-Marquardt -----------------------------------------------------------------------
def _sse(model: Model, theta_SxP, x_SxN, y_SxN, w_SxN) -> np.ndarray:
    with np.errstate(all="ignore"):
        r = w_SxN * (model(theta_SxP, x_SxN) - y_SxN)
        sse = np.einsum("sn,sn->s", r, r)
    return np.where(np.isfinite(sse), sse, np.inf)


def _lm(model: Model, theta0_SxP, x_SxN, y_SxN, w_SxN, *, n_iter: int = 300, rtol: float = 1e-12):
    """Minimise sum_n (w (model - y))^2 for S independent problems at once; returns (theta_SxP, sse_S, ok_S).

    Central-difference Jacobians and a per-problem damping factor (Marquardt 1963). ``ok`` is False for
    problems that hit ``n_iter`` without the relative decrease dropping below ``rtol``.
    """
    theta = np.array(theta0_SxP, dtype=np.float64)
    s, p = theta.shape
    sse = _sse(model, theta, x_SxN, y_SxN, w_SxN)
    lam = np.full(s, 1e-3)
    done = ~np.isfinite(sse)
    eye = np.eye(p)
    for _ in range(n_iter):
        act = ~done
        if not act.any():
            break
        th, xa, ya, wa = theta[act], x_SxN[act], y_SxN[act], w_SxN[act]
        with np.errstate(all="ignore"):
            r = wa * (model(th, xa) - ya)
            h = 1e-6 * (1.0 + np.abs(th))
            jac = np.empty(r.shape + (p,))
            for j in range(p):
                tp, tm = th.copy(), th.copy()
                tp[:, j] += h[:, j]
                tm[:, j] -= h[:, j]
                jac[..., j] = wa * (model(tp, xa) - model(tm, xa)) / (2 * h[:, None, j])
        jac = np.nan_to_num(jac, nan=0.0, posinf=0.0, neginf=0.0)
        jtj = np.einsum("snp,snq->spq", jac, jac)
        g = np.einsum("snp,sn->sp", jac, np.nan_to_num(r))
        diag = np.einsum("spp->sp", jtj)
        damp = diag + 1e-9 * diag.max(axis=1, keepdims=True) + 1e-30
        a = jtj + lam[act, None, None] * eye * damp[:, None, :]
        delta = -np.einsum("spq,sq->sp", np.linalg.pinv(a), g)
        new = th + delta
        sse_new = _sse(model, new, xa, ya, wa)
        better = sse_new < sse[act]
        rel = (sse[act] - sse_new) / np.maximum(sse[act], 1e-300)
        idx = np.flatnonzero(act)
        theta[idx[better]] = new[better]
        sse[idx[better]] = sse_new[better]
        lam[idx] = np.where(better, lam[idx] / 3.0, lam[idx] * 4.0)
        # Converged: an accepted step that barely helps, or damping so large that no step helps (a minimum).
        done[idx] = (better & (rel < rtol)) | (lam[idx] > 1e14) | (sse[idx] == 0)
    return theta, sse, done


def _best_of_starts(model: Model, starts_SxP, x_N, y_N, w_N):
    s = len(starts_SxP)
    tile = lambda a: np.broadcast_to(a, (s, *a.shape)).copy()  # x may carry trailing axes (e.g. [N, K])
    theta, sse, ok = _lm(model, starts_SxP, tile(x_N), tile(y_N), tile(w_N))
    i = int(np.argmin(sse))
    # How many starts reached the best optimum (within 1e-6 relative): a robustness diagnostic.
    n_same = int(np.sum(sse <= sse[i] * (1 + 1e-6) + 1e-300))
    return theta[i], float(sse[i]), bool(ok[i]), n_same


def _check_xy(x, y, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"{names[0]} has {x.size} values but {names[1]} has {y.size}")
    for name, a in zip(names, (x, y), strict=True):
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name}: non-finite values in rows {np.flatnonzero(bad)[:10].tolist()}")
    return x, y


def _warn_if_bounds_miss_data(y, floor: float | None, ceiling: float | None, upper: float, who: str) -> None:
    """Warn when a fixed floor or ceiling cannot be the data's asymptote: most scores lie below the floor (or
    above the ceiling) by more than 5% of the range, or one lies beyond it by half the range. A wrong chance
    level (0.5 given for a task scored from 0) or a ceiling below the best models still "converges", to
    weights that mean nothing. Noise around a right bound leaves about half the scores beyond it, and only
    by a little, so the median is the test; a warning, not an error, because the bound is the user's call."""
    lo = 0.0 if floor is None else floor
    span = (upper if ceiling is None else ceiling) - lo
    med = float(np.median(y))
    if floor is not None and (med < floor - 0.05 * span or y.min() < floor - 0.5 * span):
        warnings.warn(f"{who}: the fixed floor {floor:g} lies above most of the scores (median {med:.3g}; "
                      f"{int((y < floor).sum())} of {y.size} below it): is the floor (chance level) right?",
                      UserWarning, stacklevel=3)
    if ceiling is not None and (med > ceiling + 0.05 * span or y.max() > ceiling + 0.5 * span):
        warnings.warn(f"{who}: the fixed ceiling {ceiling:g} lies below the scores (median {med:.3g}, max "
                      f"{y.max():.3g}; {int((y > ceiling).sum())} of {y.size} above it): is the ceiling "
                      "right?",
                      UserWarning, stacklevel=3)


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be {n} finite non-negative values")
    return np.sqrt(w)  # residuals are multiplied by sqrt(weight), so the objective is sum w r^2


# --- sigmoid -------------------------------------------------------------------------------------------
_MAX_LOG_SLOPE = 700.0  # exp(700) ~ 1e304, below float64's largest ~1.8e308


@dataclass(frozen=True)
class _SigmoidSpec:
    """Which of floor/ceiling are free, and the map theta -> (floor, ceiling, mid, slope)."""

    floor: float | None
    ceiling: float | None
    increasing: bool
    upper: float  # largest allowed ceiling when fitted (1 for accuracies)

    @property
    def n_params(self) -> int:
        return 2 + (self.floor is None) + (self.ceiling is None)

    def unpack(self, theta_SxP):
        # A step between two points (or data flat at a bound) drives the log-slope without limit; capped
        # where exp stays finite, the slope is a huge number instead of an overflow to inf (which JSON
        # cannot hold), and ``SigmoidFit.identified`` reports such a rise as not located.
        log_slope = np.minimum(theta_SxP[:, 1], _MAX_LOG_SLOPE)
        mid, slope = theta_SxP[:, 0], np.exp(log_slope) * (1.0 if self.increasing else -1.0)
        k = 2
        if self.floor is None and self.ceiling is None:
            floor = self.upper * expit(theta_SxP[:, 2])
            ceiling = floor + (self.upper - floor) * expit(theta_SxP[:, 3])
        elif self.floor is None:
            floor = self.ceiling * expit(theta_SxP[:, k])
            ceiling = np.full_like(mid, self.ceiling)
        elif self.ceiling is None:
            floor = np.full_like(mid, self.floor)
            ceiling = self.floor + (self.upper - self.floor) * expit(theta_SxP[:, k])
        else:
            floor, ceiling = np.full_like(mid, self.floor), np.full_like(mid, self.ceiling)
        return floor, ceiling, mid, slope

    def model(self, theta_SxP, x_SxN):
        floor, ceiling, mid, slope = self.unpack(theta_SxP)
        return floor[:, None] + (ceiling - floor)[:, None] * expit(slope[:, None] * (x_SxN - mid[:, None]))

    def starts(self, x_N) -> np.ndarray:
        lo, hi = float(x_N.min()), float(x_N.max())
        span = max(hi - lo, 1e-3)
        mids = np.linspace(lo - 0.5 * span, hi + 0.5 * span, 9)
        axes = [mids, np.log(np.array([0.5, 1, 2, 4, 8, 16]) / span)]
        axes += [np.array([-2.0, 0.0, 2.0])] * (self.n_params - 2)
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=-1)


@dataclass(frozen=True)
class SigmoidFit:
    """``y = floor + (ceiling - floor) * sigmoid(slope * (t(x) - mid))`` with t = ln (compute) or identity.

    Attributes:
      floor, ceiling, mid, slope: fitted (or fixed) values; ``mid`` is in transformed units (ln C for
        compute), ``C_mid = exp(mid)`` when ``transform == "log"``. slope < 0 for decreasing curves
        (accuracy vs loss).
      sse, n_points, converged, n_starts_at_optimum: fit diagnostics.
      samples: bootstrap (floor, ceiling, mid, slope) draws [B, 4], or None.
      t_range: (min, max) of the fitted inputs in transformed units, for ``identified``.
    """

    floor: float
    ceiling: float
    mid: float
    slope: float
    transform: str
    sse: float
    n_points: int
    converged: bool
    n_starts_at_optimum: int
    samples: np.ndarray | None = field(default=None, repr=False)
    t_range: tuple[float, float] | None = None

    @property
    def identified(self) -> bool | None:
        """Whether the data locate the curve's rise: its 10-90% transition, mid ± ln 9 / |slope|, overlaps the
        fitted inputs' range and is wider than a thousandth of it. A curve flat over its data (all at chance,
        or all at the ceiling) fits any midpoint beyond them and any steepness: its predictions there are
        right, but its mid and slope mean nothing, nor does where it says the rise will come. None: no range
        recorded."""
        if self.t_range is None:
            return None
        lo, hi = self.t_range
        half = np.log(9.0) / abs(self.slope) if self.slope else np.inf
        return bool(self.mid - half < hi and self.mid + half > lo and 2 * half > 1e-3 * max(hi - lo, 1e-12))

    def _t(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.log(x) if self.transform == "log" else x

    def predict(self, x) -> np.ndarray:
        return self.floor + (self.ceiling - self.floor) * expit(self.slope * (self._t(x) - self.mid))

    def predict_samples(self, x) -> np.ndarray:
        """Predictions of every bootstrap draw, [B, len(x)]."""
        if self.samples is None:
            raise ValueError("no bootstrap samples: fit with n_boot > 0")
        f, c, m, s = (self.samples[:, i, None] for i in range(4))
        return f + (c - f) * expit(s * (self._t(np.atleast_1d(x))[None, :] - m))

    def interval(self, x, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile bootstrap interval of the fitted curve (parameter uncertainty)."""
        return percentile_interval(self.predict_samples(x), level)

    @property
    def law_params(self) -> dict[str, float]:
        """Parameters in the registry's "sigmoid" law naming (R0, A, C_mid, B); only for compute inputs."""
        if self.transform != "log" or self.slope <= 0:
            raise ValueError("law_params needs an increasing fit against compute (transform='log')")
        return {"R0": self.floor, "A": self.ceiling, "C_mid": float(np.exp(self.mid)), "B": self.slope}

    def to_dict(self, level: float = 0.95) -> dict:
        """Every fitted value and diagnostic; with bootstrap samples also ``n_boot`` and percentile ``ci``
        (at ``level``) of floor, ceiling, mid and slope."""
        out = {
            "floor": self.floor, "ceiling": self.ceiling, "mid": self.mid, "slope": self.slope,
            "transform": self.transform, "sse": self.sse, "n_points": self.n_points,
            "converged": self.converged, "n_starts_at_optimum": self.n_starts_at_optimum,
            "identified": self.identified,
        }
        if self.samples is not None and len(self.samples):
            lo, hi = percentile_interval(self.samples, level)
            out.update(n_boot=len(self.samples), ci_level=level, ci={
                k: [float(lo[i]), float(hi[i])] for i, k in enumerate(("floor", "ceiling", "mid", "slope"))})
        return out


def fit_sigmoid(
    x,
    y,
    *,
    floor: float | None = 0.0,
    ceiling: float | None = 1.0,
    increasing: bool = True,
    transform: str = "identity",
    upper: float = 1.0,
    weights=None,
    n_boot: int = 0,
    seed: int = 0,
) -> SigmoidFit:
    """Least-squares sigmoid fit with optional fixed floor/ceiling, multi-start, optional bootstrap.

    Args:
      x, y: inputs and bounded scores (e.g. accuracy in [0, 1]).
      floor: fixed lower asymptote (chance accuracy, e.g. 0.25 for 4 choices), or None to fit it.
      ceiling: fixed upper asymptote (1.0; or e.g. 1 - label-noise rate), or None to fit it in (floor, upper).
      increasing: False for scores that fall with x (accuracy vs loss).
      transform: "log" to fit against ln x (compute), "identity" otherwise.
      n_boot: bootstrap replicates (resampling points), refitted all at once from the optimum.
    """
    if transform not in ("log", "identity"):
        raise ValueError(f"transform must be 'log' or 'identity'; got {transform!r}")
    x, y = _check_xy(x, y, ("x", "y"))
    if transform == "log":
        if (x <= 0).any():
            bad = np.flatnonzero(x <= 0)[:10].tolist()
            raise ValueError(f"x must be > 0 for transform='log'; rows {bad}")
        t = np.log(x)
    else:
        t = x
    if floor is not None and ceiling is not None and not floor < ceiling:
        raise ValueError(f"floor ({floor}) must be below ceiling ({ceiling})")
    _warn_if_bounds_miss_data(y, floor, ceiling, upper, "fit_sigmoid")
    spec = _SigmoidSpec(floor, ceiling, increasing, upper)
    if x.size < spec.n_params + 1:
        raise ValueError(f"{x.size} points are too few for a sigmoid with {spec.n_params} free parameters")
    w = _weights(weights, x.size)
    theta, sse, ok, n_same = _best_of_starts(spec.model, spec.starts(t), t, y, w)
    samples = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx_BxN = rng.integers(0, x.size, size=(n_boot, x.size))
        th_B, _, _ = _lm(spec.model, np.broadcast_to(theta, (n_boot, theta.size)), t[idx_BxN], y[idx_BxN],
                         w[idx_BxN])
        samples = np.stack(spec.unpack(th_B), axis=1)
    f, c, m, s = (float(v[0]) for v in spec.unpack(theta[None]))
    return SigmoidFit(f, c, m, s, transform, sse, int(x.size), ok, n_same, samples,
                      (float(t.min()), float(t.max())))


def fit_accuracy_vs_compute(
    compute, accuracy, *, chance: float = 0.0, ceiling: float | None = 1.0, n_boot: int = 0, seed: int = 0
) -> SigmoidFit:
    """Sigmoid of accuracy in log compute, floored at chance (e.g. 0.25 for 4-way multiple choice).
    Accuracies are fractions in [0, 1]: percentages are refused (a sigmoid bounded by 1 through points at
    25-95 "converges" to nonsense)."""
    acc = np.asarray(accuracy, dtype=np.float64)
    out = np.flatnonzero((acc < 0) | (acc > 1))
    if out.size:
        hint = " (percentages? divide by 100)" if np.nanmax(acc) <= 100 and np.nanmin(acc) >= 0 else ""
        raise ValueError(f"accuracy must be in [0, 1]; rows {out[:10].tolist()} hold "
                         f"{[float(a) for a in acc[out[:3]]]}{hint}")
    if not 0 <= chance < 1:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return fit_sigmoid(compute, accuracy, floor=chance, ceiling=ceiling, transform="log", n_boot=n_boot,
                       seed=seed)


# --- step 1: compute -> loss ---------------------------------------------------------------------------
def _loss_model(ref: float):
    # L = E + A (C / C_ref)^-alpha, fitted on log L; theta = (log E, log A, log alpha). C_ref (geometric mean
    # of the data) keeps A of order one, which is what makes this 3-parameter problem well conditioned.
    def model(theta_SxP, lnc_SxN):
        e, a, al = (np.exp(theta_SxP[:, i, None]) for i in range(3))
        return np.log(e + a * np.exp(-al * (lnc_SxN - ref)))

    return model


@dataclass(frozen=True)
class LossPowerLaw:
    """``L(C) = E + A * C^-alpha``, saturating power law in compute (Kaplan et al. 2020;
    Hoffmann et al. 2022).

    ``A`` is reported at the reference ``C_ref``: L = E + A_ref (C / C_ref)^-alpha (A = A_ref C_ref^alpha).
    """

    E: float
    A_ref: float
    alpha: float
    C_ref: float
    sse: float
    converged: bool
    samples: np.ndarray | None = field(default=None, repr=False)  # [B, 3] of (E, A_ref, alpha)

    def predict(self, compute) -> np.ndarray:
        c = np.asarray(compute, dtype=np.float64)
        return self.E + self.A_ref * (c / self.C_ref) ** -self.alpha

    def predict_samples(self, compute) -> np.ndarray:
        if self.samples is None:
            raise ValueError("no bootstrap samples: fit with n_boot > 0")
        c = np.atleast_1d(np.asarray(compute, dtype=np.float64))[None, :]
        e, a, al = (self.samples[:, i, None] for i in range(3))
        # A degenerate draw (a huge alpha) diverges below C_ref: +inf is its honest prediction there, and
        # percentiles over the draws handle it, so the overflow is not worth a warning.
        with np.errstate(over="ignore"):
            return e + a * (c / self.C_ref) ** -al

    def to_dict(self) -> dict:
        return {"E": self.E, "A_ref": self.A_ref, "alpha": self.alpha, "C_ref": self.C_ref, "sse": self.sse,
                "converged": self.converged}


def _loss_starts(loss_N) -> np.ndarray:
    lmin, lmean = float(loss_N.min()), float(loss_N.mean())
    rows = []
    for fe in (0.2, 0.6, 0.9):
        for al in (0.02, 0.05, 0.1, 0.2, 0.4):
            rows.append([np.log(fe * lmin), np.log(max(lmean - fe * lmin, 1e-3)), np.log(al)])
    return np.array(rows)


def fit_loss_power_law(compute, loss, *, n_boot: int = 0, seed: int = 0, idx_BxN=None) -> LossPowerLaw:
    """Fit ``L = E + A C^-alpha`` by least squares on log L; multi-start; bootstrap (n_boot or indices)."""
    c, loss = _check_xy(compute, loss, ("compute", "loss"))
    if (c <= 0).any() or (loss <= 0).any():
        raise ValueError("compute and loss must be > 0")
    if c.size < 4:
        raise ValueError(f"{c.size} points are too few for a 3-parameter power law")
    lnc, ref = np.log(c), float(np.mean(np.log(c)))
    model = _loss_model(ref)
    w = np.ones_like(lnc)
    theta, sse, ok, _ = _best_of_starts(model, _loss_starts(loss), lnc, np.log(loss), w)
    samples = None
    if idx_BxN is None and n_boot > 0:
        idx_BxN = np.random.default_rng(seed).integers(0, c.size, size=(n_boot, c.size))
    if idx_BxN is not None:
        b = len(idx_BxN)
        y_BxN = np.log(loss)[idx_BxN]
        th_B, _, _ = _lm(model, np.broadcast_to(theta, (b, 3)), lnc[idx_BxN], y_BxN, w[idx_BxN])
        samples = np.exp(th_B)
    e, a, al = np.exp(theta)
    return LossPowerLaw(float(e), float(a), float(al), float(np.exp(ref)), sse, ok, samples)


# --- two-step ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwoStepFit:
    """compute -> loss (``loss_fit``) -> accuracy (``acc_fit``, a decreasing sigmoid in loss).

    Bootstrap draws of both steps come from the SAME resampled models, so their correlation is kept when the
    uncertainty is propagated: prediction draw b is ``acc_fit_b(loss_fit_b(C))``.
    """

    loss_fit: LossPowerLaw
    acc_fit: SigmoidFit

    def predict(self, compute) -> np.ndarray:
        return self.acc_fit.predict(self.loss_fit.predict(compute))

    def predict_samples(self, compute) -> np.ndarray:
        loss_BxM = self.loss_fit.predict_samples(compute)
        s = self.acc_fit.samples
        if s is None:
            raise ValueError("no bootstrap samples: fit with n_boot > 0")
        f, c, m, k = (s[:, i, None] for i in range(4))
        return f + (c - f) * expit(k * (loss_BxM - m))

    def interval(self, compute, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        return percentile_interval(self.predict_samples(compute), level)


def fit_two_step(
    compute,
    loss,
    accuracy,
    *,
    chance: float = 0.0,
    ceiling: float | None = 1.0,
    n_boot: int = 0,
    seed: int = 0,
) -> TwoStepFit:
    """Fit compute -> loss and loss -> accuracy separately on the same models; joint bootstrap if n_boot > 0.

    ``loss`` is the model's loss on the task (or a general validation loss), one value per model.
    """
    c, loss = _check_xy(compute, loss, ("compute", "loss"))
    _, acc = _check_xy(compute, accuracy, ("compute", "accuracy"))
    idx = np.random.default_rng(seed).integers(0, c.size, size=(n_boot, c.size)) if n_boot > 0 else None
    lf = fit_loss_power_law(c, loss, idx_BxN=idx)
    spec = _SigmoidSpec(chance, ceiling, increasing=False, upper=1.0)
    af = fit_sigmoid(loss, acc, floor=chance, ceiling=ceiling, increasing=False)
    if idx is not None:
        theta0 = np.array([af.mid, np.log(abs(af.slope))] + _free_theta(af, spec))
        th_B, _, _ = _lm(spec.model, np.broadcast_to(theta0, (n_boot, theta0.size)), loss[idx], acc[idx],
                         np.ones_like(loss)[idx])
        af = SigmoidFit(**{**af.__dict__, "samples": np.stack(spec.unpack(th_B), axis=1)})
    return TwoStepFit(lf, af)


def _free_theta(fit: SigmoidFit, spec: _SigmoidSpec) -> list[float]:
    """Inverse of _SigmoidSpec.unpack for the free floor/ceiling coordinates."""
    logit = lambda p: float(np.log(p / (1 - p)))
    clip = lambda p: min(max(p, 1e-9), 1 - 1e-9)
    if spec.floor is None and spec.ceiling is None:
        return [logit(clip(fit.floor / spec.upper)),
                logit(clip((fit.ceiling - fit.floor) / (spec.upper - fit.floor)))]
    if spec.floor is None:
        return [logit(clip(fit.floor / spec.ceiling))]
    if spec.ceiling is None:
        return [logit(clip((fit.ceiling - spec.floor) / (spec.upper - spec.floor)))]
    return []


# --- per-item view (Schaeffer et al. 2024) -------------------------------------------------------------
def item_scores(logprob_correct_MxI, logprob_incorrect_MxIxK) -> dict[str, np.ndarray]:
    """Per-(model, item) scores from log-probabilities of the correct and the incorrect choices.

    Args:
      logprob_correct_MxI: log p_vocab of the correct choice, per model and item.
      logprob_incorrect_MxIxK: log p_vocab of each incorrect choice (NaN or -inf pads items with fewer
        choices).
    Returns dict of [M, I] arrays: "logprob_correct", "p_vocab_correct", "p_choice_correct" (correct choice's
    probability renormalised over the available choices), "brier" (multiclass Brier score of the normalised
    choice distribution), "correct" (1.0 if the correct choice has the strictly highest probability).
    """
    lc = np.asarray(logprob_correct_MxI, dtype=np.float64)
    li = np.asarray(logprob_incorrect_MxIxK, dtype=np.float64)
    if li.ndim == lc.ndim:  # a single incorrect choice per item
        li = li[..., None]
    if lc.ndim != 2 or li.shape[:2] != lc.shape:
        raise ValueError(f"logprob_correct must be [M, I] and logprob_incorrect [M, I, K]; got {lc.shape}, "
                         f"{li.shape}")
    if not np.isfinite(lc).all():
        raise ValueError("logprob_correct must be finite (the correct choice needs a probability)")
    if (lc > 1e-9).any() or (np.nan_to_num(li, nan=-np.inf) > 1e-9).any():
        raise ValueError("log-probabilities must be <= 0")
    li = np.where(np.isnan(li), -np.inf, li)
    all_MxIxK = np.concatenate([lc[..., None], li], axis=-1)
    norm = np.logaddexp.reduce(all_MxIxK, axis=-1)
    p_choice = np.exp(all_MxIxK - norm[..., None])
    onehot = np.zeros_like(p_choice)
    onehot[..., 0] = 1.0
    return {
        "logprob_correct": lc,
        "p_vocab_correct": np.exp(lc),
        "p_choice_correct": p_choice[..., 0],
        "brier": ((p_choice - onehot) ** 2).sum(-1),
        "correct": (lc > li.max(axis=-1)).astype(np.float64),
    }


def _rowwise_corr(a_MxI: np.ndarray, b_M: np.ndarray) -> np.ndarray:
    """Pearson correlation across models between each item's score and b (NaN for constant items)."""
    a = a_MxI - a_MxI.mean(0)
    b = (b_M - b_M.mean())[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


@dataclass(frozen=True)
class PerItemAnalysis:
    """Stages of Schaeffer et al. (2024): per-model means, per-item correlation with log compute, and fits.

    Attributes:
      compute: [M].
      means: stage -> per-model mean score [M] ("neg_logprob_correct", "p_choice_correct", "accuracy", ...).
      item_corr: stage -> per-item Pearson correlation across models of the score with log compute [I]
        (stages "logprob_correct", "p_vocab_correct", "p_choice_correct", "accuracy"; higher = better).
      fits: "neg_logprob_correct" -> LossPowerLaw; "p_choice_correct" and "accuracy" -> SigmoidFit.
    """

    compute: np.ndarray
    means: dict[str, np.ndarray]
    item_corr: dict[str, np.ndarray]
    fits: dict[str, object]

    def median_corr(self) -> dict[str, float]:
        return {k: float(np.nanmedian(v)) for k, v in self.item_corr.items()}


def per_item_analysis(
    compute_M, logprob_correct_MxI, logprob_incorrect_MxIxK, *, chance: float | None = None
) -> PerItemAnalysis:
    """Fit each stage of the per-item chain separately against compute.

    Stage 1: mean negative log p_vocab(correct) vs C (power law with offset); stage 2: mean p_choice(correct)
    vs C (sigmoid, floor = chance); stage 3: accuracy vs C (sigmoid, floor = chance). ``chance`` defaults to
    the mean over items of 1 / (number of choices), NaN-padded choices not counted.
    """
    c = np.asarray(compute_M, dtype=np.float64).ravel()
    sc = item_scores(logprob_correct_MxI, logprob_incorrect_MxIxK)
    if c.size != sc["correct"].shape[0]:
        raise ValueError(f"compute has {c.size} models but the log-probs have {sc['correct'].shape[0]}")
    if chance is None:  # mean over items of 1 / (its number of choices): NaN-padded choices do not count
        li = np.asarray(logprob_incorrect_MxIxK, dtype=np.float64)
        li = li if li.ndim == 3 else li[..., None]
        chance = float(np.mean(1.0 / (1 + np.isfinite(li[0]).sum(-1))))
    means = {
        "neg_logprob_correct": -sc["logprob_correct"].mean(1),
        "p_vocab_correct": sc["p_vocab_correct"].mean(1),
        "p_choice_correct": sc["p_choice_correct"].mean(1),
        "brier": sc["brier"].mean(1),
        "accuracy": sc["correct"].mean(1),
    }
    lc = np.log(c)
    item_corr = {
        "logprob_correct": _rowwise_corr(sc["logprob_correct"], lc),
        "p_vocab_correct": _rowwise_corr(sc["p_vocab_correct"], lc),
        "p_choice_correct": _rowwise_corr(sc["p_choice_correct"], lc),
        "accuracy": _rowwise_corr(sc["correct"], lc),
    }
    fits = {
        "neg_logprob_correct": fit_loss_power_law(c, means["neg_logprob_correct"]),
        "p_choice_correct": fit_accuracy_vs_compute(c, means["p_choice_correct"], chance=chance),
        "accuracy": fit_accuracy_vs_compute(c, means["accuracy"], chance=chance),
    }
    return PerItemAnalysis(c, means, item_corr, fits)


# --- PassUntil (Hu et al. 2024) ------------------------------------------------------------------------
@dataclass(frozen=True)
class PassRate:
    """Per-instance pass-rate estimates with exact confidence intervals (arrays of one shape)."""

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    successes: np.ndarray
    trials: np.ndarray


def passuntil_estimate(successes, trials, *, k: int | None = None, level: float = 0.95,
                       unbiased: bool = False) -> PassRate:
    """Pass rate from "sample until k passes (or a budget)" counts.

    The likelihood is p^s (1 - p)^(n - s) whatever the stopping rule, so the MLE is s / n (the
    negative-binomial MLE k / n when sampling stopped at the k-th pass). ``unbiased=True`` returns
    (k - 1) / (n - 1) for stopped runs, the unbiased estimator of inverse binomial sampling (Haldane 1945;
    needs k >= 2).
    Intervals: when sampling stopped at the k-th pass (s == k, given), the exact inverse-sampling interval
    [Beta_{a/2}(k, n - k + 1), Beta_{1 - a/2}(k, n - k)]; otherwise (budget exhausted, or k not given)
    Clopper-Pearson [Beta_{a/2}(s, n - s + 1), Beta_{1 - a/2}(s + 1, n - s)].
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    s, n = np.broadcast_arrays(s, n)
    integer = (s == np.round(s)).all() and (n == np.round(n)).all()
    if (s < 0).any() or (n < 1).any() or (s > n).any() or not integer:
        raise ValueError("need integer counts with 0 <= successes <= trials and trials >= 1")
    a = 1 - level
    stopped = (s == k) if k is not None else np.zeros(s.shape, dtype=bool)
    if unbiased:
        if k is None or k < 2:
            raise ValueError("unbiased=True needs the stopping count k >= 2")
        est = np.where(stopped, (s - 1) / np.maximum(n - 1, 1), s / n)
    else:
        est = s / n
    with np.errstate(all="ignore"):
        lo = np.where(s > 0, stats.beta.ppf(a / 2, np.maximum(s, 1), n - s + 1), 0.0)
        up_cp = np.where(s < n, stats.beta.ppf(1 - a / 2, s + 1, np.maximum(n - s, 1)), 1.0)
        up_nb = np.where(n > s, stats.beta.ppf(1 - a / 2, np.maximum(s, 1), np.maximum(n - s, 1)), 1.0)
    up = np.where(stopped, up_nb, up_cp)
    return PassRate(est, lo, up, s, n)


def simulate_passuntil(p, k: int, max_trials: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Simulate PassUntil: draw until k passes or max_trials; returns (successes, trials) per entry of p."""
    p = np.asarray(p, dtype=np.float64)
    if (p <= 0).any() or (p > 1).any():
        raise ValueError("pass rates must be in (0, 1]")
    rng = np.random.default_rng(seed)
    t = k + rng.negative_binomial(k, p)  # trial index of the k-th pass
    stopped = t <= max_trials
    # Censored: the number of passes in max_trials is Binomial(max_trials, p) conditioned on being < k.
    pmf = stats.binom.pmf(np.arange(k)[:, None], max_trials, p.ravel()[None, :])
    cdf = np.cumsum(pmf, 0) / np.maximum(pmf.sum(0), 1e-300)
    u = rng.random(p.size)
    cens = (u[None, :] > cdf).sum(0).reshape(p.shape)
    return np.where(stopped, k, cens), np.where(stopped, t, max_trials)


def task_pass_rate(successes, trials, *, k: int | None = None, unbiased: bool = False, level: float = 0.95,
                   n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Task-level pass rate = mean of per-instance estimates, with a bootstrap-over-instances interval.

    Returns (estimate, lower, upper). ``k``/``unbiased`` as in ``passuntil_estimate``: the per-instance MLE
    k / n overstates tiny rates by about k / (k - 1), so prefer ``unbiased=True`` when k >= 2.
    """
    est = passuntil_estimate(successes, trials, k=k, unbiased=unbiased).estimate.ravel()
    rng = np.random.default_rng(seed)
    boot = est[rng.integers(0, est.size, size=(n_boot, est.size))].mean(1)
    lo, hi = percentile_interval(boot, level)
    return float(est.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class PassUntilScaling:
    """``PU(X) = exp(-c X^-alpha)``, i.e. log(-log PU) = log c - alpha log X (Hu et al. 2024's task law)."""

    c: float
    alpha: float
    alpha_se: float
    n_points: int

    def predict(self, x) -> np.ndarray:
        return np.exp(-self.c * np.asarray(x, dtype=np.float64) ** -self.alpha)


def fit_passuntil_scaling(x, pass_rate, *, weights=None) -> PassUntilScaling:
    """(Weighted) least squares of log(-log PU) on log X, X = parameters or compute; PU must be in (0, 1)."""
    x, pu = _check_xy(x, pass_rate, ("x", "pass_rate"))
    if (x <= 0).any() or (pu <= 0).any() or (pu >= 1).any():
        raise ValueError("need x > 0 and 0 < pass_rate < 1")
    if x.size < 3:
        raise ValueError("need at least 3 points")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    lx, ly = np.log(x), np.log(-np.log(pu))
    a_mat = np.stack([np.ones_like(lx), lx], 1) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(a_mat, ly * np.sqrt(w), rcond=None)
    resid = ly * np.sqrt(w) - a_mat @ coef
    cov = np.linalg.inv(a_mat.T @ a_mat) * (resid @ resid) / max(x.size - 2, 1)
    return PassUntilScaling(float(np.exp(coef[0])), float(-coef[1]), float(np.sqrt(cov[1, 1])), int(x.size))


# --- held-out evaluation -------------------------------------------------------------------------------
def heldout_error(
    compute, score, *, cutoff: float, chance: float = 0.0, ceiling: float | None = 1.0
) -> dict[str, float]:
    """Fit the sigmoid on models with compute < cutoff, predict those >= cutoff.

    Returns mean/median absolute error on the held-out models, the same for a constant baseline (training
    mean), and the counts. The extrapolation check of observational scaling work (Ruan et al. 2024).
    """
    c, y = _check_xy(compute, score, ("compute", "score"))
    train = c < cutoff
    if train.sum() < 4 or (~train).sum() < 1:
        n_tr, n_te = int(train.sum()), int((~train).sum())
        raise ValueError(f"cutoff {cutoff:g} leaves {n_tr} training and {n_te} held-out points")
    fit = fit_accuracy_vs_compute(c[train], y[train], chance=chance, ceiling=ceiling)
    err = np.abs(fit.predict(c[~train]) - y[~train])
    base = np.abs(y[train].mean() - y[~train])
    return {
        "mae": float(err.mean()), "median_ae": float(np.median(err)), "baseline_mae": float(base.mean()),
        "n_train": int(train.sum()), "n_test": int((~train).sum()),
    }
