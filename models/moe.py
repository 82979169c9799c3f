"""Mixture-of-Experts SwiGLU layer: router, top-k, shared experts, dropless and capacity dispatch, balancing.

    y = sum_{i in top-k(s + b)} g_i * Expert_i(x) + SharedExperts(x),   s = softmax(x W_r) or sigmoid(x W_r)

References: Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2020 (GShard: top-2, capacity, groups,
one-hot dispatch/combine einsums); Fedus et al. 2021 (Switch Transformer: load-balance loss E*sum f_i P_i);
Zoph et al. 2022 (ST-MoE: router z-loss); Dai et al. 2024 (DeepSeekMoE: fine-grained and shared experts,
first layers dense); Liu et al. 2024 (DeepSeek-V3: sigmoid scores, auxiliary-loss-free balancing with a
selection-only bias updated outside the gradient); Gale et al. 2022 (MegaBlocks: dropless grouped matmuls).

Shape suffixes: B batch, L sequence, D d_model, E routed experts, K top-k, F expert hidden size, T = B*L
tokens, A = T*K token-expert assignments, G groups (= batch rows), S tokens per group (= L), C slots per
expert and group.

Parameters (inside the block's "mlp" module): routing/router/kernel (embed, expert) -- AdamW by optim's
"router" rule; gate/kernel, up/kernel (expert, embed, mlp) and down/kernel (expert, mlp, embed) -- Muon
orthogonalises them per expert ("expert" is a batch axis); shared/{gate,up,down}/kernel, one SwiGLU of width
n_shared * F (DeepSeekMoE's shared experts are SwiGLUs whose outputs are summed: exactly one wider SwiGLU).

Dispatch (both give the same output when nothing is dropped; a test checks it):
  "dropless"  every assignment is computed: sort the A assignments by expert, three jax.lax.ragged_dot
              grouped matmuls, unsort, weight by the gates. No token is ever dropped. (On CPU, XLA lowers
              ragged_dot to a masked dense matmul over all E groups, i.e. E times the FLOPs. TPUs have a
              grouped-GEMM kernel; on GPUs it depends on the XLA build -- some rewrite ragged dots, or their
              weight gradient, into dense matmuls too -- so the GPU bench records the lowering it got,
              hlo_checks.ragged_dot_lowering.)
  "capacity"  GShard: each group (one sequence) gives each expert C = ceil(cf * S * K / E) slots, filled in
              priority order (every token's 1st choice before any 2nd choice, then by position); assignments
              past capacity are dropped (their contribution is lost; the residual stream carries the token).
              One-hot dispatch/combine einsums, so under SPMD the expert dimension shards like any other axis.

Balancing: the Switch/GShard auxiliary loss E * sum_i f_i P_i (f_i fraction of assignments routed to expert
i, P_i mean normalised router score; 1.0 when uniform), the ST-MoE z-loss mean(logsumexp(logits)^2), and the
DeepSeek-V3 bias b_i that only affects *selection* (not the gate values). b is state, not a parameter: it
lives in the "moe_state" collection, and ``router_bias_update`` computes the next value from the step's expert
load (b_i += rate * sign(mean load - load_i)); the trainer applies it after each step.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import boxed_param
from models.transformer import Dense, _dense, _normal, constrain

STATE_COLLECTION = "moe_state"


class ExpertKernel(nn.Module):
    """A stack of per-expert kernels, (expert, in, out), stored as ``kernel`` like every other weight."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    init_std: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        return boxed_param(self, "kernel", _normal(self.init_std), self.shape, self.names, self.param_dtype)


class SharedExperts(nn.Module):
    """Always-on experts: one SwiGLU of width ``width`` (= n_shared_experts * moe_d_ff)."""

    config: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        c = self.config
        gate_BxLxF = _dense(c, (self.width,), ("embed",), ("mlp",), name="gate")(x_BxLxD)
        up_BxLxF = _dense(c, (self.width,), ("embed",), ("mlp",), name="up")(x_BxLxD)
        h_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "seq", "mlp"))
        return _dense(c, (c.d_model,), ("mlp",), ("embed",), name="down", output_layer=True)(h_BxLxF)


class Routing(nn.Module):
    """Router scores, top-k selection (optionally biased), gate weights and the balancing statistics."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        c = self.config
        E, K = c.n_experts, c.moe_top_k
        # Router in fp32 even with bf16 compute: top-k decisions flip on rounding errors otherwise.
        logits_BxLxE = Dense((E,), ("embed",), ("expert",), c.init_std, False, c.param_jnp_dtype, jnp.float32,
                             name="router")(x_BxLxD.astype(jnp.float32))
        if c.moe_router == "softmax":
            scores_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
            probs_BxLxE = scores_BxLxE
        else:  # sigmoid: independent per-expert affinities; normalised only for the balance statistic
            scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
            probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
        selection_BxLxE = scores_BxLxE
        if c.moe_bias_update_rate > 0:
            selection_BxLxE = selection_BxLxE + self._router_bias()[None, None, :]
        _, idx_BxLxK = jax.lax.top_k(jax.lax.stop_gradient(selection_BxLxE), K)
        gate_BxLxK = jnp.take_along_axis(scores_BxLxE, idx_BxLxK, axis=-1)
        if c.moe_renormalize:
            gate_BxLxK = gate_BxLxK / jnp.sum(gate_BxLxK, axis=-1, keepdims=True)
        stats = balance_statistics(logits_BxLxE, probs_BxLxE, idx_BxLxK, E)
        return idx_BxLxK, gate_BxLxK, stats

    def _router_bias(self) -> jax.Array:
        E = self.config.n_experts
        if not self.is_initializing() and not self.has_variable(STATE_COLLECTION, "router_bias"):
            raise ValueError(
                f"moe_bias_update_rate > 0 keeps a router bias in the {STATE_COLLECTION!r} collection: "
                f"apply the model with {{'params': ..., {STATE_COLLECTION!r}: ...}} (from model.init), and "
                "update it with models.moe.router_bias_update after each step"
            )
        bias = self.variable(STATE_COLLECTION, "router_bias",
                             lambda: nn.Partitioned(jnp.zeros((E,), jnp.float32), names=("expert",)))
        return jax.lax.stop_gradient(bias.value.astype(jnp.float32))


def balance_statistics(logits_BxLxE: jax.Array, probs_BxLxE: jax.Array, idx_BxLxK: jax.Array,
                       n_experts: int) -> dict[str, jax.Array]:
    """Switch/GShard load-balance loss, ST-MoE z-loss and the expert load, over all tokens of the batch.

    aux = E * sum_i f_i * P_i with f_i = (# assignments to i) / (T * K) and P_i = mean_t p_{t,i} (Fedus et al.
    2021, eq. 4, generalised to top-k as in GShard/DeepSeek: f sums to 1, so aux = 1 for uniform routing).
    f is piecewise constant, so the gradient flows through P only -- as in the papers.
    """
    K = idx_BxLxK.shape[-1]
    counts_E = jnp.sum(jax.nn.one_hot(idx_BxLxK, n_experts, dtype=jnp.float32), axis=(0, 1, 2))
    load_E = counts_E / (idx_BxLxK.shape[0] * idx_BxLxK.shape[1] * K)
    mean_prob_E = jnp.mean(probs_BxLxE, axis=(0, 1))
    aux = n_experts * jnp.sum(load_E * mean_prob_E)
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1)))
    return {"aux": aux, "z": z, "load": load_E}


def swiglu_experts(x_NxD: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array,
                   group_sizes_E: jax.Array) -> jax.Array:
    """SwiGLU of each row with its expert's weights; rows sorted by expert, ``group_sizes_E`` rows each."""
    gate_NxF = jax.lax.ragged_dot(x_NxD, w_gate_ExDxF, group_sizes_E)
    up_NxF = jax.lax.ragged_dot(x_NxD, w_up_ExDxF, group_sizes_E)
    return jax.lax.ragged_dot(nn.silu(gate_NxF) * up_NxF, w_down_ExFxD, group_sizes_E)


def dropless_dispatch(x_TxD: jax.Array, idx_TxK: jax.Array, gate_TxK: jax.Array,
                      weights: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """Sort assignments by expert, grouped matmuls (ragged_dot), unsort, gate-weighted sum over K picks."""
    T, K = idx_TxK.shape
    E = weights[0].shape[0]
    expert_A = idx_TxK.reshape(T * K)
    order_A = jnp.argsort(expert_A, stable=True)  # stable: deterministic order inside each expert's group
    token_A = order_A // K
    group_sizes_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)
    y_sorted_AxD = swiglu_experts(x_TxD[token_A], *weights, group_sizes_E)
    y_AxD = jnp.zeros_like(y_sorted_AxD).at[order_A].set(y_sorted_AxD, unique_indices=True)
    return jnp.einsum("tkd,tk->td", y_AxD.reshape(T, K, -1), gate_TxK.astype(y_AxD.dtype))


def expert_capacity(tokens_per_group: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """GShard/Switch capacity: slots per expert per group, ceil(cf * S * K / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / n_experts))


def capacity_dispatch(x_GxSxD: jax.Array, idx_GxSxK: jax.Array, gate_GxSxK: jax.Array,
                      weights: tuple[jax.Array, jax.Array, jax.Array],
                      capacity: int) -> tuple[jax.Array, jax.Array]:
    """GShard one-hot dispatch/combine with a fixed capacity per expert and group; returns (y, dropped
    fraction of the assignments).

    Priority: slots are filled with all tokens' first choices (in sequence order), then all second choices,
    and so on, so a token's top choice is the last thing dropped (Lepikhin et al. 2020, Algorithm 1).
    """
    G, S, K = idx_GxSxK.shape
    w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = weights
    E = w_gate_ExDxF.shape[0]
    mask_GxKSxE = jax.nn.one_hot(idx_GxSxK.transpose(0, 2, 1).reshape(G, K * S), E, dtype=jnp.int32)
    position_GxKSxE = jnp.cumsum(mask_GxKSxE, axis=1) - 1  # slot index inside the expert's buffer
    kept_GxKSxE = mask_GxKSxE * (position_GxKSxE < capacity)
    slot_GxKSxExC = jax.nn.one_hot(position_GxKSxE, capacity, dtype=x_GxSxD.dtype) * kept_GxKSxE[..., None]
    slot_GxSxKxExC = slot_GxKSxExC.reshape(G, K, S, E, capacity).transpose(0, 2, 1, 3, 4)
    dispatch_GxSxExC = jnp.sum(slot_GxSxKxExC, axis=2)  # top-k experts are distinct: entries stay 0/1
    combine_GxSxExC = jnp.einsum("gskec,gsk->gsec", slot_GxSxKxExC, gate_GxSxK.astype(x_GxSxD.dtype))
    x_GxExCxD = jnp.einsum("gsec,gsd->gecd", dispatch_GxSxExC, x_GxSxD)
    gate_GxExCxF = jnp.einsum("gecd,edf->gecf", x_GxExCxD, w_gate_ExDxF)
    up_GxExCxF = jnp.einsum("gecd,edf->gecf", x_GxExCxD, w_up_ExDxF)
    y_GxExCxD = jnp.einsum("gecf,efd->gecd", nn.silu(gate_GxExCxF) * up_GxExCxF, w_down_ExFxD)
    y_GxSxD = jnp.einsum("gsec,gecd->gsd", combine_GxSxExC, y_GxExCxD)
    n_dropped = G * S * K - jnp.sum(kept_GxKSxE)  # integer count: exactly 0 when nothing is dropped
    return y_GxSxD, n_dropped.astype(jnp.float32) / (G * S * K)


class MoeMlp(nn.Module):
    """Routed (+ shared) SwiGLU experts. ``__call__(x_BxLxD) -> (y_BxLxD, stats)``; stats: aux, z, load
    (fraction of assignments per expert, sums to 1), dropped (fraction of assignments dropped)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.config
        B, L, D = x_BxLxD.shape
        E, K, F = c.n_experts, c.moe_top_k, c.resolved_moe_d_ff
        idx_BxLxK, gate_BxLxK, stats = Routing(c, name="routing")(x_BxLxD)
        out_std = c.init_std / (2 * c.n_layers) ** 0.5  # GPT-2 residual-write init, as in the dense MLP
        pd, cd = c.param_jnp_dtype, c.compute_jnp_dtype
        weights = (
            ExpertKernel((E, D, F), ("expert", "embed", "mlp"), c.init_std, pd, name="gate")(),
            ExpertKernel((E, D, F), ("expert", "embed", "mlp"), c.init_std, pd, name="up")(),
            ExpertKernel((E, F, D), ("expert", "mlp", "embed"), out_std, pd, name="down")(),
        )
        weights = tuple(w.astype(cd) for w in weights)
        x_BxLxD = x_BxLxD.astype(cd)
        if c.moe_dispatch == "dropless":
            y_TxD = dropless_dispatch(x_BxLxD.reshape(B * L, D), idx_BxLxK.reshape(B * L, K),
                                      gate_BxLxK.reshape(B * L, K), weights)
            y_BxLxD = y_TxD.reshape(B, L, D)
            stats["dropped"] = jnp.zeros((), jnp.float32)
        else:  # one group per sequence: groups stay on the device that holds the sequence
            capacity = expert_capacity(L, K, E, c.moe_capacity_factor)
            y_BxLxD, stats["dropped"] = capacity_dispatch(x_BxLxD, idx_BxLxK, gate_BxLxK, weights, capacity)
        if c.n_shared_experts:
            y_BxLxD = y_BxLxD + SharedExperts(c, c.n_shared_experts * F, name="shared")(x_BxLxD)
        return constrain(y_BxLxD.astype(cd), ("batch", "seq", "embed")), stats


def moe_extras(cfg: ModelConfig, layer_stats: list[Any]) -> dict[str, jax.Array]:
    """Per-layer MoE statistics -> the model's ``extras``.

    ``layer_stats``: the MoE blocks' stats in layer order, either one dict with a leading layer axis (a
    scanned stack) or one dict per layer (unrolled); ``None`` entries (dense layers) are skipped.
    Keys ending in "loss" are already weighted and are added to the training objective by the trainer:
      moe_aux_loss  aux_weight * sum over MoE layers of the load-balance loss
      moe_z_loss    z_weight * sum over MoE layers of the router z-loss
    Metrics: moe_load_balance (mean unweighted aux, 1.0 = balanced), moe_router_z (mean unweighted z),
    moe_expert_load [n_moe_layers, n_experts] (fraction of assignments per expert), moe_max_violation (mean
    over layers of max_i load_i * E - 1, DeepSeek-V3's MaxVio), moe_dropped_fraction (mean over layers).
    """
    stats = [s for s in layer_stats if s is not None]
    if not stats:
        return {}
    if stats[0]["load"].ndim == 1:  # unrolled: one dict per layer
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    else:
        stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
    load_NxE = stacked["load"]
    return {
        "moe_aux_loss": cfg.moe_aux_loss_weight * jnp.sum(stacked["aux"]),
        "moe_z_loss": cfg.moe_z_loss_weight * jnp.sum(stacked["z"]),
        "moe_load_balance": jnp.mean(stacked["aux"]),
        "moe_router_z": jnp.mean(stacked["z"]),
        "moe_expert_load": load_NxE,
        "moe_max_violation": jnp.mean(jnp.max(load_NxE, axis=-1) * cfg.n_experts - 1.0),
        "moe_dropped_fraction": jnp.mean(stacked["dropped"]),
    }


def router_bias_update(moe_state: Any, expert_load_NxE: jax.Array, rate: float) -> Any:
    """DeepSeek-V3 auxiliary-loss-free balancing: b_i <- b_i + rate * sign(mean_j load_j - load_i) per layer.

    ``moe_state``: the model's "moe_state" collection (plain arrays; boxed leaves are unboxed); with scanned
    layers it holds blocks/mlp/routing/router_bias [n_moe_layers, E], unrolled blocks_<i>/.../router_bias [E].
    ``expert_load_NxE``: ``extras["moe_expert_load"]`` (average it over microbatches / data-parallel replicas
    first, so every replica applies the same update). Pure function: returns the new collection.
    """
    moe_state = nn.meta.unbox(moe_state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(moe_state)
    load_NxE = jnp.asarray(expert_load_NxE, jnp.float32)
    step_NxE = rate * jnp.sign(jnp.mean(load_NxE, axis=-1, keepdims=True) - load_NxE)
    if len(flat) == 1 and flat[0][1].ndim == 2:  # scanned stack
        (_, bias_NxE), = flat
        if bias_NxE.shape != step_NxE.shape:
            raise ValueError(f"router bias {bias_NxE.shape} and expert load {step_NxE.shape} disagree")
        return jax.tree.unflatten(treedef, [bias_NxE + step_NxE.astype(bias_NxE.dtype)])

    def layer_index(path) -> int:
        for k in path:
            m = re.fullmatch(r"blocks_(\d+)", str(getattr(k, "key", "")))
            if m:
                return int(m.group(1))
        raise ValueError(f"cannot tell the layer of moe_state entry {jax.tree_util.keystr(path)}")

    order = sorted(range(len(flat)), key=lambda i: layer_index(flat[i][0]))
    if len(order) != step_NxE.shape[0]:
        raise ValueError(f"{len(order)} router biases but expert load for {step_NxE.shape[0]} layers")
    leaves = [leaf for _, leaf in flat]
    for j, i in enumerate(order):
        leaves[i] = leaves[i] + step_NxE[j].astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)
