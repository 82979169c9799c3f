"""Scaling-law forms as small, registrable objects.

A :class:`Law` bundles a pure ``jax.numpy`` prediction function with everything a fitter needs:

* ``params`` — natural parameter names (what papers report, e.g. ``E, A, B, alpha, beta``);
* ``transforms`` — how each parameter is mapped to an unconstrained optimisation variable ("log" for
  positive scales, "identity" for exponents).  Chinchilla's ``log`` transform on ``E, A, B`` together with
  ``log_predict`` gives exactly the LSE parametrisation of Hoffmann et al. (2022);
* ``linear`` + ``basis`` — the *variable-projection* structure: for fixed nonlinear parameters
  (exponents, break points) the prediction is ``basis(p, x) @ [p[k] for k in linear]``, so the linear
  coefficients can be solved exactly (Golub & Pereyra 1973) and only the exponents are searched;
* ``init_grid`` — default start values *in the unconstrained (transformed) space*, per parameter;
  the fitter uses the grid over ``nonlinear`` params for variable projection and over all params otherwise.

Add your own law in a few lines::

    def my_fn(p, x):
        return p["E"] + p["A"] * x["N"] ** -p["alpha"]
    register_law(Law(name="mine", inputs=("N",), params=("E", "A", "alpha"), fn=my_fn,
                     transforms={"E": "log", "A": "log"}, init_grid={"alpha": (0.1, 0.5, 1.0)}))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

Params = Mapping[str, object]
Inputs = Mapping[str, object]

_TRANSFORMS = ("identity", "log")


@dataclass(frozen=True, eq=False)  # eq=False: hash by identity so laws can key jit caches
class Law:
    """A parametric scaling law ``target = fn(params, inputs)``.

    Attributes:
      name: registry name.
      inputs: input variable names, e.g. ``("N", "D")``.
      params: natural parameter names, in a fixed order.
      fn: ``fn(p, x) -> array`` with ``p``/``x`` dicts of (jnp) arrays; pure jax.numpy.
      transforms: per-param map to unconstrained space, "log" (param > 0) or "identity" (default).
      linear: params entering the prediction linearly (solved exactly under variable projection).
      basis: ``basis(p, x) -> (n, len(linear))`` design matrix given the *nonlinear* params.
      from_linear: optional ``(p_nonlinear, coef_K) -> dict`` for laws whose linear coefficients are a
        reparametrisation (e.g. ParScale's ``A**alpha``); default: coefficients are the params themselves.
      to_linear: inverse of ``from_linear`` (natural params -> coefficient vector).
      linear_natural: the natural params that ``from_linear`` produces (default: ``linear``).
      linear_lower: lower bound of each linear coefficient (0 or -inf); upper bounds are not supported.
      log_predict: optional numerically stable ``log(fn)`` (Chinchilla's LSE form).
      bounds: natural-scale (lo, hi) per param, used to warn when an estimate sits on its bound.
      init_grid: start values in the transformed space, per param.
      signed_inputs: inputs that may be zero or negative (an annealing area), unlike scaling variables
        (N, D, C), which the fitter requires > 0.
      target: name of the fitted quantity in the data dict ("loss" by default).
      space: default residual space: "log" (residuals of log target, Hoffmann et al.) or "linear".
      citation: paper(s) the form comes from.
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    fn: Callable[[Params, Inputs], jnp.ndarray]
    transforms: Mapping[str, str] = field(default_factory=dict)
    linear: tuple[str, ...] = ()
    basis: Callable[[Params, Inputs], jnp.ndarray] | None = None
    from_linear: Callable[[Params, jnp.ndarray], dict] | None = None
    to_linear: Callable[[Params], np.ndarray] | None = None
    linear_lower: tuple[float, ...] | None = None
    linear_natural: tuple[str, ...] | None = None
    log_predict: Callable[[Params, Inputs], jnp.ndarray] | None = None
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    init_grid: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    signed_inputs: tuple[str, ...] = ()
    target: str = "loss"
    space: str = "log"
    citation: str = ""
    doc: str = ""
    # (factory name, options) for a law built by a registered factory: get_law(factory, **options) rebuilds
    # it, so a saved fit of a variant (e.g. data_constrained with U_N as an input) reloads as that variant.
    variant: tuple[str, Mapping[str, Any]] | None = None

    def __post_init__(self):
        unknown = set(self.transforms) - set(self.params)
        if unknown:
            raise ValueError(f"law {self.name!r}: transforms for unknown params {sorted(unknown)}")
        bad = {k: v for k, v in self.transforms.items() if v not in _TRANSFORMS}
        if bad:
            raise ValueError(f"law {self.name!r}: unknown transforms {bad}; use one of {_TRANSFORMS}")
        if set(self.linear) - set(self.params) and self.from_linear is None:
            raise ValueError(
                f"law {self.name!r}: linear names {self.linear} must be params or give from_linear"
            )
        if self.linear and self.basis is None:
            raise ValueError(f"law {self.name!r}: linear params need a basis function")
        if set(self.signed_inputs) - set(self.inputs):
            raise ValueError(f"law {self.name!r}: signed_inputs {self.signed_inputs} must be inputs")
        if self.space not in ("log", "linear"):
            raise ValueError(f"law {self.name!r}: space must be 'log' or 'linear', got {self.space!r}")

    # --- prediction -------------------------------------------------------------------------------
    def predict(self, params: Params, **inputs) -> jnp.ndarray:
        """Prediction at ``inputs`` (keyword arrays named as ``self.inputs``) for natural ``params``."""
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise ValueError(f"law {self.name!r} needs inputs {self.inputs}; missing {missing}")
        p = {k: jnp.asarray(params[k]) for k in self.params}
        x = {k: jnp.asarray(inputs[k]) for k in self.inputs}
        return self.fn(p, x)

    def log_prediction(self, p: Params, x: Inputs) -> jnp.ndarray:
        """log of the prediction, using the stable ``log_predict`` when the law has one."""
        if self.log_predict is not None:
            return self.log_predict(p, x)
        return jnp.log(self.fn(p, x))

    @property
    def positive_inputs(self) -> tuple[str, ...]:
        """The inputs a fit needs > 0: the scaling variables, every input but ``signed_inputs``."""
        return tuple(k for k in self.inputs if k not in self.signed_inputs)

    # --- parametrisation --------------------------------------------------------------------------
    @property
    def nonlinear(self) -> tuple[str, ...]:
        """Params optimised iteratively under variable projection (everything not solved linearly)."""
        if self.from_linear is None:
            return tuple(k for k in self.params if k not in self.linear)
        return tuple(k for k in self.params if k not in self.linear_params_natural)

    @property
    def linear_params_natural(self) -> tuple[str, ...]:
        # Natural params determined by the linear coefficients (for reparametrised laws they differ).
        return self.linear if self.linear_natural is None else self.linear_natural

    @property
    def supports_varpro(self) -> bool:
        return bool(self.linear) and self.basis is not None

    def transform_of(self, name: str) -> str:
        return self.transforms.get(name, "identity")

    def to_unconstrained(self, params: Params, names: tuple[str, ...] | None = None) -> np.ndarray:
        """Natural params -> unconstrained vector (order ``names`` or ``self.params``)."""
        names = self.params if names is None else names
        out = []
        for k in names:
            v = float(params[k])
            if self.transform_of(k) == "log":
                if v <= 0:
                    raise ValueError(f"law {self.name!r}: param {k}={v} must be > 0 (log transform)")
                v = math.log(v)
            out.append(v)
        return np.asarray(out, dtype=np.float64)

    def from_unconstrained(self, theta, names: tuple[str, ...] | None = None) -> dict:
        """Unconstrained vector -> dict of natural params (jnp, differentiable)."""
        names = self.params if names is None else names
        return {
            k: (jnp.exp(theta[i]) if self.transform_of(k) == "log" else theta[i]) for i, k in enumerate(names)
        }

    def linear_lower_bounds(self) -> np.ndarray:
        if self.linear_lower is not None:
            return np.asarray(self.linear_lower, dtype=np.float64)
        return np.asarray([self.bounds.get(k, (-np.inf, np.inf))[0] for k in self.linear], dtype=np.float64)

    def combine(self, p_nonlinear: Params, coef) -> dict:
        """Merge nonlinear params with linear coefficients into natural params."""
        if self.from_linear is not None:
            return {**p_nonlinear, **self.from_linear(p_nonlinear, coef)}
        return {**p_nonlinear, **{k: coef[..., i] for i, k in enumerate(self.linear)}}

    def start_grid(self, names: tuple[str, ...]) -> np.ndarray:
        """Cartesian product of ``init_grid`` over ``names`` (transformed space) -> (S, len(names))."""
        axes = []
        for k in names:
            if k not in self.init_grid:
                raise ValueError(
                    f"law {self.name!r} has no init_grid for param {k!r}; pass starts explicitly"
                )
            axes.append(np.asarray(self.init_grid[k], dtype=np.float64))
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=-1)

    def __repr__(self) -> str:
        return f"Law({self.name!r}, inputs={self.inputs}, params={self.params})"


# --- registry -------------------------------------------------------------------------------------
LAWS: dict[str, Law] = {}
_FACTORIES: dict[str, Callable[..., Law]] = {}


def register_law(law: Law, *, overwrite: bool = False, factory: Callable[..., Law] | None = None) -> Law:
    """Add ``law`` to the registry; ``factory(**options)`` builds variants for ``get_law(name, **kw)``."""
    if law.name in LAWS and not overwrite:
        raise ValueError(f"law {law.name!r} is already registered (pass overwrite=True to replace it)")
    LAWS[law.name] = law
    if factory is not None:
        _FACTORIES[law.name] = factory
    return law


def get_law(name: str | Law, **options) -> Law:
    """Look up a law by name; ``options`` (e.g. ``var="C"`` for power_law) build a variant."""
    if isinstance(name, Law):
        if options:
            raise ValueError("options can only be given with a law name")
        return name
    if name not in LAWS:
        raise KeyError(f"unknown law {name!r}; registered: {sorted(LAWS)}")
    if options:
        if name not in _FACTORIES:
            raise ValueError(f"law {name!r} takes no options (got {sorted(options)})")
        return _FACTORIES[name](**options)
    return LAWS[name]


def _logsumexp(*terms):
    return (
        jnp.logaddexp(terms[0], terms[1])
        if len(terms) == 2
        else jnp.logaddexp(terms[0], _logsumexp(*terms[1:]))
    )


# --- Chinchilla -----------------------------------------------------------------------------------
_POS = (0.0, np.inf)
_EXP = (0.0, 10.0)


def _chin_fn(p, x):
    return p["E"] + p["A"] * x["N"] ** -p["alpha"] + p["B"] * x["D"] ** -p["beta"]


def _chin_log(p, x):
    # Hoffmann et al. 2022 Eq. (D.2): log L = LSE(a - alpha log N, b - beta log D, e), a = log A, ...
    return _logsumexp(
        jnp.log(p["A"]) - p["alpha"] * jnp.log(x["N"]),
        jnp.log(p["B"]) - p["beta"] * jnp.log(x["D"]),
        jnp.log(p["E"]),
    )


def _chin_basis(p, x):
    n = jnp.asarray(x["N"])
    return jnp.stack([jnp.ones_like(n), n ** -p["alpha"], jnp.asarray(x["D"]) ** -p["beta"]], axis=-1)


CHINCHILLA = register_law(
    Law(
        name="chinchilla",
        inputs=("N", "D"),
        params=("E", "A", "B", "alpha", "beta"),
        fn=_chin_fn,
        transforms={"E": "log", "A": "log", "B": "log"},
        linear=("E", "A", "B"),
        basis=_chin_basis,
        log_predict=_chin_log,
        bounds={"E": _POS, "A": _POS, "B": _POS, "alpha": _EXP, "beta": _EXP},
        # Hoffmann et al.'s grid (as used by Besiroglu et al. 2024): 5*5*5*6*6 = 4,500 starts (log space).
        init_grid={
            "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
            "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
            "E": (-1.0, -0.5, 0.0, 0.5, 1.0),
            "A": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            "B": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        },
        citation="Hoffmann et al. 2022, arXiv:2203.15556 (Approach 3); refit by Besiroglu et al. 2024, "
        "arXiv:2404.10102",
        doc="L(N, D) = E + A/N^alpha + B/D^beta. E: irreducible loss; A, alpha: model-size term; "
        "B, beta: data term. N = parameters, D = training tokens.",
    )
)


# --- Kaplan ---------------------------------------------------------------------------------------
def _kaplan_fn(p, x):
    return ((p["N_c"] / x["N"]) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / x["D"]) ** p["alpha_D"]


def _kaplan_log(p, x):
    r = p["alpha_N"] / p["alpha_D"]
    return p["alpha_D"] * jnp.logaddexp(
        r * (jnp.log(p["N_c"]) - jnp.log(x["N"])), jnp.log(p["D_c"]) - jnp.log(x["D"])
    )


KAPLAN = register_law(
    Law(
        name="kaplan",
        inputs=("N", "D"),
        params=("N_c", "D_c", "alpha_N", "alpha_D"),
        fn=_kaplan_fn,
        log_predict=_kaplan_log,
        transforms={"N_c": "log", "D_c": "log"},
        bounds={"N_c": _POS, "D_c": _POS, "alpha_N": _EXP, "alpha_D": _EXP},
        init_grid={
            "N_c": tuple(np.log([1e10, 1e13, 1e16])),
            "D_c": tuple(np.log([1e10, 1e13, 1e16])),
            "alpha_N": (0.03, 0.1, 0.3),
            "alpha_D": (0.03, 0.1, 0.3),
        },
        citation="Kaplan et al. 2020, arXiv:2001.08361, Eq. (1.5)",
        doc="L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (no irreducible term). Published: "
        "alpha_N = 0.076, alpha_D = 0.095, N_c = 8.8e13 (non-embedding params), D_c = 5.4e13 tokens.",
    )
)


# --- single-variable power law with offset ------------------------------------------------------
def power_law(var: str = "X") -> Law:
    """``L = E + A * X^-alpha`` in one variable ``var`` (N, D or C); E: asymptote, alpha: exponent."""

    def fn(p, x):
        return p["E"] + p["A"] * x[var] ** -p["alpha"]

    def log_fn(p, x):
        return jnp.logaddexp(jnp.log(p["E"]), jnp.log(p["A"]) - p["alpha"] * jnp.log(x[var]))

    def basis(p, x):
        v = jnp.asarray(x[var])
        return jnp.stack([jnp.ones_like(v), v ** -p["alpha"]], axis=-1)

    return Law(
        name="power_law" if var == "X" else f"power_law_{var}",
        inputs=(var,),
        params=("E", "A", "alpha"),
        fn=fn,
        log_predict=log_fn,
        transforms={"E": "log", "A": "log"},
        linear=("E", "A"),
        basis=basis,
        bounds={"E": _POS, "A": _POS, "alpha": _EXP},
        init_grid={
            "alpha": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
            "E": (-1.0, 0.0, 1.0),
            "A": (0.0, 5.0, 10.0, 20.0),
        },
        citation="Kaplan et al. 2020 (arXiv:2001.08361); Hestness et al. 2017 (arXiv:1712.00409)",
        doc=f"L({var}) = E + A * {var}^-alpha. E: irreducible loss, A: scale, alpha: exponent.",
        variant=("power_law", {"var": var}),
    )


register_law(power_law("X"), factory=lambda var="X": power_law(var))
for _v in ("N", "D", "C"):
    register_law(power_law(_v))


# --- data-constrained (Muennighoff et al. 2023) ------------------------------------------------
def data_constrained(tokens_per_param: float | None = 20.0) -> Law:
    """Muennighoff et al. 2023 (arXiv:2305.16264, Eq. 5): Chinchilla form in *effective* data/params.

    ``D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D))`` with ``R_D = D/U_D - 1`` repeated epochs, and
    ``N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N))`` with ``R_N = N/U_N - 1`` excess parameters.
    ``R*_D`` (``R_star_D``) is the number of repetitions after which extra epochs are worth ~1/e as much as
    fresh data; ``R*_N`` likewise for parameters. ``U_N`` is the compute-optimal size for ``U_D`` unique
    tokens, ``min(N, U_D / tokens_per_param)`` here (the paper derives it from its Chinchilla fit); with
    ``tokens_per_param=None`` ``U_N`` is a data input. Inputs: N, D (total tokens), U_D (unique tokens).
    A run shorter than one pass sees only D unique tokens (the paper's U_D <= D), so U_D is taken as
    ``min(U_D, D)``, and a given U_N as ``min(U_N, N)``: with plenty of data and U_N <= N the law is
    Chinchilla's in (N, D), never a bonus from tokens the run did not read.
    """

    def un(x):
        if tokens_per_param is None:
            return jnp.minimum(jnp.asarray(x["U_N"]), jnp.asarray(x["N"]))
        return jnp.minimum(jnp.asarray(x["N"]), unique_tokens(x) / tokens_per_param)

    def unique_tokens(x):
        return jnp.minimum(jnp.asarray(x["U_D"]), jnp.asarray(x["D"]))

    def effective(p, x):
        ud = unique_tokens(x)
        rd = jnp.maximum(jnp.asarray(x["D"]) / ud - 1.0, 0.0)
        d_eff = ud + ud * p["R_star_D"] * -jnp.expm1(-rd / p["R_star_D"])
        u_n = un(x)
        rn = jnp.maximum(jnp.asarray(x["N"]) / u_n - 1.0, 0.0)
        n_eff = u_n + u_n * p["R_star_N"] * -jnp.expm1(-rn / p["R_star_N"])
        return n_eff, d_eff

    def fn(p, x):
        n_eff, d_eff = effective(p, x)
        return p["E"] + p["A"] * n_eff ** -p["alpha"] + p["B"] * d_eff ** -p["beta"]

    def basis(p, x):
        n_eff, d_eff = effective(p, x)
        return jnp.stack([jnp.ones_like(n_eff), n_eff ** -p["alpha"], d_eff ** -p["beta"]], axis=-1)

    inputs = ("N", "D", "U_D") if tokens_per_param is not None else ("N", "D", "U_D", "U_N")
    return Law(
        name="data_constrained",
        inputs=inputs,
        params=("E", "A", "B", "alpha", "beta", "R_star_N", "R_star_D"),
        fn=fn,
        transforms={"E": "log", "A": "log", "B": "log", "R_star_N": "log", "R_star_D": "log"},
        linear=("E", "A", "B"),
        basis=basis,
        bounds={
            "E": _POS,
            "A": _POS,
            "B": _POS,
            "alpha": _EXP,
            "beta": _EXP,
            "R_star_N": _POS,
            "R_star_D": _POS,
        },
        init_grid={
            "alpha": (0.2, 0.35, 0.5, 0.8),
            "beta": (0.2, 0.35, 0.5, 0.8),
            "R_star_N": tuple(np.log([1.0, 5.0, 25.0])),
            "R_star_D": tuple(np.log([1.0, 5.0, 15.0, 50.0])),
            "E": (0.0, 0.5),
            "A": (5.0, 10.0),
            "B": (5.0, 10.0),
        },
        citation="Muennighoff et al. 2023, 'Scaling Data-Constrained Language Models', arXiv:2305.16264",
        doc="L = E + A/N'^alpha + B/D'^beta with effective N', D' (repeated data decays with R*_D, excess "
        "parameters with R*_N). Published: R*_D = 15.4, R*_N = 5.3.",
        variant=("data_constrained", {"tokens_per_param": tokens_per_param}),
    )


register_law(data_constrained(), factory=data_constrained)


# --- Farseer (Li et al. 2025) -----------------------------------------------------------------------
def _farseer_parts(p, x):
    n = jnp.asarray(x["N"])
    # All N-dependences are exp(a N^c + b); N is used in units of 1e9 params for conditioning.
    n9 = n / 1e9
    d_exp = jnp.exp(p["a1"] * n9 ** p["c1"] + p["b1"])  # data exponent, depends on N
    return n9, d_exp


def _farseer_fn(p, x):
    n9, d_exp = _farseer_parts(p, x)
    return (
        jnp.exp(p["a3"] * n9 ** p["c3"] + p["b3"])
        + jnp.exp(p["a2"] * n9 ** p["c2"] + p["b2"]) * (jnp.asarray(x["D"]) / 1e9) ** -d_exp
    )


FARSEER = register_law(
    Law(
        name="farseer",
        inputs=("N", "D"),
        params=("a1", "b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"),
        fn=_farseer_fn,
        transforms={},
        init_grid={
            "a1": (-0.5, 0.5),
            "b1": (-1.0,),
            "c1": (0.1, 0.3),
            "a2": (-1.0, 1.0),
            "b2": (0.0, 1.0),
            "c2": (0.1, 0.3),
            "a3": (-0.5, 0.5),
            "b3": (0.5,),
            "c3": (0.1, 0.3),
        },
        citation="Li et al. 2025, 'Farseer: A Refined Scaling Law in Large Language Models', "
        "arXiv:2506.10972",
        doc="L(N, D) = exp(a3 N^c3 + b3) + exp(a2 N^c2 + b2) * D^-exp(a1 N^c1 + b1), N, D in units of 1e9. "
        "The first term is the N-dependent asymptote (D -> inf); the data exponent exp(a1 N^c1 + b1) varies "
        "with model size, unlike Chinchilla's fixed beta.",
    )
)


# --- ParScale --------------------------------------------------------------------------------------
def _parscale_fn(p, x):
    n_eff = jnp.asarray(x["N"]) * (p["k"] * jnp.log(jnp.asarray(x["P"])) + 1.0)
    return (p["A"] / n_eff) ** p["alpha"] + p["E"]


def _parscale_basis(p, x):
    n_eff = jnp.asarray(x["N"]) * (p["k"] * jnp.log(jnp.asarray(x["P"])) + 1.0)
    return jnp.stack([jnp.ones_like(n_eff), n_eff ** -p["alpha"]], axis=-1)


def _parscale_from_linear(p, coef):
    # coef[1] = A^alpha  ->  A = coef[1]^(1/alpha)
    return {"E": coef[..., 0], "A": coef[..., 1] ** (1.0 / p["alpha"])}


def _parscale_to_linear(p):
    return np.asarray([float(p["E"]), float(p["A"]) ** float(p["alpha"])])


PARSCALE = register_law(
    Law(
        name="parscale",
        inputs=("N", "P"),
        params=("E", "A", "k", "alpha"),
        fn=_parscale_fn,
        transforms={"E": "log", "A": "log", "k": "log"},
        linear=("E", "A_pow_alpha"),
        basis=_parscale_basis,
        from_linear=_parscale_from_linear,
        to_linear=_parscale_to_linear,
        linear_lower=(0.0, 0.0),
        linear_natural=("E", "A"),
        bounds={"E": _POS, "A": _POS, "k": _POS, "alpha": _EXP},
        init_grid={
            "k": tuple(np.log([0.05, 0.2, 0.5, 1.0])),
            "alpha": (0.05, 0.1, 0.2, 0.4, 0.8),
            "E": (0.0, 0.5),
            "A": (10.0, 20.0, 25.0),
        },
        citation="Chen et al. 2025, 'Parallel Scaling Law for Language Models' (ParScale), arXiv:2505.10475",
        doc="L = (A / (N (k log P + 1)))^alpha + E: P parallel streams act like multiplying N by "
        "(k log P + 1). k: benefit per log-stream, A/alpha: power law in effective size, E: irreducible.",
    )
)


# --- sigmoid in log compute ------------------------------------------------------------------------
def _sig_s(p, x):
    # 1 / (1 + (C_mid / C)^B), written with exp/log for range safety at C ~ 1e24.
    return jax_sigmoid(p["B"] * (jnp.log(jnp.asarray(x["C"])) - jnp.log(p["C_mid"])))


def jax_sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _sig_fn(p, x):
    return p["R0"] + (p["A"] - p["R0"]) * _sig_s(p, x)


def _sig_basis(p, x):
    s = _sig_s(p, x)
    return jnp.stack([1.0 - s, s], axis=-1)


SIGMOID = register_law(
    Law(
        name="sigmoid",
        inputs=("C",),
        params=("R0", "A", "C_mid", "B"),
        fn=_sig_fn,
        transforms={"C_mid": "log", "B": "log"},
        linear=("R0", "A"),
        basis=_sig_basis,
        linear_lower=(-np.inf, -np.inf),
        bounds={"C_mid": _POS, "B": _POS},
        init_grid={
            "C_mid": tuple(np.log(10.0 ** np.arange(15.0, 27.0, 1.0))),
            "B": tuple(np.log([0.1, 0.3, 0.6, 1.0, 2.0, 4.0])),
            "R0": (0.0, 0.25),
            "A": (0.5, 1.0),
        },
        target="y",
        space="linear",
        citation="Khatri et al. 2025, 'The Art of Scaling Reinforcement Learning Compute for LLMs', "
        "arXiv:2510.13786 (sigmoidal compute-performance curve)",
        doc="R(C) = R0 + (A - R0) / (1 + (C_mid/C)^B). R0: value at C -> 0, A: asymptote, C_mid: compute "
        "at half the gain, B: steepness in log compute. Fitted on the linear scale by default.",
    )
)


# --- learning-rate annealing (Tissue et al. 2024) ---------------------------------------------------
def _anneal_fn(p, x):
    return p["L0"] + p["A"] * x["S1"] ** -p["alpha"] - p["C"] * x["S2"]


def _anneal_basis(p, x):
    s1 = jnp.asarray(x["S1"])
    return jnp.stack([jnp.ones_like(s1), s1 ** -p["alpha"], -jnp.asarray(x["S2"])], axis=-1)


LR_ANNEALING = register_law(
    Law(
        name="lr_annealing",
        inputs=("S1", "S2"),
        signed_inputs=("S2",),  # 0 before any anneal; < 0 after a re-warmup (the loss rises again)
        params=("L0", "A", "alpha", "C"),
        fn=_anneal_fn,
        transforms={"L0": "log", "A": "log", "C": "log"},
        linear=("L0", "A", "C"),
        basis=_anneal_basis,
        # C >= 0: annealing lowers the loss. With constant-LR curves only (S2 = 0) C is not identified.
        linear_lower=(0.0, 0.0, 0.0),
        bounds={"L0": _POS, "A": _POS, "alpha": _EXP, "C": _POS},
        init_grid={
            "alpha": (0.1, 0.3, 0.5, 0.8, 1.2),
            "L0": (-1.0, 0.0, 1.0),
            "A": (-2.0, 0.0, 2.0),
            "C": (-4.0, -2.0, 0.0),
        },
        citation="Tissue et al. 2024, 'Scaling Law with Learning Rate Annealing', arXiv:2408.11029",
        doc="L(s) = L0 + A S1^-alpha - C S2 along one training run: S1 = sum of the learning rates so far "
        "(forward area), S2 = the annealing area with momentum; both from "
        "scaling.lr_annealing.annealing_areas(lr). One fit predicts the loss curve of any schedule.",
    )
)


# --- broken power law (Caballero et al. 2023) -------------------------------------------------------
def _bpl_parts(p, x):
    lx = jnp.log(jnp.asarray(x["X"]))
    # (1 + (X/X_b)^(1/f))^(-(alpha2 - alpha1) f), via softplus for overflow safety.
    log_break = -(p["alpha2"] - p["alpha1"]) * p["f"] * jnp.logaddexp(0.0, (lx - jnp.log(p["X_b"])) / p["f"])
    return jnp.exp(-p["alpha1"] * lx + log_break)


def _bpl_fn(p, x):
    return p["E"] + p["A"] * _bpl_parts(p, x)


def _bpl_basis(p, x):
    t = _bpl_parts(p, x)
    return jnp.stack([jnp.ones_like(t), t], axis=-1)


BROKEN = register_law(
    Law(
        name="broken_power_law",
        inputs=("X",),
        params=("E", "A", "alpha1", "alpha2", "X_b", "f"),
        fn=_bpl_fn,
        transforms={"E": "log", "A": "log", "X_b": "log", "f": "log"},
        linear=("E", "A"),
        basis=_bpl_basis,
        bounds={
            "E": _POS,
            "A": _POS,
            "alpha1": (-10.0, 10.0),
            "alpha2": (-10.0, 10.0),
            "X_b": _POS,
            "f": _POS,
        },
        init_grid={
            "alpha1": (0.05, 0.2, 0.5, 1.0),
            "alpha2": (0.05, 0.2, 0.5, 1.0),
            "X_b": tuple(np.log(10.0 ** np.arange(6.0, 24.0, 3.0))),
            "f": tuple(np.log([0.1, 0.5])),
            "E": (0.0, 1.0),
            "A": (0.0, 5.0, 10.0),
        },
        citation="Caballero et al. 2023, 'Broken Neural Scaling Laws', arXiv:2210.14891 (one break)",
        doc="L = E + A X^-alpha1 (1 + (X/X_b)^(1/f))^(-(alpha2 - alpha1) f): slope alpha1 below the break "
        "X_b, alpha2 above it; f sets how sharp the transition is.",
    )
)
