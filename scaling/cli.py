"""Command line: ``python -m scaling fit|optimum|isoflop|pareto|backtest|downstream|observational ...``.

- ``fit DATA --law chinchilla --columns N=COL,D=COL,loss=COL --out DIR``: parametric fit -> DIR/fit.json
  (law, params, ci, objective, n_points, converged, derived exponents for Chinchilla, bootstrap draws)
  and DIR/fit.png.
- ``optimum --fit DIR/fit.json --compute 1e24``: compute-optimal N, D, loss, tokens_per_param as JSON.
- ``isoflop DATA --columns C=COL,N=COL,loss=COL --out DIR``: Hoffmann Approach 2 -> isoflop.json/.png.
- ``pareto DATA --objectives loss:min,flops:min --out DIR``: non-dominated set (+ membership probability with
  --sigma) -> pareto.json/.png.
- ``backtest DATA --laws chinchilla,kaplan,farseer --by C --bin-decades 0.5``: which law form extrapolates
  (rolling-origin backtest: fit on the smaller values of --by, score the next) -> backtest.json; table on
  stderr.
- ``downstream DATA --columns C=COL,accuracy=COL --chance 0.25 --cutoff 8.4e22``: sigmoid of accuracy in log
  compute, held-out error above the cutoff -> downstream.json/.png.
- ``observational DATA --benchmarks COL,COL,... --target COL [--join FILE --on KEY] --compute COL --family
  COL --cutoff C``: Ruan et al. 2024's observational law (capability PCA, family compute fits, a sigmoid of
  the capabilities), held-out error above the cutoff against a compute-only sigmoid ->
  observational.json/.png.
DATA is a CSV, JSON lines or JSON file, or a directory of trainer runs (every summary.json below it). When a
table has compute but no token count, D = C/(6N) is derived (or C / flops-per-token) and a note says so.
Errors in the input (missing files or columns, bad values) end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scaling.io import (
    SUMMARY_COLUMNS,
    file_rows,
    filter_rows,
    law_data,
    load_table,
    numeric_column,
    parse_columns,
)


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit status 2."""


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _json_default(o: Any):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True)


def _write_json(out: str, name: str, obj: Any) -> Path:
    """Write ``obj`` to ``out/name`` (creating ``out``); return ``out``, where the figures go too."""
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / name).write_text(_dump(obj))
    return outdir


def _per_param(spec: str) -> float | None:
    """k of a ``kN`` FLOP model (``6N`` -> 6.0), or None when ``spec`` is not of that form (a column name)."""
    s = spec.strip()
    if not s.upper().endswith("N"):
        return None
    try:
        k = float(s[:-1] or 1.0)
    except ValueError:
        return None
    if not (math.isfinite(k) and k > 0):
        raise CLIError(f"--flops-per-token {spec!r}: FLOPs per parameter per token must be > 0 (e.g. 6N)")
    return k


def _flops_per_token(
    spec: str | None, table: dict | None = None
) -> Callable[[np.ndarray], np.ndarray] | None:
    """``kN`` (e.g. ``6N``, ``8N``: k FLOPs per parameter per token) or, with a table, a column name."""
    if spec is None:
        return None
    s = spec.strip()
    k = _per_param(s)
    if k is not None:
        return lambda n: k * np.asarray(n, dtype=np.float64)
    if table is not None and s in table:
        col = np.asarray(table[s], dtype=np.float64)
        return lambda n: col  # per-row FLOPs per token (e.g. the trainer's exact accounting)
    raise CLIError(f"--flops-per-token {spec!r}: expected kN (e.g. 6N) or the name of a column")


def _load(path: str, where: Sequence[str] | None = None) -> dict:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"data not found: {p}")
    table = load_table(p)
    if where:
        n0 = len(next(iter(table.values())))
        table = filter_rows(table, where)
        n1 = len(next(iter(table.values())))
        _note(f"--where kept {n1} of {n0} rows")
        if n1 == 0:
            raise CLIError("no rows left after --where")
    return table


def _columns(spec: str | None, table: dict, needed: Sequence[str]) -> dict[str, str]:
    """--columns mapping; for a directory of trainer runs, summary.json keys are the defaults."""
    cols = parse_columns(spec)
    if "run" in table:
        usable = set(needed) | {"N", "C"}  # N and C also serve to derive D
        defaults = {k: v for k, v in SUMMARY_COLUMNS.items() if k in usable and v in table}
        if "loss" in usable and "loss" not in defaults and "final_loss" in table:
            defaults["loss"] = "final_loss"
        cols = {**defaults, **cols}
    return cols


# --- fit -----------------------------------------------------------------------------------------------
def _derived(law_name: str, params: dict) -> dict:
    if law_name == "chinchilla" and {"alpha", "beta"} <= set(params):
        a, b = params["alpha"], params["beta"]
        # Compute-optimal exponents under C = 6ND (Hoffmann et al. 2022, Eq. 4): N* ~ C^a, D* ~ C^b.
        return {"a": b / (a + b), "b": a / (a + b)}
    return {}


def _bootstrap(result: Any, n_boot: int, seed: int) -> tuple[dict, list[dict], int]:
    """Percentile 95% CIs and the parameter draws of ``FitResult.bootstrap`` (resampling points).

    Returns (ci, draws, n_failed); replicates whose refit did not converge (NaN) are left out of the draws.
    """
    if n_boot <= 0:
        return {}, [], 0
    boot = result.bootstrap(n_boot, kind="points", seed=seed)
    ci = {k: [float(lo), float(hi)] for k, (lo, hi) in boot.ci(0.95).items()}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in boot.values.items()}
    ok = np.all([np.isfinite(v) for v in arrays.values()], axis=0)
    draws = [{k: float(v[i]) for k, v in arrays.items()} for i in np.flatnonzero(ok)]
    return ci, draws, int((~ok).sum())


def cmd_fit(args) -> dict:
    from scaling.fit import fit
    from scaling.laws import get_law

    try:
        law = get_law(args.law)
    except KeyError as e:
        raise CLIError(str(e).strip("'\"")) from e
    table = _load(args.data, args.where)
    target = getattr(law, "target", "loss")
    cols = _columns(args.columns, table, [*law.inputs, target])
    positive = {*law.positive_inputs, *([target] if target == "loss" else [])}  # a loss: fitted in log space
    data = law_data(table, [*law.inputs, target], cols, flops_per_token=_flops_per_token(args.flops_per_token,
                    table), dropna=args.dropna, positive=positive, log=_note)
    rows = data.pop("row")
    result = fit(law, data, seed=args.seed)
    params = {k: float(v) for k, v in result.params.items()}
    ci, samples, n_failed = _bootstrap(result, args.n_boot, args.seed)
    if n_failed:
        _note(f"{n_failed} of {args.n_boot} bootstrap refits did not converge and were left out")
    out = {
        "law": law.name,
        "params": params,
        "ci": ci,
        "ci_level": 0.95,
        "objective": float(result.objective),
        "n_points": int(result.n_points),
        "converged": bool(result.converged),
        "message": str(result.message),
        "warnings": list(result.warnings),
        "derived": _derived(law.name, params),
        "data": str(args.data),
        "columns": cols,
        # the FLOP model D was derived with (None: 6N where derived); `optimum` uses it unless told otherwise
        "flops_per_token": args.flops_per_token,
        "rows_used": int(rows.size),
        "n_boot": int(args.n_boot),
        "samples": samples,
        "result": result.to_dict(include_data=False),
    }
    if args.out:
        outdir = _write_json(args.out, "fit.json", out)
        from scaling.plots import plot_law_fit

        plot_law_fit(result, data, samples=samples or None).savefig(outdir / "fit.png", dpi=120)
        _note(f"wrote {outdir / 'fit.json'} and {outdir / 'fit.png'}")
    return {k: v for k, v in out.items() if k not in ("samples", "result")}


# --- backtest ------------------------------------------------------------------------------------------
def cmd_backtest(args) -> dict:
    from scaling.backtest import backtest
    from scaling.laws import get_law

    try:
        laws = [get_law(name.strip()) for name in args.laws.split(",") if name.strip()]
    except KeyError as e:
        raise CLIError(str(e).strip("'\"")) from e
    table = _load(args.data, args.where)
    needed = list(dict.fromkeys([v for law in laws for v in law.inputs] + ["loss", args.by]))
    cols = _columns(args.columns, table, needed)
    data = law_data(table, needed, cols, flops_per_token=_flops_per_token(args.flops_per_token, table),
                    dropna=args.dropna, positive=True, log=_note)
    data.pop("row")
    key, key_name = data[args.by], args.by
    if args.bin_decades is not None:
        if args.bin_decades <= 0:
            raise CLIError(f"--bin-decades must be > 0, got {args.bin_decades}")
        # exact FLOPs scatter around a nominal budget (whole steps): binning log10 keeps a budget in one fold
        key = np.round(np.log10(key) / args.bin_decades) * args.bin_decades
        key_name = f"log10({args.by}) in {args.bin_decades:g}-decade bins"
    result = backtest(laws, data, by=key, key_name=key_name, min_train=args.min_train, seed=args.seed)
    print(result.summary(), file=sys.stderr)
    out = {"data": str(args.data), "columns": cols, "rows_used": int(len(key)), **result.to_dict()}
    if args.out:
        outdir = _write_json(args.out, "backtest.json", out)
        _note(f"wrote {outdir / 'backtest.json'}")
    return out


# --- optimum -------------------------------------------------------------------------------------------
def cmd_optimum(args) -> dict:
    from scaling.laws import get_law
    from scaling.optimal import compute_optimal

    path = Path(args.fit)
    if not path.is_file():
        raise CLIError(f"fit file not found: {path} (write one with `python -m scaling fit ... --out DIR`)")
    try:
        saved = json.loads(path.read_text())
        law, params = get_law(saved["law"]), saved["params"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CLIError(f"{path} is not a fit.json written by `python -m scaling fit` ({e})") from e
    compute = [float(c) for c in args.compute]
    spec, fitted_with = args.flops_per_token, saved.get("flops_per_token")
    if spec is None and fitted_with is not None:
        if _per_param(fitted_with) is None:
            raise CLIError(f"{path} was fitted with D from the per-row FLOPs column {fitted_with!r}; the "
                           f"allocation needs a formula: give --flops-per-token kN (e.g. 6N)")
        spec = fitted_with
        _note(f"FLOP model {spec} (the one {path.name}'s fit derived D with)")
    alloc = compute_optimal((law, params), np.asarray(compute), flops_per_token=_flops_per_token(spec),
                            param_samples=saved.get("samples") or None)
    rows = []
    for i, c in enumerate(compute):
        row = {"C": c, "N": float(alloc.N[i]), "D": float(alloc.D[i]), "loss": float(alloc.loss[i]),
               "tokens_per_param": float(alloc.tokens_per_param[i])}
        for key in ("N", "D", "loss"):
            ci = getattr(alloc, f"{key}_ci", None)
            if ci is not None:
                row[f"{key}_ci"] = [float(ci[0][i]), float(ci[1][i])]
        rows.append(row)
    return rows[0] if len(rows) == 1 else {"optima": rows}


# --- isoflop -------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise CLIError(f"--noise-sd must be a positive number or 'porian', got {text!r}")
    return v


def cmd_isoflop(args) -> dict:
    from scaling.isoflop import approach2

    table = _load(args.data, args.where)
    cols = _columns(args.columns, table, ["C", "N", "D", "loss"])
    # D from the table, or derived from C with --flops-per-token: else Approach 2 assumes C = 6 N D
    has_d = "D" in cols or "D" in table or args.flops_per_token is not None
    need = ["C", "N", "loss", *(["D"] if has_d else [])]
    data = law_data(table, need, cols, flops_per_token=_flops_per_token(args.flops_per_token, table),
                    dropna=args.dropna, log=_note)
    boot: dict = {}
    if args.noise_sd is not None:
        from scaling.isoflop import porian_seed_noise

        if not args.n_boot:
            raise CLIError("--noise-sd sets the bootstrap's noise; give --n-boot N too")
        sd = porian_seed_noise if args.noise_sd == "porian" else _positive_float(args.noise_sd)
        boot = {"bootstrap": "seed_noise", "noise_std": sd}
    # Runs' summary.json FLOPs are realised ones: whole steps put each within 1% of its planned budget, so
    # two runs of one budget can be 2% apart (a 1% tolerance split such budgets in two).
    rtol = args.budget_rtol if args.budget_rtol is not None else (0.025 if Path(args.data).is_dir() else 1e-3)
    res = approach2(data["C"], data["N"], data["loss"], data.get("D"), method=args.method,
                    on_edge=args.on_edge, n_bootstrap=args.n_boot, seed=args.seed, budget_rtol=rtol, **boot)
    out = res.to_dict()
    if args.out:
        outdir = _write_json(args.out, "isoflop.json", out)
        from scaling.plots import plot_isoflop

        plot_isoflop(data["C"], data["N"], data["loss"], result=res).savefig(outdir / "isoflop.png", dpi=120)
        _note(f"wrote {outdir / 'isoflop.json'} and {outdir / 'isoflop.png'}")
    return {"a": out["a"], "b": out["b"], "a_ci": out["a_ci"], "b_ci": out["b_ci"],
            "optima": [{k: o[k] for k in ("C", "N", "D", "loss", "tokens_per_param")} for o in out["optima"]],
            "rejected": out["rejected"]}


# --- pareto --------------------------------------------------------------------------------------------
def _objectives(spec: str) -> list[tuple[str, str]]:
    out = []
    for part in spec.split(","):
        col, _, sense = part.strip().rpartition(":")
        if not col:
            col, sense = sense, "min"
        if sense not in ("min", "max"):
            raise CLIError(f"--objectives entry {part!r}: direction must be min or max (e.g. loss:min)")
        out.append((col, sense))
    if not out:
        raise CLIError("--objectives is empty")
    return out


def cmd_pareto(args) -> dict:
    from scaling.pareto import membership_probability, pareto_front

    table = _load(args.data, args.where)
    objs = _objectives(args.objectives)
    names = [c for c, _ in objs]
    sense = [s for _, s in objs]
    missing = [c for c in names if c not in table]
    if missing:
        raise CLIError(f"objective columns {missing} not found; available columns: {list(table)}")
    pts = np.stack([numeric_column(table, c, f"objective column {c!r}") for c in names], axis=1)
    ok = ~np.isnan(pts).any(axis=1)
    if not ok.all():  # rows as the file numbers them, also after --where
        if not args.dropna:
            raise CLIError(f"missing values in rows {file_rows(table, np.flatnonzero(~ok))[:10].tolist()} "
                           "(use --dropna)")
        _note(f"dropped {int((~ok).sum())} rows with missing objective values")
    rows = np.flatnonzero(ok)
    pts = pts[ok]
    front = pareto_front(pts, sense)
    prob = None
    if args.sigma is not None:
        sig = [float(s) for s in args.sigma.split(",")]
        prob = membership_probability(pts, sig if len(sig) > 1 else sig[0], sense, n_boot=args.n_boot,
                                      noise=args.noise, seed=args.seed)
    label = table.get(args.label) if args.label else None
    if args.label and label is None:
        raise CLIError(f"--label column {args.label!r} not found; available columns: {list(table)}")
    frontier = []
    for i in front:
        item = {"row": int(file_rows(table, rows[i])), **{c: float(pts[i, j]) for j, c in enumerate(names)}}
        if label is not None:
            item["label"] = str(label[rows[i]])
        if prob is not None:
            item["p_frontier"] = float(prob[i])
        frontier.append(item)
    out = {"objectives": dict(objs), "n_points": int(rows.size), "frontier": frontier}
    if prob is not None:
        out["membership_probability"] = {int(r): float(p) for r, p in zip(file_rows(table, rows), prob,
                                                                             strict=True)}
    if args.out:
        outdir = _write_json(args.out, "pareto.json", out)
        if len(names) == 2:
            from scaling.plots import plot_pareto

            labels = None if label is None else [str(v) for v in label[rows]]
            plot_pareto(pts, sense, prob=prob, labels=labels, names=tuple(names)).savefig(
                outdir / "pareto.png", dpi=120)
        _note(f"wrote {outdir / 'pareto.json'}" + (" and pareto.png" if len(names) == 2 else ""))
    return out


# --- downstream ------------------------------------------------------------------------------------------
def cmd_downstream(args) -> dict:
    from scaling.downstream import fit_accuracy_vs_compute, heldout_error

    table = _load(args.data, args.where)
    cols = _columns(args.columns, table, ["C", "accuracy"])
    data = law_data(table, ["C", "accuracy"], cols, flops_per_token=None, dropna=args.dropna, positive=False,
                    log=_note)
    c, acc = data["C"], data["accuracy"]
    if (c <= 0).any():
        raise CLIError("compute must be > 0")
    if not 0 <= args.chance < 1:
        raise CLIError(f"--chance {args.chance:g} must be in [0, 1) (e.g. 0.25 for 4 choices)")
    ceiling = args.ceiling
    if ceiling is not None and not args.chance < ceiling <= 1:
        raise CLIError(f"--ceiling {ceiling:g} must be in (chance = {args.chance:g}, 1]")
    fit = fit_accuracy_vs_compute(c, acc, chance=args.chance, ceiling=ceiling, n_boot=args.n_boot,
                                  seed=args.seed)
    out = {"fit": fit.to_dict(), "C_mid": float(np.exp(fit.mid)), "n_points": int(c.size)}
    if "ci" in out["fit"]:
        out["C_mid_ci"] = [float(np.exp(m)) for m in out["fit"]["ci"]["mid"]]
    if args.cutoff is not None:
        out["heldout"] = heldout_error(c, acc, cutoff=args.cutoff, chance=args.chance, ceiling=ceiling)
    if args.out:
        outdir = _write_json(args.out, "downstream.json", out)
        from scaling.plots import plot_downstream

        shown = fit
        if args.cutoff is not None:  # draw the curve fitted below the cutoff, as the held-out check uses it
            tr = c < args.cutoff
            shown = fit_accuracy_vs_compute(c[tr], acc[tr], chance=args.chance, ceiling=ceiling,
                                            n_boot=args.n_boot, seed=args.seed)
        plot_downstream(c, acc, fit=shown, cutoff=args.cutoff, chance=args.chance).savefig(
            outdir / "downstream.png", dpi=120)
        _note(f"wrote {outdir / 'downstream.json'} and {outdir / 'downstream.png'}")
    return out


# --- observational -------------------------------------------------------------------------------------
def _column(table: dict, col: str, what: str) -> np.ndarray:
    if col not in table:
        raise CLIError(f"{what}: column {col!r} not found; columns: {list(table)}")
    return table[col]


def _numeric(table: dict, col: str, what: str) -> np.ndarray:
    _column(table, col, what)
    return numeric_column(table, col, f"{what} {col!r}")


def _joined_target(args, table: dict) -> np.ndarray:
    """The --target column per row of DATA: from DATA itself, or from --join matched on --on (NaN where the
    joined table has no row for a model)."""
    if args.join is None:
        return _numeric(table, args.target, "--target")
    other = _load(args.join)
    keys = [str(k) for k in _column(other, args.on, f"--on (in {args.join})")]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise CLIError(f"--join {args.join}: key column {args.on!r} repeats {dup[:5]}")
    values = dict(zip(keys, _numeric(other, args.target, f"--target (in {args.join})"), strict=True))
    mine = [str(k) for k in _column(table, args.on, "--on")]
    missing = sorted(set(keys) - set(mine))
    if missing:
        _note(f"{len(missing)} models of {args.join} are not in DATA (e.g. {missing[:3]}); they are left out")
    return np.array([values.get(k, np.nan) for k in mine])


def cmd_observational(args) -> dict:
    from scaling.downstream import fit_accuracy_vs_compute
    from scaling.observational import capability_pca, fit_family_compute, fit_observational

    table = _load(args.data, args.where)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if len(names) < 2:
        raise CLIError("--benchmarks needs at least two comma-separated columns")
    x = np.stack([_numeric(table, b, "--benchmarks") for b in names], axis=1)
    y = _joined_target(args, table)
    has_y = np.isfinite(y)
    if not has_y.all():
        _note(f"{int((~has_y).sum())} of {y.size} models have no {args.target!r}; they shape the PCA only")
    pca = capability_pca(x, args.components, names=names)
    fit = fit_observational(pca.scores[has_y], y[has_y], floor=args.chance, ceiling=args.ceiling,
                            n_boot=args.n_boot, seed=args.seed)
    out = {
        "n_models": int(len(x)), "n_fitted": int(has_y.sum()), "target": args.target,
        "pca": {"benchmarks": names, "explained_variance_ratio": pca.explained_variance_ratio,
                "components": pca.components, "n_imputed": pca.n_imputed},
        "fit": fit.to_dict(),
    }
    compute = None
    if args.compute is not None:
        compute = _numeric(table, args.compute, "--compute")
    if args.family is not None:
        if compute is None:
            raise CLIError("--family needs --compute (capabilities are fitted against log compute)")
        ok = np.isfinite(compute) & (compute > 0)
        fam = np.asarray(_column(table, args.family, "--family")).astype(str)
        fam_fit = fit_family_compute(pca.scores[ok], compute[ok], fam[ok])
        out["family_fit"] = fam_fit.to_dict()
        if args.reference is not None:
            out["efficiency_vs_reference"] = {
                "reference": args.reference, "component": 0,
                "times_the_compute_reference_needs": {f: fam_fit.efficiency(f, args.reference)
                                                      for f in fam_fit.intercepts}}
    if args.cutoff is not None:
        if compute is None:
            raise CLIError("--cutoff needs --compute")
        ok = has_y & np.isfinite(compute) & (compute > 0)
        train, test = ok & (compute < args.cutoff), ok & (compute >= args.cutoff)
        if train.sum() < args.components + 3 or test.sum() < 1:
            raise CLIError(f"--cutoff {args.cutoff:g} leaves {int(train.sum())} models to fit and "
                           f"{int(test.sum())} to predict")
        # the PCA too is fitted below the cutoff: nothing about the held-out models but their benchmarks
        pca_tr = capability_pca(x[train], args.components)
        held = fit_observational(pca_tr.scores, y[train], floor=args.chance, ceiling=args.ceiling,
                                 n_boot=args.n_boot, seed=args.seed)
        comp = fit_accuracy_vs_compute(compute[train], y[train], chance=args.chance, ceiling=args.ceiling)
        s_ok = pca_tr.transform(x[ok])  # every model with a target and compute, for the figure too
        s_test = s_ok[test[ok]]
        err = np.abs(held.predict(s_test) - y[test])
        out["heldout"] = {
            "cutoff": args.cutoff, "n_train": int(train.sum()), "n_test": int(test.sum()),
            "mae": float(err.mean()), "median_ae": float(np.median(err)),
            "compute_only_mae": float(np.abs(comp.predict(compute[test]) - y[test]).mean()),
            "baseline_mae": float(np.abs(y[train].mean() - y[test]).mean()),
        }
        if args.n_boot > 0:  # the band is parameter uncertainty only: expect it to cover less than its level
            lo, hi = held.interval(s_test, level=0.9)
            out["heldout"]["coverage_of_90pct_band"] = float(np.mean((y[test] >= lo) & (y[test] <= hi)))
        shown = dict(fit=held, capabilities_MxK=s_ok, y=y[ok], heldout=test[ok],
                     compute=compute[ok], compute_fit=comp, cutoff=args.cutoff, compute_label=args.compute,
                     title=f"{args.target}: fit below {args.cutoff:g}, held out above")
    else:
        shown = dict(fit=fit, capabilities_MxK=pca.scores[has_y], y=y[has_y], title=args.target)
    if args.out:
        from scaling.plots import plot_observational

        outdir = _write_json(args.out, "observational.json", out)
        plot_observational(**shown).savefig(outdir / "observational.png", dpi=120)
        _note(f"wrote {outdir / 'observational.json'} and {outdir / 'observational.png'}")
    return out


# --- parser --------------------------------------------------------------------------------------------
def _n_boot(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (0 = no bootstrap), got {text!r}")
    return n


def _budget(text: str) -> float:
    try:
        c = float(text)
    except ValueError:
        c = math.nan
    if not (math.isfinite(c) and c > 0):
        raise argparse.ArgumentTypeError(f"expected a FLOP budget > 0 (e.g. 1e24), got {text!r}")
    return c


def _ceiling(text: str) -> float | None:
    if text == "fit":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'fit', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scaling", description="Scaling-law fitting and analysis.")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp, *, flops: bool = True, outputs: str = "JSON + PNG"):
        sp.add_argument("data", help="CSV / TSV / JSON lines / JSON file, or a directory of runs with "
                        "summary.json")
        sp.add_argument("--columns", help="VAR=COLUMN pairs, e.g. N=params,D=tokens,loss=final_loss")
        if flops:
            sp.add_argument("--flops-per-token", help="FLOP model for D from C: kN (default 6N) or a column")
        sp.add_argument("--dropna", action="store_true", help="skip rows with missing values")
        sp.add_argument("--where", action="append", help="row filter COLUMN<op>VALUE, e.g. 'loss<3.44' "
                        "(op: < <= > >= == !=; repeatable)")
        sp.add_argument("--out", help=f"output directory ({outputs})")
        sp.add_argument("--seed", type=int, default=0)

    f = sub.add_parser("fit", help="fit a law; writes fit.json and fit.png")
    data_args(f)
    f.add_argument("--law", default="chinchilla", help="registered law name (default chinchilla)")
    f.add_argument("--n-boot", type=_n_boot, default=200, help="bootstrap refits for CIs (0 = none)")
    f.set_defaults(func=cmd_fit)

    o = sub.add_parser("optimum", help="compute-optimal allocation from a fit.json")
    o.add_argument("--fit", required=True, help="fit.json written by `fit`")
    o.add_argument("--compute", required=True, nargs="+", type=_budget,
                   help="training FLOP budget(s), e.g. 1e24")
    o.add_argument("--flops-per-token", help="kN FLOPs per token (default 6N, i.e. C = 6ND)")
    o.set_defaults(func=cmd_optimum)

    i = sub.add_parser("isoflop", help="Hoffmann Approach 2 on isoFLOP profiles")
    data_args(i)
    i.add_argument("--method", choices=("parabola", "akima"), default="parabola")
    i.add_argument("--on-edge", choices=("raise", "drop"), default="raise",
                   help="budgets whose minimum is at the edge of their size grid (or with < 3 sizes)")
    i.add_argument("--n-boot", type=_n_boot, default=0)
    i.add_argument("--budget-rtol", type=float, default=None,
                   help="C values within this relative distance are one budget (default 1e-3; 0.025 for a "
                        "directory of runs, whose FLOPs are realised: whole steps, each within 1%% of C)")
    i.add_argument("--noise-sd", default=None, metavar="SD|porian",
                   help="bootstrap by redrawing every loss with this seed-noise sd (nats; measure it with "
                        "seed replicates), or 'porian' for Porian et al. 2024's loss-dependent noise, "
                        "instead of resampling points (with few sizes a budget, a resample often keeps < 3)")
    i.set_defaults(func=cmd_isoflop)

    q = sub.add_parser("pareto", help="Pareto frontier of a table")
    q.add_argument("data")
    q.add_argument("--objectives", required=True, help="COLUMN:min|max list, e.g. final_loss:min,flops:min")
    q.add_argument("--sigma", help="measurement noise per objective (one value or one per objective)")
    q.add_argument("--noise", choices=("absolute", "relative"), default="absolute")
    q.add_argument("--n-boot", type=_n_boot, default=1000)
    q.add_argument("--label", help="column used to label points")
    q.add_argument("--dropna", action="store_true")
    q.add_argument("--where", action="append", help="row filter COLUMN<op>VALUE (repeatable)")
    q.add_argument("--out")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_pareto)
    b = sub.add_parser("backtest", help="which law form extrapolates: rolling-origin backtest")
    data_args(b, outputs="backtest.json")
    b.add_argument("--laws", default="chinchilla,kaplan,farseer", help="comma-separated registered law names")
    b.add_argument("--by", default="C", help="variable whose distinct values order the folds (default C)")
    b.add_argument("--bin-decades", type=float, default=None,
                   help="round log10 of --by to bins this wide (e.g. 0.5): near-equal budgets share a fold")
    b.add_argument("--min-train", type=int, default=2, help="distinct --by values in the first fold's fit")
    b.set_defaults(func=cmd_backtest)
    s = sub.add_parser("downstream", help="sigmoid of accuracy vs log compute (+ held-out check)")
    data_args(s, flops=False)
    s.add_argument("--chance", type=float, default=0.0, help="accuracy floor (e.g. 0.25 for 4 choices)")
    s.add_argument("--ceiling", type=_ceiling, default=1.0, help="accuracy ceiling, or 'fit'")
    s.add_argument("--cutoff", type=float, help="fit below this compute, report error above it")
    s.add_argument("--n-boot", type=_n_boot, default=200)
    s.set_defaults(func=cmd_downstream)
    v = sub.add_parser("observational", help="observational scaling law: a metric from benchmark scores")
    v.add_argument("data", help="table of models: benchmark scores (blank = not evaluated), compute, family")
    v.add_argument("--benchmarks", required=True, help="comma-separated score columns (fractions in [0, 1])")
    v.add_argument("--target", required=True, help="the metric to predict (a column of DATA or of --join)")
    v.add_argument("--join", help="a second table holding --target, matched to DATA on --on")
    v.add_argument("--on", default="Model", help="key column shared by DATA and --join (default Model)")
    v.add_argument("--compute", help="training-compute column (for --family and --cutoff)")
    v.add_argument("--family", help="model-family column: per-family compute fits of the capabilities")
    v.add_argument("--reference", help="family the others' compute efficiency is measured against")
    v.add_argument("--components", type=int, default=3, help="principal capabilities used (default 3)")
    v.add_argument("--chance", type=float, default=0.0, help="metric floor (e.g. 0.25 for 4 choices)")
    v.add_argument("--ceiling", type=_ceiling, default=1.0, help="metric ceiling, or 'fit'")
    v.add_argument("--cutoff", type=float, help="also fit below this compute and report the error above it")
    v.add_argument("--n-boot", type=_n_boot, default=200)
    v.add_argument("--where", action="append", help="row filter COLUMN<op>VALUE (repeatable)")
    v.add_argument("--out", help="output directory (observational.json, observational.png)")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_observational)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line a user reads next to the notes, not Python's file:line and source echo."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    print(f"warning: {kind}{message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the caller's display when the command returns
            warnings.showwarning = _show_warning
            out = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(_dump(out))
    return 0
