"""Approaches 1-3 (Hoffmann et al. 2022) on synthetic data drawn from a known Chinchilla law."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from scaling._lawcall import evaluate
from scaling.approaches import approach3, compare_approaches, parabola_bias
from scaling.isoflop import EdgeOfGridError, approach1, approach2, isoflop_minimum, isoflop_slices
from scaling.laws import get_law
from scaling.powerlaw import fit_power_law

LAW = get_law("chinchilla")
# Hoffmann et al.'s published law: alpha != beta, so a = beta/(alpha+beta) = 0.4516 (not 0.5), D*/N* ~ 20-40.
P = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = P["beta"] / (P["alpha"] + P["beta"])
B_TRUE = P["alpha"] / (P["alpha"] + P["beta"])
BUDGETS = np.geomspace(1e17, 1e20, 7)


def _n_star(c):
    # Hoffmann et al. eq. (4), written out independently of scaling.optimal.
    g = (P["alpha"] * P["A"] / (P["beta"] * P["B"])) ** (1 / (P["alpha"] + P["beta"]))
    return g * (np.asarray(c) / 6) ** A_TRUE


def _isoflop_grid(noise=0.0, width=1.0, k=9, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    C, N, L = [], [], []
    for c in BUDGETS:
        n = _n_star(c) * 10 ** (np.linspace(-width / 2, width / 2, k) + offset)
        C += [c] * k
        N += list(n)
        L += list(evaluate(LAW, P, N=n, D=c / (6 * n)) + noise * rng.standard_normal(k))
    return np.array(C), np.array(N), np.array(L)


def _curves():
    """Idealised training curves: every checkpoint's loss is L(N, D) (a run sized for that D)."""
    rows = [(n, d) for n in np.geomspace(1e7, 1e10, 31) for d in np.geomspace(2 * n, 300 * n, 40)]
    N, D = np.array(rows).T
    return N, D, evaluate(LAW, P, N=N, D=D)


def test_power_law_fit_matches_polyfit_and_recovers_exact_law():
    x = np.geomspace(1, 1e6, 9)
    y = 3.0 * x**0.7 * np.exp(0.01 * np.sin(np.arange(9)))
    fit = fit_power_law(x, y)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    assert fit.exponent == pytest.approx(slope, rel=1e-12) and fit.coef == pytest.approx(np.exp(intercept))
    assert fit.exponent_ci[0] < fit.exponent < fit.exponent_ci[1]
    w = np.arange(1.0, 10.0)
    wslope = np.polyfit(np.log(x), np.log(y), 1, w=np.sqrt(w))[0]  # polyfit weights multiply residuals
    assert fit_power_law(x, y, w).exponent == pytest.approx(wslope, rel=1e-12)
    # OLS inference is scipy's linregress: SE of the slope, a t(n-2) interval, r2 = rvalue^2
    ref = stats.linregress(np.log(x), np.log(y))
    half = stats.t.ppf(0.975, len(x) - 2) * ref.stderr
    assert fit.exponent_se == pytest.approx(ref.stderr, rel=1e-9)
    assert fit.exponent_ci == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-9)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    # r2 of a weighted fit stays the unweighted coefficient of determination of its line (documented)
    wfit = fit_power_law(x, y, w)
    resid = np.log(y) - np.log(wfit.predict(x))
    r2 = 1 - np.sum(resid**2) / np.sum((np.log(y) - np.log(y).mean()) ** 2)
    assert wfit.r2 == pytest.approx(r2, rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2, -3], [1, 2, 3])


def test_parabola_minimum_matches_independent_polyfit():
    rng = np.random.default_rng(1)
    n = np.geomspace(1e8, 1e9, 7)
    loss = 2.5 + 0.3 * (np.log(n) - np.log(3e8)) ** 2 + 0.01 * rng.standard_normal(7)
    c2, c1, _ = np.polyfit(np.log(n), loss, 2)
    opt = isoflop_minimum(n, loss, C=1e19, method="parabola")
    assert np.log(opt.N) == pytest.approx(-c1 / (2 * c2), abs=1e-9)
    assert opt.D == pytest.approx(1e19 / (6 * opt.N))


def test_approach2_recovers_known_exponents_with_bootstrap_ci():
    C, N, L = _isoflop_grid(noise=0.003)
    res = approach2(C, N, L, n_bootstrap=400, seed=0)
    assert abs(res.a - A_TRUE) < 0.01 and abs(res.b - B_TRUE) < 0.01
    assert res.a_ci[0] < A_TRUE < res.a_ci[1]
    assert res.b_ci[0] < B_TRUE < res.b_ci[1]
    assert res.a + res.b == pytest.approx(1.0, abs=1e-9)  # D* = C/(6N*) exactly
    np.testing.assert_allclose(res.N, _n_star(res.C), rtol=0.1)
    d = res.to_dict()
    assert d["a"] == res.a and len(d["optima"]) == BUDGETS.size and "Approach 2" in res.summary()


@pytest.mark.parametrize("method", ["parabola", "akima"])
def test_approach2_noiseless_is_accurate(method):
    C, N, L = _isoflop_grid(noise=0.0, width=1.0, k=21)
    res = approach2(C, N, L, method=method)
    assert res.a == pytest.approx(A_TRUE, abs=2e-3)
    np.testing.assert_allclose(res.N, _n_star(res.C), rtol=0.03)


def test_approach2_seed_noise_bootstrap_and_weighting():
    C, N, L = _isoflop_grid(noise=0.002, k=11, seed=3)
    res = approach2(
        C,
        N,
        L,
        n_bootstrap=300,
        bootstrap="seed_noise",
        noise_std=0.002,
        estimate="bootstrap_median",
        weighting="inverse_variance",
        seed=0,
    )
    assert abs(res.a - A_TRUE) < 0.015
    assert all(o.log_n_std > 0 and o.n_valid <= 300 for o in res.optima)
    assert res.n_fit.weighted and res.a_samples.size >= 150
    # inverse-variance WLS of log N* on log C (numpy's polyfit: its weights multiply residuals, so 1/std)
    lc, ln = np.log([o.C for o in res.optima]), np.log([o.N for o in res.optima])
    w = 1 / np.array([o.log_n_std for o in res.optima])
    assert res.a == pytest.approx(np.polyfit(lc, ln, 1, w=w)[0], rel=1e-10)
    # the 95% interval is the 2.5/97.5% percentiles of the bootstrap exponents
    assert res.a_ci == pytest.approx(tuple(np.quantile(res.a_samples, [0.025, 0.975])), rel=1e-12)
    assert res.b_ci == pytest.approx(tuple(np.quantile(res.b_samples, [0.025, 0.975])), rel=1e-12)


def test_porian_seed_noise_follows_the_reference_rule():
    """Transcription of the reference `get_noise_for_loss` (formll/resolving-scaling-law-discrepancies):
    high above log(loss) >= 7, low below log(loss) <= 3, else np.interp in log loss over the *logged*
    thresholds [log 3, log 7] -- which clamps to the high end for 3 < log(loss) < 7."""
    from scaling.isoflop import porian_seed_noise

    def ref(loss, lo=0.002, hi=0.05, t_hi=7.0, t_lo=3.0):
        if np.log(loss) >= t_hi:
            return hi
        if np.log(loss) <= t_lo:
            return lo
        return np.exp(np.interp(np.log(loss), [np.log(t_lo), np.log(t_hi)], [np.log(lo), np.log(hi)]))

    losses = np.array([0.5, 2.0, 3.5, np.exp(3), np.exp(5), np.exp(7), 5e3])
    np.testing.assert_allclose(porian_seed_noise(losses), [ref(v) for v in losses], rtol=1e-12)
    np.testing.assert_allclose(porian_seed_noise([2.0, np.exp(5)]), [0.002, 0.05], rtol=1e-12)


def test_akima_keeps_the_best_run_of_a_repeated_size():
    """Porian et al.'s reference keeps the lowest loss per model size (groupby min) before the spline: a
    worse duplicate of a size must not move the minimum."""
    n = np.geomspace(1e8, 1e10, 9)
    loss = 2.5 + 0.2 * (np.log(n) - np.log(1e9)) ** 2 + 0.01 * np.sin(np.arange(9))
    base = isoflop_minimum(n, loss, C=1e20, method="akima")
    dup = isoflop_minimum(np.r_[n, n[4]], np.r_[loss, loss[4] + 0.3], C=1e20, method="akima")
    assert dup.N == base.N and dup.loss == base.loss


def test_edge_of_grid_minimum_is_refused_with_a_clear_message():
    C, N, L = _isoflop_grid(noise=0.0)
    # Budget 3's sizes all lie above N*: its minimum sits at the smallest size.
    sel = C == BUDGETS[3]
    N = N.copy()
    N[sel] = N[sel] * 10**0.8
    L = L.copy()
    L[sel] = evaluate(LAW, P, N=N[sel], D=C[sel] / (6 * N[sel]))
    with pytest.raises(EdgeOfGridError, match=r"C=3\.162e\+18.*edge"):
        approach2(C, N, L)
    with pytest.raises(EdgeOfGridError, match="edge"):
        approach2(C, N, L, method="akima")
    res = approach2(C, N, L, on_edge="drop")
    assert [c for c, _ in res.rejected] == [BUDGETS[3]] and len(res.optima) == BUDGETS.size - 1
    assert abs(res.a - A_TRUE) < 0.01


def test_approach2_input_errors():
    with pytest.raises(ValueError, match="same length"):
        approach2([1e18, 1e18], [1e8], [3.0, 3.1])
    with pytest.raises(ValueError, match="3 distinct"):
        approach2([1e18] * 2 + [1e19] * 3, [1e8, 2e8, 1e8, 2e8, 3e8], [3.0, 2.9, 3.0, 2.9, 3.1])
    with pytest.raises(ValueError, match="noise_std"):
        approach2(*_isoflop_grid(), n_bootstrap=10, bootstrap="seed_noise")
    with pytest.raises(ValueError, match="n_bootstrap"):
        approach2(*_isoflop_grid(), weighting="inverse_variance")


def test_approach1_envelope_recovers_exponents():
    N, D, L = _curves()
    res = approach1(N, D, L, n_grid=400, n_bootstrap=30)
    assert res.a == pytest.approx(A_TRUE, abs=0.01)
    assert res.b == pytest.approx(B_TRUE, abs=0.01)
    assert res.a_ci[0] <= res.a <= res.a_ci[1]
    # Envelope winners are interior sizes only.
    assert res.N.min() > 1e7 and res.N.max() < 1e10
    assert "Approach 1" in res.summary() and res.to_dict()["n_runs"] == 31


def test_isoflop_slices_interpolate_along_curves():
    N, D, L = _curves()
    sl = isoflop_slices(N, D, L, [1e18])
    np.testing.assert_allclose(6 * sl["N"] * sl["D"], 1e18, rtol=1e-9)
    # log-log interpolation of a smooth law between checkpoints 1.15x apart: tiny error
    np.testing.assert_allclose(sl["loss"], evaluate(LAW, P, N=sl["N"], D=sl["D"]), rtol=2e-4)


def test_three_approaches_agree_on_synthetic_data():
    N, D, L = _curves()
    cmp = compare_approaches(
        N,
        D,
        L,
        budgets=BUDGETS,
        fit=(LAW, P),
        approach1_kwargs={"n_grid": 400},
        approach2_kwargs={"method": "akima"},
    )
    assert not cmp.errors
    rows = {r["approach"]: r for r in cmp.rows()}
    for r in rows.values():
        assert r["a"] == pytest.approx(A_TRUE, abs=0.01)
        assert r["N_opt"] == pytest.approx(_n_star(cmp.C_ref), rel=0.05)
    assert rows["approach3"]["a"] == pytest.approx(A_TRUE, abs=1e-9)
    assert cmp.C_ref == pytest.approx(10**18.5, rel=1e-12)  # geometric mean of 1e17..1e20
    assert cmp.max_exponent_gap < 0.01
    assert "approach2" in cmp.summary() and cmp.to_dict()["rows"][0]["approach"] == "approach1"


def test_approach3_ci_from_parameter_samples():
    rng = np.random.default_rng(0)
    samples = {
        "alpha": 0.34 + 0.01 * rng.standard_normal(200),
        "beta": 0.28 + 0.01 * rng.standard_normal(200),
    }
    res = approach3((LAW, P), BUDGETS, param_samples=samples)
    exact = np.quantile(samples["beta"] / (samples["alpha"] + samples["beta"]), [0.025, 0.975])
    np.testing.assert_allclose(res.a_ci, exact, atol=1e-9)
    assert res.a == pytest.approx(A_TRUE, abs=1e-12)


def test_parabola_bias_report():
    bias = parabola_bias((LAW, P), BUDGETS, widths=(0.5, 1.0, 2.0), offsets=(0.0, 0.4), drifts=(0.0, 0.1))
    # Centred narrow grid: essentially unbiased.
    assert abs(bias.row(0.5)["log10_n_bias"]) < 2e-3 and abs(bias.row(0.5)["a_bias"]) < 1e-4
    # Wider grids sample more of the asymmetric profile: |log N* bias| grows with width.
    widths = [abs(bias.row(w)["log10_n_bias"]) for w in (0.5, 1.0, 2.0)]
    assert widths[0] < widths[1] < widths[2] and widths[2] > 0.01
    assert bias.row(2.0)["asymmetry"] != 0
    # A grid whose centre drifts with C (guessed exponent off by 0.1) biases the exponent.
    assert abs(bias.row(2.0, drift=0.1)["a_bias"]) > 1e-3 > 10 * abs(bias.row(2.0)["a_bias"])
    # A half-width-0.25 grid shifted by 0.4 decades does not bracket N*: every budget is refused.
    assert bias.row(0.5, 0.4)["refused_fraction"] == 1.0
    assert "parabola" in bias.summary() and len(bias.to_dict()["rows"]) == 12


def test_parabola_window_reduces_wide_grid_bias():
    C, N, L = _isoflop_grid(noise=0.0, width=3.0, k=31)
    full = approach2(C, N, L)
    local = approach2(C, N, L, window=9)  # 9 of 31 sizes: about 0.8 decades around the lowest point
    err_full = np.abs(np.log10(full.N / _n_star(full.C)))
    err_local = np.abs(np.log10(local.N / _n_star(local.C)))
    assert err_full.mean() > 0.02 and err_local.mean() < err_full.mean() / 4
    assert all(o.n_points == 9 for o in local.optima)


def test_parabola_window_counts_sizes_with_all_their_replicates():
    """With seed replicates a window of 3 means 3 sizes (6 rows), not 3 rows (2 sizes: every budget failed
    with 'need at least 3 distinct model sizes')."""
    C, N, L = _isoflop_grid(noise=0.0, width=1.0, k=9)
    C2, N2, L2 = (np.concatenate([v, v]) for v in (C, N, L))
    L2[C.size:] += 0.002  # the replicate seed
    one = approach2(C, N, L, window=3)
    two = approach2(C2, N2, L2, window=3)
    assert all(o.n_points == 6 for o in two.optima)
    assert two.a == pytest.approx(one.a, abs=1e-9) and np.allclose(two.N, one.N, rtol=1e-9)


def test_bootstrap_median_without_a_bootstrap_is_refused():
    C, N, L = _isoflop_grid(noise=0.0)
    with pytest.raises(ValueError, match=r"estimate='bootstrap_median' needs n_bootstrap > 0"):
        approach2(C, N, L, estimate="bootstrap_median")


def test_results_are_json_serialisable():
    import json

    C, N, L = _isoflop_grid(noise=0.002)
    res = approach2(C, N, L, n_bootstrap=20, bootstrap="seed_noise", noise_std=0.002)
    back = json.loads(json.dumps(res.to_dict()))
    assert back["a"] == pytest.approx(res.a) and back["settings"]["bootstrap"] == "seed_noise"
    Nc, Dc, Lc = _curves()
    json.dumps(approach1(Nc, Dc, Lc, n_grid=100).to_dict())
    json.dumps(approach3((LAW, P), BUDGETS).to_dict())
    json.dumps(parabola_bias((LAW, P), BUDGETS, widths=(1.0,), offsets=(0.0,)).to_dict())


def test_nearly_equal_budgets_are_grouped():
    C, N, L = _isoflop_grid(noise=0.0)
    jitter = C * (1 + 1e-5 * np.sin(np.arange(C.size)))  # logged FLOPs are rarely identical
    res = approach2(jitter, N, L)
    assert len(res.optima) == BUDGETS.size
    np.testing.assert_allclose(res.C, BUDGETS, rtol=1e-4)
    assert res.a == pytest.approx(approach2(C, N, L).a, abs=1e-4)


def test_compare_approaches_fits_the_law_itself():
    """Without a supplied fit, Approach 3 fits the Chinchilla law (scaling.fit) to the checkpoints.

    (~10 s, nearly all of it compiling scaling.fit's multi-start program for this data shape.)"""
    pytest.importorskip("scaling.fit")
    N, D, L = _curves()
    every = np.arange(0, N.size, 5)  # 8 checkpoints per run keep the fit cheap
    N, D, L = N[every], D[every], L[every]
    # Every run ends at D = 300 N: on final checkpoints alone N and D are collinear -> refused, not guessed.
    bad = compare_approaches(N, D, L, budgets=BUDGETS, approach1_kwargs={"n_grid": 300})
    assert "not identifiable" in bad.errors["approach3"]
    cmp = compare_approaches(
        N,
        D,
        L,
        budgets=BUDGETS,
        fit_on="all",
        approach1_kwargs={"n_grid": 300},
        approach2_kwargs={"method": "akima"},
        fit_kwargs={"n_starts": 8, "warn": False},
    )
    assert not cmp.errors, cmp.errors
    assert cmp.fit.params["alpha"] == pytest.approx(P["alpha"], abs=0.01)
    assert cmp.approach3.a == pytest.approx(A_TRUE, abs=0.01)
    assert cmp.max_exponent_gap < 0.01


def test_compare_approaches_fits_the_final_checkpoint_of_each_run():
    """fit_on="final" fits the law to each run's last checkpoint (largest D), not its first. Runs of
    different lengths (final D/N from 300 down to ~20) make the final points identifiable."""
    pytest.importorskip("scaling.fit")
    n_runs = np.geomspace(1e7, 1e10, 12)
    rows = [(i, n, d) for i, n in enumerate(n_runs) for d in np.geomspace(2 * n, 300 * n / 1.3**i, 6)]
    run, N, D = (np.array(v) for v in zip(*rows, strict=True))
    L = evaluate(LAW, P, N=N, D=D)
    cmp = compare_approaches(N, D, L, run=run, budgets=BUDGETS, approach1_kwargs={"n_grid": 300},
                             fit_kwargs={"n_starts": 8, "warn": False})
    assert cmp.fit is not None, cmp.errors
    last_d = [D[run == i].max() for i in range(12)]
    np.testing.assert_array_equal(np.sort(cmp.fit.data["D"]), np.sort(last_d))
    assert cmp.fit.n_points == 12


def test_approach3_accepts_bootstrap_objects_and_drops_failed_replicates():
    class FakeBootstrap:  # like scaling.bootstrap.Bootstrap: .values = dict of (B,) arrays, NaN = failed
        values = {"alpha": np.array([0.33, 0.34, np.nan, 0.35]), "beta": np.array([0.27, 0.28, 0.30, 0.29])}

    res = approach3((LAW, P), BUDGETS, param_samples=FakeBootstrap())
    assert res.n_samples == 3
    a_s = np.array([0.27 / 0.60, 0.28 / 0.62, 0.29 / 0.64])
    np.testing.assert_allclose(res.a_ci, np.quantile(a_s, [0.025, 0.975]), atol=1e-9)
    with pytest.raises(ValueError, match="FitResult"):
        approach3((LAW, P), BUDGETS, n_bootstrap=10)


def test_unbracketed_profiles_say_why():
    """The refusal names the cause -- an end-point minimum, a parabola that opens downward, a vertex outside
    the grid -- and approach2's 'too few budgets' error lists every rejected budget with its cause."""
    n = np.array([1e6, 2e6, 4e6, 8e6])
    with pytest.raises(EdgeOfGridError, match="lowest observed loss is at the edge of the grid, the largest"):
        isoflop_minimum(n, [3.0, 2.9, 2.8, 2.7], C=1e18)
    with pytest.raises(EdgeOfGridError, match="isoFLOP profile: .*smallest size N=1e\\+06"):
        isoflop_minimum(n, [2.7, 2.8, 2.9, 3.0], D=1e18 / (6 * n))
    # W-shaped: interior lowest point, but the least-squares parabola is concave.
    with pytest.raises(EdgeOfGridError, match="opens downward.*interior at N=2e\\+06"):
        isoflop_minimum(n, [2.60, 2.50, 2.70, 2.52], C=1e18)
    # Convex, interior lowest point, but the vertex of the fitted parabola lies beyond the largest size.
    with pytest.raises(EdgeOfGridError, match=r"vertex N=.* lies outside the sampled sizes"):
        isoflop_minimum(np.array([1e6, 2e6, 4e6, 8e6, 1.6e7]), [3.0, 2.9, 2.8, 2.69, 2.70], C=1e18)
    C = np.repeat([1e18, 1e19], 4)
    N = np.tile(n, 2)
    loss = np.array([3.0, 2.9, 2.8, 2.7, 2.60, 2.50, 2.70, 2.52])
    with pytest.raises(ValueError, match=r"got 0 \(2 rejected; C=1e\+18: .*largest.*; C=1e\+19: .*downward"):
        approach2(C, N, loss, on_edge="drop")


def test_seed_noise_bootstrap_takes_a_per_budget_sd():
    """noise_std as a mapping budget -> sd: each budget's replicates get its own noise (a budget with sd 0
    gives the same minimum in every replicate), a missing budget or a bad sd is named, and the settings
    serialise. The point estimates do not depend on the noise."""
    C, N, L = _isoflop_grid(noise=0.0)
    sds = {float(c): 0.0 for c in BUDGETS}
    sds[float(BUDGETS[0])] = 0.02
    res = approach2(C, N, L, n_bootstrap=50, bootstrap="seed_noise", noise_std=sds)
    plain = approach2(C, N, L)
    assert res.a == pytest.approx(plain.a) and res.b == pytest.approx(plain.b)
    stds = [o.log_n_std for o in res.optima]
    assert stds[0] > 0.01 and all(s < 1e-12 for s in stds[1:])
    assert res.to_dict()["settings"]["noise_std"][0] == {"C": float(BUDGETS[0]), "sd": 0.02}
    json.dumps(res.to_dict())
    del sds[float(BUDGETS[2])]
    with pytest.raises(ValueError, match=r"no entry for budget C=1e\+18"):
        approach2(C, N, L, n_bootstrap=10, bootstrap="seed_noise", noise_std=sds)
    # inverse-variance weights from a budget whose sd is 0 would be infinite: refused, naming the budgets
    with pytest.raises(ValueError, match=r"spread.*none at C=3.162e\+17, 1e\+18, .*1e\+20 \("):
        approach2(C, N, L, n_bootstrap=20, bootstrap="seed_noise", noise_std={**sds, float(BUDGETS[2]): 0.0},
                  weighting="inverse_variance")
    with pytest.raises(ValueError, match=r"weights are infinite in rows \[1\]"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, np.inf, 1.0])
    # the points bootstrap (and no bootstrap) ignores the sd: an incomplete mapping is no error there
    assert approach2(C, N, L, n_bootstrap=10, bootstrap="points", noise_std=sds).a == pytest.approx(plain.a)
    assert approach2(C, N, L, noise_std=sds).a == pytest.approx(plain.a)
    sds[float(BUDGETS[2])] = float("nan")
    with pytest.raises(ValueError, match="must be finite and >= 0, got nan"):
        approach2(C, N, L, n_bootstrap=10, bootstrap="seed_noise", noise_std=sds)


def test_power_law_fit_validates_weights_zeros_and_identical_x():
    """Negative weights and non-positive x or y are refused; a NaN weight drops its row like a NaN x or y
    (here an outlier row, so keeping it would move the slope); identical x values leave the slope
    unidentified and are refused rather than returned as NaN or inf."""
    x, y = np.array([1.0, 10.0, 100.0, 1000.0]), np.array([2.0, 20.0, 200.0, 2000.0])
    with pytest.raises(ValueError, match="non-negative"):
        fit_power_law(x, y, [1.0, -0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"positive.*bad rows \[0\]"):
        fit_power_law([0.0, 10.0, 100.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"positive.*bad rows \[2\]"):
        fit_power_law([1.0, 10.0, 100.0], [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="identical"):
        fit_power_law([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])
    xo, yo = np.r_[x, 30.0], np.r_[y, 1e6]  # the outlier row carries a NaN weight
    f = fit_power_law(xo, yo, [1.0, 1.0, 1.0, 1.0, np.nan])
    assert f.n_points == 4 and f.exponent == pytest.approx(1.0, abs=1e-12) and f.coef == pytest.approx(2.0)


def test_parabola_refuses_an_end_point_lowest_loss_even_with_an_interior_vertex():
    """The lowest observed loss at the smallest size means the data do not bracket the minimum, even when the
    least-squares parabola through all points is convex with its vertex inside the grid (checked here with
    numpy's polyfit): refused, in the point fit and in every bootstrap replicate."""
    n = np.array([1e6, 2e6, 4e6, 8e6, 1.6e7])
    loss = [2.58, 2.6, 2.59, 2.62, 2.7]
    c2, c1, _ = np.polyfit(np.log(n), loss, 2)
    assert c2 > 0 and np.log(n[0]) < -c1 / (2 * c2) < np.log(n[-1])  # premise: an interior vertex
    with pytest.raises(EdgeOfGridError, match="lowest observed loss is at the edge of the grid, the small"):
        isoflop_minimum(n, loss, C=1e18)


def test_akima_refuses_a_minimum_at_the_largest_size():
    n = np.array([1e6, 2e6, 4e6, 8e6, 1.6e7])
    with pytest.raises(EdgeOfGridError, match="largest size N=1.6e\\+07"):
        isoflop_minimum(n, [3.0, 2.9, 2.8, 2.75, 2.7], C=1e18, method="akima")


def test_parabola_window_is_shifted_not_cut_at_the_top_of_the_grid():
    """Lowest loss at the second-largest of 9 sizes, window 5: the window is the 5 largest sizes (shifted
    down at the grid end), not the 4 sizes left of a centred window."""
    n = np.geomspace(1e6, 2.56e8, 9)
    x = np.log(n)
    loss = 2.0 + 0.05 * (x - x[7] + 0.1) ** 2  # vertex just left of size 7, lowest observed at size 7
    opt = isoflop_minimum(n, loss, C=1e19, window=5)
    assert opt.n_points == 5
    c2, c1, _ = np.polyfit(x[4:], loss[4:], 2)  # the parabola of the 5 largest sizes, by numpy
    assert np.log(opt.N) == pytest.approx(-c1 / (2 * c2), abs=1e-9)


def test_d_star_is_interpolated_in_size_order_whatever_the_row_order():
    """D at N* is a log-log interpolation along the budget's sizes; rows given in any order must give the
    same D*. With D = C / 6N for every point the interpolation is exact: D* = C / (6 N*)."""
    rng = np.random.default_rng(3)
    c = 1e19
    n = _n_star(c) * np.geomspace(0.2, 5.0, 7)
    loss = evaluate(LAW, P, N=n, D=c / (6 * n))
    perm = rng.permutation(7)
    opt = isoflop_minimum(n[perm], loss[perm], D=(c / (6 * n))[perm])
    assert opt.D == pytest.approx(c / (6 * opt.N), rel=1e-12)
    assert opt.N == pytest.approx(isoflop_minimum(n, loss, D=c / (6 * n)).N, rel=1e-12)


def test_noise_std_mapping_matches_budgets_within_a_relative_tolerance():
    """Logged FLOPs are rarely exact: a noise_std key within budget_rtol (relative) of a budget is that
    budget's sd, though it differs from it by ~1e14 FLOPs in absolute terms."""
    C, N, L = _isoflop_grid(noise=0.0)
    sds = {float(c) * (1 + 2e-4): 0.01 for c in BUDGETS}
    res = approach2(C, N, L, n_bootstrap=20, bootstrap="seed_noise", noise_std=sds)
    assert all(o.log_n_std > 0 for o in res.optima)


def test_runs_with_several_model_sizes_are_refused():
    N, D, loss = _curves()
    with pytest.raises(ValueError, match="several model sizes"):
        approach1(N, D, loss, run=np.zeros(N.size, int))
    with pytest.raises(ValueError, match="several model sizes"):
        isoflop_slices(N, D, loss, [1e18], run=np.zeros(N.size, int))


def test_inverse_variance_refuses_a_budget_without_spread_in_log_d():
    """Spread in log N* but none in log D* (D given, the same for every size of a budget) would make the D*
    law's weight infinite: refused by approach2's own check, which names the budgets and the remedy."""
    C, N, L = _isoflop_grid(noise=0.0)
    D = C / (6 * _n_star(C))  # one D per budget: D* interpolates to it whatever N* is
    with pytest.raises(ValueError, match=r"spread of log N\* and log D\* .*none at C=1e\+17"):
        approach2(C, N, L, D, n_bootstrap=20, bootstrap="seed_noise", noise_std=0.01,
                  weighting="inverse_variance")
