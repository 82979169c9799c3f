"""KV-cache decoding for every family (dense, MoE, MoR) and both attention kinds (MHA/GQA, MLA).

    cache = init_cache(cfg, batch, max_len)
    logits_BxV, cache = decode_step(cfg, variables, cache, tokens_B, pos)  # jit(partial(decode_step, cfg))
    logits_BxLxV = decode_logits(cfg, variables, tokens_BxL)                # prefill by decoding, lax.scan

One new token per sequence at position ``pos`` (the same for the batch, may be traced): each layer appends
the token's keys/values to its cache and attends over the cached positions <= pos. The layers are the
forward's own flax modules applied to one token (``module.apply`` on the layer's parameter subtree), so the
decoder cannot drift from the model; tests/test_decode.py checks decode == forward logits for every family.

Cache contents (``cache["kv"]``; ``kv_cache_bytes`` counts exactly these arrays):
  * MHA/GQA  rotated keys and values, [B, S, G, K] each per layer (Pope et al. 2022, "Efficiently Scaling
    Transformer Inference").
  * MLA      only the compressed latent c_kv [B, S, R] and the shared rotary key [B, S, P] per layer
    (DeepSeek-V2 section 2.1.3); decoding uses the absorbed form, ``models.mla.mla_decode_step``.
  * MoE      as dense; the routed MLP runs on the decoded tokens with the *dropless* dispatch. Routing is
    per token (causal) either way, but capacity dispatch drops assignments depending on the whole batch
    and sequence, so decoding equals the dropless forward, and equals a capacity-dispatch forward only when
    nothing was dropped. The aux-loss-free router bias is read from ``variables["moe_state"]``.
  * MoR      (Bae et al. 2025, section 2.3) one cache per unique first/last layer and, for
    "recursion_wise" caching, one per (recursion step, layer of the block) plus ``cache["active"]`` [N_r, B,
    S] (which tokens were active at each step: a token attends at step r only to tokens active at step r);
    for recursive KV sharing ("shared") only the first recursion's caches, which later steps read. The
    caches are allocated for all S positions at every step (static shapes), so the allocated bytes are an
    upper bound of the *expected* bytes ``models.accounting.kv_cache_bytes_per_token`` reports (which count
    only the active tokens' entries, what a compacting cache would hold); they agree at capacity 1 and for
    "shared". Routing at decode time: expert choice uses the router's own causal decision (logit >= 0; the
    forward's ``causal_routing=True`` mode, models/mor.py); token choice decides a depth per token and fills
    step r's k_r = floor(capacity_r * S) slots in position order exactly like the training forward on S
    tokens (counters in ``cache["routed"]`` [N_r, B]), S being the cache length -- so ``decode_logits``
    equals the training forward. Inactive tokens still run the step's layers (their update is masked out):
    a batched decode step has static shapes; but a step at which no row is active is skipped
    (``skip_exited``), so at batch 1 an exited token costs nothing more.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig, mor_resolved
from models.layers import RMSNorm, apply_rope
from models.mla import init_mla_cache, mla_decode_step
from models.moe import STATE_COLLECTION as MOE_STATE
from models.moe import MoeMlp
from models.mor import STATE_COLLECTION as MOR_STATE
from models.mor import MoRTransformer, Router
from models.mor_accounting import mor_layout, step_token_counts
from models.transformer import Embed, Mlp, Transformer, _dense

Cache = dict[str, Any]


# ----- cache ------------------------------------------------------------------------------------------------
def _layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> dict[str, jax.Array]:
    if cfg.attention == "mla":
        return init_mla_cache(cfg, batch, max_len, dtype)
    shape = (batch, max_len, cfg.resolved_n_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _layer_groups(cfg: ModelConfig) -> list[tuple[str, int | None, bool]]:
    """Transformer layers in application order: (params key, stacked layer count or None, is MoE)."""
    if cfg.scan_layers:
        n_dense = cfg.moe_first_dense_layers if cfg.family == "moe" else 0
        groups = [("dense_blocks", n_dense, False)] if n_dense else []
        return groups + [("blocks", cfg.n_layers - n_dense, cfg.family == "moe")]
    return [(f"blocks_{i}", None, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty decode cache for ``batch`` sequences of up to ``max_len`` tokens (dtype: compute dtype)."""
    cfg.validate()
    for name, v in (("batch", batch), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len} (the forward refuses "
                         "longer sequences too)")
    dtype = cfg.compute_jnp_dtype if dtype is None else jnp.dtype(dtype)
    one = functools.partial(_layer_cache, cfg, batch, max_len, dtype)
    if cfg.family != "mor":
        kv = {}
        for name, n, _ in _layer_groups(cfg):
            kv[name] = one() if n is None else jax.tree.map(lambda a, n=n: jnp.zeros((n,) + a.shape, a.dtype),
                                                             one())
        return {"kv": kv}
    lay = mor_layout(cfg)
    kv = {}
    if lay["n_first_last"]:
        kv["first_layer"], kv["last_layer"] = one(), one()
    n_cached_steps = 1 if cfg.mor_kv_strategy == "shared" else cfg.mor_recursions
    kv["steps"] = [[one() for _ in range(lay["block"])] for _ in range(n_cached_steps)]
    cache: Cache = {"kv": kv}
    if cfg.mor_kv_strategy == "recursion_wise" and cfg.mor_router != "none":
        cache["active"] = jnp.zeros((cfg.mor_recursions, batch, max_len), bool)
    if cfg.mor_router == "token_choice":
        cache["routed"] = jnp.zeros((cfg.mor_recursions, batch), jnp.int32)
    return cache


def _cache_len(cfg: ModelConfig, cache: Cache) -> int:
    """The ``max_len`` ``cache`` was made with: axis 1 of a layer's K/V (axis 2 when layers are stacked)."""
    kv = cache["kv"]
    if cfg.family == "mor":
        return int(jax.tree.leaves(kv["steps"])[0].shape[1])
    name, n_stacked, _ = _layer_groups(cfg)[0]
    return int(jax.tree.leaves(kv[name])[0].shape[1 if n_stacked is None else 2])


def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> int:
    """Bytes of the K/V arrays ``init_cache`` allocates (``cache["kv"]``; MoR's small routing bookkeeping,
    ``active``/``routed``, is not K/V and not counted). Computed from the cache pytree's shapes."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes["kv"])))


# ----- one layer on one token -------------------------------------------------------------------------------
def _attention_decode(cfg: ModelConfig, p: dict, h_BxD: jax.Array, kv: dict, pos: jax.Array,
                      valid_BxS: jax.Array | None = None, write: bool = True) -> tuple[jax.Array, dict]:
    """Attention of the token at ``pos`` over the cached positions <= pos (and ``valid_BxS``); with
    ``write`` its keys/values are stored at ``pos`` first (MoR's shared-KV steps only read)."""
    if cfg.attention == "mla":
        if not write:
            raise ValueError("read-only (shared) caches are MHA-only, as mor_kv_strategy='shared' is")
        return mla_decode_step(p, cfg, h_BxD, kv, pos, kv_valid_BxS=valid_BxS)
    c = cfg
    H, G, K, D = c.n_heads, c.resolved_n_kv_heads, c.resolved_head_dim, c.d_model

    def run(module: nn.Module, x: jax.Array) -> jax.Array:  # the forward's own layer, on this token
        return module.apply({"params": p[module.name]}, x)

    x_Bx1xD = h_BxD[:, None, :]
    pos_1 = jnp.reshape(jnp.asarray(pos, jnp.int32), (1,))
    q_Bx1xHxK = run(_dense(c, (H, K), ("embed",), ("heads", "head_dim"), name="q"), x_Bx1xD)
    if c.qk_norm:
        q_Bx1xHxK = run(RMSNorm(c.norm_eps, "head_dim", c.param_jnp_dtype, name="q_norm"), q_Bx1xHxK)
    q_Bx1xHxK = apply_rope(q_Bx1xHxK, pos_1, c.rope_theta)
    if write:
        k_Bx1xGxK = run(_dense(c, (G, K), ("embed",), ("kv_heads", "head_dim"), name="k"), x_Bx1xD)
        v_Bx1xGxK = run(_dense(c, (G, K), ("embed",), ("kv_heads", "head_dim"), name="v"), x_Bx1xD)
        if c.qk_norm:
            k_Bx1xGxK = run(RMSNorm(c.norm_eps, "head_dim", c.param_jnp_dtype, name="k_norm"), k_Bx1xGxK)
        k_Bx1xGxK = apply_rope(k_Bx1xGxK, pos_1, c.rope_theta)
        start = (0, pos_1[0], 0, 0)
        kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k_Bx1xGxK.astype(kv["k"].dtype), start),
              "v": jax.lax.dynamic_update_slice(kv["v"], v_Bx1xGxK.astype(kv["v"].dtype), start)}
    B, S = kv["k"].shape[:2]
    mask_BxS = jnp.broadcast_to(jnp.arange(S) <= pos_1[0], (B, S))
    if valid_BxS is not None:
        mask_BxS = mask_BxS & valid_BxS
    # The XLA kernel masks with a large finite negative: a row that sees nothing (an inactive MoR token)
    # stays finite, so no NaN can reach the cache. cuDNN's fused kernel targets long queries, not decode.
    dtype = q_Bx1xHxK.dtype
    out_Bx1xHxK = jax.nn.dot_product_attention(q_Bx1xHxK, kv["k"].astype(dtype), kv["v"].astype(dtype),
                                               mask=mask_BxS[:, None, None, :], implementation="xla")
    o = _dense(c, (D,), ("heads", "head_dim"), ("embed",), name="o", output_layer=True)
    y_Bx1xD = run(o, out_Bx1xHxK)
    return y_Bx1xD[:, 0], kv


def _block_decode(cfg: ModelConfig, p: dict, moe_state: dict, x_BxD: jax.Array, kv: dict, pos: jax.Array, *,
                  moe: bool = False, valid_BxS: jax.Array | None = None,
                  write: bool = True) -> tuple[jax.Array, dict]:
    """``transformer.Block`` on one token per row: x += Attn(norm(x)); x += Mlp(norm(x))."""
    norm = RMSNorm(cfg.norm_eps, "embed", cfg.param_jnp_dtype)
    a_BxD, kv = _attention_decode(cfg, p["attn"], norm.apply({"params": p["attn_norm"]}, x_BxD), kv, pos,
                                  valid_BxS, write)
    x_BxD = x_BxD + a_BxD
    h_Bx1xD = norm.apply({"params": p["mlp_norm"]}, x_BxD)[:, None, :]
    if moe:  # dropless: each token's output depends on that token only (see the module docstring)
        variables = {"params": p["mlp"]}
        if moe_state:
            variables[MOE_STATE] = moe_state["mlp"]
        y_Bx1xD, _ = MoeMlp(cfg.replace(moe_dispatch="dropless")).apply(variables, h_Bx1xD)
    else:
        y_Bx1xD = Mlp(cfg).apply({"params": p["mlp"]}, h_Bx1xD)
    return x_BxD + y_Bx1xD[:, 0], kv


# ----- whole models -----------------------------------------------------------------------------------------
def _embed(cfg: ModelConfig, params: dict, tokens_B: jax.Array) -> jax.Array:
    return Embed(cfg).apply({"params": params["embed"]}, tokens_B[:, None])[:, 0]


def _head(cfg: ModelConfig, model: nn.Module, params: dict, x_BxD: jax.Array) -> jax.Array:
    h_BxD = RMSNorm(cfg.norm_eps, "embed", cfg.param_jnp_dtype).apply({"params": params["final_norm"]}, x_BxD)
    return model.apply({"params": params}, h_BxD[:, None, :], method="logits_from_hidden")[:, 0]


def _transformer_step(cfg, params, state, cache, tokens_B, pos):
    x_BxD = _embed(cfg, params, tokens_B)
    kv = dict(cache["kv"])
    moe_state = state.get(MOE_STATE, {})
    for name, n, moe in _layer_groups(cfg):
        layer_state = moe_state.get(name, {}) if moe else {}
        if n is None:
            x_BxD, kv[name] = _block_decode(cfg, params[name], layer_state, x_BxD, kv[name], pos, moe=moe)
        else:  # a scanned stack: scan over its layers (params, router-bias state and cache share axis 0)
            def body(x, xs, moe=moe):
                p, s, layer_kv = xs
                return _block_decode(cfg, p, s, x, layer_kv, pos, moe=moe)

            x_BxD, kv[name] = jax.lax.scan(body, x_BxD, (params[name], layer_state, kv[name]))
    return _head(cfg, Transformer(cfg), params, x_BxD), {**cache, "kv": kv}


def _mor_step(cfg, params, state, cache, tokens_B, pos, skip_exited=True):
    c = cfg
    lay, res = mor_layout(c), mor_resolved(c)
    kv = dict(cache["kv"])
    steps = [list(s) for s in kv["steps"]]
    new = dict(cache)
    S = jax.tree.leaves(kv)[0].shape[1]
    shared_kv = c.mor_kv_strategy == "shared"
    x_BxD = _embed(c, params, tokens_B)
    B = x_BxD.shape[0]
    if lay["n_first_last"]:
        x_BxD, kv["first_layer"] = _block_decode(c, params["first_layer"], {}, x_BxD, kv["first_layer"], pos)
    router = Router(c)
    alive_B = jnp.ones((B,), bool)
    if c.mor_router == "token_choice":  # depth decided once, from the state after the first layer
        logit_BxR = router.apply({"params": params["router"]}, x_BxD[:, None, :])[:, 0]
        if res["activation"] == "softmax":
            prob_BxR = jax.nn.softmax(logit_BxR, axis=-1)
        else:
            prob_BxR = jax.nn.sigmoid(logit_BxR)
        selection_BxR = prob_BxR
        if res["aux_loss"] == "loss_free":
            if MOR_STATE not in state:
                raise ValueError(f"mor_aux_loss='loss_free' needs variables[{MOR_STATE!r}] (from model.init)")
            bias_R = jax.lax.stop_gradient(state[MOR_STATE]["router_bias"]["router_bias"].astype(jnp.float32))
            selection_BxR = prob_BxR + bias_R
        depth_B = jnp.argmax(selection_BxR, axis=-1)
        gate_B = c.mor_router_scale * jnp.take_along_axis(prob_BxR, depth_B[:, None], -1)[:, 0]
        k_steps = step_token_counts(c, S)  # the forward's slot budget for a sequence of S tokens
        routed_RxB = cache["routed"]
    elif c.mor_router == "none":
        gate_B = None  # looped: every token runs every step
    for r in range(c.mor_recursions):
        if c.mor_router == "expert_choice":
            logit_B = router.apply({"params": params["router"]}, x_BxD[:, None, :], column=r)[:, 0]
            act_B = jax.nn.sigmoid(logit_B) if res["activation"] == "sigmoid" else jnp.tanh(logit_B)
            gate_B = c.mor_router_scale * act_B
            if res["capacity"][r] < 1:
                alive_B = alive_B & (logit_B >= 0)
        elif c.mor_router == "token_choice":
            want_B = alive_B & (depth_B >= r)
            alive_B = want_B & (routed_RxB[r] < k_steps[r])  # slots go to the earliest tokens that want them
            routed_RxB = routed_RxB.at[r].add(want_B.astype(jnp.int32))
        valid_BxS = None
        if "active" in new:
            new["active"] = new["active"].at[r, :, pos].set(alive_B)
            valid_BxS = new["active"][r]
        def run_step(x_BxD, caches, r=r, valid_BxS=valid_BxS, gate_B=gate_B, alive_B=alive_B):
            caches = list(caches)
            h_BxD = x_BxD
            for j, idx in enumerate(lay["schedule"][r]):
                p = params[f"shared_{idx}"]
                if shared_kv and r > 0:  # queries of this step, keys/values of the first recursion
                    h_BxD, _ = _block_decode(c, p, {}, h_BxD, steps[0][j], pos, write=False)
                else:
                    h_BxD, caches[j] = _block_decode(c, p, {}, h_BxD, caches[j], pos, valid_BxS=valid_BxS)
            if c.mor_router == "none":
                return h_BxD, caches
            # h <- h + g * f(h) for the active tokens (models/mor.py)
            upd_BxD = h_BxD * gate_B[:, None].astype(h_BxD.dtype)
            return x_BxD + jnp.where(alive_B[:, None], upd_BxD, 0).astype(x_BxD.dtype), caches

        # (with recursive KV sharing the first step writes the K/V every later step reads: never skipped)
        may_exit = c.mor_router != "none" and not (shared_kv and r == 0) and (
            r > 0 or c.mor_router == "token_choice" or res["capacity"][r] < 1)
        own = r < len(steps)  # recursive KV sharing keeps only the first recursion's caches
        caches = steps[r] if own else []
        if skip_exited and may_exit:
            # No row active at this step: its layers would change nothing (the update is masked and the K/V
            # written at ``pos`` is marked inactive, so no later query reads it). Skip them -- at batch 1
            # that is every exited token, so decode runs the FLOPs the routing saves.
            x_BxD, caches = jax.lax.cond(jnp.any(alive_B), run_step, lambda x, cs: (x, list(cs)),
                                         x_BxD, caches)
        else:
            x_BxD, caches = run_step(x_BxD, caches)
        if own:
            steps[r] = caches
    if c.mor_router == "token_choice":
        new["routed"] = routed_RxB
    if lay["n_first_last"]:
        x_BxD, kv["last_layer"] = _block_decode(c, params["last_layer"], {}, x_BxD, kv["last_layer"], pos)
    kv["steps"] = steps
    new["kv"] = kv
    return _head(c, MoRTransformer(c), params, x_BxD), new


def decode_step(cfg: ModelConfig, variables: dict, cache: Cache, tokens_B: jax.Array,
                pos: jax.Array | int, *, skip_exited: bool = True) -> tuple[jax.Array, Cache]:
    """Logits [B, V] (fp32) of one new token per sequence at position ``pos``, and the updated cache.

    ``variables``: ``model.init``'s result or ``{"params": params, **model_state}`` (boxed or not); the
    model state holds MoE's / MoR's router biases. Jit it with the config static:
    ``jax.jit(functools.partial(decode_step, cfg))``. ``pos`` must be in [0, cache length): a concrete
    ``pos`` outside is a ValueError; a traced one cannot be checked (dynamic_update_slice would clamp it and
    overwrite the last slot). ``skip_exited`` (MoR): skip a recursion step's layers
    when no row of the batch is active at it (``jax.lax.cond``); False runs them masked, as the batched
    forward does. The results are the same.
    """
    if tokens_B.ndim != 1 or not jnp.issubdtype(tokens_B.dtype, jnp.integer):
        raise ValueError(f"tokens_B must be an integer array [batch]; got "
                         f"{tokens_B.dtype}{list(tokens_B.shape)}")
    if "kv" not in cache:
        raise ValueError("cache must come from models.decode.init_cache")
    variables = nn.meta.unbox(variables)
    if "params" not in variables:
        raise ValueError("variables must be {'params': ..., **model_state} (what model.init returns)")
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    if not isinstance(pos, jax.core.Tracer):
        n = _cache_len(cfg, cache)
        if not 0 <= int(pos) < n:
            raise ValueError(f"pos={int(pos)} is outside the cache's positions [0, {n}) (init_cache max_len)")
    pos = jnp.asarray(pos, jnp.int32)
    if cfg.family == "mor":
        return _mor_step(cfg, params, state, cache, tokens_B, pos, skip_exited)
    return _transformer_step(cfg, params, state, cache, tokens_B, pos)


def decode_logits(cfg: ModelConfig, variables: dict, tokens_BxL: jax.Array) -> jax.Array:
    """Logits [B, L, V] of every position, by decoding the tokens one at a time (``jax.lax.scan`` over
    ``decode_step`` with a cache of length L). Equals the full forward (MoR expert choice: its
    ``causal_routing=True`` mode; MoE: the dropless dispatch)."""
    if tokens_BxL.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq]; got shape {list(tokens_BxL.shape)}")
    B, L = tokens_BxL.shape
    cache = init_cache(cfg, B, L)

    def body(cache, xs):
        tokens_B, pos = xs
        logits_BxV, cache = decode_step(cfg, variables, cache, tokens_B, pos)
        return cache, logits_BxV

    _, logits_LxBxV = jax.lax.scan(body, cache, (tokens_BxL.T, jnp.arange(L, dtype=jnp.int32)))
    return jnp.transpose(logits_LxBxV, (1, 0, 2))
