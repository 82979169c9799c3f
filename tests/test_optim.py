"""Tests for optim/: partition rules, per-layer Muon orthogonalisation, decay mask, schedules, training.

Parameter trees are built by hand to mimic the models/ convention (DESIGN.md): scanned params carry a leading
"layers" axis, hidden kernels are (input axes..., output axes...), embeddings ("vocab","embed"), lm_head
("embed","vocab"), norm "scale"s, MoE experts ("layers","expert","embed","mlp"). No models import.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from optim import (
    OptimizerConfig,
    adam_sqrt_scaling,
    build_optimizer,
    compute_partition,
    describe_partition,
    linear_scaling_rule,
    make_schedule,
    opt_state_logical_specs,
    sqrt_scaling_rule,
    wsd_decay_start,
)
from optim.partition import path_str

L, D, H, KV, HD, F, V, E = 3, 16, 4, 2, 4, 32, 40, 2

# path -> (shape, logical axes)
SPEC = {
    "embed/embedding": ((V, D), ("vocab", "embed")),
    "layers/attn_norm/scale": ((L, D), ("layers", "embed")),
    "layers/attn/q/kernel": ((L, D, H, HD), ("layers", "embed", "heads", "head_dim")),
    "layers/attn/k/kernel": ((L, D, KV, HD), ("layers", "embed", "kv_heads", "head_dim")),
    "layers/attn/v/kernel": ((L, D, KV, HD), ("layers", "embed", "kv_heads", "head_dim")),
    "layers/attn/o/kernel": ((L, H, HD, D), ("layers", "heads", "head_dim", "embed")),
    "layers/mlp_norm/scale": ((L, D), ("layers", "embed")),
    "layers/mlp/gate/kernel": ((L, D, F), ("layers", "embed", "mlp")),
    "layers/mlp/up/kernel": ((L, D, F), ("layers", "embed", "mlp")),
    "layers/mlp/up/bias": ((L, F), ("layers", "mlp")),
    "layers/mlp/down/kernel": ((L, F, D), ("layers", "mlp", "embed")),
    "layers/moe/router/kernel": ((L, D, E), ("layers", "embed", "expert")),
    "layers/moe/experts/w_in": ((L, E, D, F), ("layers", "expert", "embed", "mlp")),
    "layers/moe/experts/w_out": ((L, E, F, D), ("layers", "expert", "mlp", "embed")),
    "final_norm/scale": ((D,), ("embed",)),
    "lm_head/kernel": ((D, V), ("embed", "vocab")),
}

# path -> (optimizer, decay, (reduction axes, output axes) or None): the documented rules, written out.
EXPECTED = {
    "embed/embedding": ("adamw", False, None),
    "layers/attn_norm/scale": ("adamw", False, None),
    "layers/attn/q/kernel": ("muon", True, ((1,), (2, 3))),
    "layers/attn/k/kernel": ("muon", True, ((1,), (2, 3))),
    "layers/attn/v/kernel": ("muon", True, ((1,), (2, 3))),
    "layers/attn/o/kernel": ("muon", True, ((1, 2), (3,))),
    "layers/mlp_norm/scale": ("adamw", False, None),
    "layers/mlp/gate/kernel": ("muon", True, ((1,), (2,))),
    "layers/mlp/up/kernel": ("muon", True, ((1,), (2,))),
    "layers/mlp/up/bias": ("adamw", False, None),
    "layers/mlp/down/kernel": ("muon", True, ((1,), (2,))),
    "layers/moe/router/kernel": ("adamw", True, None),
    "layers/moe/experts/w_in": ("muon", True, ((2,), (3,))),
    "layers/moe/experts/w_out": ("muon", True, ((2,), (3,))),
    "final_norm/scale": ("adamw", False, None),
    "lm_head/kernel": ("adamw", True, None),
}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *mods, leaf = path.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = v
    return out


def make_tree(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = _nest({p: jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for p, (s, _) in SPEC.items()})
    axes = _nest({p: a for p, (_, a) in SPEC.items()})
    return params, axes


def cfg_for(name: str, **kw) -> OptimizerConfig:
    base = dict(name=name, learning_rate=1.0, weight_decay=0.0, schedule="constant", grad_clip_norm=None)
    base.update(kw)
    return OptimizerConfig(**base)


def _axes_tuple(a) -> tuple[int, ...]:
    return (a,) if isinstance(a, int) else tuple(a)


def _dims(info) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d = info.dimension_numbers
    return _axes_tuple(d.reduction_axis), _axes_tuple(d.output_axis)


# ---------------------------------------------------------------- partition


@pytest.mark.parametrize("axes_kind", ["tuples", "partition_spec", "flax_boxed"])
def test_partition_puts_each_param_where_documented(axes_kind):
    params, axes = make_tree()
    if axes_kind == "partition_spec":
        axes = jax.tree.map(lambda a: P(*a), axes, is_leaf=lambda x: isinstance(x, tuple))
    elif axes_kind == "flax_boxed":
        boxed = _nest({p: nn.LogicallyPartitioned(np.zeros(s, np.float32), names=a)
                       for p, (s, a) in SPEC.items()})
        axes = nn.get_partition_spec(boxed)
        params = jax.tree.map(lambda x: x + 0.1, nn.meta.unbox(boxed))
    part = compute_partition(params, axes, optimizer="muon")
    assert set(part) == set(EXPECTED)
    for path, (opt, decay, dims) in EXPECTED.items():
        info = part.info[path]
        assert part[path] == opt, path
        assert info.decay == decay, path
        if dims is None:
            assert info.dimension_numbers is None, path
        else:
            assert _dims(info) == dims, path


def test_partition_fallback_without_logical_axes_matches_documented_rules():
    params, _ = make_tree()
    with pytest.warns(UserWarning, match="guessed"):
        part = compute_partition(params, None, optimizer="muon")
    for path, (opt, decay, dims) in EXPECTED.items():
        info = part.info[path]
        assert (part[path], info.decay) == (opt, decay), path
        if dims is not None:
            assert _dims(info) == dims, path


def test_partition_fallback_for_unrolled_layers_has_no_stacking_axis():
    # Layers built in a Python loop are named blocks_0, blocks_1 and have no leading layers axis.
    flat = {
        "blocks_0/attn/q/kernel": ((D, H, HD), ((0,), (1, 2))),
        "blocks_0/attn/k/kernel": ((D, KV, HD), ((0,), (1, 2))),
        "blocks_0/attn/o/kernel": ((H, HD, D), ((0, 1), (2,))),
        "blocks_1/mlp/down/kernel": ((F, D), ((0,), (1,))),
        "blocks_1/moe/experts/w_in": ((E, D, F), ((1,), (2,))),
    }
    params = _nest({p: jnp.zeros(s) for p, (s, _) in flat.items()})
    # Shape alone cannot tell these 3-D kernels from an expert stack without "expert" in its path (the next
    # case), so each guessed >= 3-D layout is still announced.
    with pytest.warns(UserWarning, match="4 parameter"):
        part = compute_partition(params, None)
    for path, (_, dims) in flat.items():
        assert part[path] == "muon" and _dims(part.info[path]) == dims, path
    # This repo's unrolled MoE kernel (mlp/gate: experts, embed, mlp) is such a case: read as one 128 x 24
    # matrix, coupling the experts. It used to pass without a warning; only the 2-D kernel is silent.
    moe = _nest({"blocks_0/mlp/gate/kernel": jnp.zeros((4, D, F))})
    with pytest.warns(UserWarning, match="'blocks_0/mlp/gate/kernel'"):
        compute_partition(moe, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_partition(_nest({"blocks_1/mlp/down/kernel": jnp.zeros((F, D))}), None)


def test_partition_rules_for_named_bias_vocab_axis_and_expert_paths():
    """Documented rules beyond make_tree's names: rule 1 covers any leaf named ``*_bias`` (even a 2-D one);
    with logical axes, only a *first* non-batch ``vocab`` axis makes an embedding table (no decay), a later
    one an output head (decay) whatever the path; without them, a path containing ``expert`` takes an expert
    axis only when two axes are left for the matrix (a stacked shared-expert MLP: one matrix per layer)."""
    named = {
        "layers/attn/q_bias": ((L, H, HD), ("layers", "heads", "head_dim")),
        "tok/table": ((V, D), ("vocab", "embed")),
        "readout/kernel": ((D, V), ("embed", "vocab")),
    }
    part = compute_partition(_nest({p: jnp.zeros(s) for p, (s, _) in named.items()}),
                             _nest({p: a for p, (_, a) in named.items()}))
    got = {p: (part[p], part.info[p].decay, part.info[p].rule) for p in named}
    assert got == {
        "layers/attn/q_bias": ("adamw", False, "bias"),
        "tok/table": ("adamw", False, "embedding table"),
        "readout/kernel": ("adamw", True, "output head (vocab axis)"),
    }
    guessed = {
        "layers/shared_expert/up/kernel": ((L, D, F), ((1,), (2,))),  # layers | embed x mlp
        "blocks_0/experts/down/kernel": ((F, D), ((0,), (1,))),  # unrolled, 2-D: no axis to spare
    }
    with pytest.warns(UserWarning, match="guessed"):
        part = compute_partition(_nest({p: jnp.zeros(s) for p, (s, _) in guessed.items()}), None)
    for path, (_, dims) in guessed.items():
        assert part[path] == "muon" and _dims(part.info[path]) == dims, path


def test_partition_leaf_whose_spec_names_no_axis_falls_back_to_the_shape_guess():
    """An all-None spec (PartitionSpec() or (None, None, None)) carries no logical names, so the layout is
    guessed as without logical axes -- the leading axis of a 3-D kernel is the scan layers axis, not part of
    the matrix -- and the guess is announced."""
    for spec in (P(), (None, None, None)):
        params = _nest({"layers/mlp/up/kernel": jnp.zeros((L, D, F))})
        with pytest.warns(UserWarning, match="guessed"):
            part = compute_partition(params, _nest({"layers/mlp/up/kernel": spec}))
        assert part["layers/mlp/up/kernel"] == "muon"
        assert _dims(part.info["layers/mlp/up/kernel"]) == ((1,), (2,)), spec


def test_partition_accepts_the_whole_variables_spec():
    """logical_axes may be the spec of the whole variables dict ({"params": ...}, what
    nn.get_partition_spec(variables) returns) for a params tree without that wrapper."""
    params, axes = make_tree()
    wrapped = compute_partition(params, {"params": axes})
    plain = compute_partition(params, axes)
    assert wrapped.info == plain.info


def test_adamw_partition_is_all_adamw_with_same_decay_flags():
    params, axes = make_tree()
    tx, part = build_optimizer(cfg_for("adamw"), params, axes, total_steps=10)
    assert set(part.values()) == {"adamw"}
    for path, (_, decay, _) in EXPECTED.items():
        assert part.info[path].decay == decay, path


def test_partition_input_errors():
    params, axes = make_tree()
    boxed = {"w": nn.LogicallyPartitioned(jnp.ones((4, 4)), names=("embed", "mlp"))}
    with pytest.raises(ValueError, match="unbox"):
        compute_partition(boxed, None)
    del axes["lm_head"]
    with pytest.raises(ValueError, match="lm_head/kernel"):
        compute_partition(params, axes)
    with pytest.raises(ValueError, match="more entries"):
        compute_partition({"w": jnp.ones((4, 4))}, {"w": ("embed", "mlp", "heads")})


def test_describe_partition_table():
    params, axes = make_tree()
    _, part = build_optimizer(cfg_for("muon"), params, axes, total_steps=10)
    text = describe_partition(part, params)
    lines = {ln.split()[0]: ln for ln in text.splitlines()[2:-1]}
    assert set(lines) == set(EXPECTED)
    o_row = lines["layers/attn/o/kernel"]
    assert "muon" in o_row and f"{L} x [{H * HD}x{D}]" in o_row and " yes " in o_row
    w_in_row = lines["layers/moe/experts/w_in"]
    assert f"{L * E} x [{D}x{F}]" in w_in_row
    emb_row = lines["embed/embedding"]
    assert "adamw" in emb_row and " no " in emb_row
    assert text.splitlines()[-1].startswith("totals: adamw")
    with pytest.raises(ValueError, match="differ"):
        describe_partition(part, {"x": jnp.ones(3)})


def test_describe_partition_decay_column_and_totals():
    """The decay column is the parameter's decay flag, not its group: the AdamW output head and router are
    decayed ("yes"), norms are not. Totals count each group's entries (sizes from SPEC by hand)."""
    params, axes = make_tree()
    _, part = build_optimizer(cfg_for("muon"), params, axes, total_steps=10)
    text = describe_partition(part, params)
    rows = {ln.split()[0]: ln for ln in text.splitlines()[2:-1]}
    for path, (opt, decay, _) in EXPECTED.items():
        assert f" {opt} " in rows[path] and f" {'yes' if decay else 'no'} " in rows[path], rows[path]
    n = {g: sum(math.prod(SPEC[p][0]) for p, e in EXPECTED.items() if e[0] == g) for g in ("adamw", "muon")}
    share = {g: 100 * v / (n["adamw"] + n["muon"]) for g, v in n.items()}
    assert text.splitlines()[-1] == (f"totals: adamw {n['adamw']:,} params ({share['adamw']:.1f}%), "
                                     f"muon {n['muon']:,} params ({share['muon']:.1f}%)")


# ---------------------------------------------------------------- Muon orthogonalisation


def _ill_conditioned(rng, shape, cond=8.0):
    """Random matrix with singular values spread over [1, cond] (orthogonalising it really changes it)."""
    m, n = shape
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    s = np.geomspace(cond, 1.0, k)
    return (u[:, :k] * s) @ v[:, :k].T


LR, WD = 0.5, 0.1


@pytest.fixture(scope="module")
def full_tree_update():
    """Per optimiser: (jitted one-step update on the full model-like tree, partition). Compiled once."""
    params, axes = make_tree()
    out = {}
    for name in ("adamw", "muon"):
        cfg = cfg_for(name, learning_rate=LR, weight_decay=WD)
        tx, part = build_optimizer(cfg, params, axes, total_steps=10)
        out[name] = (jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0]), part)
    return out


def _one_muon_update(params, grads, axes, **cfg_kw):
    tx, part = build_optimizer(cfg_for("muon", **cfg_kw), params, axes, total_steps=10)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    return updates, part


def _singular_values(mat, scale):
    return np.linalg.svd(np.asarray(mat, np.float64) / scale, compute_uv=False)


def _assert_orthogonal(update_2d, grad_2d, scale, what):
    sv = _singular_values(update_2d, scale)
    # 5 quintic NS steps with Jordan's coefficients leave singular values in roughly [0.7, 1.2]
    assert sv.min() > 0.55 and sv.max() < 1.35, (what, sv.min(), sv.max())
    u, _, vt = np.linalg.svd(np.asarray(grad_2d, np.float64), full_matrices=False)
    polar = u @ vt
    cos = np.sum(-np.asarray(update_2d) * polar) / (np.linalg.norm(update_2d) * np.linalg.norm(polar))
    assert cos > 0.95, (what, cos)


def test_muon_orthogonalises_stacked_matrices_per_layer():
    rng = np.random.default_rng(1)
    din, dout = 24, 40
    layer_scales = [1e-3, 1.0, 1e2]  # wildly different gradient scales per layer
    g = np.stack([s * _ill_conditioned(rng, (din, dout)) for s in layer_scales]).astype(np.float32)
    params = {"layers": {"mlp": {"up": {"kernel": jnp.zeros((3, din, dout))}}}}
    axes = {"layers": {"mlp": {"up": {"kernel": ("layers", "embed", "mlp")}}}}
    updates, part = _one_muon_update(params, {"layers": {"mlp": {"up": {"kernel": jnp.asarray(g)}}}}, axes)
    assert part["layers/mlp/up/kernel"] == "muon"
    u = np.asarray(updates["layers"]["mlp"]["up"]["kernel"])
    # lr=1, Moonlight scaling 0.2*sqrt(max(fan_in, fan_out)) with the PER-LAYER fan-in/out.
    scale = 0.2 * math.sqrt(max(din, dout))
    for i in range(3):
        _assert_orthogonal(u[i], g[i], scale, f"layer {i}")
    # muon_consistent_rms=None: Keller Jordan's scale sqrt(max(1, fan_out / fan_in)), again per layer.
    updates, _ = _one_muon_update(params, {"layers": {"mlp": {"up": {"kernel": jnp.asarray(g)}}}}, axes,
                                  muon_consistent_rms=None)
    u = np.asarray(updates["layers"]["mlp"]["up"]["kernel"])
    for i in range(3):
        _assert_orthogonal(u[i], g[i], math.sqrt(dout / din), f"layer {i}, width scaling")

    # The same criterion rejects orthogonalising the flattened (layers*in, out) matrix: the small-gradient
    # layer's share of that matrix is ~0, so its block is nowhere near orthogonal.
    flat_dims = {"w": optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)}
    flat_tx = optax.contrib.muon(1.0, muon_weight_dimension_numbers=flat_dims, consistent_rms=0.2)
    w = {"w": jnp.zeros((3, din, dout))}
    flat, _ = flat_tx.update({"w": jnp.asarray(g)}, flat_tx.init(w), w)
    flat_sv = _singular_values(np.asarray(flat["w"])[0], scale)
    with pytest.raises(AssertionError):
        _assert_orthogonal(np.asarray(flat["w"])[0], g[0], scale, "flattened layer 0")
    assert flat_sv.max() < 0.1


def test_muon_orthogonalises_each_expert_and_attention_kernels_as_documented(full_tree_update):
    rng = np.random.default_rng(2)
    ge = np.zeros((L, E, D, F), np.float32)
    for l in range(L):
        for e in range(E):
            ge[l, e] = 10.0 ** (l - e) * _ill_conditioned(rng, (D, F))
    gq = np.stack([_ill_conditioned(rng, (D, H * HD)) * 10.0**l for l in range(L)]).reshape(L, D, H, HD)
    go = np.stack([_ill_conditioned(rng, (H * HD, D)) * 10.0**-l for l in range(L)]).reshape(L, H, HD, D)
    params, _ = make_tree()
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero params: weight decay adds nothing
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["layers"]["moe"]["experts"]["w_in"] = jnp.asarray(ge)
    grads["layers"]["attn"]["q"]["kernel"] = jnp.asarray(gq, jnp.float32)
    grads["layers"]["attn"]["o"]["kernel"] = jnp.asarray(go, jnp.float32)
    update_fn, _ = full_tree_update["muon"]
    updates = update_fn(grads, zeros)
    ue = np.asarray(updates["layers"]["moe"]["experts"]["w_in"])
    for l in range(L):
        for e in range(E):
            _assert_orthogonal(ue[l, e], ge[l, e], LR * 0.2 * math.sqrt(max(D, F)), f"expert ({l},{e})")
    uq = np.asarray(updates["layers"]["attn"]["q"]["kernel"]).reshape(L, D, H * HD)
    uo = np.asarray(updates["layers"]["attn"]["o"]["kernel"]).reshape(L, H * HD, D)
    for l in range(L):
        scale = LR * 0.2 * math.sqrt(max(D, H * HD))
        _assert_orthogonal(uq[l], gq.reshape(L, D, H * HD)[l], scale, f"q {l}")
        _assert_orthogonal(uo[l], go.reshape(L, H * HD, D)[l], scale, f"o {l}")


def test_muon_internal_adam_branch_is_empty_and_adamw_group_gets_the_rest():
    params, axes = make_tree()
    tx, part = build_optimizer(cfg_for("muon"), params, axes, total_steps=10)
    state = tx.init(params)
    inner = state.inner_states
    muon_internal_adam = inner["muon"].inner_state.inner_states["adam"]
    assert all(np.ndim(x) == 0 for x in jax.tree.leaves(muon_internal_adam))  # only step counters
    adam_mu = inner["adamw"].inner_state[0].mu
    got = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(adam_mu)[0]}
    assert got == {p for p, v in part.items() if v == "adamw"}
    muon_mu = inner["muon"].inner_state.inner_states["muon"].inner_state[0].mu
    got = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(muon_mu)[0]}
    assert got == {p for p, v in part.items() if v == "muon"}


def test_muon_adamw_group_steps_at_adam_learning_rate():
    """With Muon, the AdamW group peaks at adam_learning_rate, not learning_rate. Adam's first step is
    -lr * g / (|g| + eps) (bias-corrected m = g, v = g^2), so every AdamW-group entry moves by 1e-3 exactly
    (no decay, warmup or clipping here), while the Muon group's steps are of order 0.02 * 0.2 * sqrt(fan)."""
    params, axes = make_tree()
    tx, part = build_optimizer(cfg_for("muon", learning_rate=0.02, adam_learning_rate=1e-3), params, axes, 10)
    grads = make_tree(seed=1)[0]
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat_updates = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (kp, u), g in zip(flat_updates, jax.tree.leaves(grads), strict=True):
        if part[path_str(kp)] == "adamw":
            g = np.abs(np.asarray(g, np.float64))
            np.testing.assert_allclose(np.abs(u), 1e-3 * g / (g + 1e-8), rtol=1e-5, err_msg=path_str(kp))
        else:
            assert np.abs(u).max() > 2e-3, path_str(kp)


# ---------------------------------------------------------------- weight decay, clipping, state specs


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_mask(name, full_tree_update):
    params, _ = make_tree()
    update_fn, part = full_tree_update[name]
    zero = jax.tree.map(jnp.zeros_like, params)  # zero gradients: the only change is decay
    new = optax.apply_updates(params, update_fn(zero, params))
    flat_new = dict((path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(new)[0])
    for kp, old in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(kp)
        assert part.info[p].decay == EXPECTED[p][1], p
        factor = 1.0 - LR * WD if EXPECTED[p][1] else 1.0
        np.testing.assert_allclose(flat_new[p], old * factor, rtol=1e-6, atol=1e-7, err_msg=p)


def test_gradient_clipping_by_global_norm_is_in_the_chain():
    params = {"mlp": {"up": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}}
    axes = {"mlp": {"up": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    gnorm = float(optax.tree.norm(grads))
    c = gnorm / 7.0
    # eps=1 makes Adam sensitive to the gradient's scale, so clipping visibly changes the update.
    tx_clip, _ = build_optimizer(cfg_for("adamw", eps=1.0, grad_clip_norm=c), params, axes, 10)
    tx_raw, _ = build_optimizer(cfg_for("adamw", eps=1.0), params, axes, 10)
    u_clip, _ = jax.jit(tx_clip.update)(grads, tx_clip.init(params), params)
    raw_update = jax.jit(tx_raw.update)
    u_ref, _ = raw_update(jax.tree.map(lambda g: g * c / gnorm, grads), tx_raw.init(params), params)
    u_raw, _ = raw_update(grads, tx_raw.init(params), params)
    for a, b, r in zip(jax.tree.leaves(u_clip), jax.tree.leaves(u_ref), jax.tree.leaves(u_raw), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        assert not np.allclose(a, r)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_opt_state_logical_specs_follow_params(name):
    params, axes = make_tree()
    tx, _ = build_optimizer(cfg_for(name), params, axes, total_steps=10)
    specs = opt_state_logical_specs(tx, params, axes)
    shapes = jax.eval_shape(tx.init, params)
    s_leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    p_leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    assert [kp for kp, _ in s_leaves] == [kp for kp, _ in p_leaves]
    n_param_like = 0
    for (kp, sh), (_, spec) in zip(s_leaves, p_leaves, strict=True):
        path = path_str(kp)
        if sh.ndim == 0 or path.endswith("ns_coeffs"):
            assert spec == P(), path
            continue
        n_param_like += 1
        (param_path,) = [q for q in SPEC if path.endswith("/" + q)]
        assert tuple(spec) == SPEC[param_path][1], path
    assert n_param_like >= len(SPEC)


def test_muon_update_sharded_over_8_devices_matches_single_device():
    from jax.sharding import Mesh

    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices from tests/conftest.py")
    params, axes = make_tree()
    grads = jax.tree.map(lambda x: 3.0 * x + 0.01, params)
    tx, _ = build_optimizer(cfg_for("muon", learning_rate=0.1, weight_decay=0.1), params, axes, 10)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
    to_spec = lambda a: P(*a)
    p_shard = nn.logical_to_mesh_sharding(jax.tree.map(to_spec, axes, is_leaf=lambda x: isinstance(x, tuple)),
                                          mesh, rules)
    s_shard = nn.logical_to_mesh_sharding(opt_state_logical_specs(tx, params, axes), mesh, rules)

    def two_steps(g, s, p):
        _, s = tx.update(g, s, p)  # second step: momentum and Nesterov terms are non-trivial
        return tx.update(g, s, p)[0]

    state = jax.jit(tx.init, out_shardings=s_shard)(jax.device_put(params, p_shard))
    u_sharded = jax.jit(two_steps, out_shardings=p_shard)(
        jax.device_put(grads, p_shard), state, jax.device_put(params, p_shard))
    u_single = jax.jit(two_steps)(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u_sharded), jax.tree.leaves(u_single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- training on a tiny problem


def _tiny_lm(seed=0):
    """A 2-layer residual-MLP next-token model in plain jnp with model-like parameter names."""
    rng = np.random.default_rng(seed)
    n_layers, d, f, v = 2, 32, 64, 24
    params = {
        "embed": {"embedding": rng.normal(size=(v, d)) * 1.0},
        "layers": {
            "mlp_norm": {"scale": np.ones((n_layers, d))},
            "mlp": {"up": {"kernel": rng.normal(size=(n_layers, d, f)) / math.sqrt(d)},
                    "down": {"kernel": rng.normal(size=(n_layers, f, d)) / math.sqrt(f) * 0.1}},
        },
        "final_norm": {"scale": np.ones((d,))},
        "lm_head": {"kernel": rng.normal(size=(d, v)) / math.sqrt(d)},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    axes = {
        "embed": {"embedding": ("vocab", "embed")},
        "layers": {"mlp_norm": {"scale": ("layers", "embed")},
                   "mlp": {"up": {"kernel": ("layers", "embed", "mlp")},
                           "down": {"kernel": ("layers", "mlp", "embed")}}},
        "final_norm": {"scale": ("embed",)},
        "lm_head": {"kernel": ("embed", "vocab")},
    }
    tokens_B = jnp.asarray(rng.integers(0, v, size=256))
    targets_B = (tokens_B * 7 + 3) % v  # a fixed, learnable mapping

    def rms(x, s):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s

    def loss_fn(p):
        x_BxD = p["embed"]["embedding"][tokens_B]

        def layer(x, lp):
            h = jax.nn.gelu(rms(x, lp["mlp_norm"]["scale"]) @ lp["mlp"]["up"]["kernel"])
            return x + h @ lp["mlp"]["down"]["kernel"], None

        x_BxD, _ = jax.lax.scan(layer, x_BxD, p["layers"])
        logits_BxV = rms(x_BxD, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxV, targets_B).mean()

    return params, axes, loss_fn


def _teacher_regression(seed=0):
    """Residual 2-layer tanh-MLP stack fit to a random teacher of the same form: only hidden matrices, so
    with name="muon" every parameter is trained by Muon (no AdamW group to do the work instead)."""
    rng = np.random.default_rng(seed)
    n_layers, d, f, n = 2, 16, 32, 256

    def init(down_scale):
        return {"layers": {"mlp": {
            "up": {"kernel": rng.normal(size=(n_layers, d, f)) / math.sqrt(d)},
            "down": {"kernel": rng.normal(size=(n_layers, f, d)) / math.sqrt(f) * down_scale}}}}

    teacher = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init(1.0))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init(0.1))
    axes = {"layers": {"mlp": {"up": {"kernel": ("layers", "embed", "mlp")},
                               "down": {"kernel": ("layers", "mlp", "embed")}}}}
    x_NxD = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)

    def forward(p, x):
        def layer(x, lp):
            return x + jnp.tanh(x @ lp["mlp"]["up"]["kernel"]) @ lp["mlp"]["down"]["kernel"], None

        return jax.lax.scan(layer, x, p["layers"])[0]

    y_NxD = forward(teacher, x_NxD)
    return params, axes, lambda p: jnp.mean((forward(p, x_NxD) - y_NxD) ** 2)


@pytest.mark.parametrize(
    "problem,name,lr,groups",
    [
        ("lm", "adamw", 1e-2, {"adamw"}),
        ("lm", "muon", 1e-2, {"adamw", "muon"}),
        ("regression", "adamw", 1e-2, {"adamw"}),
        ("regression", "muon", 3e-2, {"muon"}),
    ],
)
def test_both_optimisers_decrease_the_loss(problem, name, lr, groups):
    params, axes, loss_fn = _tiny_lm() if problem == "lm" else _teacher_regression()
    cfg = OptimizerConfig(name=name, learning_rate=lr, weight_decay=0.01, warmup_steps=5, schedule="cosine")
    steps = 40
    tx, part = build_optimizer(cfg, params, axes, total_steps=steps)
    assert set(part.values()) == groups
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------- schedules


def test_cosine_schedule_key_steps_and_optax_reference():
    cfg = OptimizerConfig(learning_rate=2.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    T = 110
    sched = make_schedule(cfg, T)
    np.testing.assert_allclose(sched(0), 2.0 / 10, rtol=1e-6)
    np.testing.assert_allclose(sched(9), 2.0, rtol=1e-6)  # warmup end
    np.testing.assert_allclose(sched(10), 2.0, rtol=1e-6)  # decay start
    np.testing.assert_allclose(sched(60), 2.0 * (0.1 + 0.9 * 0.5), rtol=1e-6)  # half-way
    np.testing.assert_allclose(sched(T), 0.2, rtol=1e-6)  # end
    ref = optax.cosine_decay_schedule(2.0, T - 10, alpha=0.1)
    for s in range(10, T + 5, 7):
        np.testing.assert_allclose(sched(s), ref(s - 10), rtol=1e-5)
    assert np.all(np.diff(np.array([sched(s) for s in range(10, T)])) <= 1e-7)


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_schedule_key_steps(shape, mid):
    cfg = OptimizerConfig(learning_rate=1.0, schedule="wsd", warmup_steps=5, decay_fraction=0.2,
                          decay_shape=shape, min_lr_ratio=0.0)
    T = 100
    sched = make_schedule(cfg, T)
    start = wsd_decay_start(cfg, T)
    assert start == 80
    np.testing.assert_allclose(sched(4), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sched(50), 1.0, rtol=1e-6)  # stable
    np.testing.assert_allclose(sched(start), 1.0, rtol=1e-6)  # decay start
    np.testing.assert_allclose(sched(start + 10), mid, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sched(T), 0.0, atol=1e-7)
    assert float(sched(T - 1)) > 0.0
    # the three shapes differ where they should: 1-sqrt drops fastest right after the decay starts
    if shape == "1-sqrt":
        lin = make_schedule(dataclasses.replace(cfg, decay_shape="linear"), T)
        assert float(sched(start + 1)) < float(lin(start + 1))


def test_wsd_decay_start_rounds_the_decay_length():
    """S = T - round(decay_fraction * T): 0.2 * 13 = 2.6 rounds to 3, so the cool-down starts at step 10
    (truncating to 2 would start it one step late, at 11)."""
    cfg = OptimizerConfig(learning_rate=1.0, schedule="wsd", warmup_steps=0, decay_fraction=0.2,
                          decay_shape="linear", min_lr_ratio=0.0)
    assert wsd_decay_start(cfg, 13) == 10
    sched = make_schedule(cfg, 13)
    np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)  # first cool-down step is at the peak
    np.testing.assert_allclose(sched(11), 1.0 - 1 / 3, rtol=1e-6)  # linear: p = (11 - 10) / (13 - 10)


def test_constant_schedule_and_peak_override():
    cfg = OptimizerConfig(learning_rate=0.3, schedule="constant", warmup_steps=4)
    sched = make_schedule(cfg, 50)
    np.testing.assert_allclose([sched(s) for s in (0, 3, 4, 49, 50)], [0.075, 0.3, 0.3, 0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(make_schedule(cfg, 50, peak_value=0.1)(10), 0.1, rtol=1e-6)
    assert jnp.isfinite(jax.jit(sched)(jnp.int32(3)))


@pytest.mark.parametrize(
    "kw",
    [
        {"schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
        {"schedule": "wsd", "warmup_steps": 3, "decay_fraction": 0.3, "decay_shape": "1-sqrt"},
        {"schedule": "wsd", "warmup_steps": 0, "decay_fraction": 0.2, "decay_shape": "linear"},
        {"schedule": "constant", "warmup_steps": 2},
        {"schedule": "cosine", "warmup_steps": 40},  # warmup to the end: no decay phase
    ],
)
def test_schedule_with_traced_parameters_matches_the_host_schedule(kw):
    """The train step computes the lr from traced schedule parameters; one jitted function must reproduce
    every schedule kind exactly (the same compiled step serves them all)."""
    from optim.schedules import schedule_from_params, schedule_params

    cfg = OptimizerConfig(learning_rate=0.02, **kw)
    steps = jnp.arange(41)
    host = np.array([float(make_schedule(cfg, 40)(int(s))) for s in steps])
    traced = jax.jit(lambda p, s: jax.vmap(schedule_from_params(p))(s))
    params = jax.tree.map(np.float32, schedule_params(cfg, 40))
    # (to 1 ulp: XLA's vectorised cos in the jitted vmap vs the eager scalar one)
    np.testing.assert_allclose(np.asarray(traced(params, steps)), host, rtol=3e-7, atol=0)
    assert traced._cache_size() == 1
    other = jax.tree.map(np.float32, schedule_params(OptimizerConfig(learning_rate=0.5), 17))
    traced(other, steps)
    assert traced._cache_size() == 1  # another schedule, same compiled function


def test_schedule_errors():
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule(OptimizerConfig(warmup_steps=20), 10)
    with pytest.raises(ValueError, match="before warmup ends"):
        make_schedule(OptimizerConfig(schedule="wsd", warmup_steps=90, decay_fraction=0.2), 100)
    # a cool-down of 0 or 1 steps: its first step is at the peak, so the run never decayed, silently
    for steps, fraction in ((10, 0.1), (4, 0.1), (100, 0.0)):
        with pytest.raises(ValueError, match=r"WSD cool-down of [01] step\(s\).*would not decay"):
            make_schedule(OptimizerConfig(schedule="wsd", warmup_steps=1, decay_fraction=fraction), steps)
    assert float(make_schedule(OptimizerConfig(schedule="wsd", warmup_steps=1, decay_fraction=0.2,
                                               min_lr_ratio=0.0), 10)(9)) < 0.5e-3
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(OptimizerConfig(), 0)


def test_schedule_refuses_a_zero_peak_override():
    """peak_value bypasses the config's learning_rate check, so the schedule checks it itself: a peak of 0
    would train nothing (every lr = 0 * factor), silently."""
    with pytest.raises(ValueError, match="peak learning rate must be > 0"):
        make_schedule(OptimizerConfig(), 10, peak_value=0.0)


@pytest.mark.parametrize("kw", [{"schedule": "cosine"}, {"schedule": "wsd", "decay_shape": "linear"},
                                {"schedule": "wsd", "decay_shape": "1-sqrt"}])
def test_schedule_stays_at_the_floor_after_total_steps(kw):
    """Progress is clipped to [0, 1]: past total_steps (a run continued beyond its plan) the lr stays at
    min_lr_ratio * peak = 0.1 * 2 = 0.2 -- a linear cool-down would go negative, a cosine one back up."""
    cfg = OptimizerConfig(learning_rate=2.0, warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1, **kw)
    sched = make_schedule(cfg, 20)
    np.testing.assert_allclose([float(sched(s)) for s in (20, 25, 30, 60)], 0.2, rtol=1e-6)


def test_wsd_cool_down_may_start_exactly_where_warmup_ends():
    """decay start S = 10 - round(0.2 * 10) = 8 = warmup: no stable phase, but allowed (only S < warmup is
    refused). lr: (s + 1) / 8 during warmup, the peak at s = 8, then linear 1 - (s - 8) / 2."""
    cfg = OptimizerConfig(learning_rate=1.0, schedule="wsd", warmup_steps=8, decay_fraction=0.2,
                          decay_shape="linear", min_lr_ratio=0.0)
    sched = make_schedule(cfg, 10)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 7, 8, 9, 10)], [1 / 8, 1.0, 1.0, 0.5, 0.0],
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- config and scaling rules


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("name", "sgd", "optimizer.name='sgd' is unknown"),
        ("learning_rate", -1e-3, "learning_rate must be > 0"),
        ("learning_rate", float("nan"), "learning_rate must be finite"),
        ("schedule", "linear", "optimizer.schedule='linear' is unknown"),
        ("decay_shape", "sqrt", "decay_shape='sqrt' is unknown"),
        ("weight_decay", -0.1, "weight_decay"),
        ("b2", 1.0, "b2"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
        ("warmup_steps", 2.5, "warmup_steps must be an int"),
        ("ns_steps", 0, "ns_steps"),
        ("decay_fraction", 1.5, "decay_fraction"),
        ("min_lr_ratio", -0.1, "min_lr_ratio"),
        ("grad_clip_norm", 0.0, "grad_clip_norm"),
        ("adam_learning_rate", -1.0, "adam_learning_rate"),
        ("nesterov", 1, "nesterov must be a bool"),
        ("learning_rate", True, "learning_rate must be a number"),
    ],
)
def test_config_validation_errors(field, value, match):
    cfg = dataclasses.replace(OptimizerConfig(), **{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.validate()
    params, axes = make_tree()
    with pytest.raises(ValueError, match=match):
        build_optimizer(cfg, params, axes, total_steps=10)


def test_default_configs_validate():
    assert OptimizerConfig().validate() == OptimizerConfig()
    OptimizerConfig(name="muon", schedule="wsd", grad_clip_norm=None, muon_consistent_rms=None).validate()


def test_lr_batch_scaling_rules():
    assert linear_scaling_rule(0.1, 256, 1024) == pytest.approx(0.4)
    assert sqrt_scaling_rule(1e-3, 256, 1024) == pytest.approx(2e-3)
    cfg = OptimizerConfig(learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-8)
    new = adam_sqrt_scaling(cfg, 64, 256)  # kappa = 4
    assert new.learning_rate == pytest.approx(2e-3)
    assert new.b1 == pytest.approx(0.6) and new.b2 == pytest.approx(0.96)
    assert new.eps == pytest.approx(5e-9)
    # Muon's AdamW group lr follows the same sqrt(kappa) rule; None (= learning_rate) stays None
    muon = adam_sqrt_scaling(dataclasses.replace(cfg, name="muon", adam_learning_rate=3e-4), 64, 256)
    assert muon.adam_learning_rate == pytest.approx(6e-4) and new.adam_learning_rate is None
    back = adam_sqrt_scaling(new, 256, 64)
    assert back.b1 == pytest.approx(0.9) and back.learning_rate == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="too large"):
        adam_sqrt_scaling(cfg, 1, 20)
    with pytest.raises(ValueError, match="batch_size"):
        sqrt_scaling_rule(1e-3, 0, 10)


def test_lr_batch_scaling_rejects_non_positive_or_bool_batch_sizes():
    """Both batch sizes are validated (a zero target batch would give lr 0; True is not a batch size of 1)."""
    for base, new in ((10, 0), (10, -4), (10, float("nan")), (True, 4), (4, True)):
        for rule in (linear_scaling_rule, sqrt_scaling_rule):
            with pytest.raises(ValueError, match="batch_size must be a positive number"):
                rule(0.1, base, new)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive number"):
        linear_scaling_rule(0.1, 10, 0)


def test_adam_sqrt_scaling_refuses_a_rule_that_zeroes_the_momentum():
    """kappa * (1 - b1) = 2 * 0.5 = 1 exactly: the rule's b1 would be 0, no momentum at all; the boundary is
    refused (kappa * (1 - beta) >= 1), not only values beyond it."""
    with pytest.raises(ValueError, match="1 - b1 = 1 >= 1"):
        adam_sqrt_scaling(OptimizerConfig(b1=0.5, b2=0.99), 1, 2)
    with pytest.raises(ValueError, match="1 - b2 = 1 >= 1"):
        adam_sqrt_scaling(OptimizerConfig(b1=0.9, b2=0.75), 1, 4)


def test_newton_schulz_flops_match_xla_cost_analysis_of_optax_muon():
    """Our analytic count of Muon's orthogonalisation FLOPs vs XLA's count for optax's own Newton-Schulz on
    the same leaves (optax's NS is called directly: it is what optax.contrib.muon runs per leaf)."""
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    from optim.muon import NS_COEFFS, newton_schulz_flops

    # wider than SPEC so matmuls dominate the O(s*l) elementwise work XLA also counts
    spec = {
        "layers/attn/q/kernel": ((2, 64, 4, 16), ("layers", "embed", "heads", "head_dim")),
        "layers/attn/o/kernel": ((2, 4, 16, 64), ("layers", "heads", "head_dim", "embed")),
        "layers/mlp/up/kernel": ((2, 64, 256), ("layers", "embed", "mlp")),
        "layers/moe/experts/w_out": ((2, 3, 256, 64), ("layers", "expert", "mlp", "embed")),
        "lm_head/kernel": ((64, 40), ("embed", "vocab")),  # AdamW: not counted
    }
    params = _nest({p: jnp.zeros(s, jnp.float32) for p, (s, _) in spec.items()})
    part = compute_partition(params, _nest({p: a for p, (_, a) in spec.items()}), optimizer="muon")
    ours = newton_schulz_flops(part, ns_steps=5)
    muon_leaves = {p: a for p, a in part.info.items() if a.dimension_numbers is not None}
    assert len(muon_leaves) == 4

    def ns_all(xs):
        return {p: orthogonalize_via_newton_schulz(xs[p], jnp.asarray(NS_COEFFS), 5,
                                                   dimension_numbers=a.dimension_numbers)
                for p, a in muon_leaves.items()}

    xs = {p: jnp.ones(a.shape, jnp.float32) for p, a in muon_leaves.items()}
    xla = jax.jit(ns_all).lower(xs).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert ours <= xla["flops"] <= 1.05 * ours, (ours, xla["flops"])
    # by hand for the MLP leaf: 2 layers of a 64 x 256 matrix, 5 iterations of 4 s^2 l + 2 s^3
    one = newton_schulz_flops(type(part)([part.info["layers/mlp/up/kernel"]]), ns_steps=5)
    assert one == 2 * 5 * (4 * 64 * 64 * 256 + 2 * 64**3)


def test_most_square_split_ties_go_to_the_earliest_split():
    """(2, 4, 2) splits as 2 | 8 or 8 | 2, equally far from square: the first, fewest reduction axes, wins;
    otherwise the squarest split wins wherever it lies."""
    from optim.partition import _most_square_split

    assert _most_square_split((2, 4, 2), (0, 1, 2)) == ((0,), (1, 2))
    assert _most_square_split((2, 3, 8), (0, 1, 2)) == ((0, 1), (2,))  # 6 | 8 beats 2 | 24
    assert _most_square_split((5, 7, 3, 1), (1, 2, 3)) == ((1,), (2, 3))  # 7 | 3 beats 21 | 1
