"""Approach 2 on Porian et al. 2024's isoFLOP data (arXiv:2406.19146) reproduces their exponents.

Data: tests/data/porian2024/ (copied with its PROVENANCE.md from the paper's repository). The published
headline exponent a (N* ∝ C^a) of each configuration is the `bs_median_weighted` estimate: per budget, the
median of 1000 seed-noise bootstrap minima of an Akima interpolant, then WLS of log N* on log C with weights
1/std(log N*)^2 — `scaling.isoflop.PORIAN2024` encodes exactly that recipe.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from scaling.isoflop import PORIAN2024, approach2
from scaling.powerlaw import fit_power_law

DATA = Path(__file__).parent / "data" / "porian2024"

# Published a per configuration (PROVENANCE.md table, the repo's `paper_tables.results_table`, 3 s.f.).
PUBLISHED_A = {
    "rw|base|long|kaplan|kaplan|train|summary_df": 0.835,
    "rw|base|long|kaplan|standard|val|summary_df": 0.706,
    "rw|base|short|kaplan|standard|val|summary_df": 0.602,
    "rw|base|short|chinchilla|standard|val|summary_df": 0.571,
    "rw|tuned|short|const|standard|val|summary_df": 0.497,
    "rw|base|long|kaplan|attention|train|summary_df_att": 0.717,
    "rw|base|short|kaplan|attention|train|summary_df_att": 0.622,
    "rw|base|short|chinchilla|attention|train|summary_df_att": 0.577,
    "rw|tuned|short|const|attention|train|summary_df_att": 0.505,
    "rw|tuned|long|const|kaplan|train|summary_df_kaplan_tuned_hparams": 0.711,
}


def _rows(name: str) -> list[dict]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def _select(rows: list[dict], key: str) -> list[dict]:
    config_id, source = key.rsplit("|", 1)
    return [r for r in rows if r["config_id"] == config_id and r["source_file"] == f"{source}.pickle.xz"]


def _col(rows: list[dict], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r[name] not in ("", "nan") else np.nan for r in rows])


@pytest.fixture(scope="module")
def stored():
    with open(DATA / "fit_results_summary.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pipeline():
    """Our Approach 2 (Porian recipe) from the raw isoFLOP points, for every configuration."""
    points = _rows("isoflop_points.csv")
    out = {}
    for key in PUBLISHED_A:
        rows = _select(points, key)
        assert rows, key
        out[key] = approach2(
            _col(rows, "flops"), _col(rows, "n"), _col(rows, "loss"), _col(rows, "t"), **PORIAN2024
        )
    return out


def test_published_table_matches_stored_fits(stored):
    # Guards the hard-coded table: it is the stored unrounded estimate rounded to 3 s.f.
    assert set(stored) == set(PUBLISHED_A)
    for key, a in PUBLISHED_A.items():
        assert abs(stored[key]["bs_median_weighted"]["n_exponent"] - a) <= 5e-4 + 1e-12, key


@pytest.mark.parametrize("key", list(PUBLISHED_A))
def test_refit_of_stored_optima(key, stored):
    """WLS (w = 1/n_star_std^2) of the stored per-budget optima reproduces the published a within 1e-3.

    Against the stored unrounded values the regression is exact up to float round-off (1e-9)."""
    rows = _select(_rows("optimal_pairs.csv"), key)
    c, n, t, n_std, t_std = (_col(rows, k) for k in ("flops", "n", "t", "n_star_std", "t_star_std"))
    keep = np.isfinite(n) & np.isfinite(n_std)  # budgets the paper rejected have NaN optima
    weighted = fit_power_law(c[keep], n[keep], 1.0 / n_std[keep] ** 2)
    assert abs(weighted.exponent - PUBLISHED_A[key]) < 1e-3
    ref = stored[key]
    assert weighted.exponent == pytest.approx(ref["weighted"]["n_exponent"], abs=1e-9)
    assert fit_power_law(c[keep], t[keep], 1.0 / t_std[keep] ** 2).exponent == pytest.approx(
        ref["weighted"]["t_exponent"], abs=1e-9
    )
    basic = fit_power_law(c[keep], n[keep])
    assert basic.exponent == pytest.approx(ref["basic"]["n_exponent"], abs=1e-9)
    assert basic.r2 == pytest.approx(ref["basic"]["n_r2"], abs=1e-9)


@pytest.mark.parametrize("key", list(PUBLISHED_A))
def test_full_pipeline_from_raw_points(key, pipeline, stored):
    """From the raw isoFLOP points: |a - published| < 0.01 (PROVENANCE tolerance).

    Our bootstrap draws differ from the paper's (different RNG stream), which moves a by ~1e-3; the observed
    gap is <= 0.0015 for every configuration. The 95% bootstrap CI must overlap the stored one."""
    res = pipeline[key]
    assert abs(res.a - PUBLISHED_A[key]) < 0.01
    assert abs(res.b - stored[key]["bs_median_weighted"]["t_exponent"]) < 0.01
    ci = stored[key]["bootstrap_weighted_CI95"]["n_exponent"]
    assert res.a_ci[0] < ci["q975"] and ci["q025"] < res.a_ci[1]
    assert res.a_ci[0] < res.a < res.a_ci[1]


@pytest.mark.parametrize("key", list(PUBLISHED_A))
def test_per_budget_optima_and_rejections_match_stored(key, pipeline):
    """Same budgets rejected (edge minima) and per-budget N* within two interpolation-grid steps."""
    res = pipeline[key]
    rows = _select(_rows("optimal_pairs.csv"), key)
    stored_n = {float(r["flops"]): float(r["n"]) if r["n"] else np.nan for r in rows}
    rejected_stored = sorted(c for c, n in stored_n.items() if not np.isfinite(n))
    assert sorted(c for c, _ in res.rejected) == rejected_stored
    log_ratio = np.array([np.log(o.N / stored_n[o.C]) for o in res.optima])
    assert np.max(np.abs(log_ratio)) < 0.06  # grid step = data spacing / 25, about 0.028 in log N here
    assert np.mean(np.abs(log_ratio)) < 0.01
    # std(log N*) as stored (floored at 0.33 grid steps, inflated by B / #valid): measured max |log ratio|
    # 0.023 over all configurations (different bootstrap draws); without the inflation one reaches 0.13
    stored_std = {float(r["flops"]): float(r["n_star_std"]) for r in rows if r["n"]}
    std_ratio = np.array([np.log(o.log_n_std / stored_std[o.C]) for o in res.optima])
    assert np.max(np.abs(std_ratio)) < 0.05


def test_headline_corrections_story(pipeline):
    """The paper's headline: Kaplan-like setup ~0.83, all corrections together ~0.50 (Hoffmann-like)."""
    kaplan = pipeline["rw|base|long|kaplan|kaplan|train|summary_df"]
    tuned = pipeline["rw|tuned|short|const|standard|val|summary_df"]
    assert kaplan.a > 0.8 and abs(tuned.a - 0.5) < 0.01
    assert tuned.a_ci[0] < 0.5 < tuned.a_ci[1]  # the published 95% CI (0.491, 0.505) also contains 0.5
