"""The circular block bootstrap (scaling/bootstrap.py, kind="blocks"): its weights, its block-length rule
against AR(1) theory, and its intervals on autocorrelated data where the true curve is known."""

import itertools
import warnings

import numpy as np
import pytest
from scipy.signal import lfilter

from scaling.bootstrap import block_length, block_weights, bootstrap
from scaling.fit import fit


def ar1(n: int, phi: float, seed: int) -> np.ndarray:
    return lfilter([1.0], [1.0, -phi], np.random.default_rng(seed).normal(size=n))


def test_every_replicate_is_made_of_whole_circular_blocks():
    """m = 4 points, blocks of 2: two blocks, each starting at any of the 4 points and wrapping past the end,
    which give 9 distinct count vectors; every replicate is one of them, all of them occur, and
    a second series beside it keeps its own total. Every point's expected count is 1, the ends included
    (plain moving blocks would draw the two end points half as often)."""
    w = np.ones(10)
    groups = np.r_[np.zeros(4, int), np.ones(6, int)]
    W = block_weights(4000, w, groups, np.random.default_rng(0), {0: 2, 1: 3})
    arcs = [np.bincount([(s + j) % 4 for j in range(2)], minlength=4) for s in range(4)]
    possible = {tuple(a + b) for a, b in itertools.product(arcs, arcs)}
    # 10 unordered pairs of the 4 arcs, two of which ({1,2}+{3,4}, {2,3}+{4,1}) both count each point once
    assert len(possible) == 9
    assert {tuple(r) for r in W[:, :4].astype(int)} == possible
    np.testing.assert_array_equal(W[:, :4].sum(1), 4.0)
    np.testing.assert_array_equal(W[:, 4:].sum(1), 6.0)
    np.testing.assert_allclose(W.mean(0), 1.0, atol=0.05)
    # a point outside the fit (weight 0) is never drawn, and the others' weights scale with theirs
    w2 = np.r_[0.0, np.full(9, 2.0)]
    W2 = block_weights(500, w2, groups, np.random.default_rng(1), 2)
    assert (W2[:, 0] == 0).all() and W2[:, 1:4].sum(1).max() == 6.0
    # one block as long as the series is the series itself, every time
    np.testing.assert_array_equal(block_weights(50, w, groups, np.random.default_rng(2), 6)[:, 4:], 1.0)
    with pytest.raises(ValueError, match="block must be a whole number"):
        block_weights(5, w, groups, None, 1.5)
    with pytest.raises(ValueError, match="groups has shape"):
        block_weights(5, w, groups[:5])


@pytest.mark.parametrize("phi, n", [(0.5, 10_000), (0.8, 5_000)])
def test_block_length_matches_ar1_theory_on_long_series(phi, n):
    """For AR(1) the circular block bootstrap's optimal length is (2 G^2 / D)^(1/3) n^(1/3) with
    G = sum |k| R(k) and D = 4/3 (sum R(k))^2, which works out to (6 phi^2 / (1 - phi^2)^2)^(1/3) n^(1/3)
    (Politis & White 2004): 29.9 for phi = 0.5, n = 10,000 and 52.7 for phi = 0.8, n = 5,000."""
    theory = (6 * phi**2 / (1 - phi**2) ** 2) ** (1 / 3) * n ** (1 / 3)
    estimates = [block_length(ar1(n, phi, seed)) for seed in range(15)]
    assert np.median(estimates) == pytest.approx(theory, rel=0.15)


def test_block_length_follows_the_papers_definitions_step_by_step():
    """Short series, where the lag window's shape matters: the rule written out with loops from Politis &
    White 2004 (sample autocovariances, the first run of K_N insignificant autocorrelations, the flat-top
    trapezoid lambda(t) = 1 up to |t| = 1/2 then 2 (1 - |t|), G, D = 4/3 g^2, the cap)."""

    def reference(x):
        n = len(x)
        xc = [v - sum(x) / n for v in x]
        acov = [sum(xc[t] * xc[t + k] for t in range(n - k)) / n for k in range(n)]
        k_n = max(5, int(np.sqrt(np.log10(n))))
        crit = 2 * np.sqrt(np.log10(n) / n)
        k_max = min(n - 1, int(np.ceil(np.sqrt(n))) + k_n)
        m_hat = k_max
        for m in range(0, k_max - k_n + 1):
            if all(abs(acov[m + j] / acov[0]) < crit for j in range(1, k_n + 1)):
                m_hat = m
                break
        big_m = min(2 * max(m_hat, 1), k_max)
        lam = [1.0 if abs(k) / big_m <= 0.5 else 2 * (1 - abs(k) / big_m) for k in range(-big_m, big_m + 1)]
        ks = range(-big_m, big_m + 1)
        g_big = sum(w * abs(k) * acov[abs(k)] for w, k in zip(lam, ks, strict=True))
        g_small = sum(w * acov[abs(k)] for w, k in zip(lam, ks, strict=True))
        b = (2 * g_big**2 / (4 / 3 * g_small**2)) ** (1 / 3) * n ** (1 / 3)
        return int(np.clip(round(b), 1, max(1, min(3 * np.sqrt(n), n / 3))))

    for seed, (n, phi) in enumerate([(60, 0.8), (120, 0.6), (200, 0.9), (90, 0.3), (150, -0.5)]):
        x = ar1(n, phi, seed)
        assert block_length(x) == reference(list(x)), (n, phi)


def test_block_length_of_white_noise_and_degenerate_series():
    assert np.median([block_length(ar1(2000, 0.0, s)) for s in range(15)]) <= 2
    assert block_length(np.ones(50)) == 1 and block_length([1.0, 2.0]) == 1
    assert block_length(ar1(30, 0.99, 0)) <= 10  # capped at n / 3


def test_blocks_cover_an_extrapolation_that_points_miss_under_autocorrelated_noise():
    """A loss-like curve E + A x^-alpha measured at 100 steps with AR(1) noise (phi = 0.8, 0.3% sd), 40 noise
    draws: the 90% bootstrap interval of the curve at twice the last step covers the truth in 80% of the
    draws with blocks (block length from the residuals), 45% when single points are resampled as if
    independent (measured), and the block intervals are more than twice as wide."""
    true = {"E": 2.0, "A": 3.0, "alpha": 0.5}
    x = np.arange(20, 2001, 20.0)
    far = 4000.0
    truth = true["E"] + true["A"] * far ** -true["alpha"]
    covered = {"points": [], "blocks": []}
    width = {"points": [], "blocks": []}
    for seed in range(40):
        noise = 0.003 * np.sqrt(1 - 0.8**2) * ar1(x.size, 0.8, seed)
        y = (true["E"] + true["A"] * x ** -true["alpha"]) * np.exp(noise)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit("power_law", {"X": x, "loss": y})
        for kind in covered:
            draws = bootstrap(res, 300, kind).derived(lambda p: p["E"] + p["A"] * far ** -p["alpha"])
            lo, hi = draws.ci(0.9)["value"]
            covered[kind].append(lo <= truth <= hi)
            width[kind].append(hi - lo)
    assert np.mean(covered["blocks"]) >= 0.7
    assert np.mean(covered["points"]) <= 0.6
    assert np.median(width["blocks"]) > 2 * np.median(width["points"])


def test_block_option_is_named_when_misused():
    x = np.arange(1, 30.0)
    res = fit("power_law", {"X": x, "loss": 2 + x**-0.5}, warn=False)
    with pytest.raises(ValueError, match="block= is the block length of kind='blocks'"):
        bootstrap(res, 10, "points", block=3)
    with pytest.raises(ValueError, match=r"groups has shape \(3,\) but the fit has 29 points"):
        bootstrap(res, 10, "blocks", groups=np.zeros(3))
    fixed = bootstrap(res, 20, "blocks", block=5, seed=3)
    again = bootstrap(res, 20, "blocks", block=5, seed=3)
    np.testing.assert_array_equal(fixed.values["alpha"], again.values["alpha"])
