"""Parameter and FLOP accounting: exact counts vs the real parameter tree and published model sizes; training
FLOPs vs XLA's own cost analysis of a compiled loss+grad step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models import (
    ModelConfig,
    Transformer,
    chinchilla_flops_per_token,
    flops_per_token,
    kaplan_flops_per_token,
    param_counts,
    train_step_flops,
    training_flops_per_token,
)
from models.accounting import describe

BASE = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, max_seq_len=32)


def _tree_sizes(cfg):
    shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = shapes["params"]
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    embedding = math.prod(params["embed"]["embedding"].shape)
    if "lm_head" in params:
        embedding += math.prod(params["lm_head"]["kernel"].shape)
    return total, embedding


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_kv_heads=2),
        dict(n_kv_heads=1, tie_embeddings=True),
        dict(qk_norm=True, use_bias=True),
        dict(d_ff=100, use_bias=True, tie_embeddings=True, n_kv_heads=3),
        dict(head_dim=16, n_heads=4, n_kv_heads=2, qk_norm=True),  # head_dim decoupled from d_model
        dict(scan_layers=False, n_layers=2, qk_norm=True),
        dict(d_model=64, n_heads=2, n_layers=1, vocab_size=256),  # default SwiGLU rule for d_ff
    ],
)
def test_param_counts_match_tree(overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    counts = param_counts(cfg)
    total, embedding = _tree_sizes(cfg)
    assert counts["total"] == total
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == total - embedding
    assert counts["attention"] + counts["mlp"] + counts["norm"] + counts["embedding"] == total
    assert cfg.param_counts() == counts


def test_param_counts_of_published_models():
    """Independent check against published totals (no flax involved): LLaMA-7B (Touvron et al. 2023) has
    6,738,415,616 parameters and Llama-2-70B (GQA, 8 KV heads) 68,976,648,192."""
    llama7b = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008)
    assert param_counts(llama7b)["total"] == 6_738_415_616
    llama70b = ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)
    assert param_counts(llama70b)["total"] == 68_976_648_192


def test_flop_formulas_relations():
    cfg = ModelConfig(**BASE, n_kv_heads=2)
    f = flops_per_token(cfg, 32)
    c = flops_per_token(cfg, 32, attention="causal")
    assert f["training"] == 3 * f["forward"] == f["matmul_training"] + f["attention_training"]
    assert f["forward"] == f["matmul_forward"] + f["attention_forward"]
    assert c["matmul_forward"] == f["matmul_forward"]
    assert c["attention_forward"] == pytest.approx(f["attention_forward"] * (32 + 1) / (2 * 32))
    # The matmul term is 2 FLOPs per weight that multiplies a token; tied or not, the head costs 2*D*V.
    assert f["matmul_forward"] == 2 * param_counts(cfg)["matmul"]
    assert cfg.flops_per_token(32) == f
    assert training_flops_per_token(cfg, 32) == f["training"]
    assert train_step_flops(cfg, batch_size=4, seq_len=32) == f["training"] * 4 * 32
    n = param_counts(cfg)
    assert chinchilla_flops_per_token(cfg) == 6 * n["total"]
    assert kaplan_flops_per_token(cfg, 32) == 6 * n["non_embedding"] + 6 * 3 * 32 * 48
    text = describe(cfg, 32)
    assert f"{n['total']:,}" in text and f"{f['training']:.4g}" in text
    with pytest.raises(ValueError, match="attention='half' is not one of"):
        flops_per_token(cfg, 32, attention="half")
    with pytest.raises(ValueError, match="seq_len=0 must be a positive integer"):
        flops_per_token(cfg, 0)


def _xla_train_step_flops(cfg, batch_size, seq_len):
    """FLOPs XLA counts for one compiled loss+grad step (no optimiser update: it is O(N) elementwise work that
    the model-FLOPs convention leaves out anyway)."""
    model = Transformer(cfg)
    tokens = jnp.zeros((batch_size, seq_len + 1), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1]))

    def loss(p, t):
        logits, _ = model.apply(p, t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

    cost = jax.jit(jax.grad(loss)).lower(params, tokens).compile().cost_analysis()
    return cost["flops"]


# Tolerance. Our count is model FLOPs: matmuls only. XLA also counts every elementwise op (RMSNorm, RoPE,
# SiLU, residual adds, softmax over the T x T scores, the mask select, log-softmax over the vocabulary, and
# their gradients): O(D + F + H*T + V) FLOPs per token per layer against O(D^2 + D*F + D*V) for the matmuls.
# So XLA must be slightly *above* us, never below, by at most a couple of percent at these widths (measured
# 0.7-1.8%). XLA computes the full T x T score matrix and masks it, so the "full" attention convention is the
# one that matches; the attention-heavy case checks that the "causal" (T/2) count would be clearly wrong.
# Layers are unrolled (scan_layers=False): XLA's cost analysis counts a while-loop body once, not n times.
TOLERANCE = 0.02


@pytest.mark.parametrize("overrides", [
    {},
    dict(attention="mla", mla_kv_lora_rank=16, mla_rope_head_dim=4),
    # DeepSeek-style: Q.K^T at nope + rope = 24 per head, P.V at v = 16, head_dim unused by the attention
    dict(attention="mla", mla_kv_lora_rank=16, mla_rope_head_dim=8, mla_nope_head_dim=16, mla_v_head_dim=16),
])
def test_kaplan_context_term_is_the_causal_attention_flops(overrides):
    """Kaplan's 6*n*T*d_attn is the causal average of the attention core's training FLOPs: it equals
    flops_per_token's causal attention term up to its (T + 1) / T (query i sees i + 1 keys); MHA and MLA."""
    cfg = ModelConfig(**{**BASE, **overrides})
    T = 32
    context = kaplan_flops_per_token(cfg, T) - 6 * param_counts(cfg)["non_embedding"]
    causal = flops_per_token(cfg, T, attention="causal")["attention_training"]
    assert context == pytest.approx(causal * T / (T + 1), rel=1e-12)


@pytest.mark.parametrize(
    "batch_size, seq_len, overrides",
    [
        # matmul-dominated, exercising GQA, qk-norm, tied head and biases
        (2, 64, dict(vocab_size=256, d_model=256, n_heads=4, n_kv_heads=2, n_layers=2, qk_norm=True,
                     tie_embeddings=True, use_bias=True)),
        # attention-heavy: the sequence-length term is 16% of the forward FLOPs
        (1, 256, dict(vocab_size=128, d_model=256, n_heads=2, n_layers=1, d_ff=512, max_seq_len=256)),
    ],
    ids=["matmul-heavy", "attention-heavy"],
)
def test_training_flops_match_xla_cost_analysis(batch_size, seq_len, overrides):
    cfg = ModelConfig(**overrides, scan_layers=False)
    xla = _xla_train_step_flops(cfg, batch_size, seq_len)
    ours = train_step_flops(cfg, batch_size, seq_len)
    assert ours <= xla <= ours * (1 + TOLERANCE), f"XLA {xla:.4g} vs ours {ours:.4g} ({xla / ours - 1:+.2%})"
    if overrides["n_layers"] == 1:
        causal = train_step_flops(cfg, batch_size, seq_len, attention="causal")
        assert xla > causal * (1 + 3 * TOLERANCE)


def test_dots_policy_recomputes_the_attention_core_of_a_scanned_layer():
    """"dots_with_no_batch_dims_saveable" keeps the weight matmuls and recomputes Q.K^T and P.V (they have
    batch dimensions) in the backward pass: hardware_training = training + the attention forward. Checked on
    scanned layers (scan_layers, the default and the GPU presets' setting): XLA's cost analysis counts a scan
    body once, so the policy's extra XLA FLOPs over no remat are ONE layer's recompute, which must match
    ours per layer (XLA also counts the recomputed softmax's elementwise work, which we do not: ~5% here).
    Not checked: unrolled layers, where XLA:CPU eliminated the recompute (the compiled step had the no-remat
    dot count) and a 1-layer scan, which XLA simplified the same way; a GPU compile may differ."""
    base = dict(vocab_size=128, d_model=256, n_heads=2, n_layers=2, max_seq_len=256, scan_layers=True)
    dots = ModelConfig(**base, remat="dots_with_no_batch_dims_saveable")
    xla_extra = _xla_train_step_flops(dots, 1, 256) - _xla_train_step_flops(ModelConfig(**base), 1, 256)
    counts = flops_per_token(dots, 256)
    ours_per_layer = (counts["hardware_training"] - counts["training"]) * 256 / dots.n_layers
    assert 1.0 <= xla_extra / ours_per_layer <= 1.1, f"XLA {xla_extra:.4g} vs ours {ours_per_layer:.4g}"


def test_remat_hardware_flops_match_xla():
    """With full remat the backward pass re-runs each layer's forward (except its last matmul, whose output
    the backward pass never needs): hardware_training accounts for that, model FLOPs (training) do not."""
    cfg = ModelConfig(vocab_size=256, d_model=256, n_heads=4, n_layers=2, remat="full", scan_layers=False)
    xla = _xla_train_step_flops(cfg, 2, 64)
    hardware = flops_per_token(cfg, 64)["hardware_training"] * 2 * 64
    assert hardware <= xla <= hardware * (1 + TOLERANCE), f"XLA {xla:.4g} vs ours {hardware:.4g}"
    assert xla > train_step_flops(cfg, 2, 64) * 1.2
