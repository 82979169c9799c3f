"""Dense pre-norm decoder-only Transformer (LLaMA-style), written in flax linen.

    tokens_BxL -> embed -> n_layers x [x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] -> RMSNorm -> lm_head

References: Vaswani et al. 2017 (Transformer); Radford et al. 2019 (GPT-2: pre-norm, scaled residual init);
Zhang & Sennrich 2019 (RMSNorm); Su et al. 2021 (RoPE); Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (GQA);
Dehghani et al. 2023 / Wortsman et al. 2023 (QK-norm); Touvron et al. 2023 (LLaMA, the overall recipe).

Shape suffixes: B batch, L sequence, D d_model, H query heads, G kv heads, K head_dim, F d_ff, V vocab.
Every parameter carries logical axis names and the main activations are constrained with logical names; the
mapping to a device mesh lives in the trainer, never here.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import RMSNorm, apply_rope, attention_positions_and_mask, boxed_param, check_tokens

constrain = nn.with_logical_constraint


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """y = x . W (+ b), contracting the last len(in_names) axes of x with the leading axes of W.

    Kernels are stored as (input axes..., output axes...), e.g. q: (embed, heads, head_dim), so the
    optimiser and the sharding rules see the head structure.
    """

    out_shape: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    init_std: float
    use_bias: bool
    param_dtype: Any
    dtype: Any
    out_dtype: Any = None  # e.g. fp32 for the LM head: accumulate bf16 products in fp32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_names)
        shape = tuple(x.shape[-n_in:]) + tuple(self.out_shape)
        kernel = boxed_param(self, "kernel", _normal(self.init_std), shape, self.in_names + self.out_names,
                             self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in,
                          preferred_element_type=self.out_dtype)
        if self.use_bias:
            bias = boxed_param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_names,
                               self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _dense(c: ModelConfig, out_shape, in_names, out_names, *, name: str, output_layer: bool = False) -> Dense:
    # GPT-2 init: layers that write into the residual stream get std / sqrt(2 * n_layers), so the residual
    # variance does not grow with depth (two residual writes per layer).
    std = c.init_std / (2 * c.n_layers) ** 0.5 if output_layer else c.init_std
    return Dense(tuple(out_shape), tuple(in_names), tuple(out_names), std, c.use_bias, c.param_jnp_dtype,
                 c.compute_jnp_dtype, name=name)


class Attention(nn.Module):
    """Causal multi-head attention with grouped K/V heads (GQA), RoPE and optional QK-norm."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
                 kv_BxSxD: jax.Array | None = None, kv_positions_BxS: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None) -> jax.Array:
        """Plain causal self-attention by default. The optional arguments serve Mixture-of-Recursions
        (models/mor.py), which runs a layer on a gathered subset of tokens: ``positions_BxL`` are their
        original positions (sorted ascending, so causal-by-index is causal-by-position); ``kv_BxSxD`` (already
        normed) supplies the keys/values instead of x (recursive KV sharing), at ``kv_positions_BxS``
        (default arange(S)); ``kv_valid_BxS`` masks out keys. Keys are visible when kv_pos <= q_pos."""
        c = self.config
        H, G, K, D = c.n_heads, c.resolved_n_kv_heads, c.resolved_head_dim, c.d_model
        src_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
        q_BxLxHxK = _dense(c, (H, K), ("embed",), ("heads", "head_dim"), name="q")(x_BxLxD)
        k_BxLxGxK = _dense(c, (G, K), ("embed",), ("kv_heads", "head_dim"), name="k")(src_BxSxD)
        v_BxLxGxK = _dense(c, (G, K), ("embed",), ("kv_heads", "head_dim"), name="v")(src_BxSxD)
        if c.qk_norm:  # normalise each head's query/key vector before RoPE; bounds the attention logits
            q_BxLxHxK = RMSNorm(c.norm_eps, "head_dim", c.param_jnp_dtype, name="q_norm")(q_BxLxHxK)
            k_BxLxGxK = RMSNorm(c.norm_eps, "head_dim", c.param_jnp_dtype, name="k_norm")(k_BxLxGxK)
        positions_L, kv_positions_S, mask = attention_positions_and_mask(
            x_BxLxD.shape[1], positions_BxL, kv_BxSxD, kv_positions_BxS, kv_valid_BxS)
        q_BxLxHxK = constrain(apply_rope(q_BxLxHxK, positions_L, c.rope_theta),
                              ("batch", "seq", "heads", "head_dim"))
        k_BxLxGxK = constrain(apply_rope(k_BxLxGxK, kv_positions_S, c.rope_theta),
                              ("batch", "seq", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "seq", "kv_heads", "head_dim"))
        # Scale 1/sqrt(K) is the default; GQA is handled natively (G must divide H).
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask,
                                                   is_causal=mask is None, implementation=c.attention_impl)
        out_BxLxHxK = constrain(out_BxLxHxK, ("batch", "seq", "heads", "head_dim"))
        return _dense(c, (D,), ("heads", "head_dim"), ("embed",), name="o", output_layer=True)(out_BxLxHxK)


class Mlp(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        c = self.config
        F, D = c.resolved_d_ff, c.d_model
        gate_BxLxF = _dense(c, (F,), ("embed",), ("mlp",), name="gate")(x_BxLxD)
        up_BxLxF = _dense(c, (F,), ("embed",), ("mlp",), name="up")(x_BxLxD)
        h_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "seq", "mlp"))
        return _dense(c, (D,), ("mlp",), ("embed",), name="down", output_layer=True)(h_BxLxF)


def attention_class(c: ModelConfig) -> type[nn.Module]:
    """The attention module for ``c.attention``: ``Attention`` ("mha") or ``mla.MlaAttention`` ("mla")."""
    if c.attention == "mla":
        from models.mla import MlaAttention  # lazy: models.mla builds on this module

        return MlaAttention
    return Attention


class Block(nn.Module):
    """One pre-norm layer. Signature (carry, unused) -> (carry, stats) so it can be the body of nn.scan.

    ``moe=True`` swaps the SwiGLU MLP for the routed experts of models/moe.py; stats is then that layer's
    routing statistics dict (else None)."""

    config: ModelConfig
    moe: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, _: Any = None, **attn_kwargs: Any) -> tuple[jax.Array, Any]:
        """``attn_kwargs`` (positions_BxL, kv_BxSxD (un-normed), kv_positions_BxS, kv_valid_BxS) are only
        passed by Mixture-of-Recursions (models/mor.py); see ``Attention``."""
        c = self.config
        norm = functools.partial(RMSNorm, c.norm_eps, "embed", c.param_jnp_dtype)
        attn_norm = norm(name="attn_norm")
        if attn_kwargs.get("kv_BxSxD") is not None:  # shared K/V come from the same norm's view of kv
            attn_kwargs = {**attn_kwargs, "kv_BxSxD": attn_norm(attn_kwargs["kv_BxSxD"])}
        x_BxLxD = x_BxLxD + attention_class(c)(c, name="attn")(attn_norm(x_BxLxD), **attn_kwargs)
        stats = None
        if self.moe:
            from models.moe import MoeMlp  # lazy: models.moe builds on this module

            y_BxLxD, stats = MoeMlp(c, name="mlp")(norm(name="mlp_norm")(x_BxLxD))
        else:
            y_BxLxD = Mlp(c, name="mlp")(norm(name="mlp_norm")(x_BxLxD))
        return constrain(x_BxLxD + y_BxLxD, ("batch", "seq", "embed")), stats


def _remat_policy(name: str):
    if name in ("full", "nothing_saveable"):
        return jax.checkpoint_policies.nothing_saveable
    return getattr(jax.checkpoint_policies, name)


def _block_stack(c: ModelConfig):
    """Either one nn.scan-ned Block (params get a leading "layers" axis) or a list of Blocks.

    MoE with scan: "blocks" holds the n_layers - moe_first_dense_layers MoE layers; the dense first layers are
    a second scanned stack, ``_dense_prefix_stack`` (a scan body must be the same module every step).
    Unrolled, blocks_<i> is an MoE block when ``c.is_moe_layer(i)``.
    """
    block_cls = Block
    if c.remat != "none":
        # prevent_cse only matters outside scan (scan already stops XLA from CSE-ing the recomputation away).
        block_cls = nn.remat(Block, policy=_remat_policy(c.remat), prevent_cse=not c.scan_layers)
    if c.scan_layers:
        n_dense = c.moe_first_dense_layers if c.family == "moe" else 0
        return _scan(block_cls, c, c.n_layers - n_dense, c.family == "moe", "blocks")
    return [block_cls(c, c.is_moe_layer(i), name=f"blocks_{i}") for i in range(c.n_layers)]


def _scan(block_cls, c: ModelConfig, n_layers: int, moe: bool, name: str):
    # "moe_state" (the aux-loss-free router bias, models/moe.py) is stacked per layer like the params.
    scanned = nn.scan(block_cls, variable_axes={"params": 0, "moe_state": 0}, split_rngs={"params": True},
                      length=n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(c, moe, name=name)


def _dense_prefix_stack(c: ModelConfig):
    """The scanned dense first layers of an MoE model ("dense_blocks"), or None."""
    if not (c.scan_layers and c.family == "moe" and c.moe_first_dense_layers):
        return None
    block_cls = Block
    if c.remat != "none":
        block_cls = nn.remat(Block, policy=_remat_policy(c.remat), prevent_cse=False)
    return _scan(block_cls, c, c.moe_first_dense_layers, False, "dense_blocks")


class Embed(nn.Module):
    """Token embedding table (vocab, embed); ``attend`` reuses it as a tied output head."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = boxed_param(self, "embedding", _normal(c.init_std), (c.vocab_size, c.d_model),
                                     ("vocab", "embed"), c.param_jnp_dtype)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        # Gather whole rows: un-shard the table's embed axis first (as FSDP does for every weight before use),
        # else XLA must turn an embed-sharded gather result into a batch-sharded one and falls back to
        # replicating it ("involuntary full rematerialization").
        table_VxD = constrain(self.embedding, ("vocab", None))
        return jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.config.compute_jnp_dtype)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        table_VxD = self.embedding.astype(self.config.compute_jnp_dtype)
        return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """Decoder-only LM. ``apply(variables, tokens_BxL) -> (logits_BxLxV fp32, extras)``.

    ``apply(variables, tokens_BxL, return_hidden=True) -> (hidden_BxLxD, extras)`` returns the final-normed
    hidden states instead (for a chunked cross-entropy); ``apply(variables, hidden,
    method="logits_from_hidden")`` then maps any slice of them to logits. ``extras`` is an empty dict for the
    dense family (MoE puts its auxiliary losses here).
    """

    config: ModelConfig

    def setup(self):
        c = self.config.validate()
        if c.family == "mor":  # a recursive model has a different module tree; never train it as dense
            raise ValueError("family='mor' is built by models.build_model (models.mor.MoRTransformer), "
                             "not Transformer")
        self.embed = Embed(c)
        self.blocks = _block_stack(c)
        self.dense_blocks = _dense_prefix_stack(c)
        self.final_norm = RMSNorm(c.norm_eps, "embed", c.param_jnp_dtype)
        if not c.tie_embeddings:
            # The head has no bias even with use_bias (as in GPT-2/LLaMA).
            self.lm_head = Dense((c.vocab_size,), ("embed",), ("vocab",), c.init_std, False,
                                 c.param_jnp_dtype, c.compute_jnp_dtype, out_dtype=jnp.float32)

    def __call__(self, tokens_BxL: jax.Array, *, return_hidden: bool = False) -> tuple[jax.Array, dict]:
        c = self.config
        check_tokens(tokens_BxL, c.max_seq_len)
        x_BxLxD = constrain(self.embed(tokens_BxL), ("batch", "seq", "embed"))
        layer_stats = []  # per-layer routing statistics of MoE blocks (None for dense blocks)
        if c.scan_layers:
            if self.dense_blocks is not None:
                x_BxLxD, _ = self.dense_blocks(x_BxLxD, None)
            x_BxLxD, stats = self.blocks(x_BxLxD, None)
            layer_stats.append(stats)
        else:
            for block in self.blocks:
                x_BxLxD, stats = block(x_BxLxD, None)
                layer_stats.append(stats)
        h_BxLxD = self.final_norm(x_BxLxD)
        extras: dict[str, jax.Array] = {}
        if c.family == "moe":
            from models.moe import moe_extras  # lazy: models.moe builds on this module

            extras = moe_extras(c, layer_stats)
        if return_hidden:
            return h_BxLxD, extras
        return self.logits_from_hidden(h_BxLxD), extras

    def logits_from_hidden(self, h_BxLxD: jax.Array) -> jax.Array:
        """Final-normed hidden states -> fp32 logits (the head matmul accumulates in fp32)."""
        if self.config.tie_embeddings:
            logits_BxLxV = self.embed.attend(h_BxLxD)
        else:
            logits_BxLxV = self.lm_head(h_BxLxD)
        return constrain(logits_BxLxV, ("batch", "seq", "vocab"))
