"""Downstream capability fits on synthetic data drawn from known curves."""

import json
import warnings

import numpy as np
import pytest
from scipy.special import expit

from scaling.downstream import (
    fit_accuracy_vs_compute,
    fit_loss_power_law,
    fit_passuntil_scaling,
    fit_sigmoid,
    fit_two_step,
    heldout_error,
    item_scores,
    passuntil_estimate,
    per_item_analysis,
    simulate_passuntil,
    task_pass_rate,
)

C = np.logspace(19, 24, 40)
C_MID, SLOPE, CEIL, CHANCE = 1e22, 1.2, 0.9, 0.25


def true_acc(c):
    return CHANCE + (CEIL - CHANCE) * expit(SLOPE * (np.log(c) - np.log(C_MID)))


def test_sigmoid_recovers_known_curve_and_band_covers_truth():
    rng = np.random.default_rng(0)
    y = true_acc(C) + 0.01 * rng.normal(size=C.size)
    fit = fit_accuracy_vs_compute(C, y, chance=CHANCE, ceiling=None, n_boot=400, seed=1)
    assert fit.converged and fit.floor == CHANCE
    assert fit.ceiling == pytest.approx(CEIL, abs=0.01)
    assert np.exp(fit.mid) == pytest.approx(C_MID, rel=0.1)
    assert fit.slope == pytest.approx(SLOPE, rel=0.1)
    # Parameter-uncertainty band: the true curve lies inside the 95% band over the data range.
    x = np.logspace(19.5, 23.5, 9)
    lo, hi = fit.interval(x, level=0.95)
    assert ((lo <= true_acc(x) + 2e-3) & (true_acc(x) - 2e-3 <= hi)).mean() >= 0.8
    assert fit.samples.shape == (400, 4)
    # both intervals are the 2.5/97.5% percentiles of the bootstrap draws (curve values; parameters)
    np.testing.assert_allclose((lo, hi), np.quantile(fit.predict_samples(x), [0.025, 0.975], axis=0))
    ci = fit.to_dict(0.95)["ci"]
    for i, k in enumerate(("floor", "ceiling", "mid", "slope")):
        assert ci[k] == pytest.approx(np.quantile(fit.samples[:, i], [0.025, 0.975]).tolist())
    lp = fit.law_params
    assert lp["R0"] == CHANCE and lp["C_mid"] == pytest.approx(np.exp(fit.mid))


def test_a_sigmoid_flat_over_its_data_says_its_rise_is_not_identified():
    """Scores flat at chance (or at the ceiling) over the whole fitted range fit any midpoint beyond the data
    and any steepness (slope ~1e66 at the ceiling): the prediction is right, the parameters mean nothing, and
    the fit now says so (it reported them as a converged fit and nothing else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flat fit's slope overflowed exp to inf, which JSON cannot hold
        at_chance = fit_accuracy_vs_compute(C, np.full(C.size, CHANCE) + 1e-5 * np.arange(C.size),
                                            chance=CHANCE)
        at_ceiling = fit_accuracy_vs_compute(C, np.full(C.size, CEIL), chance=CHANCE, ceiling=CEIL)
        rising = fit_accuracy_vs_compute(C, true_acc(C), chance=CHANCE, ceiling=CEIL)
        # a rise between two points, too steep to place within the gap
        step = fit_accuracy_vs_compute(C, np.where(C < 3e21, CHANCE, CEIL), chance=CHANCE, ceiling=CEIL)
    assert at_chance.identified is False and at_ceiling.identified is False and rising.identified is True
    assert at_chance.predict(C[-1]) == pytest.approx(CHANCE, abs=1e-3)
    assert at_chance.to_dict()["identified"] is False
    assert step.identified is False
    for fit in (at_chance, at_ceiling, step):
        assert np.isfinite(fit.slope)
        json.dumps(fit.to_dict(), allow_nan=False)
    assert step.predict(C) == pytest.approx(np.where(C < 3e21, CHANCE, CEIL), abs=1e-6)


def test_sigmoid_free_floor_and_decreasing_in_loss():
    rng = np.random.default_rng(1)
    loss = np.linspace(1.8, 3.5, 50)
    y = 0.3 + 0.6 * expit(-5.0 * (loss - 2.6)) + 0.005 * rng.normal(size=loss.size)
    fit = fit_sigmoid(loss, y, floor=None, ceiling=None, increasing=False)
    assert fit.floor == pytest.approx(0.3, abs=0.02) and fit.ceiling == pytest.approx(0.9, abs=0.02)
    assert fit.slope == pytest.approx(-5.0, rel=0.1) and fit.mid == pytest.approx(2.6, abs=0.03)
    fixed = fit_sigmoid(loss, y, floor=None, ceiling=0.9, increasing=False)
    assert fixed.floor == pytest.approx(0.3, abs=0.02)


def test_loss_power_law_recovers_parameters():
    rng = np.random.default_rng(2)
    loss = (1.7 + 400 * C**-0.12) * np.exp(0.002 * rng.normal(size=C.size))
    lf = fit_loss_power_law(C, loss, n_boot=200)
    assert lf.E == pytest.approx(1.7, abs=0.05) and lf.alpha == pytest.approx(0.12, abs=0.01)
    np.testing.assert_allclose(lf.predict(C), 1.7 + 400 * C**-0.12, rtol=5e-3)
    assert lf.samples.shape == (200, 3)


def test_two_step_recovers_known_curves_and_extrapolates():
    rng = np.random.default_rng(3)
    loss_of = lambda c: 1.8 + 300 * c**-0.15
    acc_of = lambda lo: 0.25 + 0.7 * expit(-8.0 * (lo - 2.3))
    train = C[C < 3e23]
    loss = loss_of(train) * np.exp(0.003 * rng.normal(size=train.size))
    acc = acc_of(loss_of(train)) + 0.01 * rng.normal(size=train.size)
    ts = fit_two_step(train, loss, acc, chance=0.25, ceiling=0.95, n_boot=300, seed=0)
    assert ts.acc_fit.slope == pytest.approx(-8.0, rel=0.15)
    assert ts.acc_fit.mid == pytest.approx(2.3, abs=0.02)
    target = np.array([1e24, 3e24])
    truth = acc_of(loss_of(target))
    np.testing.assert_allclose(ts.predict(target), truth, atol=0.02)
    lo, hi = ts.interval(target, level=0.95)
    assert (lo <= truth + 0.005).all() and (truth - 0.005 <= hi).all()
    assert ts.predict_samples(target).shape == (300, 2)
    # Propagated uncertainty is wider than the loss->accuracy step alone would suggest at the same loss.
    assert (hi - lo > 0).all()


def test_item_scores_against_manual_softmax():
    lc = np.log(np.array([[0.5, 0.1], [0.2, 0.05]]))
    li = np.log(np.array([[[0.2, 0.1], [0.3, np.nan]], [[0.2, 0.3], [0.01, 0.02]]]))
    sc = item_scores(lc, li)
    manual = np.exp(lc) / (np.exp(lc) + np.nansum(np.exp(li), -1))
    np.testing.assert_allclose(sc["p_choice_correct"], manual)
    np.testing.assert_array_equal(sc["correct"], [[1, 0], [0, 1]])  # tie (0.2 vs 0.2) counts as wrong
    np.testing.assert_allclose(sc["p_vocab_correct"], np.exp(lc))
    # Brier of item (0, 0): normalised choices (0.5, 0.2, 0.1)/0.8.
    p = np.array([0.5, 0.2, 0.1]) / 0.8
    assert sc["brier"][0, 0] == pytest.approx((p[0] - 1) ** 2 + p[1] ** 2 + p[2] ** 2)
    with pytest.raises(ValueError, match="<= 0"):
        item_scores(np.zeros((1, 1)) + 0.1, np.zeros((1, 1, 2)) - 1)
    with pytest.raises(ValueError, match=r"\[M, I\]"):
        item_scores(np.zeros((2, 3)) - 1, np.zeros((2, 4, 1)) - 1)


def test_per_item_analysis_recovers_stage_one_and_correlation_ordering():
    rng = np.random.default_rng(0)
    m, i, k = 12, 300, 3
    c = np.logspace(20, 24, m)
    b = rng.lognormal(0, 0.5, i)
    lpc = -(0.3 + b[None, :] * (c[:, None] / 1e20) ** -0.25)
    # Separation of correct vs incorrect log-probs grows with log compute, at an item-specific rate.
    rate = rng.uniform(0.5, 1.5, (1, i, 1))
    sep = rng.normal(0, 1, (1, i, k)) + 0.5 * np.log(c / 1e20)[:, None, None] * rate
    lpi = np.minimum(lpc[..., None] - sep - 0.5, 0.0)
    pa = per_item_analysis(c, lpc, lpi)
    s1 = pa.fits["neg_logprob_correct"]  # mean_i -log p = 0.3 + mean(b) (C/1e20)^-0.25 exactly
    assert s1.E == pytest.approx(0.3, rel=1e-4) and s1.alpha == pytest.approx(0.25, rel=1e-4)
    assert pa.fits["accuracy"].floor == pytest.approx(0.25)
    corr = pa.median_corr()
    # Schaeffer et al.'s observation: thresholding to accuracy loses the per-item relation to compute.
    assert corr["logprob_correct"] > 0.9 and corr["accuracy"] < corr["p_choice_correct"]
    assert np.all(np.diff(pa.means["accuracy"]) >= -0.02)


@pytest.mark.parametrize("k", [2, 5])
def test_passuntil_estimator_bias_and_coverage(k):
    p = 1e-3
    s, n = simulate_passuntil(np.full(20000, p), k, 10**7, seed=k)
    assert (s == k).all()
    mle = passuntil_estimate(s, n, k=k)
    unb = passuntil_estimate(s, n, k=k, unbiased=True).estimate
    se = unb.std() / np.sqrt(unb.size)
    assert abs(unb.mean() - p) < 4 * se  # (k-1)/(n-1) is exactly unbiased under inverse sampling
    # The MLE k/n over-estimates by about k/(k-1) for small p (n is ~ Gamma(k, p)).
    assert mle.estimate.mean() == pytest.approx(p * k / (k - 1), rel=0.05)
    cover = np.mean((mle.lower <= p) & (p <= mle.upper))
    assert 0.94 <= cover <= 0.97


def test_passuntil_censored_budget_and_errors():
    s, n = simulate_passuntil(np.full(20000, 1e-3), 3, 2000, seed=0)
    cens = s < 3
    assert 0.5 < cens.mean() < 0.8 and (n[cens] == 2000).all()
    # P(fewer than 3 passes in 2000 trials) = binomial CDF at 2.
    from scipy.stats import binom

    assert cens.mean() == pytest.approx(binom.cdf(2, 2000, 1e-3), abs=0.01)
    est = passuntil_estimate(s, n, k=3)
    assert np.mean((est.lower <= 1e-3) & (1e-3 <= est.upper)) >= 0.94
    with pytest.raises(ValueError, match="successes <= trials"):
        passuntil_estimate([3], [2])
    with pytest.raises(ValueError, match="k >= 2"):
        passuntil_estimate([1], [10], k=1, unbiased=True)


def test_passuntil_scaling_fit_recovers_exponent():
    n_params = np.logspace(7, 9.5, 8)
    c_true, a_true = 1450.0, 0.3
    p_true = np.exp(-c_true * n_params**-a_true)  # from 1e-5 (tiny) up to 0.13
    assert p_true.min() < 1e-4
    est = []
    for j, p in enumerate(p_true):
        s, n = simulate_passuntil(np.full(200, p), 4, 10**9, seed=j)
        est.append(task_pass_rate(s, n, k=4, unbiased=True, n_boot=200)[0])
    fit = fit_passuntil_scaling(n_params, est)
    assert fit.alpha == pytest.approx(a_true, abs=0.03)
    np.testing.assert_allclose(fit.predict(n_params), p_true, rtol=0.3)
    # integer weights are repeated points (WLS), so the fit equals the unweighted fit on the repeated data
    w = np.arange(1, 9)
    wfit = fit_passuntil_scaling(n_params, est, weights=w.astype(float))
    rep = fit_passuntil_scaling(np.repeat(n_params, w), np.repeat(est, w))
    assert wfit.alpha == pytest.approx(rep.alpha, rel=1e-10) and wfit.c == pytest.approx(rep.c, rel=1e-10)


def test_heldout_error_and_bad_input():
    rng = np.random.default_rng(4)
    y = true_acc(C) + 0.01 * rng.normal(size=C.size)
    res = heldout_error(C, y, cutoff=3e22, chance=CHANCE, ceiling=None)
    assert res["mae"] < 0.03 < res["baseline_mae"] and res["n_train"] + res["n_test"] == C.size
    # a model exactly at the cutoff is held out (trained on compute < cutoff): C[25:] are the 15 held out
    at = heldout_error(C, y, cutoff=C[25], chance=CHANCE, ceiling=None)
    assert (at["n_train"], at["n_test"]) == (25, 15)
    with pytest.raises(ValueError, match="compute has 3 values but accuracy has 2|x has 3 values"):
        fit_accuracy_vs_compute([1.0, 2.0, 3.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite values in rows \\[1\\]"):
        fit_accuracy_vs_compute([1.0, np.nan, 3.0, 4.0, 5.0], [0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="too few"):
        fit_accuracy_vs_compute([1.0, 2.0], [0.1, 0.2])


def test_per_item_default_chance_counts_only_real_choices():
    """Items NaN-padded to a common width (2-choice next to 4-choice items): the default chance floor is the
    mean of 1 / (each item's own number of choices) -- 0.375 here, not 1/4 -- so random guessers sit at it."""
    rng = np.random.default_rng(0)
    m, n_items = 10, 400
    c = np.logspace(19, 23, m)
    lpc = -5.0 + 0.001 * rng.standard_normal((m, n_items))
    lpi = -5.0 + 0.001 * rng.standard_normal((m, n_items, 3))
    lpi[:, : n_items // 2, 1:] = np.nan
    pa = per_item_analysis(c, np.minimum(lpc, 0.0), lpi)
    assert pa.fits["accuracy"].floor == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    assert abs(pa.means["accuracy"].mean() - 0.375) < 0.03


def test_a_fixed_floor_or_ceiling_the_data_contradict_is_warned_about():
    """A chance level above most scores (0.5 given for a task scored from 0) or a ceiling below the best
    models still 'converges'; the fit says so. Scores scattered around the right bounds do not warn."""
    acc = true_acc(C)  # from CHANCE up to near CEIL
    with pytest.warns(UserWarning, match=r"fixed floor 0.9 lies above most of the scores .*median"):
        fit_accuracy_vs_compute(C, acc, chance=0.9)
    with pytest.warns(UserWarning, match=r"fixed ceiling 0.3 lies below the scores"):
        fit_sigmoid(np.log(C), acc, floor=CHANCE, ceiling=0.3)
    # the median alone names a bound the bulk of the scores contradict, with no outlier beyond half the range
    rng0 = np.random.default_rng(1)
    low = 0.3 + 0.01 * rng0.normal(size=C.size)  # all below a floor of 0.5, none below 0.5 - 0.25
    with pytest.warns(UserWarning, match="fixed floor 0.5 lies above most"):
        fit_accuracy_vs_compute(C, low, chance=0.5)
    high = 0.7 + 0.01 * rng0.normal(size=C.size)  # all above a ceiling of 0.6, none above 0.6 + 0.175
    with pytest.warns(UserWarning, match="fixed ceiling 0.6 lies below the scores"):
        fit_accuracy_vs_compute(C, high, chance=CHANCE, ceiling=0.6)
    rng = np.random.default_rng(0)
    noisy = np.clip(acc + 0.03 * rng.normal(size=C.size), 0, 1)  # about half the chance-level models below it
    assert (noisy < CHANCE).sum() >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_accuracy_vs_compute(C, noisy, chance=CHANCE, ceiling=None)
        fit_sigmoid(np.log(C), noisy, floor=None, ceiling=CEIL)  # a free floor is never checked
