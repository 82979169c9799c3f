"""Mixture-of-Recursions (Bae et al. 2025, "Mixture-of-Recursions: Learning Dynamic Recursive Depths for
Adaptive Token-Level Computation", arXiv:2507.10524; official code:
github.com/raymin0223/mixture_of_recursions).

A recursive Transformer: a block of B shared layers is applied N_r times (``ModelConfig.n_layers`` is the full
depth n_fl + N_r * B), and a router decides per token how many recursion steps it takes.

Parameter sharing (``mor_sharing``; Bae et al. 2025 Section 2.1, after Bae et al. 2024 "Relaxed Recursive
Transformers"): "cycle" applies shared layers (0..B-1) at every step; "sequence" applies each shared layer N_r
times in a row (the token's depth cuts that stack after (r + 1) * B applications); the "middle_" variants add
a unique first and last layer that every token goes through. See ``mor_accounting.mor_layout``.

Routers (``mor_router``):
  * "expert_choice" (paper Section 2.2.1, its default): at step r a linear router scores the tokens that are
    still active, g = alpha * sigmoid(theta_r . h) (alpha = ``mor_router_scale``, 0.1), and keeps the top
    k_r = floor(capacity_r * T) of them, capacity_r = (N_r - r) / N_r. Hierarchical: step r chooses among the
    tokens step r - 1 kept. Kept tokens update h <- h + g * f(h) (the paper's equation and the official code's
    scatter-add of the weighted block output), the others keep h. The top-k runs over the whole sequence in
    training, so a token's selection depends on *future* tokens: it is not causal. As in the paper, an
    auxiliary BCE loss (``mor_aux_loss="bce"``, weight 0.001) trains the router logit to predict membership of
    the top-k, so at decoding time a token continues iff sigmoid(logit) >= 0.5 -- a causal per-token threshold
    (the "mor_router_accuracy" metric measures how well that threshold reproduces the top-k). The forward's
    inference mode ``apply(..., causal_routing=True)`` routes with that threshold, and the KV-cache decoder
    (models/decode.py) reproduces it exactly.
  * "token_choice" (Section 2.2.2): one router, softmax over the N_r depths of h after the first layer, top-1
    gives each token its depth up front (causal by construction); gate g = alpha * p(depth). A Switch-style
    balancing loss (weight 0.1) spreads tokens over depths, or (``mor_aux_loss="loss_free"``) a DeepSeek-V3
    bias added to the probabilities for the *selection* only, kept in the "mor_state" collection and stepped
    by ``router_bias_update`` from ``extras["mor_depth_load"]`` after each training step. For static shapes
    step r has a buffer of k_r = floor(capacity_r * T) slots, filled by the tokens still routed to it in
    position order (earlier tokens first, which keeps it causal); overflow tokens stop there
    ("mor_dropped_fraction"). With capacity 1.0 at every step it is dropless (exited tokens then occupy
    masked slots).
  * "none": the vanilla looped/recursive Transformer -- every token, every step, h <- f(h).
  The dense baseline with equal unique parameters is ``equal_unique_params_dense(cfg)``.

KV strategies (``mor_kv_strategy``, Section 2.3): "recursion_wise" -- at step r a token attends only to the
tokens active at step r (the gathered subset, causally, at their original RoPE positions); "shared" -- at
steps r > 0 the active tokens' queries attend to the first recursion's keys/values of every token (needs a
cycle sharing, so the weights are the same, and capacity_0 = 1).

Compute: the selected k_r tokens are gathered into a [B, k_r, D] tensor, the shared layers run on it, and the
result is scattered back, so exited tokens cost no FLOPs (k_r is static). ``extras`` carries the weighted
auxiliary losses (keys ending in "loss": the trainer adds them to the loss) and metrics, among them
"mor_flops_per_token": forward FLOPs per token from the actual routing (models/mor_accounting.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig, mor_resolved
from models.layers import RMSNorm, boxed_param, check_tokens
from models.mor_accounting import mor_layout, routed_forward_flops, step_token_counts
from models.transformer import Block, Dense, Embed, _remat_policy

constrain = nn.with_logical_constraint
STATE_COLLECTION = "mor_state"


def equal_unique_params_dense(cfg: ModelConfig) -> ModelConfig:
    """The dense baseline with the same unique parameters as a MoR config (one layer per unique MoR layer)."""
    return cfg.replace(family="dense", n_layers=mor_layout(cfg.validate())["unique"])


class Router(nn.Module):
    """Linear router, kernel (embed, N_r): column r scores step r (expert choice) / depth r (token choice)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, column: int | None = None) -> jax.Array:
        c = self.config
        kernel_DxR = boxed_param(self, "kernel", nn.initializers.normal(c.init_std),
                                 (c.d_model, c.mor_recursions), ("embed", None), c.param_jnp_dtype)
        if column is not None:  # only the column this step needs: 2D FLOPs per token, not 2D * N_r
            kernel_DxR = kernel_DxR[:, column]
        # Router logits in fp32: the top-k and the BCE target are sensitive to rounding.
        return jnp.einsum("bnd,d...->bn...", x_BxNxD.astype(jnp.float32), kernel_DxR.astype(jnp.float32))


class RouterBias(nn.Module):
    """Token choice's loss-free balancing bias b [N_r] (state, not a parameter: no gradient reaches it)."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        if not self.is_initializing() and not self.has_variable(STATE_COLLECTION, "router_bias"):
            raise ValueError(
                f"mor_aux_loss='loss_free' keeps a router bias in the {STATE_COLLECTION!r} collection: "
                f"apply the model with {{'params': ..., {STATE_COLLECTION!r}: ...}} (from model.init) and "
                "update it with models.mor.router_bias_update after each step")
        bias = self.variable(STATE_COLLECTION, "router_bias",
                             lambda: nn.Partitioned(jnp.zeros((self.config.mor_recursions,), jnp.float32),
                                                    names=(None,)))
        return jax.lax.stop_gradient(bias.value.astype(jnp.float32))


def router_bias_update(mor_state, depth_load_R: jax.Array, rate: float):
    """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-AI 2024) over recursion depths:
    b_i <- b_i + rate * sign(mean load - load_i). ``depth_load_R``: ``extras["mor_depth_load"]`` (average it
    over microbatches/replicas first). Pure: returns the new "mor_state" collection."""
    state = nn.meta.unbox(mor_state)
    load_R = jnp.asarray(depth_load_R, jnp.float32)
    bias_R = state["router_bias"]["router_bias"]
    new = bias_R + (rate * jnp.sign(jnp.mean(load_R) - load_R)).astype(bias_R.dtype)
    return {"router_bias": {"router_bias": new}}


def _take(x_BxLx, idx_BxK):
    """Rows idx of every batch element: [B, L, ...] x [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x_BxLx, idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxLx.ndim - 2)), axis=1)


def _scatter_add(x_BxLxD, idx_BxK, upd_BxKxD):
    b_Bx1 = jnp.arange(x_BxLxD.shape[0])[:, None]
    return x_BxLxD.at[b_Bx1, idx_BxK].add(upd_BxKxD.astype(x_BxLxD.dtype))


class MoRTransformer(nn.Module):
    """``apply(variables, tokens_BxL) -> (logits_BxLxV fp32, extras)``, same API as ``Transformer``."""

    config: ModelConfig

    def setup(self):
        c = self.config.validate()
        if c.family != "mor":
            raise ValueError(f"MoRTransformer needs family='mor', got {c.family!r}")
        lay = mor_layout(c)
        block_cls = Block
        if c.remat != "none":
            block_cls = nn.remat(Block, policy=_remat_policy(c.remat), prevent_cse=True)
        self.embed = Embed(c)
        # Unique layers are unstacked modules (not nn.scan): they are applied in a routed, data-dependent
        # schedule on gathered token subsets of a different size at each step.
        self.shared = [block_cls(c) for _ in range(lay["block"])]
        if lay["n_first_last"]:
            self.first_layer = block_cls(c)
            self.last_layer = block_cls(c)
        if c.mor_router != "none":
            self.router = Router(c)
        if c.mor_router == "token_choice" and mor_resolved(c)["aux_loss"] == "loss_free":
            self.router_bias = RouterBias(c)
        self.final_norm = RMSNorm(c.norm_eps, "embed", c.param_jnp_dtype)
        if not c.tie_embeddings:
            self.lm_head = Dense((c.vocab_size,), ("embed",), ("vocab",), c.init_std, False,
                                 c.param_jnp_dtype, c.compute_jnp_dtype, out_dtype=jnp.float32)

    def _run_step(self, r, x_BxKxD, positions_BxK, kv_valid_BxK, kv_inputs):
        """Apply step r's layers to the gathered tokens. With shared KV, step 0 records each layer's input
        (all T tokens in order) and later steps take that layer's K/V from it."""
        c = self.config
        for j, shared_idx in enumerate(mor_layout(c)["schedule"][r]):
            kwargs = {}
            if positions_BxK is not None:
                kwargs["positions_BxL"] = positions_BxK
            if c.mor_kv_strategy == "shared":
                if r == 0:
                    kv_inputs.append(x_BxKxD)
                else:
                    kwargs["kv_BxSxD"] = kv_inputs[j]
            elif kv_valid_BxK is not None:
                kwargs["kv_valid_BxS"] = kv_valid_BxK
            x_BxKxD, _ = self.shared[shared_idx](x_BxKxD, None, **kwargs)
        return x_BxKxD

    def __call__(self, tokens_BxL: jax.Array, *, return_hidden: bool = False,
                 causal_routing: bool = False) -> tuple[jax.Array, dict]:
        """``causal_routing=True`` is the inference routing mode (``_expert_choice_causal``): expert choice
        then keeps a token at step r iff its own router logit is >= 0 (sigmoid >= 0.5, the decision the BCE
        loss trains), so no token's path depends on later tokens and KV-cache decoding (models/decode.py)
        reproduces this forward exactly. Token choice and "none" are causal already: the flag changes nothing.
        """
        c = self.config
        check_tokens(tokens_BxL, c.max_seq_len)
        Bsz, L = tokens_BxL.shape
        n_r = c.mor_recursions
        res = mor_resolved(c)
        k_steps = step_token_counts(c, L)
        x_BxLxD = constrain(self.embed(tokens_BxL), ("batch", "seq", "embed"))
        if mor_layout(c)["n_first_last"]:
            x_BxLxD, _ = self.first_layer(x_BxLxD, None)
        extras: dict[str, jax.Array] = {}
        kv_inputs: list[jax.Array] = []
        counts = []  # tokens per sequence processed at each step: [B] float
        pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (Bsz, L))

        if c.mor_router == "none":
            for r in range(n_r):
                x_BxLxD = self._run_step(r, x_BxLxD, None, None, kv_inputs)
                counts.append(jnp.full((Bsz,), L, jnp.float32))
        elif c.mor_router == "expert_choice" and causal_routing:
            x_BxLxD, counts = self._expert_choice_causal(x_BxLxD, pos_BxL, res, kv_inputs)
        elif c.mor_router == "expert_choice":
            x_BxLxD, counts = self._expert_choice(x_BxLxD, pos_BxL, k_steps, res, kv_inputs, extras)
        else:
            x_BxLxD, counts = self._token_choice(x_BxLxD, pos_BxL, k_steps, res, kv_inputs, extras)

        if mor_layout(c)["n_first_last"]:
            x_BxLxD, _ = self.last_layer(x_BxLxD, None)
        for r, n_B in enumerate(counts):
            extras[f"mor_step{r}_fraction"] = jnp.mean(n_B) / L
        flops = routed_forward_flops(c, L, counts)
        extras["mor_mean_depth"] = jnp.mean(flops["expected_depth"])
        extras["mor_flops_per_token"] = jnp.mean(flops["forward"])
        h_BxLxD = self.final_norm(x_BxLxD)
        if return_hidden:
            return h_BxLxD, extras
        return self.logits_from_hidden(h_BxLxD), extras

    def _expert_choice(self, x_BxLxD, pos_BxL, k_steps, res, kv_inputs, extras):
        c = self.config
        Bsz, L, _ = x_BxLxD.shape
        cand_BxC = pos_BxL  # candidates: every token at step 0, then the previous step's selection
        bce_terms, acc_terms, counts = [], [], []
        for r, k in enumerate(k_steps):
            logit_BxC = self.router(_take(x_BxLxD, cand_BxC), column=r)
            act = jax.nn.sigmoid(logit_BxC) if res["activation"] == "sigmoid" else jnp.tanh(logit_BxC)
            gate_BxC = c.mor_router_scale * act
            _, sel_BxK = jax.lax.top_k(gate_BxC, k)
            sel_BxK = jnp.sort(sel_BxK, axis=-1)  # keep causal (position) order inside the gathered subset
            idx_BxK = _take(cand_BxC, sel_BxK)
            target_BxC = jnp.sum(jax.nn.one_hot(sel_BxK, cand_BxC.shape[1], dtype=jnp.float32), axis=1)
            # BCE-with-logits on the raw logit (the official code does this for sigmoid and tanh alike).
            bce_terms.append(jnp.mean(jnp.logaddexp(0.0, logit_BxC) - logit_BxC * target_BxC))
            acc_terms.append(jnp.mean(((logit_BxC >= 0) == (target_BxC > 0)).astype(jnp.float32)))
            gate_BxK = _take(gate_BxC, sel_BxK)
            out_BxKxD = self._run_step(r, _take(x_BxLxD, idx_BxK), idx_BxK, None, kv_inputs)
            x_BxLxD = _scatter_add(x_BxLxD, idx_BxK, out_BxKxD * gate_BxK[..., None].astype(out_BxKxD.dtype))
            x_BxLxD = constrain(x_BxLxD, ("batch", "seq", "embed"))
            cand_BxC = idx_BxK
            counts.append(jnp.full((Bsz,), k, jnp.float32))
        bce = sum(bce_terms)
        extras["mor_router_bce"] = bce
        extras["mor_router_accuracy"] = sum(acc_terms) / len(acc_terms)
        if res["aux_loss"] == "bce":
            extras["mor_router_aux_loss"] = c.mor_aux_loss_weight * bce
        return x_BxLxD, counts

    def _expert_choice_causal(self, x_BxLxD, pos_BxL, res, kv_inputs):
        """Expert choice at inference (official MoR: the router's own per-token decision): at step r a token
        still active continues iff theta_r . h >= 0, i.e. sigmoid >= 0.5 (tanh >= 0), the threshold the BCE
        auxiliary loss trains against the top-k; steps with capacity 1 keep every active token, as the top-k
        does (recursive KV sharing relies on step 0 seeing all tokens). The number of tokens per step is data
        dependent, so every step runs on all L tokens with a mask (attention keys: the tokens active at that
        step, recursion-wise) -- exited tokens are not skipped here; decoding skips nothing either."""
        c = self.config
        active_BxL = jnp.ones(pos_BxL.shape, bool)
        counts = []
        for r in range(c.mor_recursions):
            logit_BxL = self.router(x_BxLxD, column=r)
            act = jax.nn.sigmoid(logit_BxL) if res["activation"] == "sigmoid" else jnp.tanh(logit_BxL)
            if res["capacity"][r] < 1:
                active_BxL = active_BxL & (logit_BxL >= 0)
            out_BxLxD = self._run_step(r, x_BxLxD, pos_BxL, active_BxL, kv_inputs)
            # where, not a product: rows of inactive tokens are never used (and may attend to nothing)
            upd_BxLxD = out_BxLxD * (c.mor_router_scale * act)[..., None].astype(out_BxLxD.dtype)
            x_BxLxD = x_BxLxD + jnp.where(active_BxL[..., None], upd_BxLxD, 0).astype(x_BxLxD.dtype)
            x_BxLxD = constrain(x_BxLxD, ("batch", "seq", "embed"))
            counts.append(jnp.sum(active_BxL, axis=-1).astype(jnp.float32))
        return x_BxLxD, counts

    def _token_choice(self, x_BxLxD, pos_BxL, k_steps, res, kv_inputs, extras):
        c = self.config
        Bsz, L, _ = x_BxLxD.shape
        n_r = c.mor_recursions
        logit_BxLxR = self.router(x_BxLxD)
        if res["activation"] == "softmax":
            prob_BxLxR = jax.nn.softmax(logit_BxLxR, axis=-1)
        else:
            prob_BxLxR = jax.nn.sigmoid(logit_BxLxR)
        selection_BxLxR = prob_BxLxR
        if res["aux_loss"] == "loss_free":  # the bias steers the choice only, never the gate value
            selection_BxLxR = prob_BxLxR + self.router_bias()
        depth_BxL = jnp.argmax(jax.lax.stop_gradient(selection_BxLxR), axis=-1)  # top-1: steps 0..depth
        gate_BxL = c.mor_router_scale * jnp.take_along_axis(prob_BxLxR, depth_BxL[..., None], -1)[..., 0]
        # Switch-Transformer balance (Fedus et al. 2022): N_r * sum_i f_i * P_i, with f_i the fraction of
        # tokens routed to depth i and P_i their mean (normalised) router probability; 1 when balanced.
        f_R = jnp.mean(jax.nn.one_hot(depth_BxL, n_r, dtype=jnp.float32), axis=(0, 1))
        p_R = jnp.mean(prob_BxLxR / jnp.sum(prob_BxLxR, -1, keepdims=True), axis=(0, 1))
        balance = n_r * jnp.sum(f_R * p_R)
        extras["mor_balance"] = balance
        extras["mor_depth_load"] = f_R
        if res["aux_loss"] == "balance":
            extras["mor_balance_loss"] = c.mor_balance_loss_weight * balance
        alive_BxL = jnp.ones((Bsz, L), bool)
        counts, dropped = [], 0.0
        for r, k in enumerate(k_steps):
            want_BxL = alive_BxL & (depth_BxL >= r)
            # Fill the k slots with wanted tokens in position order, then (masked) unwanted ones.
            key_BxL = jnp.where(want_BxL, pos_BxL, pos_BxL + L)
            _, idx_BxK = jax.lax.top_k(-key_BxL, k)
            idx_BxK = jnp.sort(idx_BxK, axis=-1)
            valid_BxK = _take(want_BxL, idx_BxK)
            out_BxKxD = self._run_step(r, _take(x_BxLxD, idx_BxK), idx_BxK, valid_BxK, kv_inputs)
            w_BxK = _take(gate_BxL, idx_BxK) * valid_BxK
            x_BxLxD = _scatter_add(x_BxLxD, idx_BxK, out_BxKxD * w_BxK[..., None].astype(out_BxKxD.dtype))
            x_BxLxD = constrain(x_BxLxD, ("batch", "seq", "embed"))
            processed_BxL = jnp.zeros((Bsz, L), bool).at[jnp.arange(Bsz)[:, None], idx_BxK].set(valid_BxK)
            dropped = dropped + jnp.sum(want_BxL & ~processed_BxL)
            alive_BxL = processed_BxL
            counts.append(jnp.sum(valid_BxK, axis=-1).astype(jnp.float32))
        extras["mor_dropped_fraction"] = dropped / (Bsz * L)
        return x_BxLxD, counts

    def logits_from_hidden(self, h_BxLxD: jax.Array) -> jax.Array:
        if self.config.tie_embeddings:
            logits_BxLxV = self.embed.attend(h_BxLxD)
        else:
            logits_BxLxV = self.lm_head(h_BxLxD)
        return constrain(logits_BxLxV, ("batch", "seq", "vocab"))
