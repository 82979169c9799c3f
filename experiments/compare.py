"""Comparisons between a study's groups (optimisers, families) at matched compute, for report.json's
``comparisons`` block:

- law-based compute multipliers at a target loss (each group's fitted law, its exact FLOPs-per-token model)
  with paired bootstrap CIs (:func:`multiplier_ci`);
- law-free checks from the runs themselves: each budget's best run minus the reference's, in units of that
  budget's seed noise (:func:`matched_budget_gaps`), and the compute at which a group's best runs reach the
  reference's largest-budget loss, with a seed-noise CI (:func:`empirical_multipliers`);
- the cross-family law frontier and its crossovers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.report import CI_LEVEL, _guard, _rows, budget_seed_sd
from scaling.intervals import tail_quantiles


def compute_to_target(loss_C: np.ndarray, C: np.ndarray, target: float) -> float:
    """The budget at which a (decreasing) compute-optimal loss curve first reaches ``target``, interpolated
    in log C; nan when it never does on the grid."""
    below = np.flatnonzero(loss_C <= target)
    if not below.size:
        return math.nan
    i = below[0]
    if i == 0:
        return float(C[0])
    x0, x1, y0, y1 = np.log(C[i - 1]), np.log(C[i]), loss_C[i - 1], loss_C[i]
    return float(np.exp(x0 + (target - y0) * (x1 - x0) / (y1 - y0)))


def multiplier_ci(groups: dict, fits: dict, ref: str, target: float, grid: np.ndarray) -> dict:
    """Percentile CIs of each group's compute multiplier at the fixed target loss: every group's bootstrap
    refits (resampled fitted points, independent between groups), replicate i against the reference's
    replicate i. Replicates whose law never reaches the target on the grid count as infinite compute, so a
    group that may not get there shows an open upper end."""
    from scaling.optimal import compute_optimal

    coarse = np.geomspace(grid[0], grid[-1], 120)
    need: dict[str, np.ndarray] = {}
    for g, (res, fpt) in fits.items():
        boot = groups[g]["_fit"][1]
        if boot is None:
            raise ValueError(f"group {g!r} has no bootstrap (n_bootstrap=0)")
        ok = np.ones(boot.n, bool) if boot.converged is None else np.asarray(boot.converged, bool)
        vals = []
        for i in np.flatnonzero(ok):
            p = {k: float(v[i]) for k, v in boot.values.items()}
            try:
                loss = np.asarray(compute_optimal((res.law, p), coarse, flops_per_token=fpt).loss)
            except ValueError:  # no interior optimum for this replicate's parameters
                vals.append(math.nan)
                continue
            c = compute_to_target(loss, coarse, target)
            vals.append(math.inf if math.isnan(c) else c)
        need[g] = np.asarray(vals, np.float64)
    n = min(v.size for v in need.values())
    out = {"level": CI_LEVEL, "n_replicates": n, "ci": {}}
    # scaling's split, but inverted-CDF quantiles (not its percentile_interval): a replicate that never
    # reaches the target is an infinite multiplier, which interpolation would turn into nan.
    q = tail_quantiles(CI_LEVEL)
    for g, v in need.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            m = v[:n] / need[ref][:n]
        m = m[~np.isnan(m)]
        out["ci"][g] = None if m.size < 10 else [float(x) if np.isfinite(x) else None
                                                 for x in np.quantile(m, q, method="inverted_cdf")]
    return out


def best_by_budget(rr: Sequence[dict], g: str) -> dict[float, float]:
    """A group's best (lowest) final loss per isoFLOP budget: its measured compute-optimal frontier."""
    out: dict[float, float] = {}
    for r in _rows(rr, g, ("isoflop",), fit=True):
        out[r["budget"]] = min(out.get(r["budget"], math.inf), r["final_eval_loss"])
    return out


def seed_sd_at(groups: dict, g: str, c: float) -> tuple[float | None, str | None, int | None]:
    """Group ``g``'s seed sd at budget ``c`` -> (sd, source, dof), as ``report.budget_seed_sd``."""
    return budget_seed_sd(groups[g].get("seed_noise", {}), c)


def sd_draws(rng: np.random.Generator, sd: float, dof: int | None, n: int) -> np.ndarray:
    """``n`` plausible values of a noise sd estimated as ``sd`` on ``dof`` degrees of freedom: sigma^2 ~
    dof sd^2 / chi2(dof) (the scaled-inverse-chi2 posterior under the usual 1/sigma prior). Why: one run
    and two more seeds give 2 dof, and such an sd is uncertain by a factor of about 6 at 95% -- treating it
    as known makes a noise-redraw interval too narrow. Unknown dof: the sd as given."""
    if not dof:
        return np.full(n, float(sd))
    return float(sd) * np.sqrt(dof / rng.chisquare(dof, n))


def matched_budget_gaps(rr: Sequence[dict], groups: dict, ref: str) -> dict:
    """Law-free comparison: at each isoFLOP budget, each group's best run minus the reference's best run,
    and that gap in units of their combined seed noise sqrt(sd_g^2 + sd_ref^2) (where both groups have seed
    replicates). Noise shrinks with training length (tenfold over cpu-tiny's budgets), so each group's sd is
    its seed sd at that budget where replicates exist there (``sd_source`` "budget"), else its pooled sd
    ("pooled": at a budget larger than the replicated ones, an overestimate)."""

    def noise(g: str, c: float) -> tuple[float | None, str | None]:
        (s_g, src_g, _), (s_ref, src_ref, _) = seed_sd_at(groups, g, c), seed_sd_at(groups, ref, c)
        if s_g is None or s_ref is None:
            return None, None
        return math.hypot(s_g, s_ref), ("budget" if src_g == src_ref == "budget" else "pooled")

    ref_best = best_by_budget(rr, ref)
    out = {}
    for g in groups:
        if g == ref:
            continue
        mine = best_by_budget(rr, g)
        out[g] = []
        for c in sorted(set(mine) & set(ref_best)):
            n_c, src = noise(g, c)
            out[g].append({"budget": c, "best_loss": mine[c], "reference_best_loss": ref_best[c],
                           "gap": mine[c] - ref_best[c], "combined_seed_sd": n_c, "sd_source": src,
                           "gap_in_sd": None if not n_c else (mine[c] - ref_best[c]) / n_c})
    return out


def empirical_multipliers(rr: Sequence[dict], groups: dict, ref: str, n_draws: int = 2000,
                           seed: int = 0) -> dict:
    """Law-free compute multipliers: the compute at which a group's best runs reach the reference's best
    loss at its largest budget, over that budget, with the group's frontier interpolated linearly in
    log C between measured budgets (no extrapolation: a target reached already at the smallest budget gives
    an upper bound, one never reached a lower bound, > 1). The CI redraws every best loss with its group's
    seed sd at that budget (``seed_sd_at``; seeded, so reproducible): the noise a law's bootstrap misses.
    Each draw first redraws each sd from its degrees of freedom (:func:`sd_draws`; a pooled sd once per
    group and draw), so an sd from three seeds widens the interval as much as its own uncertainty says.
    Not counted: the error of interpolating linearly in log C between budgets."""
    ref_best = best_by_budget(rr, ref)
    rng = np.random.default_rng(seed)
    sigma: dict[tuple, np.ndarray] = {}

    def sigma_of(who: str, b: float, sd: float, src: str, dof: int | None) -> np.ndarray:
        key = (who, b if src == "budget" else "pooled")  # a pooled sd: one draw for all budgets
        if key not in sigma:
            sigma[key] = sd_draws(rng, sd, dof, n_draws)
        return sigma[key]

    out = {}
    if not ref_best:
        return {g: {"error": f"{ref!r} has no finished isoFLOP run"} for g in groups if g != ref}
    # The target is the reference's best loss at its largest budget for every group, also one whose runs at
    # that budget failed: a smaller shared budget would be an easier target, not comparable with the others.
    c_max = max(ref_best)
    target = float(ref_best[c_max])
    for g in groups:
        if g == ref:
            continue
        mine = best_by_budget(rr, g)
        budgets = np.array(sorted(mine))
        if budgets.size < 2:
            out[g] = {"error": f"{budgets.size} budget(s) with a finished isoFLOP run; need 2"}
            continue
        L_g = np.array([mine[c] for c in budgets])
        c = compute_to_target(L_g, budgets, target)
        kind = "not_reached" if math.isnan(c) else ("at_most" if c == budgets[0] else "interpolated")
        entry: dict[str, Any] = {"budget": c_max, "target_loss": target, "budgets": budgets.tolist(),
                                 "multiplier": None if math.isnan(c) else c / c_max, "kind": kind}
        at_g = [seed_sd_at(groups, g, float(b)) for b in budgets]
        at_ref = seed_sd_at(groups, ref, c_max)
        if all(a[0] is not None for a in at_g) and at_ref[0] is not None:
            sd_g = np.stack([sigma_of(g, float(b), *a) for b, a in zip(budgets, at_g, strict=True)], axis=1)
            sd_ref = sigma_of(ref, c_max, *at_ref)
            draws_g = L_g + rng.standard_normal((n_draws, budgets.size)) * sd_g
            draws_t = target + rng.standard_normal(n_draws) * sd_ref
            m = np.array([compute_to_target(dg, budgets, t) for dg, t in zip(draws_g, draws_t, strict=True)])
            m = np.where(np.isnan(m), math.inf, m) / c_max
            lo, hi = np.quantile(m, tail_quantiles(CI_LEVEL), method="inverted_cdf")
            entry.update(ci=[float(x) if np.isfinite(x) else None for x in (lo, hi)], ci_level=CI_LEVEL,
                         n_draws=n_draws, p_reached=float(np.mean(np.isfinite(m))))
        out[g] = entry
    return out


def comparisons(groups: dict, spec, rr: Sequence[dict] = ()) -> dict:
    """report.json's ``comparisons`` block (two or more groups). The law-free checks come from the runs
    alone, so a group whose law could not be fitted (too few runs) or has no compute-optimal curve keeps
    them; the law-based parts leave such a group out and name why (``law_errors``)."""
    if len(groups) < 2:
        return {}
    names = list(groups)
    ref = next((g for g in names if g.startswith("dense") and g.endswith("adamw")), names[0])
    out: dict[str, Any] = {
        "reference_group": ref,
        "budget_range": [min(spec.budgets), max(spec.budgets)],
        "muon_paper_reference": "Muon is Scalable for LLM Training (Liu et al. 2025): ~0.48-0.52 of "
        "AdamW's compute at matched loss",
    }
    out.update(_law_comparisons(groups, spec, ref))
    out["matched_budget_gaps"] = _guard(lambda: matched_budget_gaps(rr, groups, ref))
    out["empirical_multipliers"] = _guard(lambda: empirical_multipliers(rr, groups, ref))
    return out


def _law_comparisons(groups: dict, spec, ref: str) -> dict:
    """Compute to the target loss, multipliers (with ``multiplier_kinds``: "interpolated", "at_most" when
    the law reaches the target already at the grid's first point, so the value is an upper bound, or
    "not_reached"), their bootstrap CIs and the law frontier, over the groups whose compute-optimal curve
    exists; ``law_errors`` names the others."""
    from scaling.optimal import compute_optimal
    from scaling.pareto import law_frontier

    grid = np.geomspace(min(spec.budgets) / 10, max(spec.budgets) * 1000, 400)
    errors: dict[str, str] = {}
    fits, curves, predictors = {}, {}, {}
    for g, b in groups.items():
        if "_fit" not in b:
            errors[g] = "no law fit (" + str((b.get("chinchilla") or {}).get("error", "not fitted")) + ")"
            continue
        res, fpt = b["_fit"][0], b["_fpt"]

        def best_loss(c, res=res, fpt=fpt):  # L*(C) with the group's exact FLOPs-per-token model
            return np.asarray(compute_optimal(res, np.atleast_1d(c), flops_per_token=fpt).loss)

        try:
            curves[g] = best_loss(grid)
        except ValueError as e:  # e.g. an exponent at its bound: no interior optimum on the grid
            errors[g] = f"no compute-optimal curve ({str(e).split(' for budgets')[0][:200]})"
            continue
        fits[g], predictors[g] = (res, fpt), best_loss
    out: dict[str, Any] = {"law_errors": errors}
    if ref not in curves:
        out["error"] = f"the reference group {ref!r} has no law-based curve: {errors.get(ref)}"
        return out
    target = spec.target_loss
    if target is None:  # what the reference reaches at the largest budget of the sweep
        target = float(np.interp(np.log(max(spec.budgets)), np.log(grid), curves[ref]))
    need = {g: compute_to_target(L, grid, target) for g, L in curves.items()}
    kinds = {g: "not_reached" if math.isnan(c) else ("at_most" if c == grid[0] else "interpolated")
             for g, c in need.items()}
    need = {g: None if math.isnan(c) else c for g, c in need.items()}
    out.update(
        target_loss=target,
        compute_to_target=need,
        multipliers={g: None if need[g] is None or need[ref] is None else need[g] / need[ref] for g in need},
        multiplier_kinds=kinds,
    )
    out["multiplier_ci"] = _guard(lambda: multiplier_ci(groups, fits, ref, target, grid))
    if len(predictors) >= 2:
        fr = _guard(lambda: law_frontier(predictors, grid, sense="min"))
        out["law_frontier"] = fr if isinstance(fr, dict) else {
            "crossovers": fr.to_dict()["crossovers"],
            # at the sweep's largest budget (the grid runs on to 1000x it, where another group may lead)
            "best_at_max_budget": fr.best_family(max(spec.budgets)),
        }
    return out
