"""Learning-rate schedules: linear warmup + cosine, warmup-stable-decay (WSD), constant.

Conventions (all three schedules), with W = ``warmup_steps``, T = ``total_steps``, peak = the peak lr:

* warmup: ``lr(s) = peak * (s + 1) / W`` for ``s < W``, so step 0 already moves the weights (a zero-lr first
  step would be wasted) and step ``W - 1`` is at the peak.
* cosine: ``lr(s) = peak * (m + (1 - m) * (1 + cos(pi * p)) / 2)`` with ``p = (s - W) / (T - W)`` clipped to
  [0, 1] and ``m = min_lr_ratio``: the peak at s = W, ``m * peak`` at s = T (one past the last step, so the
  last update is small but not zero even when m = 0). This is ``optax.cosine_decay_schedule(peak, T - W, m)``
  shifted by W.
* WSD (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
  arXiv:2405.18392; Hu et al. 2024, MiniCPM, arXiv:2404.06395): warmup, then the peak until
  ``S = T - round(decay_fraction * T)``, then a cool-down reaching ``m * peak`` at s = T with shape
  ``linear`` (1 - p), ``cosine`` ((1 + cos(pi p)) / 2) or ``1-sqrt`` (1 - sqrt(p), the best of Hägele et al.),
  p = (s - S) / (T - S). A WSD run's stable phase can be branched into cool-downs of any length, which is
  what makes it cheap for scaling studies over several token budgets.
* constant: warmup, then the peak forever.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from optim.config import DECAY_SHAPES, OptimizerConfig


def wsd_decay_start(cfg: OptimizerConfig, total_steps: int) -> int:
    """First step of WSD's cool-down phase (the last step at the peak lr)."""
    return total_steps - int(round(cfg.decay_fraction * total_steps))


def schedule_params(cfg: OptimizerConfig, total_steps: int, *,
                    peak_value: float | None = None) -> dict[str, float]:
    """The numbers that define ``cfg``'s schedule over ``total_steps`` (validated): peak, warmup,
    decay_begin, decay_len, min_ratio and shape (an index into ``DECAY_SHAPES``).

    Every schedule kind is one formula of these (``schedule_from_params``), so a compiled train step that
    takes them as arguments serves every run that differs only in learning rate, length or schedule: the
    trainer passes them at run time and the compilation cache shares one executable among such runs."""
    cfg.validate()
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"optimizer.warmup_steps={cfg.warmup_steps} exceeds total_steps={total_steps}")
    peak = float(cfg.learning_rate if peak_value is None else peak_value)
    if peak <= 0:
        raise ValueError(f"peak learning rate must be > 0, got {peak}")
    warmup = cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = wsd_decay_start(cfg, total_steps)
        if decay_start < warmup:
            raise ValueError(
                f"WSD cool-down would start at step {decay_start} (decay_fraction={cfg.decay_fraction} of "
                f"{total_steps} steps), before warmup ends at step {warmup}"
            )
        decay_begin, decay_len = decay_start, total_steps - decay_start
        if decay_len < 2:  # its first step is at the peak (the convention above): nothing would decay
            raise ValueError(
                f"WSD cool-down of {decay_len} step(s) (decay_fraction={cfg.decay_fraction} of {total_steps} "
                "steps) would not decay: its first step is at the peak, so it needs at least 2; raise "
                "decay_fraction, or use schedule='constant' for a run without a cool-down"
            )
    else:
        decay_begin, decay_len = warmup, total_steps - warmup
    if cfg.schedule == "constant":
        decay_len = 0  # no cool-down: the peak forever
    shape = "cosine" if cfg.schedule == "cosine" else cfg.decay_shape
    return {"peak": peak, "warmup": float(warmup), "decay_begin": float(decay_begin),
            "decay_len": float(decay_len), "min_ratio": float(cfg.min_lr_ratio),
            "shape": float(DECAY_SHAPES.index(shape))}


def schedule_from_params(p: dict[str, Any]) -> optax.Schedule:
    """``step -> learning rate`` from ``schedule_params`` (plain floats, or traced scalars inside jit)."""

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warmup, length = p["warmup"], p["decay_len"]
        warm = jnp.where(warmup > 0, jnp.minimum(1.0, (s + 1.0) / jnp.maximum(warmup, 1.0)), 1.0)
        prog = jnp.clip((s - p["decay_begin"]) / jnp.maximum(length, 1.0), 0.0, 1.0)
        # in DECAY_SHAPES order: linear, cosine, 1-sqrt
        by_shape = jnp.stack([1.0 - prog, 0.5 * (1.0 + jnp.cos(jnp.pi * prog)), 1.0 - jnp.sqrt(prog)])
        shaped = by_shape[jnp.asarray(p["shape"]).astype(jnp.int32)]
        m = p["min_ratio"]
        factor = jnp.where(length > 0, m + (1.0 - m) * shaped, 1.0)
        return p["peak"] * warm * factor

    return schedule


def make_schedule(cfg: OptimizerConfig, total_steps: int, *,
                  peak_value: float | None = None) -> optax.Schedule:
    """``step -> learning rate`` (jit-able) for ``cfg.schedule``; ``peak_value`` defaults to the cfg's lr."""
    return schedule_from_params(schedule_params(cfg, total_steps, peak_value=peak_value))
