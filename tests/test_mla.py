"""Multi-head latent attention (DeepSeek-V2): NumPy reference, causality, the MoR call signature, parameter /
FLOP / KV-cache accounting vs the tree and XLA, config validation, and a short training run."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest

from models import ModelConfig, Transformer, flops_per_token, kv_cache_bytes_per_token, param_counts
from models.mla import MlaAttention

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16, attention="mla",
            mla_kv_lora_rank=12, mla_rope_head_dim=4, mla_nope_head_dim=6, mla_v_head_dim=5)


def _random_tree(shapes, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = [jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + scale * rng.standard_normal(x.shape),
                          x.dtype) for path, x in flat]
    return jax.tree.unflatten(treedef, leaves)


def _np_mla(p, cfg, x_LxD):
    """float64 reference written from DeepSeek-V2 eqs. 9-19 (per head, explicit causal softmax)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def lin(x, name):
        w = p[name]["kernel"]
        n_in = x.ndim - 1
        y = np.tensordot(x, w, axes=n_in if name == "o" else 1)
        return y + p[name]["bias"] if "bias" in p[name] else y

    H, N, P, U = cfg.n_heads, cfg.mla_nope_head_dim, cfg.mla_rope_head_dim, cfg.mla_v_head_dim
    L = x_LxD.shape[0]
    if cfg.mla_q_lora_rank is None:
        q = lin(x_LxD, "q")
    else:
        q = lin(numpy_reference._rmsnorm(lin(x_LxD, "q_down"), p["q_norm"]["scale"], cfg.norm_eps), "q_up")
    ckv = numpy_reference._rmsnorm(lin(x_LxD, "kv_down"), p["kv_norm"]["scale"], cfg.norm_eps)
    k_rope = numpy_reference._rope(lin(x_LxD, "k_rope"), cfg.rope_theta)  # one rotary key for all heads
    k_nope, v = lin(ckv, "k_up"), lin(ckv, "v_up")
    out = np.zeros((L, H, U))
    for h in range(H):
        qh = np.concatenate([q[:, h, :N], numpy_reference._rope(q[:, h, N:], cfg.rope_theta)], axis=-1)
        kh = np.concatenate([k_nope[:, h], k_rope], axis=-1)
        s = qh @ kh.T / np.sqrt(N + P)
        for i in range(L):
            w = np.exp(s[i, : i + 1] - s[i, : i + 1].max())
            out[i, h] = (w / w.sum()) @ v[: i + 1, h]
    return lin(out, "o")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_bias=True),  # full-rank queries, v (5) < nope + rope (10): v is padded for the kernel
        dict(mla_q_lora_rank=8, mla_v_head_dim=14, rope_theta=100.0),  # low-rank q, q/k padded instead
    ],
    ids=["fullq-bias", "loraq-wide-v"],
)
def test_mla_matches_numpy_reference(overrides):
    cfg = ModelConfig(**{**TINY, **overrides})
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
    shapes = nn.unbox(jax.eval_shape(MlaAttention(cfg).init, jax.random.key(0), x))["params"]
    params = _random_tree(shapes, 1)
    y = jax.jit(MlaAttention(cfg).apply)({"params": params}, x)
    for b in range(2):
        ref = _np_mla(jax.device_get(params), cfg, np.asarray(x[b], np.float64))
        np.testing.assert_allclose(np.asarray(y[b]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_mla_model_causality_and_mor_signature():
    """Changing token t changes no earlier logit; and the optional MoR arguments with their default meaning
    (keys = the same tokens at positions arange(L)) reproduce the plain call."""
    cfg = ModelConfig(**TINY, mla_q_lora_rank=8)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.vocab_size)
    shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))
    variables = {"params": _random_tree(shapes["params"], 2)}
    apply = jax.jit(Transformer(cfg).apply)
    base = np.asarray(apply(variables, tokens)[0])
    changed = np.asarray(apply(variables, tokens.at[0, 6].set((tokens[0, 6] + 5) % cfg.vocab_size))[0])
    np.testing.assert_array_equal(changed[:, :6], base[:, :6])
    assert np.abs(changed[:, 6:] - base[:, 6:]).max() > 1e-4

    x = jax.random.normal(jax.random.key(3), (2, 7, cfg.d_model))
    attn = MlaAttention(cfg)
    p = {"params": _random_tree(nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x))["params"], 4)}
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))

    @jax.jit
    def both(p, x):
        return attn.apply(p, x), attn.apply(p, x, positions_BxL=pos, kv_BxSxD=x, kv_positions_BxS=pos,
                                            kv_valid_BxS=jnp.ones((2, 7), bool))

    plain, explicit = both(p, x)
    np.testing.assert_allclose(explicit, plain, rtol=1e-5, atol=1e-6)


def _tree(cfg):
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return nn.unbox(shapes)["params"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(mla_q_lora_rank=8, use_bias=True, tie_embeddings=True),
        dict(scan_layers=False, n_layers=3, mla_v_head_dim=None, mla_nope_head_dim=None,
             mla_rope_head_dim=None, mla_kv_lora_rank=None),  # all defaults from head_dim
        dict(family="moe", n_experts=4, moe_top_k=2, n_shared_experts=1, mla_q_lora_rank=6),
    ],
)
def test_param_counts_and_kv_cache_match_tree(overrides):
    cfg = ModelConfig(**{**TINY, **overrides})
    params = _tree(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    layers = [params[k] for k in sorted(params) if k.startswith("blocks")]
    # The cache holds, per layer and token, the kv_down output (latent c_kv) and the k_rope output.
    per_token = sum(math.prod(lyr["attn"][name]["kernel"].shape) // cfg.d_model
                    for lyr in layers for name in ("kv_down", "k_rope"))
    assert kv_cache_bytes_per_token(cfg) == per_token * 4
    assert kv_cache_bytes_per_token(cfg, "bfloat16") == per_token * 2


def test_kv_cache_is_smaller_than_mha():
    """DeepSeek-V2's headline: at its sizes (128 heads of 128 dims, latent 512 + rope 64) the cache is
    (512 + 64) / (2 * 128 * 128) = 1.76% of MHA's."""
    mha = ModelConfig(d_model=5120, n_heads=128, head_dim=128, n_layers=60, max_seq_len=4096)
    mla = mha.replace(attention="mla", mla_kv_lora_rank=512, mla_rope_head_dim=64, mla_nope_head_dim=128,
                      mla_v_head_dim=128, mla_q_lora_rank=1536)
    assert kv_cache_bytes_per_token(mla) / kv_cache_bytes_per_token(mha) == pytest.approx(576 / 32768)
    assert kv_cache_bytes_per_token(mha, "bfloat16") == 60 * 2 * 128 * 128 * 2


def test_training_flops_match_xla_cost_analysis():
    """Same protocol and tolerance as tests/test_accounting.py: XLA counts our matmuls plus elementwise work
    (norms, RoPE, softmax), so it must be above us by at most 2% (measured 1.7%). Low-rank queries, and v
    wider than q/k: the attention is counted at the padded head size; the unpadded count would be 2% lower
    and fail. Unrolled layers."""
    overrides = dict(mla_q_lora_rank=64, mla_v_head_dim=48, mla_nope_head_dim=16, mla_rope_head_dim=16)
    base = dict(vocab_size=128, d_model=128, n_layers=2, n_heads=4, d_ff=256, max_seq_len=64, attention="mla",
                mla_kv_lora_rank=64, mla_rope_head_dim=16, mla_nope_head_dim=32, mla_v_head_dim=32,
                scan_layers=False)
    cfg = ModelConfig(**{**base, **overrides})
    B, L = 2, 64
    model = Transformer(cfg)
    tokens = jnp.zeros((B, L + 1), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1]))

    def loss(p, t):
        logits, _ = model.apply(p, t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

    xla = jax.jit(jax.grad(loss)).lower(params, tokens).compile().cost_analysis()["flops"]
    ours = flops_per_token(cfg, L)["training"] * B * L
    assert ours <= xla <= ours * 1.02, f"XLA {xla:.4g} vs ours {ours:.4g} ({xla / ours - 1:+.2%})"


def test_tiny_mla_training_decreases_loss():
    cfg = ModelConfig(**{**TINY, "n_layers": 1}, mla_q_lora_rank=16)
    model = Transformer(cfg)
    starts = jax.random.randint(jax.random.key(0), (8, 1), 0, cfg.vocab_size)
    data = (starts + jnp.arange(17)[None, :]) % cfg.vocab_size  # each row counts up from a random start
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), data[:, :-1]))["params"]
    params = _random_tree(shapes, 2, scale=0.05)
    tx = optax.adamw(1e-2)

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, data[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, data[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention="gqa"), "attention='gqa' is not one of"),
        (dict(mla_rope_head_dim=3), "mla_rope_head_dim=3 must be even"),
        (dict(n_kv_heads=2), "n_kv_heads=2 with attention='mla'"),
        (dict(qk_norm=True), "qk_norm=True is not supported with attention='mla'"),
        (dict(mla_kv_lora_rank=0), "mla_kv_lora_rank=0 must be a positive integer or None"),
    ],
)
def test_mla_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**{**TINY, **overrides}).validate()


def test_logical_axes_and_optimizer_partition():
    """Every MLA kernel is boxed with logical names (stacked ones lead with "layers"); optim sends the up-
    projections to Muon reducing over their latent (input) axis, and the latent norms to AdamW."""
    import optim

    cfg = ModelConfig(**TINY, mla_q_lora_rank=8)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    specs = nn.get_partition_spec(shapes)["blocks"]["attn"]
    assert tuple(specs["kv_down"]["kernel"]) == ("layers", "embed", "kv_lora")
    assert tuple(specs["k_up"]["kernel"]) == ("layers", "kv_lora", "heads", "head_dim")
    assert tuple(specs["v_up"]["kernel"]) == ("layers", "kv_lora", "heads", "head_dim")
    assert tuple(specs["q_up"]["kernel"]) == ("layers", "q_lora", "heads", "head_dim")
    assert tuple(specs["k_rope"]["kernel"]) == ("layers", "embed", "head_dim")
    assert tuple(specs["o"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
    part = optim.compute_partition(nn.unbox(shapes), nn.get_partition_spec(shapes), optimizer="muon")
    for name, red in [("k_up", 1), ("v_up", 1), ("q_up", 1), ("kv_down", 1), ("o", (1, 2))]:
        info = part.info[f"blocks/attn/{name}/kernel"]
        assert info.optimizer == "muon", name
        assert tuple(np.atleast_1d(info.dimension_numbers.reduction_axis)) == tuple(np.atleast_1d(red)), name
    assert part["blocks/attn/kv_norm/scale"] == "adamw" and part["blocks/attn/q_norm/scale"] == "adamw"


def test_absorbed_decode_matches_forward():
    """Token-by-token decoding over the latent cache (W_uk absorbed into the query, W_uv applied after the
    weighted sum) reproduces the full causal forward at every position; the cache holds exactly the
    kv_lora_rank + rope_head_dim values per token that kv_cache_bytes_per_token counts."""
    from models.mla import init_mla_cache, mla_decode_step

    cfg = ModelConfig(**TINY, use_bias=True, mla_q_lora_rank=8)  # biases: k_up's drops out, v_up's passes
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
    attn = MlaAttention(cfg)
    params = _random_tree(nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x))["params"], 5)
    cache = init_mla_cache(cfg, 2, 12)  # longer than the sequence: the unused tail must stay masked
    per_token = sum(v.shape[-1] for v in cache.values())
    assert per_token * cfg.n_layers * 4 == kv_cache_bytes_per_token(cfg)

    @jax.jit
    def decode_all(params, x, cache):
        def step(cache, inp):
            x_t, t = inp
            y, cache = mla_decode_step(params, cfg, x_t, cache, t)
            return cache, y
        _, ys = jax.lax.scan(step, cache, (jnp.swapaxes(x, 0, 1), jnp.arange(x.shape[1])))
        return jnp.swapaxes(ys, 0, 1), attn.apply({"params": params}, x)

    decoded, full = decode_all(params, x, cache)
    np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max()))


def test_decode_flops_match_xla_cost_analysis():
    """One absorbed decode step at context 512: XLA counts our matmuls plus the elementwise work (norms, RoPE,
    the masked softmax over the context), at most 2% more (measured ~1%)."""
    from models import decode_flops_per_token
    from models.mla import init_mla_cache, mla_decode_step

    cfg = ModelConfig(vocab_size=128, d_model=256, n_layers=1, n_heads=4, max_seq_len=512, attention="mla",
                      mla_kv_lora_rank=128, mla_rope_head_dim=32, mla_nope_head_dim=64, mla_v_head_dim=48,
                      mla_q_lora_rank=96)
    B, T = 4, 512
    params = nn.unbox(jax.eval_shape(MlaAttention(cfg).init, jax.random.key(0),
                                     jnp.ones((B, 1, cfg.d_model))))["params"]
    step = jax.jit(lambda p, x, c: mla_decode_step(p, cfg, x, c, T - 1))
    xla = step.lower(params, jnp.ones((B, cfg.d_model)), init_mla_cache(cfg, B, T)).compile().cost_analysis()
    ours = decode_flops_per_token(cfg, T)["attention_block"] * B
    assert ours <= xla["flops"] <= ours * 1.02, f"XLA {xla['flops']:.4g} vs ours {ours:.4g}"


def test_absorbed_decode_row_with_no_visible_key_stays_finite():
    """A MoR row inactive at a step sees no key (kv_valid all False). Masking with a large finite negative
    (not -inf) makes its softmax uniform over all S cached positions instead of 0/0 = NaN: by hand (float64)
    y = (mean_s c_kv_s W_uv_h + b_uv) W_o + b_o. A row whose keys are all valid is unaffected by the mask."""
    from models.mla import init_mla_cache, mla_decode_step

    cfg = ModelConfig(**TINY, use_bias=True)
    B, S, pos = 2, 6, 3
    x_BxD = jax.random.normal(jax.random.key(1), (B, cfg.d_model))
    params = _random_tree(nn.unbox(jax.eval_shape(MlaAttention(cfg).init, jax.random.key(0),
                                                  x_BxD[:, None, :]))["params"], 7)
    rng = np.random.default_rng(2)
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                         init_mla_cache(cfg, B, S))
    valid_BxS = jnp.asarray([[False] * S, [True] * S])
    step = jax.jit(lambda p, x, c, v: mla_decode_step(p, cfg, x, c, pos, kv_valid_BxS=v))
    y_BxD, new_cache = step(params, x_BxD, cache, valid_BxS)
    y_BxD = np.asarray(y_BxD)
    assert np.isfinite(y_BxD).all()
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    lat_R = np.asarray(new_cache["ckv"], np.float64)[0].mean(axis=0)
    out_HxU = np.einsum("r,rhu->hu", lat_R, p["v_up"]["kernel"]) + p["v_up"]["bias"]
    expected_D = np.tensordot(out_HxU, p["o"]["kernel"], axes=2) + p["o"]["bias"]
    np.testing.assert_allclose(y_BxD[0], expected_D, rtol=1e-4, atol=1e-5)
    y_all_BxD, _ = step(params, x_BxD, cache, None)
    np.testing.assert_allclose(y_BxD[1], np.asarray(y_all_BxD)[1], rtol=1e-6, atol=1e-6)


def test_separate_kv_source_gives_gathered_queries_over_all_keys():
    """The MoR signature's K/V source (kv_BxSxD, its positions): queries of a gathered subset of tokens, at
    their own positions, attending over the latent K/V of the whole sequence equal the full causal forward
    at those positions (each sees the same keys, pos <= its own)."""
    cfg = ModelConfig(**TINY, mla_q_lora_rank=8)
    B, S = 2, 7
    x_BxSxD = jax.random.normal(jax.random.key(3), (B, S, cfg.d_model))
    attn = MlaAttention(cfg)
    p = {"params": _random_tree(nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x_BxSxD))["params"], 4)}
    keep = np.array([1, 4, 6])
    pos_BxS = jnp.broadcast_to(jnp.arange(S), (B, S))

    @jax.jit
    def both(p, x_BxSxD):
        gathered_BxKxD = attn.apply(p, x_BxSxD[:, keep], positions_BxL=pos_BxS[:, keep], kv_BxSxD=x_BxSxD,
                                    kv_positions_BxS=pos_BxS)
        return gathered_BxKxD, attn.apply(p, x_BxSxD)[:, keep]

    gathered, full = both(p, x_BxSxD)
    np.testing.assert_allclose(gathered, full, rtol=1e-5, atol=1e-6)
