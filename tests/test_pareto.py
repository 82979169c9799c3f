"""Pareto frontiers: exact sets vs an O(N^2) brute force, membership probability, law frontiers."""

import numpy as np
import pytest

from scaling.pareto import law_frontier, membership_probability, pareto_front, pareto_mask


def brute_force_mask(pts, sense):
    """Reference: literal definition of dominance, every pair, written without any sorting."""
    s = np.array([1.0 if x == "min" else -1.0 for x in sense])
    p = np.asarray(pts, float) * s
    n = len(p)
    keep = np.ones(n, bool)
    for i in range(n):
        for j in range(n):
            if i != j and np.all(p[j] <= p[i]) and np.any(p[j] < p[i]):
                keep[i] = False
                break
    return keep


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("trial", range(6))
def test_matches_brute_force_with_ties(k, trial):
    rng = np.random.default_rng(100 * k + trial)
    n = int(rng.integers(1, 120))
    # Small integer grids force many ties, duplicate points and equal coordinates.
    pts = rng.integers(0, 6 if trial % 2 else 50, size=(n, k)).astype(float)
    sense = tuple(rng.choice(["min", "max"], size=k))
    np.testing.assert_array_equal(pareto_mask(pts, sense), brute_force_mask(pts, sense))


def test_general_method_crosses_block_boundary():
    # More points than one vectorised block (256), continuous values, K = 3.
    rng = np.random.default_rng(7)
    pts = rng.normal(size=(700, 3))
    pts[:, 2] = -pts[:, 0] - pts[:, 1] + 0.3 * rng.normal(size=700)  # trade-off so the front is large
    sense = ("min", "min", "min")
    mask = pareto_mask(pts, sense)
    assert 20 < mask.sum() < 700
    np.testing.assert_array_equal(mask, brute_force_mask(pts, sense))


def test_general_method_ties_across_block_boundary():
    """K = 3 with more points than one block (256): duplicates do not dominate each other, within a block or
    against the frontier of earlier blocks, and an integer grid (many ties) matches the brute force."""
    dup = np.tile([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]], (200, 1))  # 400 points, two distinct, both optimal
    assert pareto_mask(dup, "min").all()
    rng = np.random.default_rng(11)
    pts = rng.integers(0, 8, size=(700, 3)).astype(float)
    pts[:, 2] = 14 - pts[:, 0] - pts[:, 1] + rng.integers(0, 3, size=700)  # trade-off: a large, tied front
    mask = pareto_mask(pts, "min")
    assert 20 < mask.sum() < 700
    np.testing.assert_array_equal(mask, brute_force_mask(pts, ("min",) * 3))


def test_two_objective_example_and_order():
    # (FLOPs, loss): (3, 1.0) is dominated by (2, 0.9); the duplicate (1, 2.0) pair both stay.
    pts = np.array([[1, 2.0], [2, 0.9], [3, 1.0], [1, 2.0], [4, 0.5], [2, 0.9001]])
    mask = pareto_mask(pts, "min")
    np.testing.assert_array_equal(mask, [True, True, False, True, True, False])
    np.testing.assert_array_equal(pareto_front(pts, "min"), [0, 3, 1, 4])


def test_infinite_values_and_errors():
    pts = np.array([[np.inf, 0.0], [1.0, np.inf], [2.0, 1.0], [1.0, 3.0]])
    np.testing.assert_array_equal(pareto_mask(pts, "min"), brute_force_mask(pts, ("min", "min")))
    # +inf at the smallest x (a diverged run with the fewest FLOPs): nothing dominates it; tied copies stay
    for pts_inf in ([[1.0, np.inf], [2.0, 3.0], [3.0, 2.0]], [[1.0, np.inf], [1.0, np.inf], [2.0, 0.0]]):
        pts_inf = np.array(pts_inf)
        np.testing.assert_array_equal(pareto_mask(pts_inf, "min"), [True, True, True])
    rng = np.random.default_rng(0)
    for _ in range(200):  # small integer grids with +-inf: many ties, every path against brute force
        q = rng.choice([-np.inf, 0.0, 1.0, 2.0, np.inf], size=(rng.integers(1, 7), 2))
        want = brute_force_mask(q, ("min", "min"))
        np.testing.assert_array_equal(pareto_mask(q, "min"), want, err_msg=str(q))
    pts3 = np.c_[pts, [1.0, -np.inf, 0.0, 0.0]]
    np.testing.assert_array_equal(pareto_mask(pts3, "min"), brute_force_mask(pts3, ("min",) * 3))
    with pytest.raises(ValueError, match="NaN in rows \\[1\\]"):
        pareto_mask([[1, 2], [np.nan, 1]])
    with pytest.raises(ValueError, match="sense has 3 entries"):
        pareto_mask([[1, 2]], ("min", "max", "min"))
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask([1, 2, 3])


def test_membership_probability():
    # Clear frontier point, clearly dominated point, and two near-equal points that trade places under noise.
    pts = np.array([[1.0, 1.0], [5.0, 5.0], [2.0, 0.5], [2.0, 0.5 + 1e-6]])
    prob = membership_probability(pts, sigma=0.05, n_boot=4000, seed=0)
    assert prob[0] == 1.0 and prob[1] == 0.0
    # Points 2 and 3 are exchangeable up to 1e-6 << sigma: one is dominated by the other only when it is worse
    # in BOTH noisy coordinates (probability 1/2 * 1/2), so each stays on the front with probability 3/4.
    assert abs(prob[2] - 0.75) < 0.03 and abs(prob[3] - 0.75) < 0.03
    # sigma = 0 reproduces the exact frontier; the K = 3 path agrees (up to Monte Carlo error, other draws)
    # with the K = 2 path when the third objective is constant.
    np.testing.assert_array_equal(membership_probability(pts, 0.0, n_boot=3), pareto_mask(pts).astype(float))
    p3 = membership_probability(np.c_[pts, np.zeros(4)], [0.05, 0.05, 0.0], n_boot=4000, seed=0)
    np.testing.assert_allclose(p3, prob, atol=0.03)


def test_membership_probability_matches_analytic_two_point_case():
    # Two points that differ only in objective 1 by d; with absolute noise sigma on each, point 0 is on the
    # front (is not dominated) iff its noisy value beats point 1's (other objective held exact):
    # P = Phi(d / (sigma sqrt 2)).
    from scipy.stats import norm

    d, sigma = 0.1, 0.1
    pts = np.array([[0.0, 0.0], [d, 0.0]])
    prob = membership_probability(pts, [[sigma, 0.0], [sigma, 0.0]], n_boot=20000, seed=1)
    expected = norm.cdf(d / (sigma * np.sqrt(2)))
    assert abs(prob[0] - expected) < 4 * np.sqrt(expected * (1 - expected) / 20000)
    rel = membership_probability(pts + 1.0, 0.01, noise="relative", n_boot=100)
    assert rel.shape == (2,)
    # Relative noise scales with the value: (1.2, 99) is dominated by (1, 100) iff both noisy log-coordinates
    # of (1, 100) are lower, P = Phi(log 1.2 / (s sqrt 2)) * Phi(-log(100/99) / (s sqrt 2)) (about 0.44),
    # while absolute noise of 0.05 could never close the gap of 1 in the second objective (P ~ 0).
    s = 0.05 * np.sqrt(2)
    p_dom = norm.cdf(np.log(1.2) / s) * norm.cdf(-np.log(100 / 99) / s)
    prob = membership_probability([[1.0, 100.0], [1.2, 99.0]], 0.05, noise="relative", n_boot=20000, seed=2)
    assert abs(prob[1] - (1 - p_dom)) < 4 * np.sqrt(p_dom * (1 - p_dom) / 20000)
    with pytest.raises(ValueError, match="does not broadcast"):
        membership_probability(pts, np.ones(3))


def test_law_frontier_crossover():
    # Family A: L = 2 + 10 C^-0.1 wins at small C, family B: L = 1.5 + 1000 C^-0.2 at large C.
    fa = lambda c: 2.0 + 10.0 * c**-0.1
    fb = lambda c: 1.5 + 1000.0 * c**-0.2
    c = np.logspace(10, 30, 200)
    lf = law_frontier({"A": fa, "B": fb}, c)
    assert len(lf.crossovers) == 1
    c_x, frm, to = lf.crossovers[0]
    assert abs(fa(c_x) - fb(c_x)) < 1e-9 * fa(c_x)
    assert (frm, to) == ("A", "B") if fa(1e10) < fb(1e10) else ("B", "A")
    assert lf.best_family(1e30) == "B"
    np.testing.assert_allclose(lf.frontier, np.minimum(fa(c), fb(c)))
    seg = lf.segments()
    assert seg[0][0] == frm and seg[-1][0] == to and seg[0][2] == pytest.approx(c_x)
    # Maximisation flips the winner everywhere.
    lmax = law_frontier({"A": fa, "B": fb}, c, sense="max")
    assert (lmax.best != lf.best).all()
    assert lf.to_dict()["crossovers"][0]["from"] == frm


def test_membership_probability_single_objective_and_sigma_validation():
    """K = 1: the front of each replicate is its own minimum, so a far-ahead point always wins and two
    exchangeable points win half the replicates each. Negative sigma is refused."""
    prob = membership_probability([[0.0], [10.0], [20.0]], 0.1, n_boot=2000, seed=0)
    np.testing.assert_array_equal(prob, [1.0, 0.0, 0.0])
    prob = membership_probability([[1.0], [1.0]], 0.1, n_boot=4000, seed=0)
    assert prob.sum() == pytest.approx(1.0) and abs(prob[0] - 0.5) < 4 * 0.5 / np.sqrt(4000)
    with pytest.raises(ValueError, match="finite and non-negative"):
        membership_probability([[0.0, 1.0], [1.0, 0.0]], [0.1, -0.1])


def test_law_frontier_segments_name_each_family_between_its_crossovers():
    """Three families, each best on one range of log10 C (by hand: A below 1e20, B to 1e25, C above): the
    segments are (A, 1e10, 1e20), (B, 1e20, 1e25), (C, 1e25, 1e30), with the crossovers as boundaries."""
    fa = lambda c: 0.1 * (np.log10(c) - 10.0)
    fb = lambda c: np.ones_like(np.asarray(c, float))
    fc = lambda c: 2.5 - 0.1 * (np.log10(c) - 10.0)
    seg = law_frontier({"A": fa, "B": fb, "C": fc}, np.logspace(10, 30, 200)).segments()
    assert [s[0] for s in seg] == ["A", "B", "C"]
    np.testing.assert_allclose([s[1] for s in seg], [1e10, 1e20, 1e25], rtol=1e-8)
    np.testing.assert_allclose([s[2] for s in seg], [1e20, 1e25, 1e30], rtol=1e-8)


def test_law_frontier_crossover_on_a_grid_point_is_that_point():
    """A = C / 1e20 and B = 1 are equal exactly at the grid point C = 1e20 (a tie, given to A): the crossover
    is 1e20, where the predictions meet -- not the log-midpoint 3.16e20 of the next interval, where A is
    3.16 times B (the bug: a zero difference at an end point was taken for "no sign change")."""
    lf = law_frontier({"A": lambda c: np.asarray(c) / 1e20, "B": lambda c: np.ones(np.shape(c))},
                      [1e18, 1e19, 1e20, 1e21, 1e22])
    assert lf.best.tolist() == [0, 0, 0, 1, 1]
    assert len(lf.crossovers) == 1 and lf.crossovers[0][1:] == ("A", "B")
    assert lf.crossovers[0][0] == pytest.approx(1e20, rel=1e-10)


def test_best_family_reads_the_nearest_grid_point_in_log_compute():
    """On the grid 1e10, 1e20, 1e30 with B best from 1e25 on, C = 3e25 is nearest to 1e30 in log C (4.5 vs
    5.5 decades) though nearest to 1e20 in C itself: the answer is B, as at that C."""
    lf = law_frontier({"A": lambda c: 0.1 * np.log10(c), "B": lambda c: np.full(np.shape(c), 2.5)},
                      [1e10, 1e20, 1e30])
    assert [lf.names[i] for i in lf.best] == ["A", "A", "B"]
    assert lf.best_family(3e25) == "B" and lf.best_family(2e24) == "A"


def test_law_frontier_ties_go_to_the_first_family():
    # Documented: ties -> first family; identical predictors never hand over, so there is no crossover.
    f = lambda c: 2.0 + 10.0 * c**-0.1
    lf = law_frontier({"a": f, "b": f}, np.logspace(10, 30, 50))
    assert (lf.best == 0).all() and lf.crossovers == () and lf.best_family(1e20) == "a"
    assert (law_frontier({"a": f, "b": f}, np.logspace(10, 30, 50), sense="max").best == 0).all()


def test_law_frontier_accepts_single_input_fit_objects():
    class _Law:
        inputs = ("C",)

    class _Fit:
        law = _Law()

        def __init__(self, e):
            self.e = e

        def predict(self, C):
            return self.e + C**-0.1

    lf = law_frontier({"lo": _Fit(1.0), "hi": _Fit(2.0)}, np.logspace(0, 5, 10))
    assert set(lf.best.tolist()) == {0} and lf.crossovers == ()


def test_law_frontier_from_chinchilla_fits_uses_compute_optimal_loss():
    from scaling.laws import get_law
    from scaling.optimal import chinchilla_closed_form

    law = get_law("chinchilla")
    # Family "small_alpha" is better at low compute, "big_alpha" (steeper in N) overtakes at large compute.
    p1 = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.30, "beta": 0.35}
    p2 = {"E": 1.7, "A": 3000.0, "B": 2000.0, "alpha": 0.40, "beta": 0.35}
    c = np.geomspace(1e17, 1e27, 120)
    lf = law_frontier({"small_alpha": (law, p1), "big_alpha": (law, p2)}, c)
    l1, l2 = chinchilla_closed_form(p1, c)[2], chinchilla_closed_form(p2, c)[2]
    np.testing.assert_allclose(lf.frontier, np.minimum(l1, l2), rtol=1e-9)
    assert [x[1:] for x in lf.crossovers] == [("small_alpha", "big_alpha")]
    cx = lf.crossovers[0][0]
    l1x, l2x = chinchilla_closed_form(p1, np.array([cx]))[2], chinchilla_closed_form(p2, np.array([cx]))[2]
    assert l1x[0] == pytest.approx(l2x[0], rel=1e-9)
