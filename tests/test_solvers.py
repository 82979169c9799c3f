"""The fit engines' building blocks, each against an independent reference: the batched L-BFGS
(scaling.lbfgs), the jax inner solves of variable projection (scaling.varpro) and the numpy profile
engine's Newton loop and Hessians (scaling.profile).

fit() polishes in the full space and ranks many starts, which hides a wrong inner solve, a wrong
projected gradient or a wrong Hessian term from the end-to-end tests in tests/test_fit.py; these pin them
directly.  References: scipy.optimize.nnls / minimize, closed-form regressions, central differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize, nnls

from scaling import lbfgs, profile, varpro
from scaling.laws import Law, get_law


# --- scaling.lbfgs --------------------------------------------------------------------------------------
def _box_quadratic(x0, c, max_iter=50, gtol=1e-12):
    """min sum (x - c)^2 over [0, 1]^2 from each row of x0: the answer is clip(c, 0, 1)."""
    with jax.enable_x64(True):
        res = lbfgs.minimize_batched(
            lambda x, cc: jnp.sum((x - cc) ** 2),
            jnp.asarray(x0, jnp.float64),
            jnp.asarray(c, jnp.float64),
            max_iter=max_iter,
            gtol=gtol,
            ftol=0.0,
            lower=jnp.zeros(2),
            upper=jnp.ones(2),
        )
        return [np.asarray(a) for a in res]


def test_lbfgs_reports_the_projected_gradient_at_a_bound_optimum():
    # At x = clip(c) the raw gradient 2 (x - c) is 2 in the clipped coordinate, but it points out of the
    # box: the projected gradient, which the convergence test and the result report, is 0 there.
    c = [[-1.0, 0.5], [2.0, -3.0], [0.3, 0.7]]
    x, _, gnorm, _, reason = _box_quadratic(np.full((3, 2), 0.5), c)
    np.testing.assert_allclose(x, np.clip(c, 0, 1), atol=1e-10)
    assert np.all(gnorm <= 1e-10), gnorm
    assert np.all(reason == lbfgs.GTOL), reason


def test_lbfgs_projects_a_start_outside_the_box_onto_it():
    # Starts outside [0, 1]^2: the first point evaluated is their projection, so the result is in the box
    # (an unprojected start whose outward coordinate is held by the bound would never re-enter it).
    c = [[3.0, 0.5], [3.0, 0.2], [-2.0, 0.8]]
    x0 = [[2.0, 0.5], [2.0, 0.5], [-1.0, 5.0]]
    x, f, _, _, reason = _box_quadratic(x0, c)
    np.testing.assert_allclose(x, np.clip(c, 0, 1), atol=1e-10)
    np.testing.assert_allclose(f, np.sum((np.clip(c, 0, 1) - np.asarray(c)) ** 2, axis=1), rtol=1e-12)
    assert np.all(np.isin(reason, lbfgs.CONVERGED_REASONS))


def test_lbfgs_start_at_a_stationary_point_converges_without_iterating():
    # Already optimal (projected gradient 0, here also at a bound): gtol holds at the start, no iteration.
    x, _, gnorm, n_iter, reason = _box_quadratic([[0.25, 1.0]], [[0.25, 1.5]])
    np.testing.assert_array_equal(x, [[0.25, 1.0]])
    assert n_iter.tolist() == [0] and reason.tolist() == [lbfgs.GTOL] and gnorm[0] == 0.0


def test_lbfgs_reports_max_iter_when_no_tolerance_is_met():
    # Rosenbrock from (-1.2, 1) needs dozens of iterations: after 3 the result must say MAXITER, not a
    # still-running code, and the iteration count must be exactly the cap.
    with jax.enable_x64(True):
        res = lbfgs.minimize_batched(
            lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2,
            jnp.asarray([[-1.2, 1.0]]),
            max_iter=3,
        )
    assert np.asarray(res.reason_S).tolist() == [lbfgs.MAXITER]
    assert np.asarray(res.n_iter_S).tolist() == [3]
    assert lbfgs.MAXITER not in lbfgs.CONVERGED_REASONS


# --- scaling.varpro (jax inner solves) -------------------------------------------------------------------
def _design(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1.0, 100.0, n)
    return rng, np.stack([np.ones(n), x**-0.5, x**-1.0], axis=1)


@pytest.mark.parametrize("engine", ["jax", "numpy"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("binds", [True, False])
def test_bounded_lstsq_equals_weighted_nnls(engine, k, binds):
    # With binds, the targets want a negative coefficient: the bound c >= 0 is active, and the constrained
    # optimum is not the clipped unconstrained one; without, the answer is the interior (plain weighted
    # least-squares) solution.  Reference: scipy's NNLS on sqrt(w)-scaled rows.
    rng, J = _design()
    J = J[:, :k]
    t = J @ np.r_[1.0, -2.0 if binds else 2.0, 3.0][:k] + 0.01 * rng.standard_normal(len(J))
    w = rng.uniform(0.5, 2.0, len(J))
    ref = nnls(J * np.sqrt(w)[:, None], t * np.sqrt(w))[0]
    lower = np.zeros(k)
    masks = varpro.active_set_masks(lower)
    if engine == "numpy":  # scaling.profile's batched twin: one row here
        c = profile.bounded_lstsq(J[None], t[None], w[None], lower, masks)[0]
    else:
        with jax.enable_x64(True):
            c = varpro.bounded_lstsq(
                jnp.asarray(J), jnp.asarray(t), jnp.asarray(w), jnp.asarray(lower), jnp.asarray(masks)
            )
    assert (np.min(ref) == 0.0) == binds  # premise: a bound is active, or none
    np.testing.assert_allclose(np.asarray(c), ref, atol=1e-8)


def test_active_set_masks_enumerate_every_free_fixed_pattern_of_bounded_coefficients():
    m = varpro.active_set_masks(np.array([0.0, -np.inf, 0.0]))
    assert sorted(map(tuple, m.tolist())) == sorted(
        (a, 1.0, b) for a in (0.0, 1.0) for b in (0.0, 1.0)
    )


@pytest.mark.parametrize("loss,tau", [("huber", None), ("ls", 0.2)])
def test_solve_linear_minimises_the_robust_or_asymmetric_objective(loss, tau):
    # Gauss-Newton / IRLS must land on the minimiser of sum w rho(y - Phi c): Huber with outliers (IRLS
    # weights min(1, delta/|r|)), and the asymmetric tau-weighted least squares.  Reference: BFGS on the
    # same objective written here.
    rng, Phi = _design()
    y = Phi @ np.array([1.0, 2.0, 3.0]) + 0.05 * rng.standard_normal(len(Phi))
    y[::7] += 1.0  # outliers above the curve
    w = np.ones(len(y))
    delta = 0.05

    def obj(c):
        r = y - Phi @ c
        v = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)) if loss == "huber" \
            else 0.5 * r * r
        if tau is not None:
            v = v * np.where(r > 0, tau, 1 - tau)
        return np.sum(w * v)

    ref = minimize(obj, np.linalg.lstsq(Phi, y, rcond=None)[0], method="BFGS", options=dict(gtol=1e-12))
    lower = np.full(3, -np.inf)
    with jax.enable_x64(True):
        c = varpro.solve_linear(
            jnp.asarray(Phi), jnp.asarray(y), jnp.asarray(w), jnp.asarray(lower),
            jnp.asarray(varpro.active_set_masks(lower)), space="linear", loss=loss, delta=delta, tau=tau,
            n_iter=50,
        )
    c = np.asarray(c)
    assert obj(c) <= ref.fun * (1 + 1e-9)
    np.testing.assert_allclose(c, ref.x, rtol=1e-4, atol=1e-5)


# --- scaling.profile (numpy engine) ----------------------------------------------------------------------
def _power_law(bounded: bool) -> Law:
    """y = A x^-alpha: one linear coefficient, one exponent (alpha >= 0 when bounded)."""
    return Law(
        name=f"test_power_{bounded}",
        inputs=("x",),
        params=("A", "alpha"),
        fn=lambda p, x: p["A"] * x["x"] ** -p["alpha"],
        transforms={"A": "log"},
        linear=("A",),
        basis=lambda p, x: (x["x"] ** -p["alpha"])[:, None],
        bounds={"A": (0.0, np.inf), "alpha": (0.0 if bounded else -np.inf, np.inf)},
    )


def _objective(law, y):
    return profile.Objective(y, np.ones(np.shape(y)), law.linear_lower_bounds(), space="log", loss="ls",
                             delta=1.0, tau=None)


def test_profile_newton_stops_on_a_bound_with_zero_projected_gradient():
    """Data rising with x want alpha < 0; with alpha >= 0 the optimum is alpha = 0, where the gradient points
    out of the box. The projected gradient there is 0: converged by gtol, and reported as 0."""
    law = _power_law(bounded=True)
    x = np.geomspace(1.0, 1e3, 12)
    y = 2.0 * x**0.2
    r = profile.minimize_profile(profile.Basis(law, {"x": x}), _objective(law, y), np.array([[0.5]]),
                                 np.array([0.0]), np.array([np.inf]))
    assert r.phi_SxQ[0, 0] == 0.0
    assert r.reason_S.tolist() == [lbfgs.GTOL] and r.grad_norm_S[0] == 0.0
    assert r.c_SxK[0, 0] == pytest.approx(np.exp(np.mean(np.log(y))), rel=1e-9)  # A = geometric mean of y


def test_profile_starts_of_different_replicates_are_never_merged():
    """Two bootstrap replicates whose data are mirror images in log x have equal profile objectives at
    alpha = 0 (the common start) but opposite optima; a start may follow another only within its own
    replicate. Reference: each replicate's log-log regression slope (numpy polyfit), alpha* = -slope."""
    law = _power_law(bounded=False)
    lx = np.linspace(-2.0, 2.0, 5)
    ly0 = 0.5 * lx + np.array([0.1, -0.1, 0.0, 0.1, -0.1])
    y = np.exp(np.stack([ly0, ly0[::-1]]))
    obj = _objective(law, y)
    basis = profile.Basis(law, {"x": np.exp(lx)})
    f, _ = profile.profile_values(basis, _objective(law, y[1]), np.array([[0.0]]))
    f0, _ = profile.profile_values(basis, _objective(law, y[0]), np.array([[0.0]]))
    assert f[0] == pytest.approx(f0[0], rel=1e-12)  # premise: the starts coincide in phi and objective
    r = profile.minimize_profile(basis, obj, np.zeros((2, 1)), np.array([-np.inf]), np.array([np.inf]),
                                 rep_S=np.array([0, 1]))
    ref = [-np.polyfit(lx, np.log(y[i]), 1)[0] for i in range(2)]
    np.testing.assert_allclose(r.phi_SxQ[:, 0], ref, atol=1e-8)


def _chinchilla_problem():
    law = get_law("chinchilla")
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e8, 1e10, 4), np.geomspace(1e9, 1e11, 4)))
    rng = np.random.default_rng(0)
    true = dict(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
    y = np.asarray(law.predict(true, N=N, D=D)) * np.exp(0.02 * rng.standard_normal(N.size))
    basis = profile.Basis(law, {"N": N, "D": D})
    obj = _objective(law, y)
    # Away from the optimum (the gradient is not 0, so every second-derivative term counts).
    theta = law.to_unconstrained(dict(E=1.5, A=300.0, B=3000.0, alpha=0.3, beta=0.4))

    def f(th):  # the objective, written out: 0.5 sum (log y - log(E + A N^-alpha + B D^-beta))^2
        e, a, b = np.exp(th[:3])
        return 0.5 * np.sum((np.log(y) - np.log(e + a * N ** -th[3] + b * D ** -th[4])) ** 2)

    h = 1e-5
    E = np.eye(5) * h
    ref = np.array([[(f(theta + E[i] + E[j]) - f(theta + E[i] - E[j]) - f(theta - E[i] + E[j])
                      + f(theta - E[i] - E[j])) / (4 * h * h) for j in range(5)] for i in range(5)])
    return law, basis, obj, theta, ref


def test_full_hessian_matches_central_differences_of_the_objective_away_from_the_optimum():
    """The exact piecewise Hessian of the full-space objective (log-transformed E, A, B: their
    second-derivative terms dc/du = d2c/du2 = c included), and the finite-difference fallback used for
    reparametrised laws, both against central differences of the objective written out here."""
    law, basis, obj, theta, ref = _chinchilla_problem()
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(profile.full_hessian(law, basis, obj, theta), ref, atol=1e-6 * scale)
    np.testing.assert_allclose(profile._fd_hessian(law, basis, obj, theta), ref, atol=1e-5 * scale)
