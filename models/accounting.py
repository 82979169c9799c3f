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
    D, H, G, K, F, V, n = _dims(cfg)
    attn = D * H * K + 2 * D * G * K + H * K * D
    mlp = 3 * D * F
    if cfg.use_bias:
        attn += H * K + 2 * G * K + D
        mlp += 2 * F + D
    if cfg.qk_norm:
        attn += 2 * K
    norm = n * 2 * D + D
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    non_embedding = n * (attn + mlp) + norm
    hidden_kernels = n * (2 * D * H * K + 2 * D * G * K + 3 * D * F)
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "attention": n * attn,
        "mlp": n * mlp,
        "norm": norm,
        "matmul": hidden_kernels + D * V,
    }


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
    D, H, G, K, F, V, n = _dims(cfg)
    t_eff = float(seq_len) if attention == "full" else (seq_len + 1) / 2.0
    head = 2.0 * D * V
    matmul_fwd = 2.0 * n * (2 * D * H * K + 2 * D * G * K + 3 * D * F) + head
    attn_fwd = 4.0 * n * t_eff * H * K
    fwd = matmul_fwd + attn_fwd
    return {
        "forward": fwd,
        "training": 3.0 * fwd,
        "matmul_forward": matmul_fwd,
        "attention_forward": attn_fwd,
        "matmul_training": 3.0 * matmul_fwd,
        "attention_training": 3.0 * attn_fwd,
        "hardware_training": 3.0 * fwd + _remat_recompute(cfg.remat, matmul_fwd - head - 2.0 * n * F * D,
                                                          attn_fwd),
        "seq_len": float(seq_len),
        "attention": attention,
    }


def _remat_recompute(policy: str, layer_matmul_fwd: float, attn_fwd: float) -> float:
    """Forward FLOPs recomputed in the backward pass under a remat policy (remat wraps blocks, not the head).

    ``layer_matmul_fwd`` excludes each layer's last matmul (the MLP down projection): backpropagating through
    a matmul needs its inputs, not its output, so XLA never recomputes it.
    "full"/"nothing_saveable" recompute the rest of the layer; "dots_with_no_batch_dims_saveable" keeps the
    weight matmuls but recomputes Q.K^T and P.V (they have a batch dimension); dots_saveable keeps every
    matmul output.
    Elementwise recomputation is not counted, like everywhere else in this module.
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
    the 4*n*T*d_attn that Q.K^T plus P.V cost with the full T, i.e. the causal average.
    """
    _check_seq_len(seq_len)
    d_attn = cfg.n_heads * cfg.resolved_head_dim
    return 6.0 * param_counts(cfg)["non_embedding"] + 6.0 * cfg.n_layers * seq_len * d_attn


def chinchilla_flops_per_token(cfg: ModelConfig) -> float:
    """Hoffmann et al. 2022 (Chinchilla): C = 6*N with N the *total* parameter count, embeddings included.

    Kaplan's N excludes embeddings and Chinchilla's includes them; Pearce & Song 2024 ("Reconciling Kaplan and
    Chinchilla Scaling Laws") show this difference explains much of the two papers' disagreement.
    """
    return 6.0 * param_counts(cfg)["total"]


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
