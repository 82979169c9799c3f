"""Each plot returns a Figure with the expected artists and saves to a valid PNG."""

from dataclasses import dataclass

import numpy as np
import pytest

from scaling.downstream import fit_accuracy_vs_compute, fit_two_step
from scaling.laws import get_law
from scaling.pareto import law_frontier, membership_probability
from scaling.plots import (
    plot_downstream,
    plot_isoflop,
    plot_law_fit,
    plot_law_frontier,
    plot_loss_curves,
    plot_observational,
    plot_optimal,
    plot_pareto,
)

mpl = pytest.importorskip("matplotlib")
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class _Fit:
    """Minimal stand-in with the FitResult surface the plots use (law, params, predict)."""

    law: object
    params: dict

    def predict(self, **inputs):
        import jax

        with jax.enable_x64(True):
            return np.asarray(self.law.predict(self.params, **inputs), dtype=np.float64)


def _saved(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    return path


def _count(ax, kind):
    return sum(isinstance(c, kind) for c in ax.collections)


def chinchilla_isoflop_data():
    p = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
    cs, ns, ls = [], [], []
    for c in (1e18, 1e19, 1e20):
        n = np.geomspace(1e7, 2e9, 9)
        n = n[(c / (6 * n) > 1e8)]
        d = c / (6 * n)
        cs += [c] * n.size
        ns += list(n)
        ls += list(p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"])
    return np.array(cs), np.array(ns), np.array(ls), p


def test_isoflop_plot_with_parabolas_and_optima(tmp_path):
    c, n, loss, _ = chinchilla_isoflop_data()
    fig = plot_isoflop(c, n, loss)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # one parabola per budget
    assert _count(ax, PathCollection) == 6  # data + vertex star per budget
    assert ax.get_xscale() == "log"

    class _R:
        N, loss = np.array([1e8, 3e8, 8e8]), np.array([3.0, 2.8, 2.6])

    fig2 = plot_isoflop(c, n, loss, result=_R())
    assert "optimum N*(C)" in [t.get_text() for t in fig2.axes[0].get_legend().get_texts()]
    _saved(fig2, tmp_path, "isoflop")
    with pytest.raises(ValueError, match="equal lengths"):
        plot_isoflop(c, n[:-1], loss)
    # realised FLOPs of one budget differ slightly: grouped as approach2 groups them (each run used to be its
    # own one-point "profile", with no parabola at all)
    from scaling.isoflop import approach2

    jittered = c * (1 + np.random.default_rng(0).uniform(-0.005, 0.005, c.size))
    res = approach2(jittered, n, loss, budget_rtol=0.025)
    ax = plot_isoflop(jittered, n, loss, result=res).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.lines) == 3 and sum(t.startswith("C =") for t in legend) == 3
    assert len(plot_isoflop(jittered, n, loss, budget_rtol=0.025).axes[0].lines) == 3


def test_law_fit_single_input_with_band_and_residuals(tmp_path):
    law = get_law("power_law_C")
    p = {"E": 1.7, "A": 400.0, "alpha": 0.12}
    c = np.geomspace(1e18, 1e23, 30)
    loss = np.asarray(law.predict(p, C=c)) * (1 + 0.003 * np.random.default_rng(0).normal(size=c.size))
    draws = {"E": 1.7 + 0.01 * np.arange(-5, 5), "A": np.full(10, 400.0), "alpha": np.full(10, 0.12)}
    fig = plot_law_fit(_Fit(law, p), {"C": c, "loss": loss}, samples=draws)
    top, bot = fig.axes[:2]
    assert len(top.lines) == 1 and _count(top, PolyCollection) == 1  # fit curve + bootstrap band
    assert _count(bot, PathCollection) == 1 and bot.get_ylabel() == "residual (%)"
    _saved(fig, tmp_path, "law_fit")


def test_law_fit_two_inputs(tmp_path):
    law = get_law("chinchilla")
    c, n, loss, p = chinchilla_isoflop_data()
    d = c / (6 * n)
    fig = plot_law_fit(_Fit(law, p), {"N": n, "D": d, "loss": loss}, samples=[p, {**p, "E": 1.81}])
    assert len(fig.axes) == 3  # top, residuals, colourbar
    np.testing.assert_allclose(fig.axes[1].collections[0].get_offsets()[:, 1], 0.0, atol=1e-9)
    _saved(fig, tmp_path, "law_fit_nd")
    with pytest.raises(ValueError, match="not an input"):
        plot_law_fit(_Fit(law, p), {"N": n, "D": d, "loss": loss}, x="C")


def test_optimal_plot_with_ci(tmp_path):
    @dataclass
    class _Alloc:
        C: np.ndarray
        N: np.ndarray
        D: np.ndarray
        N_ci: tuple
        D_ci: tuple
        method: str = "closed_form"

    c = np.geomspace(1e18, 1e24, 20)
    n, d = 0.1 * c**0.5, c**0.5 / 0.6
    alloc = _Alloc(c, n, d, (0.8 * n, 1.2 * n), (0.8 * d, 1.2 * d))

    class _A2:
        C, N, D = c[::5], n[::5], d[::5]

    fig = plot_optimal(alloc, approach2=_A2())
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.lines) == 1 and _count(ax, PolyCollection) == 1 and _count(ax, PathCollection) == 1
        assert ax.get_yscale() == "log"
    _saved(fig, tmp_path, "optimal")


def test_pareto_plot_membership_shading(tmp_path):
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(1, 10, 40), rng.uniform(1, 10, 40)]
    prob = membership_probability(pts, 0.3, n_boot=200)
    fig = plot_pareto(pts, prob=prob, names=("FLOPs", "loss"), labels=[str(i) for i in range(40)])
    ax = fig.axes[0]
    shaded = ax.collections[0]
    np.testing.assert_allclose(shaded.get_array(), prob)  # colour encodes P(on frontier)
    assert len(fig.axes) == 2 and len(ax.lines) == 1 and len(ax.texts) == 40
    _saved(fig, tmp_path, "pareto")
    with pytest.raises(ValueError, match="two objectives"):
        plot_pareto(np.c_[pts, pts])


def test_law_frontier_plot(tmp_path):
    lf = law_frontier({"A": lambda c: 2 + 10 * c**-0.1, "B": lambda c: 1.5 + 1000 * c**-0.2},
                      np.geomspace(1e10, 1e30, 100))
    fig = plot_law_frontier(lf)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 + 1 + len(lf.crossovers) and len(lf.crossovers) == 1
    _saved(fig, tmp_path, "law_frontier")


def test_downstream_plot_with_two_step(tmp_path):
    from scipy.special import expit

    c = np.geomspace(1e19, 1e24, 30)
    loss = 1.8 + 300 * c**-0.15
    acc = 0.25 + 0.7 * expit(-8 * (loss - 2.3))
    fit = fit_accuracy_vs_compute(c, acc, chance=0.25, n_boot=50)
    ts = fit_two_step(c, loss, acc, chance=0.25, ceiling=0.95, n_boot=50)
    fig = plot_downstream(c, acc, fit=fit, two_step=ts, cutoff=1e23, chance=0.25)
    ax = fig.axes[0]
    assert len(ax.lines) == 4  # sigmoid, two-step, cutoff, chance
    assert _count(ax, PolyCollection) == 2 and _count(ax, PathCollection) == 2
    _saved(fig, tmp_path, "downstream")
    # Without bootstrap draws the curves are drawn without bands.
    fig = plot_downstream(c, acc, fit=fit_accuracy_vs_compute(c, acc, chance=0.25))
    assert _count(fig.axes[0], PolyCollection) == 0


def test_observational_plot_draws_the_fit_on_its_index_and_the_compute_baseline(tmp_path):
    """The left panel's curve is floor + (ceiling - floor) * sigmoid(index) on the fitted index, the models
    sit at (index, metric) with held-out ones apart, and the right panel draws the compute-only sigmoid."""
    from scipy.special import expit

    from scaling.observational import fit_observational

    rng = np.random.default_rng(0)
    c = np.geomspace(1e20, 1e24, 40)
    s_Mx2 = np.c_[0.3 * np.log(c / 1e22) + 0.2 * rng.normal(size=40), rng.normal(size=40)]
    y = 0.25 + 0.75 * expit(2.0 * s_Mx2[:, 0] + 0.5 * s_Mx2[:, 1] - 0.3) + 0.01 * rng.normal(size=40)
    y = np.clip(y, 0, 1)
    held = c >= 3e23
    fit = fit_observational(s_Mx2[~held], y[~held], floor=0.25, n_boot=40)
    comp = fit_accuracy_vs_compute(c[~held], y[~held], chance=0.25)
    fig = plot_observational(fit, s_Mx2, y, heldout=held, compute=c, compute_fit=comp, cutoff=3e23)
    left, right = fig.axes[:2]
    index = s_Mx2 @ fit.weights + fit.bias
    curve = left.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), np.sort(index))
    np.testing.assert_allclose(curve.get_ydata(), 0.25 + 0.75 * expit(np.sort(index)), rtol=1e-12)
    fitted, heldout = (c_ for c_ in left.collections if isinstance(c_, PathCollection))
    np.testing.assert_allclose(fitted.get_offsets(), np.c_[index[~held], y[~held]])
    np.testing.assert_allclose(heldout.get_offsets(), np.c_[index[held], y[held]])
    assert _count(left, PolyCollection) == 1  # the bootstrap band
    grid = right.lines[0].get_xdata()
    assert grid[0] == pytest.approx(c.min()) and grid[-1] == pytest.approx(c.max())
    np.testing.assert_allclose(right.lines[0].get_ydata(), comp.predict(grid))
    assert right.get_xscale() == "log" and right.lines[1].get_xdata()[0] == pytest.approx(3e23)
    _saved(fig, tmp_path, "observational")
    # Another x (e.g. equivalent compute), no bootstrap, no compute: one panel, points at the given x.
    plain = fit_observational(s_Mx2, y, floor=0.25)
    fig = plot_observational(plain, s_Mx2, y, x=c, log_x=True, xlabel="FLOPs")
    only = fig.axes[0]
    assert len(fig.axes) == 1 and _count(only, PolyCollection) == 0 and only.get_xscale() == "log"
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), np.c_[c, y])
    with pytest.raises(ValueError, match="heldout"):
        plot_observational(plain, s_Mx2, y, heldout=held[:-1])


def test_loss_curves_plot_draws_each_run_its_predictions_and_schedule(tmp_path):
    steps = np.array([10, 20, 30])
    curves = {"constant": (steps, [3.0, 2.8, 2.7]), "wsd": (steps, [3.0, 2.8, 2.5])}
    preds = {"wsd": {"law A": [3.0, 2.79, 2.52], "law B": [3.1, 2.9, 2.6]}}
    lr = {"constant": np.full(30, 1e-3), "wsd": np.r_[np.full(20, 1e-3), np.linspace(1e-3, 1e-4, 10)]}
    bands = {"wsd": {"law B": ([3.0, 2.85, 2.55], [3.2, 2.95, 2.65])}}
    fig = plot_loss_curves(curves, preds, lr=lr, bands=bands)
    axes = [ax for ax in fig.axes if ax.get_title()]
    # one shaded band, law B's, in law B's colour, spanning its lower and upper bounds
    (shade,) = [c for c in axes[1].collections if isinstance(c, PolyCollection)]
    assert _count(axes[0], PolyCollection) == 0
    np.testing.assert_allclose(shade.get_facecolor()[0][:3], mpl.colors.to_rgb("C1"))
    ys = shade.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(2.55) and ys.max() == pytest.approx(3.2)
    assert [ax.get_title() for ax in axes] == ["constant", "wsd"]
    measured, law_a, law_b = axes[1].lines
    np.testing.assert_allclose(measured.get_xydata(), np.c_[steps, [3.0, 2.8, 2.5]])
    np.testing.assert_allclose(law_b.get_ydata(), [3.1, 2.9, 2.6])
    assert law_a.get_label() == "law A" and len(axes[0].lines) == 1  # no prediction for the constant run
    schedule = [ax for ax in fig.axes if not ax.get_title()][1].lines[0]  # the wsd panel's right-hand axis
    np.testing.assert_allclose(schedule.get_xydata()[[0, -1]], [[1, 1e-3], [30, 1e-4]])
    _saved(fig, tmp_path, "loss_curves")
    with pytest.raises(ValueError, match="the law A prediction has 2 values for 3 steps"):
        plot_loss_curves(curves, {"wsd": {"law A": [3.0, 2.8]}})
    with pytest.raises(ValueError, match="no curves"):
        plot_loss_curves({})
    with pytest.raises(ValueError, match="the law B band has 2/3 values for 3 steps"):
        plot_loss_curves(curves, preds, bands={"wsd": {"law B": ([3.0, 2.8], [3.1, 2.9, 2.6])}})
