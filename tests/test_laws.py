"""Law objects and registry: predictions match the published formulas written out independently in numpy,
the stable log forms and the variable-projection bases agree with the plain formula, and users can register
their own law."""

from __future__ import annotations

import numpy as np
import pytest

from scaling.laws import LAWS, Law, get_law, register_law

RNG = np.random.default_rng(0)
N = np.geomspace(1e7, 1e11, 7)
D = np.geomspace(1e9, 1e13, 7)

# (law name, params, inputs, numpy formula written from the paper)
CASES = [
    (
        "chinchilla",
        dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
        dict(N=N, D=D),
        lambda p, x: p["E"] + p["A"] / x["N"] ** p["alpha"] + p["B"] / x["D"] ** p["beta"],
    ),
    (
        "kaplan",
        dict(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095),
        dict(N=N, D=D),
        lambda p, x: (
            ((p["N_c"] / x["N"]) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / x["D"]) ** p["alpha_D"]
        ),
    ),
    (
        "power_law_C",
        dict(E=1.5, A=30.0, alpha=0.05),
        dict(C=np.geomspace(1e18, 1e24, 7)),
        lambda p, x: p["E"] + p["A"] * x["C"] ** -p["alpha"],
    ),
    (
        "parscale",
        dict(E=1.2, A=2e8, k=0.4, alpha=0.15),
        dict(N=N, P=np.array([1, 2, 4, 8, 1, 2, 4.0])),
        lambda p, x: (p["A"] / (x["N"] * (p["k"] * np.log(x["P"]) + 1))) ** p["alpha"] + p["E"],
    ),
    (
        "sigmoid",
        dict(R0=0.25, A=0.9, C_mid=1e21, B=0.8),
        dict(C=np.geomspace(1e18, 1e24, 7)),
        lambda p, x: p["R0"] + (p["A"] - p["R0"]) / (1 + (p["C_mid"] / x["C"]) ** p["B"]),
    ),
    (
        "broken_power_law",
        dict(E=0.5, A=50.0, alpha1=0.1, alpha2=0.4, X_b=1e9, f=0.3),
        dict(X=N),
        lambda p, x: (
            p["E"]
            + p["A"]
            * x["X"] ** -p["alpha1"]
            * (1 + (x["X"] / p["X_b"]) ** (1 / p["f"])) ** (-(p["alpha2"] - p["alpha1"]) * p["f"])
        ),
    ),
    (
        "farseer",
        dict(a1=-0.2, b1=-1.0, c1=0.2, a2=0.5, b2=0.3, c2=0.1, a3=-0.3, b3=0.6, c3=0.2),
        dict(N=N, D=D),
        lambda p, x: (
            np.exp(p["a3"] * (x["N"] / 1e9) ** p["c3"] + p["b3"])
            + np.exp(p["a2"] * (x["N"] / 1e9) ** p["c2"] + p["b2"])
            * (x["D"] / 1e9) ** -np.exp(p["a1"] * (x["N"] / 1e9) ** p["c1"] + p["b1"])
        ),
    ),
]


def _muennighoff(p, x, tpp=20.0):
    ud = np.minimum(x["U_D"], x["D"])  # unique tokens *seen*: U_D <= D in the paper
    rd = np.maximum(x["D"] / ud - 1, 0)
    d_eff = ud + ud * p["R_star_D"] * (1 - np.exp(-rd / p["R_star_D"]))
    un = np.minimum(x["N"], ud / tpp)
    rn = np.maximum(x["N"] / un - 1, 0)
    n_eff = un + un * p["R_star_N"] * (1 - np.exp(-rn / p["R_star_N"]))
    return p["E"] + p["A"] / n_eff ** p["alpha"] + p["B"] / d_eff ** p["beta"]


CASES.append(
    (
        "data_constrained",
        dict(E=1.87, A=521.0, B=1488.0, alpha=0.35, beta=0.35, R_star_N=5.3, R_star_D=15.4),
        dict(N=N, D=D, U_D=D / np.array([1, 2, 4, 8, 16, 40, 0.25])),
        _muennighoff,
    )
)


@pytest.mark.parametrize("name,p,x,ref", CASES, ids=[c[0] for c in CASES])
def test_prediction_matches_paper_formula(name, p, x, ref):
    import jax

    law = get_law(name)
    with jax.enable_x64(True):
        got = np.asarray(law.predict(p, **x))
        np.testing.assert_allclose(got, ref(p, x), rtol=1e-10)
        if law.space == "log":
            logp = np.asarray(law.log_prediction({k: np.float64(v) for k, v in p.items()}, x))
            np.testing.assert_allclose(logp, np.log(ref(p, x)), rtol=1e-10, atol=1e-12)
        if law.supports_varpro:
            # Variable projection: prediction = basis(nonlinear params) @ linear coefficients.
            nat = {k: np.float64(v) for k, v in p.items()}
            coef = law.to_linear(nat) if law.to_linear else np.array([p[k] for k in law.linear])
            np.testing.assert_allclose(np.asarray(law.basis(nat, x)) @ coef, ref(p, x), rtol=1e-10)
            back = law.combine({k: nat[k] for k in law.nonlinear}, coef)
            assert {k: pytest.approx(float(back[k])) for k in law.params} == p
    assert law.citation and "arXiv" in law.citation


def test_data_constrained_law_gives_no_credit_for_unread_data():
    """A run shorter than one pass over its unique data (D < U_D) with N within the tokens-per-parameter
    budget is Chinchilla's law in (N, D) exactly: the tokens it never read neither help nor count as
    repetition. The same holds with U_N given as data and U_N >= N."""
    import jax

    from scaling.laws import data_constrained

    p = dict(E=1.87, A=521.0, B=1488.0, alpha=0.35, beta=0.35, R_star_N=5.3, R_star_D=15.4)
    chin = {k: p[k] for k in ("E", "A", "B", "alpha", "beta")}
    N, D = np.array([1e8, 4e8]), np.array([1e10, 2e10])  # D/N >= 20: no excess parameters
    with jax.enable_x64(True):
        want = np.asarray(get_law("chinchilla").predict(chin, N=N, D=D))
        got = np.asarray(get_law("data_constrained").predict(p, N=N, D=D, U_D=5 * D))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        given_un = data_constrained(tokens_per_param=None)
        got = np.asarray(given_un.predict(p, N=N, D=D, U_D=5 * D, U_N=3 * N))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        # and repetition still costs: the same D from a quarter as many unique tokens predicts a higher loss
        assert (np.asarray(get_law("data_constrained").predict(p, N=N, D=D, U_D=D / 4)) > want).all()


def test_every_required_law_is_registered_and_documented():
    for name in (
        "chinchilla",
        "kaplan",
        "power_law",
        "data_constrained",
        "farseer",
        "parscale",
        "sigmoid",
        "broken_power_law",
    ):
        law = get_law(name)
        assert law.doc and law.citation
        assert set(law.init_grid) >= set(law.nonlinear)


def test_unconstrained_round_trip_and_grid():
    law = get_law("chinchilla")
    p = dict(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
    th = law.to_unconstrained(p)
    np.testing.assert_allclose(th[:3], np.log([1.8, 480.0, 2100.0]))
    back = law.from_unconstrained(th)
    assert {k: pytest.approx(float(v)) for k, v in back.items()} == p
    assert law.start_grid(law.params).shape == (4500, 5)  # Hoffmann's 4,500-point grid
    with pytest.raises(ValueError, match="must be > 0"):
        law.to_unconstrained({**p, "A": -1.0})
    with pytest.raises(ValueError, match="must be > 0"):  # the boundary: log(0) is refused by name too
        law.to_unconstrained({**p, "A": 0.0})


def test_power_law_variable_option_and_unknown_law():
    assert get_law("power_law", var="D").inputs == ("D",)
    assert get_law("power_law_N").inputs == ("N",)
    with pytest.raises(KeyError, match="unknown law"):
        get_law("nope")
    with pytest.raises(ValueError, match="takes no options"):  # chinchilla has no factory
        get_law("chinchilla", var="N")
    with pytest.raises(ValueError, match="missing"):
        get_law("chinchilla").predict(dict(E=1, A=1, B=1, alpha=1, beta=1), N=N)


def test_register_custom_law():
    law = Law(
        name="test_custom_linear",
        inputs=("N",),
        params=("E", "A", "alpha"),
        fn=lambda p, x: p["E"] + p["A"] * x["N"] ** -p["alpha"],
        transforms={"E": "log", "A": "log"},
        init_grid={"alpha": (0.1, 0.5), "E": (0.0,), "A": (1.0,)},
    )
    register_law(law, overwrite=True)
    assert LAWS["test_custom_linear"] is law and get_law("test_custom_linear") is law
    with pytest.raises(ValueError, match="already registered"):
        register_law(law)
    with pytest.raises(ValueError, match="unknown transforms"):
        Law(name="bad", inputs=("N",), params=("a",), fn=lambda p, x: x["N"], transforms={"a": "sqrt"})
