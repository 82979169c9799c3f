"""Chunked (fused) softmax cross-entropy over a large vocabulary: never holds fp32 logits for the whole batch.

    loss = mean_{b,l} [ logsumexp_v(h_bl . w_v) - h_bl . w_{t_bl} ]

The plain path materialises logits_BxLxV in fp32 (and, for autodiff, their softmax and gradient): at
GPT-2 shapes (B*L = 16k tokens, V = 50304) that is 3.3 GB per buffer, more than the whole model. Here the
tokens are processed in chunks along the sequence axis; each chunk's logits are computed from compute-dtype
(e.g. bf16) operands with fp32 accumulation, reduced to a per-token logsumexp and target logit, and dropped.
A custom VJP recomputes each chunk's logits in the backward pass and forms
d logits = softmax - onehot(target) there, so the backward pass never holds all logits either; only the
per-token logsumexp (B*L fp32) is saved. The head gradient is accumulated over chunks in fp32.

This is the recipe of fused linear + cross-entropy kernels (Wijmans et al. 2024, "Cut Your Losses in
Large-Vocabulary Language Models", arXiv:2411.09009; Hsu et al. 2024, Liger Kernel, arXiv:2410.10989),
written with jax.lax.scan instead of a hand-written kernel.

Chunks run along the sequence axis and hold every batch row, so the data-parallel (batch) sharding of h is
kept inside each chunk and the scan never iterates over a sharded axis. A chunk covers
``max(1, chunk_tokens // B)`` positions; a sequence length that is not a multiple of it is padded and the pad
positions are masked out of the loss and its gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# GPT-2 vocabulary: 4096 x 50304 fp32 logits = 0.8 GB per chunk (3.3 GB for a 16 x 1024 batch).
DEFAULT_CHUNK_TOKENS = 4096


def chunk_positions(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """Sequence positions per chunk: ``chunk_tokens // batch`` (at least 1, at most ``seq_len``)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer")
    return min(seq_len, max(1, chunk_tokens // batch))


def _logits(h_BxCxD: jax.Array, w: jax.Array, vocab_first: bool) -> jax.Array:
    # Compute-dtype operands, fp32 accumulation (as the model's own head does).
    spec = "bcd,vd->bcv" if vocab_first else "bcd,dv->bcv"
    return jnp.einsum(spec, h_BxCxD, w, preferred_element_type=jnp.float32)


def _chunks(x_BxL: jax.Array, n: int, C: int) -> jax.Array:
    """[B, n*C, ...] -> [n, B, C, ...] (the scan axis first)."""
    B = x_BxL.shape[0]
    x = x_BxL.reshape((B, n, C) + x_BxL.shape[2:])
    return jnp.moveaxis(x, 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ce_sum(h_BxPxD, w, targets_BxP, C: int, vocab_first: bool):
    return _ce_fwd(h_BxPxD, w, targets_BxP, C, vocab_first)[0]


def _ce_fwd(h_BxPxD, w, targets_BxP, C, vocab_first):
    """Sum over valid tokens of (lse - target logit). Targets < 0 mark padding."""
    B, P, _ = h_BxPxD.shape
    n = P // C
    w_c = w.astype(h_BxPxD.dtype)

    def body(total, xs):
        h_BxCxD, t_BxC = xs
        logits_BxCxV = _logits(h_BxCxD, w_c, vocab_first)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        tgt_BxC = jnp.take_along_axis(logits_BxCxV, jnp.maximum(t_BxC, 0)[..., None], axis=-1)[..., 0]
        total = total + jnp.sum(jnp.where(t_BxC >= 0, lse_BxC - tgt_BxC, 0.0))
        return total, lse_BxC

    xs = (_chunks(h_BxPxD, n, C), _chunks(targets_BxP, n, C))
    total, lse_nxBxC = jax.lax.scan(body, jnp.float32(0.0), xs)
    return total, (h_BxPxD, w, targets_BxP, lse_nxBxC)


def _ce_bwd(C, vocab_first, res, g):
    h_BxPxD, w, targets_BxP, lse_nxBxC = res
    B, P, D = h_BxPxD.shape
    n = P // C
    w_c = w.astype(h_BxPxD.dtype)

    def body(dw_acc, xs):
        h_BxCxD, t_BxC, lse_BxC = xs
        logits_BxCxV = _logits(h_BxCxD, w_c, vocab_first)
        p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
        onehot_BxCxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2) == t_BxC[..., None]
        scale_BxC = jnp.where(t_BxC >= 0, g, 0.0).astype(jnp.float32)
        # The gradient matmuls take compute-dtype operands, like every other backward matmul in the model.
        dlogits_BxCxV = ((p_BxCxV - onehot_BxCxV) * scale_BxC[..., None]).astype(h_BxCxD.dtype)
        if vocab_first:  # w: [V, D]
            dh_BxCxD = jnp.einsum("bcv,vd->bcd", dlogits_BxCxV, w_c, preferred_element_type=jnp.float32)
            dw = jnp.einsum("bcv,bcd->vd", dlogits_BxCxV, h_BxCxD, preferred_element_type=jnp.float32)
        else:  # w: [D, V]
            dh_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, w_c, preferred_element_type=jnp.float32)
            dw = jnp.einsum("bcd,bcv->dv", h_BxCxD, dlogits_BxCxV, preferred_element_type=jnp.float32)
        return dw_acc + dw, dh_BxCxD.astype(h_BxCxD.dtype)

    xs = (_chunks(h_BxPxD, n, C), _chunks(targets_BxP, n, C), lse_nxBxC)
    dw, dh_nxBxCxD = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    dh_BxPxD = jnp.moveaxis(dh_nxBxCxD, 0, 1).reshape(B, P, D)
    dtargets = np.zeros(targets_BxP.shape, dtype=jax.dtypes.float0)  # integer input: no gradient
    return dh_BxPxD, dw.astype(w.dtype), dtargets


_ce_sum.defvjp(_ce_fwd, _ce_bwd)


def chunked_cross_entropy(
    h_BxLxD: jax.Array,
    targets_BxL: jax.Array,
    *,
    kernel_DxV: jax.Array | None = None,
    table_VxD: jax.Array | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> jax.Array:
    """Mean next-token cross-entropy (nats, fp32) of the logits ``h . head`` without materialising them.

    ``h_BxLxD``: final-normed hidden states in the compute dtype (the head is cast to it). Give exactly one
    head: ``kernel_DxV`` (an untied ``lm_head`` kernel) or ``table_VxD`` (the tied embedding table).
    ``chunk_tokens``: tokens per chunk (rounded down to whole positions of all B rows; see
    ``chunk_positions``). Equal to ``optax.softmax_cross_entropy_with_integer_labels`` on the full logits,
    up to fp32 summation order; the gradient w.r.t. h and the head is exact in the same sense.
    """
    if (kernel_DxV is None) == (table_VxD is None):
        raise ValueError("chunked_cross_entropy needs exactly one output head: kernel_DxV (untied lm_head) "
                         "or table_VxD (tied embedding table)")
    vocab_first = table_VxD is not None
    w = table_VxD if vocab_first else kernel_DxV
    if h_BxLxD.ndim != 3 or targets_BxL.shape != h_BxLxD.shape[:2]:
        raise ValueError(f"expected h [B, L, D] and targets [B, L]; got h {list(h_BxLxD.shape)}, targets "
                         f"{list(targets_BxL.shape)}")
    D = h_BxLxD.shape[-1]
    if w.ndim != 2 or w.shape[1 if vocab_first else 0] != D:
        what = "table_VxD" if vocab_first else "kernel_DxV"
        raise ValueError(f"{what} has shape {list(w.shape)}; expected its d_model axis to be {D} "
                         "(the last axis of h)")
    B, L, _ = h_BxLxD.shape
    C = chunk_positions(B, L, chunk_tokens)
    P = C * math.ceil(L / C)
    targets_BxL = targets_BxL.astype(jnp.int32)
    if P != L:  # pad to whole chunks; target -1 marks a pad position (no loss, no gradient)
        h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, P - L), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, P - L)), constant_values=-1)
    return _ce_sum(h_BxLxD, w, targets_BxL, C, vocab_first) / (B * L)


def output_head(params: Any, tie_embeddings: bool) -> dict[str, jax.Array]:
    """The head argument of ``chunked_cross_entropy`` from a (boxed or unboxed) Transformer / MoRTransformer
    param tree: ``{"table_VxD": params["embed"]["embedding"]}`` when tied, else ``{"kernel_DxV":
    params["lm_head"]["kernel"]}`` (the parameter-naming contract of models/transformer.py)."""
    try:
        if tie_embeddings:
            return {"table_VxD": nn.meta.unbox(params["embed"]["embedding"])}
        return {"kernel_DxV": nn.meta.unbox(params["lm_head"]["kernel"])}
    except (KeyError, TypeError) as e:
        want = "embed/embedding" if tie_embeddings else "lm_head/kernel"
        raise ValueError(f"parameter tree has no output head at {want} "
                         f"(tie_embeddings={tie_embeddings})") from e
