"""Variable projection: solve a law's linear coefficients exactly for fixed nonlinear parameters.

For Chinchilla, ``L = [1, N^-alpha, D^-beta] @ [E, A, B]``: once the exponents are fixed, (E, A, B) >= 0 is a
(non-negative) linear problem (Golub & Pereyra 1973, "The differentiation of pseudo-inverses and nonlinear
least squares problems whose variables separate").  Searching only the exponents removes the badly
conditioned directions (the A-alpha and B-beta ridges) from the iterative optimiser.

Objectives other than plain least squares on the linear scale are handled by Gauss-Newton / iteratively
reweighted least squares (IRLS): residuals of ``log y`` are linearised around the current prediction and the
Huber loss becomes a weighted least-squares problem with weights ``min(1, delta/|r|)``.  Its fixed point
satisfies the exact stationarity condition of the original objective.  Bounds ``c_k >= 0`` are enforced
exactly by enumerating active sets, which is cheap (2^K small systems) and branch-free, so it vectorises.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def active_set_masks(lower_K: np.ndarray) -> np.ndarray:
    """All free/fixed patterns: coefficients with a finite lower bound (0) may be fixed at it."""
    constrained = np.isfinite(lower_K)
    rows = []
    for bits in itertools.product((1.0, 0.0), repeat=int(constrained.sum())):
        m = np.ones(len(lower_K))
        m[constrained] = bits
        rows.append(m)
    return np.asarray(rows)


def bounded_lstsq(J_NxK, t_N, w_N, lower_K, masks_MxK):
    """argmin_c sum_i w_i (t_i - J_i c)^2 subject to c_k >= lower_k (lower in {0, -inf}).

    Exact: the optimum is the unconstrained solution on its own support, so the best feasible
    solution over all supports is the constrained optimum.
    """
    Jw = J_NxK * w_N[:, None]
    G = J_NxK.T @ Jw
    h = Jw.T @ t_N
    # Column scaling: basis columns like N^-2 ~ 1e-18 would otherwise wreck the solve.
    s = jnp.sqrt(jnp.maximum(jnp.diag(G), jnp.finfo(G.dtype).tiny))
    Gs = G / (s[:, None] * s[None, :])
    hs = h / s
    K = G.shape[0]
    ridge = 1e-12 * jnp.eye(K, dtype=G.dtype)
    constrained = jnp.isfinite(lower_K)

    def solve(mask):
        Gm = Gs * mask[:, None] * mask[None, :] + jnp.diag(1.0 - mask) + ridge
        c = _small_solve(Gm, hs * mask)
        feasible = jnp.all(jnp.where(constrained, c >= -1e-10, True))
        q = c @ Gs @ c - 2.0 * hs @ c
        return c, jnp.where(feasible & jnp.all(jnp.isfinite(c)), q, jnp.inf)

    cs, qs = jax.vmap(solve)(masks_MxK)
    c = cs[jnp.argmin(qs)] / s
    return jnp.where(constrained, jnp.maximum(c, 0.0), c)


def _small_solve(G, h):
    """Solve G c = h; closed form (Cramer) for K <= 3 -- elementwise ops compile and run far faster on CPU
    than a batched LAPACK call inside nested vmaps/loops; G is well scaled (unit diagonal) here."""
    K = G.shape[0]
    if K == 1:
        return h / G[0, 0]
    if K == 2:
        det = G[0, 0] * G[1, 1] - G[0, 1] * G[1, 0]
        return jnp.stack([G[1, 1] * h[0] - G[0, 1] * h[1], G[0, 0] * h[1] - G[1, 0] * h[0]]) / det
    if K == 3:
        cof = jnp.stack([jnp.cross(G[1], G[2]), jnp.cross(G[2], G[0]), jnp.cross(G[0], G[1])])
        det = jnp.dot(G[0], cof[0])
        return (cof.T @ h) / det
    return jnp.linalg.solve(G, h)


def irls_weights(r, loss: str, delta: float, tau: float | None):
    """psi(r)/r for the loss (1 for least squares), times the asymmetry weight."""
    w = jnp.ones_like(r) if loss == "ls" else jnp.minimum(1.0, delta / jnp.maximum(jnp.abs(r), 1e-300))
    if tau is not None:
        w = w * jnp.where(r > 0, tau, 1.0 - tau)
    return w


def rho(r, loss: str, delta: float, tau: float | None, xp=jnp):
    """Per-point loss. Huber as in Hoffmann et al. 2022 (quadratic within delta); ``tau`` weights positive
    residuals (data above the curve) by tau and negative ones by 1 - tau: small tau gives a lower envelope.
    ``xp``: jax.numpy (traced fits) or numpy (the engine in scaling/profile.py); one definition for both."""
    if loss == "ls":
        v = 0.5 * r * r
    else:
        a = xp.abs(r)
        v = xp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    if tau is not None:
        v = v * xp.where(r > 0, tau, 1.0 - tau)
    return v


def solve_linear(Phi_NxK, y_N, w_N, lower_K, masks_MxK, *, space, loss, delta, tau, n_iter):
    """Linear coefficients minimising sum w rho(residual) for a fixed basis (Gauss-Newton + IRLS)."""
    log_space = space == "log"
    tiny = 1e-300
    logy = jnp.log(y_N) if log_space else None

    def resid(c):
        yhat = Phi_NxK @ c
        if log_space:
            return logy - jnp.log(jnp.maximum(yhat, tiny)), jnp.maximum(yhat, tiny)
        return y_N - yhat, yhat

    def objective(c):
        r, _ = resid(c)
        return jnp.sum(w_N * rho(r, loss, delta, tau))

    if log_space:
        # Start from relative least squares, sum w (1 - Phi c / y)^2, a first-order match to the log residual.
        c0 = bounded_lstsq(Phi_NxK / y_N[:, None], jnp.ones_like(y_N), w_N, lower_K, masks_MxK)
    else:
        c0 = bounded_lstsq(Phi_NxK, y_N, w_N, lower_K, masks_MxK)

    def step(_, c):
        r, yhat = resid(c)
        wi = w_N * irls_weights(r, loss, delta, tau)
        if log_space:
            J = Phi_NxK / yhat[:, None]
            t = r + J @ c
        else:
            J, t = Phi_NxK, y_N
        c_new = bounded_lstsq(J, t, wi, lower_K, masks_MxK)
        # Damped step (1, 1/2, 1/4, 0): keeps Gauss-Newton monotone when the linearisation overshoots.
        cands = jnp.stack([c_new, 0.5 * (c + c_new), 0.75 * c + 0.25 * c_new, c])
        vals = jax.vmap(objective)(cands)
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        return cands[jnp.argmin(vals)]

    return jax.lax.fori_loop(0, n_iter, step, c0)
