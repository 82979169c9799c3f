"""Mixture-of-Recursions (models/mor.py): parameter sharing vs a dense model with tied weights, expert-choice
routing vs a masked (non-gathered) reference, token-choice causality, accounting vs the tree and XLA, and
training."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import (
    ModelConfig,
    MoRTransformer,
    Transformer,
    build_model,
    equal_unique_params_dense,
    flops_per_token,
    param_counts,
)
from models.mor_accounting import mor_kv_cache_bytes_per_token, mor_layout, step_token_counts
from models.transformer import Attention, Block, Embed

TINY = dict(family="mor", vocab_size=61, d_model=32, n_heads=4, d_ff=48, max_seq_len=16)


def _tokens(cfg, B=2, L=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, cfg.vocab_size, dtype=jnp.int32)


def _random_params(cfg, tokens_BxL, seed=0, std=0.2):
    """Random values for every parameter (norm scales 1 + noise), shapes from eval_shape: compiling model.init
    costs many seconds of threefry compilation on CPU, and the initialiser is not what these tests check."""
    shapes = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens_BxL))["params"]
    rng = np.random.default_rng(seed)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = [jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + std * rng.standard_normal(leaf.shape),
                          leaf.dtype) for path, leaf in paths_leaves]
    return jax.tree.unflatten(treedef, leaves)


# Paper (Bae et al. 2025, Fig. 3 / Section 2.1): which unique layer each of the n_layers applications uses.
EXPECTED_TIES = {  # n_layers = 8, N_r = 3 for middle variants; n_layers = 6, N_r = 3 otherwise
    "cycle": (6, ["shared_0", "shared_1"] * 3),
    "sequence": (6, ["shared_0"] * 3 + ["shared_1"] * 3),
    "middle_cycle": (8, ["first_layer"] + ["shared_0", "shared_1"] * 3 + ["last_layer"]),
    "middle_sequence": (8, ["first_layer"] + ["shared_0"] * 3 + ["shared_1"] * 3 + ["last_layer"]),
}


@pytest.mark.parametrize("sharing", list(EXPECTED_TIES))
def test_sharing_ties_the_papers_layers_and_looped_equals_tied_dense(sharing):
    """The param tree holds exactly the unique layers, and the vanilla looped model (router "none") equals a
    dense Transformer whose layer i is a copy of the unique layer the paper's strategy assigns to application
    i."""
    n_layers, ties = EXPECTED_TIES[sharing]
    cfg = ModelConfig(**TINY, n_layers=n_layers, mor_recursions=3, mor_sharing=sharing, mor_router="none")
    tokens = _tokens(cfg)
    params = _random_params(cfg, tokens)
    assert set(params) == {"embed", "final_norm", "lm_head"} | set(ties)
    assert param_counts(cfg)["unique_layers"] == len(set(ties)) == mor_layout(cfg)["unique"]
    dense_cfg = cfg.replace(family="dense", scan_layers=False)
    dense_params = {k: params[k] for k in ("embed", "final_norm", "lm_head")}
    dense_params |= {f"blocks_{i}": params[name] for i, name in enumerate(ties)}
    logits, extras = jax.jit(build_model(cfg).apply)({"params": params}, tokens)
    ref, _ = jax.jit(Transformer(dense_cfg).apply)({"params": dense_params}, tokens)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    assert float(extras["mor_mean_depth"]) == 3.0
    eq = equal_unique_params_dense(cfg)
    assert eq.family == "dense" and param_counts(eq)["total"] == param_counts(cfg)["total"]


def _masked_expert_choice_reference(cfg, params, tokens_BxL):
    """Expert choice written without gathering: every step runs the layer on the whole sequence with keys
    restricted to the selected tokens (kv_valid) and keeps the update only for them. Selection by numpy
    argsort over the still-active tokens, so lax.top_k / gather / scatter in the model are checked
    independently."""
    lay = mor_layout(cfg)
    L = tokens_BxL.shape[1]
    x = Embed(cfg).apply({"params": params["embed"]}, tokens_BxL)
    block = jax.jit(lambda p, x, valid=None: Block(cfg).apply(
        {"params": p}, x, **({} if valid is None else {"kv_valid_BxS": valid}))[0])
    if lay["n_first_last"]:
        x = block(params["first_layer"], x)
    active = np.ones(tokens_BxL.shape, bool)
    kernel = np.asarray(params["router"]["kernel"])
    selections = []
    for r, k in enumerate(step_token_counts(cfg, L)):
        gate = cfg.mor_router_scale / (1 + np.exp(-np.asarray(x) @ kernel[:, r]))  # [B, L]
        ranked = np.argsort(np.where(active, -gate, np.inf), axis=1, kind="stable")
        sel = np.zeros_like(active)
        np.put_along_axis(sel, ranked[:, :k], True, axis=1)
        assert (sel <= active).all()
        out = x
        for j in lay["schedule"][r]:
            out = block(params[f"shared_{j}"], out, jnp.asarray(sel))
        x = x + jnp.asarray(sel * gate)[..., None] * out
        active = sel
        selections.append(sel.sum(axis=1))
    if lay["n_first_last"]:
        x = block(params["last_layer"], x)
    return x, selections


@pytest.mark.parametrize("sharing, capacity", [("cycle", (1.0, 1.0, 1.0)), ("middle_sequence", None)],
                         ids=["cycle-full-capacity", "middle-sequence-paper-schedule"])
def test_expert_choice_matches_masked_reference_and_keeps_scheduled_tokens(sharing, capacity):
    """Full capacity + Cycle is the looped model with the gated update h + g f(h) for every token; with the
    paper's schedule (N_r - r)/N_r each step runs its shared layers on exactly k_r gathered tokens."""
    n_layers = EXPECTED_TIES[sharing][0]
    cfg = ModelConfig(**TINY, n_layers=n_layers, mor_recursions=3, mor_sharing=sharing, mor_capacity=capacity)
    tokens = _tokens(cfg)
    params = _random_params(cfg, tokens)
    model = MoRTransformer(cfg)

    @jax.jit
    def run(p, t):
        return model.apply({"params": p}, t, return_hidden=True, capture_intermediates=True,
                           mutable=["intermediates"])

    (hidden, extras), inter = run(params, tokens)
    ref_x, selections = _masked_expert_choice_reference(cfg, params, tokens)
    ref_hidden = RMSNormRef(cfg, params)(ref_x)
    np.testing.assert_allclose(hidden, ref_hidden, rtol=2e-4, atol=2e-4)
    k_steps = step_token_counts(cfg, 12)
    expected_k = [12, 12, 12] if capacity else [12, 8, 4]
    assert k_steps == expected_k
    for r, sel in enumerate(selections):
        assert (sel == expected_k[r]).all()
        assert float(extras[f"mor_step{r}_fraction"]) == pytest.approx(expected_k[r] / 12)
    # Every call of a shared layer saw exactly k_r tokens; the router at step r scored only the survivors.
    calls = inter["intermediates"]["shared_0"]["__call__"]
    shapes = [c[0].shape[1] for c in calls]
    if sharing == "cycle":  # shared_0 once per step
        assert shapes == expected_k
    else:  # middle_sequence: shared_0 covers the first 3 of the 6 applications (steps 0 and 1 half)
        assert shapes == [12, 12, 8]
    router_calls = [c.shape[1] for c in inter["intermediates"]["router"]["__call__"]]
    assert router_calls == [12] + expected_k[:-1]
    assert float(extras["mor_mean_depth"]) == pytest.approx(sum(expected_k) / 12)
    assert "mor_router_aux_loss" in extras and float(extras["mor_router_aux_loss"]) == pytest.approx(
        cfg.mor_aux_loss_weight * float(extras["mor_router_bce"]))


class RMSNormRef:
    """The final norm applied with the model's own scale (numerically the module under test's last step)."""

    def __init__(self, cfg, params):
        self.eps, self.scale = cfg.norm_eps, np.asarray(params["final_norm"]["scale"])

    def __call__(self, x):
        x = np.asarray(x, np.float64)
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + self.eps) * self.scale


def test_attention_kv_arguments_reduce_to_plain_attention():
    """The MoR hooks in Attention: explicit K/V source == x, all-valid keys, or identity positions change
    nothing; invalid keys are really excluded (equal to attention over the gathered valid subset)."""
    cfg = ModelConfig(**{**TINY, "family": "dense"}, n_layers=1, n_kv_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 10, cfg.d_model))
    attn = Attention(cfg)
    v = {"params": jax.tree.map(lambda a: 0.2 * jax.random.normal(jax.random.key(1), a.shape),
                                nn.unbox(jax.eval_shape(attn.init, jax.random.key(1), x))["params"])}
    keep = np.array([0, 2, 3, 7, 9])
    valid = jnp.zeros((2, 10), bool).at[:, keep].set(True)

    @jax.jit  # one compile for all variants
    def variants(v, x):
        pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
        return (attn.apply(v, x), attn.apply(v, x, positions_BxL=pos), attn.apply(v, x, kv_BxSxD=x),
                attn.apply(v, x, kv_valid_BxS=jnp.ones((2, 10), bool)),
                attn.apply(v, x, kv_valid_BxS=valid)[:, keep],
                attn.apply(v, x[:, keep], positions_BxL=jnp.broadcast_to(jnp.asarray(keep), (2, 5))))

    ref, *same, masked, gathered = variants(v, x)
    for out in same:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked, gathered, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(masked) - np.asarray(ref)[:, keep]).max() > 1e-3  # the mask did something


@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_token_choice_is_causal(kv):
    """Token choice decides each depth from the token's own state and fills step buffers in position order, so
    changing token t leaves every earlier logit unchanged (also with a buffer smaller than the demand)."""
    cfg = ModelConfig(**TINY, n_layers=8, mor_router="token_choice", mor_kv_strategy=kv,
                      mor_capacity=(1.0, 0.5, 0.25), mor_router_scale=1.0)
    tokens = _tokens(cfg, B=1, L=12)
    params = _random_params(cfg, tokens)
    apply = jax.jit(build_model(cfg).apply)
    base, extras = apply({"params": params}, tokens)
    assert 0 < float(extras["mor_balance_loss"])
    for t in (3, 8):
        changed = tokens.at[0, t].set((tokens[0, t] + 7) % cfg.vocab_size)
        out = np.asarray(apply({"params": params}, changed)[0])
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-6, atol=1e-6)
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


@pytest.mark.parametrize("overrides", [
    dict(n_layers=8),
    dict(n_layers=6, mor_sharing="sequence", mor_router="token_choice", tie_embeddings=True),
    dict(n_layers=6, mor_sharing="cycle", mor_router="none", n_kv_heads=2, qk_norm=True, use_bias=True),
    dict(n_layers=10, mor_recursions=4, mor_sharing="middle_cycle", mor_kv_strategy="shared"),
    dict(n_layers=8, attention="mla"),  # latent attention inside the recursion (recursion-wise KV)
])
def test_param_counts_match_tree(overrides):
    cfg = ModelConfig(**{**TINY, **overrides})
    shapes = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), _tokens(cfg)))["params"]
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    counts = param_counts(cfg)
    embedding = math.prod(shapes["embed"]["embedding"].shape) + (
        math.prod(shapes["lm_head"]["kernel"].shape) if "lm_head" in shapes else 0)
    router = math.prod(shapes["router"]["kernel"].shape) if "router" in shapes else 0
    assert counts["total"] == total and counts["embedding"] == embedding and counts["router"] == router
    assert counts["attention"] + counts["mlp"] + counts["norm"] + router + embedding == total
    # "applied": the looped model unrolled, i.e. a dense model of depth n_layers (+ the router).
    dense_counts = param_counts(cfg.replace(family="dense"))
    dense = dense_counts["total"]
    assert counts["applied"] == dense + router
    assert counts["applied_non_embedding"] == dense_counts["non_embedding"] + router
    # the 6N conventions use the applied parameters (what a token passes through at full depth), so a looped
    # model and its unrolled dense twin get the same estimate, up to the router (they were 1/N_r apart)
    from models.accounting import chinchilla_flops_per_token, kaplan_flops_per_token

    dense_cfg = cfg.replace(family="dense")
    assert chinchilla_flops_per_token(cfg) == chinchilla_flops_per_token(dense_cfg) + 6 * router
    assert kaplan_flops_per_token(cfg, 16) == kaplan_flops_per_token(dense_cfg, 16) + 6 * router


def _xla_train_flops(cfg, B, L):
    model = MoRTransformer(cfg)
    tokens = jnp.zeros((B, L + 1), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1]))

    def loss(p, t):
        logits, _ = model.apply(p, t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

    return jax.jit(jax.grad(loss)).lower(params, tokens).compile().cost_analysis()["flops"]


def test_xla_flops_decrease_with_capacity_and_match_accounting():
    """Exited tokens cost nothing: XLA's count of a loss+grad step falls with the capacity schedule and stays
    within a few % above our model-FLOPs count (elementwise ops, gathers, top-k and the router's sigmoid are
    not counted by us; see tests/test_accounting.py for the convention)."""
    base = ModelConfig(family="mor", vocab_size=64, d_model=96, n_heads=2, n_layers=4, d_ff=192,
                       max_seq_len=48, mor_recursions=2, mor_sharing="cycle")
    B, L = 2, 48  # measured: XLA 2.2-2.3% above our count at both capacities
    xla = {}
    for cap in [(1.0, 1.0), (1.0, 0.5)]:
        cfg = base.replace(mor_capacity=cap)
        xla[cap] = _xla_train_flops(cfg, B, L)
        ours = flops_per_token(cfg, L)["training"] * B * L
        assert ours <= xla[cap] <= ours * 1.04, f"{cap}: XLA {xla[cap]:.4g} vs ours {ours:.4g}"
    assert xla[(1.0, 1.0)] > xla[(1.0, 0.5)] * 1.15
    # Recursive KV sharing: model FLOPs reuse the step-0 K/V; what XLA executes (the K/V recomputation from
    # the kept step-0 inputs) is hardware_training.
    cfg = base.replace(mor_capacity=(1.0, 0.5), mor_kv_strategy="shared")
    xla_shared = _xla_train_flops(cfg, B, L)
    f = flops_per_token(cfg, L)
    hardware = f["hardware_training"] * B * L
    assert hardware <= xla_shared <= hardware * 1.04, f"XLA {xla_shared:.4g} vs ours {hardware:.4g}"
    assert f["training"] < f["hardware_training"]


def test_mla_flops_and_kv_cache_accounting():
    """MoR with latent attention: the routed FLOP count (MLA projections, Q.K^T / P.V at the padded head size)
    is within a few % below XLA's count of a loss+grad step (measured 2.8%, as for MHA), and the KV cache
    holds MLA's latent + rotary key per cached layer application, not 2 G K."""
    cfg = ModelConfig(family="mor", vocab_size=64, d_model=96, n_heads=2, n_layers=2, d_ff=192,
                      max_seq_len=48, mor_recursions=2, mor_sharing="cycle", mor_capacity=(1.0, 0.5),
                      attention="mla", mla_kv_lora_rank=48, mla_rope_head_dim=16, mla_nope_head_dim=32,
                      mla_v_head_dim=48, mla_q_lora_rank=32)
    B, L = 2, 48
    xla = _xla_train_flops(cfg, B, L)
    ours = flops_per_token(cfg, L)["training"] * B * L
    assert ours <= xla <= ours * 1.04, f"XLA {xla:.4g} vs ours {ours:.4g}"
    per_app = (48 + 16) * 4  # float32 latent + rotary key
    assert mor_kv_cache_bytes_per_token(cfg) == pytest.approx(per_app * 1 * (1.0 + 0.5))
    assert mor_kv_cache_bytes_per_token(cfg, "bfloat16") == pytest.approx(per_app / 2 * 1.5)
    mla_dense = flops_per_token(cfg.replace(family="dense"), L)  # looped at full depth = dense of n_layers
    looped = flops_per_token(cfg.replace(mor_router="none"), L)
    assert looped["forward"] == pytest.approx(mla_dense["forward"])


def test_accounting_relations():
    cfg = ModelConfig(**TINY, n_layers=8)  # middle_cycle, N_r = 3, expert choice, block of 2
    f = flops_per_token(cfg, 12)
    assert f["expected_depth"] == pytest.approx(2.0)  # (12 + 8 + 4) / 12
    looped = flops_per_token(cfg.replace(mor_router="none"), 12)
    assert looped["expected_depth"] == 3.0 and f["forward"] < looped["forward"]
    assert looped["forward"] - looped["router_forward"] == pytest.approx(
        flops_per_token(cfg.replace(family="dense"), 12)["forward"])
    assert f["training"] == 3 * f["forward"] == f["matmul_training"] + f["attention_training"]
    # KV cache per token: 2 G K bytes per cached layer application.
    per_app = 2 * cfg.n_heads * cfg.resolved_head_dim * 4
    assert mor_kv_cache_bytes_per_token(cfg) == pytest.approx(per_app * (2 + 2 * 2.0))
    assert mor_kv_cache_bytes_per_token(cfg.replace(mor_kv_strategy="shared")) == per_app * (2 + 2)
    # the model's own in-graph report of routed FLOPs equals the analytic count for expert choice
    tokens = _tokens(cfg, L=12)
    extras = jax.eval_shape(build_model(cfg).apply, {"params": _random_params(cfg, tokens)}, tokens)[1]
    assert extras["mor_flops_per_token"].shape == ()


def test_router_flops_and_step_counts_by_hand():
    """Router FLOPs, 2 D per scored token: expert choice scores at step r the n_{r-1} tokens still active (all
    T at step 0), token choice scores every token once per step (its router picks a depth up front). Here
    D = 32, T = 12, N_r = 3 and steps of [12, 7, 3] tokens."""
    from models.mor_accounting import routed_forward_flops

    cfg = ModelConfig(**TINY, n_layers=6, mor_recursions=3, mor_sharing="cycle")
    ec = routed_forward_flops(cfg, 12, [12, 7, 3])["router_forward"]
    assert ec == pytest.approx(2 * 32 * (12 + 12 + 7) / 12)
    tc = routed_forward_flops(cfg.replace(mor_router="token_choice"), 12, [12, 7, 3])["router_forward"]
    assert tc == pytest.approx(2 * 32 * 3 * 12 / 12)
    assert routed_forward_flops(cfg.replace(mor_router="none"), 12, [12, 12, 12])["router_forward"] == 0
    # step sizes floor(f * T): 0.7 * 90 = 62.99999999999999 in floats, but the schedule means 63 tokens
    two = ModelConfig(**TINY, n_layers=2, mor_recursions=2, mor_sharing="cycle", mor_capacity=(1.0, 0.7))
    assert step_token_counts(two, 90) == [90, 63]
    assert step_token_counts(two, 12) == [12, 8]  # 8.4 floors


def test_routed_attention_flops_by_hand():
    """Q.K^T and P.V cost 4 H K FLOPs per query-key pair (H = 4, K = 8: 128). A step's n_r active tokens
    attend among themselves (n_r keys each, "full"; (n_r + 1) / 2 on average, "causal"); with shared KV a
    later step's queries attend all T first-recursion keys; the unique first/last layers see all T tokens.
    T = 12, steps of [12, 6] tokens, one layer per step; per-token values (divided by T)."""
    from models.mor_accounting import routed_forward_flops

    cfg = ModelConfig(**TINY, n_layers=2, mor_recursions=2, mor_sharing="cycle")
    cases = {  # config -> (full, causal) pair counts of the whole sequence
        cfg: (12 * 12 + 6 * 6, 12 * 6.5 + 6 * 3.5),
        cfg.replace(mor_kv_strategy="shared"): (12 * 12 + 6 * 12, 12 * 6.5 + 6 * 6.5),
        cfg.replace(n_layers=4, mor_sharing="middle_cycle"): (3 * 12 * 12 + 6 * 6, 3 * 12 * 6.5 + 6 * 3.5),
    }
    for c, (full, causal) in cases.items():
        for attention, pairs in (("full", full), ("causal", causal)):
            got = routed_forward_flops(c, 12, [12, 6], attention=attention)["attention_forward"]
            assert got == pytest.approx(128 * pairs / 12), (c.mor_sharing, c.mor_kv_strategy, attention)


def test_full_remat_recompute_by_hand():
    """remat="full" recomputes each applied layer's forward except its MLP down projection, plus attention;
    not the router or the head. Middle-cycle, T = 12, steps of [12, 6]: 2 + 1.5 layer applications per
    token, each 4DHK + 4DGK + 6DF = 4096 + 4096 + 9216 = 17408 matmul FLOPs (D = 32, H = G = 4, K = 8,
    F = 48) of which the down projection is 2FD = 3072; attention 128 * (3 * 12 * 12 + 6 * 6) / 12 = 4992."""
    from models.mor_accounting import mor_flops_per_token

    cfg = ModelConfig(**TINY, n_layers=4, mor_recursions=2, mor_sharing="middle_cycle")
    extra = (mor_flops_per_token(cfg.replace(remat="full"), 12)["hardware_training"]
             - mor_flops_per_token(cfg, 12)["hardware_training"])
    assert extra == pytest.approx(3.5 * (17408 - 3072) + 4992)


def test_training_decreases_loss():
    cfg = ModelConfig(**TINY, n_layers=2, mor_recursions=2, mor_sharing="cycle")  # expert choice, B = 1
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    data = jnp.asarray(np.tile(rng.integers(0, cfg.vocab_size, 8), 4)[None, :17].repeat(4, 0), jnp.int32)
    params = {"params": _random_params(cfg, data[:, :-1], std=cfg.init_std)}
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    def loss_fn(p):
        logits, extras = model.apply(p, data[:, :-1])
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), data[:, 1:, None], axis=-1))
        return ce + sum(v for k, v in extras.items() if k.endswith("loss")), ce

    @jax.jit
    def step(p, s):
        (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, ce

    losses = []
    for _ in range(30):
        params, state, ce = step(params, state)
        losses.append(float(ce))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layers=7, mor_sharing="cycle"), "must be a multiple of mor_recursions=3"),
    (dict(n_layers=6), "n_layers - 2 must be a positive multiple"),
    (dict(n_layers=8, mor_sharing="loop"), "mor_sharing='loop' is not one of"),
    (dict(n_layers=8, mor_capacity=(1.0, 0.5)), r"must be a tuple of 3 \(= mor_recursions\) fractions"),
    (dict(n_layers=8, mor_capacity=[1.0, 0.5, 0.25]), r"must be a tuple"),  # a list: unhashable config
    (dict(n_layers=8, mor_capacity=(1.0, 0.5, 0.75)), "must be non-increasing"),
    (dict(n_layers=8, mor_router_activation="softmax"), "mor_router_activation='softmax' is not one of"),
    (dict(n_layers=6, mor_sharing="sequence", mor_kv_strategy="shared"), "needs the same weights"),
    (dict(n_layers=8, mor_kv_strategy="shared", mor_capacity=(0.5, 0.5, 0.5)), "mor_capacity\\[0\\] == 1"),
    (dict(n_layers=8, mor_router="token_choice", mor_aux_loss="bce"), "mor_aux_loss='bce' is not one of"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**TINY, **overrides}).validate()


def test_token_choice_balance_loss_by_hand():
    """Switch balance N_r * sum_i f_i P_i (f_i: fraction of tokens routed to depth i, P_i: mean router
    probability of depth i), 1 when balanced. A zero router kernel gives uniform probabilities P_i = 1/3; the
    argmax tie sends every token to depth 0 (f = [1, 0, 0]), so the balance is 3 * 1/3 = 1. With a random
    kernel (cycle sharing: the router reads the embeddings) f and P come from a numpy softmax."""
    cfg = ModelConfig(**TINY, n_layers=6, mor_recursions=3, mor_sharing="cycle", mor_router="token_choice",
                      mor_balance_loss_weight=0.1)
    tokens = _tokens(cfg)
    params = _random_params(cfg, tokens)
    apply = jax.jit(build_model(cfg).apply)
    zero = {**params, "router": {"kernel": jnp.zeros_like(params["router"]["kernel"])}}
    _, extras = apply({"params": zero}, tokens)
    np.testing.assert_array_equal(extras["mor_depth_load"], [1.0, 0.0, 0.0])
    assert float(extras["mor_balance"]) == pytest.approx(1.0)
    assert float(extras["mor_balance_loss"]) == pytest.approx(0.1)
    _, extras = apply({"params": params}, tokens)
    x = np.asarray(Embed(cfg).apply({"params": params["embed"]}, tokens), np.float64)
    logits = x @ np.asarray(params["router"]["kernel"], np.float64)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    f = np.eye(3)[prob.argmax(-1)].mean(axis=(0, 1))
    assert 0 < f.max() < 1  # not degenerate
    np.testing.assert_allclose(extras["mor_depth_load"], f)
    assert float(extras["mor_balance"]) == pytest.approx(3 * np.sum(f * prob.mean(axis=(0, 1))), rel=1e-5)


def test_token_choice_loss_free_bias():
    """The DeepSeek-V3-style bias lives in "mor_state", steers only the depth choice, and its update moves
    toward balance (overloaded depths down, underloaded up)."""
    from models.mor import router_bias_update

    cfg = ModelConfig(**TINY, n_layers=8, mor_router="token_choice", mor_aux_loss="loss_free",
                      mor_capacity=(1.0, 1.0, 1.0))
    tokens = _tokens(cfg)
    params = _random_params(cfg, tokens)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="keeps a router bias in the 'mor_state' collection"):
        jax.eval_shape(model.apply, {"params": params}, tokens)
    state = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["mor_state"])
    assert jax.tree.map(lambda a: a.shape, state) == {"router_bias": {"router_bias": (3,)}}
    apply = jax.jit(model.apply)
    biased = {"router_bias": {"router_bias": jnp.array([0.0, 0.0, 5.0])}}
    _, extras = apply({"params": params, "mor_state": biased}, tokens)
    np.testing.assert_array_equal(extras["mor_depth_load"], [0.0, 0.0, 1.0])
    assert float(extras["mor_mean_depth"]) == 3.0 and "mor_balance_loss" not in extras
    new = router_bias_update(biased, extras["mor_depth_load"], 0.1)["router_bias"]["router_bias"]
    np.testing.assert_allclose(new, [0.1, 0.1, 4.9])
