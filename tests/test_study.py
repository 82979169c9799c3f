"""The study end to end on a micro preset: plan -> train -> fit -> report.json (schema) / report.md / PNGs;
re-running reuses every run and only refits."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from experiments import report as report_mod
from experiments import study
from experiments.report import REPORT_SCHEMA_VERSION, validate_report
from experiments.study_presets import get_study_preset


def _micro_spec():
    spec = get_study_preset("cpu-micro")
    g = spec.groups[0]
    base = dataclasses.replace(
        g.base, data=dataclasses.replace(g.base.data, n_train_tokens=50_000, n_val_tokens=4096)
    )
    return dataclasses.replace(
        spec,
        groups=(dataclasses.replace(g, base=base),),
        budgets=(1e9, 3e9),
        heldout_budgets=(6e9,),
        n_bootstrap=8,
        replicate_seeds=(1,),
        replicate_budgets=(1e9, 6e9),
    )


def test_study_end_to_end_and_rerun(tmp_path, monkeypatch, capsys):
    spec = _micro_spec()
    out = tmp_path / "study"
    report = study.run_study(spec, out, workers=1, executor="sequential")
    validate_report(report)
    on_disk = json.loads((out / "report.json").read_text())
    validate_report(on_disk)
    assert on_disk["schema_version"] == REPORT_SCHEMA_VERSION
    runs = on_disk["runs"]
    assert len(runs) == 11 and all(r["status"] == "done" for r in runs)
    assert {r["kind"] for r in runs} == {"isoflop", "heldout", "seed_replicate"}
    for r in runs:  # each run directory is its config hash and holds the trainer's summary
        s = json.loads((out / "runs" / r["run_id"] / "summary.json").read_text())
        assert s["final_eval_loss"] == pytest.approx(r["final_eval_loss"])
        # whole steps: within half a step of the budget (<= 1% once runs have >= 50 steps, test_sweep.py)
        assert abs(s["flops"] / r["budget"] - 1) <= 0.5 / s["steps"] + 1e-12
    g = on_disk["groups"]["dense-adamw"]
    assert g["n_fit_points"] == 6
    ch = g["chinchilla"]
    assert "error" not in ch, ch
    ent = on_disk["corpus"]["entropy_rate"]
    assert ent == pytest.approx(s["entropy_floor"])
    assert g["entropy"]["E_minus_entropy"] == pytest.approx(ch["params"]["E"] - ent)
    assert g["entropy"]["relative"] == pytest.approx((ch["params"]["E"] - ent) / ent)
    lo_E, hi_E = ch["ci"]["E"]
    assert g["entropy"]["ci_covers_entropy"] is (lo_E <= ent <= hi_E)
    (h,) = g["heldout"]
    assert h["relative_error"] == pytest.approx((h["predicted"] - h["actual"]) / h["actual"])
    assert h["covered"] is (h["interval"][0] <= h["actual"] <= h["interval"][1])
    held_run = next(r for r in runs if r["kind"] == "heldout")
    assert h["actual"] == held_run["final_eval_loss"] and held_run["fit"] is False
    # seed replicates: the smallest budget's three runs and the held-out run again with seed 1, not fitted;
    # the noise block's pooled sd is the hand-computed one from the runs' own final losses
    reps = [r for r in runs if r["kind"] == "seed_replicate"]
    assert len(reps) == 4 and not any(r["fit"] for r in reps)
    by_name = {r["name"]: r for r in runs}
    pairs = [(by_name[r["name"].removesuffix("-seed1")]["final_eval_loss"], r["final_eval_loss"])
             for r in reps]
    assert all(a != b for a, b in pairs)  # another seed is another run
    sn = g["seed_noise"]
    assert "error" not in sn, sn
    assert sorted(tuple(r["losses"]) for r in sn["rows"]) == sorted(pairs)
    # two seeds: each configuration's variance is (a - b)^2 / 2, with one degree of freedom
    assert sn["dof"] == 4
    assert sn["pooled_sd"] == pytest.approx((sum((a - b) ** 2 / 2 for a, b in pairs) / 4) ** 0.5)
    (he,) = sn["heldout_error_in_sd"]
    assert he["in_sd"] == pytest.approx((h["actual"] - h["predicted"]) / sn["pooled_sd"])
    (a, b) = next(p for p, r in zip(pairs, reps, strict=True) if r["name"].startswith(h["name"]))
    assert he["own_sd"] == pytest.approx(abs(a - b) / 2**0.5)  # its own two seeds
    assert he["in_own_sd"] == pytest.approx((h["actual"] - h["predicted"]) / he["own_sd"])
    assert sn["fit_residual_rms"] > 0
    lof = sn["lack_of_fit"]  # 6 points, 5 parameters; 4 dof of seed noise
    assert lof["dof"] == [1, 4] and lof["F"] > 0 and 0 <= lof["p_value"] <= 1
    # per budget: the smallest budget's three pairs (fitted there) and the held-out pair (no fitted points)
    small, held = sn["by_budget"]
    assert (small["budget"], small["dof"], held["budget"], held["dof"]) == (1e9, 3, 6e9, 1)
    assert held["sd"] == pytest.approx(he["own_sd"]) and held["fit_residual_rms"] is None
    small_pairs = [p for p, r in zip(pairs, reps, strict=True) if r["budget"] == 1e9]
    assert small["sd"] == pytest.approx((sum((a - b) ** 2 / 2 for a, b in small_pairs) / 3) ** 0.5)
    assert small["fit_residual_rms"] > 0
    # Approach 2's bootstrap would redraw each budget's losses with its seed sd: 1e9 its own, 3e9 the pooled
    assert report_mod._noise_by_budget(sn, _rows_of(runs, "isoflop")) == {
        1e9: (small["sd"], "budget"), 3e9: (sn["pooled_sd"], "pooled")}
    # law-form backtest: one fold (fit 1e9 + 3e9, predict the held-out 6e9); Chinchilla's fold is the
    # headline fit, so its error is the held-out row's; Farseer (9 parameters, 6 points) is skipped, unranked
    lf = g["law_forms"]
    assert "error" not in lf, lf
    assert lf["key"] == "budget" and lf["keys"] == [1e9, 3e9, 6e9] and lf["common_test_keys"] == [6e9]
    (cf,) = lf["forms"]["chinchilla"]["folds"]
    assert (cf["train_keys"], cf["n_train"], cf["n_test"]) == ([1e9, 3e9], 6, 1)
    assert cf["mean_bias"] == pytest.approx(h["relative_error"], rel=1e-6)
    assert lf["forms"]["farseer"]["folds"][0]["skipped"] == "6 training points for 9 parameters"
    assert sorted(lf["ranking"]) == ["chinchilla", "kaplan"]
    ex = g["extrapolation"]
    # each form's extrapolation: Chinchilla's is the headline one; Farseer cannot be fitted on 6 points. This
    # toy's runs are far below 20 tokens per parameter, so the smallest size wins every budget and the fitted
    # laws have no interior optimum in N: both say so (the positive path: the test after this one)
    fx = lf["extrapolation"]
    assert ex["error"].startswith("ValueError: no interior optimum over N") and fx["chinchilla"] == ex
    assert fx["kaplan"]["error"].startswith("ValueError: no interior optimum over N")
    assert fx["farseer"] == {"error": "ValueError: 6 isoFLOP points for 9 parameters"}
    assert "loss_vs_training_flops" in on_disk["pareto"]
    front = on_disk["pareto"]["loss_vs_training_flops"]
    losses = [p["loss"] for p in front]
    assert losses == sorted(losses, reverse=True)  # more compute on the frontier -> lower loss
    md = (out / "report.md").read_text()
    # this toy fit puts E on its floor (stored as 1e-300): the report prints 0 and says why
    assert ch["at_bounds"] == ["E"] and ch["params"]["E"] < 1e-100
    assert "fitted E = 0 (at its lower bound" in md and "1e-300" not in md
    assert "Held-out runs" in md and f"{h['relative_error']:+.2%}" in md
    # this toy's 50k-token corpus is shorter than its longest runs: the report says so
    (note,) = [n for n in on_disk["notes"] if "epochs" in n]
    assert note.startswith("3 of 11 finished runs trained on more tokens than their train split")
    assert note in md
    assert "Run-to-run noise" in md and "Lack-of-fit F test" in md
    assert "Which law form extrapolates" in md and "What each form, fitted on the isoFLOP runs" in md
    assert f"{abs(cf['mean_bias']):.2%} ({cf['mean_bias']:+.2%})" in md
    assert f"{he['in_sd']:+.1f} pooled seed sd; against its own seeds' sd" in md
    assert f"{he['in_own_sd']:+.1f} sd." in md
    for f in on_disk["figures"]:
        assert (out / f).stat().st_size > 1000
    assert any("isoflop" in f for f in on_disk["figures"])

    # re-run: nothing is trained again (the trainer would raise), the fits are redone
    import experiments.trainer as trainer

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    again = study.run_study(spec, out, workers=1, executor="sequential")
    assert [r["status"] for r in again["runs"]] == ["done"] * 11
    assert again["groups"]["dense-adamw"]["chinchilla"]["params"] == pytest.approx(ch["params"])
    assert "11/11 done (11 reused)" in capsys.readouterr().out

    # The report says why, rather than showing a number or an empty table: a WSD block without a fit still
    # shows its pairs, and a held-out run that is gone is named with its status.
    from experiments.report import _wsd_block
    from experiments.report_text import render_markdown

    w = _wsd_block(dataclasses.replace(spec, n_bootstrap=4), _four_wsd_branches_and_their_cosine_twins(),
                   "g", [], {})
    md = render_markdown({**on_disk, "groups": {"dense-adamw": {**g, "wsd": w}}})
    assert "fit not available (" in md and "over 4 pairs: mean -0.0100 nats" in md
    # Hand-edited summaries: a boolean loss (read as 1.0 before) and a NaN one (shown as "partial", which a
    # re-run could not fix) are failed runs with the reason; the held-out run's summary is deleted.
    iso = [r for r in runs if r["kind"] == "isoflop"]
    for r, bad in ((iso[0], True), (iso[1], float("nan"))):
        f = out / "runs" / r["run_id"] / "summary.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "final_eval_loss": bad}))
    (out / "runs" / held_run["run_id"] / "summary.json").unlink()
    edited = study.run_study(spec, out, fit_only=True)
    by_name = {r["name"]: r for r in edited["runs"]}
    assert by_name[iso[0]["name"]]["status"] == "failed"
    assert by_name[iso[0]["name"]]["error"] == "summary.json has final_eval_loss=True, not a finite number"
    assert by_name[iso[1]["name"]]["error"] == "summary.json has final_eval_loss=nan, not a finite number"
    assert edited["groups"]["dense-adamw"]["n_fit_points"] == 4
    md = (out / "report.md").read_text()
    assert "**Held-out runs**: not predicted (ValueError: 4 finished runs are too few" in md
    # with a fit but no finished held-out run, the empty table names the run and its status
    gone = [{**r, "status": "pending"} if r["kind"] == "heldout" else r for r in on_disk["runs"]]
    md = render_markdown({**on_disk, "runs": gone, "groups": {"dense-adamw": {**g, "heldout": []}}})
    assert f"| no finished held-out run ({held_run['name']}: pending) |" in md


def test_validate_report_names_problems():
    with pytest.raises(ValueError, match="missing key 'groups'"):
        validate_report({"schema_version": REPORT_SCHEMA_VERSION})
    bad = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "preset": "x",
        "description": "",
        "notes": [],
        "corpus": {},
        "compute": {},
        "runs": [{"name": "a"}],
        "lr_rules": {},
        "groups": {"g": {"chinchilla": {"params": {}}}},
        "pareto": {},
        "comparisons": {},
        "figures": [],
    }
    with pytest.raises(ValueError) as e:
        validate_report(bad)
    msg = str(e.value)
    assert "runs[0] misses" in msg and "groups['g'] misses" in msg and "misses 'alpha'" in msg


def test_wsd_branch_equals_wsd_run_from_scratch(tmp_path):
    """A cool-down branch resumed from the constant-lr stable segment reproduces the same WSD run trained
    from scratch (the claim that makes WSD compute reuse exact), and counts only its own steps."""
    from experiments import executors
    from experiments.hparam_rules import BatchRule, LRRule
    from experiments.sweep import Rules, plan_wsd, resolve, run_id

    spec = _micro_spec()
    g = spec.groups[0]
    base = dataclasses.replace(g.base, trainer=dataclasses.replace(g.base.trainer, eval_steps=1))
    m = g.shape.candidates(base.model)[0]
    rules = Rules(lr=LRRule(3e-3), batch=BatchRule(coef=4 * 64, min_batch=4, max_batch=4, min_steps=1))
    fpt = m.flops_per_token(base.data.seq_len)["training"]
    runs = plan_wsd(base, [m], [fpt * 20 * 4 * 64], rules, decay_fraction=0.2)
    stable, branch = runs
    assert (stable.steps, branch.steps, branch.parent["step"]) == (16, 20, 16)
    res = executors.run_sequential(runs, tmp_path / "runs")
    assert [r["status"] for r in res] == ["done", "done"]
    log = (tmp_path / "runs" / branch.run_id / "train.log").read_text()
    assert "resumed from checkpoint at step 16" in log
    scratch = dataclasses.replace(branch, name="scratch", parent=None)
    (scratch,) = resolve([scratch])
    # the same config, but a run from scratch is not one resumed from a checkpoint: its own directory
    assert run_id(scratch.config) == run_id(branch.config) and scratch.run_id != branch.run_id
    from experiments.trainer import train

    s = train(
        scratch.experiment,
        tmp_path / "scratch",
        devices=executors._devices(scratch.experiment),
        log=lambda _: None,
    )
    assert res[1]["summary"]["final_eval_loss"] == pytest.approx(s["final_eval_loss"], rel=1e-5)
    assert branch.incremental_flops == pytest.approx(branch.predicted_flops * 4 / 20)


def test_wsd_branches_are_paired_with_cosine_runs_of_the_same_model_and_tokens():
    from experiments.report import _wsd_cosine_pairs

    def row(name, n, d, loss):
        return {"name": name, "params": n, "tokens": d, "final_eval_loss": loss}

    branches = [row("b1", 100, 1000, 2.0), row("b2", 100, 5000, 1.5), row("b3", 300, 1000, 3.0)]
    cosine = [row("c1", 100, 1010, 2.5), row("c2", 100, 5200, 9.0), row("c3", 200, 1000, 9.0)]
    out = _wsd_cosine_pairs(branches, cosine)
    # b1 ~ c1 (1% apart in D); b2 has no twin within 2% (c2 is 4% off); b3 has no run of its size
    assert [(r["wsd"], r["cosine"]) for r in out["rows"]] == [("b1", "c1")]
    assert out["n"] == 1 and out["mean_difference"] == pytest.approx(-0.5)
    assert out["sd_difference"] is None and out["max_abs_difference"] == pytest.approx(0.5)
    assert _wsd_cosine_pairs(branches, [])["n"] == 0


def _four_wsd_branches_and_their_cosine_twins():
    def row(name, kind, n, d, loss):
        return {"name": name, "kind": kind, "group": "g", "status": "done", "fit": True, "params": n,
                "tokens": d, "final_eval_loss": loss}

    rr = [row(f"b{i}", "wsd_branch", n, d, loss) for i, (n, d, loss) in
          enumerate([(100, 1000, 2.0), (100, 3000, 1.8), (300, 1000, 1.9), (300, 3000, 1.6)])]
    return rr + [row(f"c{i}", "isoflop", r["params"], r["tokens"], r["final_eval_loss"] + 0.01)
                 for i, r in enumerate(rr)]


def test_wsd_pairs_are_reported_when_too_few_branches_finished_for_a_fit():
    """The pairwise WSD-vs-cosine comparison needs no fit; with 4 finished branches (5-parameter law) it used
    to vanish with the fit's error. gpu-quick plans 6 branches, so one failed branch did that there. (The
    markdown of such a block: test_study_end_to_end_and_rerun.)"""
    from experiments.report import _wsd_block

    spec = dataclasses.replace(_micro_spec(), n_bootstrap=4)
    w = _wsd_block(spec, _four_wsd_branches_and_their_cosine_twins(), "g", [], {})
    assert w["n_points"] == 4 and "error" in w["chinchilla"] and w["heldout"] == []
    assert w["pairs"]["n"] == 4 and w["pairs"]["mean_difference"] == pytest.approx(-0.01)


def test_seed_noise_pools_within_configuration_variance():
    from experiments.report import seed_noise

    groups = [[1.0, 1.2, 1.4], [2.0, 2.1], [3.0]]  # the single-seed configuration adds nothing
    sd, dof = seed_noise(groups)
    # sum of squares 0.08 + 0.005 over 2 + 1 degrees of freedom
    assert dof == 3 and sd == pytest.approx((0.085 / 3) ** 0.5)
    with pytest.raises(ValueError, match="two finished seeds"):
        seed_noise([[1.0], [2.0]])


def test_replicate_budgets_must_be_study_budgets(tmp_path):
    from experiments.config import ConfigError

    spec = dataclasses.replace(_micro_spec(), replicate_budgets=(5e9,))
    with pytest.raises(ConfigError, match=r"replicate_budgets \[5000000000.0\]"):
        study.plan_main_stage(spec, tmp_path, {})
    spec = dataclasses.replace(_micro_spec(), replicate_middle_budgets=(7e9,))
    with pytest.raises(ConfigError, match=r"replicate_middle_budgets \[7000000000.0\]"):
        study.plan_main_stage(spec, tmp_path, {})


def test_replicate_middle_budgets_replicate_one_run_per_curve(tmp_path):
    """At a "middle" budget only the curve's middle size (in log N) is replicated, once per seed."""
    import math

    spec = dataclasses.replace(_micro_spec(), replicate_budgets=(1e9,), replicate_middle_budgets=(3e9,),
                               replicate_seeds=(1, 2))
    runs = study.plan_main_stage(spec, tmp_path, {})
    reps = [r for r in runs if r.kind == "seed_replicate"]
    curve = sorted((r for r in runs if r.kind == "isoflop" and r.budget == 3e9), key=lambda r: r.params)
    assert len(curve) == 3
    at_3e9 = [r for r in reps if r.budget == 3e9]
    assert sorted(r.name for r in at_3e9) == [f"{curve[1].name}-seed1", f"{curve[1].name}-seed2"]
    logs = [math.log(r.params) for r in curve]
    assert abs(logs[1] - sum(logs) / 3) == min(abs(x - sum(logs) / 3) for x in logs)
    assert len([r for r in reps if r.budget == 1e9]) == 3 * 2  # "all sizes" where replicate_budgets says so
    assert all(not r.fit for r in reps) and {r.experiment.seed for r in at_3e9} == {1, 2}


def _law_rows(E, A, B, alpha, beta, seed):
    """isoFLOP-like points of a Chinchilla law with 1% multiplicative noise (C = 6 N D)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for C in (1e15, 3e15, 1e16, 3e16):
        for N in np.geomspace(2e6, 6e7, 6):
            D = C / (6 * N)
            loss = (E + A / N**alpha + B / D**beta) * np.exp(0.01 * rng.normal())
            rows.append({"params": float(N), "tokens": float(D), "flops": C, "final_eval_loss": float(loss)})
    return rows


def test_compute_multiplier_has_a_bootstrap_ci_that_separates_a_better_group(capsys, tmp_path):
    import numpy as np

    from experiments.compare import comparisons, compute_to_target
    from experiments.report import fit_chinchilla, print_summary

    true = dict(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.36)
    groups = {}
    for i, (g, over) in enumerate((("dense-adamw", {}), ("dense-muon", {"B": 1000.0}), ("dense-same", {}))):
        # independent noise and bootstrap per group, as the report does
        res, boot = fit_chinchilla(_law_rows(**(true | over), seed=i), n_bootstrap=60, seed=i)
        groups[g] = {"_fit": (res, boot, None), "_fpt": lambda n: 6.0 * np.asarray(n, np.float64)}
    spec = dataclasses.replace(_micro_spec(), budgets=(1e15, 3e16), target_loss=None)
    cmp_ = comparisons(groups, spec)
    ci, mult = cmp_["multiplier_ci"]["ci"], cmp_["multipliers"]
    assert cmp_["reference_group"] == "dense-adamw" and ci["dense-adamw"] == [1.0, 1.0]
    # halving B (each token worth more) reaches the target with less compute, clearly beyond the noise
    assert ci["dense-muon"][1] < 1.0 and ci["dense-muon"][0] <= mult["dense-muon"] <= ci["dense-muon"][1]
    # the same law as the reference: a multiplier near 1, and a CI around 1
    assert mult["dense-same"] == pytest.approx(1.0, abs=0.3)
    assert ci["dense-same"][0] < 1.0 < ci["dense-same"][1]
    # the printed summary carries each multiplier with its interval
    report = {"preset": "x", "corpus": {"entropy_rate": None}, "groups": {}, "comparisons": cmp_}
    print_summary(report, tmp_path)
    printed = capsys.readouterr().out
    lo, hi = ci["dense-muon"]
    assert f"[compare] dense-muon vs dense-adamw: compute multiplier {mult['dense-muon']:.3f} " \
           f"(95% CI [{lo:.3g}, {hi:.3g}])" in printed
    # the interpolation behind the multipliers
    C = np.array([1.0, 10.0, 100.0])
    assert compute_to_target(np.array([3.0, 2.0, 1.0]), C, 1.5) == pytest.approx(10 ** 1.5)
    assert np.isnan(compute_to_target(np.array([3.0, 2.0, 1.5]), C, 1.0))


def test_matched_budget_gaps_compare_best_runs_in_seed_sd():
    import numpy as np

    from experiments.compare import matched_budget_gaps
    from experiments.report_text import _gap_text

    def run(g, c, loss, kind="isoflop", fit=True):
        return {"group": g, "kind": kind, "budget": c, "final_eval_loss": loss, "status": "done", "fit": fit}

    rr = [run("a", 1e10, 3.0), run("a", 1e10, 2.9), run("a", 1e11, 2.5),
          run("b", 1e10, 2.8), run("b", 1e10, 2.95), run("b", 1e11, 2.6),
          run("b", 1e11, 2.0, kind="seed_replicate", fit=False)]  # not an isoFLOP point: ignored
    groups = {"a": {"seed_noise": {"pooled_sd": 0.03}}, "b": {"seed_noise": {"pooled_sd": 0.04}},
              "c": {"seed_noise": {"error": "no replicates"}}}
    gaps = matched_budget_gaps(rr, groups, "a")
    assert [(g["budget"], round(g["gap"], 6)) for g in gaps["b"]] == [(1e10, -0.1), (1e11, 0.1)]
    assert gaps["b"][0]["gap_in_sd"] == pytest.approx(-0.1 / 0.05)
    assert gaps["b"][0]["sd_source"] == "pooled"
    assert gaps["c"] == []  # no runs of its own; and without seed noise no sd units
    # where both groups have replicates at a budget, that budget's sd is used (noise shrinks with budget)
    groups["a"]["seed_noise"]["by_budget"] = [{"budget": 1e10, "sd": 0.03, "dof": 3},
                                              {"budget": 1e11, "sd": 0.003, "dof": 2}]
    groups["b"]["seed_noise"]["by_budget"] = [{"budget": 1e11, "sd": 0.004, "dof": 2}]
    g10, g11 = matched_budget_gaps(rr, groups, "a")["b"]
    assert g11["sd_source"] == "budget" and g11["gap_in_sd"] == pytest.approx(0.1 / 0.005)
    assert g10["sd_source"] == "pooled" and g10["gap_in_sd"] == pytest.approx(-0.1 / np.hypot(0.03, 0.04))
    assert _gap_text(g11) == "+0.100 (+20.0 sd)" and _gap_text(g10).endswith("sd*)")


def test_empirical_multipliers_interpolate_best_runs_with_seed_noise_cis():
    from experiments.compare import empirical_multipliers
    from experiments.report_text import _empirical_text

    def run(g, c, loss):
        return {"group": g, "kind": "isoflop", "budget": c, "final_eval_loss": loss, "status": "done",
                "fit": True}

    rr = [run("ref", 1e10, 3.0), run("ref", 1e10, 3.1), run("ref", 1e11, 2.5),
          run("b", 1e10, 2.8), run("b", 1e11, 2.2),   # reaches 2.5 halfway (in log C) from 1e10 to 1e11
          run("c", 1e10, 2.9), run("c", 1e11, 2.6),   # never reaches 2.5 within the sweep
          run("d", 1e10, 2.4), run("d", 1e11, 2.3)]   # already below 2.5 at the smallest budget
    quiet = {"seed_noise": {"pooled_sd": 1e-9}}
    groups = {g: quiet for g in ("ref", "b", "c", "d")}
    e = empirical_multipliers(rr, groups, "ref")
    assert e["b"]["kind"] == "interpolated" and e["b"]["multiplier"] == pytest.approx(10 ** -0.5)
    assert e["b"]["target_loss"] == 2.5 and e["b"]["budget"] == 1e11
    assert e["b"]["ci"] == pytest.approx([10 ** -0.5] * 2, rel=1e-6) and e["b"]["p_reached"] == 1.0
    assert e["c"]["kind"] == "not_reached" and e["c"]["multiplier"] is None and e["c"]["p_reached"] == 0.0
    assert e["d"]["kind"] == "at_most" and e["d"]["multiplier"] == pytest.approx(0.1)
    assert _empirical_text(e["d"]).startswith("<= 0.1") and "nor in any" in _empirical_text(e["c"])
    rare = {**e["c"], "ci": [None, None], "p_reached": 0.02}
    assert _empirical_text(rare) == (
        "> 1 (target not reached in its runs); reached in only 2% of 2000 seed-noise draws")
    # noise widens the interval around the point; each budget's own sd is used where replicated; reproducible
    noisy = {"seed_noise": {"pooled_sd": 0.5, "by_budget": [{"budget": 1e11, "sd": 0.05, "dof": 2}]}}
    groups = {"ref": noisy, "b": noisy, "c": quiet, "d": quiet}
    e1, e2 = empirical_multipliers(rr, groups, "ref"), empirical_multipliers(rr, groups, "ref")
    lo, hi = e1["b"]["ci"]
    # (the 1e11 sd, from 2 dof, is redrawn too: in its upper tail a few draws miss the target)
    assert lo < 10 ** -0.5 < hi and e1["b"]["ci"] == e2["b"]["ci"] and 0.95 < e1["b"]["p_reached"] < 1
    # with sd 0.5 at 1e10 about a quarter of the draws are below the target there: the lower end is that
    # budget over the largest, a bound (the interpolation never extrapolates)
    assert lo == pytest.approx(0.1)
    no_noise = {**groups, "b": {"seed_noise": {"error": "no replicates"}}}
    assert "ci" not in empirical_multipliers(rr, no_noise, "ref")["b"]


def test_comparisons_keep_what_they_can_when_a_group_has_no_law_or_misses_a_budget():
    """One group without a compute-optimal curve (an exponent at its bound) or without a law fit used to
    remove the whole comparison block, law-free checks included; the gap table put a group's values under
    another group's budgets; best_at_max_budget named the best law at 1000x the largest budget; a group
    whose largest-budget runs failed was scored against an easier target; a law multiplier past the grid's
    first point was printed as exact."""
    import types

    import numpy as np

    from experiments.compare import comparisons
    from experiments.report_text import _comparisons_markdown, _empirical_text
    from scaling.laws import get_law

    law, ref_p = get_law("chinchilla"), dict(E=1.8, A=30.0, B=30.0, alpha=0.34, beta=0.28)

    def scaled(p, k):  # a law whose L*(C) is ref's L*(C / k): k times the compute for any loss
        return {**p, "A": p["A"] * k ** (p["alpha"] / 2), "B": p["B"] * k ** (p["beta"] / 2)}

    def group(p):
        return {"_fit": (types.SimpleNamespace(law=law, params=p), None, None),
                "_fpt": lambda n: 6.0 * np.asarray(n, np.float64),
                "seed_noise": {"pooled_sd": 1e-9}}

    def run(g, c, loss):
        return {"group": g, "kind": "isoflop", "budget": c, "final_eval_loss": loss, "status": "done",
                "fit": True}

    budgets = (3e10, 1e11, 3e11)
    groups = {"dense-adamw": group(ref_p), "dense-muon": group(scaled(ref_p, 0.5)),
              "moe": group({**ref_p, "alpha": 1e-300}),                    # no interior optimum anywhere
              "late": group(dict(E=1.4, A=42.0, B=42.0, alpha=0.34, beta=0.28)),  # best only far beyond
              "fast": group(scaled(ref_p, 0.002)),                         # past the grid's first point
              "mor": {"chinchilla": {"error": "ValueError: 4 finished runs are too few"},
                      "seed_noise": {"pooled_sd": 1e-9}}}
    rr = [run(g, c, loss) for g in ("dense-adamw", "moe")
          for c, loss in zip(budgets, (3.7, 3.4, 3.15), strict=True)]
    rr += [run("mor", 3e10, 3.6), run("mor", 1e11, 3.3)]  # its 3e11 runs failed
    spec = types.SimpleNamespace(budgets=budgets, target_loss=None)
    cmp_ = comparisons(groups, spec, rr)
    assert cmp_["multipliers"]["dense-muon"] == pytest.approx(0.5, rel=1e-3)
    assert cmp_["multiplier_kinds"]["dense-muon"] == "interpolated"
    assert cmp_["multiplier_kinds"]["fast"] == "at_most" and cmp_["multipliers"]["fast"] > 0.002
    assert set(cmp_["law_errors"]) == {"moe", "mor"}
    assert cmp_["law_errors"]["moe"].startswith("no compute-optimal curve")
    assert "4 finished runs are too few" in cmp_["law_errors"]["mor"]
    # the law frontier at the sweep's largest budget: "late" leads only far beyond it
    two = comparisons({g: groups[g] for g in ("dense-adamw", "late")}, spec, [])["law_frontier"]
    assert two["best_at_max_budget"] == "dense-adamw"
    assert [x["to"] for x in two["crossovers"]] == ["late"] and two["crossovers"][0]["compute"] > 3e11
    # law-free parts for every group with runs, the law-less ones included
    gaps = cmp_["matched_budget_gaps"]
    assert [r["budget"] for r in gaps["moe"]] == list(budgets) and [r["budget"] for r in gaps["mor"]] == [
        3e10, 1e11]
    emp = cmp_["empirical_multipliers"]
    assert emp["moe"]["multiplier"] == pytest.approx(1.0)
    # mor (0.1 nats better at both budgets it has) must reach ref's 3e11 loss, 3.15: it never gets there
    assert emp["mor"]["target_loss"] == 3.15 and emp["mor"]["budget"] == 3e11
    assert emp["mor"]["kind"] == "not_reached"
    assert _empirical_text(emp["mor"]).startswith("> 0.333 (target not reached in its runs)")
    md = "\n".join(_comparisons_markdown(cmp_))
    assert "| moe | – | – | left out: no compute-optimal curve" in md
    assert "| fast | " in md and "<= " in md.split("| fast | ")[1].split("\n")[0]
    # one column per budget of any group, each value under its own budget
    assert "| group | C = 3e+10 | C = 1e+11 | C = 3e+11 |" in md
    assert "| mor | -0.100 (-70710678.1 sd*) | -0.100 (-70710678.1 sd*) | – |" in md


def test_cli_interrupt_names_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C or a time limit's SIGINT (experiments/gpu_session.sh) ends the command with status 130 and a
    message naming the study directory, not a traceback."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    assert study.main(["--preset", "cpu-micro", "--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the finished runs in {tmp_path / 's'} are kept" in err
    assert "run the same command again" in err


def test_report_marks_unconverged_backtest_folds_and_extrapolations():
    from experiments.report_text import _law_forms_markdown

    def fold(are, converged):
        return {"test_key": 1e11, "mean_are": are, "mean_bias": -are, "skipped": None, "converged": converged}

    lf = {
        "forms": {
            "chinchilla": {"n_params": 5, "in_sample_rms": 0.01, "mean_are_common": 0.02,
                           "folds": [fold(0.02, True)]},
            "farseer": {"n_params": 9, "in_sample_rms": 0.01, "mean_are_common": 0.01,
                        "folds": [fold(0.01, False)]},
        },
        "ranking": ["farseer", "chinchilla"],
        "common_test_keys": [1e11],
        "extrapolation": {
            "chinchilla": [{"multiple": 10.0, "N": 1e5, "loss": 2.2, "below_entropy": False,
                            "converged": True}],
            "farseer": [{"multiple": 10.0, "N": 2e5, "loss": 1.9, "below_entropy": True,
                         "converged": False}],
        },
    }
    md = "\n".join(_law_forms_markdown(lf))
    assert "| farseer | 9 | 0.01 | 1.00% (-1.00%) ! |" in md
    assert "| chinchilla | 5 | 0.01 | 2.00% (-2.00%) |" in md
    assert "! = that fold's fit did not converge" in md
    assert "| farseer (fit did not converge) | 2e+05 | 1.9 † |" in md and "| chinchilla | 1e+05 | 2.2 |" in md
    lf["extrapolation"]["farseer"][0].update(loss=0.0, converged=True)
    md = "\n".join(_law_forms_markdown(lf))
    assert "| farseer (degenerate fit: its loss vanishes) | 2e+05 | 0 † |" in md
    lf["forms"]["farseer"]["folds"] = [fold(0.01, True)]
    assert "did not converge even" not in "\n".join(_law_forms_markdown(lf))
    # a form whose fit has no compute-optimal allocation (its optimum runs to D -> 1) says so in words
    lf["extrapolation"]["farseer"] = {"error": "ValueError: no interior optimum over N in (100.0, 1e+16) ..."}
    md = "\n".join(_law_forms_markdown(lf))
    assert "| farseer | no compute-optimal allocation: along the isoFLOP curve" in md


def _rows_of(runs: list[dict], kind: str) -> list[dict]:
    return [r for r in runs if r["kind"] == kind and r["fit"]]


def test_approach2_in_the_report_uses_the_measured_seed_noise():
    """With seed replicates the report's Approach 2 interval redraws every loss with its budget's measured
    seed sd (a budget's own, else the pooled one): same point estimates as without, an interval that covers
    the true exponent, and none at all when the measured noise is zero."""
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e17, 1e18, 1e19):
        # the exact optimum of this law under C = 6ND (Hoffmann et al. eq. 4)
        n_star = (0.34 * 400 / (0.28 * 410)) ** (1 / 0.62) * (c / 6) ** (0.28 / 0.62)
        for n in n_star * np.array([0.3, 0.7, 1.6, 3.5]):
            d = c / (6 * n)
            loss = 1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.003 * rng.standard_normal()
            rows.append({"budget": c, "params": n, "tokens": d, "flops": c, "final_eval_loss": loss})
    a_true = 0.28 / (0.34 + 0.28)  # Chinchilla: N* ~ C^(beta / (alpha + beta))
    fpt = lambda n: 6.0 * np.asarray(n)  # noqa: E731
    points = report_mod._approach2(rows, fpt, 200)
    noise = {1e17: (0.003, "budget"), 1e18: (0.003, "pooled"), 1e19: (0.003, "budget")}
    seeded = report_mod._approach2(rows, fpt, 200, noise)
    assert (points["bootstrap"], points["noise_sd"], seeded["bootstrap"]) == ("points", None, "seed_noise")
    assert seeded["a"] == points["a"] and seeded["rejected"] == []
    assert seeded["a_ci"][0] < a_true < seeded["a_ci"][1]
    assert seeded["noise_sd"][1] == {"budget": 1e18, "sd": 0.003, "source": "pooled"}
    silent = report_mod._approach2(rows, fpt, 50, {c: (0.0, "budget") for c in noise})
    assert silent["a_ci"] == pytest.approx([silent["a"]] * 2, abs=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--dry", "--dry-steps", "0"], "--dry-steps must be >= 1, got 0"),
        (["--slurm", "mem_gb=8"], "--slurm sets submitit parameters of --executor slurm"),
        (["--dry-steps", "2"], "--dry-steps sets the length of a --dry rehearsal; add --dry"),
        # --retry clears the run's directory; with --fit-only it deleted a finished run and trained nothing
        (["--retry", "some-run", "--fit-only"], "--retry clears a run so that it trains again"),
    ],
)
def test_cli_refuses_bad_arguments_before_doing_anything(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(out), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_a_broken_hand_edited_plan(tmp_path, capsys):
    (tmp_path / study.PLAN_FILE).write_text('{"name": "a", "kind": "isoflop", "config": {}, "fit": "no"}\n')
    assert study.main(["--preset", "cpu-micro", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert f"config error: {tmp_path / study.PLAN_FILE}:1: fit must be true or false, got 'no'" in err


def test_train_limit_stops_starting_runs_and_still_reports(tmp_path, monkeypatch, capsys):
    """--train-limit-s: a fixed time budget (a lent GPU) still ends with a report. Each run here "takes"
    10 s of a fake clock: with a 25 s limit runs start at 0, 10 and 20 s, the fourth would start at 30 s."""
    import time
    import types

    from experiments import executors

    clock = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time, perf_counter=time.perf_counter)
    monkeypatch.setattr(executors, "time", fake)
    monkeypatch.setattr(study, "time", fake)
    real_run_one = executors.run_one

    def run_one_10s(*args, **kwargs):
        clock[0] += 10.0
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(executors, "run_one", run_one_10s)
    report = study.run_study(_micro_spec(), tmp_path, workers=1, executor="sequential", train_limit_s=25)
    statuses = [r["status"] for r in report["runs"]]
    assert statuses.count("done") == 3 and statuses.count("pending") == len(statuses) - 3
    assert "time limit: 8 run(s) not started" in capsys.readouterr().out
    assert report["timing"]["train_limit_s"] == 25
    assert any(n.startswith("--train-limit-s 25: 8 of 11 runs had not finished") for n in report["notes"])
    assert "note: --train-limit-s 25" in (tmp_path / "report.md").read_text()


def test_train_limit_during_the_lr_sweep_writes_no_plan(tmp_path, monkeypatch):
    """The main stage's learning rates come from the rule fitted on the LR sweep: a time limit that stops the
    sweep part-way must not freeze a rule fitted on some of its cells into plan.jsonl."""
    monkeypatch.setattr(study, "_prepare_corpus", lambda runs, out: None)
    monkeypatch.setattr(study, "execute", lambda runs, runs_dir, **kw: [])  # the limit passed at once
    with pytest.raises(SystemExit, match="--train-limit-s stopped the LR sweep before 8 of its runs"):
        study.run_study(get_study_preset("cpu-families"), tmp_path, train_limit_s=1.0)
    assert not (tmp_path / study.PLAN_FILE).exists() and not (tmp_path / study.LR_RULES_FILE).exists()


def test_a_study_directory_refuses_another_preset(tmp_path):
    """Another preset on a study's directory used to reuse its plan and runs and rewrite report.md under the
    new preset's name, extrapolating from its budgets."""
    spec = _micro_spec()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))  # plans only
    assert json.loads((tmp_path / study.STUDY_FILE).read_text()) == {"preset": spec.name}
    other = dataclasses.replace(spec, name="cpu-tiny")
    with pytest.raises(SystemExit, match=f"holds the study '{spec.name}', not 'cpu-tiny'; give this one"):
        study.run_study(other, tmp_path, fit_only=True)
    assert not (tmp_path / "report.md").exists()


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "report.md"
    f.write_text("keep me")
    with pytest.raises(SystemExit):
        study.main(["--out", str(f)])
    assert "exists and is not a directory" in capsys.readouterr().err and f.read_text() == "keep me"


def test_empirical_multiplier_intervals_carry_the_uncertainty_of_few_seed_sd():
    """An sd from three seeds (2 dof) is itself uncertain: the law-free interval must be wider than with
    the same sd known almost exactly (1e6 dof), and the sd draws follow sigma^2 ~ dof sd^2 / chi2(dof)."""
    from experiments.compare import empirical_multipliers, sd_draws

    def run(g, c, loss):
        return {"group": g, "kind": "isoflop", "budget": c, "final_eval_loss": loss, "status": "done",
                "fit": True}

    rr = [run("ref", 1e10, 3.0), run("ref", 1e11, 2.5), run("b", 1e10, 2.8), run("b", 1e11, 2.2)]

    def width(dof):
        noise = {"seed_noise": {"pooled_sd": 0.04, "dof": dof, "by_budget": [
            {"budget": 1e10, "sd": 0.04, "dof": dof}, {"budget": 1e11, "sd": 0.04, "dof": dof}]}}
        lo, hi = empirical_multipliers(rr, {"ref": noise, "b": noise}, "ref")["b"]["ci"]
        return np.log(hi / lo)

    assert width(2) > 1.3 * width(10**6)
    rng = np.random.default_rng(0)
    s = sd_draws(rng, 0.04, 2, 200_000)
    # P(sigma > sd) = P(chi2_2 < 2) = 1 - exp(-1); the median of sigma is sd * sqrt(2 / ln 4)
    assert np.mean(s > 0.04) == pytest.approx(1 - np.exp(-1), abs=0.005)
    assert np.median(s) == pytest.approx(0.04 * np.sqrt(2 / np.log(4)), rel=0.01)
    assert np.all(sd_draws(rng, 0.04, None, 5) == 0.04)


def _edge_spec(extend_edges: int):
    """cpu-tiny's shapes (a ladder with sizes beyond each curve's edges), no LR sweep / WSD / replicates."""
    spec = get_study_preset("cpu-tiny")
    g = dataclasses.replace(spec.groups[0], lr_sweep_factors=())
    return dataclasses.replace(spec, groups=(g,), wsd_sizes=0, replicate_seeds=(), replicate_budgets=(),
                               extend_edges=extend_edges, downstream=False)


def _falling_at_smallest_budget(r):
    """Loss falls with N on the smallest budget's curve (N* beyond its largest size); U-shaped elsewhere."""
    if math.isclose(r.budget, 3e10):
        return 3.0 - 0.1 * math.log(r.params)
    return 2.5 + (math.log(r.params) - math.log(2e4)) ** 2


def test_plan_edge_extensions_extends_only_curves_with_an_edge_minimum(tmp_path):
    spec = _edge_spec(extend_edges=1)
    runs = study.plan_main_stage(spec, tmp_path, {})
    curve = [r for r in runs if r.kind == "isoflop" and r.budget == 3e10]
    extra = study.plan_edge_extensions(spec, tmp_path, runs, {}, _falling_at_smallest_budget)
    (ext,) = extra
    assert ext.name.endswith(study.EXTENSION_SUFFIX) and ext.kind == "isoflop" and ext.fit
    assert ext.budget == 3e10 and ext.params > max(r.params for r in curve)
    assert abs(ext.predicted_flops / 3e10 - 1) < 0.01  # an isoFLOP run like the others
    # at most extend_edges per curve; a second round may add one more beyond the first
    assert study.plan_edge_extensions(spec, tmp_path, runs + extra, {}, _falling_at_smallest_budget) == []
    two = _edge_spec(extend_edges=2)
    (ext2,) = study.plan_edge_extensions(two, tmp_path, runs + extra, {}, _falling_at_smallest_budget)
    assert ext2.params > ext.params
    # a curve with an unfinished (or failed) run is left alone; extend_edges=0 plans nothing
    unfinished = lambda r: None if r is curve[0] else _falling_at_smallest_budget(r)  # noqa: E731
    assert study.plan_edge_extensions(spec, tmp_path, runs, {}, unfinished) == []
    assert study.plan_edge_extensions(_edge_spec(0), tmp_path, runs, {}, _falling_at_smallest_budget) == []


def test_run_study_trains_edge_extensions_and_a_rerun_plans_none(tmp_path, monkeypatch):
    """The study loop: after the main stage, the extension is planned, appended to plan.jsonl and trained;
    the same command again finds it finished and adds nothing (training and the report are faked)."""
    from experiments import executors
    from experiments import report as report_mod

    trained: list[list[str]] = []

    def fake_execute(runs, runs_dir, **kw):
        trained.append([r.name for r in runs])
        for r in runs:
            d = executors.run_dir(runs_dir, r)
            d.mkdir(parents=True, exist_ok=True)
            (d / executors.SUMMARY_FILE).write_text(json.dumps({
                "config": r.config, "steps": r.steps, "final_eval_loss": _falling_at_smallest_budget(r)}))
        return [{"name": r.name, "status": "done"} for r in runs]

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "_prepare_corpus", lambda runs, out: None)
    monkeypatch.setattr(report_mod, "build_report", lambda spec, runs, runs_dir, **kw: {"n_runs": len(runs)})
    monkeypatch.setattr(report_mod, "write_report", lambda *a, **kw: None)
    monkeypatch.setattr(report_mod, "print_summary", lambda *a, **kw: None)
    spec = _edge_spec(extend_edges=1)
    study.run_study(spec, tmp_path, workers=1)
    assert len(trained) == 2 and len(trained[1]) == 1 and trained[1][0].endswith(study.EXTENSION_SUFFIX)
    plan = study.read_plan(tmp_path / study.PLAN_FILE)
    assert [r.name for r in plan][-1] == trained[1][0]
    trained.clear()
    study.run_study(spec, tmp_path, workers=1)
    assert len(trained) == 1 and len(trained[0]) == len(plan)  # all runs offered again (all finished)


def test_loss_frontier_compares_runs_at_their_planned_budget():
    """Runs of one budget spend it to within 1%; a run 1% cheaper but far worse must not join the frontier."""
    def run(name, budget, flops, loss):
        return {"name": name, "group": "g", "kind": "isoflop", "status": "done", "budget": budget,
                "flops": flops, "final_eval_loss": loss, "downstream": None, "flops_per_token": 1.0}

    rr = [run("a", 1e10, 0.99e10, 3.0), run("b", 1e10, 1.0e10, 2.5), run("c", 3e10, 2.98e10, 2.2),
          run("d", 3e10, 3.01e10, 2.6),
          # a WSD branch's budget is its realised FLOPs: it counts at the planned budget within 1%
          {**run("w", 2.995e10, 2.995e10, 2.3), "kind": "wsd_branch"}]
    front = report_mod._pareto(rr, None)["loss_vs_training_flops"]
    assert [(p["name"], p["budget"]) for p in front] == [("b", 1e10), ("c", 3e10)]
    rr[-1]["final_eval_loss"] = 2.1
    front = report_mod._pareto(rr, None)["loss_vs_training_flops"]
    assert [(p["name"], p["budget"]) for p in front] == [("b", 1e10), ("w", 3e10)]


def test_frontier_table_and_figure_draw_the_same_runs(tmp_path, monkeypatch):
    """Probes (LR sweep), replicates and WSD stable prefixes never join the frontier; grid and user runs do,
    in the report's table and in its figure alike."""
    def run(name, kind, loss):
        return {"name": name, "group": "g", "kind": kind, "status": "done", "budget": 1e10, "flops": 1e10,
                "final_eval_loss": loss, "downstream": None, "flops_per_token": 1.0}

    rr = [run("iso", "isoflop", 3.0), run("probe", "lr_sweep", 2.0), run("rep", "seed_replicate", 2.1),
          run("stable", "wsd_stable", 1.9), run("grid", "grid", 2.9), run("user", "user", 2.8)]
    assert [r["name"] for r in report_mod._frontier_runs(rr)] == ["iso", "grid", "user"]
    assert [p["name"] for p in report_mod._pareto(rr, None)["loss_vs_training_flops"]] == ["user"]
    import matplotlib.pyplot as plt

    from scaling import plots

    drawn = []

    def record(pts, *a, **kw):
        drawn.append([float(x) for x in np.asarray(pts)[:, 1]])
        return plt.figure()

    monkeypatch.setattr(plots, "plot_pareto", record)
    report_mod._figures({"runs": rr, "groups": {}, "pareto": report_mod._pareto(rr, None)}, tmp_path)
    assert drawn == [[3.0, 2.9, 2.8]]  # losses of iso, grid, user


def test_law_frontier_is_written_as_ranges_with_extrapolations_marked():
    from experiments.report_text import _law_frontier_text

    fr = {"crossovers": [{"compute": 1.8e10, "from": "muon", "to": "moe"},
                         {"compute": 1.4e11, "from": "moe", "to": "muon"}], "best_at_max_budget": "muon"}
    text = _law_frontier_text(fr, [3e10, 3e11])
    assert "muon below 1.8e+10 FLOPs; moe from 1.8e+10 to 1.4e+11; muon above 1.4e+11" in text
    assert "1 of the 2 crossovers lie outside the sweep's budgets" in text
    assert "outside" not in _law_frontier_text(fr, [1e10, 3e11])
    assert "lowest over the whole" in _law_frontier_text({"crossovers": [], "best_at_max_budget": "x"}, None)


def test_lr_rules_are_written_as_formulas():
    from experiments.report_text import _lr_rule_text

    rule = {"coef": 0.7328, "c_exp": -0.125, "n_exp": 0.0, "d_exp": 0.0, "source": "fitted from 2 cells"}
    assert _lr_rule_text(rule) == "lr = 0.7328 · C^-0.125 (fitted from 2 cells)"
    assert _lr_rule_text({"coef": 0.01, "n_exp": -0.2, "d_exp": 0.3}) == "lr = 0.01 · N^-0.2 · D^0.3"


def test_lack_of_fit_test_separates_misfit_from_noise():
    """F = residual mean square / pooled seed variance on (n - p, dof): residuals the size of the noise give
    a large p-value; residuals four times the noise (cpu-tiny's case) a tiny one; the F tail is scipy's."""
    from scipy import stats

    from experiments.report import lack_of_fit_test

    rng = np.random.default_rng(0)
    noise = rng.standard_normal(15) * 0.03
    ok = lack_of_fit_test(noise, 5, 0.03, 12)
    assert ok["dof"] == [10, 12] and ok["p_value"] > 0.05
    assert ok["F"] == pytest.approx(np.sum(noise**2) / 10 / 0.03**2)
    bad = lack_of_fit_test(4 * noise, 5, 0.03, 12)
    assert bad["F"] == pytest.approx(16 * ok["F"]) and bad["p_value"] < 1e-3
    assert bad["p_value"] == pytest.approx(stats.f.sf(bad["F"], 10, 12))
    assert lack_of_fit_test(noise[:5], 5, 0.03, 12) is None and lack_of_fit_test(noise, 5, 0.0, 12) is None


def test_each_law_forms_extrapolation_beside_the_headline_one():
    """The law-form block's extrapolations: Chinchilla's is the headline fit's own (same N*, loss), Kaplan's
    is fitted by the backtest; below-entropy losses flagged. (Farseer's error on too few points: the
    end-to-end test above.)"""
    from types import SimpleNamespace

    from scaling.laws import get_law

    hoffmann = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    rows = []
    for c in (1e18, 3e18, 1e19, 3e19):
        for n in np.sqrt(c / 120) * np.geomspace(0.3, 3, 4 if c < 3e19 else 1):
            d = c / (6 * n)
            loss = float(get_law("chinchilla").predict(hoffmann, N=n, D=d))
            rows.append({"budget": c, "params": n, "tokens": d, "flops": c, "final_eval_loss": loss})
    fit_rows, held_rows = rows[:-1], rows[-1:]
    spec = SimpleNamespace(law_forms=("chinchilla", "kaplan"), budgets=(1e18, 3e18, 1e19),
                           extrapolate=(10.0, 100.0))
    res, _ = report_mod.fit_chinchilla(fit_rows, 0)
    ex = report_mod._extrapolation(res, None, 1e19, spec.extrapolate, None)
    floor = (ex[0]["loss"] + ex[1]["loss"]) / 2  # an "entropy rate" between the 10x and 100x losses
    fx = report_mod._law_forms_block(spec, fit_rows, held_rows, None, res, entropy=floor)["extrapolation"]
    assert [(x["multiple"], x["N"], x["loss"]) for x in fx["chinchilla"]] == [
        (x["multiple"], x["N"], x["loss"]) for x in ex]
    assert ex[1]["C"] == pytest.approx(1e21) and all(x["N"] > 0 and x["D"] > 0 for x in ex)
    # noiseless Hoffmann data: the compute-optimal N* of the published law (G (C/6)^a, Hoffmann Eq. 4)
    G = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert ex[0]["N"] == pytest.approx(G * (1e20 / 6) ** (0.28 / 0.62), rel=0.02)
    assert [x["multiple"] for x in fx["kaplan"]] == [10.0, 100.0]
    assert all(x["below_entropy"] == (x["loss"] < floor) for x in fx["kaplan"] + fx["chinchilla"])
    assert [x["below_entropy"] for x in fx["chinchilla"]] == [False, True]


def test_downstream_fits_run_up_to_each_tasks_known_ceiling(tmp_path):
    """The report's accuracy sigmoids stop at the task's ceiling known from the source (an mc task's
    ceiling_accuracy, a gen task's source_pass_prob), not at 1: with the ceiling at 1 the mc task below was
    predicted at 0.97 two decades past the fit data, above what a perfect model reaches (0.765), and the gen
    task 3-7x too high."""
    from scipy.special import expit

    C = np.geomspace(1e15, 1e18, 8)
    held = 1e20
    mc = lambda c: 0.25 + (0.765 - 0.25) * expit(1.5 * (np.log(c) - np.log(1e17)))  # noqa: E731
    gen = lambda c: 6e-4 * expit(1.2 * (np.log(c) - np.log(1e17)))  # noqa: E731
    loss = lambda c: 2.0 + 3.0 * (c / 1e15) ** -0.2  # noqa: E731
    rows = []
    for i, c in enumerate([*C, held]):
        run = tmp_path / f"r{i}"
        run.mkdir()
        tasks = {
            "mc-k1-unigram": {"accuracy": mc(c), "chance": 0.25, "ceiling_accuracy": 0.765},
            "gen-k8": {"pass_prob_exact": gen(c), "source_pass_prob": 6e-4},
        }
        (run / "downstream.json").write_text(json.dumps({"tasks": tasks}))
        scores = {"mc-k1-unigram": mc(c), "gen-k8": gen(c), "mc-mean": mc(c)}
        rows.append({"run_id": run.name, "name": run.name, "flops": c, "final_eval_loss": loss(c),
                     "downstream": scores})
    block = report_mod._downstream_block(rows[:-1], rows[-1:], tmp_path, n_boot=0)
    out = block["tasks"]
    assert out["mc-k1-unigram"]["ceiling"] == 0.765 and out["mc-mean"]["ceiling"] == 0.765
    assert out["gen-k8"]["chance"] == 0.0 and out["gen-k8"]["ceiling"] == 6e-4
    assert all(out[t]["fit_compute"]["identified"] is True for t in out)  # each rises within the data
    for task, truth in (("mc-k1-unigram", mc(held)), ("mc-mean", mc(held)), ("gen-k8", gen(held))):
        h = out[task]["heldout"][0]
        assert h["predicted_sigmoid"] == pytest.approx(truth, rel=0.02), task
        assert h["predicted_two_step"] == pytest.approx(truth, rel=0.05), task
    # the held-out MAE: the mean over every task and both predictors of |predicted - actual|
    errs = [abs(h[f"predicted_{k}"] - h["actual"]) for t in out for h in out[t]["heldout"]
            for k in ("sigmoid", "two_step")]
    assert len(errs) == 6
    for t in out:
        for h in out[t]["heldout"]:
            for k in ("sigmoid", "two_step"):
                assert h[f"abs_error_{k}"] == pytest.approx(abs(h[f"predicted_{k}"] - h["actual"]))
    assert block["mean_abs_error"] == pytest.approx(sum(errs) / 6)


def test_report_notes_runs_that_repeated_their_data():
    rows = [{"name": "a", "epochs": 0.5}, {"name": "b", "epochs": 2.5}, {"name": "c", "epochs": 1.2},
            {"name": "d", "epochs": None}]
    (note,) = report_mod._repetition_note(rows)
    assert note.startswith("2 of 3 finished runs trained on more tokens") and "2.50 epochs, b" in note
    assert report_mod._repetition_note(rows[:1]) == []


def test_a_plan_from_an_earlier_preset_version_is_named(tmp_path):
    """A reused plan.jsonl keeps its runs as planned; when their corpus or validation settings differ from
    what the preset now plans (an older version of it), the study says so: edge extensions planned now would
    not be comparable, and a corpus of another size cannot share the study's data directory."""
    import copy

    spec = get_study_preset("cpu-micro")
    runs = study.plan_main_stage(spec, tmp_path, {})
    assert study._stale_plan_settings(spec, runs) == []
    old = []
    for r in runs:  # as the planner of the previous version wrote them: eval batch = the run's own batch
        cfg = copy.deepcopy(r.config)
        cfg["trainer"]["eval_batch_size"] = None
        old.append(dataclasses.replace(r, config=cfg))
    assert len({r.experiment.eval_batch_size for r in old}) > 1
    (line,) = study._stale_plan_settings(spec, old)
    assert line.startswith("was planned by an earlier version of preset 'cpu-micro' (group dense-adamw: "
                           "eval batch")
    assert "(now 16)" in line and "start a new --out" in line


def test_retry_trains_only_the_named_run_and_refuses_an_unplanned_directory(tmp_path, monkeypatch, capsys):
    """--retry NAME trains that run (a WSD branch: from its finished parent's checkpoint), not every
    unfinished run of the plan; on a directory with no plan yet it is refused before the LR sweep would
    train and freeze one."""
    import experiments.trainer as trainer
    from experiments import executors
    from experiments.sweep import Rules, plan_isoflop, plan_wsd, resolve

    with pytest.raises(SystemExit, match="--retry: .*plan.jsonl does not exist"):
        study.run_study(get_study_preset("cpu-families"), tmp_path / "fresh", retry=["x"])
    assert not (tmp_path / "fresh" / study.PLAN_FILE).exists()

    trained: list[str] = []

    def fake_train(cfg, workdir, devices=None, log=None):
        trained.append(workdir.name)
        s = {"steps": cfg.total_steps, "final_eval_loss": 3.0, "config": cfg.to_dict()}
        (workdir / "summary.json").write_text(json.dumps(s))
        (workdir / "checkpoints" / str(cfg.total_steps)).mkdir(parents=True, exist_ok=True)
        return s

    monkeypatch.setattr(trainer, "train", fake_train)
    spec = get_study_preset("cpu-micro")
    g = spec.groups[0]
    rules = Rules(lr=g.lr, batch=spec.batch, warmup_fraction=spec.warmup_fraction)
    chain = plan_wsd(g.base, [g.shape.candidates(g.base.model)[0]], spec.budgets, rules)
    runs = resolve(plan_isoflop(g.base, spec.budgets[:1], 2, rules, shape_rule=g.shape) + chain)
    runs_dir = tmp_path / "runs"
    executors.run_sequential(runs[:3], runs_dir)  # two isoFLOP runs and the chain's first stable segment
    branch = next(r for r in runs if r.parent is not None and r.parent["run"] == runs[2].name)
    trained.clear()
    retried = study._retry_runs(runs, [branch.name], runs_dir, tmp_path / "plan.jsonl")
    assert [r.name for r in retried] == [runs[2].name, branch.name]  # the finished parent is reused
    res = study.execute(retried, runs_dir, workers=1, post_run=None, executor="sequential")
    assert [r["status"] for r in res] == ["skipped", "done"] and trained == [branch.run_id]
    # the other unfinished runs of the plan were not trained
    assert all(executors.run_status(runs_dir, r) == "pending" for r in runs if r.name not in
               {x.name for x in runs[:3]} | {branch.name})
    assert f"cleared {runs_dir / branch.run_id}" not in capsys.readouterr().out  # it had no directory yet
    # a run directory another process is training in is not cleared
    d = runs_dir / runs[0].run_id
    import subprocess
    import sys

    from experiments.files import exclusive_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom experiments.files import exclusive_lock\n"
         f"with exclusive_lock({str(d / executors.RUN_LOCK)!r}, 'x'):\n"
         "    print('locked', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"--retry '{re.escape(runs[0].name)}': the run directory .* in use"
        with pytest.raises(SystemExit, match=busy):
            study._retry_runs(runs, [runs[0].name], runs_dir, tmp_path / "plan.jsonl")
        assert (d / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(d / executors.RUN_LOCK, "x"):
        pass  # released with the killed holder


def test_a_study_directory_takes_one_command_at_a_time(tmp_path):
    """Two study commands on one directory trained every run twice into the same run directories (one of
    them failed on the other's half-written checkpoint). The second is now refused, naming the first."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "study"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from experiments.files import exclusive_lock\n"
         f"with exclusive_lock({str(out / study.STUDY_LOCK)!r}, 'x'):\n"
         "    print('locked', flush=True)\n"
         "    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"the study directory {out} is in use by another process "
                                             rf"\(PID {holder.pid}\)"):
            study.run_study(_micro_spec(), out, fit_only=False, export_slurm=str(tmp_path / "s.sh"))
        assert not (out / study.PLAN_FILE).exists()  # refused before planning anything
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    # the kernel released the killed holder's lock: the directory is usable again
    study.run_study(_micro_spec(), out, export_slurm=str(tmp_path / "s.sh"))
    assert (out / study.PLAN_FILE).exists()


def test_a_broken_lr_rules_file_or_an_empty_plan_is_named(tmp_path):
    spec = _micro_spec()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))  # plans only
    (tmp_path / study.LR_RULES_FILE).write_text("{")
    with pytest.raises(SystemExit, match="lr_rules.json is unreadable or not a JSON object"):
        study.run_study(spec, tmp_path, fit_only=True)
    (tmp_path / study.LR_RULES_FILE).unlink()
    (tmp_path / study.PLAN_FILE).write_text("")
    with pytest.raises(SystemExit, match="plan.jsonl holds no runs"):
        study.run_study(spec, tmp_path, fit_only=True)


def test_an_lr_sweep_run_that_crashed_freezes_no_rule(tmp_path, monkeypatch):
    """A sweep cell that failed for a reason unrelated to its learning rate (a crash, an OOM kill) would be
    left out of the fitted LR rule, which plan.jsonl then freezes; a diverged cell is a result and is not."""
    from experiments import executors

    def execute_with_failures(runs, runs_dir, **kw):
        for i, r in enumerate(runs[:2]):
            d = executors.run_dir(runs_dir, r)
            d.mkdir(parents=True)
            why = "RuntimeError: worker crashed" if i == 0 else "NonFiniteLossError: non-finite training loss"
            (d / executors.ERROR_FILE).write_text(json.dumps({"error": why}))
        return []

    monkeypatch.setattr(study, "_prepare_corpus", lambda runs, out: None)
    monkeypatch.setattr(study, "execute", execute_with_failures)
    spec = get_study_preset("cpu-families")
    with pytest.raises(SystemExit, match=r"1 LR-sweep run\(s\) failed for a reason other than divergence, "
                                         r"e\.g\. .*: RuntimeError: worker crashed"):
        study.run_study(spec, tmp_path)
    assert not (tmp_path / study.PLAN_FILE).exists() and not (tmp_path / study.LR_RULES_FILE).exists()
    stage1 = study.plan_lr_stage(spec, tmp_path)
    (d,) = [executors.run_dir(tmp_path / "runs", r) for r in stage1[:1]]
    (d / executors.ERROR_FILE).write_text(json.dumps({"error": "NonFiniteLossError: diverged"}))
    assert study._broken_sweep_runs(stage1, tmp_path / "runs") == []  # divergences are results


def test_a_crashed_lr_sweep_run_stops_the_job_array_path_too(tmp_path):
    """The cluster's two-step export (--export-slurm twice) fits the LR rule from the sweep's job array: a
    cell that crashed there must stop it before planning, as on the local path."""
    from experiments import executors

    spec = get_study_preset("cpu-families")
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "lr.sh"))  # stage 1's job array
    stage1 = study.plan_lr_stage(spec, tmp_path)
    for i, r in enumerate(stage1):  # the array ran: every cell ended, one crashed, the rest diverged
        d = executors.run_dir(tmp_path / "runs", r)
        d.mkdir(parents=True, exist_ok=True)
        why = "RuntimeError: node failure" if i == 0 else "NonFiniteLossError: diverged"
        (d / executors.ERROR_FILE).write_text(json.dumps({"error": why}))
    with pytest.raises(SystemExit, match="1 LR-sweep run.* failed for a reason other than divergence"):
        study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "main.sh"))
    assert not (tmp_path / study.PLAN_FILE).exists() and not (tmp_path / study.LR_RULES_FILE).exists()


def test_an_unreadable_study_record_is_not_rewritten(tmp_path):
    """study.json names the preset a directory holds; an unreadable one was silently rewritten with whatever
    preset came next, which then adopted the directory's plan and runs."""
    spec = _micro_spec()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))  # plans only
    (tmp_path / study.STUDY_FILE).write_text("{torn")
    with pytest.raises(SystemExit, match="study.json is unreadable"):
        study.run_study(dataclasses.replace(spec, name="cpu-tiny"), tmp_path, fit_only=True)
    assert (tmp_path / study.STUDY_FILE).read_text() == "{torn"


def test_empirical_multiplier_interval_carries_the_reference_targets_noise():
    """The target (the reference's best loss at its largest budget) is a noisy run too: with a noiseless
    group and a noisy reference the interval must still be wide, not the point multiplier."""
    from experiments.compare import empirical_multipliers

    def run(g, c, loss):
        return {"group": g, "kind": "isoflop", "budget": c, "final_eval_loss": loss, "status": "done",
                "fit": True}

    rr = [run("ref", 1e10, 3.0), run("ref", 1e11, 2.5), run("b", 1e10, 2.8), run("b", 1e11, 2.2)]
    groups = {"ref": {"seed_noise": {"pooled_sd": 0.05}}, "b": {"seed_noise": {"pooled_sd": 1e-9}}}
    e = empirical_multipliers(rr, groups, "ref")["b"]
    lo, hi = e["ci"]
    # b's frontier is 2.8 - 0.6 log10(C / 1e10): a target of 2.5 -/+ 1.96 * 0.05 moves log10(C) by -/+ 0.163
    assert e["multiplier"] == pytest.approx(10**-0.5)
    assert np.log10(lo) == pytest.approx(-0.5 - 1.96 * 0.05 / 0.6, abs=0.03)
    assert np.log10(hi) == pytest.approx(-0.5 + 1.96 * 0.05 / 0.6, abs=0.03)


def test_each_group_fits_and_uses_its_own_lr_rule(tmp_path, monkeypatch):
    """cpu-families sweeps AdamW's and Muon's learning rates separately: each group's rule must be fitted
    from its own sweep cells only, and its main-stage runs must use that rule (clamped to its swept range),
    not another group's. The two optimisers are given losses with optima 8x apart."""
    import math

    from experiments import executors
    from experiments.hparam_rules import LRRule

    spec = get_study_preset("cpu-families")
    stage1 = study.plan_lr_stage(spec, tmp_path)
    swept_groups = sorted({r.group for r in stage1})
    assert {"dense-adamw", "dense-muon"} <= set(swept_groups)
    mid_lr = {g: float(np.exp(np.mean([math.log(r.learning_rate) for r in stage1 if r.group == g])))
              for g in swept_groups}
    best = {g: mid_lr[g] * (0.5 if g == "dense-adamw" else 4.0) for g in swept_groups}

    def finished(_dir, r):  # a loss bowl in log lr around each group's own optimum
        return {"final_eval_loss": 2.0 + math.log(r.learning_rate / best[r.group]) ** 2}

    monkeypatch.setattr(executors, "finished_summary", finished)
    rules = study.fit_lr_rules(spec, stage1, tmp_path / "runs")
    for g in swept_groups:
        own = sorted((r.params, r.learning_rate) for r in stage1 if r.group == g)
        assert sorted((c["N"], c["lr"]) for c in rules[g]["cells"]) == own, g
        assert rules[g]["error"] is None, rules[g]["error"]
    main = study.plan_main_stage(spec, tmp_path, rules)
    lr_of = {}
    for r in main:
        if r.group not in rules or r.kind != "isoflop":
            continue
        cells = [c["lr"] for c in rules[r.group]["cells"]]
        rule = LRRule.from_dict(rules[r.group]["rule"])
        want = min(max(rule(N=r.params, D=r.tokens, C=r.budget), min(cells)), max(cells))
        assert r.learning_rate == pytest.approx(want, rel=1e-6), (r.group, r.name)
        lr_of.setdefault(r.group, []).append(r.learning_rate)
    # the optima are 8x apart, so the groups' planned learning rates must differ too
    assert np.median(lr_of["dense-muon"]) > 2 * np.median(lr_of["dense-adamw"])


def test_report_compute_counts_a_shared_wsd_prefix_and_a_twin_run_once(tmp_path):
    """report.json's compute totals: a WSD branch's summary records its FLOPs from scratch (its stable prefix
    included), but the study spent only its cool-down on top of the stable run; one experiment planned
    under two roles is trained, and counted, once."""
    from types import SimpleNamespace

    from experiments.executors import run_dir
    from experiments.sweep import Rules, plan_wsd

    spec0 = get_study_preset("cpu-micro")
    g = spec0.groups[0]
    rules = Rules(lr=g.lr, batch=spec0.batch, warmup_fraction=spec0.warmup_fraction)
    model = g.shape.candidates(g.base.model)[0]
    runs = plan_wsd(g.base, [model], spec0.budgets[:2], rules, group="g")
    stable = next(r for r in runs if r.kind == "wsd_stable")
    branch = next(r for r in runs if r.kind == "wsd_branch" and r.parent["run"] == stable.name)
    twin = dataclasses.replace(stable, name="same-config-other-role", kind="lr_sweep")
    plan = [*runs, twin]
    for r in (stable, branch):  # finished: a summary as the trainer writes it (FLOPs of the whole run)
        d = run_dir(tmp_path, r)
        d.mkdir(parents=True)
        s = {"config": r.config, "steps": r.steps, "eval_mode": "inference", "final_eval_loss": 3.0,
             "flops": r.flops_per_token * r.tokens}
        (d / "summary.json").write_text(json.dumps(s))
    spec = SimpleNamespace(name="t", description="", notes=(), groups=[SimpleNamespace(name="g")],
                           n_bootstrap=0, budgets=spec0.budgets[:2], extrapolate=(10.0,), law_forms=())
    c = report_mod.build_report(spec, plan, tmp_path)["compute"]
    per_step = stable.flops_per_token * stable.batch_size * g.base.data.seq_len
    smax = max(r.steps for r in runs if r.kind == "wsd_stable")
    cool = sum(r.steps - r.parent["step"] for r in runs if r.kind == "wsd_branch")
    branches_from_scratch = sum(per_step * r.steps for r in runs if r.kind == "wsd_branch")
    assert c["planned_flops"] == pytest.approx(per_step * (smax + cool), rel=1e-12)
    assert c["flops_if_no_reuse"] == pytest.approx(branches_from_scratch, rel=1e-12)
    assert c["spent_flops"] == pytest.approx(per_step * branch.steps, rel=1e-12)  # prefix + cool-down
    assert c["wsd_saving"] == pytest.approx(1 - per_step * (smax + cool) / branches_from_scratch, rel=1e-12)
    assert 0 < c["wsd_saving"] < 1


def test_extrapolation_intervals_are_ordered_lower_then_upper():
    """Each 10x/100x row carries [lower, upper] bootstrap intervals for N*, D* and the loss."""
    from scaling.laws import get_law

    hoffmann = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e18, 3e18, 1e19):
        for n in np.sqrt(c / 120) * np.geomspace(0.3, 3, 4):
            d = c / (6 * n)
            loss = float(get_law("chinchilla").predict(hoffmann, N=n, D=d))
            loss *= 1 + 0.01 * rng.standard_normal()
            rows.append({"budget": c, "params": n, "tokens": d, "flops": c, "final_eval_loss": loss})
    res, boot = report_mod.fit_chinchilla(rows, 16)
    ex = report_mod._extrapolation(res, boot, 1e19, (10.0, 100.0), None)
    assert [x["C"] for x in ex] == pytest.approx([1e20, 1e21])
    for x in ex:
        for k in ("N_ci", "D_ci", "loss_ci"):
            assert x[k][0] < x[k][1], (k, x[k])


def test_accuracy_frontier_is_cheapest_inference_for_the_highest_accuracy():
    """accuracy vs inference FLOPs/token (training FLOPs/token / 3: the forward pass of forward+backward):
    the frontier keeps a run unless another is at most as costly and at least as accurate."""
    def run(name, fpt, acc):
        return {"name": name, "group": "g", "kind": "isoflop", "status": "done", "budget": 1e10,
                "flops": 1e10, "final_eval_loss": 3.0, "downstream": {"mc-mean": acc}, "flops_per_token": fpt}

    rr = [run("a", 3.0, 0.30), run("b", 6.0, 0.50), run("c", 9.0, 0.40), run("d", 12.0, 0.55)]
    front = report_mod._pareto(rr, "mc-mean")["accuracy_vs_inference_flops"]
    assert [(p["name"], p["inference_flops_per_token"], p["accuracy"]) for p in front] == [
        ("a", 1.0, 0.30), ("b", 2.0, 0.50), ("d", 4.0, 0.55)]


def test_downstream_mc_mean_averages_only_the_multiple_choice_tasks(tmp_path):
    tasks = {"mc-a": {"accuracy": 0.4}, "mc-b": {"accuracy": 0.7}, "gen-x": {"pass_prob_exact": 0.01}}
    (tmp_path / "downstream.json").write_text(json.dumps({"tasks": tasks}))
    assert report_mod._downstream_scalars(tmp_path) == pytest.approx(
        {"mc-a": 0.4, "mc-b": 0.7, "gen-x": 0.01, "mc-mean": 0.55})


def test_a_run_of_exactly_one_epoch_repeats_no_data():
    assert report_mod._repetition_note([{"name": "a", "epochs": 1.0}]) == []


def test_heldout_rows_relative_error_and_interval_coverage():
    """relative error = (predicted - actual) / actual; covered: the actual loss lies within the 90% interval
    (a loss above the upper end is not covered, nor one below the lower end)."""
    from types import SimpleNamespace

    res = SimpleNamespace(predict=lambda N, D: np.array([2.0]))
    boot = SimpleNamespace(prediction_interval=lambda level, N, D: {"lower": [1.9], "upper": [2.1]})
    rows = [{"name": n, "params": 10, "tokens": 200, "flops": 1e4, "final_eval_loss": a}
            for n, a in (("above", 2.5), ("inside", 2.05), ("below", 1.6))]
    out = report_mod._heldout_rows(res, boot, rows)
    assert [h["covered"] for h in out] == [False, True, False]
    assert [h["relative_error"] for h in out] == pytest.approx([-0.5 / 2.5, -0.05 / 2.05, 0.4 / 1.6])
    assert all(h["interval"] == [1.9, 2.1] for h in out)


def test_entropy_block_compares_E_and_its_interval_with_the_entropy_rate(tmp_path):
    """E - H, (E - H) / H, and whether E's bootstrap interval contains H: an entropy rate above the whole
    interval is not covered."""
    from types import SimpleNamespace

    from scaling.laws import get_law

    hoffmann = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    rng = np.random.default_rng(1)
    rr, planned = [], []
    for c in (1e18, 3e18, 1e19):
        for i, n in enumerate(np.sqrt(c / 120) * np.geomspace(0.3, 3, 4)):
            d = c / (6 * n)
            loss = float(get_law("chinchilla").predict(hoffmann, N=n, D=d))
            loss *= 1 + 0.005 * rng.standard_normal()
            rr.append({"name": f"{c:g}-{i}", "run_id": f"{c:g}-{i}", "group": "g", "kind": "isoflop",
                       "status": "done", "fit": True, "budget": c, "params": n, "tokens": d, "flops": c,
                       "final_eval_loss": loss, "downstream": None, "flops_per_token": 6 * n})
            planned.append(SimpleNamespace(group="g", params=n, flops_per_token=6 * n))
    spec = SimpleNamespace(groups=[SimpleNamespace(name="g")], n_bootstrap=16, budgets=(1e18, 3e18, 1e19),
                           extrapolate=(10.0,), law_forms=())
    block = report_mod._group_block(spec, "g", planned, rr, tmp_path, entropy=10.0)
    e = block["entropy"]
    lo, hi = e["E_ci"]
    assert lo <= e["E"] <= hi < 10.0
    assert e["E_minus_entropy"] == pytest.approx(e["E"] - 10.0)
    assert e["relative"] == pytest.approx((e["E"] - 10.0) / 10.0)
    assert e["ci_covers_entropy"] is False
    inside = report_mod._group_block(spec, "g", planned, rr, tmp_path, entropy=(lo + hi) / 2)["entropy"]
    assert inside["ci_covers_entropy"] is True


# ----- the study's helpers and loop on tiny hand-made plans (training and the report faked) -----------------
def test_the_lr_sweep_trains_the_middle_size_of_the_smallest_budgets(tmp_path):
    """cpu-tiny sweeps its learning rate at its two smallest budgets (the module docstring), cpu-families at
    its smallest (lr_sweep_budgets=1); each cell is the middle size of that budget's isoFLOP curve."""
    spec = get_study_preset("cpu-tiny")
    stage1 = study.plan_lr_stage(spec, tmp_path)
    main = study.plan_main_stage(spec, tmp_path, {})
    factors = spec.groups[0].lr_sweep_factors
    assert len(stage1) == 2 * len(factors) and {r.kind for r in stage1} == {"lr_sweep"}
    assert sorted({r.budget for r in stage1}) == [3e10, 1e11]
    for c in (3e10, 1e11):
        curve = sorted(r.params for r in main if r.kind == "isoflop" and r.budget == c)
        assert {r.params for r in stage1 if r.budget == c} == {curve[len(curve) // 2]}
    fam = get_study_preset("cpu-families")
    assert {(r.group, r.budget) for r in study.plan_lr_stage(fam, tmp_path)} == {
        ("dense-adamw", 3e10), ("dense-muon", 3e10)}


def test_wsd_sizes_sit_around_the_middle_budgets_curve_centre(tmp_path):
    """cpu-tiny's 3 WSD sizes span 2.5x around the centre of its middle budget's (1e11) isoFLOP curve, not of
    the smallest budget's (whose centre is sqrt(1e11 / 3e10) = 1.8x smaller)."""
    spec = get_study_preset("cpu-tiny")
    runs = study.plan_main_stage(spec, tmp_path, {})
    centre = sorted(r.params for r in runs if r.kind == "isoflop" and r.budget == 1e11)[2]
    sizes = sorted({r.params for r in runs if r.kind.startswith("wsd")})
    assert len(sizes) == 3
    assert abs(np.mean(np.log(sizes)) - math.log(centre)) < math.log(1.25)


def test_lr_rules_record_an_unfinished_sweep_cell_as_null(tmp_path, monkeypatch):
    """lr_rules.json is strict JSON: a cell without a finished run keeps its place with loss null (NaN would
    make json.dumps(allow_nan=False) raise after the whole sweep trained)."""
    from experiments import executors

    spec = get_study_preset("cpu-tiny")
    stage1 = study.plan_lr_stage(spec, tmp_path)
    gone = stage1[0].name

    def finished(_dir, r):
        return None if r.name == gone else {"final_eval_loss": 2.0 + math.log(r.learning_rate / 3e-3) ** 2}

    monkeypatch.setattr(executors, "finished_summary", finished)
    rules = study.fit_lr_rules(spec, stage1, tmp_path / "runs")
    cells = rules["dense-adamw"]["cells"]
    assert len(cells) == len(stage1) and sum(c["loss"] is None for c in cells) == 1
    assert all(c["loss"] is None or math.isfinite(c["loss"]) for c in cells)
    json.dumps(rules, allow_nan=False)


def test_final_loss_reads_only_a_finished_valid_summary(tmp_path):
    """The edge-extension rule reads each run's loss through _final_loss: a missing summary, a NaN loss or a
    summary left by another config in the run's directory is "not finished" (None), not a loss."""
    from experiments import executors

    runs = study.plan_main_stage(_micro_spec(), tmp_path, {})
    r, other = runs[0], runs[1]
    runs_dir = tmp_path / "runs"
    d = executors.run_dir(runs_dir, r)
    d.mkdir(parents=True)
    assert study._final_loss(runs_dir, r) is None
    summary = {"config": r.config, "steps": r.steps, "final_eval_loss": 2.5}
    (d / executors.SUMMARY_FILE).write_text(json.dumps(summary))
    assert study._final_loss(runs_dir, r) == 2.5
    (d / executors.SUMMARY_FILE).write_text(json.dumps({**summary, "final_eval_loss": float("nan")}))
    assert study._final_loss(runs_dir, r) is None
    (d / executors.SUMMARY_FILE).write_text(json.dumps({**summary, "config": other.config}))
    assert study._final_loss(runs_dir, r) is None


def test_an_edge_extension_is_one_grid_step_out_in_its_own_group_at_the_clamped_lr(tmp_path):
    """With 2 sizes per curve the grid step is the whole span (10x): the extension of the 3e10 curve (loss
    falling with N) is ~10x its largest size. A second group with interior minima is not extended, and the
    extension's lr is clamped to the swept range like every main-stage run."""
    from experiments.hparam_rules import LRRule

    spec = dataclasses.replace(_edge_spec(1), sizes_per_budget=2)
    runs = study.plan_main_stage(spec, tmp_path, {})
    curve = [r.params for r in runs if r.kind == "isoflop" and r.budget == 3e10]
    assert len(curve) == 2
    (ext,) = [r for r in study.plan_edge_extensions(spec, tmp_path, runs, {}, _falling_at_smallest_budget)
              if r.budget == 3e10]
    assert abs(math.log(ext.params / (max(curve) * spec.span))) < 0.3

    g = spec.groups[0]
    two = dataclasses.replace(_edge_spec(1), groups=(g, dataclasses.replace(g, name="other")))
    runs = study.plan_main_stage(two, tmp_path, {})

    def loss_of(r):  # "other": a U in log N with its minimum inside every curve
        return _falling_at_smallest_budget(r) if r.group == g.name else 2.5 + (math.log(r.params / 2e4)) ** 2

    (ext,) = study.plan_edge_extensions(two, tmp_path, runs, {}, loss_of)
    assert ext.group == g.name and ext.budget == 3e10

    cells = [{"lr": 1e-3}, {"lr": 4e-3}]
    rules = {g.name: {"rule": LRRule(coef=1.0).to_dict(), "cells": cells, "error": None}}
    spec = _edge_spec(1)
    runs = study.plan_main_stage(spec, tmp_path, rules)
    (ext,) = study.plan_edge_extensions(spec, tmp_path, runs, rules, _falling_at_smallest_budget)
    assert ext.learning_rate == pytest.approx(4e-3)  # the rule's 1.0, clamped to the largest swept lr
    assert all(r.learning_rate == pytest.approx(4e-3) for r in runs)


def _fake_training_and_report(monkeypatch, loss_of, clock=None):
    """Replace training (a summary with ``loss_of(run)``, or error.json where it is None; ``clock[0]`` +100 s
    per call) and the report; returns the names each execute call trained and the lr_rules each report got."""
    from experiments import executors
    from experiments import report as report_mod

    trained: list[list[str]] = []
    reported: list[dict] = []

    def fake_execute(runs, runs_dir, **kw):
        trained.append([r.name for r in runs])
        if clock is not None:
            clock[0] += 100.0
        for r in runs:
            d = executors.run_dir(runs_dir, r)
            d.mkdir(parents=True, exist_ok=True)
            loss = loss_of(r)
            if loss is None:
                (d / executors.ERROR_FILE).write_text(json.dumps({"error": "RuntimeError: boom"}))
            else:
                (d / executors.SUMMARY_FILE).write_text(json.dumps(
                    {"config": r.config, "steps": r.steps, "final_eval_loss": loss}))
        return [{"name": r.name, "status": "done" if loss_of(r) is not None else "failed", "error": "boom"}
                for r in runs]

    def fake_build_report(spec, runs, runs_dir, **kw):
        reported.append(kw.get("lr_rules"))
        return {"runs": [], "notes": []}

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "_prepare_corpus", lambda runs, out: None)
    monkeypatch.setattr(report_mod, "build_report", fake_build_report)
    monkeypatch.setattr(report_mod, "write_report", lambda *a, **kw: None)
    monkeypatch.setattr(report_mod, "print_summary", lambda *a, **kw: None)
    return trained, reported


def test_retry_by_run_id_trains_that_run_alone_and_plans_no_extension(tmp_path, monkeypatch):
    """run_study(retry=[run_id]) trains just that run: not the rest of the plan, and no edge extension even
    where the retried run completes a curve whose minimum is at its edge (--retry trains what it names)."""
    spec = _edge_spec(1)
    planned = study.plan_main_stage(spec, tmp_path, {})
    broken = min((r for r in planned if r.kind == "isoflop" and r.budget == 3e10), key=lambda r: r.params)
    failing = {broken.name}
    trained, _ = _fake_training_and_report(
        monkeypatch, lambda r: None if r.name in failing else _falling_at_smallest_budget(r))
    study.run_study(spec, tmp_path, workers=1)
    assert len(trained) == 1 and broken.name in trained[0]  # its curve is unfinished: nothing extended
    failing.clear()
    trained.clear()
    study.run_study(spec, tmp_path, workers=1, retry=[broken.run_id])
    assert trained == [[broken.name]]
    plan = study.read_plan(tmp_path / study.PLAN_FILE)
    assert not any(r.name.endswith(study.EXTENSION_SUFFIX) for r in plan)


def test_no_edge_extension_starts_after_the_train_limit(tmp_path, monkeypatch):
    """--train-limit-s: the main stage "takes" 100 s of a fake clock; under a 50 s limit the edge-extension
    round is skipped, under a 1000 s limit it runs."""
    import time
    import types

    clock = [0.0]
    monkeypatch.setattr(study, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    trained, _ = _fake_training_and_report(monkeypatch, _falling_at_smallest_budget, clock)
    spec = _edge_spec(1)
    study.run_study(spec, tmp_path / "short", workers=1, train_limit_s=50)
    assert len(trained) == 1
    trained.clear()
    clock[0] = 0.0
    study.run_study(spec, tmp_path / "long", workers=1, train_limit_s=1000)
    assert len(trained) == 2 and trained[1][0].endswith(study.EXTENSION_SUFFIX)


def test_the_fitted_lr_rules_and_the_sweep_are_kept_for_a_rerun(tmp_path, monkeypatch, capsys):
    """A study with an LR sweep writes plan.jsonl with the sweep's runs and lr_rules.json; the same command
    again reports with the rules read back from lr_rules.json, and does not warn that they are missing."""
    spec = dataclasses.replace(_edge_spec(0), groups=get_study_preset("cpu-tiny").groups)
    best = 6e-3

    def loss_of(r):
        return 2.0 + 0.1 * math.log(r.learning_rate / best) ** 2

    trained, reported = _fake_training_and_report(monkeypatch, loss_of)
    study.run_study(spec, tmp_path, workers=1)
    stage1 = study.plan_lr_stage(spec, tmp_path)
    plan = study.read_plan(tmp_path / study.PLAN_FILE)
    assert [r.name for r in plan if r.kind == "lr_sweep"] == [r.name for r in stage1]
    on_disk = json.loads((tmp_path / study.LR_RULES_FILE).read_text())
    assert on_disk["dense-adamw"]["error"] is None and reported == [on_disk]
    capsys.readouterr()
    study.run_study(spec, tmp_path, workers=1)
    assert reported[1] == on_disk and "warning" not in capsys.readouterr().out


def test_a_reused_plan_from_other_corpus_settings_is_named_by_run_study(tmp_path, capsys):
    """Every run of the reused plan reads a 60k-token corpus where the preset now plans 50k (one value, but
    not the preset's): the study warns; a second group with its own corpus size is no mismatch."""
    spec = _micro_spec()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))  # plans only
    plan = tmp_path / study.PLAN_FILE
    rows = [json.loads(line) for line in plan.read_text().splitlines()]
    for row in rows:
        row["config"]["data"]["n_train_tokens"] = 60_000
    plan.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))
    out = capsys.readouterr().out
    assert ("warning: " + str(plan) + " was planned by an earlier version of preset 'cpu-micro' (group "
            "dense-adamw: data.n_train_tokens [60000] (now 50000))") in out

    g = spec.groups[0]
    big = dataclasses.replace(g.base, data=dataclasses.replace(g.base.data, n_train_tokens=200_000))
    two = dataclasses.replace(spec, groups=(g, dataclasses.replace(g, name="big", base=big)))
    assert study._stale_plan_settings(two, study.plan_main_stage(two, tmp_path, {})) == []


def test_run_study_refuses_retry_with_fit_only_and_clears_nothing(tmp_path):
    """The CLI refuses --retry with --fit-only; run_study called directly must too, before --retry deletes the
    named run's directory (which --fit-only would then never train again)."""
    from experiments import executors

    spec = _micro_spec()
    study.run_study(spec, tmp_path, export_slurm=str(tmp_path / "submit.sh"))  # plans only
    r = study.read_plan(tmp_path / study.PLAN_FILE)[0]
    d = executors.run_dir(tmp_path / "runs", r)
    d.mkdir(parents=True)
    (d / executors.SUMMARY_FILE).write_text(json.dumps({"config": r.config, "steps": r.steps,
                                                        "final_eval_loss": 2.5}))
    with pytest.raises(SystemExit, match="--retry clears a run so that it trains again"):
        study.run_study(spec, tmp_path, retry=[r.name], fit_only=True)
    assert (d / executors.SUMMARY_FILE).exists()
