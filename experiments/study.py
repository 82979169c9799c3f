"""The one-command scaling study: plan -> train (+ downstream battery) -> fit -> report.

    python -m experiments.study --preset cpu-tiny --out DIR [--workers N] [--executor parallel]

Layout of DIR: ``plan.jsonl`` (the plan, editable: re-running uses it as-is, re-hashing edited configs),
``lr_rules.json`` (fitted LR rules when the preset sweeps LR), ``runs/<run_id>/`` (one directory per run,
named by the config hash: ``summary.json``, ``metrics.jsonl``, ``downstream.json`` (the task battery),
checkpoints, ``error.json`` on failure), ``data/`` (the synthetic corpus), ``.jax_cache/`` (compiled
executables shared by runs of one shape), ``report.md``, ``report.json``, ``figures/*.png``, ``study.json``
(the preset's name: a directory holds one study, and another preset is refused there).

Run ids hash the resolved config (execution-only fields and fields at their defaults excluded), so a code
version that changes a preset or the planner gives new ids; an existing ``plan.jsonl`` is reused as written,
and a study warns when its runs' corpus or validation settings differ from what the preset now plans (edge
extensions would be planned with the new ones): start a new DIR after upgrading.

After training, an isoFLOP curve whose lowest loss is at an edge of its size grid gets one more size beyond
that edge (``StudySpec.extend_edges`` rounds, appended to ``plan.jsonl`` as ``...-ext`` runs).
Re-running the same command reuses finished runs, resumes interrupted ones, retries failed ones, and refits.
``--retry NAME`` reruns just that run (its error and partial state are cleared); ``--fit-only`` skips
training; ``--export-slurm FILE`` writes a job-array script instead of training; ``--executor slurm`` submits
through submitit, with ``--slurm KEY=VALUE`` (repeatable) for its parameters (e.g. ``--slurm
slurm_partition=gpu --slurm gpus_per_node=1``; the time limit ``timeout_min`` defaults to 24 hours).
``--dry`` rehearses the preset on the CPU: the same plan, every run cut to a few steps
(experiments/rehearsal.py), the whole pipeline end to end in minutes, numbers meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments import executors, slurm
from experiments.config import ConfigError, ExperimentConfig
from experiments.files import BusyError, exclusive_lock, read_json_object, write_text_atomic
from experiments.hparam_rules import LRRule, fit_lr_rule
from experiments.study_presets import STUDY_PRESETS, GroupSpec, StudySpec, get_study_preset
from experiments.sweep import (
    PLAN_FILE,
    PlannedRun,
    Rules,
    budget_run,
    distinct_runs,
    edge_extension,
    isoflop_run_name,
    pick_sizes,
    plan_heldout,
    plan_isoflop,
    plan_lr_sweep,
    plan_seed_replicates,
    plan_wsd,
    read_plan,
    resolve,
    summarize,
    write_plan,
)

LR_RULES_FILE = "lr_rules.json"
STUDY_LOCK = ".study.lock"
LR_STAGE_PLAN_FILE = "plan_lr_stage.jsonl"  # --export-slurm's first job array (the LR sweep)
EXTENSION_SUFFIX = "-ext"  # isoFLOP runs added beyond a curve's edge (plan_edge_extensions)
REHEARSAL_FILE = "rehearsal.json"
STUDY_FILE = "study.json"  # {"preset": name}: a directory holds one study
RETRY_WITH_FIT_ONLY = ("--retry clears a run so that it trains again, and --fit-only trains nothing: the run "
                       "would only be deleted; drop one of them")
REHEARSAL_NOTE = (
    "REHEARSAL (--dry): every run was cut to a few steps on a tiny batch to check the pipeline; "
    "losses, fits and predictions below are meaningless"
)
# The downstream battery, called in each worker after training as fn(cfg, run_dir) (experiments/evaluate.py).
POST_RUN = "experiments.evaluate:post_run"


def _with_data_dir(base, out: Path):
    # synthetic_dir is execution-only (not in the run hash): all runs share one corpus under DIR/data.
    return dataclasses.replace(base, data=dataclasses.replace(base.data, synthetic_dir=str(out / "data")))


def _rules(spec: StudySpec, lr: LRRule) -> Rules:
    return Rules(lr=lr, batch=spec.batch, warmup_fraction=spec.warmup_fraction)


def plan_lr_stage(spec: StudySpec, out: Path) -> list[PlannedRun]:
    """Stage 1: LR-sweep runs (the middle size of the smallest budgets) for groups that sweep LR."""
    runs: list[PlannedRun] = []
    for g in spec.groups:
        if not g.lr_sweep_factors:
            continue
        base = _with_data_dir(g.base, out)
        budgets = sorted(spec.budgets)[: g.lr_sweep_budgets]
        iso = plan_isoflop(
            base,
            budgets,
            1,
            _rules(spec, g.lr),
            shape_rule=g.shape,
            span=1.0,
            tokens_per_param=spec.tokens_per_param,
            group=g.name,
        )
        runs += plan_lr_sweep(iso, g.lr_sweep_factors)
    return runs


def fit_lr_rules(spec: StudySpec, runs: Sequence[PlannedRun], runs_dir: Path) -> dict[str, dict]:
    """Fit each sweeping group's LR rule from its finished LR-sweep runs; clamp to the swept range."""
    out = {}
    for g in spec.groups:
        cells = []
        for r in runs:
            if r.group != g.name or r.kind != "lr_sweep":
                continue
            s = executors.finished_summary(executors.run_dir(runs_dir, r), r)
            loss = s["final_eval_loss"] if s else float("nan")
            cells.append({"N": r.params, "D": r.tokens, "C": r.budget, "lr": r.learning_rate, "loss": loss})
        if not cells:
            continue
        try:
            fitted, error = fit_lr_rule(cells, form=g.lr_rule_form, prior=g.lr), None
        except ValueError as e:
            fitted, error = g.lr, str(e)
        # lr_rules.json is strict JSON: an unfinished or diverged cell's loss is null
        cells = [{**c, "loss": c["loss"] if math.isfinite(c["loss"]) else None} for c in cells]
        out[g.name] = {"rule": fitted.to_dict(), "cells": cells, "error": error}
    return out


def _clamped(g: GroupSpec, fitted: dict | None) -> LRRule:
    if not fitted or fitted.get("error"):
        return g.lr
    return LRRule.from_dict(fitted["rule"])


def _among(budget: float, budgets: Sequence[float]) -> bool:
    return any(math.isclose(budget, b, rel_tol=1e-9) for b in budgets)


def plan_main_stage(spec: StudySpec, out: Path, lr_rules: dict[str, dict]) -> list[PlannedRun]:
    """Stage 2: isoFLOP + held-out (+ WSD) runs of every group with its (fitted) LR rule."""
    runs: list[PlannedRun] = []
    for field_name in ("replicate_budgets", "replicate_middle_budgets"):
        unknown = [b for b in getattr(spec, field_name)
                   if not _among(b, (*spec.budgets, *spec.heldout_budgets))]
        if unknown:
            raise ConfigError(f"study {spec.name!r}: {field_name} {unknown} are not among its budgets "
                              f"{spec.budgets} or held-out budgets {spec.heldout_budgets}")
    for g in spec.groups:
        base, rules, lr_range = _group_setup(spec, g, out, lr_rules)
        iso = plan_isoflop(
            base,
            spec.budgets,
            spec.sizes_per_budget,
            rules,
            shape_rule=g.shape,
            span=spec.span,
            tokens_per_param=spec.tokens_per_param,
            group=g.name,
        )
        held = plan_heldout(
            base,
            spec.heldout_budgets,
            rules,
            shape_rule=g.shape,
            tokens_per_param=spec.tokens_per_param,
            group=g.name,
        )
        wsd: list[PlannedRun] = []
        if spec.wsd_sizes:
            mid = sorted(spec.budgets)[len(spec.budgets) // 2]
            models = pick_sizes(
                g.shape.candidates(base.model),
                mid,
                spec.wsd_sizes,
                seq_len=base.data.seq_len,
                span=spec.wsd_span,
                tokens_per_param=spec.tokens_per_param,
                aspect_ratio=g.shape.aspect_ratio,
            )
            wsd = plan_wsd(
                base, models, spec.budgets, rules, decay_fraction=spec.wsd_decay_fraction, group=g.name
            )
        group_runs = iso + held + wsd
        if lr_range is not None:
            group_runs = [_clamp_lr(r, *lr_range) for r in group_runs]
        replicated = _curve_runs(group_runs, spec.replicate_budgets)
        middle = _middle_sizes(group_runs, spec.replicate_middle_budgets)
        replicated += [r for r in middle if r not in replicated]
        if spec.replicate_seeds and replicated:
            group_runs += plan_seed_replicates(replicated, spec.replicate_seeds)
        runs += group_runs
    return resolve(runs)


def _group_setup(
    spec: StudySpec, g: GroupSpec, out: Path, lr_rules: dict[str, dict]
) -> tuple[ExperimentConfig, Rules, tuple[float, float] | None]:
    """A group's base config (data under ``out``), its hyperparameter rules (the fitted LR rule where it
    swept LR) and the swept LR range its runs are clamped to (None without a sweep)."""
    base = _with_data_dir(g.base, out)
    rules = _rules(spec, _clamped(g, lr_rules.get(g.name)))
    swept = [c["lr"] for c in (lr_rules.get(g.name) or {}).get("cells", [])]
    # keep the fitted rule inside the swept lr range (a rule from 2 cells extrapolates wildly)
    return base, rules, ((min(swept), max(swept)) if swept else None)


def plan_edge_extensions(
    spec: StudySpec,
    out: Path,
    runs: Sequence[PlannedRun],
    lr_rules: dict[str, dict],
    loss_of: Callable[[PlannedRun], float | None],
) -> list[PlannedRun]:
    """One more isoFLOP run per curve whose lowest loss sits at an edge of its size grid: the shape one grid
    step beyond that edge (:func:`experiments.sweep.edge_extension`), fitted like the others and named
    ``...-ext``; at most ``spec.extend_edges`` per curve. ``loss_of``: a run's final loss, None if not
    finished -- a curve with an unfinished run is left alone. A pure function of the plan and the losses, so
    a re-run after an interruption plans the same runs again and finds them finished."""
    if spec.extend_edges <= 0:
        return []
    step = math.log(spec.span) / max(spec.sizes_per_budget - 1, 1)
    names = {r.name for r in runs}
    new: list[PlannedRun] = []
    for g in spec.groups:
        base, rules, lr_range = _group_setup(spec, g, out, lr_rules)
        cands = g.shape.candidates(base.model)
        for c in spec.budgets:
            curve = [r for r in _curve_runs(runs, (c,)) if r.group == g.name and r.kind == "isoflop"]
            losses = [loss_of(r) for r in curve]
            if not curve or any(x is None for x in losses):
                continue
            if sum(r.name.endswith(EXTENSION_SUFFIX) for r in curve) >= spec.extend_edges:
                continue
            try:
                m = edge_extension([r.params for r in curve], losses, cands, step=step,
                                   aspect_ratio=g.shape.aspect_ratio)
                if m is None:
                    continue
                name = isoflop_run_name(g.name, "isoflop", c, m) + EXTENSION_SUFFIX
                if name in names:
                    continue
                run = budget_run(base, m, c, rules, name=name, kind="isoflop", group=g.name, fit=True)
            except ConfigError as e:
                print(f"[study] cannot extend {g.name}'s isoFLOP curve at C={c:.3g}: {e}")
                continue
            new.append(_clamp_lr(run, *lr_range) if lr_range is not None else run)
    return resolve(new)


def _curve_runs(runs: Sequence[PlannedRun], budgets: Sequence[float]) -> list[PlannedRun]:
    """The isoFLOP and held-out runs at ``budgets`` (the runs seed replicates may copy)."""
    return [r for r in runs if r.kind in ("isoflop", "heldout") and r.budget is not None
            and _among(r.budget, budgets)]


def _middle_sizes(runs: Sequence[PlannedRun], budgets: Sequence[float]) -> list[PlannedRun]:
    """Per budget in ``budgets``: the isoFLOP (or held-out) run nearest the curve's middle in log N."""
    out = []
    for c in budgets:
        curve = sorted(_curve_runs(runs, (c,)), key=lambda r: r.params)
        if curve:
            mid = sum(math.log(r.params) for r in curve) / len(curve)
            out.append(min(curve, key=lambda r: abs(math.log(r.params) - mid)))
    return out


def _clamp_lr(r: PlannedRun, lo: float, hi: float) -> PlannedRun:
    cfg = r.experiment
    lr = min(max(cfg.optimizer.learning_rate, lo), hi)
    if lr == cfg.optimizer.learning_rate:
        return r
    c2 = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=lr))
    return dataclasses.replace(r, config=c2.to_dict())


def default_workers(spec: StudySpec) -> int:
    if spec.workers is not None:
        return spec.workers
    import jax

    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def parse_slurm_params(items: Sequence[str]) -> dict[str, Any]:
    """``["slurm_partition=gpu", "timeout_min=720", 'slurm_additional_parameters={"qos": "hi"}']`` ->
    submitit parameters: a value that is JSON (a number, true/false, an object, a list) is parsed as JSON,
    anything else stays a string -- so an account "007" (not a JSON number) stays "007"."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--slurm {item!r}: expected KEY=VALUE (e.g. slurm_partition=gpu)")
        val = val.strip()
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def execute(
    runs: Sequence[PlannedRun],
    runs_dir: Path,
    *,
    workers: int,
    post_run: str | None,
    executor: str = "auto",
    slurm_params: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Train ``runs`` with the chosen executor; ``slurm_params`` go to ``slurm.run_slurm`` (submitit's
    ``update_parameters``) for ``executor="slurm"``. An experiment planned twice (same run_id) is trained
    once (``sweep.distinct_runs``). ``deadline`` (``time.monotonic()``; local executors): no run starts
    after it."""
    runs = distinct_runs(runs)
    progress = executors.Progress(runs, stream=sys.stdout)
    cache = str(runs_dir.parent / ".jax_cache")
    if executor == "sequential" or (executor == "auto" and workers <= 1):
        return executors.run_sequential(
            runs, runs_dir, post_run=post_run, progress=progress, compile_cache=cache, deadline=deadline
        )
    if executor in ("parallel", "auto"):
        return executors.run_parallel(
            runs, runs_dir, workers=workers, post_run=post_run, progress=progress, compile_cache=cache,
            deadline=deadline,
        )
    if executor == "slurm":
        return slurm.run_slurm(
            runs, runs_dir, folder=runs_dir.parent / "slurm", post_run=post_run, **(slurm_params or {})
        )
    raise ValueError(f"unknown executor {executor!r}; choose auto, sequential, parallel or slurm")


def _not_yet_run(runs: Sequence[PlannedRun], runs_dir: Path) -> list[str]:
    """Names of the runs that have neither finished nor failed (pending, or interrupted part-way)."""
    ended = ("done", "failed")
    return [r.name for r in distinct_runs(runs) if executors.run_status(runs_dir, r) not in ended]


def _retry_runs(runs: Sequence[PlannedRun], names: Sequence[str], runs_dir: Path,
                plan_path: Path) -> list[PlannedRun]:
    """Clear the run directories ``--retry`` names (by name or run id) and return what to train: those runs
    and their ancestors (a branch starts from its parent's checkpoint: a finished ancestor is reused, an
    unfinished one trained first), in plan order. Nothing else of the plan is trained. A run directory that
    another process is training in is not cleared: the retry is refused, naming that process."""
    by_name = {r.name: r for r in runs}
    chosen: set[str] = set()
    for name in names:
        match = [r for r in runs if r.name == name or r.run_id == name]
        if not match:
            raise SystemExit(f"--retry {name!r}: no such run in {plan_path}")
        d = executors.run_dir(runs_dir, match[0])
        if d.exists():
            try:
                with exclusive_lock(d / executors.RUN_LOCK, f"the run directory {d} ({match[0].name})"):
                    shutil.rmtree(d, ignore_errors=True)
            except BusyError as e:
                raise SystemExit(f"--retry {name!r}: {e}") from None
            print(f"[study] cleared {d} for a retry")
        for r in match:
            chosen.add(r.name)
            while r.parent is not None:
                r = by_name[r.parent["run"]]
                chosen.add(r.name)
    return [r for r in runs if r.name in chosen]


def _broken_sweep_runs(runs: Sequence[PlannedRun], runs_dir: Path) -> list[tuple[str, str]]:
    """(name, error) of the failed runs whose failure says nothing about their learning rate: a diverged run
    (NonFiniteLossError) is a result -- that lr is too high -- but a crash, an out-of-memory kill or a data
    error is not, and a rule fitted without the cell would be frozen into the plan."""
    out = []
    for r in distinct_runs(runs):
        if executors.run_status(runs_dir, r) != "failed":
            continue
        err = read_json_object(executors.run_dir(runs_dir, r) / executors.ERROR_FILE) or {}
        msg = str(err.get("error", "unknown error"))
        if not msg.startswith("NonFiniteLossError"):
            out.append((r.name, msg[:300]))
    return out


def _final_loss(runs_dir: Path, r: PlannedRun) -> float | None:
    s = executors.finished_summary(executors.run_dir(runs_dir, r), r)
    return None if s is None else float(s["final_eval_loss"])


def _prepare_corpus(runs: Sequence[PlannedRun], out: Path) -> None:
    """Generate each synthetic corpus the runs read once, in this process, before workers start (no race).
    From the runs, not the presets: a --dry rehearsal or an edited plan may ask for another corpus size."""
    from experiments.trainer import open_dataset

    seen = set()
    for r in runs:
        data = r.config["data"]
        key = json.dumps(data, sort_keys=True)
        if data.get("path") == "synthetic" and key not in seen:
            seen.add(key)
            open_dataset(r.experiment, out)


def _post_run(spec: StudySpec, enabled: bool) -> str | None:
    if not (spec.downstream and enabled):
        return None
    try:
        mod, _, fn = POST_RUN.partition(":")
        getattr(__import__(mod, fromlist=[fn]), fn)
    except (ImportError, AttributeError):
        print(f"[study] downstream battery {POST_RUN} not available; skipping downstream evaluation")
        return None
    return POST_RUN


def _rehearsal(spec: StudySpec, out: Path, steps: int) -> Callable[[list[PlannedRun]], list[PlannedRun]]:
    """The plan transform of a --dry study; marks ``out`` as a rehearsal directory."""
    import jax

    from experiments.rehearsal import rehearse

    write_text_atomic(out / REHEARSAL_FILE, json.dumps({"preset": spec.name}) + "\n")
    on_gpu = jax.default_backend() == "gpu"
    return lambda runs: rehearse(runs, steps=steps, devices=jax.device_count(), keep_cudnn=on_gpu)


def _stale_plan_settings(spec: StudySpec, runs: Sequence[PlannedRun]) -> list[str]:
    """Where a reused plan's runs were planned with other corpus or validation settings than the preset now
    gives (an earlier version of it): their losses are not comparable with runs planned now, such as edge
    extensions, and a synthetic corpus of another size cannot share the study's data directory."""
    def settings(c: ExperimentConfig) -> dict[str, int]:
        return {"data.n_train_tokens": c.data.n_train_tokens, "data.n_val_tokens": c.data.n_val_tokens,
                "trainer.eval_steps": c.trainer.eval_steps, "eval batch": c.eval_batch_size}

    out = []
    for g in spec.groups:
        now = settings(g.base.validate())
        seen: dict[str, set] = {k: set() for k in now}
        for r in runs:
            if r.group == g.name:
                for k, v in settings(r.experiment).items():
                    seen[k].add(v)
        diff = [f"{k} {sorted(v)} (now {now[k]})" for k, v in seen.items() if v and v != {now[k]}]
        if diff:
            out.append(f"was planned by an earlier version of preset {spec.name!r} (group {g.name}: "
                       f"{'; '.join(diff)}): its runs are kept as planned, but runs planned now (edge "
                       "extensions) would differ from them; start a new --out to plan the study afresh")
    return out


def run_study(
    spec: StudySpec,
    out: str | Path,
    *,
    workers: int | None = None,
    executor: str = "auto",
    fit_only: bool = False,
    retry: Sequence[str] = (),
    downstream: bool = True,
    export_slurm: str | None = None,
    dry: bool = False,
    dry_steps: int = 4,
    slurm_params: dict[str, Any] | None = None,
    train_limit_s: float | None = None,
) -> dict[str, Any]:
    """Plan (or re-read DIR/plan.jsonl), execute, fit and write the report; returns report.json's dict.
    ``dry``: a CPU rehearsal of the same plan (experiments/rehearsal.py), roots cut to ``dry_steps`` steps,
    in a directory of its own. ``slurm_params``: submitit parameters of ``executor="slurm"``.
    ``train_limit_s``: no run starts once this many seconds have passed since the call (local executors;
    runs in flight finish); the study then fits and reports what finished, and the rest stay pending for
    the next invocation -- a fixed time budget (a lent GPU, a queue slot) still ends with a report.
    One study command at a time per directory: a second is refused while the first holds its lock."""
    deadline = None if train_limit_s is None else time.monotonic() + train_limit_s
    if train_limit_s is not None and executor == "slurm":
        raise SystemExit("--train-limit-s applies to the local executors, not to --executor slurm")
    out = Path(out).absolute()
    if fit_only and not (out / PLAN_FILE).exists():
        raise SystemExit(f"--fit-only: {out / PLAN_FILE} does not exist, so nothing of this study has been "
                         "planned or trained yet; run it without --fit-only first")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out / STUDY_LOCK, f"the study directory {out}"):
            return _run_locked(spec, out, workers=workers, executor=executor, fit_only=fit_only, retry=retry,
                               downstream=downstream, export_slurm=export_slurm, dry=dry, dry_steps=dry_steps,
                               slurm_params=slurm_params, train_limit_s=train_limit_s, deadline=deadline)
    except BusyError as e:
        raise SystemExit(str(e)) from None


def _run_locked(
    spec: StudySpec,
    out: Path,
    *,
    workers: int | None,
    executor: str,
    fit_only: bool,
    retry: Sequence[str],
    downstream: bool,
    export_slurm: str | None,
    dry: bool,
    dry_steps: int,
    slurm_params: dict[str, Any] | None,
    train_limit_s: float | None,
    deadline: float | None,
) -> dict[str, Any]:
    """``run_study`` once it holds the study directory's lock."""
    from experiments.report import build_report, print_summary, write_report

    if retry and not (out / PLAN_FILE).exists():  # before stage 1 trains and freezes a plan
        raise SystemExit(f"--retry: {out / PLAN_FILE} does not exist, so no run of this study has been "
                         "planned yet; run it without --retry first")
    # A rehearsal directory and a real study directory refuse each other.
    rehearsed = (out / REHEARSAL_FILE).exists()
    if dry and (out / PLAN_FILE).exists() and not rehearsed:
        raise SystemExit(f"{out} holds a real study; give the --dry rehearsal another --out")
    if not dry and rehearsed:
        raise SystemExit(f"{out} holds a --dry rehearsal; give the real study another --out")
    if retry and fit_only:
        raise SystemExit(RETRY_WITH_FIT_ONLY)
    # One directory, one study: another preset's plan and runs must not be reported under this one's name.
    recorded = read_json_object(out / STUDY_FILE)
    if recorded is None and (out / STUDY_FILE).exists():  # rewriting it would let any preset adopt DIR
        raise SystemExit(f"{out / STUDY_FILE} is unreadable: it names the preset this directory holds. "
                         f'Restore it (e.g. {{"preset": "{spec.name}"}} if this is that study), or give '
                         "another --out")
    if recorded is not None and recorded.get("preset") != spec.name:
        raise SystemExit(f"{out} holds the study {recorded.get('preset')!r}, not {spec.name!r}; give this "
                         "one another --out")
    if recorded is None:
        write_text_atomic(out / STUDY_FILE, json.dumps({"preset": spec.name}) + "\n")
    cut = _rehearsal(spec, out, dry_steps) if dry else None
    if cut is not None:
        spec = dataclasses.replace(spec, notes=(REHEARSAL_NOTE, *spec.notes))
    runs_dir = out / "runs"
    t0 = time.time()
    plan_path = out / PLAN_FILE
    workers = workers or default_workers(spec)
    post_run = _post_run(spec, downstream)
    lr_rules: dict[str, dict] = {}
    if (out / LR_RULES_FILE).exists():
        lr_rules = read_json_object(out / LR_RULES_FILE, on_unreadable=lambda why: None)
        if lr_rules is None:
            raise SystemExit(f"{out / LR_RULES_FILE} is unreadable or not a JSON object: the main stage's "
                             "learning rates were planned from it. Restore it, or start a new --out")
    if plan_path.exists():
        runs = read_plan(plan_path)
        if not runs:
            raise SystemExit(f"{plan_path} holds no runs; restore it, or delete it to plan the study again")
        print(f"[study] using the existing plan {plan_path} ({len(runs)} runs)")
        if any(r.kind == "lr_sweep" for r in runs) and not (out / LR_RULES_FILE).exists():
            print(f"[study] warning: {plan_path} has LR-sweep runs but no {LR_RULES_FILE}: it was written "
                  "before its LR sweep trained, so its learning rates follow the preset's prior rule, not a "
                  "fitted one; start a new --out to plan with the fitted rule")
        if cut is None:
            for line in _stale_plan_settings(spec, runs):
                print(f"[study] warning: {plan_path} {line}")
    else:
        stage1 = plan_lr_stage(spec, out)
        if cut is not None and stage1:
            stage1 = cut(stage1)
        if stage1 and export_slurm is not None and _not_yet_run(stage1, runs_dir):
            # The main stage's learning rates come from the rule fitted on stage 1, so a cluster runs the
            # study as two job arrays: this one, then (re-running --export-slurm) the main stage.
            stage1_plan = out / LR_STAGE_PLAN_FILE
            write_plan(stage1, stage1_plan)
            path = slurm.export_job_array(stage1, stage1_plan, runs_dir, export_slurm)
            print(f"[study] wrote {path}: stage 1, the LR sweep ({len(stage1)} runs). Run it, then re-run "
                  "this command with --export-slurm: the main stage is planned with the rule fitted on it")
            return {}
        if stage1:
            if export_slurm is None:
                print(f"[study] stage 1: LR sweep, {len(stage1)} runs")
                _prepare_corpus(stage1, out)
                execute(stage1, runs_dir, workers=workers, post_run=None, executor=executor,
                        slurm_params=slurm_params, deadline=deadline)
                left = _not_yet_run(stage1, runs_dir) if deadline is not None else []
                if left:  # a rule fitted on part of the sweep would be frozen into the plan
                    raise SystemExit(f"--train-limit-s stopped the LR sweep before {len(left)} of its runs "
                                     "trained; run the command again to finish it (the main stage is planned "
                                     "with the rule fitted on the whole sweep)")
            broken = _broken_sweep_runs(stage1, runs_dir)  # also after a job array (--export-slurm)
            if broken:
                raise SystemExit(
                    f"{len(broken)} LR-sweep run(s) failed for a reason other than divergence, e.g. "
                    f"{broken[0][0]}: {broken[0][1]}. The main stage is planned with the rule fitted on the "
                    "whole sweep, so nothing was planned: fix the cause and run the command again (finished "
                    "runs are kept; a diverged run counts as a result)")
            lr_rules = fit_lr_rules(spec, stage1, runs_dir)
            write_text_atomic(out / LR_RULES_FILE, json.dumps(lr_rules, indent=2, allow_nan=False) + "\n")
        main_stage = plan_main_stage(spec, out, lr_rules)
        runs = resolve(list(stage1) + (cut(main_stage) if cut is not None else main_stage))
        write_plan(runs, plan_path)
    s = summarize(runs)
    print(
        f"[study] {spec.name}: {s.n_runs} runs {s.by_kind}; planned compute {s.study_flops:.3g} FLOPs "
        f"(WSD prefixes counted once; {s.predicted_flops:.3g} without reuse)"
    )
    twice = len(runs) - len(distinct_runs(runs))
    if twice:
        print(f"[study] {twice} run(s) repeat an earlier run's config exactly (e.g. an LR-sweep run at the "
              "prior rule's lr): each such experiment is trained once and read under both names")
    retried = _retry_runs(runs, retry, runs_dir, plan_path)
    if export_slurm is not None:
        path = slurm.export_job_array(runs, plan_path, runs_dir, export_slurm, post_run=post_run)
        print(f"[study] wrote the job-array script {path}; run it, then re-run this command with --fit-only")
        return {}
    if not fit_only:
        _prepare_corpus(runs, out)
        results = execute(
            retried or runs, runs_dir, workers=workers, post_run=post_run, executor=executor,
            slurm_params=slurm_params, deadline=deadline,
        )
        for _ in range(0 if retried else spec.extend_edges):  # --retry trains what it names, no more
            if deadline is not None and time.monotonic() >= deadline:
                break  # curves cut short by the time limit would be judged on the runs they lack
            extra = plan_edge_extensions(spec, out, runs, lr_rules, lambda r: _final_loss(runs_dir, r))
            if cut is not None and extra:
                extra = cut(extra)
            if not extra:
                break
            print(f"[study] {len(extra)} isoFLOP curve(s) had their lowest loss at an edge of the size grid; "
                  f"adding one size beyond it: {', '.join(r.name for r in extra)}")
            runs = resolve(list(runs) + extra)
            write_plan(runs, plan_path)
            results += execute(extra, runs_dir, workers=workers, post_run=post_run, executor=executor,
                               slurm_params=slurm_params, deadline=deadline)
        failed = [r for r in results if r["status"] == "failed"]
        if failed:
            print(
                f"[study] {len(failed)} run(s) failed (details in runs/<id>/error.json); retry with "
                f"--retry NAME or re-run the command:"
            )
            for f in failed:
                print(f"  {f['name']}: {f['error']}")
    train_wall = time.time() - t0
    report = build_report(spec, runs, runs_dir, lr_rules=lr_rules)
    report["timing"] = {"train_wall_seconds": train_wall, "workers": workers, "train_limit_s": train_limit_s}
    unfinished = [] if train_limit_s is None else [r for r in report["runs"] if r["status"] != "done"]
    if unfinished:
        report["notes"].append(
            f"--train-limit-s {train_limit_s:g}: {len(unfinished)} of {len(report['runs'])} runs had not "
            "finished when the limit stopped new runs; the fits use the finished ones (re-run to train the "
            "rest)"
        )
    write_report(report, out, spec=spec, runs=runs, runs_dir=runs_dir)
    report["timing"]["total_wall_seconds"] = time.time() - t0
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    print_summary(report, out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(STUDY_PRESETS))
    p.add_argument("--out", required=True, help="study directory (re-use it to resume / refit)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: auto)")
    p.add_argument("--executor", default="auto", choices=("auto", "sequential", "parallel", "slurm"))
    p.add_argument("--fit-only", action="store_true", help="do not train; refit and report what exists")
    p.add_argument(
        "--retry",
        action="append",
        default=[],
        metavar="NAME",
        help="clear and rerun one run (name or run id; repeatable)",
    )
    p.add_argument("--no-downstream", action="store_true", help="skip the downstream task battery")
    p.add_argument("--train-limit-s", type=float, default=None, metavar="SECONDS",
                   help="start no run after this many seconds; fit and report what finished (the rest stay "
                   "pending: run the command again to train them)")
    p.add_argument("--export-slurm", metavar="FILE", help="write a Slurm job-array script and stop")
    p.add_argument(
        "--dry",
        action="store_true",
        help="CPU rehearsal: the preset's plan with every run cut to a few steps (numbers meaningless)",
    )
    p.add_argument("--dry-steps", type=int, default=None,
                   help="steps of each root run in a --dry rehearsal (default 4)")
    p.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter of --executor slurm, e.g. slurm_partition=gpu, gpus_per_node=1, "
        f"timeout_min=120 (default {slurm.SLURM_TIMEOUT_MIN}); JSON values are parsed; repeatable",
    )
    a = p.parse_args(argv)
    try:
        slurm_params = parse_slurm_params(a.slurm)
    except ValueError as e:
        p.error(str(e))
    if slurm_params and a.executor != "slurm":
        p.error(
            "--slurm sets submitit parameters of --executor slurm (--export-slurm: edit the sbatch lines)"
        )
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    if a.dry_steps is not None and not a.dry:
        p.error("--dry-steps sets the length of a --dry rehearsal; add --dry")
    if a.dry_steps is not None and a.dry_steps < 1:
        p.error(f"--dry-steps must be >= 1, got {a.dry_steps}")
    if a.train_limit_s is not None and not a.train_limit_s > 0:
        p.error(f"--train-limit-s must be > 0, got {a.train_limit_s}")
    if a.retry and a.fit_only:
        p.error(RETRY_WITH_FIT_ONLY)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out} exists and is not a directory")
    spec = get_study_preset(a.preset)
    try:
        run_study(
            spec,
            a.out,
            workers=a.workers,
            executor=a.executor,
            fit_only=a.fit_only,
            retry=a.retry,
            downstream=not a.no_downstream,
            export_slurm=a.export_slurm,
            dry=a.dry,
            dry_steps=a.dry_steps or 4,
            slurm_params=slurm_params,
            train_limit_s=a.train_limit_s,
        )
    except ConfigError as e:  # a hand-edited plan, a run config: named in the message, no traceback
        print(f"[study] config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT (experiments/gpu_session.sh)
        print(f"\n[study] interrupted: the finished runs in {a.out} are kept; run the same command again to "
              "go on (finished runs are skipped, interrupted ones resume from their last checkpoint)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
