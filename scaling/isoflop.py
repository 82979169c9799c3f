"""IsoFLOP analysis: Hoffmann et al. 2022 Approaches 1 and 2 (arXiv:2203.15556, Sec. 3.1-3.2).

- Approach 2 (`approach2`): for each compute budget C, locate the loss-minimising model size N*(C) on the
  isoFLOP profile, then fit N* ∝ C^a and D* ∝ C^b. Two per-budget minimisers:
    * "parabola": least-squares quadratic of loss in log N, as Hoffmann et al. (optionally only on the
      `window` sizes nearest the lowest observed loss);
    * "akima": Akima spline of log loss vs log N evaluated on a geometric grid of (k-1)*25 sizes, argmin —
      the procedure of Porian et al. 2024 (arXiv:2406.19146, reference code `analysis.interpolation`).
  A budget whose minimum lies at the edge of its size grid is refused (error naming the budget), or dropped
  with `on_edge="drop"`. Bootstrap: resample points within each budget ("points") or add seed noise sized
  by the loss level ("seed_noise", Porian et al.); each replicate refits the power laws -> percentile CIs.
  `PORIAN2024` holds the settings that reproduce Porian et al.'s headline estimates.
- Approach 1 (`approach1`): minimum-loss envelope over training curves: at each of a log grid of FLOP
  values, the run with the lowest (interpolated) loss gives N_opt(C), D_opt(C); fit power laws.
- `isoflop_slices`: cut training curves at fixed budgets to build isoFLOP profiles for Approach 2.
Approach 3, the cross-check of all three and the parabola-bias study live in scaling/approaches.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import Akima1DInterpolator

from scaling.intervals import percentile_interval
from scaling.powerlaw import AllocationLaws, PowerLawFit, fit_power_law

# C values closer than this (relative) form one budget by default: logged FLOPs are rarely exact.
BUDGET_RTOL = 1e-3

__all__ = [
    "BudgetOptimum",
    "Approach1Result",
    "Approach2Result",
    "EdgeOfGridError",
    "TooFewSizesError",
    "PORIAN2024",
    "porian_seed_noise",
    "isoflop_minimum",
    "approach1",
    "approach2",
    "isoflop_slices",
]

FlopsPerToken = Callable[[np.ndarray], np.ndarray]


class EdgeOfGridError(ValueError):
    """The minimum of an isoFLOP profile is not bracketed by its sampled sizes; ``reason`` says why, without
    the budget and the remedy that the message adds."""

    def __init__(self, C: float | None, reason: str, remedy: str):
        where = "isoFLOP profile" if C is None else f"budget C={C:.4g}"
        super().__init__(f"{where}: {reason}{remedy}")
        self.C, self.reason = C, reason


class TooFewSizesError(EdgeOfGridError):
    """A budget has fewer than 3 distinct model sizes: no parabola (or spline) minimum to find. Dropped with
    the budgets whose minimum is not bracketed when ``on_edge="drop"``."""


def porian_seed_noise(
    loss: np.ndarray,
    noise_low: float = 0.002,
    noise_high: float = 0.05,
    l_threshold_high: float = 7.0,
    l_threshold_low: float = 3.0,
) -> np.ndarray:
    """Std of seed-to-seed loss noise as a function of the loss level (Porian et al. 2024).

    Mirrors `get_noise_for_loss` of the reference code with its RefinedWeb settings: log-linear
    interpolation between noise_low and noise_high, with the thresholds compared against log(loss) exactly
    as in that code (so for losses below e^3 ≈ 20 nats the noise is simply `noise_low` = 0.002).
    """
    ll = np.log(np.asarray(loss, dtype=np.float64))
    log_noise = np.interp(
        ll, [np.log(l_threshold_low), np.log(l_threshold_high)], [np.log(noise_low), np.log(noise_high)]
    )
    log_noise = np.where(ll >= l_threshold_high, np.log(noise_high), log_noise)
    log_noise = np.where(ll <= l_threshold_low, np.log(noise_low), log_noise)
    return np.exp(log_noise)


# Porian et al. 2024's Approach-2 recipe (reference code `interp_flop` + `fit_compute_optimal_power_laws`,
# headline = "bs_median_weighted"): Akima minimiser, 1000 seed-noise replicates, the bootstrap median as the
# point estimate, std(log N*) floored at 0.33 * 25 grid steps and inflated by B / #valid, budgets with fewer
# than half valid replicates or an edge minimum dropped, WLS with weights 1/std^2.
PORIAN2024: dict[str, Any] = dict(
    method="akima",
    grid_factor=25,
    bootstrap="seed_noise",
    n_bootstrap=1000,
    noise_std=porian_seed_noise,
    estimate="bootstrap_median",
    weighting="inverse_variance",
    min_std_grid_steps=0.33 * 25,
    min_valid_fraction=0.5,
    on_edge="drop",
)


@dataclass
class BudgetOptimum:
    """The loss-minimising point of one isoFLOP profile.

    log_n_std / log_d_std: bootstrap std of log N* / log D* (None without bootstrap); n_valid: replicates
    whose minimum was interior. N_point: the direct (non-bootstrap) minimiser; N equals it unless
    estimate="bootstrap_median".
    """

    C: float
    N: float
    D: float
    loss: float
    n_points: int
    method: str
    N_point: float
    log_n_std: float | None = None
    log_d_std: float | None = None
    n_valid: int | None = None

    @property
    def tokens_per_param(self) -> float:
        return self.D / self.N

    def to_dict(self) -> dict:
        keys = ("C", "N", "D", "loss", "n_points", "method", "N_point", "log_n_std", "log_d_std", "n_valid")
        return {k: getattr(self, k) for k in keys} | {"tokens_per_param": self.tokens_per_param}


# ----------------------------------------------------------------------------------------------------------
# per-budget minimisers (vectorised over replicate columns)
# ----------------------------------------------------------------------------------------------------------
def _parabola_min(logn: np.ndarray, loss_kxr: np.ndarray, w_kxr: np.ndarray | None = None):
    """Weighted quadratic fit of loss vs log N for each column; returns (log N*, L*, valid)."""
    x0 = logn.mean()
    scale = max(np.ptp(logn), 1e-12)
    x = (logn - x0) / scale  # centred and scaled: well-conditioned normal equations
    X = np.stack([np.ones_like(x), x, x * x], axis=1)  # k x 3
    W = np.ones_like(loss_kxr) if w_kxr is None else w_kxr
    XtWX = np.einsum("ki,kr,kj->rij", X, W, X)
    XtWy = np.einsum("ki,kr,kr->ri", X, W, loss_kxr)
    det = np.linalg.det(XtWX)
    ok = np.abs(det) > 1e-12 * np.maximum(np.abs(XtWX).max(axis=(1, 2)), 1e-300) ** 3
    XtWX = np.where(ok[:, None, None], XtWX, np.eye(3))
    coef = np.linalg.solve(XtWX, XtWy[..., None])[..., 0]
    c0, c1, c2 = coef[:, 0], coef[:, 1], coef[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = -c1 / (2 * c2)
    valid = ok & (c2 > 0) & (xs > x.min()) & (xs < x.max())
    # The lowest *observed* point at a grid end also means the minimum is not bracketed by data.
    lowest = np.argmin(np.where(W > 0, loss_kxr, np.inf), axis=0)
    valid &= (logn[lowest] > logn.min()) & (logn[lowest] < logn.max())
    return x0 + scale * xs, c0 + c1 * xs + c2 * xs * xs, valid


# Bootstrap spread of log N* below which a budget counts as having none (rounding, not noise): 1e-9 in
# log N is a relative change of 1e-9 in N*, far below any seed noise.
_MIN_LOG_STD = 1e-9


def _noise_at(noise_std, C: float, rtol: float):
    """The seed-noise sd for budget C: ``noise_std`` itself, or its entry for C when it is a mapping."""
    if not isinstance(noise_std, Mapping):
        return noise_std
    for c, sd in noise_std.items():
        if abs(float(c) - C) <= rtol * max(abs(C), abs(float(c))):
            if not (np.isfinite(sd) and sd >= 0):
                raise ValueError(f"noise_std for budget C={C:.4g} must be finite and >= 0, got {sd}")
            return float(sd)
    raise ValueError(f"noise_std has no entry for budget C={C:.4g} (it has {sorted(map(float, noise_std))})")


def _why_not_bracketed(logn: np.ndarray, loss: np.ndarray, method: str, log_vertex: float) -> str:
    """Why a profile's minimum was refused, in words: the remedy differs (a wider grid for an end-point
    minimum; more sizes or seeds for a profile that is not U-shaped)."""
    j = int(np.argmin(loss))
    if logn[j] <= logn.min() or logn[j] >= logn.max():
        end = "smallest" if logn[j] <= logn.min() else "largest"
        return f"the lowest observed loss is at the edge of the grid, the {end} size N={np.exp(logn[j]):.4g}"
    if method == "parabola":
        x = (logn - logn.mean()) / max(np.ptp(logn), 1e-12)
        if np.polyfit(x, loss, 2)[0] <= 0:
            return (
                "the fitted parabola opens downward: the losses are not U-shaped in log N (noise, or a "
                "profile with more than one dip), though the lowest observed loss is interior at "
                f"N={np.exp(logn[j]):.4g}"
            )
        vertex = f"N={np.exp(log_vertex):.4g}" if abs(log_vertex) < 700 else f"log N={log_vertex:.4g}"
        return f"the fitted parabola's vertex {vertex} lies outside the sampled sizes"
    return "the interpolated minimum lies at the edge of the grid"


def _akima_min(logn_sorted: np.ndarray, logloss_kxr: np.ndarray, grid_factor: int):
    """Porian et al.: Akima of log loss vs log N on a geometric grid of (k-1)*grid_factor sizes, argmin."""
    k = logn_sorted.size
    m = (k - 1) * grid_factor
    grid = np.linspace(logn_sorted[0], logn_sorted[-1], m)  # = log of np.geomspace(N_min, N_max, m)
    li = Akima1DInterpolator(logn_sorted, logloss_kxr, axis=0)(grid)  # m x R
    j = np.argmin(li, axis=0)
    valid = (j != 0) & (j != m - 1)
    return grid[j], np.exp(li[j, np.arange(li.shape[1])]), valid, grid[1] - grid[0]


def isoflop_minimum(
    N: Any,
    loss: Any,
    *,
    C: float | None = None,
    D: Any = None,
    method: str = "parabola",
    grid_factor: int = 25,
    window: int | None = None,
    flops_per_token: FlopsPerToken | None = None,
) -> BudgetOptimum:
    """Minimum of one isoFLOP profile (points N, loss at a fixed budget C).

    Raises EdgeOfGridError if the minimum is not bracketed by the sampled sizes. D at N* is interpolated
    (log-log) from the points' D when given, else D* = C / flops_per_token(N*) (default 6N*).
    """
    N = np.asarray(N, np.float64).ravel()
    loss = np.asarray(loss, np.float64).ravel()
    D = None if D is None else np.asarray(D, np.float64).ravel()
    return _budget(N, loss, C, D, method, grid_factor, flops_per_token, window=window)


def _prepare_budget(N, loss, D, method):
    if N.shape != loss.shape or (D is not None and np.shape(D) != N.shape):
        raise ValueError("N, loss (and D) must have the same length within a budget")
    if method == "akima":
        # The reference code keeps the best run per size (groupby min) so the spline abscissae are distinct.
        order = np.lexsort((loss, N))
        N, loss = N[order], loss[order]
        D = None if D is None else D[order]
        first = np.concatenate([[True], np.diff(N) > 0])
        N, loss = N[first], loss[first]
        D = None if D is None else D[first]
    return N, loss, D


def _d_at(logn_star, N, D, C, flops_per_token):
    if D is not None:
        order = np.argsort(N)
        return np.exp(np.interp(logn_star, np.log(N[order]), np.log(D[order])))
    if C is None:
        raise ValueError("need C (budget) or D (tokens per point) to report D*")
    n = np.exp(logn_star)
    return C / (6.0 * n if flops_per_token is None else np.asarray(flops_per_token(n), np.float64))


def _budget(
    N,
    loss,
    C,
    D,
    method,
    grid_factor,
    flops_per_token,
    bootstrap=None,
    n_bootstrap=0,
    rng=None,
    noise_std=None,
    estimate="point",
    min_std_grid_steps=0.0,
    min_valid_fraction=0.5,
    window=None,
):
    """Point minimum + optional bootstrap for one budget. Returns (BudgetOptimum, samples logN*) or raises."""
    if method not in ("parabola", "akima"):
        raise ValueError(f"method must be 'parabola' or 'akima', got {method!r}")
    if estimate not in ("point", "bootstrap_median"):
        raise ValueError(f"estimate must be 'point' or 'bootstrap_median', got {estimate!r}")
    bad = np.flatnonzero(~np.isfinite(N) | ~np.isfinite(loss) | (N <= 0) | (loss <= 0))
    if bad.size:
        raise ValueError(f"budget C={C}: non-finite or non-positive N/loss at rows {bad.tolist()}")
    N, loss, D = _prepare_budget(N, loss, D, method)
    sizes = np.unique(N)
    if window is not None and method == "parabola" and sizes.size > window:
        if window < 3:
            raise ValueError(f"window must be >= 3 sizes for a parabola, got {window}")
        # Only the `window` distinct sizes (with all their seed replicates) nearest the size of lowest mean
        # loss: a parabola is a local model and wide grids bias it (see approaches.parabola_bias). Counting
        # sizes, not rows: with two seeds per size a window of 3 rows held 2 sizes and every budget failed.
        # The window is shifted, not cut, at the grid ends, so an end-point minimum is still refused.
        j = int(np.argmin([loss[N == s].mean() for s in sizes]))
        start = min(max(j - window // 2, 0), sizes.size - window)
        sel = np.isin(N, sizes[start : start + window])
        N, loss, D = N[sel], loss[sel], None if D is None else D[sel]
    k = np.unique(N).size
    if k < 3:
        raise TooFewSizesError(C, f"need at least 3 distinct model sizes, got {k}", "")
    logn = np.log(N)
    step = None
    if method == "parabola":
        ls, lstar, ok = _parabola_min(logn, loss[:, None])
    else:
        ls, lstar, ok, step = _akima_min(logn, np.log(loss)[:, None], grid_factor)
    if not ok[0]:
        raise EdgeOfGridError(
            C,
            f"N* is not bracketed by the sampled sizes [{N.min():.4g}, {N.max():.4g}]: "
            f"{_why_not_bracketed(logn, loss, method, float(ls[0]))}",
            " — add larger/smaller models for this budget or drop it (on_edge='drop')",
        )
    n_point = float(np.exp(ls[0]))
    samples = None
    log_n_std = log_d_std = n_valid = None
    n_est, l_est = n_point, float(lstar[0])
    if n_bootstrap:
        if bootstrap == "seed_noise":
            sd = noise_std(loss) if callable(noise_std) else np.full_like(loss, float(noise_std))
            noisy = loss[:, None] + sd[:, None] * rng.standard_normal((loss.size, n_bootstrap))
            if method == "parabola":
                bs, bl, bok = _parabola_min(logn, noisy)
            else:
                with np.errstate(invalid="ignore"):
                    bs, bl, bok, _ = _akima_min(logn, np.log(noisy), grid_factor)
        elif bootstrap == "points":
            if method != "parabola":
                raise ValueError(
                    "bootstrap='points' needs method='parabola' (resampled duplicates break the spline); "
                    "use bootstrap='seed_noise' with method='akima'"
                )
            counts = rng.multinomial(loss.size, np.full(loss.size, 1.0 / loss.size), size=n_bootstrap).T
            bs, bl, bok = _parabola_min(logn, np.repeat(loss[:, None], n_bootstrap, 1), counts.astype(float))
        else:
            raise ValueError(f"bootstrap must be 'points' or 'seed_noise', got {bootstrap!r}")
        n_valid = int(bok.sum())
        if n_valid < min_valid_fraction * n_bootstrap:
            raise EdgeOfGridError(
                C,
                f"only {n_valid}/{n_bootstrap} bootstrap minima are interior",
                "; the optimum is not reliably bracketed by the sampled sizes",
            )
        samples = bs[bok]
        floor = min_std_grid_steps * (step if step is not None else 0.0)
        # Porian et al.: floor the std at a fraction of the grid resolution and inflate it by the share of
        # replicates lost at the edges (both make the WLS weights honest about unresolved minima).
        log_n_std = max(float(np.std(samples)), floor) * (n_bootstrap / n_valid)
        d_samples = np.log(_d_at(samples, N, D, C, flops_per_token))
        log_d_std = max(float(np.std(d_samples)), floor) * (n_bootstrap / n_valid)
        if estimate == "bootstrap_median":
            n_est, l_est = float(np.exp(np.median(samples))), float(np.median(bl[bok]))
    d_est = float(_d_at(np.log(n_est), N, D, C, flops_per_token))
    opt = BudgetOptimum(
        C=float(C) if C is not None else float("nan"),
        N=n_est,
        D=d_est,
        loss=l_est,
        n_points=int(N.size),
        method=method,
        N_point=n_point,
        log_n_std=log_n_std,
        log_d_std=log_d_std,
        n_valid=n_valid,
    )
    return (opt, samples, (N, D)) if n_bootstrap else opt


# ----------------------------------------------------------------------------------------------------------
# Approach 2
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Approach2Result(AllocationLaws):
    """Hoffmann Approach 2: per-budget optima and the power laws N* = n_fit.coef C^a, D* = d_fit.coef C^b.

    a_ci / b_ci: bootstrap percentile intervals when n_bootstrap > 0, else the regression's t-interval.
    rejected: (C, reason) for budgets dropped with on_edge="drop".
    """

    optima: list[BudgetOptimum]
    n_fit: PowerLawFit
    d_fit: PowerLawFit
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    rejected: list[tuple[float, str]] = field(default_factory=list)
    a_samples: np.ndarray | None = None
    b_samples: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    ci_level: float = 0.95

    @property
    def C(self) -> np.ndarray:
        return np.array([o.C for o in self.optima])

    @property
    def N(self) -> np.ndarray:
        return np.array([o.N for o in self.optima])

    @property
    def D(self) -> np.ndarray:
        return np.array([o.D for o in self.optima])

    @property
    def loss(self) -> np.ndarray:
        return np.array([o.loss for o in self.optima])

    def to_dict(self) -> dict:
        def plain(v):
            if callable(v):
                return getattr(v, "__name__", repr(v))
            return [{"C": float(c), "sd": float(sd)} for c, sd in v.items()] if isinstance(v, Mapping) else v

        settings = {k: plain(v) for k, v in self.settings.items()}
        return {
            "a": self.a,
            "b": self.b,
            "a_ci": list(self.a_ci),
            "b_ci": list(self.b_ci),
            "ci_level": self.ci_level,
            "n_fit": self.n_fit.to_dict(),
            "d_fit": self.d_fit.to_dict(),
            "optima": [o.to_dict() for o in self.optima],
            "rejected": [{"C": c, "reason": r} for c, r in self.rejected],
            "settings": settings,
            "n_bootstrap_fits": None if self.a_samples is None else int(self.a_samples.size),
        }

    def summary(self) -> str:
        rej = f", {len(self.rejected)} rejected" if self.rejected else ""
        lvl = f"{self.ci_level:.0%} CI"
        lines = [
            f"Approach 2 ({self.settings.get('method')}, {len(self.optima)} budgets{rej})",
            f"  N* = {self.n_fit.coef:.4g} C^{self.a:.4f}  {lvl} [{self.a_ci[0]:.4f}, {self.a_ci[1]:.4f}]",
            f"  D* = {self.d_fit.coef:.4g} C^{self.b:.4f}  {lvl} [{self.b_ci[0]:.4f}, {self.b_ci[1]:.4f}]",
            f"  {'C':>10} {'N*':>10} {'D*':>10} {'D*/N*':>7} {'L*':>8} {'sd logN*':>8}",
        ]
        for o in self.optima:
            sd = "" if o.log_n_std is None else f"{o.log_n_std:8.4f}"
            lines.append(
                f"  {o.C:10.3e} {o.N:10.3e} {o.D:10.3e} {o.tokens_per_param:7.1f} {o.loss:8.4f} {sd}"
            )
        for c, r in self.rejected:
            lines.append(f"  rejected C={c:.3e}: {r}")
        return "\n".join(lines)


def approach2(
    C: Any,
    N: Any,
    loss: Any,
    D: Any = None,
    *,
    method: str = "parabola",
    on_edge: str = "raise",
    n_bootstrap: int = 0,
    bootstrap: str = "points",
    noise_std: float | Callable | Mapping[float, float] | None = None,
    estimate: str = "point",
    weighting: str = "none",
    min_std_grid_steps: float = 0.0,
    min_valid_fraction: float = 0.5,
    grid_factor: int = 25,
    window: int | None = None,
    flops_per_token: FlopsPerToken | None = None,
    seed: int = 0,
    ci_level: float = 0.95,
    budget_rtol: float = BUDGET_RTOL,
) -> Approach2Result:
    """Hoffmann et al. 2022 Approach 2 on isoFLOP points (one row per (budget C, size N) run).

    C, N, loss (, D): equal-length arrays; points sharing a C value form one isoFLOP profile.
    method: "parabola" (Hoffmann) or "akima" (Porian et al. 2024); window: parabola on only that many
    distinct sizes (each with all its replicates) around the size of lowest mean loss. on_edge: "raise"
    (default) or "drop" budgets whose minimum is not bracketed (or that have fewer than 3 distinct sizes).
    n_bootstrap / bootstrap: "points" (resample points within each budget) or "seed_noise" (add Gaussian
    noise of std `noise_std`: a float, a function of the loss, or a mapping budget -> sd, e.g. the
    measured seed-to-seed sd at each budget) -> percentile CIs for a and b. With few sizes per budget
    prefer "seed_noise": a resample of k points has fewer than 3 distinct sizes with probability 34% at k
    = 4, so a third of the "points" replicates have no parabola, and a noisy profile easily falls below
    `min_valid_fraction` (cpu-families: 5 of 9 Muon/MoE/MoR budgets).
    estimate: "point" or "bootstrap_median" (per-budget median of bootstrap minima, Porian et al.; needs
    n_bootstrap > 0).
    weighting: "none" (OLS) or "inverse_variance" (WLS with 1/std(log N*)^2; needs the bootstrap).
    budget_rtol: C values within this relative distance form one budget (logged FLOPs are rarely exact).
    Use `approach2(C, N, loss, D, **PORIAN2024)` for Porian et al.'s exact recipe.
    """
    C, N, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (C, N, loss))
    if not (C.shape == N.shape == loss.shape):
        raise ValueError(f"C, N, loss must have the same length, got {C.size}, {N.size}, {loss.size}")
    D = None if D is None else np.asarray(D, dtype=np.float64).ravel()
    if D is not None and D.shape != N.shape:
        raise ValueError(f"D has length {D.size}, expected {N.size}")
    bad = np.flatnonzero(~np.isfinite(C) | (C <= 0))
    if bad.size:
        raise ValueError(f"C must be finite and positive; bad rows {bad.tolist()}")
    if on_edge not in ("raise", "drop"):
        raise ValueError(f"on_edge must be 'raise' or 'drop', got {on_edge!r}")
    if weighting not in ("none", "inverse_variance"):
        raise ValueError(f"weighting must be 'none' or 'inverse_variance', got {weighting!r}")
    if weighting == "inverse_variance" and not n_bootstrap:
        raise ValueError("weighting='inverse_variance' needs n_bootstrap > 0 (weights are bootstrap stds)")
    if estimate == "bootstrap_median" and not n_bootstrap:  # it silently fell back to the point estimate
        raise ValueError("estimate='bootstrap_median' needs n_bootstrap > 0 (it is the median of the "
                         "bootstrap minima)")
    if n_bootstrap and bootstrap == "seed_noise" and noise_std is None:
        raise ValueError("bootstrap='seed_noise' needs noise_std (a float, a function of the loss, or a "
                         "mapping budget -> sd)")
    rng = np.random.default_rng(seed)
    seed_noise = bool(n_bootstrap) and bootstrap == "seed_noise"
    optima, samples, points, rejected = [], [], [], []
    for c, idx in _budget_groups(C, budget_rtol):
        try:
            out = _budget(
                N[idx],
                loss[idx],
                float(c),
                None if D is None else D[idx],
                method,
                grid_factor,
                flops_per_token,
                bootstrap,
                n_bootstrap,
                rng,
                # only seed-noise replicates read the sd: a mapping need not cover budgets otherwise
                _noise_at(noise_std, float(c), budget_rtol) if seed_noise else None,
                estimate,
                min_std_grid_steps,
                min_valid_fraction,
                window,
            )
        except EdgeOfGridError as err:  # TooFewSizesError included
            if on_edge == "raise":
                raise
            rejected.append((float(c), err.reason))
            continue
        if n_bootstrap:
            optima.append(out[0])
            samples.append(out[1])
            points.append(out[2])
        else:
            optima.append(out)
    if len(optima) < 2:
        why = "".join(f"; C={c:.4g}: {r}" for c, r in rejected)
        raise ValueError(f"Approach 2 needs at least 2 usable budgets, got {len(optima)} ({len(rejected)} "
                         f"rejected{why})")
    cs = np.array([o.C for o in optima])
    wn = wd = None
    if weighting == "inverse_variance":
        # A spread of ~0 (noise sd 0: every replicate finds the same minimum, up to rounding) would give that
        # budget an infinite or astronomically large weight: it alone would set the power law, silently.
        flat = [f"{o.C:.4g}" for o in optima if min(o.log_n_std, o.log_d_std) <= _MIN_LOG_STD]
        if flat:
            raise ValueError(
                f"weighting='inverse_variance' needs a positive bootstrap spread of log N* and log D* at "
                f"every budget; none at C={', '.join(flat)} (a seed-noise sd of 0 there?): use "
                f"weighting='none' or give those budgets a positive noise_std"
            )
        wn = 1.0 / np.array([o.log_n_std for o in optima]) ** 2
        wd = 1.0 / np.array([o.log_d_std for o in optima]) ** 2
    n_fit = fit_power_law(cs, [o.N for o in optima], wn, ci_level)
    d_fit = fit_power_law(cs, [o.D for o in optima], wd, ci_level)
    a_ci, b_ci, a_s, b_s = n_fit.exponent_ci, d_fit.exponent_ci, None, None
    if n_bootstrap:
        # Replicate i pairs the i-th valid bootstrap minimum of every budget (as the reference code does),
        # so there are min_b(#valid_b) replicate fits.
        r = min(s.size for s in samples)
        lc = np.log(cs)
        logn_rxb = np.stack([s[:r] for s in samples], axis=1)
        logd_rxb = np.stack(
            [
                np.log(_d_at(s[:r], n_b, d_b, o.C, flops_per_token))
                for o, s, (n_b, d_b) in zip(optima, samples, points, strict=True)
            ],
            axis=1,
        )
        a_s = _batched_slopes(lc, logn_rxb, wn)
        b_s = _batched_slopes(lc, logd_rxb, wd)
        a_ci, b_ci = percentile_interval(a_s, ci_level), percentile_interval(b_s, ci_level)
    settings = dict(
        method=method,
        on_edge=on_edge,
        n_bootstrap=n_bootstrap,
        bootstrap=bootstrap,
        noise_std=noise_std,
        estimate=estimate,
        weighting=weighting,
        min_std_grid_steps=min_std_grid_steps,
        grid_factor=grid_factor,
        window=window,
        seed=seed,
        budget_rtol=budget_rtol,
    )
    return Approach2Result(
        optima=optima,
        n_fit=n_fit,
        d_fit=d_fit,
        a_ci=(float(a_ci[0]), float(a_ci[1])),
        b_ci=(float(b_ci[0]), float(b_ci[1])),
        rejected=rejected,
        a_samples=a_s,
        b_samples=b_s,
        settings=settings,
        ci_level=ci_level,
    )


def _budget_groups(C: np.ndarray, rtol: float) -> list[tuple[float, np.ndarray]]:
    """Group points into budgets: sorted C values closer than rtol (relative) to the previous one join it.

    The budget's value is the geometric mean of its members (exact when they are identical)."""
    order = np.argsort(C, kind="stable")
    lc = np.log(C[order])
    starts = np.concatenate([[0], np.flatnonzero(np.diff(lc) > np.log1p(rtol)) + 1, [C.size]])
    return [
        (float(np.exp(lc[a:b].mean())) if np.ptp(lc[a:b]) > 0 else float(C[order[a]]), order[a:b])
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def _batched_slopes(x: np.ndarray, y_rxb: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """(Weighted) least-squares slope of each row of y against x, all rows at once."""
    w = np.ones_like(x) if w is None else w
    xm = np.sum(w * x) / np.sum(w)
    ym = (y_rxb * w).sum(axis=1, keepdims=True) / np.sum(w)
    return ((y_rxb - ym) * (w * (x - xm))).sum(axis=1) / np.sum(w * (x - xm) ** 2)


# ----------------------------------------------------------------------------------------------------------
# Approach 1 and isoFLOP slices from training curves
# ----------------------------------------------------------------------------------------------------------
def _curves(run, N, D, loss, C, flops_per_token):
    N, D, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, loss))
    if not (N.shape == D.shape == loss.shape):
        raise ValueError(f"N, D, loss must have the same length, got {N.size}, {D.size}, {loss.size}")
    finite = np.isfinite(N) & np.isfinite(D) & np.isfinite(loss)
    bad = np.flatnonzero(~finite | (N <= 0) | (D <= 0) | (loss <= 0))
    if bad.size:
        raise ValueError(f"non-finite or non-positive N/D/loss at rows {bad.tolist()}")
    run = N if run is None else np.asarray(run).ravel()
    if run.shape != N.shape:
        raise ValueError("run ids must have one entry per row")
    if C is None:
        C = D * (6.0 * N if flops_per_token is None else np.asarray(flops_per_token(N), dtype=np.float64))
    C = np.asarray(C, dtype=np.float64).ravel()
    out = []
    for r in np.unique(run):
        idx = np.flatnonzero(run == r)
        idx = idx[np.argsort(C[idx])]
        if np.unique(N[idx]).size != 1:
            raise ValueError(f"run {r!r} has several model sizes; give run ids that identify single runs")
        out.append((N[idx[0]], np.log(C[idx]), np.log(D[idx]), np.log(loss[idx])))
    return out


def isoflop_slices(
    N: Any,
    D: Any,
    loss: Any,
    budgets: Any,
    *,
    run: Any = None,
    C: Any = None,
    flops_per_token: FlopsPerToken | None = None,
) -> dict[str, np.ndarray]:
    """Cut training curves at fixed FLOP budgets.

    Log-log interpolation of the loss along each run, only inside the run's logged range (as Porian et al.'s
    `fetch_flop`). Returns dict C, N, D, loss of isoFLOP points. Note: the loss at an intermediate checkpoint
    of a long cosine schedule overestimates what a run sized for that budget would reach (Hoffmann et al.),
    so slices of one long run per size bias N* upward; slices are exact for constant-LR or WSD-style curves
    only to the extent that the checkpoint stands in for a finished run.
    """
    curves = _curves(run, N, D, loss, C, flops_per_token)
    rows = []
    for c in np.atleast_1d(np.asarray(budgets, dtype=np.float64)):
        lc = np.log(c)
        for n, logc, logd, logl in curves:
            if logc[0] - 1e-9 <= lc <= logc[-1] + 1e-9:
                rows.append((c, n, np.exp(np.interp(lc, logc, logd)), np.exp(np.interp(lc, logc, logl))))
    if not rows:
        raise ValueError("no run covers any of the requested budgets")
    arr = np.array(rows)
    return {"C": arr[:, 0], "N": arr[:, 1], "D": arr[:, 2], "loss": arr[:, 3]}


@dataclass
class Approach1Result(AllocationLaws):
    """Hoffmann Approach 1: the minimum-loss envelope over training curves and its power laws.

    C, N, D, loss: the envelope on the FLOP grid (grid points where the winner is the smallest or largest
    covering model are excluded — the optimum may lie outside the sampled sizes there).
    a_ci / b_ci: percentile intervals from resampling whole runs (n_bootstrap > 0) else the t-interval (too
    narrow: envelope points are strongly correlated).
    """

    C: np.ndarray
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    n_fit: PowerLawFit
    d_fit: PowerLawFit
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    n_runs: int
    ci_level: float = 0.95

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "a_ci": list(self.a_ci),
            "b_ci": list(self.b_ci),
            "n_runs": self.n_runs,
            "n_fit": self.n_fit.to_dict(),
            "d_fit": self.d_fit.to_dict(),
            "C": self.C.tolist(),
            "N": self.N.tolist(),
            "D": self.D.tolist(),
            "loss": self.loss.tolist(),
            "ci_level": self.ci_level,
        }

    def summary(self) -> str:
        lvl = f"{self.ci_level:.0%} CI"
        return (
            f"Approach 1 ({self.n_runs} runs, {self.C.size} envelope points, "
            f"C {self.C.min():.3g}..{self.C.max():.3g})\n"
            f"  N_opt = {self.n_fit.coef:.4g} C^{self.a:.4f}  {lvl} [{self.a_ci[0]:.4f}, "
            f"{self.a_ci[1]:.4f}]\n"
            f"  D_opt = {self.d_fit.coef:.4g} C^{self.b:.4f}  {lvl} [{self.b_ci[0]:.4f}, "
            f"{self.b_ci[1]:.4f}]"
        )


def approach1(
    N: Any,
    D: Any,
    loss: Any,
    *,
    run: Any = None,
    C: Any = None,
    flops_per_token: FlopsPerToken | None = None,
    n_grid: int = 1500,
    c_range: tuple[float, float] | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
) -> Approach1Result:
    """Hoffmann et al. 2022 Approach 1 from training curves.

    Rows are checkpoints: N (model size), D (tokens seen so far), loss; `run` identifies runs (default: N).
    C per checkpoint defaults to 6ND (or flops_per_token(N) * D). At each of n_grid log-spaced FLOP values
    (Hoffmann et al. used 1500) the run with the lowest loss (log-log interpolation along its curve, only
    inside its logged range) defines N_opt(C), D_opt(C); power laws are fitted to the envelope.
    """
    curves = _curves(run, N, D, loss, C, flops_per_token)
    if len(curves) < 3:
        raise ValueError(f"Approach 1 needs at least 3 runs (training curves), got {len(curves)}")
    lo = min(cv[1][0] for cv in curves) if c_range is None else np.log(c_range[0])
    hi = max(cv[1][-1] for cv in curves) if c_range is None else np.log(c_range[1])
    grid = np.linspace(lo, hi, n_grid)
    R = len(curves)
    sizes = np.array([cv[0] for cv in curves])
    logl_rxg = np.full((R, n_grid), np.inf)
    logd_rxg = np.full((R, n_grid), np.nan)
    for r, (_, logc, logd, logl) in enumerate(curves):
        inside = (grid >= logc[0] - 1e-12) & (grid <= logc[-1] + 1e-12)
        logl_rxg[r, inside] = np.interp(grid[inside], logc, logl)
        logd_rxg[r, inside] = np.interp(grid[inside], logc, logd)
    cols = np.arange(n_grid)

    def envelope(mask_r: np.ndarray):
        vals = np.where(mask_r[:, None], logl_rxg, np.inf)
        win = np.argmin(vals, axis=0)
        covered = np.isfinite(vals[win, cols])
        cov = np.isfinite(vals)
        smallest = np.min(np.where(cov, sizes[:, None], np.inf), axis=0)
        largest = np.max(np.where(cov, sizes[:, None], -np.inf), axis=0)
        # Interior winners only: at the smallest/largest covering size the true optimum may lie beyond.
        keep = covered & (sizes[win] > smallest) & (sizes[win] < largest)
        return win, keep

    win, keep = envelope(np.ones(R, bool))
    if keep.sum() < 2:
        raise ValueError(
            "the envelope has fewer than 2 grid points with an interior winner; add runs of "
            "smaller/larger models covering the same FLOP range"
        )
    kept = np.flatnonzero(keep)
    cg = np.exp(grid[kept])
    n_env = sizes[win[kept]]
    d_env = np.exp(logd_rxg[win[kept], kept])
    l_env = np.exp(logl_rxg[win[kept], kept])
    n_fit = fit_power_law(cg, n_env, None, ci_level)
    d_fit = fit_power_law(cg, d_env, None, ci_level)
    a_ci, b_ci = n_fit.exponent_ci, d_fit.exponent_ci
    if n_bootstrap:
        # Resample whole runs: envelope points of one run are not independent observations.
        rng = np.random.default_rng(seed)
        a_s, b_s = [], []
        for _ in range(n_bootstrap):
            mask = np.zeros(R, bool)
            mask[rng.integers(0, R, R)] = True
            w, k = envelope(mask)
            if k.sum() < 2:
                continue
            kk = np.flatnonzero(k)
            a_s.append(np.polyfit(grid[kk], np.log(sizes[w[kk]]), 1)[0])
            b_s.append(np.polyfit(grid[kk], logd_rxg[w[kk], kk], 1)[0])
        if a_s:
            a_ci, b_ci = percentile_interval(a_s, ci_level), percentile_interval(b_s, ci_level)
    return Approach1Result(
        C=cg,
        N=n_env,
        D=d_env,
        loss=l_env,
        n_fit=n_fit,
        d_fit=d_fit,
        a_ci=(float(a_ci[0]), float(a_ci[1])),
        b_ci=(float(b_ci[0]), float(b_ci[1])),
        n_runs=R,
        ci_level=ci_level,
    )
