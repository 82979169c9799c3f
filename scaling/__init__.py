"""scalelab.scaling: scaling-law forms, robust vectorised fitting with uncertainty, and analyses.

Imports only numpy/scipy/jax/stdlib (never models/optim/experiments), so it can be used on its own.

``scaling.fit``, ``scaling.bootstrap`` and ``scaling.backtest`` are the functions exported here, which shadow
their modules as attributes of the package (``import scaling.fit as F`` binds the function); import a module's
other names from it directly: ``from scaling.fit import FitResult``.
"""

from scaling.backtest import BacktestResult, backtest
from scaling.bootstrap import Bootstrap, Samples, bootstrap, chinchilla_derived
from scaling.fit import FitOptions, FitResult, fit, fit_huber_likelihood, prepare_data
from scaling.heldout import HeldoutReport, drop_first_fraction, heldout_eval, largest_mask
from scaling.laws import LAWS, Law, data_constrained, get_law, power_law, register_law

__all__ = [
    "LAWS",
    "BacktestResult",
    "Bootstrap",
    "FitOptions",
    "FitResult",
    "HeldoutReport",
    "Law",
    "Samples",
    "backtest",
    "bootstrap",
    "chinchilla_derived",
    "data_constrained",
    "drop_first_fraction",
    "fit",
    "fit_huber_likelihood",
    "get_law",
    "heldout_eval",
    "largest_mask",
    "power_law",
    "prepare_data",
    "register_law",
]
