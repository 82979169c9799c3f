"""Variable projection in numpy: the fast (no-compilation) multi-start path of :func:`scaling.fit.fit`.

Same mathematics as :mod:`scaling.varpro` (profile out the linear coefficients by a bounded Gauss-Newton
solve -- semi-smooth Newton, IRLS as fallback -- and search only the nonlinear parameters), written in
vectorised numpy so that a fit compiles only one tiny XLA program: the law's basis and its Jacobian in the
nonlinear parameters (:func:`basis_kernel`, ~0.2 s to compile).

Why a second implementation next to the jax one: compiling the batched L-BFGS program of
:mod:`scaling.lbfgs` over the jax variable projection costs 5-10 s of CPU, which dominates a one-off fit
(the numpy fit of the 240 Chinchilla points runs in ~0.2 s of CPU).  Even for 1,000 bootstrap refits numpy
is faster here (~3 s against ~12 s once compiled): with two nonlinear parameters Newton needs ~4-6
iterations per refit (measured) and only rows still iterating are computed, while the batched L-BFGS
evaluates 12 line-search trials for every row at every iteration and then polishes in the full space.
The jax engine remains for ``method="full"`` and for laws without linear structure.
``tests/test_fit.py::test_numpy_and_jax_variable_projection_agree`` keeps the two in step.

The optimiser is a batched projected Newton method on the profile objective (Bertsekas 1982, "Projected
Newton methods for optimization problems with simple constraints"): the gradient is exact by the envelope
theorem (the inner problem is solved, so d/dphi min_c F = dF/dphi at c*), the Hessian is a forward
difference of that gradient, negative curvature is flipped (|eigenvalues|), the step is projected onto
the parameter bounds, and a backtracking Armijo search keeps each start monotone.  Few nonlinear
parameters (2 for Chinchilla) make the finite-difference Hessian cheap and Newton's quadratic convergence
reach the optimum to machine precision in a handful of iterations.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scaling import lbfgs, varpro
from scaling.varpro import active_set_masks

# Rows per kernel call: one compiled shape serves the grid, the finite-difference stencil and line searches.
KERNEL_ROWS = 64
_TINY = 1e-300


@functools.lru_cache(maxsize=64)
def basis_kernel(law):
    """jit(phi_RxQ, X) -> (Phi_RxNxK, dPhi_RxNxKxQ): the law's basis and its Jacobian, vmapped over rows."""

    def one(phi, X):
        def f(ph):
            return law.basis(law.from_unconstrained(ph, law.nonlinear), X)

        return f(phi), jax.jacfwd(f)(phi)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (int(n) - 1).bit_length())


class Basis:
    """Evaluates a law's basis (and Jacobian) at many nonlinear-parameter rows, in fixed-size chunks."""

    def __init__(self, law, X: Mapping[str, np.ndarray]):
        self.law = law
        self.n = len(next(iter(X.values())))
        # Padded points (copies of the first) keep one compiled shape across data sizes; they are sliced off.
        pad = _bucket(self.n, 64) - self.n
        with jax.enable_x64(True):
            self.X = {
                k: jnp.asarray(np.concatenate([np.asarray(v, np.float64), np.full(pad, np.asarray(v)[0])]))
                for k, v in X.items()
            }
        self.kernel = basis_kernel(law)

    def __call__(self, phi_RxQ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phi_RxQ = np.atleast_2d(np.asarray(phi_RxQ, np.float64))
        R = len(phi_RxQ)
        outs, jacs = [], []
        with jax.enable_x64(True):
            for s in range(0, R, KERNEL_ROWS):
                blk = phi_RxQ[s : s + KERNEL_ROWS]
                m = len(blk)
                if m < KERNEL_ROWS:
                    blk = np.concatenate([blk, np.repeat(blk[:1], KERNEL_ROWS - m, axis=0)])
                P, J = self.kernel(jnp.asarray(blk), self.X)
                outs.append(np.asarray(P)[:m, : self.n])
                jacs.append(np.asarray(J)[:m, : self.n])
        return np.concatenate(outs), np.concatenate(jacs)


# ----------------------------------------------------------------------------------------------------
# Losses (numpy twins of scaling.varpro.rho / irls_weights)
# ----------------------------------------------------------------------------------------------------
def rho(r, loss: str, delta: float, tau: float | None):
    return varpro.rho(r, loss, delta, tau, xp=np)


def psi(r, loss: str, delta: float, tau: float | None):
    """d rho / d r."""
    v = r if loss == "ls" else np.clip(r, -delta, delta)
    if tau is not None:
        v = v * np.where(r > 0, tau, 1.0 - tau)
    return v


def rho2(r, loss: str, delta: float, tau: float | None):
    """d^2 rho / d r^2 (piecewise: 1 inside the Huber threshold, 0 outside)."""
    v = np.ones_like(r) if loss == "ls" else (np.abs(r) <= delta).astype(np.float64)
    if tau is not None:
        v = v * np.where(r > 0, tau, 1.0 - tau)
    return v


def irls_weights(r, loss: str, delta: float, tau: float | None):
    w = np.ones_like(r) if loss == "ls" else np.minimum(1.0, delta / np.maximum(np.abs(r), _TINY))
    if tau is not None:
        w = w * np.where(r > 0, tau, 1.0 - tau)
    return w


# ----------------------------------------------------------------------------------------------------
# Inner problem: bounded weighted least squares, then Gauss-Newton / IRLS
# ----------------------------------------------------------------------------------------------------
def bounded_quadratic(G_RxKxK, h_RxK, lower_K, masks_MxK):
    """Row-wise argmin_c c'Gc - 2h'c s.t. c_k >= lower_k, by enumerating active sets (as scaling.varpro):
    the optimum is the unconstrained one on its own support, so the best feasible support wins."""
    G, h = G_RxKxK, h_RxK
    K = G.shape[-1]
    # Column scaling: basis columns like N^-2 ~ 1e-18 would otherwise wreck the solve.
    s = np.sqrt(np.maximum(np.diagonal(G, axis1=1, axis2=2), np.finfo(np.float64).tiny))
    Gs = G / (s[:, :, None] * s[:, None, :])
    hs = h / s
    m = masks_MxK
    Gm = Gs[:, None] * (m[:, :, None] * m[:, None, :])[None] + (np.eye(K) * (1.0 - m)[:, None, :])[None]
    Gm = Gm + 1e-12 * np.eye(K)
    rhs = hs[:, None, :] * m[None]
    bad = ~np.all(np.isfinite(Gm), axis=(-1, -2)) | ~np.all(np.isfinite(rhs), axis=-1)
    Gm[bad] = np.eye(K)
    rhs[bad] = 0.0
    with np.errstate(all="ignore"):
        try:
            c = np.linalg.solve(Gm, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            c = (np.linalg.pinv(Gm) @ rhs[..., None])[..., 0]
        constrained = np.isfinite(lower_K)
        feasible = np.all(np.where(constrained, c >= -1e-10, True), axis=-1) & np.all(np.isfinite(c), -1)
        q = np.sum((c @ Gs) * c, axis=-1) - 2.0 * np.sum(hs[:, None, :] * c, axis=-1)
    q = np.where(feasible & ~bad & np.isfinite(q), q, np.inf)
    c = c[np.arange(len(c)), np.argmin(q, axis=1)] / s
    return np.where(constrained, np.maximum(c, 0.0), c)


def bounded_lstsq(J_RxNxK, t_RxN, w_RxN, lower_K, masks_MxK):
    """Row-wise argmin_c sum_n w (t - J c)^2 s.t. c_k >= lower_k."""
    JwT = np.swapaxes(J_RxNxK * w_RxN[..., None], 1, 2)  # batched matmul: far faster than einsum here
    return bounded_quadratic(JwT @ J_RxNxK, (JwT @ t_RxN[..., None])[..., 0], lower_K, masks_MxK)


def _coef_step(J_RxNxK, wk_RxN, c_RxK, b_RxK, lower_K, masks_MxK):
    """min over c >= lower of (c - c0)' G (c - c0) - 2 (c - c0)' b, G = J' diag(w kappa) J: a (Gauss-)Newton
    (kappa = rho'') or IRLS (kappa = psi/r) step for the coefficients, b = -gradient = J' (w psi)."""
    JwT = np.swapaxes(J_RxNxK * wk_RxN[..., None], 1, 2)
    G = JwT @ J_RxNxK
    h = (G @ c_RxK[..., None])[..., 0] + b_RxK
    return bounded_quadratic(G, h, lower_K, masks_MxK)


class Objective:
    """Loss settings plus the data of one fit, or of B bootstrap replicates (targets/weights ``(B, N)``).

    Every method takes ``rep_R``, the replicate of each evaluated row (all 0 for a plain fit), so one
    batch can mix replicates, stencil points and line-search trials.
    """

    def __init__(self, y, w, lower_K, *, space, loss, delta, tau):
        self.y = np.atleast_2d(np.asarray(y, np.float64))
        self.w = np.atleast_2d(np.asarray(w, np.float64))
        self.lower = np.asarray(lower_K, np.float64)
        self.masks = active_set_masks(self.lower)
        self.log = space == "log"
        self.logy = np.log(self.y) if self.log else None
        self.loss, self.delta, self.tau = loss, delta, tau

    def _y(self, rep):
        return self.y[rep % len(self.y)]

    def _w(self, rep):
        return self.w[rep % len(self.w)]

    def resid(self, Phi_RxNxK, c_RxK, rep_R):
        yhat = (Phi_RxNxK @ c_RxK[..., None])[..., 0]
        if self.log:
            yhat = np.maximum(yhat, _TINY)
            return self.logy[rep_R % len(self.y)] - np.log(yhat), yhat
        return self._y(rep_R) - yhat, yhat

    def value(self, r_RxN, rep_R):
        return np.sum(self._w(rep_R) * rho(r_RxN, self.loss, self.delta, self.tau), axis=-1)

    def solve(self, Phi_RxNxK, rep_R, c0_RxK=None, *, max_iter: int = 100, tol: float = 1e-12):
        """Linear coefficients per row (inner problem solved to convergence), residuals, objective values."""
        R = len(Phi_RxNxK)
        rep_R = np.broadcast_to(np.asarray(rep_R, int), (R,))
        w = self._w(rep_R)
        with np.errstate(all="ignore"):
            if c0_RxK is None:
                y = self._y(rep_R)
                if self.log:  # relative least squares: first-order match to the log residual
                    c = bounded_lstsq(Phi_RxNxK / y[..., None], np.ones_like(y), w, self.lower, self.masks)
                else:
                    c = bounded_lstsq(Phi_RxNxK, y, w, self.lower, self.masks)
            else:
                c = np.array(c0_RxK, np.float64)
            r, yhat = self.resid(Phi_RxNxK, c, rep_R)
            f = self.value(r, rep_R)
            active = np.arange(R)
            for _ in range(max_iter):
                if len(active) == R:  # no gather (copy) while every row is still iterating
                    P, ca, ra, ya, wa, ra_rep = Phi_RxNxK, c, r, yhat, w, rep_R  # views, read before writes
                else:
                    P, ca, ra, ya, wa = Phi_RxNxK[active], c[active], r[active], yhat[active], w[active]
                    ra_rep = rep_R[active]
                J = P / ya[:, :, None] if self.log else P  # d(-residual)/dc (Gauss-Newton in log space)
                b = (np.swapaxes(J, 1, 2) @ (wa * psi(ra, self.loss, self.delta, self.tau))[..., None])[
                    ..., 0
                ]

                # Semi-smooth Newton first (kappa = rho'': exact curvature of the piecewise-quadratic Huber
                # loss, finite convergence once the set of points inside delta settles), then IRLS (kappa =
                # psi(r)/r: globally convergent, but only linearly -- ~30 iterations on the Chinchilla data
                # where Newton needs ~3), each damped (1, 1/2, 1/4) so the iteration stays monotone.
                best_c, best_f = ca.copy(), f[active].copy()
                best_r, best_y = ra.copy(), ya.copy()
                todo = np.arange(len(active))
                for kind in ("newton", "irls"):
                    if not len(todo):
                        break
                    full = len(todo) == len(ca)

                    def sel(a, full=full, todo=todo):
                        return a if full else a[todo]

                    rt = sel(ra)
                    if kind == "newton":
                        kappa = rho2(rt, self.loss, self.delta, self.tau)
                    else:
                        kappa = irls_weights(rt, self.loss, self.delta, self.tau)
                    c_new = _coef_step(sel(J), sel(wa) * kappa, sel(ca), sel(b), self.lower, self.masks)
                    P_t, ca_t, wa_t, rep_t = sel(P), sel(ca), sel(wa), sel(ra_rep)
                    for a in (1.0, 0.5, 0.25):
                        cand = (1 - a) * ca_t + a * c_new
                        rc, yc = self.resid(P_t, cand, rep_t)
                        fc = np.sum(wa_t * rho(rc, self.loss, self.delta, self.tau), axis=-1)
                        better = np.isfinite(fc) & (fc < best_f[todo])
                        i = todo[better]
                        best_c[i], best_r[i], best_y[i], best_f[i] = (
                            cand[better],
                            rc[better],
                            yc[better],
                            fc[better],
                        )
                        todo, c_new = todo[~better], c_new[~better]
                        P_t, ca_t, wa_t, rep_t = P_t[~better], ca_t[~better], wa_t[~better], rep_t[~better]
                        if not len(todo):
                            break
                # Converged when the step no longer moves any prediction (relative to its size): measured in
                # predictions, not coefficients, so a coefficient sitting at its bound 0, or two collinear
                # columns trading weight, do not keep a row iterating.
                dy = (P @ (best_c - ca)[..., None])[..., 0]
                change = np.max(np.abs(dy) / np.maximum(np.abs(best_y), _TINY), axis=-1)
                decrease = (f[active] - best_f) / np.maximum(np.abs(best_f), _TINY)
                c[active], r[active], yhat[active], f[active] = best_c, best_r, best_y, best_f
                active = active[(change > tol) & (decrease > tol * 1e-2)]
                if not len(active):
                    break
        f = np.where(np.isfinite(f), f, np.inf)
        return c, r, yhat, f

    def grad_phi(self, dPhi_RxNxKxQ, c_RxK, r_RxN, yhat_RxN, rep_R):
        """Envelope gradient of the profile objective in the nonlinear params."""
        with np.errstate(all="ignore"):  # non-finite rows (a wild trial point) are flagged by the caller
            # Batched matmuls: several times faster than the equivalent einsums for these small K, Q.
            dy_RxNxQ = (c_RxK[:, None, None, :] @ dPhi_RxNxKxQ)[:, :, 0, :]
            dr = -dy_RxNxQ / yhat_RxN[..., None] if self.log else -dy_RxNxQ
            wpsi = self._w(rep_R) * psi(r_RxN, self.loss, self.delta, self.tau)
            g = (wpsi[:, None, :] @ dr)[:, 0, :]
        return np.where(np.isfinite(g), g, np.nan)


# ----------------------------------------------------------------------------------------------------
# Batched projected Newton on the profile objective
# ----------------------------------------------------------------------------------------------------
class Result:
    def __init__(self, phi, c, f, grad_norm, n_iter, reason):
        self.phi_SxQ, self.c_SxK, self.f_S = phi, c, f
        self.grad_norm_S, self.n_iter_S, self.reason_S = grad_norm, n_iter, reason


def minimize_profile(
    basis: Basis,
    obj: Objective,
    phi0_SxQ: np.ndarray,
    lo_Q: np.ndarray,
    hi_Q: np.ndarray,
    *,
    max_iter: int = 100,
    gtol: float = 1e-11,
    ftol: float = 1e-13,
    n_trials: int = 30,
    merge_tol: float = 1e-6,
    c0_SxK: np.ndarray | None = None,
    rep_S: np.ndarray | None = None,
) -> Result:
    """Minimise the profile objective from every row of ``phi0_SxQ`` within [lo, hi] (unconstrained space).

    Starts whose iterates meet (within ``merge_tol``, same objective to 1e-10) follow the first of them from
    then on and share its end point: they are the same deterministic iteration from the same point, so
    running both is wasted work (most of the grid falls into one basin within a few steps).
    """
    phi = np.clip(np.array(phi0_SxQ, np.float64), lo_Q, hi_Q)
    S, Q = phi.shape
    rep = np.zeros(S, int) if rep_S is None else np.asarray(rep_S, int)

    def evaluate(ph, rp, c0=None, inner=100):
        Phi, dPhi = basis(ph)
        c, r, yhat, f = obj.solve(Phi, rp, c0, max_iter=inner)
        g = obj.grad_phi(dPhi, c, r, yhat, rp)
        bad = ~np.isfinite(f) | ~np.all(np.isfinite(g), axis=1)
        return c, np.where(bad, np.inf, f), np.where(bad[:, None], 0.0, g)

    c, f, g = evaluate(phi, rep, c0_SxK)
    reason = np.where(np.isfinite(f), -1, lbfgs.NONFINITE)
    n_iter = np.zeros(S, int)
    leader = np.arange(S)  # leader[s] != s: start s follows start leader[s]

    def projected(ph, gr):
        at_lo = (ph <= lo_Q) & (gr > 0)
        at_hi = (ph >= hi_Q) & (gr < 0)
        return np.where(at_lo | at_hi, 0.0, gr), ~(at_lo | at_hi)

    for _ in range(max_iter):
        act = np.flatnonzero((reason < 0) & (leader == np.arange(S)))
        if not len(act):
            break
        # Merge coincident iterates (greedy, first start leads).
        scale = 1.0 + np.abs(phi[act])
        for j, s in enumerate(act):
            if leader[s] != s:
                continue
            near = np.all(np.abs(phi[act[j + 1 :]] - phi[s]) <= merge_tol * scale[j + 1 :], axis=1)
            near &= np.abs(f[act[j + 1 :]] - f[s]) <= 1e-10 * np.abs(f[s])
            near &= rep[act[j + 1 :]] == rep[s]
            leader[act[j + 1 :][near]] = s
        act = act[leader[act] == act]
        pa, ga, fa, ca = phi[act], g[act], f[act], c[act]
        pg, free = projected(pa, ga)
        done = np.max(np.abs(pg), axis=1) <= gtol
        reason[act[done]] = lbfgs.GTOL
        keep = ~done
        act, pa, ga, fa, ca, pg, free = (a[keep] for a in (act, pa, ga, fa, ca, pg, free))
        if not len(act):
            break
        A = len(act)
        # Hessian by forward differences of the (exact) envelope gradient, one batched evaluation (central
        # differences cost twice as many inner solves and changed no result measurably).
        h = 1e-6 * np.maximum(1.0, np.abs(pa))
        E = np.eye(Q)
        stencil = pa[:, None, :] + h[:, None, :] * E
        _, _, gs = evaluate(stencil.reshape(-1, Q), np.repeat(rep[act], Q), np.repeat(ca, Q, axis=0))
        H = (gs.reshape(A, Q, Q) - ga[:, None, :]) / h[:, :, None]  # H[a, j, :] = d g / d phi_j
        H = 0.5 * (H + np.swapaxes(H, 1, 2))
        # Fixed (bound-active) coordinates drop out: identity rows/cols, zero gradient.
        ff = free[:, :, None] & free[:, None, :]
        H = np.where(ff, H, np.eye(Q)[None])
        H = np.where(np.isfinite(H), H, np.eye(Q)[None])
        ev, V = np.linalg.eigh(H)
        aev = np.abs(ev)
        aev = np.maximum(aev, 1e-10 * np.max(aev, axis=1, keepdims=True) + _TINY)
        d = -np.einsum("aij,aj->ai", V, np.einsum("aji,aj->ai", V, pg) / aev)
        d = np.where(free, d, 0.0)
        # Newton decrement: when the model predicts a relative decrease below ftol, this step is the last.
        last = -0.5 * np.sum(pg * d, axis=1) <= ftol * np.abs(fa)
        # Backtracking, projected onto the bounds: the full step first (accepted near the optimum; solved to
        # convergence), then the step lengths 1/2 .. 1/2^k of the rejected starts together in one batch.
        # Those trials get a few inner iterations only -- an unconverged inner solve over-estimates the
        # profile (c is feasible, not optimal), so Armijo stays valid, just stricter -- and the accepted
        # ones are then solved to convergence (warm, a few iterations).
        accepted = np.zeros(A, bool)
        resolve = np.zeros(A, bool)
        new_p, new_c, new_f, new_g = pa.copy(), ca.copy(), fa.copy(), ga.copy()
        for ts, inner in ((np.ones(1), 100), (0.5 ** np.arange(1, 8), 6), (0.5 ** np.arange(8, n_trials), 6)):
            todo = np.flatnonzero(~accepted)
            if not len(todo):
                break
            T = len(ts)
            pt = np.clip(pa[todo, None, :] + ts[None, :, None] * d[todo, None, :], lo_Q, hi_Q)
            ct, ft, gt = evaluate(
                pt.reshape(-1, Q), np.repeat(rep[act][todo], T), np.repeat(ca[todo], T, axis=0), inner=inner
            )
            ft = ft.reshape(-1, T)
            armijo = fa[todo, None] + 1e-4 * np.sum(ga[todo, None, :] * (pt - pa[todo, None, :]), axis=2)
            ok = np.isfinite(ft) & (ft <= armijo) & (ft <= fa[todo, None])
            first = np.argmax(ok, axis=1)  # largest acceptable step
            hit = ok[np.arange(len(todo)), first]
            i = todo[hit]
            k = np.flatnonzero(hit) * T + first[hit]
            new_p[i], new_c[i], new_f[i], new_g[i] = pt.reshape(-1, Q)[k], ct[k], ft.reshape(-1)[k], gt[k]
            accepted[i] = True
            resolve[i] = inner < 100
        if resolve.any():
            i = np.flatnonzero(resolve)
            new_c[i], new_f[i], new_g[i] = evaluate(new_p[i], rep[act][i], new_c[i])
        n_iter[act] += 1
        rel = (fa - new_f) / np.maximum(np.maximum(np.abs(fa), np.abs(new_f)), _TINY)
        phi[act], c[act], f[act], g[act] = new_p, new_c, new_f, new_g
        pg_new, _ = projected(new_p, new_g)
        r_new = np.where(
            ~accepted,
            lbfgs.LINESEARCH,
            np.where(
                np.max(np.abs(pg_new), 1) <= gtol,
                lbfgs.GTOL,
                np.where((rel <= ftol) | (last & accepted), lbfgs.FTOL, -1),
            ),
        )
        reason[act] = r_new
    reason = np.where(reason < 0, lbfgs.MAXITER, reason)
    # Followers take their leader's end point (leaders of leaders resolved by iterating).
    for _ in range(S):
        if np.all(leader[leader] == leader):
            break
        leader = leader[leader]
    phi, c, f, g, reason = phi[leader], c[leader], f[leader], g[leader], reason[leader]
    n_iter = n_iter + n_iter[leader] * (leader != np.arange(S))
    pg, _ = projected(phi, g)
    return Result(phi, c, f, np.max(np.abs(pg), axis=1), n_iter, reason)


def profile_values(basis: Basis, obj: Objective, phi_SxQ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profile objective (inner problem solved) and coefficients at each row: the multi-start screen."""
    Phi, _ = basis(phi_SxQ)
    c, _, _, f = obj.solve(Phi, np.zeros(len(Phi), int))
    return f, c


# ----------------------------------------------------------------------------------------------------
# Full-space objective and its Hessian (conditioning report), numpy
# ----------------------------------------------------------------------------------------------------
def natural_params(law, phi_Q, c_K) -> dict[str, float]:
    """Nonlinear params (unconstrained) + linear coefficients -> natural params, in numpy."""
    pn = {
        k: (float(np.exp(v)) if law.transform_of(k) == "log" else float(v))
        for k, v in zip(law.nonlinear, phi_Q, strict=True)
    }
    nat = law.combine(pn, np.asarray(c_K, np.float64))
    return {k: float(nat[k]) for k in law.params}


def linear_coef(law, p: Mapping[str, float]) -> np.ndarray:
    if law.to_linear is not None:
        return np.asarray(law.to_linear(p), np.float64)
    return np.asarray([p[k] for k in law.linear], np.float64)


def full_objective(law, basis: Basis, obj: Objective, theta_RxP: np.ndarray) -> np.ndarray:
    """The original objective at unconstrained full parameter vectors (order ``law.params``)."""
    theta_RxP = np.atleast_2d(theta_RxP)
    iq = [law.params.index(k) for k in law.nonlinear]
    Phi, _ = basis(theta_RxP[:, iq])
    c = []
    for th in theta_RxP:
        p = {
            k: (np.exp(v) if law.transform_of(k) == "log" else v) for k, v in zip(law.params, th, strict=True)
        }
        c.append(linear_coef(law, p))
    rep = np.zeros(len(Phi), int)
    r, _ = obj.resid(Phi, np.asarray(c), rep)
    return obj.value(r, rep)


def full_hessian(law, basis: Basis, obj: Objective, theta_P: np.ndarray) -> np.ndarray:
    """Hessian of the original objective in the unconstrained full space (order ``law.params``).

    Exact piecewise (the Huber kinks contribute nothing, as ``jax.hessian`` gives) for laws whose linear
    coefficients are params: H = sum w [rho''(r) dr dr' + psi(r) d2r], from the basis, its Jacobian and a
    central difference of the Jacobian (the basis is smooth, so that difference is accurate).  Why not
    differences of the objective itself: the stencil straddles Huber kinks, and on the Chinchilla data
    that made the flattest curvature (~1e-4 against ~1e3) come out negative.  Reparametrised laws
    (``from_linear``) fall back to central differences of the objective.
    """
    if law.from_linear is not None or law.to_linear is not None:
        return _fd_hessian(law, basis, obj, theta_P)
    P = len(theta_P)
    iq = [law.params.index(k) for k in law.nonlinear]
    il = [law.params.index(k) for k in law.linear]
    Q = len(iq)
    phi = theta_P[iq]
    u = theta_P[il]
    logt = np.array([law.transform_of(k) == "log" for k in law.linear])
    c = np.where(logt, np.exp(u), u)
    dc = np.where(logt, c, 1.0)  # dc/du
    d2c = np.where(logt, c, 0.0)  # d2c/du2
    h = 1e-5 * np.maximum(1.0, np.abs(phi))
    pts = np.concatenate([phi[None], phi + np.diag(h), phi - np.diag(h)])
    Phi_all, dPhi_all = basis(pts)
    Phi, dPhi = Phi_all[0], dPhi_all[0]  # (N, K), (N, K, Q)
    d2Phi = (dPhi_all[1 : 1 + Q] - dPhi_all[1 + Q :]) / (2 * h[:, None, None, None])  # (Q, N, K, Q)
    n = Phi.shape[0]
    dy = np.zeros((n, P))  # d yhat / d theta
    d2y = np.zeros((n, P, P))
    dy[:, iq] = np.einsum("nkq,k->nq", dPhi, c)
    dy[:, il] = Phi * dc
    d2y[:, np.ix_(iq, iq)[0], np.ix_(iq, iq)[1]] = np.einsum("inkj,k->nij", d2Phi, c)
    cross = dPhi * dc[None, :, None]  # (N, K, Q): d2 yhat / du_k dphi_j
    for a, ka in enumerate(il):
        for b, qb in enumerate(iq):
            d2y[:, ka, qb] = d2y[:, qb, ka] = cross[:, a, b]
        d2y[:, ka, ka] = Phi[:, a] * d2c[a]
    rep = np.zeros(1, int)
    r, yhat = obj.resid(Phi[None], c[None], rep)
    r, yhat = r[0], yhat[0]
    if obj.log:
        dr = -dy / yhat[:, None]
        d2r = -d2y / yhat[:, None, None] + dy[:, :, None] * dy[:, None, :] / yhat[:, None, None] ** 2
    else:
        dr, d2r = -dy, -d2y
    w = obj.w[0]
    a2 = w * rho2(r, obj.loss, obj.delta, obj.tau)
    a1 = w * psi(r, obj.loss, obj.delta, obj.tau)
    H = np.einsum("n,ni,nj->ij", a2, dr, dr) + np.einsum("n,nij->ij", a1, d2r)
    return 0.5 * (H + H.T)


def _fd_hessian(law, basis: Basis, obj: Objective, theta_P: np.ndarray, rel_step: float = 1e-5) -> np.ndarray:
    """Central finite-difference Hessian of :func:`full_objective` (all stencil points in one batch).

    The step (1e-5 relative) is small enough that almost no residual crosses a Huber kink -- then this is
    the exact piecewise Hessian (what ``jax.hessian`` gives; agrees to ~1e-4 on the test fits) -- and large
    enough that rounding (~eps |f| / h^2) stays far below the flattest curvature.  At 1e-4 the stencil
    straddles kinks and the smallest eigenvalue, hence the condition number, was off by 100x.
    """
    P = len(theta_P)
    h = rel_step * np.maximum(1.0, np.abs(theta_P))
    E = np.eye(P) * h
    pts = [theta_P]
    for i in range(P):
        pts += [theta_P + E[i], theta_P - E[i]]
    pairs = [(i, j) for i in range(P) for j in range(i + 1, P)]
    for i, j in pairs:
        pts += [theta_P + E[i] + E[j], theta_P + E[i] - E[j], theta_P - E[i] + E[j], theta_P - E[i] - E[j]]
    f = full_objective(law, basis, obj, np.asarray(pts))
    f0 = f[0]
    H = np.zeros((P, P))
    for i in range(P):
        H[i, i] = (f[1 + 2 * i] - 2 * f0 + f[2 + 2 * i]) / h[i] ** 2
    base = 1 + 2 * P
    for n, (i, j) in enumerate(pairs):
        pp, pm, mp, mm = f[base + 4 * n : base + 4 * n + 4]
        H[i, j] = H[j, i] = (pp - pm - mp + mm) / (4 * h[i] * h[j])
    return H
