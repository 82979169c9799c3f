"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434, section 2.1).

Keys and values are up-projected from one shared low-rank latent c_kv (the only thing a decoder must cache,
with the decoupled RoPE key); queries are optionally low-rank too:

    c_kv = RMSNorm(x W_dkv)                       (kv_lora)        cached
    k_nope_h = c_kv W_uk_h,  v_h = c_kv W_uv_h    (per head: nope, v dims)
    k_rope = RoPE(x W_kr)                         (rope dim, ONE head shared by all heads)  cached
    c_q = RMSNorm(x W_dq) [low-rank]  or  x      q_h = c_q W_uq_h = [q_nope_h, RoPE(q_rope_h)]
    o = sum_h softmax([q_nope_h, q_rope_h] . [k_nope_h, k_rope]^T / sqrt(nope + rope)) v_h W_o_h

RoPE cannot be applied to k_nope = c_kv W_uk (it would prevent absorbing W_uk into the query at decode time),
hence the separate, shared rotary key. This module is a drop-in replacement for ``transformer.Attention``
(same call signature; any block that builds its attention through ``transformer.attention_class`` gets it).

Parameters (input axes..., output axes...): q (embed, heads, head_dim) or q_down (embed, q_lora) + q_norm +
q_up (q_lora, heads, head_dim); kv_down (embed, kv_lora) + kv_norm; k_rope (embed, head_dim); k_up, v_up
(kv_lora, heads, head_dim); o (heads, head_dim, embed). The up-projections neither read nor write the residual
stream: their first axis is the input (optim orients Muon by that rule); "q_lora" and "kv_lora" are
logical axis names of their own (the default rules table shards them over fsdp).

Kernel note: ``jax.nn.dot_product_attention`` needs one head size for q, k and v, so when v_head_dim differs
from nope + rope the smaller side is zero-padded (zeros change neither the scores nor the kept outputs) and
the accounting counts the attention FLOPs at the padded size, which is what the kernel executes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import RMSNorm, apply_rope, attention_positions_and_mask
from models.transformer import _dense, constrain


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    extra = size - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class MlaAttention(nn.Module):
    """Causal multi-head latent attention; ``__call__(x_BxLxD) -> y_BxLxD`` like ``Attention``.

    Extra suffixes: R kv_lora rank, Q q_lora rank, N nope dim, P rope dim, U value dim, A = N + P.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
                 kv_BxSxD: jax.Array | None = None, kv_positions_BxS: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None) -> jax.Array:
        """The optional arguments mean what they mean for ``transformer.Attention`` (Mixture-of-Recursions
        runs layers on gathered tokens): query positions, a separate (normed) source for the latent K/V and
        the rotary key, its positions, and a key-validity mask; keys are visible when kv_pos <= q_pos."""
        c = self.config
        H, D = c.n_heads, c.d_model
        R, N, P, U = (c.resolved_mla_kv_lora_rank, c.resolved_mla_nope_head_dim, c.resolved_mla_rope_head_dim,
                      c.resolved_mla_v_head_dim)
        A = N + P
        norm_dtype = c.param_jnp_dtype
        if c.mla_q_lora_rank is None:
            q_BxLxHxA = _dense(c, (H, A), ("embed",), ("heads", "head_dim"), name="q")(x_BxLxD)
        else:
            cq_BxLxQ = _dense(c, (c.mla_q_lora_rank,), ("embed",), ("q_lora",), name="q_down")(x_BxLxD)
            cq_BxLxQ = RMSNorm(c.norm_eps, "q_lora", norm_dtype, name="q_norm")(cq_BxLxQ)
            q_BxLxHxA = _dense(c, (H, A), ("q_lora",), ("heads", "head_dim"), name="q_up")(cq_BxLxQ)
        src_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
        ckv_BxSxR = _dense(c, (R,), ("embed",), ("kv_lora",), name="kv_down")(src_BxSxD)
        ckv_BxSxR = RMSNorm(c.norm_eps, "kv_lora", norm_dtype, name="kv_norm")(ckv_BxSxR)
        kr_BxSxP = _dense(c, (P,), ("embed",), ("head_dim",), name="k_rope")(src_BxSxD)
        k_nope_BxSxHxN = _dense(c, (H, N), ("kv_lora",), ("heads", "head_dim"), name="k_up")(ckv_BxSxR)
        v_BxSxHxU = _dense(c, (H, U), ("kv_lora",), ("heads", "head_dim"), name="v_up")(ckv_BxSxR)

        positions_L, kv_positions_S, mask = attention_positions_and_mask(
            x_BxLxD.shape[1], positions_BxL, kv_BxSxD, kv_positions_BxS, kv_valid_BxS)
        q_rope_BxLxHxP = apply_rope(q_BxLxHxA[..., N:], positions_L, c.rope_theta)
        kr_BxSx1xP = apply_rope(kr_BxSxP[:, :, None, :], kv_positions_S, c.rope_theta)
        B, S = src_BxSxD.shape[:2]
        q_BxLxHxA = jnp.concatenate([q_BxLxHxA[..., :N], q_rope_BxLxHxP], axis=-1)
        k_BxSxHxA = jnp.concatenate([k_nope_BxSxHxN, jnp.broadcast_to(kr_BxSx1xP, (B, S, H, P))], axis=-1)
        W = max(A, U)  # common head size for the fused kernel (see the module docstring)
        q_BxLxHxW = constrain(_pad_last(q_BxLxHxA, W), ("batch", "seq", "heads", "head_dim"))
        k_BxSxHxW = constrain(_pad_last(k_BxSxHxA, W), ("batch", "seq", "heads", "head_dim"))
        v_BxSxHxW = constrain(_pad_last(v_BxSxHxU, W), ("batch", "seq", "heads", "head_dim"))
        out_BxLxHxW = jax.nn.dot_product_attention(q_BxLxHxW, k_BxSxHxW, v_BxSxHxW, scale=A ** -0.5,
                                                   mask=mask, is_causal=mask is None,
                                                   implementation=c.attention_impl)
        out_BxLxHxU = constrain(out_BxLxHxW[..., :U], ("batch", "seq", "heads", "head_dim"))
        return _dense(c, (D,), ("heads", "head_dim"), ("embed",), name="o", output_layer=True)(out_BxLxHxU)


# ----- decoding with the latent cache ----------------------------------------------------------------------
def init_mla_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """Empty cache of one MLA layer: the latent c_kv [B, S, R] and the rotary key [B, S, P] -- all that
    decoding needs (DeepSeek-V2 section 2.1.3): (R + P) values per token, vs 2 * H * head_dim for MHA."""
    dtype = cfg.compute_jnp_dtype if dtype is None else dtype
    return {"ckv": jnp.zeros((batch, max_len, cfg.resolved_mla_kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, cfg.resolved_mla_rope_head_dim), dtype)}


def mla_decode_step(params: dict, cfg: ModelConfig, x_BxD: jax.Array, cache: dict[str, jax.Array],
                    position: jax.Array | int, kv_valid_BxS: jax.Array | None = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One new token per row at ``position`` (same for the batch; may be traced): append its latent and
    rotary key to ``cache`` and attend over positions <= ``position``. Returns (y_BxD, new cache).

    ``params``: one MlaAttention's (unboxed) parameters. Keys are never materialised: W_uk is absorbed into
    the query (q_nope_h . (c_kv W_uk_h) = (q_nope_h W_uk_h^T) . c_kv) and W_uv applied after the weighted sum
    of latents (sum_s p_s c_kv_s W_uv_h), as DeepSeek-V2 describes for inference. The k_up bias (with
    use_bias) adds q_nope_h . b_k to every score of a query, which softmax ignores; the v_up bias passes
    through the convex combination unchanged. Equals ``MlaAttention.__call__`` at that position (tested).
    ``kv_valid_BxS`` (optional) also masks out cached positions (Mixture-of-Recursions: tokens that were not
    active at this recursion step; models/decode.py). Masked scores get a large finite negative, not -inf, so
    a row with nothing visible stays finite (uniform) instead of NaN, like jax.nn.dot_product_attention.
    """
    c = cfg
    H, D = c.n_heads, c.d_model
    R, N, P = c.resolved_mla_kv_lora_rank, c.resolved_mla_nope_head_dim, c.resolved_mla_rope_head_dim
    A = N + P
    f32 = jnp.float32

    def run(module: nn.Module, x: jax.Array) -> jax.Array:  # the forward's own layers, on this token
        return module.apply({"params": params[module.name]}, x)

    x_Bx1xD = x_BxD[:, None, :]
    if c.mla_q_lora_rank is None:
        q_Bx1xHxA = run(_dense(c, (H, A), ("embed",), ("heads", "head_dim"), name="q"), x_Bx1xD)
    else:
        cq_Bx1xQ = run(_dense(c, (c.mla_q_lora_rank,), ("embed",), ("q_lora",), name="q_down"), x_Bx1xD)
        cq_Bx1xQ = run(RMSNorm(c.norm_eps, "q_lora", c.param_jnp_dtype, name="q_norm"), cq_Bx1xQ)
        q_Bx1xHxA = run(_dense(c, (H, A), ("q_lora",), ("heads", "head_dim"), name="q_up"), cq_Bx1xQ)
    ckv_Bx1xR = run(_dense(c, (R,), ("embed",), ("kv_lora",), name="kv_down"), x_Bx1xD)
    ckv_Bx1xR = run(RMSNorm(c.norm_eps, "kv_lora", c.param_jnp_dtype, name="kv_norm"), ckv_Bx1xR)
    kr_Bx1xP = run(_dense(c, (P,), ("embed",), ("head_dim",), name="k_rope"), x_Bx1xD)
    pos_1 = jnp.reshape(jnp.asarray(position, jnp.int32), (1,))
    kr_Bx1xP = apply_rope(kr_Bx1xP[:, :, None, :], pos_1, c.rope_theta)[:, :, 0, :]
    start = (0, pos_1[0], 0)
    cache = {"ckv": jax.lax.dynamic_update_slice(cache["ckv"], ckv_Bx1xR.astype(cache["ckv"].dtype), start),
             "k_rope": jax.lax.dynamic_update_slice(cache["k_rope"], kr_Bx1xP.astype(cache["k_rope"].dtype),
                                                    start)}
    q_nope_BxHxN = q_Bx1xHxA[:, 0, :, :N].astype(f32)
    q_rope_BxHxP = apply_rope(q_Bx1xHxA[..., N:], pos_1, c.rope_theta)[:, 0].astype(f32)
    w_uk_RxHxN = params["k_up"]["kernel"].astype(f32)
    w_uv_RxHxU = params["v_up"]["kernel"].astype(f32)
    ckv_BxSxR, kr_BxSxP = cache["ckv"].astype(f32), cache["k_rope"].astype(f32)
    q_lat_BxHxR = jnp.einsum("bhn,rhn->bhr", q_nope_BxHxN, w_uk_RxHxN)
    scores_BxHxS = (jnp.einsum("bhr,bsr->bhs", q_lat_BxHxR, ckv_BxSxR)
                    + jnp.einsum("bhp,bsp->bhs", q_rope_BxHxP, kr_BxSxP)) * A ** -0.5
    visible_BxS = jnp.broadcast_to(jnp.arange(ckv_BxSxR.shape[1]) <= pos_1[0], ckv_BxSxR.shape[:2])
    if kv_valid_BxS is not None:
        visible_BxS = visible_BxS & kv_valid_BxS
    scores_BxHxS = jnp.where(visible_BxS[:, None, :], scores_BxHxS, jnp.finfo(f32).min)
    probs_BxHxS = jax.nn.softmax(scores_BxHxS, axis=-1)
    lat_BxHxR = jnp.einsum("bhs,bsr->bhr", probs_BxHxS, ckv_BxSxR)
    out_BxHxU = jnp.einsum("bhr,rhu->bhu", lat_BxHxR, w_uv_RxHxU)
    if "bias" in params["v_up"]:
        out_BxHxU = out_BxHxU + params["v_up"]["bias"].astype(f32)
    o = _dense(c, (D,), ("heads", "head_dim"), ("embed",), name="o", output_layer=True)
    y_Bx1xD = run(o, out_BxHxU[:, None].astype(c.compute_jnp_dtype))
    return y_Bx1xD[:, 0], cache
