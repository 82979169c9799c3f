"""Analytic accounting for Mixture-of-Recursions (``family="mor"``; models/mor.py): params, FLOPs, KV cache.

Notation as in models/accounting.py (D, H, G, K, F, V, T) plus N_r recursions, B = layers per recursion
block, U = unique layers, n_fl = 2 for the middle sharings (unique first and last layer) else 0, and n_r =
tokens of a sequence processed at recursion step r (k_r = floor(capacity_r * T) for expert choice; the
routed count for token choice).

Parameters: U layers as in a dense model, the final norm, the embedding (+ untied head) and the router
(D * N_r: one column per recursion step for expert choice, a D -> N_r softmax for token choice). ``applied``
counts each layer once per application at full depth (n_layers = n_fl + N_r * B), the size of the looped
model "unrolled"; ``active`` = total (every unique weight is used by every token that recurses at least once).

Forward FLOPs of one sequence (divided by T for per-token numbers):
    first/last layers   n_fl * T * layer,           layer = 4DHK (q, o) + 4DGK (k, v) + 6DF (SwiGLU) for MHA
    step r              B * n_r * layer (recursion-wise) -- attention only among the n_r active tokens:
                        B * 4 * n_r^2 * H * K (XLA's dense attention computes the n_r x n_r scores)
                        shared KV, r > 0: queries of the n_r tokens attend the first recursion's K/V of all T
                        tokens: B * (n_r * (4DHK + 6DF) + 4 * n_r * T * H * K) (model FLOPs: the K/V are
                        reused, as a decode KV cache does). This implementation gets those K/V by recomputing
                        them from the kept step-0 layer inputs (same weights and inputs): XLA executes that
                        as 2 x B * T * 4DGK extra per step r > 0 in a training step (measured with
                        cost_analysis, tests/test_mor.py: it shares one of the three matmuls); it is counted
                        in ``hardware_training`` only
    router              expert choice: 2D per candidate token (n_{r-1}, or T at r = 0) per step;
                        token choice: 2 * D * N_r per token, once
    head                2DV per token
Training = 3 x forward, as for the dense model (Chowdhery et al. 2022, Appendix B).

Attention kind: a "layer" and a query-key "pair" are costed by the dense accounting of a one-layer model of
the same config, so MLA (its down/up projections, Q.K^T and P.V at max(nope + rope, v) per head) is covered
like MHA/GQA; recursive KV sharing is MHA-only (config validation), so its K/V terms are written for MHA.

KV-cache bytes per token (decode): every layer application that keeps K/V for a token stores what one dense
layer of the same attention kind stores (MHA/GQA 2 * G * K values, MLA kv_lora_rank + rope_head_dim):
recursion-wise caching keeps them for the steps the token was active at (expected sum_r capacity_r), recursive
sharing only for the first recursion (Bae et al. 2025, Section 2.3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config import ModelConfig


def mor_layout(cfg: ModelConfig) -> dict[str, Any]:
    """Which unique layer every layer application uses.

    Returns n_first_last (0 or 2), block (layers per recursion step), unique (unique layers, first/last
    included), schedule (per recursion step, the shared-layer indices it applies, in order).
    Cycle: step r applies shared layers 0..B-1 (Bae et al. 2025, Fig. 3; Phi_{l mod B}). Sequence: effective
    layer l = r * B + j uses shared layer l // N_r (each shared layer applied N_r times in a row), so a
    token that exits after step r has gone through the first (r + 1) * B layer applications of that stack.
    """
    n_r = cfg.mor_recursions
    middle = cfg.mor_sharing.startswith("middle")
    n_fl = 2 if middle else 0
    block = (cfg.n_layers - n_fl) // n_r
    if cfg.mor_sharing.endswith("cycle"):
        schedule = [list(range(block)) for _ in range(n_r)]
    else:
        schedule = [[(r * block + j) // n_r for j in range(block)] for r in range(n_r)]
    return {"n_first_last": n_fl, "block": block, "unique": n_fl + block, "schedule": schedule}


def step_token_counts(cfg: ModelConfig, seq_len: int) -> list[int]:
    """k_r: tokens per sequence processed at recursion step r (the static buffer size of each step)."""
    from models.config import mor_resolved

    # The epsilon keeps fractions like 2/3 * 12 = 7.999... from flooring to 7.
    return [max(1, min(seq_len, math.floor(f * seq_len + 1e-9))) for f in mor_resolved(cfg)["capacity"]]


def mor_param_counts(cfg: ModelConfig) -> dict[str, int]:
    from models import accounting

    lay = mor_layout(cfg)
    dense = accounting.param_counts(cfg.replace(family="dense", n_layers=lay["unique"]))
    router = cfg.d_model * cfg.mor_recursions if cfg.mor_router != "none" else 0
    per_layer = (dense["attention"] + dense["mlp"] + dense["norm"] - cfg.d_model) // lay["unique"]
    total = dense["total"] + router
    return {
        "total": total,
        "embedding": dense["embedding"],
        "non_embedding": dense["non_embedding"] + router,
        "attention": dense["attention"],
        "mlp": dense["mlp"],
        "norm": dense["norm"],
        "router": router,
        "matmul": dense["matmul"],
        "active": total,
        "active_non_embedding": dense["non_embedding"] + router,
        "applied": total + (cfg.n_layers - lay["unique"]) * per_layer,
        "applied_non_embedding": dense["non_embedding"] + router + (cfg.n_layers - lay["unique"]) * per_layer,
        "unique_layers": lay["unique"],
    }


def routed_forward_flops(cfg: ModelConfig, seq_len: int, n_per_step: list[Any], *,
                         attention: str = "full") -> dict[str, Any]:
    """Forward FLOPs per token for one sequence whose step r processed ``n_per_step[r]`` tokens.

    ``n_per_step`` entries may be python numbers or jax arrays (per-sequence counts [B]; the result is then
    per sequence): the model calls this in-graph with its actual routing.
    """
    from models import accounting

    D, G, K, V = cfg.d_model, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, cfg.vocab_size
    T = seq_len
    lay = mor_layout(cfg)
    B, n_r = lay["block"], cfg.mor_recursions
    # Counts as floats: in-graph they are int32 arrays, and FLOP totals of real sizes (1e11 per sequence at
    # 360M x 2048) overflow int32.
    n_per_step = [n * 1.0 for n in n_per_step]
    # Per-token cost of one layer, and of one query-key pair, from the dense accounting of a 1-layer model
    # (so MHA/GQA and MLA are both covered): layer = matmul_forward - head, pair = attention_forward / T.
    one = accounting.flops_per_token(cfg.replace(family="dense", n_layers=1), T, attention="full")
    layer = one["matmul_forward"] - 2.0 * D * V
    pair = one["attention_forward"] / T
    kv = 4.0 * D * G * K  # k and v projections (MHA/GQA; shared KV is MHA-only)
    shared = cfg.mor_kv_strategy == "shared"

    def keys(n_k):  # key count per query under the chosen convention
        return n_k if attention == "full" else (n_k + 1) / 2.0

    matmul = lay["n_first_last"] * T * layer
    attn = lay["n_first_last"] * T * keys(T) * pair
    for r, n in enumerate(n_per_step):
        if shared and r > 0:
            matmul += B * n * (layer - kv)  # step-0 K/V reused (XLA CSEs the identical recomputation)
            attn += B * n * keys(T) * pair
        else:
            matmul += B * n * layer
            attn += B * n * keys(n) * pair
    if cfg.mor_router == "expert_choice":
        router = sum(2.0 * D * (T if r == 0 else n_per_step[r - 1]) for r in range(n_r))
    elif cfg.mor_router == "token_choice":
        router = 2.0 * D * n_r * T
    else:
        router = 0
    matmul += router + 2.0 * D * V * T
    depth = sum(n_per_step) / T
    return {"matmul_forward": matmul / T, "attention_forward": attn / T, "router_forward": router / T,
            "forward": (matmul + attn) / T, "expected_depth": depth}


def mor_flops_per_token(cfg: ModelConfig, seq_len: int, *, attention: str = "full") -> dict[str, Any]:
    """Expected (active) FLOPs per token from the capacity schedule; the dense accounting's keys, plus
    full_depth_forward (every token through every step, as the looped model), expected_depth,
    router_forward, active_forward and active_training."""
    from models import accounting

    counts = step_token_counts(cfg, seq_len)
    f = routed_forward_flops(cfg, seq_len, counts, attention=attention)
    full = routed_forward_flops(cfg, seq_len, [seq_len] * cfg.mor_recursions, attention=attention)
    lay = mor_layout(cfg)
    kv_recompute = 0.0
    if cfg.mor_kv_strategy == "shared":  # see the module docstring: executed, but not model FLOPs
        kv_recompute = 2.0 * lay["block"] * (cfg.mor_recursions - 1) * 4 * cfg.d_model * \
            cfg.resolved_n_kv_heads * cfg.resolved_head_dim
    applications = lay["n_first_last"] + lay["block"] * f["expected_depth"]
    down = 2.0 * cfg.resolved_d_ff * cfg.d_model * applications
    layer_mm = f["matmul_forward"] - 2.0 * cfg.d_model * cfg.vocab_size - f["router_forward"]
    return {
        "forward": f["forward"],
        "training": 3.0 * f["forward"],
        "matmul_forward": f["matmul_forward"],
        "attention_forward": f["attention_forward"],
        "matmul_training": 3.0 * f["matmul_forward"],
        "attention_training": 3.0 * f["attention_forward"],
        "hardware_training": 3.0 * f["forward"] + accounting._remat_recompute(
            cfg.remat, layer_mm - down, f["attention_forward"]) + kv_recompute,
        "seq_len": float(seq_len),
        "attention": attention,
        "router_forward": f["router_forward"],
        "expected_depth": f["expected_depth"],
        "full_depth_forward": full["forward"],
        "active_forward": f["forward"],
        "active_training": 3.0 * f["forward"],
    }


def mor_kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> float:
    """Expected KV-cache bytes per decoded token (``dtype`` default: compute), see the module docstring."""
    from models import accounting
    from models.config import mor_resolved

    lay = mor_layout(cfg)
    # One layer application caches what one dense layer of the same attention kind caches (MHA/GQA: 2GK
    # values, MLA: the latent + rotary key, kv_lora_rank + rope_head_dim).
    per_application = accounting.kv_cache_bytes_per_token(cfg.replace(family="dense", n_layers=1), dtype)
    steps = 1.0 if cfg.mor_kv_strategy == "shared" else float(sum(mor_resolved(cfg)["capacity"]))
    return per_application * (lay["n_first_last"] + lay["block"] * steps)


def mor_decode_flops_per_token(cfg: ModelConfig, context_len: int) -> dict[str, Any]:
    """Forward FLOPs to decode one token of a MoR model with ``context_len`` cached positions (KV cache).

    Two numbers, because the decoder in this repo does not do what an ideal MoR decoder would:
      forward        as executed by ``models.decode.decode_step`` when any row of the batch is still active:
                     a batched step has static shapes, so every recursion step runs its layers on the token
                     whether or not it is still active (the update is masked out), and each attention scores
                     all ``context_len`` cached positions (the keys of inactive tokens are masked, not
                     skipped). This is what XLA's cost analysis of a jitted decode step counts
                     (tests/test_mor_decode_flops.py; it counts both branches of the skip below). A step no
                     row needs is skipped (``skip_exited``), so at batch 1 the executed FLOPs fall towards
                     ``ideal_forward``'s layer count (attention still scores all positions).
      ideal_forward  a decoder that skips exited tokens (Bae et al. 2025, Section 2.3): step r runs with
                     probability capacity_r (the expected depth of the capacity schedule, as in training),
                     and recursion-wise caching attends only to the keys active at step r, capacity_r *
                     context_len in expectation; recursive KV sharing attends to all first-recursion keys and
                     skips the k/v projections at r > 0. Expert choice evaluates step r's router column only
                     for tokens still active after step r - 1.
    Both count every weight matmul of the layers they run (2 FLOPs per weight), Q.K^T and P.V over the keys
    they attend to (the per-layer costs come from the dense decode accounting of a one-layer model, so MHA/GQA
    and MLA's absorbed decode are both covered), the router and the 2DV head, and no elementwise work.
    Keys: forward, ideal_forward, router_forward (as executed), expected_depth, attention_block (one layer's
    attention sub-block at the full context), context_len.
    """
    from models import accounting
    from models.config import mor_resolved

    D, V, n_r = cfg.d_model, cfg.vocab_size, cfg.mor_recursions
    G, K = cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    T = float(context_len)
    lay = mor_layout(cfg)
    capacity = mor_resolved(cfg)["capacity"]
    one_layer = cfg.replace(family="dense", n_layers=1)
    # A layer's attention block costs A0 + a * keys (projections + scores/weighted sum over the keys): read
    # both off the dense decode accounting at 1 and 2 keys, so fractional expected key counts work too.
    a1 = accounting.decode_flops_per_token(one_layer, 1)
    slope = accounting.decode_flops_per_token(one_layer, 2)["attention_block"] - a1["attention_block"]
    attn0 = a1["attention_block"] - slope
    mlp = a1["forward"] - a1["attention_block"] - 2.0 * D * V  # what is left of the 1-layer model: its MLP

    def layer(keys: float, kv_proj: bool = True) -> float:
        return attn0 + slope * keys + mlp - (0.0 if kv_proj else 4.0 * D * G * K)

    shared = cfg.mor_kv_strategy == "shared"
    edges = lay["n_first_last"] * layer(T)
    executed = ideal = edges + 2.0 * D * V
    for r in range(n_r):
        reuse = shared and r > 0  # queries only: the first recursion's K/V are read, not recomputed
        executed += lay["block"] * layer(T, kv_proj=not reuse)
        keys = T if shared else capacity[r] * T
        ideal += capacity[r] * lay["block"] * layer(keys, kv_proj=not reuse)
    if cfg.mor_router == "expert_choice":
        router = 2.0 * D * n_r
        ideal_router = 2.0 * D * (1.0 + sum(capacity[:-1]))
    elif cfg.mor_router == "token_choice":
        router = ideal_router = 2.0 * D * n_r
    else:
        router = ideal_router = 0.0
    return {"forward": executed + router, "ideal_forward": ideal + ideal_router, "router_forward": router,
            "expected_depth": float(sum(capacity)), "attention_block": attn0 + slope * T, "context_len": T}
