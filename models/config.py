"""Model configuration: one frozen dataclass describing a decoder-only Transformer.

Optional sizes (``n_kv_heads``, ``head_dim``, ``d_ff``) default to ``None`` and are resolved by the
``resolved_*`` properties, so ``dataclasses.replace(cfg, d_model=...)`` never leaves a stale derived value.
Validation is explicit (``cfg.validate()``, also run by the model and by the accounting functions) rather
than in ``__post_init__``, so config-override code may pass through intermediate states field by field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

FAMILIES = ("dense", "moe", "mor")
ATTENTIONS = ("mha", "mla")  # mla: DeepSeek-V2 multi-head latent attention (models/mla.py)
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHES = ("dropless", "capacity")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn", None)
# "none": keep every activation; "full": save nothing inside a layer (recompute it all in the backward pass);
# the rest are jax.checkpoint_policies of the same name.
REMAT_POLICIES = (
    "none",
    "full",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


def swiglu_hidden_size(d_model: int, multiple_of: int = 64) -> int:
    """Default SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of ``multiple_of``.

    A SwiGLU MLP has three matrices instead of two; 2/3 of the classic 4*d_model keeps its parameter count
    and FLOPs equal to a GELU MLP of width 4*d_model (Shazeer 2020, "GLU Variants Improve Transformer"; the
    rounding follows LLaMA, Touvron et al. 2023, with a smaller multiple so small models are not padded much).
    """
    return multiple_of * (-(-8 * d_model // (3 * multiple_of)))


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder-only Transformer (LLaMA-style: RMSNorm, RoPE, GQA, SwiGLU).

    The defaults give a tiny, valid byte-level model. ``param_dtype`` is the storage dtype of parameters,
    ``compute_dtype`` the dtype of activations and matmul inputs (bf16 on accelerators, fp32 on CPU).
    """

    family: str = "dense"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_heads
    d_ff: int | None = None  # None -> swiglu_hidden_size(d_model)
    max_seq_len: int = 256
    tie_embeddings: bool = False
    qk_norm: bool = False
    use_bias: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: str | None = "xla"  # "xla" everywhere, "cudnn" on NVIDIA GPUs, None lets JAX choose
    remat: str = "none"
    scan_layers: bool = True
    # ----- Mixture-of-Experts (family="moe"; models/moe.py) -- ignored by the other families ----------------
    n_experts: int = 8  # routed experts per MoE layer
    moe_top_k: int = 2  # routed experts per token
    moe_d_ff: int | None = None  # hidden size of each (routed and shared) expert; None -> resolved_d_ff
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each of width moe_d_ff
    moe_router: str = "softmax"  # "softmax" (Switch/GShard/Mixtral) or "sigmoid" (DeepSeek-V3) scores
    moe_renormalize: bool = False  # rescale the top-k gate weights to sum to 1
    moe_dispatch: str = "dropless"  # "dropless" (sort + ragged_dot) or "capacity" (one-hot einsum, drops)
    moe_capacity_factor: float = 1.25  # capacity dispatch: slots per expert = cf * tokens * top_k / n_experts
    moe_first_dense_layers: int = 0  # the first k layers keep a dense SwiGLU MLP (DeepSeekMoE)
    moe_aux_loss_weight: float = 0.01  # Switch/GShard load-balance loss, summed over MoE layers
    moe_z_loss_weight: float = 0.0  # ST-MoE router z-loss, summed over MoE layers
    moe_bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 aux-loss-free bias (state in "moe_state")
    # ----- attention kind ---------------------------------------------------------------------------------
    attention: str = "mha"  # "mha" (GQA/MHA, models/transformer.py) or "mla" (models/mla.py)
    mla_kv_lora_rank: int | None = None  # joint K/V latent width; None -> 4 * resolved_head_dim
    mla_q_lora_rank: int | None = None  # None -> full-rank queries
    mla_rope_head_dim: int | None = None  # decoupled RoPE key/query dim; None -> resolved_head_dim // 2
    mla_nope_head_dim: int | None = None  # per-head non-rotary q/k dim; None -> resolved_head_dim
    mla_v_head_dim: int | None = None  # per-head value dim; None -> resolved_head_dim
    # ----- Mixture-of-Recursions (family="mor"; models/mor.py) -- ignored by the other families -------------
    # n_layers is the full depth N_L (layer applications of a token that recurses every step); the unique
    # layers are N_L / N_r (cycle, sequence) or 2 + (N_L - 2) / N_r (middle variants).
    mor_recursions: int = 3  # N_r
    mor_sharing: str = "middle_cycle"  # "cycle" | "sequence" | "middle_cycle" | "middle_sequence"
    mor_router: str = "expert_choice"  # "expert_choice" | "token_choice" | "none" (vanilla looped)
    mor_router_scale: float = 0.1  # alpha: the gate is alpha * activation(router logit)
    mor_router_activation: str | None = None  # None -> "sigmoid" (expert choice), "softmax" (token choice)
    mor_capacity: tuple[float, ...] | None = None  # per-step token fraction; None -> ((N_r - i) / N_r)_i
    mor_aux_loss: str | None = None  # None -> "bce" (expert choice) / "balance" (token choice); or "none"
    mor_aux_loss_weight: float = 0.001  # expert choice: BCE of the router logits vs the top-k selection
    mor_balance_loss_weight: float = 0.1  # token choice: Switch-style balancing loss over depths
    mor_kv_strategy: str = "recursion_wise"  # "recursion_wise" | "shared" (reuse the first recursion's K/V)
    mor_bias_update_rate: float = 0.001  # token choice with mor_aux_loss="loss_free": DeepSeek-V3 bias step

    # ----- resolved sizes -------------------------------------------------------------------------
    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        return swiglu_hidden_size(self.d_model) if self.d_ff is None else self.d_ff

    @property
    def resolved_moe_d_ff(self) -> int:
        return self.resolved_d_ff if self.moe_d_ff is None else self.moe_d_ff

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has a routed MoE MLP (after the first k dense layers)."""
        return self.family == "moe" and layer >= self.moe_first_dense_layers

    @property
    def resolved_mla_kv_lora_rank(self) -> int:
        return 4 * self.resolved_head_dim if self.mla_kv_lora_rank is None else self.mla_kv_lora_rank

    @property
    def resolved_mla_rope_head_dim(self) -> int:
        if self.mla_rope_head_dim is not None:
            return self.mla_rope_head_dim
        return max(2, 2 * (self.resolved_head_dim // 4))  # half the head dim, kept even for RoPE pairs

    @property
    def resolved_mla_nope_head_dim(self) -> int:
        return self.resolved_head_dim if self.mla_nope_head_dim is None else self.mla_nope_head_dim

    @property
    def resolved_mla_v_head_dim(self) -> int:
        return self.resolved_head_dim if self.mla_v_head_dim is None else self.mla_v_head_dim

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    # ----- validation -----------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Raise ValueError naming the offending field(s); return self so calls can be chained."""
        errors = _validation_errors(self)
        if errors:
            raise ValueError("invalid ModelConfig:\n  - " + "\n  - ".join(errors))
        return self

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----- accounting (delegates to models/accounting.py; imported lazily to keep this module light) ---
    def param_counts(self) -> dict[str, int]:
        from models import accounting

        return accounting.param_counts(self)

    def flops_per_token(self, seq_len: int | None = None, *, attention: str = "full") -> dict[str, float]:
        from models import accounting

        return accounting.flops_per_token(self, self.max_seq_len if seq_len is None else seq_len,
                                          attention=attention)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validation_errors(c: ModelConfig) -> list[str]:
    errors: list[str] = []
    if c.family not in FAMILIES:
        errors.append(f"family={c.family!r} is not one of {FAMILIES}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        v = getattr(c, name)
        if not _is_int(v) or v < 1:
            errors.append(f"{name}={v!r} must be a positive integer")
    for name in ("n_kv_heads", "head_dim", "d_ff"):
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v < 1):
            errors.append(f"{name}={v!r} must be a positive integer or None")
    if errors:  # the divisibility checks below need valid integers
        return errors
    if c.head_dim is None and c.d_model % c.n_heads:
        errors.append(
            f"d_model={c.d_model} is not divisible by n_heads={c.n_heads} "
            "(set head_dim explicitly to decouple them)"
        )
    if c.n_heads % c.resolved_n_kv_heads:
        errors.append(
            f"n_heads={c.n_heads} is not divisible by n_kv_heads={c.resolved_n_kv_heads} "
            "(grouped-query attention shares each K/V head across n_heads/n_kv_heads query heads)"
        )
    if c.resolved_head_dim % 2:
        errors.append(f"head_dim={c.resolved_head_dim} must be even (rotary embeddings rotate pairs of dims)")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(c, name) not in DTYPES:
            errors.append(f"{name}={getattr(c, name)!r} is not one of {DTYPES}")
    if c.attention_impl not in ATTENTION_IMPLS:
        errors.append(f"attention_impl={c.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if c.attention_impl == "cudnn" and c.compute_dtype == "float32":
        errors.append('attention_impl="cudnn" needs compute_dtype "bfloat16" or "float16" (cuDNN fused '
                      'attention has no fp32 kernel); use attention_impl="xla" for fp32')
    if c.remat not in REMAT_POLICIES:
        errors.append(f"remat={c.remat!r} is not one of {REMAT_POLICIES}")
    for name in ("rope_theta", "norm_eps", "init_std"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
            errors.append(f"{name}={v!r} must be a positive (finite) number")
    for name in ("tie_embeddings", "qk_norm", "use_bias", "scan_layers"):
        if not isinstance(getattr(c, name), bool):
            errors.append(f"{name}={getattr(c, name)!r} must be a bool")
    errors += _moe_errors(c) + _mla_errors(c)
    errors += _mor_errors(c)
    return errors


def _moe_errors(c: ModelConfig) -> list[str]:
    if c.family != "moe":
        return []
    errors: list[str] = []
    for name in ("n_experts", "moe_top_k"):
        v = getattr(c, name)
        if not _is_int(v) or v < 1:
            errors.append(f"{name}={v!r} must be a positive integer")
    if c.moe_d_ff is not None and (not _is_int(c.moe_d_ff) or c.moe_d_ff < 1):
        errors.append(f"moe_d_ff={c.moe_d_ff!r} must be a positive integer or None")
    if not _is_int(c.n_shared_experts) or c.n_shared_experts < 0:
        errors.append(f"n_shared_experts={c.n_shared_experts!r} must be a non-negative integer")
    if errors:
        return errors
    if c.moe_top_k > c.n_experts:
        errors.append(f"moe_top_k={c.moe_top_k} exceeds n_experts={c.n_experts}")
    k = c.moe_first_dense_layers
    if not _is_int(k) or not 0 <= k < c.n_layers:
        errors.append(f"moe_first_dense_layers={k!r} must be an integer in [0, n_layers={c.n_layers}) "
                      "(at least one layer must be an MoE layer)")
    if c.moe_router not in MOE_ROUTERS:
        errors.append(f"moe_router={c.moe_router!r} is not one of {MOE_ROUTERS}")
    if c.moe_dispatch not in MOE_DISPATCHES:
        errors.append(f"moe_dispatch={c.moe_dispatch!r} is not one of {MOE_DISPATCHES}")
    if not isinstance(c.moe_renormalize, bool):
        errors.append(f"moe_renormalize={c.moe_renormalize!r} must be a bool")
    if not isinstance(c.moe_capacity_factor, (int, float)) or isinstance(c.moe_capacity_factor, bool) \
            or not (math.isfinite(c.moe_capacity_factor) and c.moe_capacity_factor > 0):
        errors.append(f"moe_capacity_factor={c.moe_capacity_factor!r} must be a positive (finite) number")
    for name in ("moe_aux_loss_weight", "moe_z_loss_weight", "moe_bias_update_rate"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
            errors.append(f"{name}={v!r} must be a non-negative (finite) number")
    return errors


def _mla_errors(c: ModelConfig) -> list[str]:
    if c.attention not in ATTENTIONS:
        return [f"attention={c.attention!r} is not one of {ATTENTIONS}"]
    if c.attention != "mla":
        return []
    errors: list[str] = []
    for name in ("mla_kv_lora_rank", "mla_q_lora_rank", "mla_rope_head_dim", "mla_nope_head_dim",
                 "mla_v_head_dim"):
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v < 1):
            errors.append(f"{name}={v!r} must be a positive integer or None")
    if errors:
        return errors
    if c.resolved_mla_rope_head_dim % 2:
        errors.append(f"mla_rope_head_dim={c.resolved_mla_rope_head_dim} must be even (RoPE rotates pairs)")
    if c.n_kv_heads is not None and c.n_kv_heads != c.n_heads:
        errors.append(f"n_kv_heads={c.n_kv_heads} with attention='mla': MLA has no K/V head groups (its K/V "
                      "come from one shared latent); leave n_kv_heads None")
    if c.qk_norm:
        errors.append("qk_norm=True is not supported with attention='mla' (MLA normalises its latents)")
    return errors


MOR_SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
MOR_ROUTERS = ("expert_choice", "token_choice", "none")
MOR_KV_STRATEGIES = ("recursion_wise", "shared")
_MOR_ACTIVATIONS = {"expert_choice": ("sigmoid", "tanh"), "token_choice": ("softmax", "sigmoid"), "none": ()}
_MOR_AUX_LOSSES = {"expert_choice": ("bce", "none"), "token_choice": ("balance", "loss_free", "none"),
                   "none": ("none",)}


def mor_resolved(c: ModelConfig) -> dict[str, Any]:
    """Resolved MoR settings (router defaults, capacity schedule) for a valid ``family="mor"`` config."""
    n_r = c.mor_recursions
    paper_default = {"expert_choice": ("sigmoid", "bce"), "token_choice": ("softmax", "balance"),
                     "none": (None, "none")}[c.mor_router]
    capacity = tuple(float(x) for x in c.mor_capacity) if c.mor_capacity is not None else \
        tuple((n_r - i) / n_r for i in range(n_r))
    if c.mor_router == "none":
        capacity = (1.0,) * n_r
    return {
        "activation": c.mor_router_activation or paper_default[0],
        "aux_loss": c.mor_aux_loss or paper_default[1],
        "capacity": capacity,
    }


def _mor_errors(c: ModelConfig) -> list[str]:
    if c.family != "mor":
        return []
    n_r = c.mor_recursions
    if not _is_int(n_r) or n_r < 1:
        return [f"mor_recursions={n_r!r} must be a positive integer"]
    errors: list[str] = []
    for name, allowed in (("mor_sharing", MOR_SHARINGS), ("mor_router", MOR_ROUTERS),
                          ("mor_kv_strategy", MOR_KV_STRATEGIES)):
        if getattr(c, name) not in allowed:
            errors.append(f"{name}={getattr(c, name)!r} is not one of {allowed}")
    if errors:
        return errors
    if c.mor_sharing.startswith("middle"):
        if c.n_layers < 2 + n_r or (c.n_layers - 2) % n_r:
            errors.append(f"mor_sharing={c.mor_sharing!r} keeps a unique first and last layer, so "
                          f"n_layers - 2 must be a positive multiple of mor_recursions={n_r}; "
                          f"got n_layers={c.n_layers}")
    elif c.n_layers % n_r:
        errors.append(f"n_layers={c.n_layers} (the full recursive depth) must be a multiple of "
                      f"mor_recursions={n_r} for mor_sharing={c.mor_sharing!r}")
    act, aux = c.mor_router_activation, c.mor_aux_loss
    if act is not None and act not in _MOR_ACTIVATIONS[c.mor_router]:
        errors.append(f"mor_router_activation={act!r} is not one of {_MOR_ACTIVATIONS[c.mor_router]} for "
                      f"mor_router={c.mor_router!r}")
    if aux is not None and aux not in _MOR_AUX_LOSSES[c.mor_router]:
        errors.append(f"mor_aux_loss={aux!r} is not one of {_MOR_AUX_LOSSES[c.mor_router]} for "
                      f"mor_router={c.mor_router!r}")
    for name in ("mor_router_scale", "mor_aux_loss_weight", "mor_balance_loss_weight",
                 "mor_bias_update_rate"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
            errors.append(f"{name}={v!r} must be a non-negative (finite) number")
    if c.mor_capacity is not None:
        cap = c.mor_capacity
        # a tuple, not a list: a list makes the frozen config unhashable (configs key jit and lru caches)
        if not isinstance(cap, tuple) or len(cap) != n_r or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in cap):
            errors.append(f"mor_capacity={cap!r} must be a tuple of {n_r} (= mor_recursions) fractions in "
                          "(0, 1]")
        elif any(cap[i + 1] > cap[i] for i in range(n_r - 1)):
            errors.append(f"mor_capacity={tuple(cap)} must be non-increasing (a step chooses among the "
                          "tokens still active after the previous one)")
    if c.mor_kv_strategy == "shared":
        if c.mor_sharing not in ("cycle", "middle_cycle"):
            errors.append(f"mor_kv_strategy='shared' reuses each layer's first-recursion K/V, which needs "
                          f"the same weights at every recursion: use a cycle sharing, not {c.mor_sharing!r}")
        if c.mor_capacity is not None and c.mor_capacity[0] != 1:
            errors.append("mor_kv_strategy='shared' needs mor_capacity[0] == 1: the first recursion must see "
                          "every token to produce the K/V that later recursions reuse")
    if c.attention != "mha" and c.mor_kv_strategy == "shared":
        errors.append(f"mor_kv_strategy='shared' supports attention='mha' only (got {c.attention!r})")
    return errors
