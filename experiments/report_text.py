"""report.md and the printed summary: the words and tables around the numbers of ``report.json``.

Rendering only -- every number here is read from the report dict that ``experiments.report.build_report``
computed, so the markdown and the JSON cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_fmt(x[0], spec)}, {_fmt(x[1], spec)}]"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    # A positive parameter at its lower bound is stored as a floor like 1e-300 (its log must stay finite):
    # that is 0, and printing "1e-300" reads as a measurement.
    return "0" if v != 0 and abs(v) < 1e-100 else format(v, spec)


def _gap_text(r: dict) -> str:
    """One matched-budget gap: nats, and seed sd where known."""
    if r["gap_in_sd"] is None:
        return f"{r['gap']:+.3f}"
    return f"{r['gap']:+.3f} ({r['gap_in_sd']:+.1f} sd{'' if r.get('sd_source') == 'budget' else '*'})"


def _lr_rule_text(rule: dict) -> str:
    """An LR rule as a formula, e.g. 'lr = 0.733 · C^-0.125 (coefficient fitted from 2 cells ...)'."""
    factors = [f"{v}^{rule[k]:.3g}" for k, v in (("c_exp", "C"), ("n_exp", "N"), ("d_exp", "D"))
               if rule.get(k)]
    text = f"lr = {rule['coef']:.4g}" + "".join(f" · {f}" for f in factors)
    return text + (f" ({rule['source']})" if rule.get("source") else "")


def _law_frontier_text(fr: dict, budget_range: Sequence[float] | None) -> str:
    """Which group's law gives the lowest compute-optimal loss over which compute range, in words; crossovers
    outside the sweep's budgets are marked as extrapolations."""
    if "error" in fr or "crossovers" not in fr:
        return f"\nLaw frontier: not available ({fr.get('error', 'no laws')})."
    xs = fr["crossovers"]
    if not xs:
        return f"\nLaw frontier: **{fr['best_at_max_budget']}**'s law is lowest over the whole compute grid."
    parts = [f"{xs[0]['from']} below {_fmt(xs[0]['compute'], '.2g')} FLOPs"]
    parts += [f"{a['to']} from {_fmt(a['compute'], '.2g')} to {_fmt(b['compute'], '.2g')}"
              for a, b in zip(xs, xs[1:], strict=False)]
    parts.append(f"{xs[-1]['to']} above {_fmt(xs[-1]['compute'], '.2g')}")
    lo, hi = budget_range or (0.0, math.inf)
    outside = [x for x in xs if not lo <= x["compute"] <= hi]
    note = (f" ({len(outside)} of the {len(xs)} crossovers lie outside the sweep's budgets, "
            f"{_fmt(lo, '.2g')} to {_fmt(hi, '.2g')}: extrapolations of the laws)") if outside else ""
    head = "\nLaw frontier (the group whose law reaches the lowest compute-optimal loss at each compute): "
    return head + "; ".join(parts) + note + "."


def _empirical_text(e: dict) -> str:
    """A law-free multiplier: its value (or bound) and seed-noise CI, e.g. '0.77 (95% CI [0.6, 1.1])'."""
    reach = max(e["budgets"]) / e["budget"]  # 1 unless the group's runs at the largest budget are missing
    value = {"not_reached": f"> {reach:.3g} (target not reached in its runs)",
             "at_most": f"<= {_fmt(e['multiplier'], '.3g')}"}.get(e["kind"], _fmt(e["multiplier"], ".3g"))
    if e.get("ci") is None:
        return value
    if e["p_reached"] == 0:
        return f"{value}, nor in any of {e['n_draws']} seed-noise draws"
    if e["ci"][0] is None:  # reached in too few draws for the interval to have a finite end
        return f"{value}; reached in only {e['p_reached']:.0%} of {e['n_draws']} seed-noise draws"
    ci = _fmt(e["ci"], ".3g")
    return f"{value} ({e['ci_level']:.0%} CI {ci}, target reached in {e['p_reached']:.0%} of the noise draws)"


def _no_optimum(error: str) -> bool:
    """Whether a form's extrapolation failed because the fitted law has no compute-optimal allocation (the
    error scaling.optimal raises), as opposed to any other failure."""
    return "no interior optimum" in error


def _law_multiplier_text(cmp_: dict, g: str) -> str:
    m = cmp_["multipliers"][g]
    if m is not None and (cmp_.get("multiplier_kinds") or {}).get(g) == "at_most":
        return f"<= {m:.3f} (reached at the grid's first point)"
    return _fmt(m, ".3f")


def _comparisons_markdown(cmp_: dict) -> list[str]:
    ref = cmp_["reference_group"]
    L = ["", "## Group comparison", ""]
    if "target_loss" in cmp_:
        L += [
            f"Compute to reach loss {_fmt(cmp_['target_loss'])} (compute-optimal, "
            f"relative to `{ref}`; {cmp_['muon_paper_reference']}):",
            "",
            "| group | compute | multiplier | 95% CI (bootstrap) |",
            "|---|---|---|---|",
        ]
        mci = cmp_.get("multiplier_ci") or {}
        for g, cc in cmp_["compute_to_target"].items():
            ci = _fmt(_multiplier_ci_of(cmp_, g), ".3g")
            L.append(f"| {g} | {_fmt(cc, '.3g')} | {_law_multiplier_text(cmp_, g)} | {ci} |")
        for g, why in (cmp_.get("law_errors") or {}).items():
            L.append(f"| {g} | – | – | left out: {why} |")
        if "error" in mci:
            L.append(f"\nMultiplier CIs not computed: {mci['error']}")
        elif mci:
            L.append(f"\nCIs from {mci['n_replicates']} bootstrap refits of each group's law (its fitted "
                     "points resampled), paired by replicate; a replicate that never reaches the target "
                     "counts as infinite compute, and an infinite upper end shows as –.")
    else:
        L.append(f"Law-based multipliers: not available ({cmp_.get('error')}).")
    gaps = cmp_.get("matched_budget_gaps") or {}
    if gaps and "error" not in gaps:
        # every budget any group has, each cell looked up by budget (a group may miss one)
        budgets = sorted({r["budget"] for rows in gaps.values() for r in rows})
        L += ["", f"Law-free check, best run per budget minus `{ref}`'s (in units of "
                  "the two groups' combined seed sd at that budget; * = no replicates there, pooled sd "
                  "of the replicated budgets instead):", "",
              "| group | " + " | ".join(f"C = {c:.3g}" for c in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
        for g, rows in gaps.items():
            at = {r["budget"]: r for r in rows}
            L.append(f"| {g} | " + " | ".join(_gap_text(at[c]) if c in at else "–" for c in budgets) + " |")
    emp = cmp_.get("empirical_multipliers") or {}
    if emp and "error" not in emp:
        L += ["", f"Law-free compute multipliers: the compute at which each group's best runs reach "
                  f"`{ref}`'s best loss at the largest budget, over that budget "
                  "(interpolated in log C between measured budgets, never extrapolated; the CI redraws "
                  "every best loss with its group's seed sd at that budget, itself redrawn from its "
                  "degrees of freedom; an infinite upper end shows as –):", "", "| group | multiplier |",
              "|---|---|"]
        L += [f"| {g} | {e['error'] if 'error' in e else _empirical_text(e)} |" for g, e in emp.items()]
    if "law_frontier" in cmp_:
        L.append(_law_frontier_text(cmp_["law_frontier"], cmp_.get("budget_range")))
    return L


def _multiplier_ci_of(cmp_: dict, group: str) -> list | None:
    mci = cmp_.get("multiplier_ci") or {}
    return None if "error" in mci else mci.get("ci", {}).get(group)


def _seed_noise_markdown(sn: dict) -> list[str]:
    if not sn:
        return []
    if "error" in sn:
        return ["", f"**Run-to-run noise**: not measured ({sn['error']})."]
    L = [
        "",
        f"**Run-to-run noise** (the same run with other seeds: initialisation and data order; not fitted; "
        f"budgets {', '.join(f'{c:.3g}' for c in sn['budgets'])}): pooled sd = {_fmt(sn['pooled_sd'])} nats "
        f"({sn['dof']} degrees of freedom). The bootstrap and the prediction interval treat all of the fit's "
        "residual scatter as noise; what exceeds this sd is lack of fit.",
        "",
        "| run | N | D | final losses (seeds) | sd |",
        "|---|---|---|---|---|",
    ]
    for r in sn["rows"]:
        L.append(f"| {r['name']} | {r['N']:,} | {r['D']:,} | {', '.join(f'{x:.4f}' for x in r['losses'])} | "
                 f"{_fmt(r['sd'])} |")
    if sn.get("by_budget"):
        L += ["", "| budget | seed sd (dof) | fit residual RMS there |", "|---|---|---|"]
        L += [f"| {b['budget']:.3g} | {_fmt(b['sd'])} ({b['dof']}) | {_fmt(b['fit_residual_rms'])} |"
              for b in sn["by_budget"]]
    L.append("")
    if sn.get("fit_residual_rms") is not None:
        L.append(f"- Chinchilla fit residual RMS = {_fmt(sn['fit_residual_rms'])} nats = "
                 f"{_fmt(sn['fit_residual_rms_over_sd'], '.2f')} × the seed sd (≈ 1 would mean the law fits "
                 "to the noise; much more means the law form, not the noise, limits the fit).")
    lof = sn.get("lack_of_fit")
    if lof:
        pv = lof["p_value"]
        verdict = ("the law form does not fit within the run-to-run noise" if pv < 0.01 else
                   "a marginal misfit (0.01 < p < 0.05)" if pv < 0.05 else "consistent with run-to-run noise")
        L.append(f"- Lack-of-fit F test (residual mean square over the pooled seed variance): F = "
                 f"{_fmt(lof['F'], '.3g')} on ({lof['dof'][0]}, {lof['dof'][1]}) dof, p = "
                 f"{_fmt(lof['p_value'], '.2g')}: {verdict}.")
    for h in sn.get("heldout_error_in_sd", []):
        own = "" if h.get("in_own_sd") is None else (
            f"; against its own seeds' sd {_fmt(h['own_sd'])}: {_fmt(h['in_own_sd'], '+.1f')} sd")
        L.append(f"- Held-out {h['name']}: actual − predicted = {h['error']:+.4f} nats = "
                 f"{_fmt(h['in_sd'], '+.1f')} pooled seed sd{own}.")
    return L


def _form_extrapolation_markdown(ext: dict) -> list[str]:
    if not ext:
        return []
    mults = [x["multiple"] for x in next((e for e in ext.values() if isinstance(e, list)), [])]
    head = " | ".join(f"N* at {m:g}x | loss at {m:g}x" for m in mults) if mults else "beyond the sweep"
    L = ["", "What each form, fitted on the isoFLOP runs as above, says beyond the sweep: compute-optimal N* "
         "and loss. The spread between forms is model uncertainty, which is not part of a bootstrap of one "
         "form († = below the corpus's entropy rate: impossible).", "",
         f"| form | {head} |", "|---|" + ("---|---|" * len(mults) if mults else "---|")]
    for name, e in ext.items():
        if isinstance(e, dict):
            why = f"not available ({e['error']})"
            if _no_optimum(e["error"]):
                why = ("no compute-optimal allocation: along the isoFLOP curve this fit's loss keeps falling "
                       "to an end of the range (all compute into N, or into D)")
            L.append(f"| {name} | {why} |")
            continue
        cells = [f"{_fmt(x['N'], '.3g')} | {_fmt(x['loss'])}{' †' if x['below_entropy'] else ''}" for x in e]
        notes = [n for n, bad in (("fit did not converge", any(x.get("converged") is False for x in e)),
                                  ("degenerate fit: its loss vanishes", any(not x["loss"] > 1e-6 for x in e)))
                 if bad]
        L.append(f"| {name}{' (' + '; '.join(notes) + ')' if notes else ''} | " + " | ".join(cells) + " |")
    return L


def _law_forms_markdown(lf: dict) -> list[str]:
    if not lf:
        return []
    if "error" in lf:
        return ["", f"**Which law form extrapolates**: not compared ({lf['error']})."]
    forms = lf["forms"]
    tests = [f["test_key"] for f in next(iter(forms.values()))["folds"]]
    L = [
        "",
        "**Which law form extrapolates** (rolling-origin backtest, `scaling.backtest`: each form fitted on "
        "the budgets below the column's and scored on it, so a held-out budget's column is the held-out "
        "prediction of that form; mean absolute relative error, signed bias in brackets):",
        "",
        "| form | params | in-sample RMS (log) | " + " | ".join(f"→ {t:.3g}" for t in tests) + " | mean |",
        "|---|---|---|" + "---|" * len(tests) + "---|",
    ]
    for name in lf["ranking"] + [n for n in forms if n not in lf["ranking"]]:
        f = forms[name]
        cells = [f"skipped ({x['skipped']})" if x["mean_are"] is None
                 else f"{x['mean_are']:.2%} ({x['mean_bias']:+.2%}){'' if x.get('converged', True) else ' !'}"
                 for x in f["folds"]]
        L.append(f"| {name} | {f['n_params']} | {_fmt(f['in_sample_rms'])} | " + " | ".join(cells)
                 + f" | {_fmt(f['mean_are_common'], '.2%')} |")
    if any(x.get("converged") is False for f in forms.values() for x in f["folds"]):
        L.append("\n! = that fold's fit did not converge even after the retry with more iterations: its "
                 "error scores where the optimiser stopped, not the form; read it with care.")
    if lf["ranking"]:
        common = ", ".join(f"{k:.3g}" for k in lf["common_test_keys"])
        L.append(f"\nRanked by the mean over the budgets every ranked form was scored on ({common}): "
                 f"**{lf['ranking'][0]}** extrapolated best here. The fits above use Chinchilla's form; "
                 "with this few folds a ranking is a hint, not a verdict.")
    return L + _form_extrapolation_markdown(lf.get("extrapolation") or {})


def _heldout_status(report: dict, group: str) -> str:
    """Why a group's held-out table is empty: each held-out run's status (and error), or that it has none."""
    held = [r for r in report["runs"] if r["group"] == group and r["kind"] == "heldout"]
    if not held:
        return "the plan has none"
    return "; ".join(f"{r['name']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
                     for r in held)


def render_markdown(report: dict) -> str:
    L = [f"# Scaling study `{report['preset']}`", "", report["description"], ""]
    for n in report["notes"]:
        L.append(f"> note: {n}")
    c = report["compute"]
    n_done = sum(r["status"] == "done" for r in report["runs"])
    L += [
        "## Runs",
        "",
        f"{n_done}/{len(report['runs'])} runs finished; compute spent {_fmt(c['spent_flops'])} "
        f"FLOPs of {_fmt(c['planned_flops'])} planned (shared WSD prefixes counted once; "
        f"{_fmt(c['flops_if_no_reuse'])} without reuse"
        + (f", WSD saving {c['wsd_saving']:.0%})." if c.get("wsd_saving") is not None else ")."),
        "",
        "| run | kind | N | D | FLOPs | lr | eval loss | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        L.append(
            f"| {r['name']} | {r['kind']} | {r['params']:,} | {r['tokens']:,} | {_fmt(r['flops'], '.3g')} | "
            f"{_fmt(r['learning_rate'], '.3g')} | {_fmt(r['final_eval_loss'])} | {r['status']}"
            + (f": {r['error']}" if r.get("error") else "")
            + " |"
        )
    if report["lr_rules"]:
        L += ["", "## Learning-rate rules (fitted on the LR sweep)", ""]
        for g, v in report["lr_rules"].items():
            L.append(
                f"- {g}: {_lr_rule_text(v['rule'])}"
                + (f" (fit failed: {v['error']}; the manual rule was used)" if v.get("error") else "")
            )
    for g, b in report["groups"].items():
        L += ["", f"## Group `{g}` ({b['n_fit_points']} isoFLOP points in the fits)", ""]
        ch = b["chinchilla"]
        if "error" in ch:
            L.append(f"Chinchilla fit: not available ({ch['error']})")
        else:
            L += [
                f"Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Approach 3), "
                f"{ch['n_bootstrap']} bootstrap refits, {ch['ci_level']:.0%} CIs:",
                "",
                "| param | value | CI |",
                "|---|---|---|",
            ]
            for k, v in ch["params"].items():
                L.append(f"| {k} | {_fmt(v)} | {_fmt(ch['ci'].get(k))} |")
            if ch.get("at_bounds"):
                L.append(f"\nOn a bound (the fit is degenerate there): {', '.join(ch['at_bounds'])}.")
            at_floor = " (at its lower bound: the fit puts no loss beyond the power laws)" if "E" in (
                ch.get("at_bounds") or []) else ""
            e = b["entropy"]
            L += [
                "",
                f"**Irreducible loss vs the corpus**: fitted E = {_fmt(e['E'])}"
                f"{at_floor}"
                f" (CI {_fmt(e['E_ci'])}), "
                f"exact entropy rate = {_fmt(e['entropy_rate'])} nats/token; "
                f"E - H = {_fmt(e['E_minus_entropy'])}"
                f" ({_fmt(e['relative'], '+.1%') if e['relative'] is not None else '–'}).",
            ]
        if isinstance(b["heldout"], list):
            L += [
                "",
                "**Held-out runs** (never used in the fits):",
                "",
                "| run | N | D | actual | predicted | 90% interval | rel. error |",
                "|---|---|---|---|---|---|---|",
            ]
            for h in b["heldout"]:
                L.append(
                    f"| {h['name']} | {h['N']:,} | {h['D']:,} | {_fmt(h['actual'])} | "
                    f"{_fmt(h['predicted'])} | "
                    f"{_fmt(h['interval'])} | {h['relative_error']:+.2%} |"
                )
            if not b["heldout"]:
                L.append(f"| no finished held-out run ({_heldout_status(report, g)}) | | | | | | |")
        elif "error" in (b["heldout"] or {}):
            L += ["", f"**Held-out runs**: not predicted ({b['heldout']['error']})."]
        L += _seed_noise_markdown(b.get("seed_noise", {}))
        L += _law_forms_markdown(b.get("law_forms", {}))
        a2, a3 = b["approach2"], b["approach3"]
        L += [
            "",
            "**Exponents** N* ∝ C^a, D* ∝ C^b:",
            "",
            "| method | a | a CI | b | b CI |",
            "|---|---|---|---|---|",
        ]
        for name, blk in (("Approach 2 (isoFLOP parabolas)", a2), ("Approach 3 (parametric fit)", a3)):
            if "error" in blk:
                L.append(f"| {name} | – | {blk['error']} | – | – |")
            else:
                L.append(
                    f"| {name} | {_fmt(blk['a'])} | {_fmt(blk['a_ci'])} | {_fmt(blk['b'])} | "
                    f"{_fmt(blk['b_ci'])} |"
                )
        if a2.get("noise_sd"):
            sds = ", ".join(f"{_fmt(x['budget'], '.3g')}: {_fmt(x['sd'], '.3g')}"
                            + ("*" if x["source"] == "pooled" else "") for x in a2["noise_sd"])
            pooled = ("; * = pooled over budgets, none measured there"
                      if any(x["source"] == "pooled" for x in a2["noise_sd"]) else "")
            L.append(f"\nApproach 2's interval: seed-noise bootstrap, every isoFLOP loss redrawn with its "
                     f"budget's measured seed sd ({sds}{pooled}). It counts noise only, not the parabola's "
                     "misfit.")
        elif a2.get("bootstrap") == "points":
            L.append("\nApproach 2's interval: points resampled within each budget (no seed replicates).")
        for r in a2.get("rejected", []):
            L.append(f"\nApproach 2 left out budget {_fmt(r['C'], '.3g')}: {r['reason']}.")
        if isinstance(b["extrapolation"], list):
            L += [
                "",
                "**Compute-optimal allocation beyond the sweep** (exact FLOPs-per-token model):",
                "",
                "| C | N* | N* CI | D* | D* CI | D*/N* | loss | loss CI |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for x in b["extrapolation"]:
                L.append(
                    f"| {x['multiple']:g}x = {_fmt(x['C'], '.3g')} | {_fmt(x['N'], '.3g')} | "
                    f"{_fmt(x['N_ci'], '.3g')} | {_fmt(x['D'], '.3g')} | {_fmt(x['D_ci'], '.3g')} | "
                    f"{_fmt(x['tokens_per_param'], '.3g')} | {_fmt(x['loss'])} | {_fmt(x['loss_ci'])} |"
                )
        w = b["wsd"]
        L += [
            "",
            "**WSD compute reuse** (Hägele et al. 2024): Chinchilla fit on cool-down branches vs "
            "cosine runs:",
        ]
        if "error" in w:
            L.append(f"not available ({w['error']})")
        else:
            if "error" in (w.get("chinchilla") or {}):
                L.append(f"fit not available ({w['chinchilla']['error']}); the pairwise comparison follows.")
            else:
                L += ["", "| param | cosine isoFLOP | WSD branches |", "|---|---|---|"]
            for k, v in (w.get("compare") or {}).items():
                L.append(f"| {k} | {_fmt(v['cosine'])} | {_fmt(v['wsd'])} |")
            wb = (w.get("chinchilla") or {}).get("at_bounds")
            if wb:
                L.append(
                    f"\nThe WSD-branch fit is degenerate: {', '.join(wb)} ended on a bound "
                    f"({w['n_points']} points for 5 parameters); read the pairwise comparison below instead."
                )
            for h in w["heldout"]:
                L.append(
                    f"\nWSD-fit prediction of {h['name']}: {_fmt(h['predicted'])} vs actual "
                    f"{_fmt(h['actual'])} ({h['relative_error']:+.2%})."
                )
            pr = w.get("pairs") or {}
            if pr.get("n"):
                L += [
                    "",
                    f"Same model, same tokens: WSD branch minus cosine run, over {pr['n']} pairs: mean "
                    f"{pr['mean_difference']:+.4f} nats (sd {_fmt(pr['sd_difference'])}, max |diff| "
                    f"{pr['max_abs_difference']:.4f}).",
                    "",
                    "| N | D (WSD) | D (cosine) | WSD loss | cosine loss | diff |",
                    "|---|---|---|---|---|---|",
                ]
                for r in pr["rows"]:
                    L.append(
                        f"| {r['N']:,} | {r['D_wsd']:,} | {r['D_cosine']:,} | {r['loss_wsd']:.4f} "
                        f"| {r['loss_cosine']:.4f} | {r['difference']:+.4f} |"
                    )
        ds = b["downstream"]
        L += [
            "",
            "**Downstream battery** (accuracy vs compute: sigmoid in log C; two-step C → loss → accuracy):",
        ]
        if "error" in ds:
            L.append(f"not available ({ds['error']})")
        else:
            L += [
                "",
                "Each sigmoid runs from the task's chance to its ceiling where the corpus's source gives "
                "one (an mc task's accuracy when the model is the source, a gen task's pass probability of "
                "the source's own samples); a task without one (–) is fitted with a ceiling of 1.",
                "",
                "| task | chance | ceiling | acc. range (fit runs) | held-out actual | sigmoid pred. "
                "| two-step pred. |",
                "|---|---|---|---|---|---|---|",
            ]
            flat = []
            for t, tb in ds["tasks"].items():
                h = tb["heldout"][0] if tb["heldout"] else {}
                mark = " ‡" if (tb.get("fit_compute") or {}).get("identified") is False else ""
                flat += [t] if mark else []
                L.append(
                    f"| {t} | {_fmt(tb['chance'], '.2f')} | {_fmt(tb.get('ceiling'), '.3g')} | "
                    f"{_fmt(tb['accuracy_range'], '.3f')} | "
                    f"{_fmt(h.get('actual'), '.3f')} | {_fmt(h.get('predicted_sigmoid'), '.3f')}{mark} | "
                    f"{_fmt(h.get('predicted_two_step'), '.3f')} |"
                )
            if flat:
                L.append(
                    f"\n‡ {', '.join(flat)}: the sigmoid's rise is not within the fitted compute range (the "
                    "scores are flat there), so its midpoint and slope are not identified; its prediction is "
                    "the flat level, not a forecast of when the rise comes."
                )
            L.append(
                "\nMean absolute error of the held-out accuracy predictions: "
                f"{_fmt(ds['mean_abs_error'], '.3f')}."
            )
    p = report["pareto"]
    if "loss_vs_training_flops" in p:
        L += [
            "",
            "## Pareto frontiers",
            "",
            "Loss vs training compute (each run at its planned budget; the best run per budget, when it "
            "beats every smaller budget): "
            + ", ".join(
                f"{x['name']} ({_fmt(x.get('budget') or x['flops'], '.3g')}, {_fmt(x['loss'])})"
                for x in p["loss_vs_training_flops"]
            ),
        ]
    if "accuracy_vs_inference_flops" in p:
        L += [
            "",
            f"Accuracy ({p['accuracy_task']}) vs inference FLOPs/token: "
            + ", ".join(
                f"{x['name']} ({_fmt(x['inference_flops_per_token'], '.3g')}, {_fmt(x['accuracy'], '.3f')})"
                for x in p["accuracy_vs_inference_flops"]
            ),
        ]
    cmp_ = report["comparisons"]
    if cmp_ and "reference_group" in cmp_:
        L += _comparisons_markdown(cmp_)
    elif cmp_:
        L += ["", "## Group comparison", "", f"Not available ({cmp_.get('error')})."]
    if report["figures"]:
        L += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figures"]]
    t = report.get("timing", {})
    if t:
        L += [
            "",
            f"Wall time: {t.get('train_wall_seconds', 0):.0f} s until fitting, {t.get('workers')} worker(s).",
        ]
    return "\n".join(L) + "\n"


def print_summary(report: dict, out: Path) -> None:
    print(f"\n=== scaling study {report['preset']}: {out}/report.md ===")
    ent = report["corpus"]["entropy_rate"]
    for g, b in report["groups"].items():
        ch = b["chinchilla"]
        if "error" in ch:
            print(f"[{g}] Chinchilla fit failed: {ch['error']}")
            continue
        p = ch["params"]
        print(
            f"[{g}] L = {p['E']:.3f} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}"
            f"  (E CI {_fmt(ch['ci'].get('E'))}; exact entropy rate {_fmt(ent)})"
        )
        for h in b["heldout"] if isinstance(b["heldout"], list) else []:
            print(
                f"[{g}] held-out {h['name']}: predicted {h['predicted']:.4f} vs actual {h['actual']:.4f} "
                f"({h['relative_error']:+.2%})"
            )
        sn = b.get("seed_noise", {})
        if sn and "error" not in sn:
            held = "; ".join(
                f"held-out error {h['in_sd']:+.1f} sd" + (f" ({h['in_own_sd']:+.1f} sd of its own seeds)"
                                                         if h.get("in_own_sd") is not None else "")
                for h in sn.get("heldout_error_in_sd", []) if h["in_sd"] is not None)
            lof = sn.get("lack_of_fit")
            lof_text = f" (lack-of-fit p = {lof['p_value']:.2g})" if lof else ""
            print(f"[{g}] seed noise: sd {sn['pooled_sd']:.4f} nats ({sn['dof']} dof); fit residual RMS "
                  f"{_fmt(sn.get('fit_residual_rms_over_sd'), '.2f')} sd{lof_text}"
                  + (f"; {held}" if held else ""))
        lf = b.get("law_forms", {})
        if lf and "error" not in lf and lf["ranking"]:
            print(f"[{g}] law forms, fit on smaller budgets -> next budget, mean |rel. error|: " + ", ".join(
                f"{n} {lf['forms'][n]['mean_are_common']:.2%}" for n in lf["ranking"]))
        for x0 in (lf.get("extrapolation") or {}).get("chinchilla") or []:
            if not isinstance(x0, dict) or "multiple" not in x0:
                continue
            by_form = [(n, e[[x["multiple"] for x in e].index(x0["multiple"])])
                       for n, e in lf["extrapolation"].items() if isinstance(e, list)]
            failed = {n: str(e.get("error")) for n, e in lf["extrapolation"].items() if isinstance(e, dict)}
            missing = [f"{n} none (no compute-optimal allocation)" if _no_optimum(err)
                       else f"{n} not available" for n, err in failed.items()]
            print(f"[{g}] loss at {x0['multiple']:g}x by form: " + ", ".join(
                [f"{n} {x['loss']:.3f}" + (" (below the entropy rate)" if x["below_entropy"] else "")
                 for n, x in by_form] + missing))
        for x in b["extrapolation"] if isinstance(b["extrapolation"], list) else []:
            print(
                f"[{g}] {x['multiple']:g}x budget ({x['C']:.3g} FLOPs): "
                f"N* {x['N']:.3g} {_fmt(x['N_ci'], '.3g')}, "
                f"D* {x['D']:.3g} {_fmt(x['D_ci'], '.3g')}, loss {x['loss']:.4f} {_fmt(x['loss_ci'])}"
            )
        a2 = b["approach2"]
        if "error" not in a2:
            print(
                f"[{g}] Approach 2: a = {a2['a']:.3f} {_fmt(a2['a_ci'], '.3f')}, "
                f"b = {a2['b']:.3f} {_fmt(a2['b_ci'], '.3f')}"
            )
        ds = b["downstream"]
        if "error" not in ds and ds.get("mean_abs_error") is not None:
            print(f"[{g}] downstream held-out accuracy MAE {ds['mean_abs_error']:.3f}")
    cmp_ = report.get("comparisons") or {}
    if cmp_ and "reference_group" in cmp_:
        gaps = cmp_.get("matched_budget_gaps") or {}
        laws = cmp_.get("multipliers") or {}
        emps = cmp_.get("empirical_multipliers") or {}
        every = [*laws, *(cmp_.get("law_errors") or {}), *(() if "error" in gaps else gaps),
                 *(() if "error" in emps else emps)]
        for g in dict.fromkeys(every):
            if g == cmp_["reference_group"]:
                continue
            m = _law_multiplier_text(cmp_, g) if g in laws else "–"
            gap = "" if "error" in gaps or g not in gaps else "; best run minus reference's: " + ", ".join(
                _gap_text(r) for r in gaps[g])
            emp = {} if "error" in emps else emps.get(g, {})
            emp_text = "" if not emp or "error" in emp else f"; law-free: {_empirical_text(emp)}"
            print(f"[compare] {g} vs {cmp_['reference_group']}: compute multiplier {m} "
                  f"(95% CI {_fmt(_multiplier_ci_of(cmp_, g), '.3g')}){emp_text}{gap}")
    t = report.get("timing", {})
    print(f"wall time {t.get('total_wall_seconds', t.get('train_wall_seconds', 0)):.0f} s")
