"""Compute-optimal allocation from a fitted loss law L(N, D).

Given a training-compute budget C and a FLOP model (default C = 6 N D, Kaplan et al. 2020 / Hoffmann et al.
2022; or any `flops_per_token(N)` callable, e.g. exact model accounting, so that C = flops_per_token(N) * D),
find N*(C) = argmin_N L(N, C / flops_per_token(N)), D*(C) and L*(C).

- Chinchilla form L = E + A N^-alpha + B D^-beta with C = 6ND has the closed form (Hoffmann et al. 2022,
  eq. 4)
  N* = G (C/6)^a, D* = G^-1 (C/6)^b, a = beta/(alpha+beta), b = alpha/(alpha+beta),
  G = (alpha A / (beta B))^(1/(alpha+beta)).
- Every other law / FLOP model is solved numerically: a grid over log N followed by golden-section refinement,
  vectorised over all budgets at once.
- `inference_optimal`: Sardana et al. 2024 ("Beyond Chinchilla-Optimal: Accounting for Inference in Language
  Model Scaling Laws"): for a target loss and an expected number of inference tokens D_inf, minimise the
  lifetime FLOPs 6 N D_train + 2 N D_inf subject to L(N, D_train) = target. `inference_optimal_at_budget` is
  the dual: the lowest loss for a fixed lifetime-compute budget.
- `data_constrained_optimal`: unique data capped at U tokens. With a law that takes unique tokens as an input
  (Muennighoff et al. 2023's data-constrained law, which discounts repeated epochs) the optimum is found with
  that law; otherwise the documented fallback is a hard cap D <= max_epochs * U (repeated data counted as
  fresh up to the cap, Muennighoff et al. found up to ~4 epochs nearly as good as unique data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling._lawcall import (
    UNIQUE_TOKEN_INPUTS,
    as_param_samples,
    check_inputs,
    evaluate,
    resolve_law,
    solve_log_d,
)
from scaling.intervals import percentile_interval

__all__ = [
    "OptimalAllocation",
    "InferenceOptimal",
    "DataConstrainedOptimal",
    "chinchilla_exponents",
    "chinchilla_closed_form",
    "compute_optimal",
    "inference_optimal",
    "inference_optimal_at_budget",
    "data_constrained_optimal",
]

FlopsPerToken = Callable[[np.ndarray], np.ndarray]
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")


def _arr(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _positive(name: str, x: Any) -> np.ndarray:
    a = np.atleast_1d(_arr(x))
    bad = np.flatnonzero(~np.isfinite(a) | (a <= 0))
    if bad.size:
        raise ValueError(
            f"{name} must be finite and positive; bad entries at indices {bad.tolist()}: {a[bad]}"
        )
    return a


def _bcast(v: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a fixed law input: a per-problem vector (m,) pairs with rows of an (m, k) candidate grid."""
    a = _arr(v)
    if a.ndim == 1 and len(shape) == 2:  # rows of a candidate grid are the independent problems
        a = a[:, None]
    return np.broadcast_to(a, shape)


def _lifetime_flops(n, d, inference_tokens, flops_per_token, inference_flops_per_token) -> np.ndarray:
    """Training plus inference FLOPs of N parameters trained on D tokens, then serving ``inference_tokens``
    (Sardana et al. 2024): flops_per_token(N) D + inference_flops_per_token(N) D_inf."""
    return _fpt(flops_per_token, n) * d + _arr(inference_flops_per_token(n)) * inference_tokens


def _fpt(flops_per_token: FlopsPerToken | None, n: np.ndarray) -> np.ndarray:
    if flops_per_token is None:
        return 6.0 * n
    out = _arr(flops_per_token(n))
    if out.shape != np.shape(n):
        out = np.broadcast_to(out, np.shape(n))
    return out


def _is_chinchilla(law: Any, params: Mapping[str, float]) -> bool:
    return getattr(law, "name", None) == "chinchilla" and all(k in params for k in _CHINCHILLA_PARAMS)


# ----------------------------------------------------------------------------------------------------------
# closed form (Chinchilla)
# ----------------------------------------------------------------------------------------------------------
def chinchilla_exponents(alpha: float, beta: float) -> tuple[float, float]:
    """(a, b) with N* ∝ C^a, D* ∝ C^b for L = E + A/N^alpha + B/D^beta and C = 6ND (Hoffmann et al. 2022)."""
    return beta / (alpha + beta), alpha / (alpha + beta)


def chinchilla_closed_form(params: Mapping[str, float], C: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N*, D*, L*) for the Chinchilla law at budgets C (C = 6ND). Vectorised over C.

    Raises ValueError when A, B, alpha or beta is not finite and > 0: the law then does not trade N against
    D (e.g. alpha = 0: loss falls with D alone, N* -> 0), and the formula would return 0, inf, NaN or a
    complex number -- a bootstrap draw there must count as failed, not enter a CI."""
    E, A, B, al, be = (float(params[k]) for k in _CHINCHILLA_PARAMS)
    terms = {"A": A, "B": B, "alpha": al, "beta": be}
    bad = {k: v for k, v in terms.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"no interior optimum: Chinchilla parameters {bad} must be finite and > 0")
    a, b = chinchilla_exponents(al, be)
    G = (al * A / (be * B)) ** (1.0 / (al + be))
    c6 = _arr(C) / 6.0
    n = G * c6**a
    d = c6**b / G
    return n, d, E + A * n**-al + B * d**-be


# ----------------------------------------------------------------------------------------------------------
# vectorised 1-D minimiser over log N (one independent problem per row)
# ----------------------------------------------------------------------------------------------------------
def _falls_to_infeasible(objective, x_ok: np.ndarray, x_bad: np.ndarray, f_ok: np.ndarray) -> np.ndarray:
    """Per row: whether the objective, feasible at x_ok (value f_ok), is lower still at the edge of the
    feasible range between x_ok and x_bad (found by bisection; rows with x_bad == x_ok: False)."""
    a, b = x_ok.copy(), x_bad.copy()
    for _ in range(60):
        mid = 0.5 * (a + b)
        feasible = np.isfinite(objective(mid[:, None])[:, 0])
        a, b = np.where(feasible, mid, a), np.where(feasible, b, mid)
    f_edge = objective(a[:, None])[:, 0]
    return np.isfinite(f_edge) & (f_edge < f_ok) & (x_bad != x_ok)


def _minimise_rows(
    objective: Callable[[np.ndarray], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    n_grid: int = 257,
    n_iter: int = 80,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """argmin over x in [lo_i, hi_i] of objective(x)[i] for every row i.

    objective maps an (m, k) array of x to (m, k) values (NaN = infeasible). A coarse grid finds the basin
    (robust for any unimodal or mildly multimodal profile); golden-section search polishes it to the
    precision a flat minimum allows (~1e-8 in log N in float64).
    Returns (x*, f(x*), on_edge) where on_edge flags rows whose grid minimum sat on the search boundary.
    """
    t = np.linspace(0.0, 1.0, n_grid)
    grid = lo[:, None] + (hi - lo)[:, None] * t[None, :]
    vals = np.where(np.isfinite(v := objective(grid)), v, np.inf)
    if not np.all(np.isfinite(vals.min(axis=1))):
        rows = np.flatnonzero(~np.isfinite(vals.min(axis=1))).tolist()
        raise ValueError(f"objective is infeasible everywhere in the search range for rows {rows}")
    i = np.argmin(vals, axis=1)
    rows = np.arange(grid.shape[0])
    # On the edge: the grid minimum on the search boundary, or next to an infeasible point (e.g. D < 1 at
    # large N) with the profile still falling up to where the feasible range ends -- no interior optimum.
    # (A profile that rises steeply before that edge, as loss does when the tokens left run out, is fine.)
    x_i, f_i = grid[rows, i], vals[rows, i]
    on_edge = (i == 0) | (i == n_grid - 1)
    for step in (-1, 1):
        nb = np.clip(i + step, 0, n_grid - 1)
        infeasible = ~np.isfinite(vals[rows, nb])
        if infeasible.any():  # the bisection's 61 objective calls only where a neighbour is infeasible
            x_bad = np.where(infeasible, grid[rows, nb], x_i)
            on_edge |= _falls_to_infeasible(objective, x_i, x_bad, f_i)
    a = grid[rows, np.clip(i - 1, 0, n_grid - 1)]
    b = grid[rows, np.clip(i + 1, 0, n_grid - 1)]
    c = b - _GOLDEN * (b - a)
    d = a + _GOLDEN * (b - a)

    def f(x: np.ndarray) -> np.ndarray:
        y = objective(x[:, None])[:, 0]
        return np.where(np.isfinite(y), y, np.inf)

    fc, fd = f(c), f(d)
    for _ in range(n_iter):
        left = fc < fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        new_c = b - _GOLDEN * (b - a)
        new_d = a + _GOLDEN * (b - a)
        # Reuse the surviving interior point (standard golden-section bookkeeping): one new point per row.
        c_next = np.where(left, new_c, d)
        d_next = np.where(left, c, new_d)
        probe = np.where(left, c_next, d_next)
        fp = f(probe)
        fc, fd = np.where(left, fp, fd), np.where(left, fc, fp)
        c, d = c_next, d_next
    x = 0.5 * (a + b)
    fx = f(x)
    grid_best = vals[rows, i]
    better_grid = grid_best < fx  # never return something worse than the best grid point
    x = np.where(better_grid, grid[rows, i], x)
    return x, np.where(better_grid, grid_best, fx), on_edge


# ----------------------------------------------------------------------------------------------------------
# compute-optimal allocation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class OptimalAllocation:
    """N*(C), D*(C), L*(C) for a fitted law and FLOP model.

    n_exponent / d_exponent: local exponents d log N*/d log C and d log D*/d log C at each C (constant a, b
    for the Chinchilla closed form). `*_ci`: (lo, hi) percentile intervals from bootstrap parameter draws,
    when given.
    """

    C: np.ndarray
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    n_exponent: np.ndarray
    d_exponent: np.ndarray
    method: str
    law: str
    flop_model: str
    N_ci: tuple[np.ndarray, np.ndarray] | None = None
    D_ci: tuple[np.ndarray, np.ndarray] | None = None
    loss_ci: tuple[np.ndarray, np.ndarray] | None = None
    n_exponent_ci: tuple[np.ndarray, np.ndarray] | None = None
    ci_level: float = 0.95
    n_samples: int = 0
    n_failed_samples: int = 0  # bootstrap draws without an interior optimum (excluded from the CIs)
    # N*, D* of every usable draw [draws, budgets] (not serialised; Approach 3 fits its exponents to them)
    sample_N: np.ndarray | None = field(default=None, repr=False)
    sample_D: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokens_per_param(self) -> np.ndarray:
        return self.D / self.N

    def to_dict(self) -> dict:
        def lst(x):
            return None if x is None else np.asarray(x).tolist()

        out = {k: lst(getattr(self, k)) for k in ("C", "N", "D", "loss", "n_exponent", "d_exponent")}
        out["tokens_per_param"] = lst(self.tokens_per_param)
        out.update(
            method=self.method,
            law=self.law,
            flop_model=self.flop_model,
            ci_level=self.ci_level,
            n_samples=self.n_samples,
            n_failed_samples=self.n_failed_samples,
        )
        for k in ("N_ci", "D_ci", "loss_ci", "n_exponent_ci"):
            v = getattr(self, k)
            out[k] = None if v is None else [lst(v[0]), lst(v[1])]
        return out

    def summary(self) -> str:
        lines = [
            f"compute-optimal allocation: law={self.law}, flops={self.flop_model}, method={self.method}",
            f"{'C':>11} {'N*':>11} {'D*':>11} {'D*/N*':>8} {'L*':>8} {'a_local':>8}",
        ]
        for i in range(self.C.size):
            row = (
                f"{self.C[i]:11.3e} {self.N[i]:11.3e} {self.D[i]:11.3e} {self.tokens_per_param[i]:8.2f} "
                f"{self.loss[i]:8.4f} {self.n_exponent[i]:8.4f}"
            )
            if self.N_ci is not None:
                row += f"  N* {self.ci_level:.0%} CI [{self.N_ci[0][i]:.3e}, {self.N_ci[1][i]:.3e}]"
            lines.append(row)
        return "\n".join(lines)


def _numeric_optimum(law, params, C, flops_per_token, extra, n_bounds, extra_fn=None):
    """Vectorised argmin over log N of L(N, C/fpt(N)) with N in n_bounds (and D >= 1).

    extra_fn(N, D) -> dict of further inputs that depend on the candidate (e.g. unique tokens used).
    """
    lo = np.full(C.shape, np.log(n_bounds[0]))
    hi = (
        np.log(np.minimum(n_bounds[1], C / 6.0))
        if flops_per_token is None
        else np.full(C.shape, np.log(n_bounds[1]))
    )
    if np.any(hi <= lo):
        bad = np.flatnonzero(hi <= lo).tolist()
        raise ValueError(f"empty search range for N at budget indices {bad}; widen n_bounds={n_bounds}")
    Cc = C[:, None]

    def objective(logn: np.ndarray) -> np.ndarray:
        n = np.exp(logn)
        d = Cc / _fpt(flops_per_token, n)
        ex = {k: _bcast(v, n.shape) for k, v in extra.items()}
        if extra_fn is not None:
            ex.update(extra_fn(n, d))
        out = evaluate(law, params, N=n, D=d, **ex)
        return np.where(d >= 1.0, out, np.nan)

    logn, loss, on_edge = _minimise_rows(objective, lo, hi)
    return np.exp(logn), loss, on_edge


def _solve(law, params, C, flops_per_token, extra, n_bounds, extra_fn=None):
    if flops_per_token is None and not extra and extra_fn is None and _is_chinchilla(law, params):
        n, d, loss = chinchilla_closed_form(params, C)
        return n, d, loss, "closed_form"
    n, loss, on_edge = _numeric_optimum(law, params, C, flops_per_token, extra, n_bounds, extra_fn)
    if np.any(on_edge):
        bad = C[on_edge]
        raise ValueError(
            f"no interior optimum over N in {n_bounds} for budgets {bad.tolist()}: the law does not "
            "trade N against D there (check its parameters, or pass wider n_bounds)"
        )
    return n, C / _fpt(flops_per_token, n), loss, "numeric"


def compute_optimal(
    model: Any,
    C: Any,
    *,
    params: Mapping[str, float] | None = None,
    flops_per_token: FlopsPerToken | None = None,
    method: str = "auto",
    n_bounds: tuple[float, float] = (1e2, 1e16),
    extra_inputs: Mapping[str, Any] | None = None,
    param_samples: Any = None,
    ci_level: float = 0.95,
) -> OptimalAllocation:
    """Compute-optimal N*(C), D*(C), L*(C) for a fitted law.

    model: FitResult, (law, params) pair, or a law (or registry name) with `params=`.
    C: training FLOP budget(s). flops_per_token: callable N -> training FLOPs per token (default 6N).
    method: "auto" (closed form for Chinchilla with C = 6ND, numeric otherwise), "closed_form", "numeric".
    extra_inputs: fixed values for any law inputs other than N and D.
    param_samples: bootstrap draws of the parameters (list of dicts or dict of arrays) -> percentile CIs.
    """
    law, params = resolve_law(model, params)
    check_inputs(law)
    C = _positive("C", C)
    extra = dict(extra_inputs or {})
    if method not in ("auto", "closed_form", "numeric"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'numeric', got {method!r}")
    if method == "closed_form" and not (
        flops_per_token is None and _is_chinchilla(law, params) and not extra
    ):
        raise ValueError("closed form exists only for the 'chinchilla' law with C = 6ND (no flops_per_token)")

    def solve(p, cc, ex=extra):
        if method == "numeric":
            n, loss, on_edge = _numeric_optimum(law, p, cc, flops_per_token, ex, n_bounds)
            if np.any(on_edge):
                raise ValueError(
                    f"no interior optimum over N in {n_bounds} for budgets {cc[on_edge].tolist()}"
                )
            return n, cc / _fpt(flops_per_token, n), loss, "numeric"
        return _solve(law, p, cc, flops_per_token, ex, n_bounds)

    n, d, loss, used = solve(params, C)
    # Local exponents by re-solving at C * exp(+-h): exact for power laws, meaningful for any law.
    h = 0.05
    n_hi, d_hi, *_ = solve(params, C * np.exp(h))
    n_lo, d_lo, *_ = solve(params, C * np.exp(-h))
    a_loc = (np.log(n_hi) - np.log(n_lo)) / (2 * h)
    b_loc = (np.log(d_hi) - np.log(d_lo)) / (2 * h)
    if used == "closed_form":
        a, b = chinchilla_exponents(params["alpha"], params["beta"])
        a_loc, b_loc = np.full(C.shape, a), np.full(C.shape, b)
    res = OptimalAllocation(
        C=C,
        N=n,
        D=d,
        loss=loss,
        n_exponent=a_loc,
        d_exponent=b_loc,
        method=used,
        law=str(getattr(law, "name", law)),
        flop_model="6ND" if flops_per_token is None else "flops_per_token(N)*D",
        ci_level=ci_level,
    )
    samples = as_param_samples(param_samples)
    if samples:
        C3 = np.concatenate([C, C * np.exp(h), C * np.exp(-h)])
        stacked = None
        # per-budget extra inputs follow their budget into the three blocks of C3
        extra3 = {k: np.tile(np.ravel(v), 3) if np.ndim(v) and np.size(v) == len(C) else v
                  for k, v in extra.items()}
        if used == "numeric" and not extra:
            stacked = _solve_samples_stacked(law, params, samples, C3, flops_per_token, n_bounds)
        if stacked is None:
            stacked = _solve_samples_loop(lambda p, cc: solve(p, cc, extra3), params, samples, C3)
        ok, n3, d3, l3 = stacked
        m = len(C)
        ns, ds, ls = n3[ok, :m], d3[ok, :m], l3[ok, :m]
        es = (np.log(n3[ok, m : 2 * m]) - np.log(n3[ok, 2 * m :])) / (2 * h)
        # A bootstrap draw whose law has no interior optimum (e.g. a resample that leaves an exponent
        # unidentified) says the optimum is poorly determined: it is counted, not allowed to abort the CI.
        res.n_failed_samples = int((~ok).sum())
        res.n_samples = len(samples)
        res.sample_N, res.sample_D = ns, ds
        if len(ns) >= max(2, len(samples) // 2):  # a CI from a minority of draws would be biased: none
            res.N_ci = percentile_interval(ns, ci_level)
            res.D_ci = percentile_interval(ds, ci_level)
            res.loss_ci = percentile_interval(ls, ci_level)
            res.n_exponent_ci = percentile_interval(es, ci_level)
    return res


def _solve_samples_loop(solve, params, samples, C):
    """(ok [S], N [S, m], D [S, m], L [S, m]) one draw at a time (closed form, or laws with extra inputs)."""
    S, m = len(samples), len(C)
    ok = np.ones(S, bool)
    n, d, loss = (np.full((S, m), np.nan) for _ in range(3))
    for i, p in enumerate(samples):
        try:
            n[i], d[i], loss[i], _ = solve({**params, **p}, C)
        except ValueError:
            ok[i] = False
    return ok, n, d, loss


def _solve_samples_stacked(law, params, samples, C, flops_per_token, n_bounds):
    """The numeric optimum of every draw at every budget in one vectorised solve (rows = draws x budgets,
    each row with its own parameters): ~100x faster than one solve per draw, whose cost is dominated by
    per-call overhead. None if the law's predict does not broadcast per-row parameters."""
    S, m = len(samples), len(C)
    names = list(dict.fromkeys([*params, *(k for p in samples for k in p)]))
    stacked = {
        k: np.repeat(np.array([float({**params, **p}[k]) for p in samples]), m)[:, None] for k in names
    }
    try:
        n, loss, on_edge = _numeric_optimum(law, stacked, np.tile(C, S), flops_per_token, {}, n_bounds)
    except (TypeError, ValueError):
        return None
    n, loss = n.reshape(S, m), loss.reshape(S, m)
    ok = ~on_edge.reshape(S, m).any(axis=1) & np.isfinite(loss).all(axis=1)
    return ok, n, C[None, :] / _fpt(flops_per_token, n), loss


# ----------------------------------------------------------------------------------------------------------
# inference-aware optimum (Sardana et al. 2024)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class InferenceOptimal:
    """Lifetime-compute-optimal model (Sardana et al. 2024) and the Chinchilla-optimal model it replaces.

    For each (target loss, inference tokens): N, D_train minimise train_flops + inference_flops with
    L(N, D_train) = target_loss (or, for `inference_optimal_at_budget`, minimise the loss at fixed total).
    `chinchilla_*`: the training-compute-optimal model reaching the same loss, charged the same inference.
    """

    target_loss: np.ndarray
    inference_tokens: np.ndarray
    N: np.ndarray
    D_train: np.ndarray
    train_flops: np.ndarray
    inference_flops: np.ndarray
    chinchilla_N: np.ndarray
    chinchilla_D: np.ndarray
    chinchilla_total_flops: np.ndarray
    formulation: str = "target_loss"
    law: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def total_flops(self) -> np.ndarray:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> np.ndarray:
        return self.D_train / self.N

    @property
    def flops_saving(self) -> np.ndarray:
        """Fraction of lifetime FLOPs saved relative to the Chinchilla-optimal model at the same loss."""
        return 1.0 - self.total_flops / self.chinchilla_total_flops

    def to_dict(self) -> dict:
        keys = (
            "target_loss",
            "inference_tokens",
            "N",
            "D_train",
            "train_flops",
            "inference_flops",
            "chinchilla_N",
            "chinchilla_D",
            "chinchilla_total_flops",
        )
        out = {k: np.asarray(getattr(self, k)).tolist() for k in keys}
        out.update(
            total_flops=self.total_flops.tolist(),
            tokens_per_param=self.tokens_per_param.tolist(),
            flops_saving=self.flops_saving.tolist(),
            formulation=self.formulation,
            law=self.law,
        )
        return out

    def summary(self) -> str:
        lines = [
            f"inference-aware optimum ({self.formulation}, law={self.law}; Sardana et al. 2024)",
            f"{'loss':>8} {'D_inf':>10} {'N':>10} {'D_train':>10} {'D/N':>8} {'total FLOPs':>12} "
            f"{'N_chin':>10} {'saving':>7}",
        ]
        for i in range(self.N.size):
            lines.append(
                f"{self.target_loss.flat[i]:8.4f} {self.inference_tokens.flat[i]:10.3e} "
                f"{self.N.flat[i]:10.3e} {self.D_train.flat[i]:10.3e} {self.tokens_per_param.flat[i]:8.1f} "
                f"{self.total_flops.flat[i]:12.4e} {self.chinchilla_N.flat[i]:10.3e} "
                f"{self.flops_saving.flat[i]:7.1%}"
            )
        return "\n".join(lines)


def _tokens_for_loss(law, params, n: np.ndarray, target: np.ndarray, extra, log_d_max: float = 80.0):
    """D with L(N, D) = target (L decreasing in D), by vectorised bisection in log D; NaN if unreachable."""
    if not extra and _is_chinchilla(law, params):
        E, A, B, al, be = (float(params[k]) for k in _CHINCHILLA_PARAMS)
        gap = target - E - A * n**-al
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (B / gap) ** (1.0 / be), np.nan)
    n, target = np.broadcast_arrays(np.asarray(n, np.float64), np.asarray(target, np.float64))
    ex = {k: _bcast(v, n.shape) for k, v in extra.items()}
    reachable = evaluate(law, params, N=n, D=np.full(n.shape, np.exp(log_d_max)), **ex) <= target
    log_d = solve_log_d(law, params, target, np.zeros(n.shape), np.full(n.shape, log_d_max), N=n, **ex)
    return np.where(reachable, np.exp(log_d), np.nan)


def inference_optimal(
    model: Any,
    target_loss: Any,
    inference_tokens: Any,
    *,
    params: Mapping[str, float] | None = None,
    flops_per_token: FlopsPerToken | None = None,
    inference_flops_per_token: FlopsPerToken | None = None,
    n_bounds: tuple[float, float] = (1e2, 1e16),
    extra_inputs: Mapping[str, Any] | None = None,
) -> InferenceOptimal:
    """Sardana et al. 2024: minimise 6 N D_train + 2 N D_inf subject to L(N, D_train) = target_loss.

    target_loss and inference_tokens broadcast against each other (one problem per element). Training FLOPs
    per token default to 6N and inference FLOPs per token to 2N (forward pass only), as in the paper; pass
    callables for exact accounting. For each candidate N, D_train(N) is the unique D with L(N, D) = target
    (closed form for Chinchilla, bisection otherwise); the lifetime FLOPs are then minimised over log N.
    """
    law, params = resolve_law(model, params)
    check_inputs(law)
    extra = dict(extra_inputs or {})
    target, dinf = np.broadcast_arrays(
        np.atleast_1d(_arr(target_loss)), np.atleast_1d(_arr(inference_tokens))
    )
    target, dinf = target.ravel().copy(), dinf.ravel().copy()
    if np.any(~np.isfinite(dinf) | (dinf < 0)):
        raise ValueError("inference_tokens must be finite and >= 0")
    _positive("target_loss", target)
    inf_fpt = (lambda n: 2.0 * n) if inference_flops_per_token is None else inference_flops_per_token

    def lifetime(logn: np.ndarray) -> np.ndarray:
        n = np.exp(logn)
        d = _tokens_for_loss(law, params, n, target[:, None] + 0 * n, extra)
        return _lifetime_flops(n, d, dinf[:, None], flops_per_token, inf_fpt)

    lo = np.full(target.shape, np.log(n_bounds[0]))
    hi = np.full(target.shape, np.log(n_bounds[1]))
    try:
        logn, _, on_edge = _minimise_rows(lifetime, lo, hi)
    except ValueError as err:
        raise ValueError(
            f"target loss unreachable for N in {n_bounds} (below the law's irreducible loss?): {err}"
        ) from None
    if np.any(on_edge):
        raise ValueError(
            f"inference-aware optimum on the N search boundary {n_bounds} for targets "
            f"{target[on_edge].tolist()}; widen n_bounds"
        )
    n = np.exp(logn)
    d = _tokens_for_loss(law, params, n, target, extra)
    train = _fpt(flops_per_token, n) * d
    inference = _arr(inf_fpt(n)) * dinf
    # Chinchilla-optimal reference: same problem without inference demand.
    if np.any(dinf > 0):
        ref = inference_optimal(
            (law, params),
            target,
            np.zeros_like(target),
            flops_per_token=flops_per_token,
            inference_flops_per_token=inference_flops_per_token,
            n_bounds=n_bounds,
            extra_inputs=extra_inputs,
        )
        cn, cd = ref.N, ref.D_train
    else:
        cn, cd = n, d
    c_total = _lifetime_flops(cn, cd, dinf, flops_per_token, inf_fpt)
    return InferenceOptimal(
        target_loss=target,
        inference_tokens=dinf,
        N=n,
        D_train=d,
        train_flops=train,
        inference_flops=inference,
        chinchilla_N=cn,
        chinchilla_D=cd,
        chinchilla_total_flops=c_total,
        formulation="target_loss",
        law=str(getattr(law, "name", law)),
    )


def inference_optimal_at_budget(
    model: Any,
    total_flops: Any,
    inference_tokens: Any,
    *,
    params: Mapping[str, float] | None = None,
    flops_per_token: FlopsPerToken | None = None,
    inference_flops_per_token: FlopsPerToken | None = None,
    n_bounds: tuple[float, float] = (1e2, 1e16),
    extra_inputs: Mapping[str, Any] | None = None,
) -> InferenceOptimal:
    """Dual of `inference_optimal`: lowest loss for a fixed lifetime budget 6 N D_train + 2 N D_inf = total.

    D_train(N) = (total - inference_flops(N)) / flops_per_token(N); L(N, D_train(N)) is minimised over log N.
    `target_loss` of the result holds the optimal loss. `chinchilla_*` is, as in `inference_optimal`, the
    training-compute-optimal model reaching that same loss, charged the same inference tokens, so
    `flops_saving` is Sardana et al.'s lifetime saving at equal quality. `extras["inference_unaware"]` holds
    what one would train spending the whole budget on training and ignoring inference (N, D, loss, and its
    lifetime FLOPs, above the budget): a model of lower loss that the budget cannot pay for, so it is not the
    reference of the saving.
    """
    law, params = resolve_law(model, params)
    check_inputs(law)
    extra = dict(extra_inputs or {})
    total, dinf = np.broadcast_arrays(np.atleast_1d(_arr(total_flops)), np.atleast_1d(_arr(inference_tokens)))
    total, dinf = total.ravel().copy(), dinf.ravel().copy()
    _positive("total_flops", total)
    inf_fpt = (lambda n: 2.0 * n) if inference_flops_per_token is None else inference_flops_per_token

    def loss_of(logn: np.ndarray) -> np.ndarray:
        n = np.exp(logn)
        d = (total[:, None] - _arr(inf_fpt(n)) * dinf[:, None]) / _fpt(flops_per_token, n)
        dd = np.where(d >= 1.0, d, 1.0)
        ex = {k: _bcast(v, n.shape) for k, v in extra.items()}  # per-budget inputs: one row each
        return np.where(d >= 1.0, evaluate(law, params, N=n, D=dd, **ex), np.nan)

    lo = np.full(total.shape, np.log(n_bounds[0]))
    hi = np.full(total.shape, np.log(n_bounds[1]))
    logn, loss, on_edge = _minimise_rows(loss_of, lo, hi)
    if np.any(on_edge):
        raise ValueError(f"optimum on the N search boundary {n_bounds} for budgets {total[on_edge].tolist()}")
    n = np.exp(logn)
    inference = _arr(inf_fpt(n)) * dinf
    d = (total - inference) / _fpt(flops_per_token, n)
    same_loss = inference_optimal(  # no inference demand: the training-compute optimum at that loss
        (law, params), loss, np.zeros_like(loss), flops_per_token=flops_per_token,
        inference_flops_per_token=inference_flops_per_token, n_bounds=n_bounds, extra_inputs=extra_inputs,
    )
    cn, cd = same_loss.N, same_loss.D_train
    unaware = compute_optimal(
        (law, params), total, flops_per_token=flops_per_token, n_bounds=n_bounds, extra_inputs=extra_inputs
    )
    unaware_total = _lifetime_flops(unaware.N, unaware.D, dinf, flops_per_token, inf_fpt)
    return InferenceOptimal(
        target_loss=loss,
        inference_tokens=dinf,
        N=n,
        D_train=d,
        train_flops=total - inference,
        inference_flops=inference,
        chinchilla_N=cn,
        chinchilla_D=cd,
        chinchilla_total_flops=_lifetime_flops(cn, cd, dinf, flops_per_token, inf_fpt),
        formulation="fixed_total_flops",
        law=str(getattr(law, "name", law)),
        extras={
            "inference_unaware": {
                "N": unaware.N.tolist(),
                "D": unaware.D.tolist(),
                "loss": unaware.loss.tolist(),
                "total_flops": unaware_total.tolist(),
            }
        },
    )


# ----------------------------------------------------------------------------------------------------------
# data-constrained optimum
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DataConstrainedOptimal:
    """Compute-optimal allocation when only `unique_tokens` of distinct data exist.

    method "law": the law itself takes unique tokens as an input (Muennighoff et al. 2023) and discounts
    repetition ("law+cap" additionally caps D); "cap": hard cap D <= max_epochs * unique_tokens. `free_*`:
    the optimum with unlimited fresh data; `binding`: where the data limit moved the optimum away from it.
    """

    C: np.ndarray
    unique_tokens: np.ndarray
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    free_N: np.ndarray
    free_D: np.ndarray
    free_loss: np.ndarray
    method: str
    max_epochs: float | None
    law: str

    @property
    def epochs(self) -> np.ndarray:
        return self.D / self.unique_tokens

    @property
    def binding(self) -> np.ndarray:
        """Where the data limit moved the optimum away from the unlimited-data one (free_N)."""
        return ~np.isclose(self.N, self.free_N, rtol=1e-4)

    @property
    def tokens_per_param(self) -> np.ndarray:
        return self.D / self.N

    def to_dict(self) -> dict:
        keys = ("C", "unique_tokens", "N", "D", "loss", "free_N", "free_D", "free_loss")
        out = {k: np.asarray(getattr(self, k)).tolist() for k in keys}
        out.update(
            epochs=self.epochs.tolist(),
            binding=self.binding.tolist(),
            method=self.method,
            max_epochs=self.max_epochs,
            law=self.law,
        )
        return out

    def summary(self) -> str:
        cap = "" if self.max_epochs is None else f", cap {self.max_epochs:g} epochs"
        lines = [
            f"data-constrained optimum (method={self.method}{cap}, law={self.law})",
            f"{'C':>10} {'U':>10} {'N':>10} {'D':>10} {'epochs':>7} {'loss':>8} {'free N':>10} {'free L':>8}",
        ]
        for i in range(self.C.size):
            lines.append(
                f"{self.C[i]:10.3e} {self.unique_tokens[i]:10.3e} {self.N[i]:10.3e} {self.D[i]:10.3e} "
                f"{self.epochs[i]:7.2f} {self.loss[i]:8.4f} {self.free_N[i]:10.3e} {self.free_loss[i]:8.4f}"
            )
        return "\n".join(lines)


def _n_for_tokens(C, cap, flops_per_token, n_bounds):
    """Smallest N with C / flops_per_token(N) <= cap (flops_per_token increasing in N)."""
    if flops_per_token is None:
        return C / (6.0 * cap)
    lo = np.full(C.shape, np.log(n_bounds[0]))
    hi = np.full(C.shape, np.log(n_bounds[1]))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        too_many_tokens = C / _fpt(flops_per_token, np.exp(mid)) > cap
        lo = np.where(too_many_tokens, mid, lo)
        hi = np.where(too_many_tokens, hi, mid)
    return np.exp(hi)


def data_constrained_optimal(
    model: Any,
    C: Any,
    unique_tokens: Any,
    *,
    params: Mapping[str, float] | None = None,
    max_epochs: float | None = None,
    flops_per_token: FlopsPerToken | None = None,
    n_bounds: tuple[float, float] = (1e2, 1e16),
    extra_inputs: Mapping[str, Any] | None = None,
) -> DataConstrainedOptimal:
    """Compute-optimal N, D when unique data is limited to `unique_tokens` (broadcast against C).

    If the law has a unique-tokens input (one of U, U_D, unique_tokens, D_unique — Muennighoff et al. 2023's
    data-constrained form), D is the total number of tokens seen (repeated epochs allowed) and the law's
    repetition discount decides the trade-off; `max_epochs`, if given, additionally caps D.
    Otherwise (e.g. Chinchilla) D <= max_epochs * unique_tokens with max_epochs defaulting to 1 (unique data
    only, no repetition credit). The loss along an isoFLOP is unimodal in log N, so the capped optimum is
    N = max(N*, N_cap) where N_cap is the smallest N whose token count fits the cap.
    """
    law, params = resolve_law(model, params)
    check_inputs(law)
    C, U = np.broadcast_arrays(_positive("C", C), _positive("unique_tokens", unique_tokens))
    C, U = C.ravel().copy(), U.ravel().copy()
    extra = dict(extra_inputs or {})
    u_name = next((k for k in UNIQUE_TOKEN_INPUTS if k in tuple(law.inputs)), None)
    name = str(getattr(law, "name", law))
    if u_name is not None:
        # The law's unique-token input is the number of unique tokens *used*, min(D, U): a run shorter than
        # one pass over the data sees D unique tokens (Muennighoff et al. 2023, U_D <= D).
        def used(n, d):
            u = U[:, None] if np.ndim(d) == 2 else U
            return {u_name: np.minimum(d, np.broadcast_to(u, np.shape(d)))}

        base_n, base_d, base_loss, _ = _solve(law, params, C, flops_per_token, extra, n_bounds, used)
        # Reference without the data limit: every token fresh (U_D = D).
        free_n, free_d, free_loss, _ = _solve(
            law, params, C, flops_per_token, extra, n_bounds, lambda n, d: {u_name: d}
        )
        method = "law" if max_epochs is None else "law+cap"
    else:
        used = None
        base_n, base_d, base_loss, _ = _solve(law, params, C, flops_per_token, extra, n_bounds)
        free_n, free_d, free_loss = base_n, base_d, base_loss
        max_epochs = 1.0 if max_epochs is None else max_epochs
        method = "cap"
    if max_epochs is None:
        n, d, loss = base_n, base_d, base_loss
    else:
        if max_epochs <= 0:
            raise ValueError(f"max_epochs must be positive, got {max_epochs}")
        # The loss along an isoFLOP is unimodal in log N: the capped optimum is the free one clipped to N_cap.
        n_cap = _n_for_tokens(C, max_epochs * U, flops_per_token, n_bounds)
        n = np.maximum(base_n, n_cap)
        d = C / _fpt(flops_per_token, n)
        ex = {k: np.broadcast_to(_arr(v), n.shape) for k, v in extra.items()}
        if used is not None:
            ex.update(used(n, d))
        loss = np.where(n > base_n, evaluate(law, params, N=n, D=d, **ex), base_loss)
    return DataConstrainedOptimal(
        C=C,
        unique_tokens=U,
        N=n,
        D=d,
        loss=loss,
        free_N=free_n,
        free_D=free_d,
        free_loss=free_loss,
        method=method,
        max_epochs=None if max_epochs is None else float(max_epochs),
        law=name,
    )
