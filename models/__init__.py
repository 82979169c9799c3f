"""scalelab models: a dense decoder-only Transformer with logical axis names and exact FLOP accounting."""

from models.accounting import (
    chinchilla_flops_per_token,
    flops_per_token,
    kaplan_flops_per_token,
    param_counts,
    train_step_flops,
    training_flops_per_token,
)
from models.config import ModelConfig
from models.transformer import Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """The flax module for ``cfg.family`` (only "dense" so far; later families plug in here)."""
    cfg.validate()
    return Transformer(cfg)


__all__ = [
    "ModelConfig",
    "Transformer",
    "build_model",
    "chinchilla_flops_per_token",
    "flops_per_token",
    "kaplan_flops_per_token",
    "param_counts",
    "train_step_flops",
    "training_flops_per_token",
]
