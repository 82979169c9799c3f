"""Model configuration: one frozen dataclass describing a decoder-only Transformer.

Optional sizes (``n_kv_heads``, ``head_dim``, ``d_ff``) default to ``None`` and are resolved by the
``resolved_*`` properties, so ``dataclasses.replace(cfg, d_model=...)`` never leaves a stale derived value.
Validation is explicit (``cfg.validate()``, also run by the model and by the accounting functions) rather
than in ``__post_init__``, so config-override code may pass through intermediate states field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

FAMILIES = ("dense",)
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
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            errors.append(f"{name}={v!r} must be a positive number")
    for name in ("tie_embeddings", "qk_norm", "use_bias", "scan_layers"):
        if not isinstance(getattr(c, name), bool):
            errors.append(f"{name}={getattr(c, name)!r} must be a bool")
    return errors
