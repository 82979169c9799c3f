"""Loss curves across learning-rate schedules (scaling/lr_annealing.py; Tissue et al. 2024)."""

import json
import warnings

import numpy as np
import pytest

import scaling
from scaling.fit import prepare_data
from scaling.laws import Law, get_law
from scaling.lr_annealing import annealing_areas, annealing_data, fit_annealing

LAW = get_law("lr_annealing")
TRUE = {"L0": 2.0, "A": 0.6, "alpha": 0.5, "C": 0.5}
T = 3000


def schedule(kind: str, peak: float = 3e-3, warm: int = 100) -> np.ndarray:
    """Per-step learning rates of a T-step run: linear warmup, then constant, cosine to 10%, or WSD (the
    last 20% decays linearly to 0)."""
    t = np.arange(1, T + 1)
    lr = np.where(t <= warm, peak * t / warm, peak)
    if kind == "cosine":
        progress = np.clip((t - warm) / (T - warm), 0, 1)
        lr = np.where(t <= warm, lr, peak * (0.1 + 0.45 * (1 + np.cos(np.pi * progress))))
    elif kind == "wsd":
        d0 = int(0.8 * T)
        lr = np.where(t <= d0, lr, peak * (1 - (t - d0) / (T - d0)))
    return lr


def curve(kind: str, *, decay: float = 0.99, noise: float = 0.0, seed: int = 0):
    lr = schedule(kind)
    s1, s2 = annealing_areas(lr, decay=decay)
    steps = np.arange(10, T + 1, 10)
    loss = np.asarray(LAW.predict(TRUE, S1=s1[steps - 1], S2=s2[steps - 1]))
    return lr, steps, loss * np.exp(noise * np.random.default_rng(seed).normal(size=loss.size))


def test_areas_by_hand():
    """lam = 0.5, lr = [1, 1, 0.5, 0.5]: S1 = [1, 2, 2.5, 3]; the drop at step 3 gives m = [0, 0, 0.5, 0.25],
    S2 = [0, 0, 0.5, 0.75]. With a warmup step first the rise is no anneal: lr = [0.5, 1, 1, 0.5] has its
    peak at step 2 and S2 = [0, 0, 0, 0.5]."""
    s1, s2 = annealing_areas([1.0, 1.0, 0.5, 0.5], decay=0.5)
    np.testing.assert_allclose(s1, [1, 2, 2.5, 3])
    np.testing.assert_allclose(s2, [0, 0, 0.5, 0.75])
    s1, s2 = annealing_areas([0.5, 1.0, 1.0, 0.5], decay=0.5)
    np.testing.assert_allclose(s1, [0.5, 1.5, 2.5, 3])
    np.testing.assert_allclose(s2, [0, 0, 0, 0.5])
    # warmup=0 counts from step 1, so the rise 1 -> 2 is a negative anneal: drops [0, -1, 1, 0.5] (lam = 0)
    _, s2 = annealing_areas([1.0, 2.0, 1.0, 0.5], decay=0.0, warmup=0)
    np.testing.assert_allclose(s2, [0, -1, 0, 0.5])


def test_areas_match_the_papers_recursion_step_by_step():
    """m_t = lam m_{t-1} + (eta_{t-1} - eta_t) after the peak, S2 = cumulative m, S1 = cumulative eta; with
    lam = 0, S2 is simply the drop from the peak so far. A re-warmup after an anneal makes S2 fall."""
    rng = np.random.default_rng(0)
    lr = np.r_[np.linspace(0.1, 1.0, 10), rng.uniform(0.2, 1.0, 50), np.linspace(0.2, 0.9, 10)]
    peak = int(np.argmax(lr))
    for lam in (0.0, 0.9, 0.999):
        m, ref_s2, total = 0.0, [], 0.0
        for t in range(lr.size):
            drop = lr[t - 1] - lr[t] if t > peak else 0.0
            m = lam * m + drop
            total += m
            ref_s2.append(total)
        s1, s2 = annealing_areas(lr, decay=lam)
        np.testing.assert_allclose(s2, ref_s2, atol=1e-12)
        np.testing.assert_allclose(s1, np.cumsum(lr))
    _, s2 = annealing_areas(lr, decay=0.0)
    np.testing.assert_allclose(s2, np.where(np.arange(lr.size) > peak, lr[peak] - lr, 0.0), atol=1e-12)
    assert np.diff(s2)[-5:].max() < 0  # the final re-warmup


def test_fit_recovers_the_law_and_its_momentum_and_predicts_an_unseen_schedule():
    """Curves made by the law itself (lam = 0.99, 0.3% multiplicative noise) under constant and cosine
    schedules: the fit recovers the parameters and lam, and predicts a WSD run it never saw."""
    res = fit_annealing([curve("constant", noise=0.003, seed=0), curve("cosine", noise=0.003, seed=1)])
    assert res.decay == 0.99 and res.result.converged
    assert min(res.objective_by_decay, key=res.objective_by_decay.get) == 0.99
    for k, v in TRUE.items():
        assert res.params[k] == pytest.approx(v, rel=0.01), k
    lr, steps, loss = curve("wsd")
    assert np.abs(res.predict(lr, steps) / loss - 1).max() < 0.002
    assert res.predict(lr)[steps - 1] == pytest.approx(res.predict(lr, steps))
    d = res.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False))["decay"] == 0.99 and d["n_points"] == 600
    assert res.decay_at_edge is False and d["decay_at_edge"] is False  # 0.99 lies inside the grid tried
    curves = [curve("constant", noise=0.003, seed=0), curve("cosine", noise=0.003, seed=1)]
    assert fit_annealing(curves, decays=(0.99, 0.999)).decay_at_edge is True  # best at the grid's end
    assert fit_annealing(curves, decays=(0.99,)).decay_at_edge is False  # one momentum: no grid to leave
    # ignoring the annealing (a constant-LR fit of L0 + A S1^-alpha) misses the WSD cooldown by far more
    const_only = scaling.fit("power_law", {"X": np.cumsum(curve("constant")[0])[steps - 1],
                                           "loss": curve("constant")[2]})
    miss = np.abs(const_only.predict(X=np.cumsum(lr)[steps - 1]) / loss - 1).max()
    assert miss > 10 * np.abs(res.predict(lr, steps) / loss - 1).max()


def test_areas_and_data_name_bad_input():
    with pytest.raises(ValueError, match=r"finite and >= 0; steps \[2\] \(1-based\)"):
        annealing_areas([1.0, -0.1, 0.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        annealing_areas([1.0, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        annealing_areas(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        annealing_areas([1.0], decay=1.0)
    with pytest.raises(ValueError, match=r"warmup must be in \[0, 3\)"):
        annealing_areas([1.0, 1.0, 1.0], warmup=3)
    lr = np.ones(5)
    with pytest.raises(ValueError, match=r"curve 0: steps \[6\] lie outside 1..5"):
        annealing_data([(lr, [1, 6], [3.0, 2.0])])
    with pytest.raises(ValueError, match="curve 1: steps must be whole"):
        annealing_data([(lr, [1], [3.0]), (lr, [1.5], [2.0])])
    with pytest.raises(ValueError, match=r"curve 0: losses at steps \[2\] are not finite"):
        annealing_data([(lr, [1, 2], [3.0, np.nan])])
    with pytest.raises(ValueError, match="2 steps but 1 losses"):
        annealing_data([(lr, [1, 2], [3.0])])
    with pytest.raises(ValueError, match=r"must be \(lr, steps, loss\)"):
        annealing_data([(lr, [1])])
    with pytest.raises(ValueError, match="no curves"):
        annealing_data([])
    data = annealing_data([(lr, [2, 4], [3.0, 2.5]), (lr, [5], [2.0])])
    np.testing.assert_array_equal(data["curve"], [0, 0, 1])
    np.testing.assert_allclose(data["S1"], [2, 4, 5])
    with pytest.raises(ValueError, match="decays is empty"):
        fit_annealing([(lr, [2, 4], [3.0, 2.5])], decays=())
    res = fit_annealing([curve("constant"), curve("cosine")], decays=(0.99,))
    with pytest.raises(ValueError, match=r"steps \[0\] lie outside 1..3000"):
        res.predict(schedule("wsd"), [0])


def test_signed_inputs_may_be_zero_or_negative_and_nothing_else_may():
    """The annealing area is 0 before any anneal and negative after a re-warmup; the fitter takes it, and
    still refuses a non-positive forward area (S1^-alpha) and a law naming a signed input it does not have."""
    data = {"S1": np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), "S2": np.array([0.0, 0.0, -0.1, 0.2, 0.5, 0.9]),
            "loss": np.array([3.0, 2.8, 2.8, 2.5, 2.3, 2.2])}
    X, y, _ = prepare_data(LAW, data)
    assert y.size == 6
    with pytest.raises(ValueError, match="field 'S1' must be > 0"):
        prepare_data(LAW, {**data, "S1": np.r_[0.0, data["S1"][1:]]})
    with pytest.raises(ValueError, match="signed_inputs"):
        Law(name="bad", inputs=("X",), params=("a",), fn=lambda p, x: p["a"] * x["X"], signed_inputs=("Y",))


def test_cli_fits_the_annealing_law_from_a_table_with_zero_annealing_area(tmp_path, capsys):
    """`python -m scaling fit --law lr_annealing` reads S1/S2 columns; S2 = 0 rows (before the cooldown) are
    data, not errors, while a non-positive S1 is named with its row."""
    from scaling.cli import main

    lr, steps, loss = curve("wsd", decay=0.99)
    s1, s2 = annealing_areas(lr, decay=0.99)
    path = tmp_path / "curve.csv"
    rows = "\n".join(f"{a},{b},{c}" for a, b, c in zip(s1[steps - 1], s2[steps - 1], loss, strict=True))
    path.write_text("fwd,anneal,loss\n" + rows + "\n")
    assert (s2[steps - 1] == 0).sum() > 100
    rc = main(["fit", str(path), "--law", "lr_annealing", "--columns", "S1=fwd,S2=anneal", "--n-boot", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    params = json.loads(out)["params"]
    assert params["alpha"] == pytest.approx(0.5, rel=1e-3) and params["C"] == pytest.approx(0.5, rel=1e-3)
    path.write_text("fwd,anneal,loss\n0,0,3\n" + rows + "\n")
    rc = main(["fit", str(path), "--law", "lr_annealing", "--columns", "S1=fwd,S2=anneal", "--n-boot", "0"])
    assert rc == 2 and "S1: non-positive values in rows [0]" in capsys.readouterr().err


def test_only_the_chosen_momentums_fit_speaks():
    """A constant schedule alone has no anneal (S2 = 0), so C sits at its bound at every momentum tried; the
    profile reports that once, for the momentum it keeps, not once per momentum."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit_annealing([curve("constant")], decays=(0.9, 0.99, 0.999))
    texts = [str(w.message) for w in caught]
    assert texts and all(t.startswith(f"fit_annealing (decay {res.decay}): ") for t in texts)
    assert any("C" in t for t in texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_annealing([curve("constant")], decays=(0.9, 0.99), warn=False)


def ar1_curve(kind: str, seed: int, *, phi: float = 0.8, sd: float = 0.003, every: int = 25):
    """A law-made curve (lam = 0.99) with AR(1) noise in log space: neighbouring evaluations share noise,
    as real validation losses along one run do."""
    from scipy.signal import lfilter

    lr = schedule(kind)
    s1, s2 = annealing_areas(lr, decay=0.99)
    steps = np.arange(every, T + 1, every)
    loss = np.asarray(LAW.predict(TRUE, S1=s1[steps - 1], S2=s2[steps - 1]))
    eps = np.random.default_rng(seed).normal(size=steps.size) * sd * np.sqrt(1 - phi**2)
    return lr, steps, loss * np.exp(lfilter([1.0], [1.0, -phi], eps))


def test_bootstrap_rechooses_the_momentum_per_replicate():
    """Every replicate keeps the momentum whose refit of the same resample has the smallest objective, with
    that refit's parameters: checked against the per-momentum bootstraps it is made of."""
    from scaling.bootstrap import bootstrap

    res = fit_annealing([ar1_curve("constant", 0), ar1_curve("cosine", 1)], decays=(0.9, 0.98, 0.99, 0.995))
    boot = res.bootstrap(60, seed=4)
    assert set(boot.blocks) == {0, 1} and all(b > 1 for b in boot.blocks.values())  # AR(1): long blocks
    per = {lam: bootstrap(fit, 60, "blocks", groups=res.curve, block=boot.blocks, seed=4)
           for lam, fit in res.fits_by_decay.items()}
    lams = sorted(per)
    obj = np.array([np.where(per[lam].converged, per[lam].objective, np.inf) for lam in lams])
    np.testing.assert_array_equal(boot.params["decay"], np.asarray(lams)[obj.argmin(0)])
    assert len(set(boot.params["decay"])) > 1  # the momentum is not pinned by these curves
    for b in range(60):
        chosen = per[boot.params["decay"][b]]
        for k in ("L0", "A", "alpha", "C"):
            assert boot.params[k][b] == chosen.values[k][b], (k, b)
    ci = boot.ci(0.9)
    assert ci["L0"][0] < TRUE["L0"] < ci["L0"][1] and ci["alpha"][0] < TRUE["alpha"] < ci["alpha"][1]
    # a band is the replicates' curves: the median near the point prediction, noise=True wider still
    lr = schedule("wsd")
    steps = np.arange(2500, T + 1, 50)
    band, wide = boot.band(lr, steps), boot.band(lr, steps, noise=True)
    assert (band["lower"] < band["upper"]).all()
    np.testing.assert_allclose(band["median"], res.predict(lr, steps), rtol=2e-3)
    assert ((wide["upper"] - wide["lower"]) > (band["upper"] - band["lower"])).all()
    np.testing.assert_array_equal(boot.band(lr, steps)["upper"], band["upper"])  # same seed, same band


def test_block_bands_cover_an_unseen_schedule_that_single_point_resampling_misses():
    """Ten noise draws of constant + cosine curves (AR(1), phi = 0.8, 0.3% sd): the 90% band for the true WSD
    curve (never fitted) covers 70% of its points with blocks sized from the residuals, 45% with blocks of
    one point, i.e. resampling points as if independent (measured). The momentum trades against C on these
    curves, which no resampling of them can pin down: the band under-covers even with blocks."""
    lr = schedule("wsd")
    s1, s2 = annealing_areas(lr, decay=0.99)
    steps = np.arange(2500, T + 1, 50)
    truth = np.asarray(LAW.predict(TRUE, S1=s1[steps - 1], S2=s2[steps - 1]))
    covered: dict = {1: [], None: []}
    for seed in range(10):
        res = fit_annealing([ar1_curve("constant", 2 * seed), ar1_curve("cosine", 2 * seed + 1)],
                            decays=(0.9, 0.98, 0.99, 0.995), warn=False)
        for block in covered:
            band = res.bootstrap(200, block=block).band(lr, steps, level=0.9)
            covered[block].append(np.mean((band["lower"] <= truth) & (truth <= band["upper"])))
    assert np.mean(covered[None]) >= 0.6
    assert np.mean(covered[None]) >= np.mean(covered[1]) + 0.15
