"""Hoffmann et al. 2022 Approach 3, the three-approach cross-check, and the bias of the parabola method.

- `approach3`: compute-optimal N*(C), D*(C) implied by a fitted parametric law (closed form for Chinchilla,
  numeric otherwise, see scaling/optimal.py), summarised as power laws over a compute range, with percentile
  CIs from bootstrap parameter draws.
- `compare_approaches`: Approaches 1, 2 and 3 on the same training curves, as a comparison table.
- `parabola_bias`: the known biases of Approach 2's parabola (grid width, off-centre sampling, asymmetry of
  the isoFLOP profile), measured by simulating isoFLOP grids from a fitted law (e.g. the Approach 3 fit) and
  refitting them: the exponent and log N* bias for each grid design.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling._lawcall import as_param_samples, check_inputs, evaluate, resolve_law
from scaling.intervals import percentile_interval
from scaling.isoflop import (
    Approach1Result,
    Approach2Result,
    _batched_slopes,
    _parabola_min,
    approach1,
    approach2,
    isoflop_slices,
)
from scaling.optimal import OptimalAllocation, compute_optimal
from scaling.powerlaw import AllocationLaws, PowerLawFit, fit_power_law

__all__ = [
    "Approach3Result",
    "ApproachComparison",
    "ParabolaBias",
    "approach3",
    "compare_approaches",
    "parabola_bias",
]

FlopsPerToken = Callable[[np.ndarray], np.ndarray]


@dataclass
class Approach3Result(AllocationLaws):
    """N*(C), D*(C) from a parametric fit, with power laws fitted over the C range (exact for Chinchilla).

    `law` is the Law object and `params` its parameters, so the result can itself be passed wherever a fitted
    law is accepted (e.g. `parabola_bias(result, budgets)`).
    """

    allocation: OptimalAllocation
    n_fit: PowerLawFit
    d_fit: PowerLawFit
    a_ci: tuple[float, float] | None
    b_ci: tuple[float, float] | None
    law: Any
    params: dict
    ci_level: float = 0.95
    n_samples: int = 0
    n_failed_samples: int = 0  # bootstrap draws without an interior optimum (excluded from the CIs)

    @property
    def law_name(self) -> str:
        return str(getattr(self.law, "name", self.law))

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "a_ci": None if self.a_ci is None else list(self.a_ci),
            "b_ci": None if self.b_ci is None else list(self.b_ci),
            "law": self.law_name,
            "params": self.params,
            "allocation": self.allocation.to_dict(),
            "n_fit": self.n_fit.to_dict(),
            "d_fit": self.d_fit.to_dict(),
            "ci_level": self.ci_level,
            "n_samples": self.n_samples,
        }

    def summary(self) -> str:
        ci = "" if self.a_ci is None else f"  {self.ci_level:.0%} CI [{self.a_ci[0]:.4f}, {self.a_ci[1]:.4f}]"
        cib = (
            "" if self.b_ci is None else f"  {self.ci_level:.0%} CI [{self.b_ci[0]:.4f}, {self.b_ci[1]:.4f}]"
        )
        return (
            f"Approach 3 (law={self.law_name}, {self.allocation.method})\n"
            f"  N* = {self.n_fit.coef:.4g} C^{self.a:.4f}{ci}\n"
            f"  D* = {self.d_fit.coef:.4g} C^{self.b:.4f}{cib}"
        )


def approach3(
    model: Any,
    C: Any,
    *,
    params: Mapping[str, float] | None = None,
    flops_per_token: FlopsPerToken | None = None,
    param_samples: Any = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    n_bounds: tuple[float, float] = (1e2, 1e16),
) -> Approach3Result:
    """Approach 3 from a fitted law (FitResult, (law, params) pair, or law + params=) over budgets C.

    With several budgets the exponents are the log-log slopes of N*(C), D*(C) over C (exact a, b for the
    Chinchilla closed form); with one budget they are the local exponents. `param_samples` (bootstrap draws of
    the parameters: a `scaling.bootstrap.Bootstrap`, list of dicts or dict of arrays) give percentile CIs of
    a and b; or `n_bootstrap` > 0 with a FitResult runs `model.bootstrap(n=n_bootstrap, seed=seed)`.
    """
    if param_samples is None and n_bootstrap:
        if not hasattr(model, "bootstrap"):
            raise ValueError("n_bootstrap needs a FitResult (with .bootstrap); pass param_samples instead")
        param_samples = model.bootstrap(n=n_bootstrap, seed=seed)
    law, p = resolve_law(model, params)
    C = np.atleast_1d(np.asarray(C, dtype=np.float64))
    alloc = compute_optimal((law, p), C, flops_per_token=flops_per_token, n_bounds=n_bounds)

    def fits(n, d, alloc_):
        if C.size >= 2:
            return fit_power_law(C, n, None, ci_level), fit_power_law(C, d, None, ci_level)
        # single budget: a power law through the point with the local exponent
        a, b = float(alloc_.n_exponent[0]), float(alloc_.d_exponent[0])
        mk = lambda e, y: PowerLawFit(
            e, float(y[0] / C[0] ** e), 1.0, float("nan"), (e, e), 1, False, ci_level
        )
        return mk(a, n), mk(b, d)

    n_fit, d_fit = fits(alloc.N, alloc.D, alloc)
    samples = as_param_samples(param_samples)
    a_ci = b_ci = None
    n_failed = 0
    if samples:
        # One vectorised solve for every draw (draws without an interior optimum are counted, excluded).
        al = compute_optimal((law, p), C, flops_per_token=flops_per_token, n_bounds=n_bounds,
                             param_samples=samples)
        n_failed = al.n_failed_samples
        if C.size >= 2:
            a_s = [fit_power_law(C, n, None, ci_level).exponent for n in al.sample_N]
            b_s = [fit_power_law(C, d, None, ci_level).exponent for d in al.sample_D]
        else:  # one budget: each draw's local exponents, one solve per draw
            a_s, b_s = [], []
            for s in samples:
                try:
                    one = compute_optimal((law, {**p, **s}), C, flops_per_token=flops_per_token,
                                          n_bounds=n_bounds)
                except ValueError:
                    continue
                a_s.append(float(one.n_exponent[0])), b_s.append(float(one.d_exponent[0]))
        if len(a_s) >= max(2, len(samples) // 2):  # a CI from a minority of the draws would be biased
            a_ci = tuple(float(v) for v in percentile_interval(a_s, ci_level))
            b_ci = tuple(float(v) for v in percentile_interval(b_s, ci_level))
    return Approach3Result(
        allocation=alloc,
        n_fit=n_fit,
        d_fit=d_fit,
        a_ci=a_ci,
        b_ci=b_ci,
        law=law,
        params=p,
        ci_level=ci_level,
        n_samples=len(samples),
        n_failed_samples=n_failed,
    )


# ----------------------------------------------------------------------------------------------------------
@dataclass
class ApproachComparison:
    """Approaches 1-3 on the same data: exponents, CIs and N*, D* at a reference budget C_ref.

    `fit`: the parametric fit behind Approach 3 (the supplied one, or the FitResult fitted here).
    """

    C_ref: float
    approach1: Approach1Result | None
    approach2: Approach2Result | None
    approach3: Approach3Result | None
    errors: dict = field(default_factory=dict)
    fit: Any = None

    def rows(self) -> list[dict]:
        out = []
        for name, res in (
            ("approach1", self.approach1),
            ("approach2", self.approach2),
            ("approach3", self.approach3),
        ):
            if res is None:
                out.append({"approach": name, "error": self.errors.get(name)})
                continue
            n, d = res.predict(self.C_ref)
            out.append(
                {
                    "approach": name,
                    "a": res.a,
                    "a_ci": None if res.a_ci is None else list(res.a_ci),
                    "b": res.b,
                    "b_ci": None if res.b_ci is None else list(res.b_ci),
                    "N_opt": float(np.asarray(n).ravel()[0]),
                    "D_opt": float(np.asarray(d).ravel()[0]),
                }
            )
        return out

    @property
    def max_exponent_gap(self) -> float:
        a = [r["a"] for r in self.rows() if "a" in r]
        return float(np.ptp(a)) if len(a) >= 2 else float("nan")

    def to_dict(self) -> dict:
        return {
            "C_ref": self.C_ref,
            "rows": self.rows(),
            "max_exponent_gap": self.max_exponent_gap,
            "errors": dict(self.errors),
        }

    def summary(self) -> str:
        lines = [
            f"Hoffmann approaches compared (N*, D* at C = {self.C_ref:.3g})",
            f"{'approach':<10} {'a':>7} {'a CI':>17} {'b':>7} {'b CI':>17} {'N*':>10} {'D*':>10}",
        ]
        for r in self.rows():
            if "a" not in r:
                lines.append(f"{r['approach']:<10} failed: {r['error']}")
                continue
            fmt = lambda ci: "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            lines.append(
                f"{r['approach']:<10} {r['a']:7.4f} {fmt(r['a_ci']):>17} {r['b']:7.4f} {fmt(r['b_ci']):>17} "
                f"{r['N_opt']:10.3e} {r['D_opt']:10.3e}"
            )
        lines.append(f"max |a_i - a_j| = {self.max_exponent_gap:.4f}")
        return "\n".join(lines)


def compare_approaches(
    N: Any,
    D: Any,
    loss: Any,
    *,
    run: Any = None,
    budgets: Sequence[float] | None = None,
    fit: Any = None,
    law: Any = "chinchilla",
    fit_on: str = "final",
    flops_per_token: FlopsPerToken | None = None,
    approach1_kwargs: Mapping | None = None,
    approach2_kwargs: Mapping | None = None,
    approach3_kwargs: Mapping | None = None,
    fit_kwargs: Mapping | None = None,
    C_ref: float | None = None,
) -> ApproachComparison:
    """Run Approaches 1, 2 and 3 on the same training curves and tabulate them.

    Rows are checkpoints (N, D tokens seen, loss; `run` ids, default N). Approach 1 uses the curves directly;
    Approach 2 the isoFLOP slices of the curves at `budgets` (default: 8 log-spaced budgets inside the range
    covered by at least half of the runs); Approach 3 a parametric fit — `fit` if given (FitResult or
    (law, params)), else `scaling.fit.fit(law, data)` on the final checkpoint of every run (fit_on="final")
    or on all checkpoints ("all"). A failing approach is reported in `errors`, not raised.
    """
    N, D, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, loss))
    run_ids = N if run is None else np.asarray(run).ravel()
    C = D * (6.0 * N if flops_per_token is None else np.asarray(flops_per_token(N), dtype=np.float64))
    if budgets is None:
        ends = np.sort([C[run_ids == r].max() for r in np.unique(run_ids)])
        starts = np.sort([C[run_ids == r].min() for r in np.unique(run_ids)])
        lo, hi = starts[len(starts) // 2], ends[len(ends) // 2]
        if hi <= lo:
            lo, hi = C.min(), C.max()
        budgets = np.geomspace(lo, hi, 8)
    budgets = np.asarray(budgets, dtype=np.float64)
    c_ref = float(np.exp(np.mean(np.log(budgets)))) if C_ref is None else float(C_ref)
    errors: dict = {}
    r1 = r2 = r3 = None
    try:
        r1 = approach1(N, D, loss, run=run, flops_per_token=flops_per_token, **dict(approach1_kwargs or {}))
    except ValueError as err:
        errors["approach1"] = str(err)
    try:
        sl = isoflop_slices(N, D, loss, budgets, run=run, flops_per_token=flops_per_token)
        kw = {"on_edge": "drop", **dict(approach2_kwargs or {})}
        r2 = approach2(sl["C"], sl["N"], sl["loss"], sl["D"], flops_per_token=flops_per_token, **kw)
    except ValueError as err:
        errors["approach2"] = str(err)
    try:
        if fit is None:
            from scaling.fit import fit as fit_law  # lazy: only needed when no fit is supplied
            from scaling.laws import get_law

            if fit_on == "final":
                last = [np.flatnonzero(run_ids == r)[np.argmax(D[run_ids == r])] for r in np.unique(run_ids)]
                idx = np.asarray(last)
            elif fit_on == "all":
                idx = np.arange(N.size)
            else:
                raise ValueError(f"fit_on must be 'final' or 'all', got {fit_on!r}")
            spread = np.ptp(np.log(D[idx] / N[idx]))
            if spread < 0.1:
                # With D/N (nearly) constant, N^-alpha and D^-beta are collinear and the law's N and D terms
                # cannot be told apart (e.g. alpha and beta swap): refuse rather than return an arbitrary fit.
                raise ValueError(
                    f"the {fit_on} checkpoints all have D/N within {np.exp(spread):.3f}x of each other, so "
                    "the law's N and D terms are not identifiable; use fit_on='all', runs of different "
                    "lengths, or pass fit="
                )
            fit = fit_law(
                get_law(law) if isinstance(law, str) else law,
                {"N": N[idx], "D": D[idx], "loss": loss[idx]},
                **dict(fit_kwargs or {}),
            )
        r3 = approach3(fit, budgets, flops_per_token=flops_per_token, **dict(approach3_kwargs or {}))
    except ValueError as err:
        errors["approach3"] = str(err)
    return ApproachComparison(C_ref=c_ref, approach1=r1, approach2=r2, approach3=r3, errors=errors, fit=fit)


# ----------------------------------------------------------------------------------------------------------
@dataclass
class ParabolaBias:
    """Bias of Approach 2's parabola, per grid design, measured on data simulated from a known law.

    Each row: width_decades (span of the size grid), offset_decades (grid centre relative to the true N*),
    drift (extra offset per decade of C),
    n_points, noise, a_true, a_mean, a_bias (= a_mean - a_true), a_sd (spread over simulations), log10_n_bias
    (mean log10 of fitted / true N*), refused_fraction (budgets refused as edge minima), asymmetry (profile
    asymmetry at the grid ends: (L(right) - L(left)) / (L(right) + L(left) - 2 L*), 0 = symmetric).
    """

    rows: list[dict]
    law: str
    budgets: np.ndarray
    n_sim: int

    def to_dict(self) -> dict:
        return {"rows": self.rows, "law": self.law, "budgets": self.budgets.tolist(), "n_sim": self.n_sim}

    def row(self, width: float, offset: float = 0.0, drift: float = 0.0) -> dict:
        for r in self.rows:
            if (
                np.isclose(r["width_decades"], width)
                and np.isclose(r["offset_decades"], offset)
                and np.isclose(r["drift"], drift)
            ):
                return r
        raise KeyError(f"no row with width={width}, offset={offset}, drift={drift}")

    def summary(self) -> str:
        lines = [
            f"parabola (Approach 2) bias on data simulated from law={self.law}, {self.budgets.size} budgets, "
            f"{self.n_sim} simulations",
            f"{'width':>6} {'offset':>7} {'drift':>6} {'noise':>7} {'a_true':>7} {'a_bias':>8} {'a_sd':>7} "
            f"{'log10N* bias':>12} {'refused':>8} {'asym':>6}",
        ]
        for r in self.rows:
            lines.append(
                f"{r['width_decades']:6.2f} {r['offset_decades']:7.2f} {r['drift']:6.2f} {r['noise']:7.4f} "
                f"{r['a_true']:7.4f} "
                f"{r['a_bias']:+8.4f} {r['a_sd']:7.4f} {r['log10_n_bias']:+12.4f} "
                f"{r['refused_fraction']:8.1%} {r['asymmetry']:+6.2f}"
            )
        return "\n".join(lines)


def _isoflop_loss(law, p, c: float, n: np.ndarray, flops_per_token) -> np.ndarray:
    fpt = 6.0 * n if flops_per_token is None else np.asarray(flops_per_token(n), np.float64)
    return evaluate(law, p, N=n, D=c / fpt)


def parabola_bias(
    model: Any,
    budgets: Any,
    *,
    params: Mapping[str, float] | None = None,
    widths: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    offsets: Sequence[float] = (-0.25, 0.0, 0.25),
    drifts: Sequence[float] = (0.0,),
    n_points: int = 9,
    noise: float = 0.0,
    n_sim: int = 200,
    seed: int = 0,
    flops_per_token: FlopsPerToken | None = None,
) -> ParabolaBias:
    """Simulate isoFLOP grids from a fitted law, refit them with Approach 2's parabola, report the bias.

    For every budget C the grid has `n_points` sizes log-uniform over `width` decades, centred `offset`
    decades from the law's true N*(C) plus `drift` decades per decade of C (relative to the middle budget:
    grids centred on a guessed exponent a_guess have drift = a_guess - a_true, which biases the fitted
    exponent); losses are the law's predictions plus Gaussian noise of std `noise`
    (n_sim draws; one noiseless draw when noise = 0). Budgets whose fitted minimum leaves the grid are refused
    (counted in refused_fraction); simulations with any refused budget are excluded from the exponent bias.
    """
    law, p = resolve_law(model, params)
    check_inputs(law)
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    if budgets.size < 2:
        raise ValueError("parabola_bias needs at least 2 budgets to measure the exponent bias")
    if n_points < 3:
        raise ValueError("n_points must be >= 3 for a parabola")
    truth = compute_optimal((law, p), budgets, flops_per_token=flops_per_token)
    log_true = np.log(truth.N)
    a_true = fit_power_law(budgets, truth.N).exponent
    sims = n_sim if noise > 0 else 1
    rng = np.random.default_rng(seed)
    lc = np.log(budgets)
    rows = []
    rel_lc = np.log10(budgets) - np.log10(budgets).mean()
    for width, offset, drift in ((w, o, dr) for w in widths for o in offsets for dr in drifts):
        logn_s = np.empty((sims, budgets.size))
        ok_s = np.empty((sims, budgets.size), bool)
        asym = []
        for j, c in enumerate(budgets):
            t = np.linspace(-width / 2, width / 2, n_points) + offset + drift * rel_lc[j]
            logn = log_true[j] + np.log(10.0) * t
            clean = _isoflop_loss(law, p, c, np.exp(logn), flops_per_token)
            edges = np.exp(log_true[j] + np.log(10.0) * np.array([-width / 2, width / 2]))  # centred grid
            ends = _isoflop_loss(law, p, c, edges, flops_per_token)
            denom = ends[0] + ends[1] - 2 * truth.loss[j]
            asym.append((ends[1] - ends[0]) / denom if denom > 0 else np.nan)
            y = clean[:, None] + noise * rng.standard_normal((n_points, sims))
            ls, _, ok = _parabola_min(logn, y)
            logn_s[:, j], ok_s[:, j] = ls, ok
        good = ok_s.all(axis=1)
        if good.any():
            a_fit = _batched_slopes(lc, logn_s[good], None)
            a_mean, a_sd = float(a_fit.mean()), float(a_fit.std())
        else:
            a_mean = a_sd = float("nan")
        with np.errstate(invalid="ignore"):
            nb = float(np.mean((logn_s - log_true)[ok_s]) / np.log(10.0)) if ok_s.any() else float("nan")
        rows.append(
            {
                "width_decades": float(width),
                "offset_decades": float(offset),
                "drift": float(drift),
                "n_points": n_points,
                "noise": float(noise),
                "a_true": float(a_true),
                "a_mean": a_mean,
                "a_bias": a_mean - float(a_true),
                "a_sd": a_sd,
                "log10_n_bias": nb,
                "refused_fraction": float(1.0 - ok_s.mean()),
                "asymmetry": float(np.nanmean(asym)),
                "n_used": int(good.sum()),
            }
        )
    return ParabolaBias(rows=rows, law=str(getattr(law, "name", law)), budgets=budgets, n_sim=sims)
