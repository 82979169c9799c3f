"""Compute-optimal allocation: closed form vs numeric vs brute force, inference-aware and data-constrained."""

from __future__ import annotations

import numpy as np
import pytest

from scaling._lawcall import evaluate
from scaling.laws import get_law
from scaling.optimal import (
    chinchilla_closed_form,
    compute_optimal,
    data_constrained_optimal,
    inference_optimal,
    inference_optimal_at_budget,
)

CHIN = get_law("chinchilla")
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU = {"E": 1.817, "A": 482.0, "B": 2085.0, "alpha": 0.3478, "beta": 0.3659}
C = np.geomspace(1e18, 1e25, 8)


def _brute_force_isoflop(law, params, c, fpt=lambda n: 6 * n, n_grid=200_001, extra=None):
    """argmin over a dense log-N grid (spacing ~2e-4 in log N) — independent of the optimiser."""
    n = np.geomspace(1e5, 1e14, n_grid)
    d = c / fpt(n)
    loss = evaluate(law, params, N=n, D=d, **(extra or {}))
    i = np.argmin(loss)
    return n[i], loss[i]


@pytest.mark.parametrize("params", [HOFFMANN, BESIROGLU])
def test_closed_form_matches_numeric_and_brute_force(params):
    closed = compute_optimal((CHIN, params), C)
    numeric = compute_optimal((CHIN, params), C, method="numeric")
    assert closed.method == "closed_form" and numeric.method == "numeric"
    np.testing.assert_allclose(numeric.N, closed.N, rtol=1e-5)
    np.testing.assert_allclose(numeric.D, closed.D, rtol=1e-5)
    np.testing.assert_allclose(numeric.loss, closed.loss, rtol=1e-12)
    a = params["beta"] / (params["alpha"] + params["beta"])
    np.testing.assert_allclose(closed.n_exponent, a)
    np.testing.assert_allclose(numeric.n_exponent, a, atol=1e-4)  # finite-difference local slope
    np.testing.assert_allclose(closed.tokens_per_param, closed.D / closed.N)
    np.testing.assert_allclose(6 * closed.N * closed.D, C, rtol=1e-12)
    n_bf, l_bf = _brute_force_isoflop(CHIN, params, 1e22)
    n_cf = compute_optimal((CHIN, params), 1e22).N[0]
    assert n_cf == pytest.approx(n_bf, rel=5e-4) and closed.loss[4] == pytest.approx(l_bf, abs=1e-9)


def test_besiroglu_fit_implies_published_exponent():
    # Besiroglu et al. 2024 report a = beta/(alpha+beta) = 0.513 for their refit (see chinchilla_epoch data).
    res = compute_optimal((CHIN, BESIROGLU), 1e24)
    assert res.n_exponent[0] == pytest.approx(0.513, abs=5e-4)


def test_kaplan_law_and_custom_flop_model_against_brute_force():
    kaplan = get_law("kaplan")
    kp = {"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095}
    res = compute_optimal((kaplan, kp), [1e20, 1e22])
    for i, c in enumerate([1e20, 1e22]):
        n_bf, _ = _brute_force_isoflop(kaplan, kp, c)
        assert res.N[i] == pytest.approx(n_bf, rel=5e-4)

    # Exact-accounting style FLOP model: 6N plus an attention-like term per token.
    def fpt(n):
        return 6 * n + 6 * 24 * 2048 * 1024.0

    res = compute_optimal((CHIN, HOFFMANN), [1e19, 1e21], flops_per_token=fpt)
    assert res.method == "numeric" and res.flop_model != "6ND"
    for i, c in enumerate([1e19, 1e21]):
        n_bf, _ = _brute_force_isoflop(CHIN, HOFFMANN, c, fpt)
        assert res.N[i] == pytest.approx(n_bf, rel=5e-4)
        assert res.D[i] == pytest.approx(c / fpt(res.N[i]), rel=1e-12)
    # With the 6N model passed as a callable, numeric == closed form.
    same = compute_optimal((CHIN, HOFFMANN), C, flops_per_token=lambda n: 6 * n)
    np.testing.assert_allclose(same.N, compute_optimal((CHIN, HOFFMANN), C).N, rtol=1e-5)


def test_accepts_fit_like_objects_and_reports():
    class FakeFit:  # duck-typed FitResult
        law = CHIN
        params = HOFFMANN

    a = compute_optimal(FakeFit(), C)
    b = compute_optimal("chinchilla", C, params=HOFFMANN)
    np.testing.assert_allclose(a.N, b.N)
    np.testing.assert_allclose(a.N, chinchilla_closed_form(HOFFMANN, C)[0])
    d = a.to_dict()
    assert d["method"] == "closed_form" and len(d["tokens_per_param"]) == C.size
    assert "D*/N*" in a.summary()
    with pytest.raises(TypeError, match="FitResult"):
        compute_optimal(CHIN, C)
    with pytest.raises(ValueError, match="positive"):
        compute_optimal((CHIN, HOFFMANN), [1e20, -1.0])
    with pytest.raises(ValueError, match="needs"):
        compute_optimal((get_law("power_law", var="C"), {"E": 1.0, "A": 1.0, "alpha": 0.1}), C)
    with pytest.raises(ValueError, match="closed form"):
        compute_optimal(
            (get_law("kaplan"), {"N_c": 1e13, "D_c": 1e13, "alpha_N": 0.07, "alpha_D": 0.09}),
            C,
            method="closed_form",
        )


def test_bootstrap_parameter_samples_give_cis():
    rng = np.random.default_rng(0)
    samples = [
        {
            **HOFFMANN,
            "alpha": 0.34 + 0.01 * rng.standard_normal(),
            "beta": 0.28 + 0.01 * rng.standard_normal(),
        }
        for _ in range(100)
    ]
    res = compute_optimal((CHIN, HOFFMANN), C, param_samples=samples)
    assert res.n_samples == 100
    assert np.all(res.N_ci[0] < res.N) and np.all(res.N < res.N_ci[1])
    a_s = [s["beta"] / (s["alpha"] + s["beta"]) for s in samples]
    np.testing.assert_allclose(res.n_exponent_ci[0], np.quantile(a_s, 0.025), atol=1e-12)
    np.testing.assert_allclose(res.n_exponent_ci[1], np.quantile(a_s, 0.975), atol=1e-12)


def test_half_the_draws_failing_still_gives_a_ci():
    """The CI is withheld only when a *minority* of draws succeeded: with exactly half failing (alpha = 0:
    no interior optimum), compute_optimal and approach3 still give the percentile CI of the good half."""
    from scaling.approaches import approach3

    good = [{"alpha": 0.33, "beta": 0.28}, {"alpha": 0.35, "beta": 0.29}]
    draws = good + [{"alpha": 0.0}, {"alpha": 0.0}]
    a_good = [d["beta"] / (d["alpha"] + d["beta"]) for d in good]  # Chinchilla: a = beta / (alpha + beta)
    ci = tuple(np.quantile(a_good, [0.025, 0.975]))
    r = compute_optimal((CHIN, HOFFMANN), C, param_samples=draws)
    assert r.n_failed_samples == 2 and r.n_exponent_ci is not None
    np.testing.assert_allclose([r.n_exponent_ci[0][0], r.n_exponent_ci[1][0]], ci, rtol=1e-9)
    a3 = approach3((CHIN, HOFFMANN), C, param_samples=draws)
    assert a3.n_failed_samples == 2 and a3.a_ci == pytest.approx(ci, rel=1e-9)


def _brute_force_inference(params, target, d_inf):
    """Dense 2-D grids over (log N, log D): cheapest 6ND + 2N D_inf among points with L <= target.

    A coarse grid over 3 decades of N and 5 of D, then a zoomed grid (+-10% in N, +-20% in D) around its best
    point, so the D rounding that tilts the flat cost valley is ~3e-4 relative."""
    n_lo, n_hi, d_lo, d_hi = 1e8, 1e11, 1e9, 1e14
    for _ in range(2):
        n = np.geomspace(n_lo, n_hi, 1500)[:, None]
        d = np.geomspace(d_lo, d_hi, 1500)[None, :]
        loss = params["E"] + params["A"] * n ** -params["alpha"] + params["B"] * d ** -params["beta"]
        cost = np.where(loss <= target, 6 * n * d + 2 * n * d_inf, np.inf)
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        n_lo, n_hi, d_lo, d_hi = n[i, 0] / 1.1, n[i, 0] * 1.1, d[0, j] / 1.2, d[0, j] * 1.2
    return n[i, 0], d[0, j], cost[i, j]


@pytest.mark.parametrize("d_inf", [0.0, 1e11, 1e12, 1e13])
def test_inference_optimal_matches_brute_force_grid(d_inf):
    target = 2.2
    res = inference_optimal((CHIN, HOFFMANN), target, d_inf)
    n_bf, d_bf, cost_bf = _brute_force_inference(HOFFMANN, target, d_inf)
    # The cost is flat along the constraint near the optimum, so N is located to ~1% by the grid.
    assert res.N[0] == pytest.approx(n_bf, rel=0.01)
    assert res.total_flops[0] <= cost_bf * (1 + 1e-9)  # never worse than the best grid point
    assert res.total_flops[0] == pytest.approx(cost_bf, rel=1e-5)
    assert evaluate(CHIN, HOFFMANN, N=res.N, D=res.D_train)[0] == pytest.approx(target, abs=1e-9)


def test_inference_optimal_trends_and_chinchilla_limit():
    d_inf = np.array([0.0, 1e10, 1e12, 1e14])
    res = inference_optimal((CHIN, HOFFMANN), 2.2, d_inf)
    # Sardana et al.: more inference demand -> smaller, longer-trained models, larger savings.
    assert np.all(np.diff(res.N) < 0) and np.all(np.diff(res.tokens_per_param) > 0)
    assert res.flops_saving[0] == pytest.approx(0.0, abs=1e-9) and np.all(np.diff(res.flops_saving) > 0)
    # Without inference, the optimum is the compute-optimal model whose loss equals the target.
    c0 = res.train_flops[0]
    ref = compute_optimal((CHIN, HOFFMANN), c0)
    assert ref.loss[0] == pytest.approx(2.2, abs=1e-9) and ref.N[0] == pytest.approx(res.N[0], rel=1e-4)
    assert "Sardana" in res.summary() and len(res.to_dict()["total_flops"]) == 4
    with pytest.raises(ValueError, match="unreachable"):
        inference_optimal((CHIN, HOFFMANN), 1.5, 1e12)  # below E


def test_inference_optimal_at_budget_matches_brute_force():
    total, d_inf = 1e22, 1e12
    res = inference_optimal_at_budget((CHIN, HOFFMANN), total, d_inf)
    n = np.geomspace(1e8, 1e11, 300_001)
    d = (total - 2 * n * d_inf) / (6 * n)
    ok = d > 1
    loss = HOFFMANN["E"] + HOFFMANN["A"] * n[ok] ** -0.34 + HOFFMANN["B"] * d[ok] ** -0.28
    assert res.N[0] == pytest.approx(n[ok][np.argmin(loss)], rel=5e-4)
    assert res.target_loss[0] == pytest.approx(loss.min(), abs=1e-10)
    assert res.total_flops[0] == pytest.approx(total, rel=1e-12)
    # The saving is at equal loss (Sardana et al. 2024): the reference is the Chinchilla-optimal model that
    # reaches the same loss, charged the same inference; it used to be the model trained on the whole budget
    # ignoring inference, of lower loss and lifetime FLOPs above the budget (a 45% "saving" where the
    # same-loss saving is 17% at 1e24 / 1e13 tokens).
    same = inference_optimal((CHIN, HOFFMANN), res.target_loss, d_inf)
    assert res.chinchilla_N[0] == pytest.approx(same.chinchilla_N[0], rel=1e-6)
    assert res.flops_saving[0] == pytest.approx(1 - total / same.chinchilla_total_flops[0], rel=1e-6)
    n_c, d_c = res.chinchilla_N[0], res.chinchilla_D[0]
    law_loss = HOFFMANN["E"] + HOFFMANN["A"] * n_c**-0.34 + HOFFMANN["B"] * d_c**-0.28
    assert law_loss == pytest.approx(res.target_loss[0], abs=1e-9)
    big = inference_optimal_at_budget((CHIN, HOFFMANN), 1e24, 1e13)
    assert big.flops_saving[0] == pytest.approx(0.171, abs=0.001)
    unaware = big.extras["inference_unaware"]  # the budget spent on training alone: lower loss, over budget
    assert unaware["loss"][0] < big.target_loss[0] and unaware["total_flops"][0] > 1e24


def test_data_constrained_cap_is_respected():
    U = 1e11
    res = data_constrained_optimal((CHIN, HOFFMANN), C, U)
    free = compute_optimal((CHIN, HOFFMANN), C)
    assert res.method == "cap" and res.max_epochs == 1.0
    assert np.all(res.D <= U * (1 + 1e-12))
    np.testing.assert_allclose(6 * res.N * res.D, C, rtol=1e-12)
    slack = free.D <= U
    np.testing.assert_allclose(res.N[slack], free.N[slack])
    assert np.all(res.binding == ~slack) and np.any(~slack)
    assert np.all(res.loss >= free.loss - 1e-12)
    # Binding budgets: brute force over N subject to D = C/(6N) <= U.
    c = C[-1]
    n = np.geomspace(c / (6 * U), 1e16, 200_001)
    loss = evaluate(CHIN, HOFFMANN, N=n, D=c / (6 * n))
    assert res.N[-1] == pytest.approx(n[np.argmin(loss)], rel=1e-6)
    more = data_constrained_optimal((CHIN, HOFFMANN), C, U, max_epochs=4)
    assert np.all(more.D <= 4 * U * (1 + 1e-12)) and np.all(more.loss <= res.loss + 1e-12)
    assert "epochs" in res.summary() and res.to_dict()["method"] == "cap"


def test_data_constrained_law_repeats_data_between_free_and_capped():
    law = get_law("data_constrained")
    params = {**HOFFMANN, "R_star_N": 5.3, "R_star_D": 15.4}  # Muennighoff et al. 2023's R* values
    U = 1e11
    res = data_constrained_optimal((law, params), C, U)
    free = compute_optimal((CHIN, HOFFMANN), C)
    capped = data_constrained_optimal((CHIN, HOFFMANN), C, U)
    assert res.method == "law"
    small = free.D <= U  # unique data suffices: the law reduces to Chinchilla
    np.testing.assert_allclose(res.N[small], free.N[small], rtol=1e-4)
    big = ~small
    # Repetition is worth something (better than the hard cap) but less than fresh data.
    assert np.all(res.loss[big] < capped.loss[big]) and np.all(res.loss[big] > free.loss[big])
    assert np.all(res.epochs[big] > 1) and np.all(res.binding == big)
    # The unlimited-data reference of the law is the Chinchilla optimum (U_D = D: no repetition).
    np.testing.assert_allclose(res.free_N, free.N, rtol=1e-4)
    np.testing.assert_allclose(res.free_loss, free.loss, rtol=1e-9)
    # Brute force with the same law at the largest budget (U_D = min(D, U) unique tokens used).
    c = C[-1]
    n = np.geomspace(1e8, 1e14, 100_001)
    d = c / (6 * n)
    loss = evaluate(law, params, N=n, D=d, U_D=np.minimum(d, U))
    assert res.loss[-1] == pytest.approx(loss.min(), abs=1e-8)
    assert res.N[-1] == pytest.approx(n[np.argmin(loss)], rel=2e-3)


def test_numeric_paths_match_closed_forms_for_an_unnamed_chinchilla():
    class Unnamed:  # same function, but not recognised as "chinchilla": forces every numeric path
        name = "my_law"
        inputs = ("N", "D")

        def predict(self, params, **x):
            return CHIN.predict(params, **x)

    law = Unnamed()
    d_inf = [0.0, 1e12, 1e13]
    numeric = inference_optimal((law, HOFFMANN), 2.2, d_inf)  # bisection for D_train(N)
    closed = inference_optimal((CHIN, HOFFMANN), 2.2, d_inf)  # D_train(N) in closed form
    np.testing.assert_allclose(numeric.N, closed.N, rtol=1e-6)
    np.testing.assert_allclose(numeric.total_flops, closed.total_flops, rtol=1e-10)
    alloc = compute_optimal((law, HOFFMANN), C)
    assert alloc.method == "numeric"
    np.testing.assert_allclose(alloc.N, compute_optimal((CHIN, HOFFMANN), C).N, rtol=1e-5)


def test_stacked_sample_solve_equals_one_solve_per_draw():
    """compute_optimal solves every bootstrap draw in one vectorised problem; it must equal solving each draw
    alone, and a draw without an interior optimum is counted and excluded, not fatal."""
    from scaling.optimal import _solve, _solve_samples_loop, _solve_samples_stacked

    law = CHIN
    base = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}
    rng = np.random.default_rng(0)
    draws = [
        {"alpha": 0.34 + 0.03 * rng.standard_normal(), "beta": 0.37 + 0.03 * rng.standard_normal()}
        for _ in range(6)
    ]
    draws.append({"A": 0.0})  # no N term: loss falls monotonically in D, so N* sits on the lower bound
    fpt = lambda n: 6.0 * n + 2e4  # noqa: E731 -- a non-6N FLOP model forces the numeric solver
    C = np.array([1e20, 1e21, 1e22])
    bounds = (1e2, 1e16)
    ok_s, n_s, d_s, l_s = _solve_samples_stacked(law, base, draws, C, fpt, bounds)
    ok_l, n_l, d_l, l_l = _solve_samples_loop(lambda p, c: _solve(law, p, c, fpt, {}, bounds), base, draws, C)
    assert ok_s.tolist() == ok_l.tolist() == [True] * 6 + [False]
    np.testing.assert_allclose(n_s[ok_s], n_l[ok_l], rtol=1e-6)
    np.testing.assert_allclose(d_s[ok_s], d_l[ok_l], rtol=1e-6)
    np.testing.assert_allclose(l_s[ok_s], l_l[ok_l], rtol=1e-10)
    res = compute_optimal((law, base), C, flops_per_token=fpt, param_samples=draws)
    assert res.n_failed_samples == 1 and res.n_samples == 7 and res.sample_N.shape == (6, 3)
    assert res.N_ci[0][0] <= res.N[0] <= res.N_ci[1][0]


def test_degenerate_draws_fail_instead_of_entering_the_ci():
    """A Chinchilla draw with a zero or negative term has no interior optimum: the closed form refuses it
    (it returned N* = 0, D* = inf, NaN or complex values), and a bootstrap counts such a draw as failed."""
    chin = get_law("chinchilla")
    p = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    for bad in ({"alpha": 0.0}, {"A": 0.0}, {"alpha": -0.1}, {"beta": 0.0}, {"B": float("nan")}):
        with pytest.raises(ValueError, match="no interior optimum: Chinchilla parameters"):
            chinchilla_closed_form({**p, **bad}, [1e22])
    rng = np.random.default_rng(0)
    draws = [{"alpha": 0.34 + 0.01 * rng.standard_normal()} for _ in range(9)] + [{"A": 0.0}, {"beta": 0.0}]
    r = compute_optimal((chin, p), [1e20, 1e22], param_samples=draws)
    assert r.n_failed_samples == 2 and r.sample_N.min() > 1e7 and np.isfinite(r.loss_ci).all()


def test_an_optimum_at_the_end_of_the_feasible_range_is_not_interior():
    """With B = 0 the law only improves with N, so the minimum sits where D reaches 1. That end of the
    feasible range lies inside the search range (a custom FLOP model; or the 6N path's last grid point
    rounding to D < 1), and such a minimum was returned as if interior. A steep rise before it is interior."""
    chin = get_law("chinchilla")
    flat_d = {"E": 1.69, "A": 406.4, "B": 0.0, "alpha": 0.34, "beta": 0.28}
    with pytest.raises(ValueError, match="no interior optimum"):
        compute_optimal((chin, flat_d), [1e19], flops_per_token=lambda n: 6 * n + 2e4, n_bounds=(1e2, 1e20))
    silent = 0
    for c in np.geomspace(1e12, 5e16, 60):
        try:
            compute_optimal((chin, flat_d), [c], method="numeric")
            silent += 1
        except ValueError:
            pass
    assert silent == 0
    # an interior optimum close to the feasible end (the loss rises steeply as D -> 1) is still found
    p = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    r = compute_optimal((chin, p), [1e21], flops_per_token=lambda n: 6 * n + 2e4, n_bounds=(1e2, 1e20))
    assert 1e8 < r.N[0] < 1e11


def test_per_budget_extra_inputs_carry_into_the_bootstrap():
    """Per-budget law inputs (unique tokens U_D of data_constrained) go with their budget into the CI's
    solves (every draw failed with a broadcast error before, and the CIs silently vanished), and into
    inference_optimal_at_budget (it crashed)."""
    law = get_law("data_constrained")
    p = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "R_star_N": 5.3, "R_star_D": 15.4}
    C, U = np.array([1e21, 1e23]), np.array([1e10, 3e10])
    rng = np.random.default_rng(0)
    draws = [{"alpha": 0.34 + 0.01 * rng.standard_normal(), "beta": 0.28 + 0.01 * rng.standard_normal()}
             for _ in range(20)]
    r = compute_optimal((law, p), C, extra_inputs={"U_D": U}, param_samples=draws)
    assert r.n_failed_samples == 0 and r.N_ci[0][0] < r.N[0] < r.N_ci[1][0]
    for i in range(2):  # each budget's point estimate and CI as when solved alone
        one = compute_optimal((law, p), C[i : i + 1], extra_inputs={"U_D": U[i]}, param_samples=draws)
        assert one.N[0] == pytest.approx(r.N[i], rel=1e-9)
        np.testing.assert_allclose([one.N_ci[0][0], one.N_ci[1][0]], [r.N_ci[0][i], r.N_ci[1][i]], rtol=1e-9)
    u_d = {"U_D": np.array([1e9, 3e9])}
    a = inference_optimal_at_budget((law, p), [1e21, 1e22], [1e9, 2e9], extra_inputs=u_d)
    b = [inference_optimal_at_budget((law, p), [c], [t], extra_inputs={"U_D": u}).N[0]
         for c, t, u in ((1e21, 1e9, 1e9), (1e22, 2e9, 3e9))]
    np.testing.assert_allclose(a.N, b, rtol=1e-9)


def test_an_optimum_beyond_the_largest_allowed_size_is_refused():
    """N* ~ 1e10 at C = 1e21, but n_bounds stops at 1e7: the grid minimum sits on the upper search boundary,
    which is no interior optimum (as on the lower boundary), not an answer of N = 1e7."""
    with pytest.raises(ValueError, match="no interior optimum"):
        compute_optimal((CHIN, HOFFMANN), [1e21], method="numeric", n_bounds=(1e2, 1e7))
    with pytest.raises(ValueError, match="no interior optimum"):
        compute_optimal((CHIN, HOFFMANN), [1e21], method="numeric", n_bounds=(1e12, 1e16))


def test_local_exponent_and_its_ci_are_central_differences():
    """With C = (6N + k) D, N*(C) is not a power law, so d log N*/d log C varies with C and a one-sided
    difference is off by ~4e-4 at C = 1e20. Reference: N* from the stationarity condition
    dL/dlog N = -alpha A N^-alpha + beta B D^-beta 6N / (6N + k) = 0 (brentq), differenced centrally at
    C e^(+-0.05). Identical parameter draws must give a CI collapsed onto that same exponent."""
    from scipy.optimize import brentq

    k, c, h = 6e9, 1e20, 0.05
    p = HOFFMANN

    def n_star(cc):
        def g(logn):
            n = np.exp(logn)
            d = cc / (6 * n + k)
            share = 6 * n / (6 * n + k)  # -d log D / d log N
            return -p["alpha"] * p["A"] * n ** -p["alpha"] + p["beta"] * p["B"] * d ** -p["beta"] * share

        return np.exp(brentq(g, np.log(1e6), np.log(1e13), xtol=1e-14, rtol=1e-15))

    a_ref = (np.log(n_star(c * np.exp(h))) - np.log(n_star(c * np.exp(-h)))) / (2 * h)
    res = compute_optimal((CHIN, p), [c], flops_per_token=lambda n: 6 * n + k, param_samples=[p] * 3)
    assert res.N[0] == pytest.approx(n_star(c), rel=1e-6)
    assert res.n_exponent[0] == pytest.approx(a_ref, abs=1e-6)
    assert res.n_exponent_ci[0][0] == pytest.approx(a_ref, abs=1e-6)
    assert res.n_exponent_ci[1][0] == pytest.approx(a_ref, abs=1e-6)
