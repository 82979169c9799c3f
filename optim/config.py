"""Optimiser configuration: one frozen dataclass, validated with clear messages.

The same config drives both optimisers:

* ``name="adamw"``: AdamW (Loshchilov & Hutter, 2019) on every parameter, weight decay masked off norms,
  biases and token embeddings (see :mod:`optim.partition`).
* ``name="muon"``: Muon (Jordan et al., 2024) on the hidden weight matrices, AdamW on everything else
  (embeddings, LM head, norms, biases, routers). Both groups follow the same schedule shape; the AdamW group's
  peak is ``adam_learning_rate`` (``None`` -> ``learning_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
NS_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of the optimiser and its learning-rate schedule.

    Attributes:
      name: "adamw" or "muon".
      learning_rate: peak learning rate (of the Muon group when ``name="muon"``).
      weight_decay: decoupled weight decay, multiplied by the scheduled learning rate as in ``optax.adamw``
        (the PyTorch convention), applied only to the parameters the partition marks as decayed.
      b1, b2, eps: Adam moments and denominator epsilon (used by AdamW, and by Muon's AdamW group).
      muon_momentum: Muon's momentum coefficient (0.95 as in Jordan et al. 2024).
      nesterov: Nesterov momentum for Muon.
      ns_steps: Newton-Schulz iterations for Muon (5, with coefficients (3.4445, -4.7750, 2.0315)).
      ns_dtype: dtype of Muon's Newton-Schulz matmuls. "float32" (default) runs ``optax.contrib.muon``;
        "bfloat16" keeps the momentum in fp32 and casts only the orthogonalisation to bf16, as modded-nanogpt
        and Moonlight do (:mod:`optim.muon_lowp`): tensor-core speed on GPUs, emulated (slow) on CPUs.
      adam_learning_rate: peak learning rate of Muon's AdamW group; None -> ``learning_rate``.
      muon_consistent_rms: Muon update scale. A float r scales each orthogonalised update by
        ``r * sqrt(max(fan_in, fan_out))`` so its RMS is ~r whatever the shape (Liu et al. 2025, "Muon is
        Scalable for LLM Training", arXiv:2502.16982: r=0.2 matches AdamW's typical update RMS, so Muon can
        share AdamW's learning rate and weight decay). None -> Keller Jordan's width scaling
        ``sqrt(max(1, fan_out / fan_in))``, which wants a much larger lr (~0.02).
      schedule: "cosine" (linear warmup + cosine to ``min_lr_ratio``), "wsd" (warmup-stable-decay) or
        "constant" (linear warmup then flat).
      warmup_steps: linear warmup length in optimiser steps.
      decay_fraction: WSD only: fraction of ``total_steps`` spent in the final decay (cool-down) phase.
      decay_shape: WSD only: "linear", "cosine" or "1-sqrt" (Hägele et al. 2024, arXiv:2405.18392).
      min_lr_ratio: final learning rate as a fraction of the peak (cosine and WSD).
      grad_clip_norm: clip gradients to this global L2 norm before the optimiser; None disables clipping.
    """

    name: str = "adamw"
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "float32"
    adam_learning_rate: float | None = None
    muon_consistent_rms: float | None = 0.2
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    min_lr_ratio: float = 0.1
    grad_clip_norm: float | None = 1.0

    def validate(self) -> OptimizerConfig:
        """Raise ValueError naming the offending field; return self so calls can be chained."""
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r} is unknown; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r} is unknown; choose one of {SCHEDULES}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"optimizer.decay_shape={self.decay_shape!r} is unknown; choose one of {DECAY_SHAPES}"
            )
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"optimizer.ns_dtype={self.ns_dtype!r} is unknown; choose one of {NS_DTYPES}")
        _positive("learning_rate", self.learning_rate)
        if self.adam_learning_rate is not None:
            _positive("adam_learning_rate", self.adam_learning_rate)
        if self.muon_consistent_rms is not None:
            _positive("muon_consistent_rms", self.muon_consistent_rms)
        if self.grad_clip_norm is not None:
            _positive("grad_clip_norm", self.grad_clip_norm)
        _positive("eps", self.eps)
        _in_range("weight_decay", self.weight_decay, 0.0, math.inf, closed_high=False)
        for field in ("b1", "b2", "muon_momentum"):
            _in_range(field, getattr(self, field), 0.0, 1.0, closed_high=False)
        _in_range("decay_fraction", self.decay_fraction, 0.0, 1.0)
        _in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"optimizer.nesterov must be a bool, got {self.nesterov!r}")
        _nonneg_int("ns_steps", self.ns_steps, minimum=1)
        _nonneg_int("warmup_steps", self.warmup_steps, minimum=0)
        return self


def _number(field: str, value: object) -> float:
    # bool is an int subclass; a bool where a float belongs is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"optimizer.{field} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"optimizer.{field} must be finite, got {value!r}")
    return float(value)


def _positive(field: str, value: object) -> None:
    if _number(field, value) <= 0:
        raise ValueError(f"optimizer.{field} must be > 0, got {value!r}")


def _in_range(field: str, value: object, low: float, high: float, closed_high: bool = True) -> None:
    v = _number(field, value)
    ok = low <= v <= high if closed_high else low <= v < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"optimizer.{field} must be in [{low}, {high}{bracket}, got {value!r}")


def _nonneg_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"optimizer.{field} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"optimizer.{field} must be >= {minimum}, got {value}")
