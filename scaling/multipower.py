"""The multi-power law of a loss curve across learning-rate schedules (Luo et al. 2025).

Luo, Wen, Ding, Wei, Wu & Li 2025, "A Multi-Power Law for Loss Curve Prediction Across Learning Rate
Schedules" (ICLR 2025, arXiv:2503.12811):

    L(t) = L0 + A (S1(t) + S_W)^-alpha - LD(t),
    LD(t) = B sum_{k <= t} (eta_{k-1} - eta_k) G(eta_k^-gamma S_k(t)),   G(x) = 1 - (C x + 1)^-beta,

with S1 + S_W the learning rate summed over all steps so far (warmup included), and
S_k(t) = sum_{k <= tau <= t} eta_tau the area since drop k. Each drop of the learning rate lowers the loss by
an amount that grows, as a power law, with the training done since; Tissue et al.'s law
(``scaling.lr_annealing``) instead decays every drop's effect with one momentum. Warmup as there: drops
count from the schedule's first peak on.

Fitted, like the other laws here, by Huber loss (delta 1e-3) on log residuals from a grid of starts, with the
linear coefficients (L0, A, B) of each start solved by non-negative least squares and L-BFGS-B (analytic
gradients from jax, float64) polishing all seven parameters in log space.

Uncertainty: ``MultiPowerFit.bootstrap`` refits circular block resamples of each curve and gives a band
for the curve of any schedule (``scaling.curve_bootstrap``). No curvature-based standard errors are offered:
the drop term's parameters (B, C, beta, gamma) are weakly identified (on three curves the law generates,
C = 2, refits to fresh noise put C anywhere from 0.9 to 12), and Gauss-Newton intervals (least-squares
theory, under a Huber loss mostly in its linear part, with autocorrelated points) covered the true curve
at 40-90% for a nominal 90%. The bootstrap's intervals for those four parameters are as wide as their
valley; its bands for curves are the thing to read. Judge a fit by the curves it predicts:
``experiments.lr_annealing_check`` holds out whole schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize, nnls

from scaling.bootstrap import block_weights, series_blocks
from scaling.curve_bootstrap import CurveBootstrap
from scaling.lr_annealing import checked_curves, schedule_drops, step_index

__all__ = ["MultiPowerFit", "fit_multipower", "multipower_predict"]

PARAMS = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
MAX_DROPS = 128  # learning-rate drops kept per curve (merged beyond that; see _design)
_ETA_FLOOR = 1e-12  # a drop to lr 0 makes eta^-gamma infinite; G is then 1, which this floor reproduces


@dataclass(frozen=True)
class _Design:
    """One set of measurements in the law's terms: the log of the total area P_n at each measured step n, and
    for every learning-rate drop k before it, the drop d_nk, the log of its learning rate e_nk (0 where
    there is no drop) and the area s_nk since it.

    Logs, not the areas and rates: the law's powers become exp(-alpha log P) etc., which with the logs
    computed once take half the time of ``**`` and its gradient (measured 0.65 vs 0.35 ms per objective and
    gradient on 92 points x 128 drops), and the bootstrap evaluates the objective thousands of times."""

    log_P_n: np.ndarray
    d_nk: np.ndarray
    log_e_nk: np.ndarray
    s_nk: np.ndarray

    def as_jax(self) -> _Design:
        return _Design(*(jnp.asarray(getattr(self, f)) for f in ("log_P_n", "d_nk", "log_e_nk", "s_nk")))


def _design(lr, steps=None, max_drops: int = MAX_DROPS) -> _Design:
    """The design of measurements after ``steps`` (1-based; None: every step) of schedule ``lr``."""
    eta, drop = schedule_drops(lr)
    idx = np.arange(eta.size) if steps is None else step_index(steps, eta.size)
    total = np.cumsum(eta)
    k = np.flatnonzero(drop)  # only the steps where the learning rate changed contribute
    if k.size == 0:
        k = np.array([eta.size - 1])  # a constant schedule: one zero-drop column keeps the shapes
    d_k = drop[k]
    if k.size > max_drops:
        # A cosine changes the lr at every step: thousands of columns. Consecutive drops are merged into
        # max_drops groups, each placed at its middle step (a midpoint rule for the sum over k), which
        # keeps a fit to seconds; the sum of the drops is kept exactly. On a 3000-step cosine, 128 groups
        # move the prediction by 0.035% at most (tests/test_multipower.py), below one eval's noise.
        groups = np.array_split(np.arange(k.size), max_drops)
        d_k = np.array([d_k[g].sum() for g in groups])
        k = np.array([k[g[len(g) // 2]] for g in groups])
    after = k[None, :] <= idx[:, None]
    d_nk = np.where(after, d_k[None, :], 0.0)
    s_nk = np.where(after, total[idx][:, None] - total[k - 1][None, :], 0.0)
    log_e_nk = np.where(d_nk != 0, np.log(np.maximum(eta[k], _ETA_FLOOR))[None, :], 0.0)
    return _Design(np.log(total[idx]), d_nk, log_e_nk, s_nk)


def _stack(designs: Sequence[_Design]) -> _Design:
    width = max(d.d_nk.shape[1] for d in designs)

    def pad(a):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=0.0)

    return _Design(np.concatenate([d.log_P_n for d in designs]),
                   *(np.concatenate([pad(getattr(d, f)) for d in designs])
                     for f in ("d_nk", "log_e_nk", "s_nk")))


def _terms(p, x: _Design):
    """(forward term P^-alpha, loss-drop sum without B) for params dict p (jax arrays)."""
    forward = jnp.exp(-p["alpha"] * x.log_P_n)
    g = -jnp.expm1(-p["beta"] * jnp.log1p(p["C"] * jnp.exp(-p["gamma"] * x.log_e_nk) * x.s_nk))
    return forward, jnp.sum(x.d_nk * g, axis=1)  # padded / zero-drop columns have d_nk = 0


def _predict(p, x: _Design):
    forward, drop = _terms(p, x)
    return p["L0"] + p["A"] * forward - p["B"] * drop


def _options(max_iter: int) -> dict:
    """L-BFGS-B settings for every fit and refit. Tight: scipy's defaults (ftol 2.2e-9, gtol 1e-5) stop
    in the drop term's flat valley well short of the optimum; on curves the law generates, tight fits had
    objectives up to 43% lower and predicted an unseen schedule better in 8 of 9 noise draws (measured)."""
    return {"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-10}


def _converged(r) -> bool:
    """scipy's status 0 (a tolerance met) or 2 (the line search found no decrease: at these tolerances, a
    minimum to machine precision, as ``scaling.lbfgs`` counts it); 1 is the iteration limit."""
    return r.status in (0, 2) and bool(np.isfinite(r.fun)) and bool(np.isfinite(r.x).all())


def _objective(theta, w, x: _Design, log_y, delta: float):
    """Weighted Huber loss of log residuals at log-params ``theta`` + a penalty keeping predictions > 0."""
    p = dict(zip(PARAMS, jnp.exp(theta), strict=True))
    pred = _predict(p, x)
    r = jnp.log(jnp.maximum(pred, 1e-12)) - log_y
    a = jnp.abs(r)
    huber = jnp.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))
    return jnp.sum(w * huber) + 1e3 * jnp.sum(jnp.maximum(1e-12 - pred, 0.0))


def _predict_np(params: dict, x: _Design) -> np.ndarray:
    with jax.enable_x64(True):
        p = {k: jnp.asarray(params[k], jnp.float64) for k in PARAMS}
        return np.asarray(_predict(p, x))


def _curves(params: dict, lr, steps=None) -> np.ndarray:
    """[B, M] curves for replicate params (dict of [B] arrays), as ``multipower_predict`` gives one."""
    x = _design(lr, steps)
    with jax.enable_x64(True):
        p = {k: jnp.asarray(params[k], jnp.float64) for k in PARAMS}
        return np.asarray(jax.vmap(lambda q: _predict(q, x))(p))


def multipower_predict(params: dict, lr, steps=None) -> np.ndarray:
    """The law's loss after each of ``steps`` (1-based; default every step) of a run with schedule ``lr``."""
    return _predict_np({k: float(params[k]) for k in PARAMS}, _design(lr, steps))


@dataclass
class MultiPowerFit:
    """Result of ``fit_multipower``: natural ``params`` (all > 0), the Huber objective, diagnostics."""

    params: dict[str, float]
    objective: float
    converged: bool
    n_points: int
    n_starts: int
    n_starts_at_optimum: int
    message: str = ""
    delta: float = 1e-3
    design: _Design | None = field(default=None, repr=False)  # the fitted measurements, for bootstrap
    loss: np.ndarray | None = field(default=None, repr=False)
    curve: np.ndarray | None = field(default=None, repr=False)  # each measurement's curve index
    theta: np.ndarray | None = field(default=None, repr=False)  # log params as optimised (exp may underflow)

    def predict(self, lr, steps=None) -> np.ndarray:
        return multipower_predict(self.params, lr, steps)

    def bootstrap(self, n: int = 200, *, block: int | None = None, seed: int = 0,
                  max_iter: int = 1000) -> CurveBootstrap:
        """Refit on ``n`` circular block resamples of each curve (``block`` points per block, default
        ``scaling.bootstrap.block_length`` of each curve's residuals), each from the full fit's optimum with
        the fit's tolerances. Replicates that stop at ``max_iter`` count as not converged and stay out of the
        bands; ``n_converged`` says how many."""
        if self.design is None or self.loss is None or self.curve is None or self.theta is None:
            raise ValueError("bootstrap needs the fitted measurements; fit with fit_multipower")
        log_y = np.log(self.loss)
        resid = log_y - np.log(np.asarray(_predict_np(self.params, self.design)))
        ones = np.ones(log_y.size)
        blocks = series_blocks(resid, ones, self.curve, block)
        w_BxN = block_weights(n, ones, self.curve, np.random.default_rng(seed), blocks)
        theta0 = self.theta
        # One scipy L-BFGS-B per replicate, the fit's own optimiser and tolerances, so a replicate of the full
        # data stays at the fit's optimum. scaling.lbfgs's batched L-BFGS is no faster here: 1.5 s against
        # 1.8 s for 40 replicates of the lr_annealing_check curves, not counting its compilation.
        with jax.enable_x64(True):
            x = self.design.as_jax()
            log_yj = jnp.asarray(log_y)
            vg = jax.jit(jax.value_and_grad(lambda th, w: _objective(th, w, x, log_yj, self.delta)))
            theta_BxP, ok = np.full((n, len(PARAMS)), np.nan), np.zeros(n, bool)
            for b in range(n):
                w = jnp.asarray(w_BxN[b])

                def f(th, w=w):
                    v, g = vg(jnp.asarray(th), w)
                    return float(v), np.asarray(g, dtype=np.float64)

                r = minimize(f, theta0, jac=True, method="L-BFGS-B", options=_options(max_iter))
                theta_BxP[b], ok[b] = r.x, _converged(r)
        params = {k: np.where(ok, np.exp(theta_BxP[:, j]), np.nan) for j, k in enumerate(PARAMS)}
        return CurveBootstrap(params=params, converged=ok, residuals=resid, curve_fn=_curves,
                              blocks=blocks, seed=seed)

    def to_dict(self) -> dict:
        return {"law": "multipower", "params": dict(self.params), "objective": self.objective,
                "converged": self.converged, "n_points": self.n_points, "n_starts": self.n_starts,
                "n_starts_at_optimum": self.n_starts_at_optimum}


def fit_multipower(curves: Sequence[tuple], *, delta: float = 1e-3, max_iter: int = 1000,
                   n_polish: int = 4) -> MultiPowerFit:
    """Fit the multi-power law to measured curves ``(lr, steps, loss)`` (as for ``fit_annealing``).

    Starts: alpha in {0.3, 0.6, 1}, beta in {0.3, 0.6}, gamma in {0.3, 0.6}, and C such that C x is 0.3 or 3
    at the median of x = eta^-gamma S over the measured drops (C's scale follows the learning rate's units);
    for each, L0, A and B by non-negative least squares; then L-BFGS-B on the Huber objective from the
    ``n_polish`` best starts.
    """
    checked = checked_curves(curves)
    designs = [_design(eta, idx + 1) for eta, idx, _ in checked]
    losses = [loss for _, _, loss in checked]
    x, y = _stack(designs), np.concatenate(losses)
    if y.size <= len(PARAMS):
        raise ValueError(f"{y.size} measurements are too few for the law's {len(PARAMS)} parameters")
    log_y = np.log(y)

    with jax.enable_x64(True):
        xj = x.as_jax()

        ones = jnp.ones(y.size)
        value_and_grad = jax.jit(jax.value_and_grad(lambda th: _objective(th, ones, xj, log_y, delta)))

        def f(theta):
            v, g = value_and_grad(jnp.asarray(theta))
            return float(v), np.asarray(g, dtype=np.float64)

        active = x.d_nk != 0
        x_k = np.exp(-0.5 * x.log_e_nk[active]) * x.s_nk[active]
        median_x = float(np.median(x_k)) if active.any() else 1.0
        starts = []
        for alpha, beta, gamma, cx in product((0.3, 0.6, 1.0), (0.3, 0.6), (0.3, 0.6), (0.3, 3.0)):
            nl = {"alpha": alpha, "beta": beta, "gamma": gamma, "C": cx / max(median_x, 1e-12)}
            forward, drop = (np.asarray(t) for t in _terms({k: jnp.asarray(v) for k, v in nl.items()}, xj))
            coef, _ = nnls(np.c_[np.ones_like(y), forward, -drop], y)
            coef = np.maximum(coef, 1e-8)  # a zero coefficient has no log; start just above it
            p0 = {"L0": coef[0], "A": coef[1], "B": coef[2], **nl}
            theta0 = np.log([p0[k] for k in PARAMS])
            starts.append((f(theta0)[0], theta0))
        starts.sort(key=lambda s: s[0])
        runs = [minimize(f, th, jac=True, method="L-BFGS-B", options=_options(max_iter))
                for _, th in starts[:n_polish]]
    best = min(runs, key=lambda r: r.fun)
    same = sum(abs(r.fun - best.fun) <= 1e-9 + 1e-6 * abs(best.fun) for r in runs)
    params = {k: float(v) for k, v in zip(PARAMS, np.exp(best.x), strict=True)}
    return MultiPowerFit(params=params, objective=float(best.fun), converged=_converged(best),
                         n_points=int(y.size), n_starts=len(runs), n_starts_at_optimum=int(same),
                         message=str(best.message), delta=delta, design=x, loss=y, theta=best.x,
                         curve=np.concatenate([np.full(v.size, i) for i, v in enumerate(losses)]))
