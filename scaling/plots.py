"""Matplotlib figures for scaling analyses; every function returns a ``matplotlib.figure.Figure``.

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global state, nothing
shown), so they work headless and in tests; save with ``fig.savefig(path)``. matplotlib is imported lazily,
inside the functions, so ``import scaling`` never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scaling.intervals import percentile_interval

__all__ = [
    "plot_isoflop",
    "plot_law_fit",
    "plot_optimal",
    "plot_pareto",
    "plot_law_frontier",
    "plot_downstream",
    "plot_observational",
    "plot_loss_curves",
]


def _figure(nrows: int = 1, ncols: int = 1, *, figsize=(6.4, 4.8), height_ratios=None, sharex=False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    gs = {"height_ratios": height_ratios} if height_ratios else None
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=gs, sharex=sharex)
    return fig, axes


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.9, max(n, 1))]


def _law_eval(law: Any, params: Mapping[str, float], **inputs) -> np.ndarray:
    """``law.predict`` in float64 (scoped x64 so the user's global jax setting is untouched)."""
    import jax

    with jax.enable_x64(True):
        x = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
        return np.asarray(law.predict(dict(params), **x), dtype=np.float64)


def _param_draws(samples: Any) -> list[dict[str, float]]:
    """Bootstrap draws as a list of dicts, from a list of dicts or a dict of equal-length arrays."""
    if samples is None:
        return []
    if isinstance(samples, Mapping):
        arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in samples.items()}
        n = min(v.size for v in arrays.values())
        return [{k: float(v[i]) for k, v in arrays.items()} for i in range(n)]
    return [dict(s) for s in samples]


# --- isoFLOP
# -------------------------------------------------------------------------------------------------
def plot_isoflop(C, N, loss, result: Any = None, *, budget_rtol: float | None = None,
                 title: str | None = None):
    """IsoFLOP profiles: loss vs N per compute budget, least-squares parabolas in log N, and the optima.

    Args:
      C, N, loss: one row per run; rows whose C values lie within ``budget_rtol`` form one profile, grouped
        as ``scaling.isoflop.approach2`` groups them (realised FLOPs of one budget differ slightly).
      result: optional Approach-2 result (``.N``, ``.loss``, ``.C``, e.g. ``scaling.isoflop.approach2``) whose
        per-budget optima are marked with stars; without it the parabola vertices are marked.
      budget_rtol: default: the result's own ``settings["budget_rtol"]``, else approach2's default.
    """
    from scaling.isoflop import BUDGET_RTOL, _budget_groups

    c, n, y = (np.asarray(v, dtype=np.float64).ravel() for v in (C, N, loss))
    if not (c.size == n.size == y.size):
        raise ValueError(f"C, N, loss must have equal lengths; got {c.size}, {n.size}, {y.size}")
    if budget_rtol is None:
        budget_rtol = (getattr(result, "settings", None) or {}).get("budget_rtol", BUDGET_RTOL)
    fig, axes = _figure()
    ax = axes[0, 0]
    groups = _budget_groups(c, budget_rtol)
    for color, (b, idx) in zip(_colors(len(groups)), groups, strict=True):
        ax.scatter(n[idx], y[idx], color=color, s=16, label=f"C = {b:.1e}")
        if idx.size >= 3:
            x = np.log(n[idx])
            coef = np.polyfit(x, y[idx], 2)
            grid = np.linspace(x.min(), x.max(), 100)
            ax.plot(np.exp(grid), np.polyval(coef, grid), color=color, lw=1)
            if result is None and coef[0] > 0:
                xv = -coef[1] / (2 * coef[0])
                ax.scatter([np.exp(xv)], [np.polyval(coef, xv)], marker="*", s=120, color=color,
                           edgecolor="k", zorder=3)
    if result is not None:
        ax.scatter(np.asarray(result.N), np.asarray(result.loss), marker="*", s=140, color="red",
                   edgecolor="k", zorder=3, label="optimum N*(C)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title(title or "isoFLOP profiles")
    ax.legend(fontsize="small")
    return fig


# --- fitted law vs data
# --------------------------------------------------------------------------------------
def plot_law_fit(fit: Any, data: Mapping[str, Any], *, x: str | None = None, samples: Any = None,
                 level: float = 0.9, title: str | None = None):
    """A fitted law against its data (top) and the relative residuals (bottom).

    Args:
      fit: fitted law with ``.law`` (``.inputs``, ``.target``, ``.predict(params, **inputs)``),
        ``.params`` and ``.predict(**inputs)`` -- a ``scaling.fit.FitResult``.
      data: dict with the law's inputs and its target column (``fit.law.target``, or "loss"/"y").
      x: input shown on the horizontal axis (default: the first input).
      samples: bootstrap parameter draws (list of dicts or dict of arrays) for a ``level`` band.
    Single-input laws get a smooth curve (and band); multi-input laws show the prediction at every data point
    (with a bootstrap error bar), points coloured by the other input.
    """
    law = fit.law
    inputs = tuple(law.inputs)
    x = x or inputs[0]
    if x not in inputs:
        raise ValueError(f"x={x!r} is not an input of law {law.name!r} {inputs}")
    target = next((k for k in (getattr(law, "target", None), "loss", "y") if k and k in data), None)
    if target is None:
        want = getattr(law, "target", "loss")
        raise ValueError(f"data has no target column ({want!r}); keys: {list(data)}")
    arr = {k: np.asarray(data[k], dtype=np.float64).ravel() for k in (*inputs, target)}
    obs, xv = arr[target], arr[x]
    pred = np.asarray(fit.predict(**{k: arr[k] for k in inputs}), dtype=np.float64)
    draws = _param_draws(samples)
    fig, axes = _figure(2, 1, figsize=(6.4, 6.0), height_ratios=[3, 1], sharex=True)
    top, bot = axes[0, 0], axes[1, 0]
    others = [k for k in inputs if k != x]
    if not others:
        space = np.geomspace if (xv > 0).all() else np.linspace
        grid = space(xv.min(), xv.max(), 200)
        top.scatter(xv, obs, s=14, color="C0", label="data")
        top.plot(grid, np.asarray(fit.predict(**{x: grid})), color="C3", label=f"{law.name} fit")
        if draws:
            curves = np.stack([_law_eval(law, d, **{x: grid}) for d in draws])
            top.fill_between(grid, *percentile_interval(curves, level), color="C3", alpha=0.25,
                             label=f"{level:.0%} bootstrap band")
    else:
        hue = np.log10(arr[others[0]])
        sc = top.scatter(xv, obs, c=hue, s=14, cmap="viridis", label="data")
        fig.colorbar(sc, ax=top, label=f"log10 {others[0]}")
        yerr = None
        if draws:
            pts = np.stack([_law_eval(law, d, **{k: arr[k] for k in inputs}) for d in draws])
            lo, hi = percentile_interval(pts, level)
            yerr = np.abs(np.stack([pred - lo, hi - pred]))
        top.errorbar(xv, pred, yerr=yerr, fmt="x", color="C3", ms=4, lw=0.8, label=f"{law.name} prediction")
    bot.axhline(0.0, color="k", lw=0.8)
    bot.scatter(xv, 100 * (obs - pred) / pred, s=10, color="C0")
    bot.set_ylabel("residual (%)")
    bot.set_xlabel(x)
    if (xv > 0).all():
        top.set_xscale("log")
    top.set_ylabel(target)
    top.legend(fontsize="small")
    top.set_title(title or f"{law.name} fit ({xv.size} points)")
    return fig


# --- compute-optimal allocation ------------------------------------------------------------------------
def plot_optimal(alloc: Any, *, approach2: Any = None, title: str | None = None):
    """N*(C) and D*(C) with confidence bands, from ``scaling.optimal.compute_optimal`` (``.C/.N/.D``, optional
    ``.N_ci/.D_ci``); optionally overlay Approach-2 per-budget optima (``.C/.N/.D``)."""
    fig, axes = _figure(1, 2, figsize=(10, 4.2))
    c = np.asarray(alloc.C, dtype=np.float64)
    for ax, key, label in ((axes[0, 0], "N", "N*(C) parameters"), (axes[0, 1], "D", "D*(C) tokens")):
        ax.plot(c, np.asarray(getattr(alloc, key)), color="C0", label=f"{getattr(alloc, 'method', 'fit')}")
        ci = getattr(alloc, f"{key}_ci", None)
        if ci is not None:
            ax.fill_between(c, np.asarray(ci[0]), np.asarray(ci[1]), color="C0", alpha=0.25,
                            label=f"{getattr(alloc, 'ci_level', 0.95):.0%} CI")
        if approach2 is not None:
            ax.scatter(np.asarray(approach2.C), np.asarray(getattr(approach2, key)), color="C1", zorder=3,
                       label="Approach 2 optima")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOP)")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    fig.suptitle(title or "compute-optimal allocation")
    return fig


# --- Pareto
# ----------------------------------------------------------------------------------------------------
def plot_pareto(points_Nx2, sense: str | Sequence[str] = "min", *, prob=None,
                labels: Sequence[str] | None = None,
                names: tuple[str, str] = ("objective 1", "objective 2"), logx: bool = False,
                title: str | None = None):
    """Two objectives: every point (coloured by frontier-membership probability when ``prob`` is given), the
    exact frontier as a staircase, and optional point labels."""
    from scaling.pareto import pareto_front

    pts = np.asarray(points_Nx2, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"plot_pareto draws two objectives; got points of shape {pts.shape}")
    fig, axes = _figure()
    ax = axes[0, 0]
    if prob is not None:
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=np.asarray(prob), cmap="viridis", vmin=0, vmax=1, s=24,
                        edgecolor="k", linewidth=0.3)
        fig.colorbar(sc, ax=ax, label="P(on frontier)")
    else:
        ax.scatter(pts[:, 0], pts[:, 1], color="0.6", s=18)
    front = pts[pareto_front(pts, sense)]
    ax.step(front[:, 0], front[:, 1], where="post", color="C3", lw=1.5, label="Pareto frontier")
    ax.scatter(front[:, 0], front[:, 1], facecolor="none", edgecolor="C3", s=60, zorder=3)
    if labels is not None:
        for (px, py), lab in zip(pts, labels, strict=True):
            ax.annotate(str(lab), (px, py), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize="small")
    ax.set_title(title or "Pareto frontier")
    return fig


def plot_law_frontier(frontier: Any, *, ylabel: str = "loss", title: str | None = None):
    """Families' predicted curves, the best-of envelope and the crossovers, from
    ``scaling.pareto.law_frontier``."""
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, name in enumerate(frontier.names):
        ax.plot(frontier.compute, frontier.values[i], lw=1, label=name)
    ax.plot(frontier.compute, frontier.frontier, color="k", lw=2.5, alpha=0.4, label="frontier")
    for cx, a, b in frontier.crossovers:
        ax.axvline(cx, color="0.4", ls="--", lw=0.8)
        ax.annotate(f"{a}→{b}", (cx, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", ha="right")
    ax.set_xscale("log")
    ax.set_xlabel("compute C")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.set_title(title or "frontier implied by fitted laws")
    return fig


# --- downstream
# ----------------------------------------------------------------------------------------------
def plot_downstream(compute, accuracy, *, fit: Any = None, two_step: Any = None, cutoff: float | None = None,
                    chance: float | None = None, ceiling: float | None = None, level: float = 0.9,
                    extend: float = 10.0, title: str | None = None):
    """Accuracy vs compute with a sigmoid fit and/or two-step prediction (each with its bootstrap band).

    Args:
      fit: ``scaling.downstream.SigmoidFit`` against compute (``predict``, optional ``interval``).
      two_step: ``scaling.downstream.TwoStepFit``.
      cutoff: compute of the train/held-out split (vertical line; held-out points drawn hollow).
      chance, ceiling: known floor and ceiling, drawn as dashed lines.
      extend: the curves run to ``extend`` x the largest compute (extrapolation).
    """
    c = np.asarray(compute, dtype=np.float64).ravel()
    y = np.asarray(accuracy, dtype=np.float64).ravel()
    fig, axes = _figure()
    ax = axes[0, 0]
    held = np.zeros(c.size, dtype=bool) if cutoff is None else c >= cutoff
    ax.scatter(c[~held], y[~held], s=16, color="C0", label="fit data")
    if held.any():
        ax.scatter(c[held], y[held], s=20, facecolor="none", edgecolor="C0", label="held out")
        ax.axvline(cutoff, color="0.5", ls=":", lw=1)
    grid = np.geomspace(c.min(), c.max() * extend, 200)
    for obj, color, name in ((fit, "C3", "sigmoid in log C"), (two_step, "C2", "two-step C→loss→acc")):
        if obj is None:
            continue
        ax.plot(grid, obj.predict(grid), color=color, label=name)
        try:
            lo, hi = obj.interval(grid, level=level)
        except ValueError:  # no bootstrap draws: curve only
            continue
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="k", lw=0.8, ls="--", label="chance")
    if ceiling is not None:
        ax.axhline(ceiling, color="0.4", lw=0.8, ls="-.", label="ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOP)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small")
    ax.set_title(title or "downstream capability")
    return fig


# --- observational scaling ------------------------------------------------------------------------------
def plot_observational(fit: Any, capabilities_MxK, y, *, heldout=None, x=None, xlabel: str | None = None,
                       log_x: bool = False, compute=None, compute_fit: Any = None,
                       cutoff: float | None = None, compute_label: str = "training compute C (FLOP)",
                       level: float = 0.9, title: str | None = None):
    """A metric against the capability index of an observational fit (Ruan et al. 2024), and, given each
    model's training compute, against that compute (where families of different efficiency scatter).

    Args:
      fit: ``scaling.observational.ObservationalFit`` (``index``, ``predict``; ``interval`` when it has
        bootstrap samples).
      capabilities_MxK, y: every model's capabilities (scores of the PCA the fit used) and metric.
      heldout: boolean mask of models the fit did not see, drawn as red squares.
      x: the left panel's x per model; default the fitted index ``w . S + b`` (the sigmoid's logit), on which
        the fit is one curve. Pass e.g. ``np.exp(equivalent_log_compute(...))`` with ``log_x=True`` for the
        paper's "reference-equivalent FLOPs", an affine map of the index.
      compute, compute_fit, cutoff: training compute per model, a ``SigmoidFit`` against it (compute-only
        baseline) and the train/held-out split, for the right panel (x label ``compute_label``).
    """
    s = np.asarray(capabilities_MxK, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    held = np.zeros(y.size, dtype=bool) if heldout is None else np.asarray(heldout, dtype=bool).ravel()
    if held.size != y.size or len(s) != y.size:
        raise ValueError(f"capabilities ({len(s)}), y ({y.size}) and heldout ({held.size}) differ in length")
    xs = fit.index(s) if x is None else np.asarray(x, dtype=np.float64).ravel()
    if xs.size != y.size:
        raise ValueError(f"x has {xs.size} values for {y.size} models")
    fig, axes = _figure(1, 1 + (compute is not None), figsize=(6.4 * (1 + (compute is not None)), 4.4))
    ax = axes[0, 0]
    order = np.argsort(xs)
    if getattr(fit, "samples", None) is not None:
        lo, hi = fit.interval(s[order], level=level)
        ax.fill_between(xs[order], lo, hi, color="C0", alpha=0.2, label=f"{level:.0%} bootstrap band")
    ax.plot(xs[order], fit.predict(s[order]), color="C0", lw=1.2, label="observational fit")
    ax.scatter(xs[~held], y[~held], s=14, color="k", label="fitted models")
    if held.any():
        ax.scatter(xs[held], y[held], s=20, color="C3", marker="s", label="held out")
    ax.axhline(fit.floor, color="k", lw=0.8, ls="--", label="floor")
    ax.set_xscale("log" if log_x else "linear")
    ax.set_xlabel(xlabel or ("capability index w·S + b" if x is None else "x"))
    ax.set_ylabel("metric")
    ax.set_title(title or "observational scaling law")
    ax.legend(fontsize="x-small")
    if compute is not None:
        c = np.asarray(compute, dtype=np.float64).ravel()
        if c.size != y.size:
            raise ValueError(f"compute has {c.size} values for {y.size} models")
        ax = axes[0, 1]
        ax.scatter(c[~held], y[~held], s=14, color="k")
        if held.any():
            ax.scatter(c[held], y[held], s=20, color="C3", marker="s")
        if compute_fit is not None:
            grid = np.geomspace(c.min(), c.max(), 200)
            ax.plot(grid, compute_fit.predict(grid), color="C2", lw=1.2, label="sigmoid in log C")
            ax.legend(fontsize="x-small")
        if cutoff is not None:
            ax.axvline(cutoff, color="0.5", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(compute_label)
        ax.set_title("compute only")
    return fig


# --- loss curves across schedules ----------------------------------------------------------------------
def plot_loss_curves(curves: Mapping[str, tuple], predictions: Mapping[str, Mapping[str, Any]] | None = None,
                     *, lr: Mapping[str, Any] | None = None,
                     bands: Mapping[str, Mapping[str, Any]] | None = None, title: str | None = None):
    """One panel per run: its measured loss curve and each law's prediction of it (e.g. a schedule held out
    from ``scaling.lr_annealing.fit_annealing`` / ``scaling.multipower.fit_multipower``), with the run's
    learning-rate schedule on a second axis.

    Args:
      curves: run name -> (steps, loss) measured.
      predictions: run name -> {law name -> predicted loss at those steps}.
      lr: run name -> per-step learning rates (step 1 first), drawn in grey on a right-hand axis.
      bands: run name -> {law name -> (lower, upper) at those steps}, shaded in the law's colour (e.g.
        ``CurveBootstrap.band`` of the fit that predicted it).
    """
    names = list(curves)
    if not names:
        raise ValueError("no curves to plot")
    fig, axes = _figure(1, len(names), figsize=(4.4 * len(names), 3.8))
    for i, name in enumerate(names):
        ax = axes[0, i]
        steps, loss = (np.asarray(a, dtype=np.float64).ravel() for a in curves[name])
        if steps.size != loss.size:
            raise ValueError(f"{name}: {steps.size} steps but {loss.size} losses")
        ax.plot(steps, loss, "o", ms=3, color="k", label="measured")
        for j, (law, pred) in enumerate(((predictions or {}).get(name) or {}).items()):
            pred = np.asarray(pred, dtype=np.float64).ravel()
            if pred.size != steps.size:
                raise ValueError(f"{name}: the {law} prediction has {pred.size} values for {steps.size} "
                                 "steps")
            ax.plot(steps, pred, color=f"C{j}", lw=1.4, label=law)
            band = ((bands or {}).get(name) or {}).get(law)
            if band is not None:
                lo, hi = (np.asarray(b, dtype=np.float64).ravel() for b in band)
                if lo.size != steps.size or hi.size != steps.size:
                    raise ValueError(f"{name}: the {law} band has {lo.size}/{hi.size} values for "
                                     f"{steps.size} steps")
                ax.fill_between(steps, lo, hi, color=f"C{j}", alpha=0.2, lw=0)
        if lr is not None and name in lr:
            twin = ax.twinx()
            schedule = np.asarray(lr[name], dtype=np.float64).ravel()
            twin.plot(np.arange(1, schedule.size + 1), schedule, color="0.6", lw=0.8, ls="--")
            twin.set_ylabel("learning rate", color="0.5")
        ax.set_xlabel("step")
        ax.set_title(name)
        if i == 0:
            ax.set_ylabel("loss")
            ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    return fig
