"""Observational scaling laws (Ruan, Maddison & Hashimoto 2024, "Observational Scaling Laws and the
Predictability of Language Model Performance", arXiv:2405.10938).

Instead of training a ladder of models, use the public ones: their scores on a few standard benchmarks lie
close to a low-dimensional "capability" space, and a harder downstream metric (an emergent task, an agent
benchmark, a post-training gain) is a sigmoid of a linear function of those capabilities. The steps:

1. ``capability_pca``: principal components of the model x benchmark score matrix (centred, unscaled: the
   scores share a 0-1 scale), after filling missing scores by iterative low-rank imputation
   (``impute_low_rank``; the paper imputes with one component). PC-1 is the "general capability" axis.
2. ``fit_family_compute``: within a model family, each capability is linear in log training compute, and
   families differ in compute efficiency. Here the slope is shared across families (pooled) and each family
   has its own intercept, which makes one family's compute comparable to another's (``efficiency``).
3. ``fit_observational``: the downstream metric as ``floor + (ceiling - floor) * sigmoid(w . S + b)`` of the
   top-K capabilities S, with a chance floor and a fixed or fitted ceiling, and a bootstrap over models.
   ``equivalent_log_compute`` maps a model's fitted capability index ``w . S`` onto a reference family's log
   compute: the x-axis on which the paper draws its scaling curves.

Predictions for held-out models need only their benchmark scores (``CapabilityPCA.transform``, which
handles missing entries), so a sigmoid fitted on small models predicts a larger one before anyone runs the
expensive evaluation -- the extrapolation the paper tests with a compute cutoff.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit

from scaling.downstream import _best_of_starts, _lm, _warn_if_bounds_miss_data
from scaling.intervals import percentile_interval

__all__ = [
    "impute_low_rank",
    "CapabilityPCA",
    "capability_pca",
    "FamilyComputeFit",
    "fit_family_compute",
    "ObservationalFit",
    "fit_observational",
    "equivalent_log_compute",
]


def _score_matrix(scores, name: str = "scores") -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (models x benchmarks) array; got shape {x.shape}")
    inf = np.argwhere(np.isinf(x))
    if len(inf):
        raise ValueError(f"{name}: infinite values at (row, column) {inf[:5].tolist()}")
    return x


def impute_low_rank(scores_MxB, rank: int = 1, *, max_iter: int = 1000, tol: float = 1e-10):
    """Fill the NaN entries of a models x benchmarks matrix with a rank-``rank`` PCA reconstruction.

    Iterative (EM-style) SVD imputation: start from column means, then repeatedly fit the column means plus
    the top-``rank`` singular vectors of the filled, centred matrix and replace the missing entries by that
    reconstruction, until the largest change is below ``tol``. Observed entries are never changed. Ruan et al.
    2024 impute with one component. Returns ``(filled_MxB, n_iter)``.
    """
    x = _score_matrix(scores_MxB)
    miss = np.isnan(x)
    if not 1 <= rank < min(x.shape):
        raise ValueError(f"rank must be in [1, {min(x.shape) - 1}] for a {x.shape} matrix; got {rank}")
    empty_cols = np.flatnonzero(miss.all(axis=0))
    empty_rows = np.flatnonzero(miss.all(axis=1))
    if len(empty_cols) or len(empty_rows):
        raise ValueError(f"nothing observed in columns {empty_cols.tolist()} / rows {empty_rows.tolist()}: "
                         "drop them before imputing")
    filled = np.where(miss, np.nanmean(x, axis=0), x)
    if not miss.any():
        return filled, 0
    for it in range(1, max_iter + 1):
        mean = filled.mean(axis=0)
        u, s, vt = np.linalg.svd(filled - mean, full_matrices=False)
        recon = mean + (u[:, :rank] * s[:rank]) @ vt[:rank]
        change = np.max(np.abs(recon[miss] - filled[miss]))
        filled[miss] = recon[miss]
        if change < tol:
            return filled, it
    warnings.warn(f"low-rank imputation stopped at max_iter={max_iter} with a last change of {change:.3g} "
                  f"(tol {tol:g})", RuntimeWarning, stacklevel=2)
    return filled, max_iter


@dataclass(frozen=True)
class CapabilityPCA:
    """Principal capability components of a score matrix.

    Attributes:
      mean: per-benchmark mean of the (imputed) training scores, [B].
      components: orthonormal loadings, [K, B]; each signed so that its loadings sum to >= 0 (a higher PC-1
        is a more capable model).
      explained_variance_ratio: share of the total variance of each component, [K] (of all components, not
        only the K kept).
      scores: the training models' capabilities, [M, K].
      imputed: the training score matrix with its missing entries filled, [M, B].
      names: benchmark names, when given.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    scores: np.ndarray
    imputed: np.ndarray = field(repr=False)
    n_imputed: int = 0
    names: tuple[str, ...] | None = None

    def transform(self, scores_MxB) -> np.ndarray:
        """Capabilities [M, K] of (new) models from their benchmark scores; a row with missing scores is
        projected by least squares on its observed columns, which needs at least K of them."""
        x = _score_matrix(scores_MxB)
        if x.shape[1] != self.mean.size:
            raise ValueError(f"scores have {x.shape[1]} benchmarks; the PCA was fitted on {self.mean.size}")
        k = self.components.shape[0]
        out = np.empty((x.shape[0], k))
        obs = ~np.isnan(x)
        full = obs.all(axis=1)
        out[full] = (x[full] - self.mean) @ self.components.T
        for i in np.flatnonzero(~full):
            cols = obs[i]
            if cols.sum() < k:
                raise ValueError(f"row {i} has {int(cols.sum())} observed scores; {k} components need {k}")
            v = self.components[:, cols].T  # [observed, K]
            out[i] = np.linalg.lstsq(v, x[i, cols] - self.mean[cols], rcond=None)[0]
        return out


def capability_pca(scores_MxB, n_components: int = 3, *, impute_rank: int = 1,
                   names: Sequence[str] | None = None) -> CapabilityPCA:
    """PCA of a models x benchmarks score matrix (NaN = not evaluated), as in Ruan et al. 2024.

    Missing scores are filled by ``impute_low_rank(rank=impute_rank)``; the components are those of the
    centred, unscaled filled matrix (scores on a common 0-1 scale keep their own spread). ``n_components``:
    the paper keeps 3 for most targets (they explain ~97% of the variance of its 8 benchmarks).
    """
    x = _score_matrix(scores_MxB)
    m, b = x.shape
    if not 1 <= n_components <= min(m - 1, b):
        raise ValueError(f"n_components must be in [1, {min(m - 1, b)}] for {m} models and {b} benchmarks; "
                         f"got {n_components}")
    if names is not None and len(names) != b:
        raise ValueError(f"{len(names)} names for {b} benchmarks")
    n_missing = int(np.isnan(x).sum())
    filled = impute_low_rank(x, impute_rank)[0] if n_missing else x
    mean = filled.mean(axis=0)
    _, s, vt = np.linalg.svd(filled - mean, full_matrices=False)
    comps = vt[:n_components] * np.where(vt[:n_components].sum(axis=1) < 0, -1.0, 1.0)[:, None]
    var = s**2
    return CapabilityPCA(
        mean=mean, components=comps, explained_variance_ratio=var[:n_components] / var.sum(),
        scores=(filled - mean) @ comps.T, imputed=filled, n_imputed=n_missing,
        names=tuple(names) if names is not None else None,
    )


@dataclass(frozen=True)
class FamilyComputeFit:
    """``S_k = slope_k * ln C + intercept_{family, k}`` for each capability k (ordinary least squares).

    Attributes:
      slope: [K] shared slopes per nat of compute; slope_se: their standard errors.
      intercepts: family -> [K] intercepts.
      r2: [K] coefficient of determination of each component's fit; residual_sd: [K].
      n_models: family -> number of models.
    """

    slope: np.ndarray
    slope_se: np.ndarray
    intercepts: dict[str, np.ndarray]
    r2: np.ndarray
    residual_sd: np.ndarray
    n_models: dict[str, int]

    def predict(self, compute, family: str) -> np.ndarray:
        """Capabilities [len(compute), K] a model of ``family`` trained with ``compute`` FLOPs would have."""
        if family not in self.intercepts:
            raise KeyError(f"unknown family {family!r}; fitted: {sorted(self.intercepts)}")
        c = np.atleast_1d(np.asarray(compute, dtype=np.float64))
        return np.log(c)[:, None] * self.slope + self.intercepts[family]

    def efficiency(self, family: str, reference: str, component: int = 0) -> float:
        """How many times more compute ``reference`` needs than ``family`` for the same capability
        ``component``: ``exp((b_family - b_reference) / slope)`` (> 1: ``family`` is more efficient)."""
        for f in (family, reference):
            if f not in self.intercepts:
                raise KeyError(f"unknown family {f!r}; fitted: {sorted(self.intercepts)}")
        d = self.intercepts[family][component] - self.intercepts[reference][component]
        return float(np.exp(d / self.slope[component]))

    def to_dict(self) -> dict:
        return {"slope": self.slope.tolist(), "slope_se": self.slope_se.tolist(), "r2": self.r2.tolist(),
                "residual_sd": self.residual_sd.tolist(),
                "intercepts": {f: v.tolist() for f, v in self.intercepts.items()}, "n_models": self.n_models}


def fit_family_compute(scores_MxK, compute, families: Sequence[str]) -> FamilyComputeFit:
    """Fit each capability as linear in ln(compute) with one shared slope and a per-family intercept.

    A family with a single model fixes only its own intercept; the slope comes from the families with
    several sizes. Needs at least one family with two models of different compute.

    Linearity fails near chance: a family whose models all score near the floor has a flatter PC-1 (on Ruan
    et al.'s table, Cerebras-GPT rises 0.26 over 8 nats of compute where the pooled slope predicts 0.80),
    so its intercept, and any efficiency computed from it, mean little; compare ``predict`` with the
    family's own scores before reading them.
    """
    s = np.asarray(scores_MxK, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    c = np.asarray(compute, dtype=np.float64).ravel()
    fam = np.asarray([str(f) for f in families])
    if not (len(s) == c.size == fam.size):
        raise ValueError(f"scores ({len(s)}), compute ({c.size}) and families ({fam.size}) differ in length")
    bad = np.flatnonzero(~np.isfinite(c) | (c <= 0) | ~np.isfinite(s).all(axis=1))
    if bad.size:
        raise ValueError(f"compute must be finite and > 0 and scores finite; rows {bad[:10].tolist()}")
    names, inv = np.unique(fam, return_inverse=True)
    design = np.zeros((c.size, 1 + names.size))
    design[:, 0] = np.log(c)
    design[np.arange(c.size), 1 + inv] = 1.0
    dof = c.size - design.shape[1]  # the design must have full column rank
    if np.linalg.matrix_rank(design) < design.shape[1] or dof < 1:
        raise ValueError("the slope is not identified: no family has two models of different compute "
                         "(or no residual degree of freedom is left)")
    coef, *_ = np.linalg.lstsq(design, s, rcond=None)  # [1 + F, K]
    resid = s - design @ coef
    sigma2 = (resid**2).sum(axis=0) / dof
    cov_scale = np.linalg.inv(design.T @ design)[0, 0]
    total = ((s - s.mean(axis=0)) ** 2).sum(axis=0)
    return FamilyComputeFit(
        slope=coef[0], slope_se=np.sqrt(sigma2 * cov_scale),
        intercepts={str(n): coef[1 + i] for i, n in enumerate(names)},
        r2=1.0 - (resid**2).sum(axis=0) / total, residual_sd=np.sqrt(sigma2),
        n_models={str(n): int((inv == i).sum()) for i, n in enumerate(names)},
    )


@dataclass(frozen=True)
class ObservationalFit:
    """``y = floor + (ceiling - floor) * sigmoid(w . S + b)`` of capabilities S [M, K].

    Attributes:
      weights [K], bias, floor, ceiling: fitted (floor fixed; ceiling fixed or fitted in (floor, upper]).
      sse, n_points, converged, n_starts_at_optimum: diagnostics of the best of several starts.
      samples: bootstrap draws [n_boot, K + 3] of (weights..., bias, floor, ceiling), or None.
    """

    weights: np.ndarray
    bias: float
    floor: float
    ceiling: float
    sse: float
    n_points: int
    converged: bool
    n_starts_at_optimum: int
    samples: np.ndarray | None = field(default=None, repr=False)

    def index(self, capabilities_MxK) -> np.ndarray:
        """The fitted capability index ``w . S + b`` (the sigmoid's logit)."""
        return _as_capabilities(capabilities_MxK, self.weights.size) @ self.weights + self.bias

    def predict(self, capabilities_MxK) -> np.ndarray:
        return self.floor + (self.ceiling - self.floor) * expit(self.index(capabilities_MxK))

    def predict_samples(self, capabilities_MxK) -> np.ndarray:
        """Predictions of every bootstrap draw, [n_boot, M]."""
        if self.samples is None:
            raise ValueError("no bootstrap samples: fit with n_boot > 0")
        s = _as_capabilities(capabilities_MxK, self.weights.size)
        k = self.weights.size
        w, b, f, c = self.samples[:, :k], self.samples[:, k, None], self.samples[:, k + 1, None], \
            self.samples[:, k + 2, None]
        return f + (c - f) * expit(w @ s.T + b)

    def interval(self, capabilities_MxK, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile bootstrap interval of the fitted curve (parameter uncertainty)."""
        return percentile_interval(self.predict_samples(capabilities_MxK), level)

    def to_dict(self, level: float = 0.95) -> dict:
        """Every fitted value and diagnostic; with bootstrap samples also percentile ``ci`` at ``level`` of
        each weight, the bias and the ceiling."""
        out = {"weights": self.weights.tolist(), "bias": self.bias, "floor": self.floor,
               "ceiling": self.ceiling, "sse": self.sse, "n_points": self.n_points,
               "converged": self.converged, "n_starts_at_optimum": self.n_starts_at_optimum}
        if self.samples is not None and len(self.samples):
            lo, hi = percentile_interval(self.samples, level)
            k = self.weights.size
            out.update(n_boot=len(self.samples), ci_level=level, ci={
                "weights": [[float(lo[i]), float(hi[i])] for i in range(k)],
                "bias": [float(lo[k]), float(hi[k])], "ceiling": [float(lo[k + 2]), float(hi[k + 2])]})
        return out


def _as_capabilities(s, k: int) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 and k == 1 else s
    if s.ndim != 2 or s.shape[1] != k:
        raise ValueError(f"capabilities must be [models, {k}]; got shape {s.shape}")
    return s


def _unpack(theta_SxP: np.ndarray, k: int, floor: float, ceiling: float | None, upper: float):
    w, b = theta_SxP[:, :k], theta_SxP[:, k]
    c = np.full(len(theta_SxP), ceiling) if ceiling is not None else floor + (upper - floor) * expit(
        theta_SxP[:, k + 1])
    return w, b, c


def fit_observational(
    capabilities_MxK,
    y,
    *,
    floor: float = 0.0,
    ceiling: float | None = 1.0,
    upper: float = 1.0,
    n_boot: int = 0,
    seed: int = 0,
) -> ObservationalFit:
    """Fit a downstream metric as a sigmoid of a linear function of capabilities (Ruan et al. 2024).

    Args:
      capabilities_MxK: e.g. ``capability_pca(...).scores`` (or ``.transform`` of the models to fit).
      y: the metric per model, a fraction in [0, upper] (accuracy, pass rate; below the floor is noise).
      floor: fixed lower asymptote (chance: 0.25 for 4-way multiple choice; 0 for generation).
      ceiling: fixed upper asymptote (1: a perfect score is reachable), or None to fit it in (floor, upper]
        (the paper's parametric sigmoid; one more parameter to extrapolate, see tests/test_observational.py).
      n_boot: bootstrap replicates resampling models, refitted from the optimum (the PCA stays fixed).

    Least squares, started from a linear fit of the logit of the (clipped) metric and from shrunken copies of
    it, solved by the batched Levenberg-Marquardt loop of ``scaling.downstream``.
    """
    s = np.asarray(capabilities_MxK, dtype=np.float64)
    s = _as_capabilities(s, s.shape[1] if s.ndim == 2 else 1)
    y = np.asarray(y, dtype=np.float64).ravel()
    m, k = s.shape
    if y.size != m:
        raise ValueError(f"capabilities have {m} rows but y has {y.size} values")
    bad = np.flatnonzero(~np.isfinite(y) | ~np.isfinite(s).all(axis=1))
    if bad.size:
        raise ValueError(f"non-finite capabilities or metric in rows {bad[:10].tolist()}")
    if not floor < upper or (ceiling is not None and not floor < ceiling <= upper):
        raise ValueError(f"need floor < ceiling <= upper; got floor={floor}, ceiling={ceiling}, "
                         f"upper={upper}")
    # Scores below the chance floor are ordinary noise; scores above the upper bound are a unit error.
    lower = min(0.0, floor)
    out = np.flatnonzero((y < lower) | (y > upper))
    if out.size:
        hint = "; percentages? divide by 100" if y.max() > upper and upper == 1.0 else ""
        raise ValueError(f"metric outside [{lower}, upper={upper}] in rows {out[:10].tolist()} "
                         f"(e.g. {y[out[0]]}){hint}")
    _warn_if_bounds_miss_data(y, floor, ceiling, upper, "fit_observational")
    n_free = k + 1 + (ceiling is None)
    if m < n_free + 1:
        raise ValueError(f"{m} models are too few for {n_free} free parameters")

    top = ceiling if ceiling is not None else upper
    frac = np.clip((y - floor) / (top - floor), 0.02, 0.98)
    lin = np.linalg.lstsq(np.c_[s, np.ones(m)], logit(frac), rcond=None)[0]
    starts = [lin * a for a in (1.0, 0.5, 2.0, 0.1)]
    if ceiling is None:  # ceiling starts: just above the best model, and at the upper bound
        c0 = [min(max(y.max() + 0.02 * (upper - floor), floor + 0.05 * (upper - floor)), upper - 1e-3),
              upper - 1e-3]
        starts = [np.r_[st, logit((c - floor) / (upper - floor))] for st in starts for c in c0]

    def model(theta_SxP, x_SxMxK):
        w, b, c = _unpack(theta_SxP, k, floor, ceiling, upper)
        return floor + (c - floor)[:, None] * expit(np.einsum("smk,sk->sm", x_SxMxK, w) + b[:, None])

    theta, sse, ok, n_same = _best_of_starts(model, np.array(starts), s, y, np.ones(m))
    samples = None
    if n_boot > 0:
        idx_BxM = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
        th_B, _, _ = _lm(model, np.broadcast_to(theta, (n_boot, theta.size)).copy(), s[idx_BxM],
                         y[idx_BxM], np.ones((n_boot, m)))
        w_B, b_B, c_B = _unpack(th_B, k, floor, ceiling, upper)
        samples = np.c_[w_B, b_B, np.full(n_boot, floor), c_B]
    w, b, c = _unpack(theta[None], k, floor, ceiling, upper)
    return ObservationalFit(weights=w[0], bias=float(b[0]), floor=float(floor), ceiling=float(c[0]),
                            sse=sse, n_points=m, converged=ok, n_starts_at_optimum=n_same, samples=samples)


def equivalent_log_compute(fit: ObservationalFit, family_fit: FamilyComputeFit, capabilities_MxK,
                           reference: str) -> np.ndarray:
    """ln of the compute a model of ``reference`` would need for the same capability index ``w . S``.

    Within the reference family S = slope ln C + b_ref, so ``w . S = (w . slope) ln C + w . b_ref`` and
    ``ln C_eq = w . (S - b_ref) / (w . slope)``: the paper's x-axis (e.g. "Llama-2-equivalent FLOPs").
    """
    if reference not in family_fit.intercepts:
        raise KeyError(f"unknown family {reference!r}; fitted: {sorted(family_fit.intercepts)}")
    k = fit.weights.size
    if family_fit.slope.size != k:
        raise ValueError(f"the family fit has {family_fit.slope.size} components; the sigmoid uses {k}")
    gain = float(fit.weights @ family_fit.slope)
    if gain == 0:
        raise ValueError("the capability index does not change with compute (w . slope = 0)")
    s = _as_capabilities(capabilities_MxK, k)
    return (s - family_fit.intercepts[reference]) @ fit.weights / gain
