"""Small adapters shared by isoflop.py and optimal.py: resolve "a fitted law" and evaluate it in float64.

A fitted law reaches these modules in any of three shapes: a `FitResult` (has `.law` and `.params`), a
`(law, params)` pair, or a law plus `params=` keyword. Laws follow the scaling/laws.py contract: `.name`,
`.inputs` (variable names), `.predict(params, **inputs)` (pure jax.numpy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Names under which a law may take the number of *unique* training tokens (data-constrained laws).
UNIQUE_TOKEN_INPUTS = ("U", "U_D", "unique_tokens", "D_unique")


def resolve_law(model: Any, params: Mapping[str, float] | None = None) -> tuple[Any, dict[str, float]]:
    """Return (law, params dict) from a FitResult, a (law, params) pair, or a law/registry name + params."""
    if params is None:
        if hasattr(model, "law") and hasattr(model, "params"):
            model, params = model.law, model.params
        elif isinstance(model, tuple) and len(model) == 2:
            model, params = model
        else:
            raise TypeError(
                "expected a FitResult (with .law and .params), a (law, params) pair, "
                f"or a law with params=...; got {type(model).__name__} and no params"
            )
    if isinstance(model, str):
        from scaling.laws import get_law  # lazy: laws.py is owned by another module and may grow imports

        model = get_law(model)
    if not hasattr(model, "predict") or not hasattr(model, "inputs"):
        raise TypeError(f"{model!r} does not look like a scaling law (needs .predict and .inputs)")
    return model, {k: float(v) for k, v in dict(params).items()}


def check_inputs(law: Any, required: tuple[str, ...] = ("N", "D")) -> None:
    missing = [name for name in required if name not in tuple(law.inputs)]
    if missing:
        raise ValueError(
            f"law {getattr(law, 'name', law)!r} has inputs {tuple(law.inputs)}; "
            f"compute-optimal allocation needs {missing}"
        )


@functools.lru_cache(maxsize=64)
def _jitted_predict(law: Any) -> Callable:
    return jax.jit(lambda p, x: law.predict(p, **x))


def evaluate(law: Any, params: Mapping[str, float], **inputs: Any) -> np.ndarray:
    """law.predict in float64 (scoped x64, the user's global jax setting is untouched) as a numpy array.

    Jitted per law (the numeric optimisers call it ~100 times with the same shapes); laws that are not
    hashable fall back to eager evaluation.
    """
    with jax.enable_x64(True):
        arrays = {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in inputs.items()}
        p = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in dict(params).items()}
        try:
            fn = _jitted_predict(law)
        except TypeError:  # unhashable law object
            return np.asarray(law.predict(p, **arrays), dtype=np.float64)
        return np.asarray(fn(p, arrays), dtype=np.float64)


def as_param_samples(samples: Any) -> list[dict[str, float]]:
    """Bootstrap parameter draws as a list of dicts, from a list of dicts, a dict of equal-length arrays, or
    a `scaling.bootstrap.Bootstrap` (its `.values`); draws with non-finite values are dropped."""
    if samples is None:
        return []
    if not isinstance(samples, Mapping) and isinstance(getattr(samples, "values", None), Mapping):
        samples = samples.values  # scaling.bootstrap.Bootstrap / Samples: dict of (B,) parameter arrays
    if isinstance(samples, Mapping):
        arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in samples.items()}
        lengths = {v.size for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"parameter samples have different lengths: { {k: v.size for k, v in arrays.items()} }"
            )
        n = lengths.pop()
        # Replicates that did not converge are NaN in scaling.bootstrap: leave them out of the intervals.
        ok = np.all([np.isfinite(v) for v in arrays.values()], axis=0)
        return [{k: float(v[i]) for k, v in arrays.items()} for i in range(n) if ok[i]]
    return [{k: float(v) for k, v in dict(s).items()} for s in samples]


@functools.lru_cache(maxsize=64)
def _jitted_bisection(law: Any, n_iter: int) -> Callable:
    def solve(p, x, target, lo, hi):
        def body(_, state):
            lo_, hi_ = state
            mid = 0.5 * (lo_ + hi_)
            above = law.predict(p, **x, D=jnp.exp(mid)) > target
            return jnp.where(above, mid, lo_), jnp.where(above, hi_, mid)

        lo, hi = jax.lax.fori_loop(0, n_iter, body, (lo, hi))
        return hi

    return jax.jit(solve)


def solve_log_d(
    law: Any,
    params: Mapping[str, float],
    target: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    n_iter: int = 100,
    **inputs: Any,
) -> np.ndarray:
    """log D in [lo, hi] with law(N, D, ...) = target, by bisection (the law must decrease in D).

    One jitted loop for all elements (float64); returns hi-side bracket ends, i.e. L(log D) <= target.
    """
    with jax.enable_x64(True):
        x = {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in inputs.items()}
        p = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in dict(params).items()}
        t, a, b = (jnp.asarray(np.asarray(v, dtype=np.float64)) for v in (target, lo, hi))
        try:
            fn = _jitted_bisection(law, n_iter)
        except TypeError:  # unhashable law: same loop, eagerly
            for _ in range(n_iter):
                mid = 0.5 * (a + b)
                above = law.predict(p, **x, D=jnp.exp(mid)) > t
                a, b = jnp.where(above, mid, a), jnp.where(above, b, mid)
            return np.asarray(b, dtype=np.float64)
        return np.asarray(fn(p, x, t, a, b), dtype=np.float64)
