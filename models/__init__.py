"""scalelab models: a dense decoder-only Transformer with logical axis names and exact FLOP accounting."""

from models.accounting import (
    chinchilla_flops_per_token,
    decode_flops_per_token,
    family_summary,
    flops_per_token,
    kaplan_flops_per_token,
    kv_cache_bytes_per_token,
    param_counts,
    train_step_flops,
    training_flops_per_token,
)
from models.config import ModelConfig
from models.decode import decode_logits, decode_step, init_cache, kv_cache_bytes
from models.mla import MlaAttention
from models.moe import MoeMlp, router_bias_update
from models.mor import MoRTransformer, equal_unique_params_dense
from models.transformer import Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """The flax module for ``cfg.family``: "dense" and "moe" (routed MLPs inside ``Transformer``'s blocks)
    are ``Transformer``; "mor" is ``MoRTransformer``. ``cfg.attention="mla"`` works in every family."""
    cfg.validate()
    if cfg.family == "mor":
        return MoRTransformer(cfg)
    return Transformer(cfg)


__all__ = [
    "MlaAttention",
    "ModelConfig",
    "MoeMlp",
    "MoRTransformer",
    "Transformer",
    "build_model",
    "chinchilla_flops_per_token",
    "decode_logits",
    "decode_step",
    "decode_flops_per_token",
    "equal_unique_params_dense",
    "family_summary",
    "flops_per_token",
    "init_cache",
    "kaplan_flops_per_token",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "param_counts",
    "router_bias_update",
    "train_step_flops",
    "training_flops_per_token",
]
