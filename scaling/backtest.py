"""Which law form extrapolates? Rolling-origin backtests of competing forms on the same runs.

A form with more parameters always fits the runs it saw better, so in-sample fit quality cannot choose
between Chinchilla's additive form, Kaplan's, Farseer's and so on.  What a scaling researcher needs is the
error of each form when it predicts a budget it has not seen -- the question every extrapolation asks.
:func:`backtest` answers it the way forecasters do (a rolling-origin evaluation; Choshen et al. 2024, "A
Hitchhiker's Guide to Scaling Law Estimation", arXiv:2410.11840, §4, score forms by fitting on the smaller
budgets and predicting the larger ones): order the distinct values of a key (the compute budget, by default),
fit every form on the points of the first k values and score the points of value k + 1, for each k from
``min_train`` on.  A form is ranked by its mean absolute relative error over the folds every form could be
fitted on, each fold weighted equally (so one crowded budget does not decide the ranking).

A form is skipped in a fold (and says why) when the fold has no more points than the form has parameters,
or when its fit raises.  The ranking uses the folds on which every form scored at least once was scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scaling.fit import FitResult, fit
from scaling.laws import Law, get_law


@dataclass(frozen=True)
class Fold:
    """One extrapolation step: fit on the points keyed ``train_keys``, predict those at ``test_key``."""

    train_keys: tuple[float, ...]
    test_key: float
    n_train: int
    y: np.ndarray  # the test points' targets
    prediction: np.ndarray | None  # None when the form was skipped in this fold
    skipped: str | None = None
    converged: bool | None = None  # the fold's fit met its tolerance (False: scored, but read with care)
    fit: FitResult | None = None  # the fold's fit (None when skipped)

    @property
    def relative_error(self) -> np.ndarray | None:
        """Signed (prediction - actual) / actual per test point: > 0 means the form was pessimistic."""
        return None if self.prediction is None else (self.prediction - self.y) / np.abs(self.y)

    @property
    def mean_are(self) -> float | None:
        """Mean absolute relative error over the fold's test points."""
        r = self.relative_error
        return None if r is None else float(np.mean(np.abs(r)))

    @property
    def mean_bias(self) -> float | None:
        """Mean signed relative error: the direction in which the form misses."""
        r = self.relative_error
        return None if r is None else float(np.mean(r))


@dataclass
class FormBacktest:
    """One form's folds plus its fit on every point (for the in-sample residual RMS beside the backtest)."""

    law: Law
    folds: list[Fold]
    full_fit: FitResult | None
    full_fit_error: str | None = None
    all_keys: tuple[float, ...] = ()  # the keys of every point: what the full fit was fitted on

    @property
    def n_params(self) -> int:
        return len(self.law.params)

    @property
    def in_sample_rms(self) -> float | None:
        """RMS of the full fit's residuals in its fit space (log-loss by default): how well the form fits."""
        if self.full_fit is None:
            return None
        return float(np.sqrt(np.mean(self.full_fit.residuals**2)))

    def fit_on(self, train_keys: Sequence[float]) -> FitResult | None:
        """This form's fit on exactly the points keyed ``train_keys`` (a fold's training set, or every point
        for the full fit), so a caller needing that fit does not fit it again; None if there is none."""
        keys = tuple(sorted(train_keys))
        if self.full_fit is not None and keys == self.all_keys:
            return self.full_fit
        return next((f.fit for f in self.folds if f.train_keys == keys and f.fit is not None), None)

    def scored(self, keys: Sequence[float] | None = None) -> list[Fold]:
        return [f for f in self.folds if f.prediction is not None and (keys is None or f.test_key in keys)]

    def mean_are(self, keys: Sequence[float] | None = None) -> float | None:
        """Mean over scored folds (optionally only those testing ``keys``) of each fold's mean ARE."""
        s = self.scored(keys)
        return float(np.mean([f.mean_are for f in s])) if s else None

    def mean_bias(self, keys: Sequence[float] | None = None) -> float | None:
        s = self.scored(keys)
        return float(np.mean([f.mean_bias for f in s])) if s else None


@dataclass
class BacktestResult:
    """Per-form folds; ``ranking`` orders the forms by mean ARE on the folds all of them were scored on."""

    key_name: str
    keys: tuple[float, ...]  # the distinct key values, ascending
    forms: dict[str, FormBacktest] = field(default_factory=dict)

    @property
    def ranked_forms(self) -> list[str]:
        """Forms scored on at least one fold; a form never scored (too few points everywhere) is listed in
        the table but left out of the ranking, so it cannot empty the common ground of the others."""
        return [n for n, fb in self.forms.items() if fb.scored()]

    @property
    def common_keys(self) -> tuple[float, ...]:
        """Test keys at which every ranked form was scored (the fair ground for a ranking)."""
        ranked = [self.forms[n] for n in self.ranked_forms]
        return tuple(
            k for k in self.keys if ranked and all(any(f.test_key == k for f in fb.scored()) for fb in ranked)
        )

    @property
    def ranking(self) -> list[str]:
        """Ranked forms, best first, by mean ARE over :attr:`common_keys` (empty when there are none)."""
        common = self.common_keys
        if not common:
            return []
        return sorted(self.ranked_forms, key=lambda n: self.forms[n].mean_are(common))

    @property
    def best(self) -> str | None:
        r = self.ranking
        return r[0] if r else None

    def to_dict(self) -> dict:
        common, ranking = self.common_keys, self.ranking
        out = {"key": self.key_name, "keys": list(self.keys), "common_test_keys": list(common),
               "ranking": ranking, "forms": {}}
        for name, fb in self.forms.items():
            out["forms"][name] = {
                "n_params": fb.n_params,
                "citation": fb.law.citation,
                "in_sample_rms": fb.in_sample_rms,
                "full_fit_error": fb.full_fit_error,
                "full_fit_converged": None if fb.full_fit is None else bool(fb.full_fit.converged),
                "mean_are_common": fb.mean_are(common) if name in ranking else None,
                "mean_bias_common": fb.mean_bias(common) if name in ranking else None,
                "mean_are_all_scored": fb.mean_are(),
                "folds": [
                    {
                        "test_key": f.test_key,
                        "train_keys": list(f.train_keys),
                        "n_train": f.n_train,
                        "n_test": int(len(f.y)),
                        "mean_are": f.mean_are,
                        "mean_bias": f.mean_bias,
                        "skipped": f.skipped,
                        "converged": f.converged,
                    }
                    for f in fb.folds
                ],
            }
        return out

    def summary(self) -> str:
        common = self.common_keys
        lines = [f"rolling-origin backtest by {self.key_name}: fit on the smaller values, predict the next"]
        head = f"{'form':>18s} {'params':>6s} {'in-sample RMS':>13s} " + " ".join(
            f"{'->' + format(f.test_key, '.3g'):>11s}" for f in next(iter(self.forms.values())).folds
        ) + f" {'mean ARE':>9s}"
        lines.append(head)
        for name in self.ranking + [n for n in self.forms if n not in self.ranking]:
            fb = self.forms[name]
            cells = " ".join(f"{_cell(f):>11s}" for f in fb.folds)
            rms = "n/a" if fb.in_sample_rms is None else f"{fb.in_sample_rms:.4f}"
            m = fb.mean_are(common) if common else None
            mean = "n/a" if m is None or name not in self.ranking else format(m, ".2%")
            lines.append(f"{name:>18s} {fb.n_params:>6d} {rms:>13s} {cells} {mean:>9s}")
        if any(f.converged is False for fb in self.forms.values() for f in fb.folds):
            lines.append("! = that fold's fit did not converge (FitResult.converged): read it with care")
        if self.ranking:
            lines.append(f"best: {self.best} (mean over {len(common)} fold(s) scored for every ranked form)")
        else:
            lines.append("no fold was scored for every form: no ranking")
        return "\n".join(lines)


def _cell(f: Fold) -> str:
    if f.mean_are is None:
        return "skipped"
    return format(f.mean_are, ".2%") + ("" if f.converged else "!")


def fit_until_converged(law, data: Mapping, *, retry_max_iter: int = 8000, **fit_kw) -> FitResult:
    """:func:`scaling.fit.fit`, refitted with ``retry_max_iter`` iterations when the best start did not
    converge; the lower objective wins. Why: laws without linear structure (Farseer's nine parameters) often
    stop at the default 400 L-BFGS iterations, and on cpu-tiny's runs those early-stopped fits extrapolated
    *better* (Farseer 2.6% / 1.2% per fold) than the converged optimum (3.8% / 5.7%): a backtest of
    unconverged fits scores the optimiser's early stopping, not the law form."""
    res = fit(law, data, **fit_kw)
    if res.converged or retry_max_iter <= res.options.max_iter:
        return res
    again = fit(law, data, **{**fit_kw, "max_iter": retry_max_iter})
    return again if again.objective <= res.objective else res


def _subset(data: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in data.items()}


def backtest(
    laws: Sequence[str | Law] = ("chinchilla", "kaplan"),
    data: Mapping | None = None,
    *,
    by: str | Sequence[float] | np.ndarray = "C",
    min_train: int = 2,
    target: str = "loss",
    key_name: str | None = None,
    retry_max_iter: int = 8000,
    **fit_kw,
) -> BacktestResult:
    """Rolling-origin backtest of each law in ``laws`` on ``data`` (a dict of 1-D arrays).

    ``by``: the field whose distinct values order the folds (e.g. "C", "N"), or an array of fold keys, one per
    point (e.g. each run's nominal compute budget, when exact FLOPs differ slightly within a budget), then
    named ``key_name`` in the result.
    ``min_train``: distinct key values in the first fold's training set.  ``fit_kw`` go to
    :func:`scaling.fit.fit` (defaults: Huber delta 1e-3 on log residuals, as in Hoffmann et al. 2022); a fit
    that does not converge is redone with ``retry_max_iter`` iterations (:func:`fit_until_converged`), and a
    fold whose fit still did not converge is marked (``Fold.converged``).
    Returns a :class:`BacktestResult`; ``.summary()`` prints the table, ``.ranking`` the forms best first.
    """
    if data is None:
        raise ValueError("backtest needs data= (a dict of 1-D arrays with each law's inputs and the target)")
    arrays = {k: np.asarray(v, np.float64) for k, v in data.items()}
    if target not in arrays:
        raise ValueError(f"data has no target field {target!r} (fields: {sorted(arrays)})")
    n = len(arrays[target])
    if isinstance(by, str):
        if by not in arrays:
            raise ValueError(f"by={by!r} is not a field of data (fields: {sorted(arrays)})")
        key, key_name = arrays[by], by
    else:
        key, key_name = np.asarray(by, np.float64), key_name or "key"
        if key.shape != (n,):
            raise ValueError(f"by= array has shape {key.shape}, expected ({n},): one fold key per point")
    if not np.all(np.isfinite(key)):
        bad = np.flatnonzero(~np.isfinite(key))[:10].tolist()
        raise ValueError(f"the fold key {key_name!r} has non-finite values at rows {bad}")
    keys = tuple(float(k) for k in np.unique(key))
    if min_train < 1:
        raise ValueError(f"min_train must be >= 1, got {min_train}")
    if len(keys) < min_train + 1:
        raise ValueError(
            f"{len(keys)} distinct values of {key_name!r} leave no fold to test with min_train={min_train} "
            f"(need at least {min_train + 1})"
        )
    if not laws:
        raise ValueError("give at least one law to backtest")
    fit_kw = {"warn": False, **fit_kw}
    weights = fit_kw.pop("weights", None)
    if weights is not None:  # per-point weights follow their points into each fold's training set
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n,):
            raise ValueError(f"weights has shape {weights.shape}, expected ({n},): one per point of data")
    result = BacktestResult(key_name=key_name, keys=keys)
    for spec in laws:
        law = get_law(spec)
        if law.name in result.forms:
            raise ValueError(f"law {law.name!r} is listed twice")
        missing = [k for k in law.inputs if k not in arrays]
        if missing:
            raise ValueError(f"law {law.name!r} needs fields {list(law.inputs)}; data lacks {missing}")
        folds = []
        for i in range(min_train, len(keys)):
            train = key < keys[i]
            test = key == keys[i]
            y = arrays[target][test]
            common = dict(train_keys=keys[:i], test_key=keys[i], n_train=int(train.sum()), y=y)
            if train.sum() <= len(law.params):
                folds.append(Fold(**common, prediction=None, skipped=(
                    f"{int(train.sum())} training points for {len(law.params)} parameters")))
                continue
            try:
                res = fit_until_converged(law, _subset(arrays, train), target=target,
                                          retry_max_iter=retry_max_iter, **fit_kw,
                                          weights=None if weights is None else weights[train])
                pred = np.asarray(res.predict(**{k: arrays[k][test] for k in law.inputs}), np.float64)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
                folds.append(Fold(**common, prediction=None, skipped=f"fit failed: {e}"))
                continue
            if not np.all(np.isfinite(pred)):
                folds.append(Fold(**common, prediction=None, skipped="non-finite prediction"))
                continue
            folds.append(Fold(**common, prediction=pred, converged=bool(res.converged), fit=res))
        full, err = None, None
        if n > len(law.params):
            try:
                full = fit_until_converged(law, arrays, target=target, retry_max_iter=retry_max_iter,
                                           weights=weights, **fit_kw)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
                err = str(e)
        else:
            err = f"{n} points for {len(law.params)} parameters"
        result.forms[law.name] = FormBacktest(law=law, folds=folds, full_fit=full, full_fit_error=err,
                                              all_keys=keys)
    return result
