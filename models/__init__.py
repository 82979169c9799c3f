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


def inference_mode(cfg: ModelConfig) -> tuple[ModelConfig, dict[str, bool]]:
    """``(config, apply_kwargs)`` of the model as it runs at inference, where each token's output depends on
    that token and earlier ones only -- what KV-cache decoding (models/decode.py) computes: MoE with the
    dropless dispatch (capacity slots are shared by the whole batch), MoR expert choice with
    ``causal_routing=True`` (its training top-k ranks a token against later ones). Same parameters as
    ``cfg``; every other model is returned unchanged."""
    kwargs = {}
    if cfg.family == "moe" and cfg.moe_dispatch == "capacity":
        cfg = cfg.replace(moe_dispatch="dropless")
    if cfg.family == "mor" and cfg.mor_router == "expert_choice":
        kwargs["causal_routing"] = True
    return cfg, kwargs


__all__ = [
    "MlaAttention",
    "ModelConfig",
    "MoeMlp",
    "MoRTransformer",
    "Transformer",
    "build_model",
    "inference_mode",
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
