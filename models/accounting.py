"""Exact, analytic parameter and FLOP accounting for ``ModelConfig`` (no tracing, no jax).

Notation: D = d_model, H = n_heads, G = n_kv_heads, K = head_dim, F = d_ff, V = vocab_size, n = n_layers,
T = sequence length. One FLOP is one scalar add or multiply, so multiplying an (M x P) by a (P x Q) matrix
costs 2*M*P*Q FLOPs (the convention of Kaplan et al. 2020, Hoffmann et al. 2022 and XLA's cost analysis).

Parameters (exact; a test checks them against the flax parameter tree):
    per layer   attention   D*H*K (q) + 2*D*G*K (k, v) + H*K*D (o)  [+ H*K + 2*G*K + D biases]
                            [+ 2*K qk-norm scales]
                mlp         3*D*F (gate, up, down)                    [+ 2*F + D biases]
                norms       2*D
    final norm  D
    embedding   V*D token table, plus V*D for an untied lm_head ("embedding" counts both, as Kaplan et al. do)

FLOPs per token (model FLOPs, as used for MFU; Chowdhery et al. 2022, "PaLM", Appendix B):
    matmul_forward    = 2 * (n * (2*D*H*K + 2*D*G*K + 3*D*F) + D*V)
        every weight matrix does one multiply-add per token, including the output head (also when tied: the
        lookup is free, the projection to V logits is not); the embedding gather costs nothing.
    attention_forward = n * 4 * T_eff * H * K
        Q.K^T (2*T_eff*K per head) and softmax(.).V (2*T_eff*K per head): the sequence-length term.
    training          = 3 * forward: the backward pass does two matmuls per forward matmul (gradients w.r.t.
        the input and w.r.t. the weight; for attention dS = dO.V^T, dV = P^T.dO, dQ = dS.K, dK = dS^T.Q).

Causal-mask convention (``attention=``):
    "full"   (default) T_eff = T. A dense attention (XLA's implementation, or any kernel that does not skip
             masked blocks) computes the whole T x T score matrix and then masks it, so these FLOPs are
             executed and XLA's cost analysis counts them; PaLM's 6N + 12*n*H*K*T MFU formula agrees.
    "causal" T_eff = (T + 1) / 2, the mean number of keys a query may see (query i sees i + 1 keys): the
             FLOPs that are *necessary*; block-sparse flash kernels get close to them.
Mixture-of-Experts (models/moe.py) and latent attention (models/mla.py): param_counts adds "active" (what
one token uses: router + top-k routed + shared experts, all attention, norms, embeddings), and every FLOP
count is an *active* count -- per MoE layer router 2*D*E plus (top_k + n_shared) SwiGLUs of width moe_d_ff.
MLA's matmuls are its down/up projections (see ``_attention_layer_params``); its Q.K^T and P.V run at
max(nope + rope, v) per head. Capacity dispatch's one-hot einsums and empty slots are implementation
overhead: "dispatch_forward"/"dispatch_training", added to hardware_training only.
Norms, softmax, RoPE, SiLU, residual adds, the loss and the optimiser are not counted: they are O(D + F + H*T)
elementwise FLOPs per token per layer, next to O(D^2) for the matmuls (``tests/test_accounting.py`` measures
the gap against XLA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # avoid an import cycle: config.py imports this module lazily
    from models.config import ModelConfig

ATTENTION_CONVENTIONS = ("full", "causal")


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts: total, embedding (token table + untied lm_head), non_embedding + a breakdown.

    Extra keys: attention, mlp, norm (all layers together, biases and qk-norm scales included) and matmul (the
    number of weights that take part in a per-token matmul: hidden kernels + the output head, tied or not).
    """
    cfg.validate()
    if cfg.family == "mor":  # Mixture-of-Recursions: shared layers + router (models/mor_accounting.py)
        from models.mor_accounting import mor_param_counts

        return mor_param_counts(cfg)
    D, H, G, K, F, V, n = _dims(cfg)
    attn, attn_matmul = _attention_layer_params(cfg)  # MHA/GQA or MLA (then its latent norms are included)
    mlps = [_mlp_layer_params(cfg, i) for i in range(n)]  # dense SwiGLU or MoE, per layer
    mlp, mlp_active = sum(m["total"] for m in mlps), sum(m["active"] for m in mlps)
    norm = n * 2 * D + D
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    non_embedding = n * attn + mlp + norm
    active_non_embedding = n * attn + mlp_active + norm
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "attention": n * attn,
        "mlp": mlp,
        "norm": norm,
        "matmul": n * attn_matmul + sum(m["matmul"] for m in mlps) + D * V,
        # MoE: what one token uses (router + top-k routed + shared experts); = total for dense models.
        "active": embedding + active_non_embedding,
        "active_non_embedding": active_non_embedding,
        "router": sum(m["router"] for m in mlps),
        "routed_experts": sum(m["routed_experts"] for m in mlps),
    }


def _attention_layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, per-token matmul weights) of one attention layer, MHA/GQA or MLA."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    bias = cfg.use_bias
    if cfg.attention == "mla":  # models/mla.py; each projection (in, out) has out biases with use_bias
        R, P = cfg.resolved_mla_kv_lora_rank, cfg.resolved_mla_rope_head_dim
        N, U = cfg.resolved_mla_nope_head_dim, cfg.resolved_mla_v_head_dim
        A, Q = N + P, cfg.mla_q_lora_rank
        projections = [(D, H * A)] if Q is None else [(D, Q), (Q, H * A)]
        projections += [(D, R), (D, P), (R, H * N), (R, H * U), (H * U, D)]
        matmul = sum(i * o for i, o in projections)
        norms = R + (0 if Q is None else Q)  # kv_norm (+ q_norm) scales
        return matmul + norms + (sum(o for _, o in projections) if bias else 0), matmul
    matmul = D * H * K + 2 * D * G * K + H * K * D
    return matmul + (H * K + 2 * G * K + D if bias else 0) + (2 * K if cfg.qk_norm else 0), matmul


def _mlp_layer_params(cfg: ModelConfig, layer: int) -> dict[str, int]:
    """total / active / matmul (active per-token matmul weights) / router / routed_experts of one MLP."""
    D = cfg.d_model
    if not cfg.is_moe_layer(layer):
        F = cfg.resolved_d_ff
        total = 3 * D * F + (2 * F + D if cfg.use_bias else 0)
        return {"total": total, "active": total, "matmul": 3 * D * F, "router": 0, "routed_experts": 0}
    E, k, Fe = cfg.n_experts, cfg.moe_top_k, cfg.resolved_moe_d_ff
    Fs = cfg.n_shared_experts * Fe  # shared experts: one SwiGLU of this width (models/moe.py)
    shared = 3 * D * Fs + (2 * Fs + D if cfg.use_bias and Fs else 0)
    router, routed = D * E, 3 * E * D * Fe  # neither has biases
    return {"total": router + routed + shared, "active": router + 3 * k * D * Fe + shared,
            "matmul": router + 3 * k * D * Fe + 3 * D * Fs, "router": router, "routed_experts": routed}


def flops_per_token(cfg: ModelConfig, seq_len: int, *, attention: str = "full") -> dict[str, float]:
    """Model FLOPs per token for sequences of ``seq_len`` tokens (see the module docstring for the formulas).

    Keys: forward, training (= 3 * forward), matmul_forward, attention_forward, matmul_training,
    attention_training, hardware_training (training + what the remat policy recomputes; this is what the
    device executes, model FLOPs exclude it by convention), seq_len, attention (the convention used).
    """
    cfg.validate()
    _check_seq_len(seq_len)
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_CONVENTIONS}")
    if cfg.family == "mor":  # expected FLOPs under the routing capacity (models/mor_accounting.py)
        from models.mor_accounting import mor_flops_per_token

        return mor_flops_per_token(cfg, seq_len, attention=attention)
    D, H, G, K, F, V, n = _dims(cfg)
    t_eff = float(seq_len) if attention == "full" else (seq_len + 1) / 2.0
    head = 2.0 * D * V
    counts = param_counts(cfg)
    matmul_fwd = 2.0 * counts["matmul"]  # every active weight: one multiply-add per token (router included)
    attn_fwd = 4.0 * n * t_eff * H * _attention_head_dim(cfg)
    fwd = matmul_fwd + attn_fwd
    moe = _moe_overhead(cfg, seq_len)
    return {
        "forward": fwd,
        "training": 3.0 * fwd,
        "matmul_forward": matmul_fwd,
        "attention_forward": attn_fwd,
        "matmul_training": 3.0 * matmul_fwd,
        "attention_training": 3.0 * attn_fwd,
        "hardware_training": 3.0 * fwd + moe["dispatch_training"] + _remat_recompute(
            cfg.remat, matmul_fwd - head - 2.0 * _last_layer_matmuls(cfg), attn_fwd),
        "seq_len": float(seq_len),
        "attention": attention,
        # Model FLOPs are already *active* FLOPs (routed top-k + shared experts + router for MoE).
        "active_forward": fwd,
        "active_training": 3.0 * fwd,
        "router_forward": 2.0 * counts["router"],
        **moe,
    }


def _attention_head_dim(cfg: ModelConfig) -> int:
    """Per-head size that Q.K^T and P.V run at: head_dim, or for MLA max(nope + rope, v) (the kernel pads the
    smaller side, models/mla.py; the unpadded minimum would be (nope + rope + v) / 2)."""
    if cfg.attention == "mla":
        qk = cfg.resolved_mla_nope_head_dim + cfg.resolved_mla_rope_head_dim
        return max(qk, cfg.resolved_mla_v_head_dim)
    return cfg.resolved_head_dim


def _last_layer_matmuls(cfg: ModelConfig) -> float:
    """Weights of each layer's last matmul (the MLP down projections a token uses), summed over layers."""
    total = 0.0
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            total += (cfg.moe_top_k + cfg.n_shared_experts) * cfg.resolved_moe_d_ff * cfg.d_model
        else:
            total += cfg.resolved_d_ff * cfg.d_model
    return total


def _moe_overhead(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Executed-but-not-model FLOPs per token of capacity dispatch (models/moe.py), per group = one sequence.

    With C = ceil(cf * T * k / E) slots per expert: the experts run E*C slots instead of T*k assignments
    (empty slots: (E*C/T - k) * 6*D*F forward per token), and every token meets every slot in the one-hot
    dispatch and combine einsums (2*E*C*D each per token: O(T), why GShard keeps groups small) and in
    building the combine tensor from the gates (2*k*E*C). Training multiplies each by the matmuls its
    backward pass needs: 3 for the expert slots and combine, 2 for dispatch (the one-hot tensor has no
    gradient, only x does) and for the gate product (only the gates get a gradient).
    Dropless dispatch has none of this (on accelerators; CPU XLA runs ragged_dot as E masked dense matmuls).
    """
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if not n_moe or cfg.moe_dispatch != "capacity":
        return {"dispatch_forward": 0.0, "dispatch_training": 0.0}
    from math import ceil

    E, k, D, Fe, T = cfg.n_experts, cfg.moe_top_k, cfg.d_model, cfg.resolved_moe_d_ff, seq_len
    slots = E * max(1, ceil(cfg.moe_capacity_factor * T * k / E))  # expert slots per group
    empty = (slots / T - k) * 6.0 * D * Fe
    onehot = 2.0 * slots * D
    gates = 2.0 * k * slots
    return {"dispatch_forward": n_moe * (empty + 2 * onehot + gates),
            "dispatch_training": n_moe * (3 * empty + 2 * onehot + 3 * onehot + 2 * gates)}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> float:
    """Bytes of KV cache each token of context adds at decode time (all layers; ``dtype`` default: compute).

    MHA/GQA: 2 * G * K per layer (keys and values). MLA: kv_lora_rank + rope_head_dim per layer (the latent
    c_kv and the shared rotary key; DeepSeek-V2 section 2.1.2). MoR: models/mor_accounting.py.
    """
    cfg.validate()
    if cfg.family == "mor":
        from models.mor_accounting import mor_kv_cache_bytes_per_token

        return mor_kv_cache_bytes_per_token(cfg, dtype)
    itemsize = cfg.compute_jnp_dtype.itemsize if dtype is None else _itemsize(dtype)
    if cfg.attention == "mla":
        per_layer = cfg.resolved_mla_kv_lora_rank + cfg.resolved_mla_rope_head_dim
    else:
        per_layer = 2 * cfg.resolved_n_kv_heads * cfg.resolved_head_dim
    return float(cfg.n_layers * per_layer * itemsize)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize if dtype != "bfloat16" else 2


def decode_flops_per_token(cfg: ModelConfig, context_len: int) -> dict[str, float]:
    """Forward FLOPs to decode one token with ``context_len`` cached positions (itself included), KV cache.

    MHA/GQA: every active weight once (2 FLOPs each) + Q.K^T and P.V over the context, 4 * T * H * K per
    layer. MLA in its absorbed form (models/mla.py ``mla_decode_step``): q projection, kv_down, k_rope and o
    as usual; k_up/v_up are not applied to the cache but to the query and to the attended latent
    (2*H*N*R + 2*H*R*U); scores over the latent plus rotary key 2*H*(R + P)*T; latent weighted sum 2*H*R*T.
    Keys: forward, attention_block (one layer's attention sub-block, projections included), context_len.
    MoR: ``models.mor_accounting.mor_decode_flops_per_token`` -- "forward" as ``models.decode`` executes it
    (every step on every token, masked) plus "ideal_forward" (exited tokens skip) and "expected_depth".
    """
    cfg.validate()
    _check_seq_len(context_len)
    if cfg.family == "mor":
        from models.mor_accounting import mor_decode_flops_per_token

        return mor_decode_flops_per_token(cfg, context_len)
    D, H, G, K, F, V, n = _dims(cfg)
    T = float(context_len)
    counts = param_counts(cfg)
    _, attn_matmul = _attention_layer_params(cfg)
    if cfg.attention == "mla":
        R, P = cfg.resolved_mla_kv_lora_rank, cfg.resolved_mla_rope_head_dim
        N, U = cfg.resolved_mla_nope_head_dim, cfg.resolved_mla_v_head_dim
        applied = attn_matmul - R * H * N - R * H * U  # k_up, v_up are absorbed instead
        block = 2.0 * applied + 2.0 * H * N * R + 2.0 * H * R * U + 2.0 * H * (R + P) * T + 2.0 * H * R * T
    else:
        block = 2.0 * attn_matmul + 4.0 * H * K * T
    other_matmuls = counts["matmul"] - n * attn_matmul  # MLPs (active experts, router) + head
    return {"forward": n * block + 2.0 * other_matmuls, "attention_block": block, "context_len": T}


def family_summary(cfg: ModelConfig, seq_len: int) -> dict[str, object]:
    """The family-independent fields summary.json needs for Pareto studies, plus MoE / MLA specifics.

    active_params, active_flops_per_token (training, fwd + bwd, per trained token), kv_cache_bytes_per_token
    (compute dtype), attention; for family "moe": experts, top_k, shared_experts, moe_d_ff, router, dispatch.
    """
    counts = param_counts(cfg)
    flops = flops_per_token(cfg, seq_len)
    out: dict[str, object] = {
        "active_params": counts.get("active", counts["total"]),
        "active_flops_per_token": flops.get("active_training", flops["training"]),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "attention": cfg.attention,
    }
    if cfg.family == "moe":
        out.update(experts=cfg.n_experts, top_k=cfg.moe_top_k, shared_experts=cfg.n_shared_experts,
                   moe_d_ff=cfg.resolved_moe_d_ff, router=cfg.moe_router, dispatch=cfg.moe_dispatch)
    return out


def _remat_recompute(policy: str, layer_matmul_fwd: float, attn_fwd: float) -> float:
    """Forward FLOPs recomputed in the backward pass under a remat policy (remat wraps blocks, not the head).

    ``layer_matmul_fwd`` excludes each layer's last matmul (the MLP down projection): backpropagating through
    a matmul needs its inputs, not its output, so XLA never recomputes it.
    "full"/"nothing_saveable" recompute the rest of the layer; "dots_with_no_batch_dims_saveable" keeps the
    weight matmuls but recomputes Q.K^T and P.V (they have a batch dimension): XLA's count matches on scanned
    layers (tests/test_accounting.py), while with unrolled layers (scan_layers=False) XLA:CPU eliminated that
    recompute, so there this overcounts on the CPU; dots_saveable keeps every matmul output.
    Elementwise recomputation is not counted, like everywhere else in this module.
    Not counted either: MoE capacity dispatch under remat. There the layer's last op is the combine einsum, so
    the down projections and empty slots are recomputed too, and the dispatch/expert einsums have batch axes
    (experts, groups), so "dots_with_no_batch_dims_saveable" recomputes them. On tests/test_moe.py's
    capacity config XLA executes 1.016x hardware_training without remat, 1.074x with "full" and 1.130x with
    "dots_with_no_batch_dims_saveable" (test_moe.py::test_remat_hardware_flops_bound_for_capacity_dispatch).
    """
    if policy in ("full", "nothing_saveable"):
        return layer_matmul_fwd + attn_fwd
    if policy in ("dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims"):
        return attn_fwd
    return 0.0


def training_flops_per_token(cfg: ModelConfig, seq_len: int, *, attention: str = "full") -> float:
    """The number the trainer reports as ``flops_per_token``: fwd + bwd model FLOPs per trained token."""
    return flops_per_token(cfg, seq_len, attention=attention)["training"]


def train_step_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, attention: str = "full") -> float:
    """Model FLOPs of one optimiser step on ``batch_size`` sequences of ``seq_len`` tokens (all microbatches).

    Gradient accumulation does not change it: the same tokens go through forward and backward once either way.
    """
    return training_flops_per_token(cfg, seq_len, attention=attention) * batch_size * seq_len


def kaplan_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1): 6*N + 6*n*T*d_attn per token.

    N is the non-embedding parameter count (exact here; Kaplan approximates it by 12*n*D^2), so the output
    head's 2*D*V is left out, and the context term is 2*n*T*d_attn per forward token (d_attn = H*K): half of
    the 4*n*T*d_attn that Q.K^T plus P.V cost with the full T, i.e. the causal average. MLA: K is the per-head
    size its Q.K^T and P.V run at, max(nope + rope, v) (``_attention_head_dim``, as ``flops_per_token``), not
    ``head_dim``, which MLA does not use there (it undercounted DeepSeek-style MLA's context term 3x).

    N is the parameters a token passes through, as the formula means: MoE's *active* ones; MoR's *applied*
    ones (each shared layer counted once per application, at the full depth that the context term also
    uses -- a routed MoR token that exits early costs less; ``training_flops_per_token`` counts that).
    """
    _check_seq_len(seq_len)
    d_attn = cfg.n_heads * _attention_head_dim(cfg)
    counts = param_counts(cfg)
    per_token = counts.get("active_non_embedding", counts["non_embedding"])
    n_params = counts.get("applied_non_embedding", per_token)
    return 6.0 * n_params + 6.0 * cfg.n_layers * seq_len * d_attn


def chinchilla_flops_per_token(cfg: ModelConfig) -> float:
    """Hoffmann et al. 2022 (Chinchilla): C = 6*N with N the *total* parameter count, embeddings included.

    Kaplan's N excludes embeddings and Chinchilla's includes them; Pearce & Song 2024 ("Reconciling Kaplan and
    Chinchilla Scaling Laws") show this difference explains much of the two papers' disagreement.
    MoE: the active parameters; MoR: the applied ones at full depth (as :func:`kaplan_flops_per_token`).
    """
    counts = param_counts(cfg)
    return 6.0 * counts.get("applied", counts.get("active", counts["total"]))


def describe(cfg: ModelConfig, seq_len: int) -> str:
    """A few lines for start-up logs: parameter counts and per-token FLOPs under each convention."""
    n = param_counts(cfg)
    f = flops_per_token(cfg, seq_len)
    lines = [
        f"params: total {n['total']:,}  non-embedding {n['non_embedding']:,}  embedding {n['embedding']:,}",
        f"training FLOPs/token at T={seq_len}: {f['training']:.4g} (matmul {f['matmul_training']:.4g}, "
        f"attention {f['attention_training']:.4g}; full-T convention)",
        f"  causal-T {flops_per_token(cfg, seq_len, attention='causal')['training']:.4g}  "
        f"Kaplan 6N+6nTd {kaplan_flops_per_token(cfg, seq_len):.4g}  "
        f"Chinchilla 6N {chinchilla_flops_per_token(cfg):.4g}  "
        f"with remat={cfg.remat!r} the device executes {f['hardware_training']:.4g}",
    ]
    return "\n".join(lines)


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer")


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, int, int, int]:
    return (cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, cfg.resolved_d_ff,
            cfg.vocab_size, cfg.n_layers)
