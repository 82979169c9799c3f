"""optim/muon_lowp.py: Muon with the Newton-Schulz iteration in bf16 (``OptimizerConfig.ns_dtype``).

The reference is ``optax.contrib.muon`` itself: at float32 our transform must reproduce its updates (same
momentum, Nesterov blend, bias correction, reshapes, scale, weight decay) on every kind of Muon matrix --
stacked layers, multi-axis attention kernels, per-expert weights. At bfloat16 it must stay close to that and
still orthogonalise, and the compiled update must really run its matmuls in bf16.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from test_optim import _teacher_regression, cfg_for, make_tree

from optim import OptimizerConfig, build_optimizer
from optim.muon import NS_COEFFS, muon_group
from optim.muon_lowp import muon_lowp, orthogonalise
from optim.partition import compute_partition, matrix_axes, path_str


def _steps(tx, params, n=3, seed=1):
    """Updates of ``n`` steps on fixed pseudo-random gradients (momentum and Nesterov terms non-trivial)."""
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    out = []
    for _ in range(n):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        upd, state = jax.jit(tx.update)(grads, state, params)
        out.append(upd)
    return out


def _muon_only(params, axes):
    part = compute_partition(params, axes, optimizer="muon")
    muon_params = {p for p, o in part.items() if o == "muon"}
    assert {"layers/attn/q/kernel", "layers/attn/o/kernel", "layers/moe/experts/w_in"} <= muon_params
    sub = jax.tree_util.tree_map_with_path(lambda kp, x: x if path_str(kp) in muon_params else None, params)
    return part, sub


@pytest.mark.parametrize("consistent_rms", [0.2, None])
def test_float32_matches_optax_contrib_muon(consistent_rms):
    params, axes = make_tree()
    part, sub = _muon_only(params, axes)
    cfg = cfg_for("muon", learning_rate=0.05, weight_decay=0.1, muon_consistent_rms=consistent_rms)
    ref = _steps(muon_group(cfg, 0.05, part), sub)
    ours = _steps(muon_lowp(cfg, 0.05, part, NS_COEFFS, ns_dtype=jnp.float32), sub)
    for step_ref, step_ours in zip(ref, ours, strict=True):
        flat_ref = jax.tree_util.tree_flatten_with_path(step_ref)[0]
        flat_ours = jax.tree_util.tree_flatten_with_path(step_ours)[0]
        assert [path_str(k) for k, _ in flat_ref] == [path_str(k) for k, _ in flat_ours]
        for (kp, a), (_, b) in zip(flat_ref, flat_ours, strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=path_str(kp))


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_bfloat16_orthogonalises_as_well_as_float32():
    """Five quintic rounds do not converge (singular values land in ~[0.7, 1.2], Jordan 2024), and rounding
    perturbs where in that band each lands, so bf16 and fp32 differ by several percent. What matters is
    that bf16 is as close to the exact polar factor U V^T as fp32 is, with singular values in the same
    band."""
    params, axes = make_tree()
    part, _ = _muon_only(params, axes)
    rng = np.random.default_rng(3)
    for path in ("layers/mlp/down/kernel", "layers/attn/q/kernel", "layers/moe/experts/w_in"):
        a = part.info[path]
        g = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
        o32 = orthogonalise(g, a, NS_COEFFS, 5, jnp.float32)
        o16 = orthogonalise(g, a, NS_COEFFS, 5, jnp.bfloat16)
        assert o16.dtype == jnp.float32
        assert _relative_error(o16, o32) > 1e-4, (path, "identical to fp32: the bf16 cast was lost")
        g_mats, o32_mats, o16_mats = (_matrices(x, a) for x in (g, o32, o16))
        for gm, m32, m16 in zip(g_mats, o32_mats, o16_mats, strict=True):
            u, _, vt = np.linalg.svd(gm.astype(np.float64), full_matrices=False)
            polar = u @ vt
            e32, e16 = _relative_error(m32, polar), _relative_error(m16, polar)
            assert e32 < 0.3, (path, e32)  # the NS iterate is an orthogonalisation at all
            assert e16 < e32 + 0.03, (path, e16, e32)
            s16, s32 = (np.linalg.svd(m, compute_uv=False) for m in (m16, m32))
            # Each singular value's place in the band is chaotic (moves by ~0.1 between precisions); the
            # band itself and the mean must not. (A near-singular square Gaussian's smallest singular value is
            # not lifted into the band in 5 rounds in either precision.)
            assert s32.min() - 0.1 < s16.min() and s16.max() < s32.max() + 0.1, (path, s16, s32)
            assert abs(s16.mean() - s32.mean()) < 0.03, (path, s16.mean(), s32.mean())


def _matrices(x, a):
    """``x`` as (batch, fan_in, fan_out) NumPy matrices, the layout Muon orthogonalises."""
    red, out = matrix_axes(a)
    batch = [i for i in range(x.ndim) if i not in red | out]
    order = batch + sorted(red) + sorted(out)
    n_in = int(np.prod([a.shape[i] for i in red]))
    return np.asarray(jnp.transpose(x, order)).reshape(-1, n_in, int(np.prod([a.shape[i] for i in out])))


def test_bfloat16_update_compiles_to_bf16_matmuls():
    params, axes = make_tree()
    cfg16 = cfg_for("muon", ns_dtype="bfloat16")
    dots = {}
    for name, cfg in (("fp32", cfg_for("muon")), ("bf16", cfg16)):
        tx, _ = build_optimizer(cfg, params, axes, total_steps=10)
        hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
        dots[name] = [ln for ln in hlo.splitlines() if "dot_general" in ln]
    assert dots["fp32"] and not any("bf16" in ln for ln in dots["fp32"])
    # every Newton-Schulz matmul (3 per round) of every Muon leaf is bf16; the AdamW group has no matmuls
    assert dots["bf16"] and all("bf16" in ln for ln in dots["bf16"]), dots["bf16"][:3]


def test_bfloat16_trains_like_float32():
    """Muon alone (every parameter a hidden matrix) fitting a random teacher: with the orthogonalisation in
    bf16 the loss curve follows fp32's, and the momentum it keeps is fp32."""
    curves = {}
    for dt in ("float32", "bfloat16"):
        params, axes, loss_fn = _teacher_regression()
        cfg = OptimizerConfig(name="muon", learning_rate=3e-2, weight_decay=0.01, warmup_steps=5,
                              schedule="cosine", ns_dtype=dt)
        tx, part = build_optimizer(cfg, params, axes, total_steps=40)
        assert set(part.values()) == {"muon"}
        state = tx.init(params)

        @jax.jit
        def step(p, s, tx=tx, loss_fn=loss_fn):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        curves[dt] = []
        for _ in range(40):
            params, state, loss = step(params, state)
            curves[dt].append(float(loss))
        assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state)), dt
    c32, c16 = np.array(curves["float32"]), np.array(curves["bfloat16"])
    assert c16[-1] < 0.25 * c16[0], c16[[0, -1]]
    np.testing.assert_allclose(c16, c32, rtol=0.1)
    assert not np.array_equal(c16, c32)


def test_on_a_mesh_both_layout_changes_move_bf16():
    """The lowered update constrains each stacked Muon matrix twice -- into the layers-split layout for
    Newton-Schulz and back -- and both times the tensor is the bf16 copy, so the all-to-alls (or, under
    pure data parallelism, the all-gather of the updates) can move half the bytes of the fp32 gradient.
    (XLA's CPU backend upcasts them to f32 when it compiles; the GPU backend is not checked here.)"""
    params, axes = make_tree()
    tx, part = build_optimizer(cfg_for("muon", ns_dtype="bfloat16"), params, axes, total_steps=10)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    rules = (("muon_layers", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    constraints = [ln for ln in text.splitlines() if "sharding_constraint" in ln]
    stacked = [p for p, a in part.info.items()
               if a.dimension_numbers is not None and "layers" in a.logical_axes]
    assert len(stacked) >= 6
    assert len(constraints) == 2 * len(stacked), constraints
    assert all("xbf16>" in ln for ln in constraints), constraints
    assert sum('{"data", "fsdp"}' in ln for ln in constraints) == len(stacked)  # the split, once per matrix


def test_unknown_ns_dtype_is_rejected():
    with pytest.raises(ValueError, match="ns_dtype"):
        cfg_for("muon", ns_dtype="float16").validate()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_gradient_matrix_gives_a_zero_update_not_nan(dtype):
    """A matrix whose gradient is exactly zero (an expert no token was routed to) has Frobenius norm 0; the
    eps added to the norm (as optax.contrib.muon does) keeps 0 / 0 from turning its update into NaN."""
    from optim.muon_lowp import newton_schulz

    zeros_Bx4x6 = jnp.zeros((2, 4, 6), jnp.float32)
    out_Bx4x6 = newton_schulz(zeros_Bx4x6, NS_COEFFS, 5, dtype)
    assert out_Bx4x6.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out_Bx4x6, np.float32), 0.0)


@pytest.mark.parametrize("shape", [(2, 4, 32), (2, 32, 4)])
def test_newton_schulz_iterates_on_the_small_gram_matrix(shape):
    """Wide or tall, the iteration works on the s x s Gram matrix, s = min(M, N) = 4 (a tall matrix is
    transposed first). dot FLOPs by hand, per matrix and round: X X^T 2*4*4*32, G G 2*4*4*4, P X 2*4*4*32,
    so 5 rounds of B = 2 matrices are 2 * 5 * 2176 = 21760 (the 32 x 32 Gram would cost over 20x that)."""
    from optim.muon_lowp import newton_schulz

    x_BxMxN = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: newton_schulz(x, NS_COEFFS, 5, jnp.float32))(x_BxMxN).jaxpr
    flops = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            flops += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[i] for i in contract)
    assert flops == 21760
    assert newton_schulz(x_BxMxN, NS_COEFFS, 5, jnp.float32).shape == shape


def test_momentum_is_float32_for_bfloat16_parameters():
    """The momentum accumulator is fp32 whatever the parameters' dtype (a bf16 EMA would round away the
    (1 - beta) g increments), before and after an update."""
    w_LxDxF = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 32)), jnp.bfloat16)
    params = {"layers": {"mlp": {"up": {"kernel": w_LxDxF}}}}
    part = compute_partition(params, {"layers": {"mlp": {"up": {"kernel": ("layers", "embed", "mlp")}}}})
    tx = muon_lowp(cfg_for("muon"), 0.05, part, NS_COEFFS, ns_dtype=jnp.bfloat16)
    state = tx.init(params)
    assert state[0].mu["layers"]["mlp"]["up"]["kernel"].dtype == jnp.float32
    _, state = jax.jit(tx.update)(params, state, params)
    assert state[0].mu["layers"]["mlp"]["up"]["kernel"].dtype == jnp.float32


def test_explicit_ns_dtype_overrides_the_config():
    """muon_lowp's ns_dtype argument wins over cfg.ns_dtype (which is only its default)."""
    params, axes = make_tree()
    part, sub = _muon_only(params, axes)
    tx = muon_lowp(cfg_for("muon", ns_dtype="float32"), 0.05, part, NS_COEFFS, ns_dtype=jnp.bfloat16)
    hlo = jax.jit(tx.update).lower(sub, tx.init(sub), sub).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
    assert dots and all("bf16" in ln for ln in dots), dots[:3]
