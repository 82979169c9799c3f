"""Sweep planning, hashing, hyperparameter rules, executors' skip/resume/failure logic and job-array export.

No training here (the trainer is replaced by a fake where an executor is exercised); tests/test_study.py
trains a micro study end to end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import executors, slurm
from experiments.config import ConfigError
from experiments.hparam_rules import BatchRule, LRRule, best_lr, fit_lr_rule
from experiments.study_presets import STUDY_PRESETS, get_study_preset
from experiments.sweep import (
    EXECUTION_ONLY_FIELDS,
    Rules,
    ShapeRule,
    budget_run,
    distinct_runs,
    plan_grid,
    plan_heldout,
    plan_isoflop,
    plan_lr_sweep,
    plan_seed_replicates,
    plan_user_list,
    plan_wsd,
    read_plan,
    resolve,
    run_id,
    summarize,
    write_plan,
)
from models import accounting
from optim.schedules import wsd_decay_start


def _spec_base(name="cpu-tiny"):
    spec = get_study_preset(name)
    g = spec.groups[0]
    return spec, g, Rules(lr=g.lr, batch=spec.batch, warmup_fraction=spec.warmup_fraction)


@pytest.mark.parametrize("preset", ["cpu-tiny", "cpu-micro", "gpu-quick", "gpu-full"])
def test_isoflop_plan_within_one_percent_of_budget(preset):
    spec, g, rules = _spec_base(preset)
    runs = plan_isoflop(
        g.base,
        spec.budgets,
        spec.sizes_per_budget,
        rules,
        shape_rule=g.shape,
        span=spec.span,
        tokens_per_param=spec.tokens_per_param,
    )
    assert len(runs) == len(spec.budgets) * spec.sizes_per_budget
    for r in runs:
        cfg = r.experiment
        # independent recomputation from the config: exact FLOPs/token x tokens trained
        fpt = accounting.flops_per_token(cfg.model, cfg.data.seq_len)["training"]
        flops = fpt * cfg.total_steps * cfg.data.batch_size * cfg.data.seq_len
        assert flops == pytest.approx(r.predicted_flops, rel=1e-12)
        assert abs(flops / r.budget - 1) < 0.01, (r.name, flops, r.budget)
        assert cfg.model.resolved_head_dim == g.shape.head_dim
        a = cfg.model.d_model / cfg.model.n_layers
        assert (
            g.shape.aspect_ratio / g.shape.aspect_tolerance
            <= a
            <= g.shape.aspect_ratio * g.shape.aspect_tolerance
        )
    for c in spec.budgets:  # distinct sizes spanning the curve at every budget
        ns = sorted(r.params for r in runs if r.budget == c)
        assert len(set(ns)) == spec.sizes_per_budget
        assert ns[-1] / ns[0] > 2
        # the curve is centred where D / N = tokens_per_param: the sizes bracket that ratio
        # (when the shape grid reaches that far on both sides; cpu-micro's toy grid does not)
        ratios = [r.tokens / r.params for r in runs if r.budget == c]
        cands = g.shape.candidates(g.base.model)
        all_r = [
            c / accounting.training_flops_per_token(m, g.base.data.seq_len) / m.param_counts()["total"]
            for m in cands
        ]
        if min(all_r) < spec.tokens_per_param < max(all_r):
            assert min(ratios) < spec.tokens_per_param < max(ratios)


def test_heldout_is_larger_and_not_fitted():
    spec, g, rules = _spec_base()
    (h,) = plan_heldout(g.base, spec.heldout_budgets, rules, shape_rule=g.shape)
    assert h.kind == "heldout" and h.fit is False
    assert h.budget > max(spec.budgets)
    assert abs(h.predicted_flops / h.budget - 1) < 0.01


def test_run_id_hash_semantics():
    spec, g, rules = _spec_base()
    r = plan_isoflop(g.base, spec.budgets[:1], 2, rules, shape_rule=g.shape)[0]
    cfg = r.experiment
    assert run_id(cfg) == r.run_id == run_id(cfg.to_dict())
    assert len(r.run_id) == 12 and all(ch in "0123456789abcdef" for ch in r.run_id)
    # execution-only settings do not change the identity; anything computed does
    same = dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, log_every=7, checkpoint_every=3),
        data=dataclasses.replace(cfg.data, synthetic_dir="/elsewhere"),
    )
    assert run_id(same) == r.run_id
    other = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e-4))
    assert run_id(other) != r.run_id
    assert run_id(dataclasses.replace(cfg, seed=1)) != r.run_id
    # a field added to a config later, at its default, leaves existing run ids unchanged
    newer = cfg.to_dict()
    newer["trainer"]["some_future_field"] = 0
    assert run_id(newer) != r.run_id  # a non-default value of an unknown field is part of the identity
    from experiments import sweep as sweep_mod

    default = json.loads(json.dumps(sweep_mod._default_config_dict()))  # a copy: the original is cached
    default["trainer"]["some_future_field"] = 0
    assert sweep_mod._strip(newer, default=default) == sweep_mod._strip(cfg.to_dict(), default=default)


def test_execution_only_fields_match_trainer():
    from experiments.trainer import EXECUTION_ONLY_FIELDS as trainer_fields

    assert EXECUTION_ONLY_FIELDS is trainer_fields


def test_plan_roundtrip_and_edit(tmp_path):
    spec, g, rules = _spec_base()
    runs = plan_isoflop(g.base, spec.budgets[:2], 3, rules, shape_rule=g.shape)
    path = write_plan(runs, tmp_path / "plan.jsonl")
    back = read_plan(path)
    assert [r.run_id for r in back] == [r.run_id for r in runs]
    assert [r.predicted_flops for r in back] == [r.predicted_flops for r in runs]
    # hand-edit one run's steps: its id and FLOPs are re-derived on reading
    lines = path.read_text().splitlines()
    d = json.loads(lines[0])
    d["config"]["trainer"]["steps"] *= 2
    d["predicted_flops"] = 123.0  # stale derived value: ignored
    lines[0] = json.dumps(d)
    path.write_text("\n".join(lines) + "\n")
    edited = read_plan(path)
    assert edited[0].run_id != runs[0].run_id
    assert edited[0].predicted_flops == pytest.approx(2 * runs[0].predicted_flops, rel=1e-12)
    assert [r.run_id for r in edited[1:]] == [r.run_id for r in runs[1:]]
    d["config"]["trainer"]["stepz"] = 1
    path.write_text(json.dumps(d) + "\n")
    with pytest.raises(ConfigError, match="stepz"):
        read_plan(path)
    # typos of a hand edit are named with their line, not accepted ("fit": "false" dropped the run from every
    # report table) nor left to fail later with an unrelated error
    good = json.loads(lines[1])
    for edit, message in (
        ({"fit": "false"}, "fit must be true or false, got 'false'"),
        ({"budget": "1e9"}, "budget must be a positive number or null, got '1e9'"),
        ({"budget": -5}, "budget must be a positive number or null, got -5"),
        ({"parent": "run-a"}, "parent must be null or"),
        ({"parent": {"run": "a", "stpe": 6}}, "parent must be null or"),
        ({"name": None}, "missing field 'name'"),
    ):
        e = {k: v for k, v in {**good, **edit}.items() if v is not None}
        path.write_text(json.dumps(good) + "\n" + json.dumps(e) + "\n")
        with pytest.raises(ConfigError, match=rf"plan.jsonl:2: .*{re.escape(message)}"):
            read_plan(path)


def test_an_experiment_planned_twice_is_trained_and_counted_once():
    spec, g, rules = _spec_base()
    runs = plan_isoflop(g.base, spec.budgets[:1], 3, rules, shape_rule=g.shape)
    twin = dataclasses.replace(runs[1], name="same-config-other-role", kind="lr_sweep", fit=False)
    plan = [*runs, twin]
    assert twin.run_id == runs[1].run_id
    assert distinct_runs(plan) == runs
    s = summarize(plan)
    assert s.n_runs == 4 and s.study_flops == pytest.approx(sum(r.incremental_flops for r in runs))


def _scaled_lr(r, factor):
    cfg = json.loads(json.dumps(r.config))
    cfg["optimizer"]["learning_rate"] *= factor
    return dataclasses.replace(r, config=cfg)


def test_a_branch_id_follows_its_lineage():
    """A run resumed from a parent's checkpoint is named by its parent's id and step too: edit a stable
    segment's config and every run downstream of it gets a new directory (it used to reuse the runs trained
    from the old segment), while runs outside that chain keep theirs."""
    spec, g, rules = _spec_base()
    runs = resolve(plan_wsd(g.base, [g.shape.candidates(g.base.model)[2]], spec.budgets, rules))
    first_stable = next(r for r in runs if r.kind == "wsd_stable")
    for r in runs:
        own = run_id(r.config)
        assert (r.run_id == own) == (r.parent is None)
    edited = resolve([_scaled_lr(r, 10.0) if r.name == first_stable.name else r for r in runs])
    changed = {a.name for a, b in zip(runs, edited, strict=True) if a.run_id != b.run_id}
    assert changed == {r.name for r in runs}  # the first segment is every run's ancestor
    # editing a branch changes only that branch
    branch = next(r for r in runs if r.kind == "wsd_branch")
    edited = resolve([_scaled_lr(r, 0.5) if r.name == branch.name else r for r in runs])
    changed = {a.name for a, b in zip(runs, edited, strict=True) if a.run_id != b.run_id}
    assert changed == {branch.name}


def test_a_chain_planned_twice_is_trained_once_and_its_children_relinked():
    spec, g, rules = _spec_base()
    chain = resolve(plan_wsd(g.base, [g.shape.candidates(g.base.model)[2]], spec.budgets, rules))

    def copy(r):
        parent = None if r.parent is None else {**r.parent, "run": "copy-" + r.parent["run"]}
        return dataclasses.replace(r, name="copy-" + r.name, parent=parent)

    copies = [copy(r) for r in chain]
    # one branch of the copy differs (its lr): it is trained, from the original chain's segment
    last = copies[-1]
    copies[-1] = _scaled_lr(last, 0.5)
    plan = resolve([*chain, *copies])
    kept = distinct_runs(plan)
    assert [r.name for r in kept] == [r.name for r in chain] + [last.name]
    assert kept[-1].parent["run"] == chain[-1].parent["run"]  # relinked to the run that is trained
    s = summarize(plan)
    assert s.study_flops == pytest.approx(sum(r.incremental_flops for r in kept))
    assert s.study_flops < sum(r.incremental_flops for r in plan)


def test_grid_user_and_lr_sweep_plans():
    spec, g, rules = _spec_base()
    models = g.shape.candidates(g.base.model)[:2]
    grid = plan_grid(g.base, models, [1e5, 2e5], rules)
    assert len(grid) == 4 and all(r.budget is None for r in grid)
    for r in grid:
        assert abs(r.tokens / (1e5 if "D1.00e+05" in r.name else 2e5) - 1) < 0.02
    user = plan_user_list(g.base, [{"name": "a", "set": ["optimizer.name=muon", "trainer.steps=60"]}])
    assert user[0].experiment.optimizer.name == "muon" and user[0].steps == 60
    sweep = plan_lr_sweep(grid[:1], (0.5, 2.0))
    assert [r.learning_rate for r in sweep] == pytest.approx(
        [0.5 * grid[0].learning_rate, 2 * grid[0].learning_rate]
    )
    assert all(r.kind == "lr_sweep" and not r.fit for r in sweep)


def test_seed_replicates_change_only_the_seed():
    spec, g, rules = _spec_base()
    iso = plan_isoflop(g.base, spec.budgets[:1], 2, rules, shape_rule=g.shape, span=spec.span)
    reps = plan_seed_replicates(iso, (1, 2))
    assert [r.name for r in reps] == [f"{r.name}-seed{s}" for r in iso for s in (1, 2)]
    for rep in reps:
        orig = next(r for r in iso if rep.name.startswith(r.name + "-seed"))
        assert rep.kind == "seed_replicate" and not rep.fit and rep.budget == orig.budget
        assert rep.run_id != orig.run_id and rep.experiment.seed in (1, 2)
        # everything else identical: model, tokens, FLOPs, schedule
        assert dataclasses.replace(rep.experiment, seed=orig.experiment.seed) == orig.experiment
        assert rep.predicted_flops == orig.predicted_flops
    with pytest.raises(ConfigError, match="already has seed 0"):
        plan_seed_replicates(iso, (0,))
    wsd = plan_wsd(g.base, [g.shape.candidates(g.base.model)[2]], spec.budgets, rules)
    branch = next(r for r in wsd if r.parent is not None)
    with pytest.raises(ConfigError, match="replicate its root"):
        plan_seed_replicates([branch], (1,))


def test_wsd_plan_branches_share_stable_prefix():
    spec, g, rules = _spec_base()
    models = [g.shape.candidates(g.base.model)[i] for i in (2, 5)]
    runs = plan_wsd(g.base, models, spec.budgets, rules, decay_fraction=0.2)
    by_name = {r.name: r for r in runs}
    branches = [r for r in runs if r.kind == "wsd_branch"]
    assert len(branches) == len(models) * len(spec.budgets)
    for b in branches:
        cfg = b.experiment
        assert cfg.optimizer.schedule == "wsd"
        parent = by_name[b.parent["run"]]
        pc = parent.experiment
        assert pc.optimizer.schedule == "constant"
        # the branch's cool-down starts exactly where the stable segment it resumes from ends
        assert wsd_decay_start(cfg.optimizer, cfg.total_steps) == b.parent["step"] == parent.steps
        for f in ("learning_rate", "warmup_steps", "weight_decay", "name"):
            assert getattr(pc.optimizer, f) == getattr(cfg.optimizer, f)
        assert pc.model == cfg.model and pc.data.batch_size == cfg.data.batch_size
        assert abs(b.predicted_flops / min(spec.budgets, key=lambda c: abs(c - b.predicted_flops)) - 1) < 0.01
    # compute: shared prefixes once = the longest stable prefix + every cool-down, per model
    for m in models:
        mine = [r for r in runs if r.experiment.model == m]
        per_step = mine[0].flops_per_token * mine[0].batch_size * g.base.data.seq_len
        smax = max(r.steps for r in mine if r.kind == "wsd_stable")
        cool = sum(r.steps - r.parent["step"] for r in mine if r.kind == "wsd_branch")
        assert sum(r.incremental_flops for r in mine) == pytest.approx(per_step * (smax + cool), rel=1e-12)
    s = summarize(runs)
    assert s.study_flops < sum(r.predicted_flops for r in branches)


def test_batch_rule_keeps_min_steps():
    rule = BatchRule(coef=64 * 64, min_batch=2, max_batch=64, min_steps=50)
    for tokens in (1e4, 5e4, 1e6):
        b = rule.batch_size(1e10, tokens, 64)
        assert b & (b - 1) == 0
        assert tokens / (b * 64) >= 50 or b == 2


def test_fit_lr_rule_recovers_power_law():
    # synthetic sweep: loss is a parabola in log lr around lr*(C) = 0.5 C^-0.2 (DeepSeek-style)
    cells = []
    for C in (1e10, 1e11, 1e12):
        opt = 0.5 * C**-0.2
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            lr = opt * f * 1.3  # grid not centred on the optimum: the parabola vertex must find it
            cells.append(
                {"N": C**0.5, "D": C**0.5 / 6, "C": C, "lr": lr, "loss": 3 + 0.2 * math.log(lr / opt) ** 2}
            )
    rule = fit_lr_rule(cells, form="C")
    assert rule.c_exp == pytest.approx(-0.2, abs=1e-6)
    assert rule.coef == pytest.approx(0.5, rel=1e-5)
    assert rule(N=1, D=1, C=1e11) == pytest.approx(0.5 * 1e11**-0.2, rel=1e-5)
    with pytest.raises(ValueError, match="needs >= 3"):
        fit_lr_rule(cells[:10], form="ND")
    assert "edge" not in rule.source
    mono = [dict(c, loss=-c["lr"]) for c in cells]  # loss falls with lr: optimum beyond the grid
    assert "2 cell(s) best at the edge" not in fit_lr_rule(mono).source
    assert "3 cell(s) best at the edge" in fit_lr_rule(mono).source
    # the caveat says by how much the edge point wins, so a flat curve reads as flat
    flat = [{"N": 1.0, "D": 1.0, "C": 1e11, "lr": lr, "loss": y} for lr, y in ((1, 3.0), (2, 2.9), (4, 2.85))]
    src = fit_lr_rule(flat, prior=LRRule(coef=1.0)).source
    assert "1 cell(s) best at the edge of the lr grid, by 0.05 nats over the neighbouring lr" in src
    # two cells 3x apart in C: with a prior only the coefficient is fitted (the exponent is noise there)
    near = []
    for C in (1e10, 3e10):
        opt = 0.5 * C**-0.2
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            near.append({"N": C, "D": 1.0, "C": C, "lr": opt * f, "loss": 3 + 0.2 * math.log(f) ** 2})
    prior = LRRule(coef=9.9, c_exp=-0.2)
    kept = fit_lr_rule(near, prior=prior)
    assert kept.c_exp == -0.2 and "kept from the prior" in kept.source
    assert kept.coef == pytest.approx(0.5, rel=1e-5)  # lr*(C) = 0.5 C^-0.2 recovered with the prior's shape
    assert fit_lr_rule(cells, prior=prior).c_exp == pytest.approx(-0.2, abs=1e-6)  # 2 decades: full fit
    # no prior: unidentified exponents are an error, not the minimum-norm least-squares answer
    with pytest.raises(ValueError, match=r"not determined by 2 cell\(s\) spanning 0.48 decade\(s\)"):
        fit_lr_rule(near)
    one_budget = [dict(c, N=c["N"] * k) for c in near[:5] for k in (1.0, 3.0)]  # 2 sizes, one C
    with pytest.raises(ValueError, match=r"spanning 0 decade"):
        fit_lr_rule(one_budget)
    # ND cells on one tokens-per-parameter ridge (one size per budget, as the study's LR stage plans): N and D
    # each span 2 decades, but only a combination of their exponents is determined -> the prior's are kept
    rng = np.random.default_rng(0)
    ridge = []
    for n in (1e6, 1e7, 1e8):
        n *= 1 + 0.1 * rng.uniform(-1, 1)
        opt = 1.79 * n**-0.713 * (20 * n) ** 0.307 * (1 + 0.1 * rng.uniform(-1, 1))
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            loss = 3 + 0.2 * math.log(f) ** 2
            ridge.append({"N": n, "D": 20 * n, "C": 120 * n * n, "lr": opt * f, "loss": loss})
    steplaw = LRRule(coef=1.79, n_exp=-0.713, d_exp=0.307)
    kept = fit_lr_rule(ridge, form="ND", prior=steplaw)
    assert (kept.n_exp, kept.d_exp) == (-0.713, 0.307) and "least-varied direction" in kept.source
    with pytest.raises(ValueError, match="not determined"):
        fit_lr_rule(ridge, form="ND")
    grid = [dict(c, D=c["D"] * k, lr=c["lr"] * k**0.307) for c in ridge for k in (1.0, 100.0)]
    full = fit_lr_rule(grid, form="ND", prior=steplaw)  # sizes x token counts: both exponents determined
    assert full.source.startswith("fitted (ND)") and full.d_exp == pytest.approx(0.307, abs=0.05)
    # edge of grid -> the grid point; diverged runs ignored
    assert best_lr([1e-3, 1e-2, 1e-1], [2.0, 3.0, float("nan")]) == pytest.approx(1e-3)


def test_all_presets_plan():
    for name in STUDY_PRESETS:
        spec = get_study_preset(name)
        assert spec.groups and len(spec.budgets) >= 2
    fam = get_study_preset("cpu-families")
    names = [g.name for g in fam.groups]
    assert "dense-adamw" in names and "dense-muon" in names


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-families"])
def test_every_run_of_a_study_scores_one_validation_set_and_reads_unique_data(tmp_path, name):
    """The validation set is eval_steps x eval batch windows; the eval batch used to follow each run's planned
    batch, so budgets were scored on 8k, 16k or 32k-token prefixes (true-source losses up to 0.017 nats
    apart). And the CPU corpora were 1M tokens, which 19/46 (cpu-tiny) and 42/96 (cpu-families) runs
    exceeded, repeating data the fits read as unique."""
    from experiments.config import ExperimentConfig
    from experiments.study import plan_main_stage

    planned = plan_main_stage(get_study_preset(name), tmp_path, {})
    cfgs = [ExperimentConfig.from_dict(r.config) for r in planned]
    assert len({c.data.batch_size for c in cfgs}) > 1
    assert {(c.eval_batch_size, c.trainer.eval_steps) for c in cfgs} == {(16, 31)}
    assert max(c.total_steps * c.tokens_per_step / c.data.n_train_tokens for c in cfgs) < 1
    # a base that leaves the eval batch to its default: the planner pins the base's own
    spec, g, rules = _spec_base("cpu-micro")
    base = dataclasses.replace(g.base, trainer=dataclasses.replace(g.base.trainer, eval_batch_size=None))
    runs = plan_isoflop(base, spec.budgets, 3, rules, shape_rule=g.shape, span=spec.span)
    cfgs = [ExperimentConfig.from_dict(r.config) for r in runs]
    assert len({c.data.batch_size for c in cfgs}) > 1 and {c.eval_batch_size for c in cfgs} == {16}


# ----- executors (fake trainer) -----------------------------------------------------------------------------
def _fake_train(calls, fail_names=()):
    def train(cfg, workdir, devices=None, log=None):
        calls.append(str(workdir))
        if any(run_id(cfg) == n for n in fail_names):
            raise RuntimeError("boom")
        from models import accounting as acc

        fpt = acc.training_flops_per_token(cfg.model, cfg.data.seq_len)
        s = {
            "steps": cfg.total_steps,
            "final_eval_loss": 3.0,
            "flops": fpt * cfg.total_steps * cfg.tokens_per_step,
            "config": cfg.to_dict(),
        }
        (workdir / "summary.json").write_text(json.dumps(s))
        (workdir / "checkpoints" / str(cfg.total_steps)).mkdir(parents=True, exist_ok=True)
        return s

    return train


@pytest.fixture
def micro_runs():
    spec, g, rules = _spec_base("cpu-micro")
    return plan_isoflop(g.base, spec.budgets[:1], 3, rules, shape_rule=g.shape, span=spec.span)


def test_executor_skip_resume_and_failure(tmp_path, monkeypatch, micro_runs):
    import experiments.trainer as trainer

    calls: list[str] = []
    bad = micro_runs[1].run_id
    monkeypatch.setattr(trainer, "train", _fake_train(calls, fail_names=(bad,)))
    res = executors.run_sequential(micro_runs, tmp_path)
    st = {r["run_id"]: r["status"] for r in res}
    assert st[bad] == "failed" and list(st.values()).count("done") == 2
    err = json.loads((tmp_path / bad / "error.json").read_text())
    assert "boom" in err["error"] and "Traceback" in err["traceback"]
    assert executors.run_status(tmp_path, micro_runs[1]) == "failed"
    # re-run: finished runs are skipped (trainer not called), the failed one is retried and now succeeds
    calls.clear()
    monkeypatch.setattr(trainer, "train", _fake_train(calls))
    res = executors.run_sequential(micro_runs, tmp_path)
    assert calls == [str(tmp_path / bad)]
    assert {r["run_id"]: r["status"] for r in res}[bad] == "done"
    assert not (tmp_path / bad / "error.json").exists()
    assert all(executors.run_status(tmp_path, r) == "done" for r in micro_runs)
    # an interrupted run (checkpoints, no summary) is handed to the trainer again, which resumes it
    d = tmp_path / micro_runs[0].run_id
    (d / "summary.json").unlink()
    (d / "checkpoints" / "10").mkdir(parents=True)
    assert executors.run_status(tmp_path, micro_runs[0]) == "partial"
    calls.clear()
    executors.run_sequential(micro_runs, tmp_path)
    assert calls == [str(d)]
    # a summary from a different config is not accepted as finished
    s = json.loads((d / "summary.json").read_text())
    s["config"]["seed"] = 99
    (d / "summary.json").write_text(json.dumps(s))
    assert executors.finished_summary(d, micro_runs[0]) is None
    # a summary torn inside a multi-byte character, or holding a non-object, reads as unfinished (the run
    # is handed to the trainer, which rewrites it) rather than crashing the status check of the whole sweep
    for torn in (json.dumps(s).encode()[:-1] + b"\xc3", b"[1, 2]"):
        (d / "summary.json").write_bytes(torn)
        assert executors.finished_summary(d, micro_runs[0]) is None
        assert executors.run_status(tmp_path, micro_runs[0]) == "partial"


def test_branch_seeded_from_parent_and_parent_failure(tmp_path, monkeypatch):
    import experiments.trainer as trainer

    spec, g, rules = _spec_base("cpu-micro")
    m = g.shape.candidates(g.base.model)[0]
    runs = plan_wsd(g.base, [m], spec.budgets, rules)
    stable0 = runs[0]
    # the parent's final checkpoint is copied into the branch before the trainer starts
    ck = tmp_path / stable0.run_id / "checkpoints" / str(stable0.steps)
    ck.mkdir(parents=True)
    (ck / "marker").write_text("x")
    calls: list[str] = []
    monkeypatch.setattr(trainer, "train", _fake_train(calls))
    res = executors.run_sequential(runs, tmp_path)
    assert all(r["status"] == "done" for r in res)
    child = next(r for r in runs if r.parent and r.parent["run"] == stable0.name and r.kind == "wsd_branch")
    assert (tmp_path / child.run_id / "checkpoints" / str(stable0.steps) / "marker").read_text() == "x"
    # parent failed -> its branches are reported failed without running
    calls.clear()
    for r in runs:
        (tmp_path / r.run_id / "summary.json").unlink()
    monkeypatch.setattr(trainer, "train", _fake_train(calls, fail_names=(stable0.run_id,)))
    res = executors.run_sequential(runs, tmp_path)
    failed = {r["name"] for r in res if r["status"] == "failed"}
    assert stable0.name in failed and child.name in failed
    assert str(tmp_path / child.run_id) not in calls
    # ... with the reason in their error.json, so the report shows them failed, not pending
    assert executors.run_status(tmp_path, child) == "failed"
    assert json.loads((tmp_path / child.run_id / "error.json").read_text())["error"] == (
        f"parent {child.parent['run']!r} failed")
    # a finished parent whose checkpoint was deleted: re-running never recreates it, --retry PARENT does
    monkeypatch.setattr(trainer, "train", _fake_train(calls))
    executors.run_sequential(runs, tmp_path)
    shutil.rmtree(tmp_path / stable0.run_id / "checkpoints")
    shutil.rmtree(tmp_path / child.run_id)
    (res,) = [x for x in executors.run_sequential(runs, tmp_path) if x["name"] == child.name]
    assert res["status"] == "failed" and f"--retry {stable0.name!r} trains it again" in res["error"]


def test_job_array_export(tmp_path):
    spec, g, rules = _spec_base("cpu-micro")
    m = g.shape.candidates(g.base.model)[0]
    runs = plan_isoflop(g.base, spec.budgets, 2, rules, shape_rule=g.shape, span=spec.span) + plan_wsd(
        g.base, [m], spec.budgets, rules
    )
    from experiments.sweep import resolve

    runs = resolve(runs)
    plan = write_plan(runs, tmp_path / "plan.jsonl")
    script = slurm.export_job_array(
        runs,
        plan,
        tmp_path / "runs",
        tmp_path / "submit.sh",
        max_parallel=3,
        sbatch_options=["partition=gpu"],
    )
    text = script.read_text()
    sbatch = [ln for ln in text.splitlines() if ln.startswith("JOB=$(sbatch")]
    levels = {}
    for r in runs:
        levels[r.name] = 0 if r.parent is None else levels[r.parent["run"]] + 1
    assert len(sbatch) == max(levels.values()) + 1
    for lev, line in enumerate(sbatch):
        want = ",".join(str(i) for i, r in enumerate(runs) if levels[r.name] == lev)
        assert f"--array={want}%3" in line and "--partition=gpu" in line
        assert "$DEP" in line
    assert "--dependency=afterany:$JOB" in text  # a task checks its own parent (run-one)
    task = (tmp_path / "submit_task.sh").read_text()
    assert f"run-one --plan {plan.absolute()}" in task and '--index "$SLURM_ARRAY_TASK_ID"' in task
    import subprocess

    subprocess.run(["bash", "-n", str(script)], check=True)  # both scripts are valid bash
    subprocess.run(["bash", "-n", str(tmp_path / "submit_task.sh")], check=True)
    # the array task entry point runs one plan index (here: a bad index is a clear error)
    with pytest.raises(SystemExit):
        executors.main(
            ["run-one", "--plan", str(plan), "--index", str(len(runs)), "--runs-dir", str(tmp_path)]
        )


def test_slurm_executor_needs_submitit(tmp_path, monkeypatch, micro_runs):
    import builtins

    real = builtins.__import__

    def no_submitit(name, *a, **k):
        if name == "submitit":
            raise ImportError("no submitit")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(ImportError, match="pip install submitit"):
        slurm.run_slurm(micro_runs, tmp_path, folder=tmp_path / "slurm")


def test_progress_line(micro_runs):
    p = executors.Progress(micro_runs)
    p.start(micro_runs[0].name)
    p.finish({"name": micro_runs[0].name, "status": "done"})
    p.finish({"name": micro_runs[1].name, "status": "failed", "error": "x"})
    line = p.line()
    assert "1/3 done" in line and "1 failed" in line and "0 running" in line
    frac = micro_runs[0].incremental_flops / sum(r.incremental_flops for r in micro_runs)
    assert f"({100 * frac:.0f}%)" in line


def test_flops_per_token_model_interpolates_exactly_at_planned_shapes(micro_runs):
    from experiments.report import flops_per_token_model

    f = flops_per_token_model(micro_runs)
    for r in micro_runs:
        assert f(np.array([r.params]))[0] == pytest.approx(r.flops_per_token, rel=1e-9)
    n = np.array([max(r.params for r in micro_runs) * 10.0])
    assert f(n)[0] > max(r.flops_per_token for r in micro_runs)


def test_shape_rule_rejects_impossible_request():
    spec, g, rules = _spec_base("cpu-micro")
    with pytest.raises(ConfigError, match="sizes"):
        plan_isoflop(g.base, spec.budgets, 50, rules, shape_rule=ShapeRule(max_layers=1, max_d_model=32))
    assert LRRule(2.0, c_exp=-0.5)(N=1, D=1, C=4.0) == pytest.approx(1.0)


def test_critical_path_order_starts_longest_chains_first():
    from experiments.sweep import PlannedRun

    def run(name, flops, parent=None):
        return PlannedRun(name=name, kind="user", config={}, parent=parent, predicted_flops=flops,
                          incremental_flops=flops)

    runs = [
        run("small", 1.0),
        run("stable", 2.0),
        run("branch", 5.0, {"run": "stable", "step": 1}),  # chain stable -> branch costs 7
        run("big", 6.0),
    ]
    order = [r.name for r in executors.critical_path_order(runs)]
    assert order == ["stable", "big", "branch", "small"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_with_the_study_process(tmp_path):
    """Killing the study (parent) must not leave a worker training on: the kernel SIGTERMs it."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    script = f"""
import os, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp
from experiments.executors import _die_with_parent

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_die_with_parent) as pool:
        open({str(pid_file)!r}, "w").write(str(pool.submit(os.getpid).result()))
        pool.submit(time.sleep, 60).result()
"""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "worker never started"
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived the study process")


def test_parallel_executor_stops_at_once_when_interrupted(tmp_path, monkeypatch, micro_runs):
    """A Ctrl-C (or a time limit's SIGINT) while workers train must end the study now, not after the running
    runs finish: the KeyboardInterrupt propagates at once and no worker process is left behind; the runs it
    cut short are picked up again by the next invocation (tested above for the sequential path)."""
    import multiprocessing as mp
    import time

    calls = []

    def interrupt_once_runs_started(fs, return_when):
        calls.append(len(fs))
        time.sleep(1.0)  # the workers are now training (spawned, importing jax, compiling)
        raise KeyboardInterrupt

    monkeypatch.setattr(executors, "wait", interrupt_once_runs_started)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        executors.run_parallel(micro_runs, tmp_path, workers=2)
    assert calls == [2] and time.perf_counter() - t0 < 30
    assert mp.get_context("spawn").active_children() == [] and mp.active_children() == []
    # the pool's manager thread was joined, so it closed the call queue (else: "leaked semaphore" at exit)
    import threading

    assert not [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]
    assert not any(executors.run_status(tmp_path, r) == "done" for r in micro_runs)


def test_parallel_executor_starts_nothing_after_its_deadline(tmp_path, capsys, micro_runs):
    import time

    progress = executors.Progress(micro_runs, stream=sys.stdout)
    out = executors.run_parallel(micro_runs, tmp_path, workers=2, progress=progress,
                                 deadline=time.monotonic() - 1.0)
    assert out == [] and not any(tmp_path.iterdir())
    assert f"time limit: {len(micro_runs)} run(s) not started" in capsys.readouterr().out


def test_edge_extension_adds_the_size_one_step_beyond_an_edge_minimum():
    from experiments.sweep import edge_extension

    rule = get_study_preset("cpu-tiny").groups[0].shape
    cands = rule.candidates(get_study_preset("cpu-tiny").groups[0].base.model)
    n_of = {id(m): accounting.param_counts(m)["total"] for m in cands}
    ladder = sorted(cands, key=lambda m: n_of[id(m)])
    curve = [ladder[3], ladder[6], ladder[9]]
    params = [n_of[id(m)] for m in curve]
    step = math.log(params[1] / params[0])
    kw = dict(step=step, aspect_ratio=rule.aspect_ratio)
    assert edge_extension(params, [2.6, 2.5, 2.7], cands, **kw) is None  # bracketed
    below = edge_extension(params, [2.5, 2.6, 2.7], cands, **kw)
    above = edge_extension(params, [2.7, 2.6, 2.5], cands, **kw)
    n_below, n_above = accounting.param_counts(below)["total"], accounting.param_counts(above)["total"]
    assert n_below < params[0] and n_above > params[-1]
    # the nearest candidate to one grid step out (aspect ties aside): no candidate is much closer
    for n_new, target in ((n_below, math.log(params[0]) - step), (n_above, math.log(params[-1]) + step)):
        best = min(abs(math.log(n_of[id(m)]) - target) for m in cands)
        assert abs(math.log(n_new) - target) <= best + 0.1
    smallest = [n_of[id(m)] for m in ladder[:3]]
    with pytest.raises(ConfigError, match=r"lowest loss is at N=.*no smaller size"):
        edge_extension(smallest, [2.5, 2.6, 2.7], cands, **kw)


def test_a_crashed_worker_fails_its_own_run_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys, micro_runs):
    """A worker process that dies (here: os._exit in the post-run hook, as an out-of-memory kill would)
    breaks the whole process pool and every run in flight. The sweep must go on: the runs in flight are
    retried alone, the one that crashes its worker alone fails with error.json, the others finish. It used
    to raise BrokenProcessPool out of the study (no report) and fail the innocent run beside it."""
    import multiprocessing as mp

    import experiments.trainer as trainer

    runs_dir = tmp_path / "runs"
    monkeypatch.setattr(trainer, "train", _fake_train([]))
    executors.run_sequential(micro_runs, runs_dir)  # every run finished: workers only run the hook
    bad = executors.critical_path_order(micro_runs)[0]  # submitted first, beside another run
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "crash_hook.py").write_text(
        "import os, time\n"
        "def hook(cfg, run_dir):\n"
        f"    if run_dir.name == {bad.run_id!r}:\n"
        "        os._exit(3)\n"
        "    time.sleep(2.0)  # still in flight when the other worker dies\n"
        "    (run_dir / 'hook_ran').write_text('ok')\n"
    )
    monkeypatch.syspath_prepend(str(hooks))  # spawned workers inherit sys.path
    progress = executors.Progress(micro_runs, stream=sys.stdout)
    res = executors.run_parallel(micro_runs, runs_dir, workers=2, post_run="crash_hook:hook",
                                 progress=progress, single_thread_cpu=False)
    by_name = {r["name"]: r for r in res}
    assert len(res) == len(micro_runs)
    assert by_name[bad.name]["status"] == "failed" and "worker crashed" in by_name[bad.name]["error"]
    err = json.loads((runs_dir / bad.run_id / "error.json").read_text())
    assert "BrokenProcessPool" in err["error"]
    for r in micro_runs:
        if r is bad:
            continue
        assert by_name[r.name]["status"] == "skipped", by_name[r.name]
        assert (runs_dir / r.run_id / "hook_ran").exists()
    printed = capsys.readouterr().out
    assert "a worker process died; retrying the 2 run(s)" in printed, printed
    assert mp.get_context("spawn").active_children() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux-only")
def test_a_killed_parallel_study_leaves_no_process_behind(tmp_path, monkeypatch, micro_runs):
    """SIGKILL of the process running the parallel executor: its workers die with it, and nothing else it
    started outlives it (the multiprocessing Manager that used to hold the device queue stayed alive,
    orphaned, until killed by hand)."""
    import os
    import signal
    import subprocess
    import time

    import experiments.trainer as trainer

    runs_dir = tmp_path / "runs"
    monkeypatch.setattr(trainer, "train", _fake_train([]))
    executors.run_sequential(micro_runs, runs_dir)
    plan = tmp_path / "plan.jsonl"
    write_plan(micro_runs, plan)
    (tmp_path / "slow_hook.py").write_text(
        "import time\n"
        "def hook(cfg, run_dir):\n"
        "    (run_dir / 'hook_started').write_text('1')\n"
        "    time.sleep(120)\n"
    )
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from experiments import executors\n"
        "from experiments.sweep import read_plan\n"
        "if __name__ == '__main__':\n"
        f"    executors.run_parallel(read_plan({str(plan)!r}), {str(runs_dir)!r}, workers=2,\n"
        "                           post_run='slow_hook:hook', single_thread_cpu=False)\n"
    )
    study = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    deadline = time.time() + 90
    while len(list(runs_dir.glob("*/hook_started"))) < 2:
        assert time.time() < deadline and study.poll() is None, "workers never started"
        time.sleep(0.2)

    def descendants(pid):
        out = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
        return out

    children = descendants(study.pid)
    assert len(children) >= 2
    study.send_signal(signal.SIGKILL)
    study.wait()
    alive = children
    for _ in range(200):
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[:1]]
        if not alive:
            break
        time.sleep(0.05)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, [Path(f"/proc/{p}/cmdline").read_text() for p in alive]


def test_a_run_lost_once_with_its_worker_is_retried_not_blamed(tmp_path, monkeypatch, micro_runs):
    """The pool cannot say whose worker died, and a worker also dies idle or after returning (an OOM kill of
    the largest process): a run lost once, even alone in flight, is retried; only a second loss, alone,
    fails it."""
    import experiments.trainer as trainer

    runs_dir = tmp_path / "runs"
    monkeypatch.setattr(trainer, "train", _fake_train([]))
    executors.run_sequential(micro_runs, runs_dir)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "once_hook.py").write_text(
        "import os\n"
        "def hook(cfg, run_dir):\n"
        "    marker = run_dir / 'crashed_once'\n"
        f"    if run_dir.name == {micro_runs[1].run_id!r} and not marker.exists():\n"
        "        marker.write_text('1')\n"
        "        os._exit(3)\n"
    )
    monkeypatch.syspath_prepend(str(hooks))
    res = executors.run_parallel(micro_runs, runs_dir, workers=1, post_run="once_hook:hook",
                                 single_thread_cpu=False)
    assert sorted(r["status"] for r in res) == ["skipped"] * len(micro_runs), res
    assert not (runs_dir / micro_runs[1].run_id / "error.json").exists()


def test_a_filesystem_without_flock_warns_and_goes_on(tmp_path, monkeypatch):
    """flock fails with ENOSYS on e.g. Lustre mounted without -o flock: the study must still run there."""
    import errno
    import fcntl

    from experiments import files

    def no_flock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(files, "_UNLOCKABLE_WARNED", set())
    with pytest.warns(RuntimeWarning, match="this filesystem has no flock"):
        with files.exclusive_lock(tmp_path / "x.lock", "x"):
            pass
    import experiments.trainer as trainer

    monkeypatch.setattr(trainer, "train", _fake_train([]))
    spec, g, rules = _spec_base("cpu-micro")
    run = plan_isoflop(g.base, spec.budgets[:1], 1, rules, shape_rule=g.shape, span=spec.span)[0]
    with pytest.warns(RuntimeWarning, match="no flock"):
        assert executors.run_one(run, tmp_path / "runs")["status"] == "done"


# ----- planner arithmetic against hand-derived values -------------------------------------------------------
_STEPLAW = LRRule(coef=1.79, n_exp=-0.713, d_exp=0.307)  # an lr rule that reads N and D, not only C


def _fixed_batch(batch=8, min_steps=1):
    return BatchRule(coef=batch * 64, min_batch=batch, max_batch=batch, min_steps=min_steps)


def test_steps_are_the_nearest_whole_step_and_lr_and_warmup_follow_the_trained_tokens():
    """D = C / F(s) is rounded to the NEAREST whole step (neither floor nor ceil), and the lr rule and the
    warmup read the steps / tokens actually trained, for budget runs and N x D grid runs alike."""
    _, g, _ = _spec_base()
    rules = Rules(lr=_STEPLAW, batch=_fixed_batch(8), warmup_fraction=0.1)
    L = g.base.data.seq_len
    assert L == 64
    m = g.shape.candidates(g.base.model)[4]
    fpt = accounting.flops_per_token(m, L)["training"]
    n = accounting.param_counts(m)["total"]
    # (target steps C / (F B L), whole steps expected, warmup = round(0.1 steps))
    cases = ((100.7, 101, 10), (100.3, 100, 10), (37.6, 38, 4), (24.4, 24, 2))
    runs = resolve([budget_run(g.base, m, fpt * s * 8 * L, rules, name=f"b{s}") for s, _, _ in cases])
    runs += plan_grid(g.base, [m], [s * 8 * L for s, _, _ in cases], rules)
    for r, (_, steps, warmup) in zip(runs, cases + cases, strict=True):
        assert (r.steps, r.batch_size, r.tokens) == (steps, 8, steps * 8 * L), r.name
        assert r.experiment.optimizer.warmup_steps == warmup, r.name
        assert r.learning_rate == pytest.approx(1.79 * n**-0.713 * (steps * 8 * L) ** 0.307, rel=1e-12)
        assert r.predicted_flops == pytest.approx(fpt * steps * 8 * L, rel=1e-12)


def test_shape_candidates_are_every_pair_in_the_closed_aspect_band():
    """Every (n_layers, d_model = k head_dim) with min_layers <= n_layers <= max_layers, d_model <=
    max_d_model and aspect_ratio / tol <= d_model / n_layers <= aspect_ratio * tol, both ends included."""
    rule = ShapeRule(head_dim=8, aspect_ratio=32.0, aspect_tolerance=4.0, max_layers=6, max_d_model=256)
    _, g, _ = _spec_base()
    # by hand in integers: 8 <= d / L <= 128  <=>  8 L <= d <= 128 L
    want = {(L, d) for L in range(1, 7) for d in range(8, 257, 8) if 8 * L <= d <= 128 * L}
    assert {(1, 128), (2, 256), (6, 48), (6, 256), (1, 8)} <= want
    got = rule.candidates(g.base.model)
    assert {(m.n_layers, m.d_model) for m in got} == want and len(got) == len(want)
    assert all(m.n_heads * 8 == m.d_model and m.resolved_head_dim == 8 for m in got)


def test_isoflop_sizes_are_log_uniform_over_the_span_around_the_tokens_per_param_centre():
    """The n sizes of a curve sit nearest (in log N) to log-uniform targets over a factor ``span``, centred on
    the candidate whose D / N = C / (F N) is closest to tokens_per_param (in log)."""
    spec, g, rules = _spec_base()
    L = g.base.data.seq_len
    cands = g.shape.candidates(g.base.model)
    logn = np.log([accounting.param_counts(m)["total"] for m in cands])
    fpt = np.array([accounting.flops_per_token(m, L)["training"] for m in cands])
    for c in spec.budgets:
        for n, span in ((5, 10.0), (4, 8.0), (2, 16.0)):
            runs = plan_isoflop(g.base, [c], n, rules, shape_rule=g.shape, span=span, tokens_per_param=64.0)
            centre = logn[int(np.argmin(np.abs(np.log(c / fpt / np.exp(logn) / 64.0))))]
            got = sorted(math.log(r.params) for r in runs)
            for i, x in enumerate(got):
                target = centre + math.log(span) * (i / (n - 1) - 0.5)
                # the candidate nearest the target, up to the aspect tie-break (0.05 |log aspect| <= 0.07)
                assert abs(x - target) <= np.abs(logn - target).min() + 0.07, (c, n, i)
    # one size: the candidate nearest in log N to the centre, near-ties going to the nominal aspect ratio --
    # no other candidate is both nearer in N and no farther from the nominal aspect
    aspect = np.array([abs(math.log(m.d_model / m.n_layers / g.shape.aspect_ratio)) for m in cands])
    for c in np.geomspace(1e10, 1e12, 9):
        (r,) = plan_isoflop(g.base, [c], 1, rules, shape_rule=g.shape, span=1.0, tokens_per_param=64.0)
        centre = logn[int(np.argmin(np.abs(np.log(c / fpt / np.exp(logn) / 64.0))))]
        p = next(i for i, m in enumerate(cands) if m == r.experiment.model)
        better = (np.abs(logn - centre) < abs(logn[p] - centre)) & (aspect <= aspect[p])
        assert not better.any(), (c, [(cands[i].n_layers, cands[i].d_model) for i in np.flatnonzero(better)])


def test_wsd_batch_lr_and_no_reuse_compute_follow_the_documented_rule():
    """plan_wsd: the batch from the smallest budget (so every branch keeps >= min_steps steps), the lr of the
    rule at the geometric-mean budget times sqrt(batch / rule batch there), and summarize's predicted_flops
    (compute without reuse) = the branches trained from scratch, no stable segment."""
    spec, g, rules = _spec_base()
    L = g.base.data.seq_len
    m = g.shape.candidates(g.base.model)[5]
    fpt = accounting.flops_per_token(m, L)["training"]
    runs = plan_wsd(g.base, [m], spec.budgets, rules)
    c_mid = (3e10 * 1e11 * 3e11) ** (1 / 3)
    b = spec.batch.batch_size(3e10, 3e10 / fpt, L)
    b_mid = spec.batch.batch_size(c_mid, c_mid / fpt, L)
    assert b < b_mid  # the square-root rescaling is exercised
    lr = g.lr.coef * c_mid**g.lr.c_exp * math.sqrt(b / b_mid)
    branches = [r for r in runs if r.kind == "wsd_branch"]
    for r in runs:
        assert r.batch_size == b and r.learning_rate == pytest.approx(lr, rel=1e-12), r.name
    assert min(r.steps for r in branches) >= spec.batch.min_steps
    s = summarize(runs)
    assert s.predicted_flops == pytest.approx(sum(fpt * r.steps * b * L for r in branches), rel=1e-12)
    assert s.study_flops == pytest.approx(
        fpt * b * L * (max(r.steps for r in runs if r.kind == "wsd_stable")
                       + sum(r.steps - r.parent["step"] for r in branches)), rel=1e-12)


def test_a_child_must_be_longer_than_the_step_it_resumes_from():
    _, g, rules = _spec_base()
    m = g.shape.candidates(g.base.model)[2]
    a = budget_run(g.base, m, 3e10, rules, name="a")
    same_length = dataclasses.replace(a, name="b", parent={"run": "a", "step": resolve([a])[0].steps})
    with pytest.raises(ConfigError, match=r"parent step \d+ >= its own length"):
        resolve([a, same_length])


def test_batch_rule_rounds_to_the_nearest_power_of_two_then_halves_below_min_steps():
    # raw = coef * C^exp / seq_len sequences; log2(48) = 5.58 -> 64, log2(40) = 5.32 -> 32
    assert BatchRule(coef=48 * 64).batch_size(1.0, 1e12, 64) == 64
    assert BatchRule(coef=40 * 64).batch_size(1.0, 1e12, 64) == 32
    assert BatchRule(coef=2 * 64, exp=0.5).batch_size(16.0, 1e12, 64) == 8  # 2 x 16^0.5 = 8
    assert BatchRule(coef=1e6 * 64, max_batch=512).batch_size(1.0, 1e12, 64) == 512
    rule = BatchRule(coef=64 * 64, min_batch=4, min_steps=50)
    assert rule.batch_size(1.0, 50 * 64 * 64, 64) == 64  # exactly min_steps steps: kept
    assert rule.batch_size(1.0, 49.5 * 64 * 64, 64) == 32  # 49.5 steps: halved (99 steps)
    assert rule.batch_size(1.0, 10.0, 64) == 4  # never below min_batch


def test_a_prior_rule_refits_its_coefficient_as_the_geometric_mean_of_the_cells():
    """Cells too close in C keep the prior's exponent; the coefficient is exp(mean(log(best_lr / shape))), the
    least-squares answer in log space: best lrs 1x and 4x the prior shape give 2, not the arithmetic 2.5."""
    cells = []
    for C, a in ((1e10, 1.0), (3e10, 4.0)):
        opt = a * C**-0.2
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            cells.append({"N": C, "D": 1.0, "C": C, "lr": opt * f, "loss": 3 + 0.2 * math.log(f) ** 2})
    rule = fit_lr_rule(cells, prior=LRRule(coef=9.9, c_exp=-0.2))
    assert rule.c_exp == -0.2 and rule.coef == pytest.approx(2.0, rel=1e-9)


def test_each_group_of_a_preset_trains_with_its_named_optimiser():
    """A group's name ends with its optimiser (dense-muon, moe-adamw, ...): a Muon group planned with the
    AdamW base would compare AdamW with itself."""
    for name in STUDY_PRESETS:
        for g in get_study_preset(name).groups:
            assert g.base.optimizer.name == g.name.rsplit("-", 1)[1], (name, g.name)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), None])
def test_a_summary_without_a_finite_eval_loss_is_not_finished(tmp_path, micro_runs, loss):
    """A diverged run's summary (NaN / inf / missing loss) must not count as finished: it would be skipped on
    every re-run and fed to the fits. The same summary with a finite loss is finished."""
    r = micro_runs[0]
    s = {"steps": r.steps, "config": r.config, "eval_mode": "inference", "final_eval_loss": 3.0}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert executors.finished_summary(tmp_path, r) is not None
    (tmp_path / "summary.json").write_text(json.dumps({**s, "final_eval_loss": loss}))
    assert executors.finished_summary(tmp_path, r) is None


# ----- run bookkeeping: progress tally, run status, atomic writes -------------------------------------------
def test_progress_counts_reused_runs_as_spent_compute(micro_runs):
    """A run skipped because it had finished earlier is compute already spent: the tally counts it."""
    p = executors.Progress(micro_runs)
    p.finish({"name": micro_runs[0].name, "status": "skipped"})
    p.finish({"name": micro_runs[1].name, "status": "done"})
    assert p.spent_flops == pytest.approx(micro_runs[0].incremental_flops + micro_runs[1].incremental_flops)
    assert "2/3 done (1 reused)" in p.line()


def test_an_empty_checkpoint_directory_is_pending_not_partial(tmp_path, micro_runs):
    r = micro_runs[0]
    (tmp_path / r.run_id / "checkpoints").mkdir(parents=True)
    assert executors.run_status(tmp_path, r) == "pending"
    (tmp_path / r.run_id / "checkpoints" / "5").mkdir()
    assert executors.run_status(tmp_path, r) == "partial"


def test_a_summary_of_other_steps_is_not_finished(tmp_path, micro_runs):
    r = micro_runs[0]
    s = {"steps": r.steps, "config": r.config, "eval_mode": "inference", "final_eval_loss": 3.0}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert executors.finished_summary(tmp_path, r) is not None
    (tmp_path / "summary.json").write_text(json.dumps({**s, "steps": r.steps + 1}))
    assert executors.finished_summary(tmp_path, r) is None


def test_an_atomic_write_interrupted_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from experiments import files

    target = tmp_path / "summary.json"
    target.write_text("old content")

    def torn(self, text, *a, **k):  # a process killed after writing part of the text
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError("killed mid-write")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="killed mid-write"):
        files.write_text_atomic(target, "new content")
    assert target.read_text() == "old content"
    monkeypatch.undo()
    files.write_text_atomic(target, "new content")
    assert target.read_text() == "new content" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_atomic_write_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """The new text is fsynced before the rename (else a crash soon after can leave the renamed file empty)
    and the directory after it (else the rename itself can be lost)."""
    from experiments import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def spy_replace(a, b):
        events.append(("replace", str(a)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "summary.json"
    files.write_text_atomic(target, "done")
    tmp, folder = os.path.realpath(tmp_path / "summary.json.tmp"), os.path.realpath(tmp_path)
    seen = [(k, os.path.realpath(p)) for k, p in events]
    assert seen == [("fsync", tmp), ("replace", tmp), ("fsync", folder)]
    assert target.read_text() == "done"


def test_summary_counts_tokens_flops_epochs_and_mfu_by_hand():
    """summary.json's bookkeeping from the config and the dataset: tokens = steps x batch x seq_len, FLOPs =
    FLOPs/token x tokens, epochs = tokens / train-split tokens, eval tokens = distinct val windows scored
    (at most the split's), MFU = achieved FLOP/s over the peak of all devices."""
    from types import SimpleNamespace

    from experiments.run_record import build_summary

    cfg = get_study_preset("cpu-micro").groups[0].base.override(
        ["trainer.steps=7", "trainer.peak_flops=1e12", "trainer.eval_steps=3"])
    L, B = cfg.data.seq_len, cfg.data.batch_size
    split = {"train": 1000, "val": 300}
    ds = SimpleNamespace(n_windows=lambda s, seq_len: 2, n_tokens=lambda s: split[s], entropy_rate=1.0,
                         unigram_entropy=2.0)
    meta = {"timed_tokens": 4000, "train_seconds": 2.0, "wall_seconds": 3.0}
    s = build_summary(cfg, ds, final_loss=3.0, final_eval_loss=3.1, meta=meta, n_devices=4)
    tokens = 7 * B * L
    assert s["steps"] == 7 and s["tokens"] == tokens
    assert s["flops"] == pytest.approx(s["flops_per_token"] * tokens)
    assert s["epochs"] == pytest.approx(tokens / 1000)
    assert s["eval_tokens"] == 2 * L  # 3 x eval_batch windows asked of a 2-window split
    assert s["tokens_per_second"] == pytest.approx(2000.0)
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * 2000.0 / (1e12 * 4))
    wide = SimpleNamespace(**{**vars(ds), "n_windows": lambda s, seq_len: 10**6})
    assert build_summary(cfg, wide, final_loss=3.0, final_eval_loss=3.1, meta=meta,
                         n_devices=4)["eval_tokens"] == 3 * cfg.eval_batch_size * L
