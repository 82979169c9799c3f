"""The study's analysis and report: fits, held-out checks, optimum, downstream, Pareto -> report.json/.md.

Every number in ``report.md`` comes from ``report.json`` (built here first, rendered second by
``experiments.report_text``). Each analysis block
is computed independently and records ``{"error": message}`` instead of aborting when it cannot be done
(e.g. too few finished runs), so a partial sweep still gives a report that says what is missing.

report.json schema (``REPORT_SCHEMA_VERSION`` = 1; ``validate_report`` checks it):

- ``schema_version``, ``preset``, ``description``, ``notes`` (list of str)
- ``corpus``: ``entropy_rate`` (nats/token, exact; null for real data), ``unigram_entropy``
- ``compute``: ``planned_flops`` (shared WSD prefixes once), ``flops_if_no_reuse``, ``spent_flops``
  (finished runs, prefixes once), ``wsd_saving`` (1 - WSD compute / the same runs from scratch)
- ``runs``: one row per planned run: ``name, run_id, kind, group, budget, fit, params, non_embedding_params,
  tokens, steps, flops, flops_per_token, learning_rate, batch_size, status, final_eval_loss, epochs (passes
  over the train split, summary.json; null until finished), error, downstream`` (task name -> accuracy /
  pass_prob_exact, or null)
- ``lr_rules``: group -> {"rule", "cells", "error"} (empty without an LR sweep)
- ``groups``: group -> {
    ``n_fit_points``,
    ``chinchilla``: {params, ci (name -> [lo, hi]), ci_level, n_bootstrap, converged, objective},
    ``entropy``: {E, E_ci, entropy_rate, E_minus_entropy, relative},
    ``heldout``: [{name, N, D, C, actual, predicted, interval [lo, hi] (90% prediction), relative_error}],
    ``approach2``: {a, b, a_ci, b_ci, optima [{C, N, D, loss}], rejected [{C, reason}], bootstrap
    ("seed_noise" with seed replicates, else "points"), noise_sd [{budget, sd, source ("budget" or "pooled")}]
    or None},
    ``approach3``: {a, b, a_ci, b_ci},
    ``extrapolation``: [{multiple, C, N, N_ci, D, D_ci, tokens_per_param, loss, loss_ci}],
    ``wsd``: {n_points, chinchilla (params + ci, or {error} when the branches are too few to fit), heldout
    (same rows as above; [] without a fit), compare (cosine vs WSD parameters), pairs: each branch vs the
    cosine run of the same model and token count, with mean/sd/max difference},
    ``downstream``: {tasks: name -> {chance, ceiling (known from the source; null: unknown, fitted at 1),
    fit_compute, two_step, heldout [...]}, mean_abs_error},
    ``seed_noise``: {rows [{name, N, D, budget, losses (the run, then its seed replicates), mean, sd}],
    pooled_sd, dof, budgets, fit_residual_rms, fit_residual_rms_over_sd, lack_of_fit {F, dof [fit, noise],
    p_value} or None, heldout_error_in_sd [{name, error,
    in_sd, own_sd, in_own_sd}], by_budget [{budget, sd, dof, fit_residual_rms}]},
    ``law_forms``: rolling-origin backtest of ``spec.law_forms`` (``scaling.backtest.BacktestResult.to_dict``:
    key "budget", keys, common_test_keys, ranking, forms -> {n_params, in_sample_rms, mean_are_common,
    mean_bias_common, folds [{test_key, train_keys, n_train, n_test, mean_are, mean_bias, skipped}]},
    extrapolation: form -> [{multiple, C, N, D, loss, below_entropy}] or {error}: each form fitted on the
    isoFLOP runs, its compute-optimal point at ``spec.extrapolate`` multiples of the largest budget)
  } (any block may instead be {"error": str})
- ``pareto``: {loss_vs_training_flops: [{name, group, budget, flops, loss}] (the frontier over the planned
  budgets; ``flops`` is what the run spent), accuracy_vs_inference_flops:
  [{name, group, inference_flops_per_token, accuracy}], accuracy_task}
- ``comparisons``: {target_loss, budget_range [min, max], compute_to_target (group -> C), multipliers
  (group -> C / C_ref), multiplier_kinds (group -> interpolated|at_most|not_reached), law_errors (group ->
  why its law is left out; the law-free parts still include it), error (only when the reference has no law),
  multiplier_ci {level, n_replicates, ci (group -> [lo, hi] or null)}, matched_budget_gaps (group ->
  [{budget, best_loss, reference_best_loss, gap, combined_seed_sd, sd_source, gap_in_sd}]),
  empirical_multipliers (group -> {budget, target_loss, budgets, multiplier, kind interpolated|at_most|
  not_reached, ci, ci_level, n_draws, p_reached}: law-free, from best runs and seed noise),
  reference_group, law_frontier {crossovers, best_at_max_budget}} (several groups only)
- ``figures``: list of PNG paths relative to the study directory; ``timing``: wall seconds
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import executors
from experiments.files import read_json_object, write_text_atomic
from experiments.report_text import print_summary, render_markdown  # noqa: F401 -- re-exported for callers
from experiments.run_record import is_finite_loss
from experiments.sweep import PlannedRun, distinct_runs, replicated_name

REPORT_SCHEMA_VERSION = 1
CI_LEVEL = 0.95
PRED_LEVEL = 0.9
DOWNSTREAM_FILE = "downstream.json"

# Required keys (and types) of report.json; nested group blocks are checked when they are not errors.
REPORT_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "preset": str,
    "description": str,
    "notes": list,
    "corpus": dict,
    "compute": dict,
    "runs": list,
    "lr_rules": dict,
    "groups": dict,
    "pareto": dict,
    "comparisons": dict,
    "figures": list,
}
RUN_KEYS = (
    "name",
    "run_id",
    "kind",
    "group",
    "budget",
    "fit",
    "params",
    "tokens",
    "flops",
    "status",
    "final_eval_loss",
    "downstream",
)
GROUP_KEYS = (
    "n_fit_points",
    "chinchilla",
    "entropy",
    "heldout",
    "approach2",
    "approach3",
    "extrapolation",
    "wsd",
    "downstream",
    "seed_noise",
    "law_forms",
)


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ValueError naming every missing or mistyped key of a report.json dict."""
    errs = []
    for k, tp in REPORT_SCHEMA.items():
        if k not in report:
            errs.append(f"missing key {k!r}")
        elif not isinstance(report[k], tp):
            errs.append(f"{k!r} should be {tp}, got {type(report[k]).__name__}")
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        errs.append(f"schema_version {report.get('schema_version')} != {REPORT_SCHEMA_VERSION}")
    for i, r in enumerate(report.get("runs", [])):
        miss = [k for k in RUN_KEYS if k not in r]
        if miss:
            errs.append(f"runs[{i}] misses {miss}")
    for g, block in report.get("groups", {}).items():
        miss = [k for k in GROUP_KEYS if k not in block]
        if miss:
            errs.append(f"groups[{g!r}] misses {miss}")
        ch = block.get("chinchilla", {})
        if "error" not in ch:
            for k in ("params", "ci"):
                if k not in ch:
                    errs.append(f"groups[{g!r}].chinchilla misses {k!r}")
            for p in ("E", "A", "B", "alpha", "beta"):
                if p not in ch.get("params", {}):
                    errs.append(f"groups[{g!r}].chinchilla.params misses {p!r}")
        for row in block.get("heldout", []) if isinstance(block.get("heldout"), list) else []:
            for k in ("actual", "predicted", "relative_error"):
                if k not in row:
                    errs.append(f"groups[{g!r}].heldout row misses {k!r}")
    if errs:
        raise ValueError("invalid report.json:\n  - " + "\n  - ".join(errs))


# ----- helpers ----------------------------------------------------------------------------------------------
def _f(x: Any) -> Any:
    """JSON-safe floats (NaN/inf -> None), arrays -> lists."""
    if isinstance(x, dict):
        return {str(k): _f(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_f(v) for v in x]
    if isinstance(x, np.ndarray):
        return _f(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- one failed analysis must not sink the report
        return {"error": f"{type(e).__name__}: {e}"}


def flops_per_token_model(runs: Sequence[PlannedRun]) -> Callable[[np.ndarray], np.ndarray]:
    """N -> exact training FLOPs per token along the group's shape rule: log-log interpolation through the
    planned shapes (whose accounting is exact), extrapolated with the end slopes. Used by Approach 2/3 and
    the optimum instead of 6N (at these sizes attention and the LM head make F/N far from 6)."""
    pts = sorted({(r.params, r.flops_per_token) for r in runs})
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    if len(x) == 1:
        return lambda n: np.exp(y[0]) * np.asarray(n, np.float64) / np.exp(x[0])

    def fpt(n: Any) -> np.ndarray:
        ln = np.log(np.asarray(n, np.float64))
        lo = y[0] + (ln - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        hi = y[-1] + (ln - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        mid = np.interp(ln, x, y)
        return np.exp(np.where(ln < x[0], lo, np.where(ln > x[-1], hi, mid)))

    return fpt


def _rows(
    report_runs: Sequence[dict], group: str, kinds: Sequence[str], fit: bool | None = None
) -> list[dict]:
    return [
        r
        for r in report_runs
        if r["group"] == group
        and r["kind"] in kinds
        and r["status"] == "done"
        and r["final_eval_loss"] is not None
        and (fit is None or r["fit"] == fit)
    ]


def _data(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {
        "N": np.array([r["params"] for r in rows], np.float64),
        "D": np.array([r["tokens"] for r in rows], np.float64),
        "C": np.array([r["flops"] for r in rows], np.float64),
        "loss": np.array([r["final_eval_loss"] for r in rows], np.float64),
    }


# ----- law fits ---------------------------------------------------------------------------------------------
def fit_chinchilla(rows: Sequence[dict], n_bootstrap: int, seed: int = 0):
    from scaling.fit import fit
    from scaling.laws import get_law

    if len(rows) < 6:
        raise ValueError(f"{len(rows)} finished runs are too few for the 5-parameter Chinchilla law (need 6)")
    res = fit(get_law("chinchilla"), _data(rows), warn=False)
    boot = res.bootstrap(n=n_bootstrap, seed=seed) if n_bootstrap else None
    return res, boot


def _chinchilla_block(res, boot) -> dict:
    ci = {k: list(v) for k, v in boot.ci(CI_LEVEL).items()} if boot is not None else {}
    return {
        "params": dict(res.params),
        "ci": ci,
        "ci_level": CI_LEVEL,
        "n_bootstrap": boot.n if boot else 0,
        "converged": bool(res.converged),
        "objective": float(res.objective),
        "n_points": int(res.n_points),
        "at_bounds": list(getattr(res, "at_bounds", [])),  # parameters that ended on a bound: degenerate
    }


def _heldout_rows(res, boot, rows: Sequence[dict]) -> list[dict]:
    out = []
    for r in rows:
        pred = float(np.asarray(res.predict(N=r["params"], D=r["tokens"])).ravel()[0])
        interval = None
        if boot is not None:
            pi = boot.prediction_interval(PRED_LEVEL, N=r["params"], D=r["tokens"])
            interval = [float(pi["lower"][0]), float(pi["upper"][0])]
        act = r["final_eval_loss"]
        out.append(
            {
                "name": r["name"],
                "N": r["params"],
                "D": r["tokens"],
                "C": r["flops"],
                "actual": act,
                "predicted": pred,
                "interval": interval,
                "interval_level": PRED_LEVEL,
                "relative_error": (pred - act) / act,
                "covered": None if interval is None else bool(interval[0] <= act <= interval[1]),
            }
        )
    return out


def _extrapolation(res, boot, cmax: float, multiples: Sequence[float], fpt) -> list[dict]:
    from scaling.optimal import compute_optimal

    C = np.array([cmax * m for m in multiples])
    al = compute_optimal(
        res, C, flops_per_token=fpt, param_samples=boot.values if boot else None, ci_level=CI_LEVEL
    )
    out = []
    for i, m in enumerate(multiples):

        def ci(name, i=i):
            v = getattr(al, f"{name}_ci")
            return None if v is None else [float(np.asarray(v[0])[i]), float(np.asarray(v[1])[i])]

        out.append(
            {
                "multiple": m,
                "C": float(C[i]),
                "N": float(al.N[i]),
                "N_ci": ci("N"),
                "D": float(al.D[i]),
                "D_ci": ci("D"),
                "tokens_per_param": float(al.D[i] / al.N[i]),
                "loss": float(al.loss[i]),
                "loss_ci": ci("loss"),
            }
        )
    return out


def budget_seed_sd(seed_noise: dict, c: float) -> tuple[float | None, str | None, int | None]:
    """A seed-noise block's sd at budget ``c``: measured there ("budget") where that budget has replicates,
    else the pooled sd ("pooled"), with its degrees of freedom -> (sd, source, dof); Nones without one."""
    if not seed_noise or "error" in seed_noise:
        return None, None, None
    for b in seed_noise.get("by_budget", []):
        if b["dof"] and math.isclose(b["budget"], c, rel_tol=1e-9):
            return b["sd"], "budget", b["dof"]
    return seed_noise["pooled_sd"], "pooled", seed_noise.get("dof")


def _noise_by_budget(seed_noise: dict, rows: Sequence[dict]) -> dict[float, tuple[float, str]] | None:
    """Per fitted budget: its seed sd (:func:`budget_seed_sd`) -> {budget: (sd, source)}; None without seed
    replicates."""
    if "error" in seed_noise or not seed_noise.get("pooled_sd"):
        return None
    return {c: budget_seed_sd(seed_noise, c)[:2] for c in sorted({r["budget"] for r in rows})}


def _approach2(rows: Sequence[dict], fpt, n_bootstrap: int, noise: dict | None = None) -> dict:
    """Approach 2 with a bootstrap CI. With seed replicates (``noise``: {budget: (sd, source)}) each
    replicate redraws every point with its budget's measured seed sd (Porian et al. 2024's seed-noise
    bootstrap); without, it resamples points -- with 4 sizes a budget a third of those resamples keep fewer
    than 3 distinct sizes, so noisy profiles are easily rejected for too few interior replicates."""
    from scaling.isoflop import approach2

    d = _data(rows)
    budgets = np.array([r["budget"] for r in rows], np.float64)
    boot: dict[str, Any] = {"bootstrap": "points"}
    if noise is not None:
        boot = {"bootstrap": "seed_noise", "noise_std": {c: sd for c, (sd, _) in noise.items()}}
    # Group by the planned budget (the realised FLOPs differ from it by the rounding to whole steps).
    a2 = approach2(
        budgets,
        d["N"],
        d["loss"],
        d["D"],
        on_edge="drop",
        n_bootstrap=n_bootstrap,
        flops_per_token=fpt,
        ci_level=CI_LEVEL,
        **boot,
    )
    return {
        "bootstrap": boot["bootstrap"],
        "noise_sd": None if noise is None else [
            {"budget": c, "sd": sd, "source": src} for c, (sd, src) in noise.items()],
        "a": a2.a,
        "b": a2.b,
        "a_ci": list(a2.a_ci),
        "b_ci": list(a2.b_ci),
        "optima": [
            {"C": float(c), "N": float(n), "D": float(dd), "loss": float(lo)}
            for c, n, dd, lo in zip(a2.C, a2.N, a2.D, a2.loss, strict=True)
        ],
        "rejected": [{"C": float(c), "reason": str(why)} for c, why in a2.rejected],
        "_obj": a2,
    }


def _approach3(res, boot, budgets: Sequence[float], fpt) -> dict:
    from scaling.approaches import approach3

    a3 = approach3(
        res,
        np.asarray(sorted(set(budgets)), np.float64),
        flops_per_token=fpt,
        param_samples=boot.values if boot else None,
        ci_level=CI_LEVEL,
    )
    return {
        "a": a3.a,
        "b": a3.b,
        "a_ci": None if a3.a_ci is None else list(a3.a_ci),
        "b_ci": None if a3.b_ci is None else list(a3.b_ci),
    }


# ----- downstream -------------------------------------------------------------------------------------------
def _downstream_scalars(d: Path) -> dict[str, float] | None:
    f = d / DOWNSTREAM_FILE
    if not f.is_file():
        return None
    try:
        tasks = json.loads(f.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError):
        return None
    out = {}
    for name, t in tasks.items():
        if "accuracy" in t:
            out[name] = t["accuracy"]
        elif "pass_prob_exact" in t:
            out[name] = t["pass_prob_exact"]
    mc = [v for k, v in out.items() if k.startswith("mc-") and v is not None]
    if mc:
        out["mc-mean"] = float(np.mean(mc))
    return out


def _known_bounds(runs_dir: Path, rows: Sequence[dict], task: str) -> tuple[float, float | None]:
    """(floor, ceiling) of a battery score, known exactly from the corpus's source (experiments.tasks): an
    mc task's chance and ``ceiling_accuracy`` (the evaluator's rule when the model IS the source), a gen
    task's 0 and ``source_pass_prob``; "mc-mean" takes the means over the mc tasks. A ceiling of 1 where the
    truth is below it makes the sigmoid extrapolate past what a perfect model reaches (an mc task with
    ceiling 0.77 was predicted at 0.97 a few decades out). None: unknown (the fit's default, 1)."""
    for r in rows:
        f = runs_dir / r["run_id"] / DOWNSTREAM_FILE
        try:
            t = json.loads(f.read_text())["tasks"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        if task == "mc-mean":
            mc = [v for k, v in t.items() if k.startswith("mc-")]
            ceilings = [v.get("ceiling_accuracy") for v in mc]
            ceiling = None if None in ceilings or not mc else float(np.mean(ceilings))
            return float(np.mean([v.get("chance", 0.0) for v in mc])), ceiling
        if task not in t:
            continue
        key = "source_pass_prob" if task.startswith("gen-") else "ceiling_accuracy"
        ceiling = t[task].get(key)
        return float(t[task].get("chance", 0.0)), None if ceiling is None else float(ceiling)
    return 0.0, None


def _downstream_block(fit_rows, held_rows, runs_dir: Path, n_boot: int) -> dict:
    from scaling.downstream import fit_accuracy_vs_compute, fit_two_step

    with_ds = [r for r in fit_rows if r["downstream"]]
    if len(with_ds) < 5:
        raise ValueError(f"{len(with_ds)} fit runs have downstream results; need >= 5")
    tasks = sorted(with_ds[0]["downstream"])
    out: dict[str, Any] = {}
    errs = []
    for t in tasks:
        rows = [r for r in with_ds if r["downstream"].get(t) is not None]
        C = np.array([r["flops"] for r in rows])
        acc = np.array([r["downstream"][t] for r in rows])
        loss = np.array([r["final_eval_loss"] for r in rows])
        chance, ceiling = _known_bounds(runs_dir, rows, t)
        block: dict[str, Any] = {
            "chance": chance,
            "ceiling": ceiling,
            "n_points": len(rows),
            "accuracy_range": [float(acc.min()), float(acc.max())],
        }
        bounds = {"chance": chance, "ceiling": 1.0 if ceiling is None else ceiling}
        f1 = _guard(lambda C=C, acc=acc, b=bounds: fit_accuracy_vs_compute(C, acc, n_boot=n_boot, **b))
        f2 = _guard(lambda C=C, loss=loss, acc=acc, b=bounds: fit_two_step(C, loss, acc, n_boot=n_boot, **b))
        block["fit_compute"] = f1 if isinstance(f1, dict) else _f(f1.to_dict())
        block["two_step"] = (
            f2
            if isinstance(f2, dict)
            else {"loss_fit": _f(f2.loss_fit.to_dict()), "acc_fit": _f(f2.acc_fit.to_dict())}
        )
        held = []
        for h in held_rows:
            a = (h.get("downstream") or {}).get(t)
            if a is None:
                continue
            row = {"name": h["name"], "C": h["flops"], "actual": a}
            for key, obj in (("sigmoid", f1), ("two_step", f2)):
                if not isinstance(obj, dict):
                    p = float(np.asarray(obj.predict(np.array([h["flops"]]))).ravel()[0])
                    row[f"predicted_{key}"] = p
                    row[f"abs_error_{key}"] = abs(p - a)
                    try:
                        lo, hi = obj.interval(np.array([h["flops"]]), level=PRED_LEVEL)
                        row[f"interval_{key}"] = [float(np.ravel(lo)[0]), float(np.ravel(hi)[0])]
                    except ValueError:
                        pass
            held.append(row)
            errs += [row[k] for k in ("abs_error_sigmoid", "abs_error_two_step") if k in row]
        block["heldout"] = held
        block["_objs"] = (f1, f2, C, acc)
        out[t] = block
    return {"tasks": out, "mean_abs_error": float(np.mean(errs)) if errs else None}


# ----- the report -------------------------------------------------------------------------------------------
def collect_runs(runs: Sequence[PlannedRun], runs_dir: Path) -> list[dict]:
    out = []
    for r in runs:
        d = executors.run_dir(runs_dir, r)
        s = executors.finished_summary(d, r)
        err = None
        if s is None and (d / executors.ERROR_FILE).exists():
            try:
                err = json.loads((d / executors.ERROR_FILE).read_text())["error"]
            except (json.JSONDecodeError, KeyError):
                err = "unreadable error.json"
        elif s is None:
            written = read_json_object(d / executors.SUMMARY_FILE)
            loss = (written or {}).get("final_eval_loss", "missing")
            if written is not None and not is_finite_loss(loss):
                # re-running would not change it: say so rather than call the run "partial"
                err = f"summary.json has final_eval_loss={loss!r}, not a finite number"
        status = "done" if s else ("failed" if err else executors.run_status(runs_dir, r))
        out.append(
            {
                "name": r.name,
                "run_id": r.run_id,
                "kind": r.kind,
                "group": r.group,
                "budget": r.budget,
                "fit": r.fit,
                "params": r.params,
                "non_embedding_params": r.non_embedding_params,
                "tokens": r.tokens,
                "steps": r.steps,
                "flops": s["flops"] if s else r.predicted_flops,
                "incremental_flops": r.incremental_flops,
                "flops_per_token": r.flops_per_token,
                "learning_rate": r.learning_rate,
                "batch_size": r.batch_size,
                "status": status,
                "final_eval_loss": s["final_eval_loss"] if s else None,
                "entropy_floor": s.get("entropy_floor") if s else None,
                "unigram_entropy": s.get("unigram_entropy") if s else None,
                "wall_seconds": s.get("wall_seconds") if s else None,
                "epochs": s.get("epochs") if s else None,  # passes over the train split (summary.json)
                "error": err,
                "downstream": _downstream_scalars(d) if s else None,
            }
        )
    return out


def _repetition_note(rr: Sequence[dict]) -> list[str]:
    """A note when runs read their train split more than once: the fits take tokens as unique data."""
    over = [r for r in rr if (r.get("epochs") or 0) > 1]
    if not over:
        return []
    worst = max(over, key=lambda r: r["epochs"])
    return [
        f"{len(over)} of {sum(r.get('epochs') is not None for r in rr)} finished runs trained on more tokens "
        f"than their train split holds (up to {worst['epochs']:.2f} epochs, {worst['name']}): their tokens "
        "repeat, while the fits read D as unique tokens"
    ]


def _group_block(
    spec, group: str, runs: Sequence[PlannedRun], rr: list[dict], runs_dir: Path, entropy: float | None
) -> dict:
    g_runs = [r for r in runs if r.group == group]
    fpt = flops_per_token_model(g_runs)
    fit_rows = _rows(rr, group, ("isoflop",), fit=True)
    held_rows = _rows(rr, group, ("heldout",))
    block: dict[str, Any] = {"n_fit_points": len(fit_rows), "_fpt": fpt}
    # Each group resamples with its own seed (its index; the first group keeps 0): their bootstraps must be
    # independent for the compute-multiplier intervals, which pair replicate i of one group with another's.
    names = [g.name for g in spec.groups]
    seed = names.index(group) if group in names else 0
    fitted = _guard(lambda: fit_chinchilla(fit_rows, spec.n_bootstrap, seed=seed))
    if isinstance(fitted, dict):
        for k in ("chinchilla", "entropy", "heldout", "approach3", "extrapolation"):
            block[k] = fitted
    else:
        res, boot = fitted
        block["_fit"] = (res, boot, _data(fit_rows))
        block["chinchilla"] = _chinchilla_block(res, boot)
        E = res.params["E"]
        E_ci = block["chinchilla"]["ci"].get("E")
        block["entropy"] = {
            "E": E,
            "E_ci": E_ci,
            "entropy_rate": entropy,
            "E_minus_entropy": None if entropy is None else E - entropy,
            "relative": None if entropy is None else (E - entropy) / entropy,
            "ci_covers_entropy": None
            if (entropy is None or not E_ci)
            else bool(E_ci[0] <= entropy <= E_ci[1]),
        }
        block["heldout"] = _guard(lambda: _heldout_rows(res, boot, held_rows))
        block["approach3"] = _guard(lambda: _approach3(res, boot, spec.budgets, fpt))
        block["extrapolation"] = _guard(
            lambda: _extrapolation(res, boot, max(spec.budgets), spec.extrapolate, fpt)
        )
    block["seed_noise"] = _guard(lambda: _seed_noise_block(rr, group, block))
    block["approach2"] = _guard(
        lambda: _approach2(fit_rows, fpt, spec.n_bootstrap, _noise_by_budget(block["seed_noise"], fit_rows))
    )
    block["wsd"] = _guard(lambda: _wsd_block(spec, rr, group, held_rows, block))
    block["law_forms"] = _guard(
        lambda: _law_forms_block(spec, fit_rows, held_rows, fpt, block.get("_fit", (None,))[0], entropy)
    )
    block["downstream"] = _guard(
        lambda: _downstream_block(fit_rows, held_rows, runs_dir, min(spec.n_bootstrap, 100))
    )
    return block


def lack_of_fit_test(resid: np.ndarray, n_params: int, sd: float, dof: int) -> dict | None:
    """Pure-error lack-of-fit F test (Draper & Smith, Applied Regression Analysis, ch. 2): the fit's residual
    mean square on n - p degrees of freedom over the seed replicates' pooled variance on ``dof``. A small
    p-value says the law form, not run-to-run noise, limits the fit. The pooled sd comes mostly from the
    replicated (smallest) budgets, where noise is largest, so at larger budgets the test is conservative."""
    resid = np.asarray(resid, np.float64)
    df_fit = resid.size - n_params
    if df_fit < 1 or dof < 1 or not sd > 0:
        return None
    from scipy import stats

    F = float(np.sum(resid**2) / df_fit / sd**2)
    return {"F": F, "dof": [int(df_fit), int(dof)], "p_value": float(stats.f.sf(F, df_fit, dof))}


def seed_noise(groups_of_losses: Sequence[Sequence[float]]) -> tuple[float, int]:
    """Pooled within-configuration standard deviation of final losses and its degrees of freedom:
    sqrt(sum_i sum_j (L_ij - mean_i)^2 / sum_i (n_i - 1)) over configurations i with n_i >= 2 seeds."""
    ss, dof = 0.0, 0
    for losses in groups_of_losses:
        x = np.asarray(losses, np.float64)
        if x.size >= 2:
            ss += float(np.sum((x - x.mean()) ** 2))
            dof += x.size - 1
    if dof == 0:
        raise ValueError("no configuration has two finished seeds")
    return math.sqrt(ss / dof), dof


def _seed_noise_block(rr: Sequence[dict], group: str, block: dict) -> dict:
    """Run-to-run noise from seed replicates, next to what the fit and the held-out check saw."""
    reps = _rows(rr, group, ("seed_replicate",))
    if not reps:
        raise ValueError("no finished seed replicates (StudySpec.replicate_seeds / replicate_budgets)")
    by_name = {r["name"]: r for r in _rows(rr, group, ("isoflop", "heldout"))}
    copies_of: dict[str, list[dict]] = {}
    for r in reps:
        copies_of.setdefault(replicated_name(r["name"]), []).append(r)
    rows = []
    for name in sorted(copies_of, key=lambda n: (by_name[n]["params"], n) if n in by_name else (0, n)):
        members = ([by_name[name]] if name in by_name else []) + copies_of[name]
        losses = [m["final_eval_loss"] for m in members]
        if len(losses) < 2:
            continue
        rows.append({"name": name, "N": members[0]["params"], "D": members[0]["tokens"],
                     "budget": members[0]["budget"], "losses": losses, "mean": float(np.mean(losses)),
                     "sd": float(np.std(losses, ddof=1))})
    sd, dof = seed_noise([r["losses"] for r in rows])
    out: dict[str, Any] = {"rows": rows, "pooled_sd": sd, "dof": dof,
                           "budgets": sorted({r["budget"] for r in rows if r["budget"] is not None})}
    resid = None
    if "_fit" in block:
        res, _, data = block["_fit"]
        resid = data["loss"] - np.asarray(res.predict(N=data["N"], D=data["D"]), np.float64).ravel()
        rms = float(np.sqrt(np.mean(resid**2)))
        out["fit_residual_rms"] = rms
        out["fit_residual_rms_over_sd"] = rms / sd if sd > 0 else None
        out["lack_of_fit"] = lack_of_fit_test(resid, len(res.params), sd, dof)
    # Noise shrinks with training length, so compare like with like: per budget, the seed sd and the fit's
    # residual RMS over that budget's fitted points: their FLOPs are within 1% of the budget, matched here
    # with 5% slack (budgets are at least ~2x apart, so no point can match two).
    out["by_budget"] = []
    for c in out["budgets"]:
        sd_c, dof_c = seed_noise([r["losses"] for r in rows if r["budget"] == c])
        entry = {"budget": c, "sd": sd_c, "dof": dof_c, "fit_residual_rms": None}
        if resid is not None:
            at = np.isclose(data["C"], c, rtol=0.05)
            if at.any():
                entry["fit_residual_rms"] = float(np.sqrt(np.mean(resid[at] ** 2)))
        out["by_budget"].append(entry)
    if isinstance(block.get("heldout"), list):
        own = {r["name"]: r["sd"] for r in rows}
        out["heldout_error_in_sd"] = []
        for h in block["heldout"]:
            err, own_sd = h["actual"] - h["predicted"], own.get(h["name"])
            out["heldout_error_in_sd"].append({
                "name": h["name"], "error": err, "in_sd": err / sd if sd > 0 else None,
                # the held-out run's own seed spread, where it was replicated: noise shrinks with budget
                "own_sd": own_sd, "in_own_sd": err / own_sd if own_sd else None,
            })
    return out


def _law_forms_block(
    spec, fit_rows: Sequence[dict], held_rows: Sequence[dict], fpt, chinchilla_fit, entropy: float | None
) -> dict:
    """Which law form extrapolates on these runs: fit each of ``spec.law_forms`` on the smaller budgets and
    score it on the next (held-out budgets last, so the final fold is the headline held-out prediction).
    ``extrapolation``: what each form, fitted on the isoFLOP runs like the headline fit, says at the
    report's multiples of the largest budget -- the spread between forms is model uncertainty, which no
    bootstrap of one form shows; a loss below the corpus's entropy rate is flagged as impossible."""
    from scaling.backtest import backtest

    if not spec.law_forms:
        return {"error": "no law forms to compare (spec.law_forms is empty)"}
    rows = list(fit_rows) + list(held_rows)
    budgets = np.array([r["budget"] for r in rows], np.float64)
    bt = backtest(spec.law_forms, _data(rows), by=budgets, key_name="budget")
    out = bt.to_dict()
    fit_budgets = sorted({r["budget"] for r in fit_rows})
    out["extrapolation"] = {
        name: _guard(lambda n=name, fb=fb: _form_extrapolation(
            n, fit_rows, spec, fpt, chinchilla_fit if n == "chinchilla" else fb.fit_on(fit_budgets), entropy))
        for name, fb in bt.forms.items()
    }
    return out


def _form_extrapolation(name: str, fit_rows, spec, fpt, fitted, entropy: float | None) -> list[dict]:
    """``fitted``: the form's fit on the isoFLOP runs -- the headline fit for Chinchilla, the backtest's own
    fit on those budgets for the others (its last held-out fold, or its full fit without held-out runs);
    fitted here only if neither exists."""
    from scaling.backtest import fit_until_converged
    from scaling.laws import get_law
    from scaling.optimal import compute_optimal

    law = get_law(name)
    if len(fit_rows) <= len(law.params):
        raise ValueError(f"{len(fit_rows)} isoFLOP points for {len(law.params)} parameters")
    res = fitted if fitted is not None else fit_until_converged(law, _data(fit_rows), warn=False)
    C = np.array([max(spec.budgets) * m for m in spec.extrapolate])
    al = compute_optimal(res, C, flops_per_token=fpt)
    return [
        {"multiple": m, "C": float(C[i]), "N": float(al.N[i]), "D": float(al.D[i]), "loss": float(al.loss[i]),
         "below_entropy": None if entropy is None else bool(al.loss[i] < entropy),
         "converged": bool(res.converged)}
        for i, m in enumerate(spec.extrapolate)
    ]


def _wsd_block(spec, rr, group: str, held_rows, cos_block: dict) -> dict:
    rows = _rows(rr, group, ("wsd_branch",))
    if not rows:
        return {"error": "no WSD branch runs in this study"}
    # The pairwise comparison needs no fit, so it is there even when too few branches finished for one.
    pairs = _wsd_cosine_pairs(rows, _rows(rr, group, ("isoflop",)))
    out: dict[str, Any] = {"n_points": len(rows), "pairs": pairs}
    fitted = _guard(lambda: fit_chinchilla(rows, spec.n_bootstrap))
    if isinstance(fitted, dict):
        out["chinchilla"] = fitted
        out["heldout"] = []
        return out
    res, boot = fitted
    out["chinchilla"] = _chinchilla_block(res, boot)
    out["heldout"] = _heldout_rows(res, boot, held_rows)
    cos = cos_block.get("chinchilla", {})
    if "params" in cos:
        out["compare"] = {k: {"cosine": cos["params"][k], "wsd": res.params[k]} for k in res.params}
    return out


def _wsd_cosine_pairs(branches: Sequence[dict], cosine: Sequence[dict], rtol: float = 0.02) -> dict:
    """Each WSD cool-down branch next to the independent cosine run of the same model at the same token count
    (within ``rtol``; batch sizes may differ, so D differs by rounding to whole steps): the direct,
    law-free test of Hägele et al. 2024's claim that a WSD branch matches a cosine run of its length. The
    fitted-law comparison above needs enough branch points to identify five parameters; this does not."""
    rows = []
    for b in branches:
        match = [
            c for c in cosine if c["params"] == b["params"] and abs(c["tokens"] / b["tokens"] - 1.0) <= rtol
        ]
        if match:
            c = min(match, key=lambda c: abs(c["tokens"] / b["tokens"] - 1.0))
            rows.append(
                {
                    "wsd": b["name"],
                    "cosine": c["name"],
                    "N": b["params"],
                    "D_wsd": b["tokens"],
                    "D_cosine": c["tokens"],
                    "loss_wsd": b["final_eval_loss"],
                    "loss_cosine": c["final_eval_loss"],
                    "difference": b["final_eval_loss"] - c["final_eval_loss"],
                }
            )
    d = np.array([r["difference"] for r in rows])
    return {
        "rows": rows,
        "n": len(rows),
        "mean_difference": float(d.mean()) if d.size else None,
        "sd_difference": float(d.std(ddof=1)) if d.size > 1 else None,
        "max_abs_difference": float(np.abs(d).max()) if d.size else None,
    }


def _planned_budgets(runs: Sequence[dict]) -> list[float]:
    """Each run's compute for the loss frontier: its planned budget (runs of one budget spend it to within 1%:
    on realised FLOPs a run 0.5% cheaper but 0.3 nats worse would join the frontier). WSD branches carry
    their realised FLOPs as budget: those within 1% of a planned isoFLOP budget count at it."""
    planned = sorted({r["budget"] for r in runs if r["kind"] in ("isoflop", "heldout") and r["budget"]})
    out = []
    for r in runs:
        x = r["budget"] or r["flops"]
        out.append(next((b for b in planned if abs(x / b - 1) <= 0.01), x))
    return out


def _frontier_runs(rr: Sequence[dict]) -> list[dict]:
    """The finished runs the Pareto frontiers (table and figures alike) are drawn from: every run trained to
    its own budget; not LR-sweep probes, seed replicates or WSD stable runs (a replicate is the same point
    again; a stable run is only a prefix of its branches)."""
    return [
        r
        for r in rr
        if r["status"] == "done"
        and r["final_eval_loss"] is not None
        and r["kind"] in ("isoflop", "heldout", "wsd_branch", "grid", "user")
    ]


def _pareto(rr: list[dict], task: str | None) -> dict:
    from scaling.pareto import pareto_front

    done = _frontier_runs(rr)
    out: dict[str, Any] = {"accuracy_task": task}
    if done:
        pts = np.array([[b, r["final_eval_loss"]] for b, r in zip(_planned_budgets(done), done, strict=True)])
        idx = pareto_front(pts, "min")
        out["loss_vs_training_flops"] = [
            {
                "name": done[i]["name"],
                "group": done[i]["group"],
                "budget": float(pts[i, 0]),
                "flops": done[i]["flops"],
                "loss": done[i]["final_eval_loss"],
            }
            for i in idx
        ]
    ds = [r for r in done if task and r["downstream"] and r["downstream"].get(task) is not None]
    if ds:
        pts = np.array([[r["flops_per_token"] / 3.0, r["downstream"][task]] for r in ds])
        idx = pareto_front(pts, ("min", "max"))
        out["accuracy_vs_inference_flops"] = [
            {
                "name": ds[i]["name"],
                "group": ds[i]["group"],
                "inference_flops_per_token": float(pts[i, 0]),
                "accuracy": float(pts[i, 1]),
            }
            for i in idx
        ]
    return out


def build_report(
    spec, runs: Sequence[PlannedRun], runs_dir: Path, *, lr_rules: Mapping | None = None
) -> dict:
    # experiments.compare uses this module's helpers, so it is imported here rather than at the top
    from experiments.compare import comparisons

    rr = collect_runs(runs, Path(runs_dir))
    ent = next((r["entropy_floor"] for r in rr if r["entropy_floor"] is not None), None)
    uni = next((r["unigram_entropy"] for r in rr if r["unigram_entropy"] is not None), None)
    groups = {g.name: _group_block(spec, g.name, runs, rr, Path(runs_dir), ent) for g in spec.groups}
    distinct = distinct_runs(runs)
    distinct_names = {r.name for r in distinct}
    wsd_runs = [r for r in runs if r.kind in ("wsd_stable", "wsd_branch")]
    wsd_scratch = sum(r.predicted_flops for r in wsd_runs if r.kind == "wsd_branch")
    wsd_spent = sum(r.incremental_flops for r in wsd_runs)
    task = "mc-mean" if any(r["downstream"] and "mc-mean" in r["downstream"] for r in rr) else None
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "preset": spec.name,
        "description": spec.description,
        "notes": [*spec.notes, *_repetition_note(rr)],
        "corpus": {"entropy_rate": ent, "unigram_entropy": uni},
        "compute": {
            # one experiment planned under two roles (same run_id) is trained, and counted, once
            "planned_flops": sum(r.incremental_flops for r in distinct),
            "flops_if_no_reuse": sum(r.predicted_flops for r in distinct if r.kind != "wsd_stable"),
            "spent_flops": sum(r["incremental_flops"] for r in rr if r["status"] == "done"
                               and r["name"] in distinct_names),
            "wsd_saving": (1 - wsd_spent / wsd_scratch) if wsd_scratch else None,
        },
        "runs": rr,
        "lr_rules": dict(lr_rules or {}),
        "groups": groups,
        "pareto": _guard(lambda: _pareto(rr, task)),
        "comparisons": _guard(lambda: comparisons(groups, spec, rr)),
        "figures": [],
    }
    return report


def _public(x: Any) -> Any:
    """Drop the private ``_``-prefixed entries (fit objects kept for plotting) and make JSON-safe."""
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [_public(v) for v in x]
    return _f(x)


# ----- figures and markdown ---------------------------------------------------------------------------------
def _figures(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaling import plots

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    paths: list[str] = []

    def save(fig, name):
        p = fig_dir / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(p.relative_to(out)))

    rr = report["runs"]
    for g, b in report["groups"].items():
        tag = g.replace("/", "_")
        fit_rows = _rows(rr, g, ("isoflop",), fit=True)
        if len(fit_rows) >= 3:
            d = _data(fit_rows)
            budgets = np.array([r["budget"] for r in fit_rows])
            a2 = b["approach2"].get("_obj") if isinstance(b["approach2"], dict) else None
            _guard(
                lambda d=d, budgets=budgets, a2=a2, tag=tag, g=g: save(
                    plots.plot_isoflop(budgets, d["N"], d["loss"], a2, title=f"isoFLOP profiles ({g})"),
                    f"isoflop_{tag}.png",
                )
            )
        if "_fit" in b:
            res, boot, data = b["_fit"]
            _guard(
                lambda res=res, data=data, boot=boot, tag=tag, g=g: save(
                    plots.plot_law_fit(
                        res, data, x="N", samples=boot.values if boot else None, title=f"Chinchilla fit ({g})"
                    ),
                    f"law_fit_{tag}.png",
                )
            )

            def opt(res=res, boot=boot, b=b, tag=tag, g=g, fit_rows=fit_rows):
                from scaling.optimal import compute_optimal

                C = np.geomspace(
                    min(r["flops"] for r in fit_rows) / 3, max(r["flops"] for r in fit_rows) * 100, 40
                )
                runs_g = [r for r in rr if r["group"] == g]
                fpt = _fpt_from_rows(runs_g)
                al = compute_optimal(res, C, flops_per_token=fpt, param_samples=boot.values if boot else None)
                a2 = b["approach2"].get("_obj") if isinstance(b["approach2"], dict) else None
                save(
                    plots.plot_optimal(al, approach2=a2, title=f"compute-optimal allocation ({g})"),
                    f"optimal_{tag}.png",
                )

            _guard(opt)
        ds = b.get("downstream", {})
        if isinstance(ds, dict) and "tasks" in ds and "mc-mean" in ds["tasks"]:
            f1, f2, C, acc = ds["tasks"]["mc-mean"]["_objs"]
            held = [h for h in _rows(rr, g, ("heldout",)) if h["downstream"]]
            Call = np.concatenate([C, [h["flops"] for h in held]])
            Aall = np.concatenate([acc, [h["downstream"]["mc-mean"] for h in held]])
            cutoff = min((h["flops"] for h in held), default=None)
            _guard(
                lambda Call=Call, Aall=Aall, f1=f1, f2=f2, cutoff=cutoff, ds=ds, g=g, tag=tag: save(
                    plots.plot_downstream(
                        Call,
                        Aall,
                        fit=None if isinstance(f1, dict) else f1,
                        two_step=None if isinstance(f2, dict) else f2,
                        cutoff=cutoff,
                        chance=ds["tasks"]["mc-mean"]["chance"],
                        ceiling=ds["tasks"]["mc-mean"]["ceiling"],
                        title=f"mean MC accuracy ({g})",
                    ),
                    f"downstream_{tag}.png",
                )
            )
    done = _frontier_runs(rr)
    if done:
        pts = np.array([[b, r["final_eval_loss"]] for b, r in zip(_planned_budgets(done), done, strict=True)])
        _guard(
            lambda: save(
                plots.plot_pareto(
                    pts,
                    "min",
                    names=("training FLOPs (planned budget)", "eval loss"),
                    logx=True,
                    title="loss vs training compute (Pareto frontier)",
                ),
                "pareto_loss_flops.png",
            )
        )
    task = report["pareto"].get("accuracy_task") if isinstance(report["pareto"], dict) else None
    ds = [r for r in done if task and r["downstream"] and r["downstream"].get(task) is not None]
    if ds:
        pts = np.array([[r["flops_per_token"] / 3, r["downstream"][task]] for r in ds])
        _guard(
            lambda: save(
                plots.plot_pareto(
                    pts,
                    ("min", "max"),
                    names=("inference FLOPs / token", task),
                    logx=True,
                    title="accuracy vs inference cost (Pareto frontier)",
                ),
                "pareto_accuracy_inference.png",
            )
        )
    return paths


def _fpt_from_rows(rows: Sequence[dict]):
    pts = sorted({(r["params"], r["flops_per_token"]) for r in rows})

    class _R:
        def __init__(self, n, f):
            self.params, self.flops_per_token = n, f

    return flops_per_token_model([_R(n, f) for n, f in pts])


def write_report(report: dict, out: Path, *, spec=None, runs=None, runs_dir=None) -> None:
    """Figures first (they need the private fit objects), then report.json and report.md."""
    report["figures"] = _figures(report, Path(out))
    public = _public(report)
    report.clear()
    report.update(public)
    validate_report(report)
    write_text_atomic(Path(out) / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(Path(out) / "report.md", render_markdown(report))
