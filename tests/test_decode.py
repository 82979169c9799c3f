"""KV-cache decoding (models/decode.py): decoding token by token reproduces the full forward's logits for
every family and attention kind, the cache is really used, and its size matches the accounting."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig, build_model, kv_cache_bytes_per_token
from models.decode import decode_logits, decode_step, init_cache, kv_cache_bytes

BASE = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)
MLA = dict(attention="mla", mla_kv_lora_rank=12, mla_rope_head_dim=4, mla_nope_head_dim=6, mla_v_head_dim=5)
MOE = dict(family="moe", n_experts=4, moe_top_k=2, moe_d_ff=24)
MOR = dict(family="mor", n_layers=4, mor_recursions=2, mor_sharing="middle_cycle")  # first, 1 shared, last
L = 10


def _tokens(cfg, B=2, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, cfg.vocab_size, dtype=jnp.int32)


def _random_variables(cfg, seed=0, std=0.25):
    """Random values for every variable (norm scales 1 + noise; router biases too, so decoding must read the
    model state). Shapes from eval_shape: compiling model.init would cost more than the tests themselves."""
    shapes = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), _tokens(cfg)))
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = [jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + std * rng.standard_normal(x.shape),
                          x.dtype) for path, x in flat]
    return jax.tree.unflatten(treedef, leaves)


@functools.cache
def _jitted_forward(cfg, causal_routing=False):
    kwargs = {"causal_routing": True} if causal_routing else {}
    return jax.jit(lambda v, t: build_model(cfg).apply(v, t, **kwargs))


def _forward(cfg, variables, tokens, causal_routing=False):
    return _jitted_forward(cfg, causal_routing)(variables, tokens)[0]


def _assert_close(decoded, forward):
    decoded, forward = np.asarray(decoded), np.asarray(forward)
    np.testing.assert_allclose(decoded, forward, rtol=1e-4, atol=1e-4 * np.abs(forward).max())


CASES = {
    "dense-gqa-qknorm-bias-unrolled": dict(BASE, n_kv_heads=2, qk_norm=True, use_bias=True, scan_layers=False,
                                           tie_embeddings=True),
    "moe-shared-firstdense-bias": dict(BASE, **MOE, n_layers=3, n_shared_experts=1, moe_first_dense_layers=1,
                                       moe_router="sigmoid", moe_bias_update_rate=0.01),
    "mla-dense-loraq": dict(BASE, **MLA, mla_q_lora_rank=8),
    "mla-moe-unrolled": dict(BASE, **MOE, **MLA, scan_layers=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_forward(name):
    cfg = ModelConfig(**CASES[name])
    variables = _random_variables(cfg)
    tokens = _tokens(cfg)
    _assert_close(jax.jit(functools.partial(decode_logits, cfg))(variables, tokens),
                  _forward(cfg, variables, tokens))


MOR_CASES = {
    # expert choice (causal inference routing) with each KV strategy; capacity < 1 at step 1
    "ec-recursion_wise": dict(MOR, mor_router_scale=1.0),
    "ec-shared": dict(MOR, mor_router_scale=1.0, mor_kv_strategy="shared", n_kv_heads=2),
    # token choice with each KV strategy: slot budget 5 of 10 at step 1; in the loss-free case the test biases
    # the router toward depth 1 so that more tokens want step 1 than it has slots (overflow is exercised)
    "tc-recursion_wise-lossfree": dict(MOR, mor_router="token_choice", mor_aux_loss="loss_free",
                                       mor_router_scale=1.0),
    "tc-shared-cycle-sigmoid": dict(MOR, n_layers=2, mor_sharing="cycle", mor_router="token_choice",
                                       mor_router_activation="sigmoid", mor_kv_strategy="shared"),
    "ec-mla-tanh": dict(MOR, **MLA, mor_router_activation="tanh", mor_capacity=(1.0, 0.5)),
    "looped-none": dict(MOR, mor_router="none", qk_norm=True),
}


@pytest.mark.parametrize("name", list(MOR_CASES))
def test_mor_decode_matches_forward(name):
    """Expert choice decodes with the router's causal decision, so it equals the forward in that inference
    mode (``causal_routing=True``), which differs from the training top-k; token choice and the looped model
    are causal already: decode == the training forward."""
    cfg = ModelConfig(**BASE | MOR_CASES[name])
    variables = _random_variables(cfg)
    if cfg.mor_aux_loss == "loss_free":  # + 0.3 on depth 1: 9 of the 20 tokens want step 1, whose 5 slots
        variables["mor_state"] = {"router_bias": {"router_bias": jnp.array([0.0, 0.3])}}  # per row can't fit
    tokens = _tokens(cfg)
    ec = cfg.mor_router == "expert_choice"
    forward, extras = _jitted_forward(cfg, ec)(variables, tokens)
    _assert_close(jax.jit(functools.partial(decode_logits, cfg))(variables, tokens), forward)
    if cfg.mor_aux_loss == "loss_free":  # the slot budget really bound: decode must drop the same tokens
        assert float(extras["mor_dropped_fraction"]) > 0.0
    if cfg.mor_router != "none":  # the routing really was partial: some tokens exited at the last step
        assert 0.0 < float(extras[f"mor_step{cfg.mor_recursions - 1}_fraction"]) < 1.0
    if name == "ec-recursion_wise":  # the per-token threshold is not the top-k: a different selection
        assert np.abs(np.asarray(forward) - np.asarray(_forward(cfg, variables, tokens))).max() > 1e-3


@pytest.mark.parametrize("name", ["ec-recursion_wise", "tc-recursion_wise-lossfree", "ec-shared"])
def test_mor_decode_skips_steps_no_row_needs_with_the_same_result(name):
    """At batch 1 a token that exited skips the later recursion steps (``skip_exited``, a lax.cond): the
    logits and the cache are those of running the steps masked, and the skip really happened."""
    cfg = ModelConfig(**BASE | MOR_CASES[name])
    variables = _random_variables(cfg)
    tokens_L = _tokens(cfg)[0]
    out = {}
    for skip in (True, False):
        step = jax.jit(functools.partial(decode_step, cfg, skip_exited=skip))
        cache = init_cache(cfg, 1, tokens_L.shape[0])
        logits = []
        for pos in range(tokens_L.shape[0]):
            logits_1xV, cache = step(variables, cache, tokens_L[pos:pos + 1], pos)
            logits.append(np.asarray(logits_1xV[0]))
        out[skip] = (np.stack(logits), cache)
        hlo = step.lower(variables, cache, tokens_L[:1], 0).as_text()
        assert ("stablehlo.case" in hlo or "stablehlo.if" in hlo) == skip, skip
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    (_, skipped), (_, masked) = out[True], out[False]
    steps_skipped, steps_masked = skipped["kv"].pop("steps"), masked["kv"].pop("steps")
    jax.tree.map(close, skipped, masked)  # first/last layers, router state, active / routed masks
    if "active" not in skipped:  # recursive KV sharing: only the first step has caches, never skipped
        jax.tree.map(close, steps_skipped, steps_masked)
        return
    # K/V of a skipped step are not written; no query reads them (inactive). The active entries agree.
    active_RxS = np.asarray(skipped["active"])[:, 0]
    for r, (a, b) in enumerate(zip(steps_skipped, steps_masked, strict=True)):
        keep = active_RxS[r]
        jax.tree.map(lambda x, y, keep=keep: close(np.asarray(x)[:, keep], np.asarray(y)[:, keep]), a, b)
    last_S = active_RxS[-1]  # the last step had positions with no active row: those were skipped
    assert 0 < last_S.sum() < last_S.size, last_S
    assert not np.allclose(jax.tree.leaves(steps_skipped[-1])[0], jax.tree.leaves(steps_masked[-1])[0])


def test_decode_uses_the_cache():
    """Changing an earlier token changes the later decoded logits exactly as the forward's (a decoder that
    ignored its cache would only see the current token), and leaves the earlier ones alone. Also checks the
    jitted single-step API and that a step at position t does not read cache entries beyond t."""
    cfg = ModelConfig(**BASE)  # plain multi-head attention, scanned layers
    variables = _random_variables(cfg)
    tokens = _tokens(cfg)
    step = jax.jit(functools.partial(decode_step, cfg))

    def decode(tokens_BxL, cache):
        rows = []
        for t in range(L):
            logits, cache = step(variables, cache, tokens_BxL[:, t], t)
            rows.append(logits)
        return np.stack(rows, axis=1)

    cache = init_cache(cfg, 2, L)
    base = decode(tokens, jax.tree.map(lambda a: a + 1e3, cache))  # garbage beyond pos must stay invisible
    _assert_close(base, _forward(cfg, variables, tokens))
    t = 4
    changed = tokens.at[:, t].set((tokens[:, t] + 3) % cfg.vocab_size)
    decoded = decode(changed, cache)
    _assert_close(decoded, _forward(cfg, variables, changed))
    np.testing.assert_allclose(decoded[:, :t], base[:, :t], rtol=1e-6, atol=1e-6)
    assert np.abs(decoded[:, t + 1:] - base[:, t + 1:]).min(axis=-1).max() > 1e-4  # later positions see it


@pytest.mark.parametrize("overrides", [
    dict(BASE),
    dict(BASE, n_kv_heads=1, scan_layers=False),
    dict(BASE, **MLA),
    dict(BASE, **MOE, **MLA, n_layers=3, moe_first_dense_layers=1, compute_dtype="bfloat16"),
    dict(BASE | MOR, mor_kv_strategy="shared"),
    dict(BASE | MOR, mor_capacity=(1.0, 1.0)),
    dict(BASE | MOR | MLA, mor_router="none"),
])
def test_kv_cache_bytes_match_accounting(overrides):
    """The allocated K/V arrays equal kv_cache_bytes_per_token * batch * length (MoR: at capacity 1 or with
    shared KV, where allocated = expected)."""
    cfg = ModelConfig(**overrides)
    B, S = 3, 12
    assert kv_cache_bytes(cfg, B, S) == kv_cache_bytes_per_token(cfg) * B * S


def test_mor_kv_cache_bytes_bound_expected():
    """With capacity < 1 the recursion-wise cache allocates every step (static shapes): more than the expected
    bytes the accounting reports, exactly the capacity-1 amount; KV sharing stores less than either."""
    cfg = ModelConfig(**BASE | MOR)  # capacity (1, 1/2)
    B, S = 2, 8
    full = cfg.replace(mor_capacity=(1.0, 1.0))
    assert kv_cache_bytes(cfg, B, S) == kv_cache_bytes(full, B, S) > kv_cache_bytes_per_token(cfg) * B * S
    shared = cfg.replace(mor_kv_strategy="shared")
    assert kv_cache_bytes(shared, B, S) < kv_cache_bytes_per_token(cfg) * B * S


def test_bad_arguments():
    cfg = ModelConfig(**BASE)
    with pytest.raises(ValueError, match="max_len=17 exceeds max_seq_len=16"):
        init_cache(cfg, 1, 17)
    with pytest.raises(ValueError, match="batch=0 must be a positive integer"):
        init_cache(cfg, 0, 4)
    with pytest.raises(ValueError, match=r"tokens_B must be an integer array \[batch\]"):
        decode_step(cfg, {"params": {}}, init_cache(cfg, 1, 4), jnp.zeros((1, 1), jnp.int32), 0)


def test_cache_may_span_the_whole_max_seq_len():
    """max_len = max_seq_len is the longest sequence the forward accepts, so the cache allows it: stacked
    K/V of [n_layers=2, B=1, S=16, H=4, K=32/4=8]."""
    cache = init_cache(ModelConfig(**BASE), 1, 16)
    assert cache["kv"]["blocks"]["k"].shape == cache["kv"]["blocks"]["v"].shape == (2, 1, 16, 4, 8)


@pytest.mark.parametrize("overrides", [{}, dict(scan_layers=False), MLA, {**MOE, "moe_first_dense_layers": 1},
                                       MOR])
def test_concrete_position_outside_the_cache_is_refused(overrides):
    """A concrete pos >= max_len (or < 0) would be clamped by dynamic_update_slice and overwrite the last
    (first) slot silently; every cache layout (stacked or unrolled layers, MLA, MoE, MoR) names it."""
    cfg = ModelConfig(**{**BASE, **overrides})
    variables = _random_variables(cfg)
    cache = init_cache(cfg, 2, 6)
    tokens_B = jnp.zeros((2,), jnp.int32)
    decode_step(cfg, variables, cache, tokens_B, 5)  # the last slot is fine
    for pos in (6, -1):
        with pytest.raises(ValueError, match=rf"pos={pos} is outside the cache's positions \[0, 6\)"):
            decode_step(cfg, variables, cache, tokens_B, pos)
