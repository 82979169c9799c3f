"""Small building blocks: a logically-partitioned parameter helper, RMSNorm and rotary embeddings.

Every parameter is created with ``nn.with_logical_partitioning`` so its logical axis names travel with it (the
trainer maps them to mesh axes; the optimiser partitions on them). Nothing here knows about devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def boxed_param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                names: Sequence[str], dtype: jnp.dtype) -> jax.Array:
    """Create (or fetch) a parameter carrying logical axis ``names``; returns the plain array."""
    if len(names) != len(shape):
        raise ValueError(f"param {name!r}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * scale, no mean subtraction, no bias.

    Statistics are computed in fp32 even for bf16 activations: the mean of squares loses precision fast.
    """

    eps: float
    axis_name: str  # logical name of the normalised (last) axis, e.g. "embed" or "head_dim"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale_D = boxed_param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                              self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale_D.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x_BxLxHxK: jax.Array, positions_L: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, RoFormer), "rotate-half" layout (GPT-NeoX / LLaMA).

    Dimension pairs (i, i + K/2) are rotated by angle position * theta^(-2i/K). Done in fp32: angles of long
    positions are not representable in bf16.
    """
    K = x_BxLxHxK.shape[-1]
    inv_freq_F = theta ** (-jnp.arange(0, K // 2, dtype=jnp.float32) * 2.0 / K)  # F = K/2 frequencies
    # positions may be [L] (shared by the batch) or [B, L] (per-row positions of gathered tokens, as in MoR)
    angle_LxF = positions_L.astype(jnp.float32)[..., None] * inv_freq_F
    cos_1xLx1xF = jnp.cos(angle_LxF)[..., None, :]
    sin_1xLx1xF = jnp.sin(angle_LxF)[..., None, :]
    x32 = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x32[..., : K // 2], x32[..., K // 2 :]
    out = jnp.concatenate([x1 * cos_1xLx1xF - x2 * sin_1xLx1xF, x2 * cos_1xLx1xF + x1 * sin_1xLx1xF], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def check_tokens(tokens_BxL: jax.Array, max_seq_len: int) -> None:
    """The models' input check: an integer [batch, seq] array no longer than their max_seq_len."""
    if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq]; got {tokens_BxL.dtype}"
                         f"{list(tokens_BxL.shape)}")
    if tokens_BxL.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds max_seq_len={max_seq_len}")


def attention_positions_and_mask(
    L: int,
    positions_BxL: jax.Array | None,
    kv_BxSxD: jax.Array | None,
    kv_positions_BxS: jax.Array | None,
    kv_valid_BxS: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(query positions, key positions, mask) shared by MHA/GQA and MLA attention when Mixture-of-Recursions
    runs a layer on gathered tokens (see ``transformer.Attention``). Keys are visible when kv_pos <= q_pos.
    The mask is None for plain self-attention (the kernel's own causal mask applies), else [B, 1, L, S] or
    [L, S] booleans."""
    positions_L = jnp.arange(L) if positions_BxL is None else positions_BxL
    kv_positions_S = positions_L if kv_BxSxD is None else (
        jnp.arange(kv_BxSxD.shape[1]) if kv_positions_BxS is None else kv_positions_BxS)
    mask = None
    if kv_BxSxD is not None or kv_valid_BxS is not None:
        mask = kv_positions_S[..., None, :] <= positions_L[..., :, None]  # [(B,) L, S]
        if kv_valid_BxS is not None:
            mask = mask & kv_valid_BxS[:, None, :]
        mask = mask[..., None, :, :] if mask.ndim == 3 else mask  # -> [B, 1, L, S] or [L, S]
    return positions_L, kv_positions_S, mask
