"""Learning-rate / batch-size scaling rules: move a tuned config to another batch size.

Batch sizes may be in any unit (sequences or tokens) as long as both use the same one; only kappa =
``batch_size / base_batch_size`` matters. These are first-order rules, valid below the critical batch size
(McCandlish et al. 2018, arXiv:1812.06162); beyond it, re-tune.

* Linear rule, for SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
  arXiv:1706.02677; Krizhevsky 2014): lr -> kappa * lr, keeping the SGD noise scale lr / B fixed.
* Square-root rule, for Adam-type optimisers (Malladi et al. 2022, "On the SDEs and Scaling Rules for
  Adaptive Gradient Algorithms", NeurIPS, arXiv:2205.10287): lr -> sqrt(kappa) * lr, and, for the full rule,
  (1 - b1) -> kappa * (1 - b1), (1 - b2) -> kappa * (1 - b2), eps -> eps / sqrt(kappa).
"""

from __future__ import annotations

import dataclasses
import math

from optim.config import OptimizerConfig


def _kappa(base_batch_size: float, batch_size: float) -> float:
    for name, v in (("base_batch_size", base_batch_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    return batch_size / base_batch_size


def linear_scaling_rule(learning_rate: float, base_batch_size: float, batch_size: float) -> float:
    """SGD: scale lr linearly with batch size (Goyal et al. 2017)."""
    return learning_rate * _kappa(base_batch_size, batch_size)


def sqrt_scaling_rule(learning_rate: float, base_batch_size: float, batch_size: float) -> float:
    """Adam-type: scale lr with the square root of the batch size (Malladi et al. 2022)."""
    return learning_rate * math.sqrt(_kappa(base_batch_size, batch_size))


def adam_sqrt_scaling(cfg: OptimizerConfig, base_batch_size: float, batch_size: float) -> OptimizerConfig:
    """Malladi et al.'s full square-root rule for Adam: lr (both groups), b1, b2 and eps.

    With ``name="muon"`` the Muon group's lr is scaled by sqrt(kappa) too; that is a heuristic (Muon's
    momentum is not touched and no published scaling rule for Muon is implied).

    Raises ValueError when kappa * (1 - beta) >= 1 (the batch grew so much that the rule leaves no momentum).
    """
    k = _kappa(base_batch_size, batch_size)
    betas = {}
    for field in ("b1", "b2"):
        one_minus = k * (1.0 - getattr(cfg, field))
        if one_minus >= 1.0:
            raise ValueError(
                f"square-root rule with kappa={k:g} gives 1 - {field} = {one_minus:g} >= 1; "
                "the batch-size change is too large for this rule"
            )
        betas[field] = 1.0 - one_minus
    adam_lr = None if cfg.adam_learning_rate is None else cfg.adam_learning_rate * math.sqrt(k)
    return dataclasses.replace(
        cfg,
        learning_rate=cfg.learning_rate * math.sqrt(k),
        adam_learning_rate=adam_lr,
        eps=cfg.eps / math.sqrt(k),
        **betas,
    ).validate()
