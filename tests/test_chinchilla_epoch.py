"""Validation on real published data: Hoffmann et al. 2022 Fig. 4 as digitised by Epoch AI (Besiroglu et al.
2024), tests/data/chinchilla_epoch/ (see its PROVENANCE.md for the source, filter and published numbers).

Procedure as published: drop the 5 highest-loss points (240 remain), D = C / (6 N), fit
L = E + A/N^alpha + B/D^beta by Huber (delta = 1e-3) on log-loss residuals, summed, LSE parametrisation.
Tolerances are those suggested in PROVENANCE.md (the issue's): E, alpha, beta +-0.002, A +-3%, B +-5%."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from scaling import fit
from scaling.fit import fit_huber_likelihood

DATA = Path(__file__).parent / "data" / "chinchilla_epoch" / "svg_extracted_data.csv"


def load_chinchilla_epoch() -> dict[str, np.ndarray]:
    with DATA.open() as f:
        rows = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = L < np.sort(L)[-5]  # Besiroglu et al.: drop the 5 highest losses
    return dict(N=N[keep], D=C[keep] / (6 * N[keep]), loss=L[keep])


@pytest.fixture(scope="module")
def data():
    d = load_chinchilla_epoch()
    assert len(d["loss"]) == 240
    return d


@pytest.fixture(scope="module")
def hoffmann(data):
    return fit("chinchilla", data)


def test_hoffmann_recipe_reproduces_published_refit(hoffmann):
    r = hoffmann
    assert r.converged, r.message
    # Published objective 1.018274e-3 (notebook: 0.00101827403); the target is <= 1.01828e-3.  A lower value
    # would mean a different (better) optimum than the published one, so bound it from both sides.
    assert 1.01827e-3 <= r.objective <= 1.01828e-3
    p = r.params
    assert p["E"] == pytest.approx(1.8172, abs=0.002)
    assert p["alpha"] == pytest.approx(0.3473, abs=0.002)
    assert p["beta"] == pytest.approx(0.3672, abs=0.002)
    assert p["A"] == pytest.approx(477.8, rel=0.03)
    assert p["B"] == pytest.approx(2143.0, rel=0.05)
    assert r.n_best >= 0.5 * r.n_starts  # variable projection: most starts reach the same optimum


def test_hoffmann_grid_in_full_space_agrees(data, hoffmann):
    # The literal recipe: L-BFGS over all five LSE parameters from (a thinned) Hoffmann 4,500-point grid.
    # 512 of the 4,500 starts keep the test fast; the full grid is timed in `python -m scaling.bench`.
    r = fit("chinchilla", data, method="full", n_starts=512, warn=False)
    assert r.objective == pytest.approx(hoffmann.objective, rel=1e-6)
    assert r.params["alpha"] == pytest.approx(hoffmann.params["alpha"], abs=1e-3)


def test_besiroglu_huber_likelihood_variant(data, hoffmann):
    m = fit_huber_likelihood(hoffmann)
    assert m.params["E"] == pytest.approx(1.817, abs=0.003)
    assert m.params["alpha"] == pytest.approx(0.3478, abs=0.003)
    assert m.params["beta"] == pytest.approx(0.3659, abs=0.003)
    # Published NLL -879.773 (sigma = exp(-12.2666)); ours must be at least as good up to rounding.
    assert m.extras["nll"] <= -879.76
    assert m.extras["sigma"] == pytest.approx(np.exp(-12.2666), rel=0.05)
    # The reported NLL is the Huber likelihood itself, recomputed here from the fitted params and sigma:
    # density exp(-huber_delta(r/sigma)) / (sigma Z), Z = integral of exp(-huber_delta) (numerical, scipy).
    from scipy.integrate import quad

    delta, sigma, p = 1e-3, m.extras["sigma"], m.params

    def huber(x):
        return np.where(np.abs(x) <= delta, 0.5 * x * x, delta * (np.abs(x) - 0.5 * delta))

    # Split at +-delta; each tail, in t = delta * (x - delta / 2), is (1 / delta) * integral of exp(-t) from
    # delta^2 / 2, so quad sees a unit-rate decay.
    core = quad(lambda x: np.exp(-huber(x)), -delta, delta)[0]
    z = core + 2 * quad(np.exp, -np.inf, -(delta**2) / 2)[0] / delta
    r = np.log(data["loss"]) - np.log(
        p["E"] + p["A"] * data["N"] ** -p["alpha"] + p["B"] * data["D"] ** -p["beta"]
    )
    nll = np.sum(huber(r / sigma) + np.log(sigma * z))
    assert m.extras["nll"] == pytest.approx(nll, rel=1e-9)


def test_bootstrap_standard_errors_of_published_size(hoffmann):
    # Published (4,000 resamples): SE alpha 0.0154, beta 0.0206, E 0.0257.  250 resamples keep the test fast;
    # the Monte-Carlo error of an SE from B resamples is ~1/sqrt(2B) ~ 4.5%, and ours bootstraps the Huber
    # objective rather than the likelihood, so a +-30% band is the honest tolerance.
    b = hoffmann.bootstrap(250, seed=0)
    assert b.converged.mean() > 0.95
    se = b.se()
    assert se["alpha"] == pytest.approx(0.0154, rel=0.3)
    assert se["beta"] == pytest.approx(0.0206, rel=0.3)
    assert se["E"] == pytest.approx(0.0257, rel=0.3)
    lo, hi = b.ci(0.95)["alpha"]
    assert lo < 0.3473 < hi


def test_heldout_error_and_interval_coverage(data):
    from scaling.heldout import heldout_eval

    # Extrapolation (Choshen et al. 2024 style): fit all but the 10% largest models, score those.  The
    # measured coverage of the nominal 90% interval there is well below nominal (about 0.5 when written):
    # the smaller-model fit is biased when extrapolated, which residual scatter cannot capture.  Reported,
    # and only the error is asserted.
    held = data["N"] >= np.quantile(data["N"], 0.9)
    ext = heldout_eval("chinchilla", data, heldout=held, level=0.9, n_boot=200, warn=False)
    print("largest-N held out:", ext.summary())
    assert ext.mean_are < 0.02
    # Interpolation: a random 20% split, where the interval's assumptions hold; coverage should be near 90%.
    rand = np.random.default_rng(0).random(len(data["N"])) < 0.2
    inter = heldout_eval("chinchilla", data, heldout=rand, level=0.9, n_boot=200, warn=False)
    print("random 20% held out:", inter.summary())
    assert inter.mean_are < 0.02
    assert 0.75 <= inter.coverage <= 1.0
