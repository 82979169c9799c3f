"""Dense Transformer: NumPy reference, causality, scan/remat equivalence, logical axes, config validation."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from jax.sharding import Mesh, PartitionSpec

from models import ModelConfig, Transformer, build_model

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)


def _tokens(cfg, B=2, L=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, cfg.vocab_size, dtype=jnp.int32)


def _random_variables(cfg, tokens_BxL, seed=0):
    """Random, non-trivial values for every parameter (norm scales != 1, biases != 0), so no term is vacuous.

    Shapes come from eval_shape: compiling model.init would cost several seconds of threefry compilation on
    CPU, and the initialiser itself is not what these tests check.
    """
    shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens_BxL))
    rng = np.random.default_rng(seed)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in paths_leaves:
        offset = 1.0 if path[-1].key == "scale" else 0.0
        leaves.append(jnp.asarray(offset + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype))
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=2, qk_norm=True, tie_embeddings=False, use_bias=True),  # GQA + qk-norm + untied
        dict(tie_embeddings=True, scan_layers=False, n_kv_heads=1, rope_theta=100.0),  # tied, MQA, unrolled
    ],
    ids=["gqa-qknorm-untied-bias", "tied-mqa-unrolled"],
)
def test_forward_matches_numpy_reference(overrides):
    cfg = ModelConfig(**TINY, **overrides)
    tokens = _tokens(cfg)
    variables = _random_variables(cfg, tokens)
    logits, extras = jax.jit(Transformer(cfg).apply)(variables, tokens)
    assert extras == {}
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    expected = numpy_reference.forward(jax.device_get(variables["params"]), cfg, np.asarray(tokens))
    # fp32 model vs float64 reference: relative differences are ~1e-6; allow accumulated rounding.
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_causality():
    cfg = ModelConfig(**TINY, n_kv_heads=2)
    tokens = _tokens(cfg, B=1, L=12)
    variables = _random_variables(cfg, tokens)
    apply = jax.jit(Transformer(cfg).apply)
    base = np.asarray(apply(variables, tokens)[0])
    for t in (0, 5, 11):
        changed = tokens.at[0, t].set((tokens[0, t] + 7) % cfg.vocab_size)
        out = np.asarray(apply(variables, changed)[0])
        np.testing.assert_array_equal(out[:, :t], base[:, :t], err_msg=f"token {t} changed earlier logits")
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4, "the change should affect position t onwards"


def _stacked_to_unrolled(params, n_layers):
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(n_layers):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def test_scan_and_remat_policies_agree():
    base = ModelConfig(**TINY, n_kv_heads=2, qk_norm=True)
    tokens = _tokens(base)
    targets = jnp.roll(tokens, -1, axis=1)
    variables = _random_variables(base, tokens)

    def loss_and_grad(cfg, v):
        def loss(v):
            logits, _ = Transformer(cfg).apply(v, tokens)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

        return jax.jit(jax.value_and_grad(loss))(v)

    ref_loss, ref_grad = loss_and_grad(base, variables)
    # Each value_and_grad compile costs seconds on a loaded CPU, so: scan + full remat, and an unrolled stack
    # with a dots policy (covers prevent_cse=True and the policy lookup). Gradients must agree too.
    loss, grad = loss_and_grad(base.replace(remat="full"), variables)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, ref_grad)
    unrolled = {"params": _stacked_to_unrolled(variables["params"], base.n_layers)}
    unrolled_cfg = base.replace(scan_layers=False, remat="dots_with_no_batch_dims_saveable")
    loss, grad = loss_and_grad(unrolled_cfg, unrolled)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    ref_unrolled = _stacked_to_unrolled(ref_grad["params"], base.n_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grad["params"], ref_unrolled)


def test_hidden_states_and_head_agree():
    cfg = ModelConfig(**TINY, tie_embeddings=True)
    tokens = _tokens(cfg)
    model = Transformer(cfg)
    variables = _random_variables(cfg, tokens)

    @jax.jit
    def both(v, t):
        logits, _ = model.apply(v, t)
        hidden, extras = model.apply(v, t, return_hidden=True)
        return logits, hidden, extras, model.apply(v, hidden, method="logits_from_hidden")

    logits, hidden, extras, logits_again = both(variables, tokens)
    assert hidden.shape == (2, 12, cfg.d_model) and extras == {}
    np.testing.assert_allclose(logits_again, logits, rtol=1e-6)


def test_sharded_forward_matches_unsharded():
    """On the 8 simulated devices, with params placed by their logical names and activations constrained, the
    logits equal the single-device ones. The rules table is local to this test (the trainer owns the real
    one); it maps "embed" and "batch" to the same mesh axis on purpose, which flax resolves per array."""
    rules = (("batch", ("data", "fsdp")), ("seq", None), ("embed", "fsdp"), ("mlp", "tensor"),
             ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("vocab", "tensor"),
             ("layers", None))
    cfg = ModelConfig(**{**TINY, "vocab_size": 64}, n_kv_heads=2, remat="full")
    tokens = _tokens(cfg, B=4, L=12)
    variables = _random_variables(cfg, tokens)
    model = Transformer(cfg)
    ref = jax.jit(model.apply)(variables, tokens)[0]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), tokens))
        sharded = jax.device_put(variables, nn.logical_to_mesh_sharding(specs, mesh, rules))
        q_spec = sharded["params"]["blocks"]["attn"]["q"]["kernel"].sharding.spec
        assert q_spec == PartitionSpec(None, "fsdp", "tensor", None)
        out = jax.jit(model.apply)(sharded, tokens)[0]
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    # Sharded matmuls sum in a different order: fp32 rounding only.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_build_model():
    assert isinstance(build_model(ModelConfig(**TINY)), Transformer)
    with pytest.raises(ValueError, match="family='sparse' is not one of"):
        build_model(ModelConfig(**TINY, family="sparse"))


def test_logical_axes_follow_the_contract():
    """Every param is boxed; stacked params lead with "layers"; hidden kernels read or write "embed" (optim
    relies on this to orient Muon); names follow the path conventions of DESIGN.md."""
    cfg = ModelConfig(**TINY, n_kv_heads=2, qk_norm=True, use_bias=True)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens(cfg))
    specs = nn.get_partition_spec(shapes)["params"]
    flat = {"/".join(k.key for k in path): tuple(spec)
            for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: x is not None
                                                                   and not isinstance(x, dict))[0]}
    assert flat["embed/embedding"] == ("vocab", "embed")
    assert flat["lm_head/kernel"] == ("embed", "vocab")
    assert flat["blocks/attn/q/kernel"] == ("layers", "embed", "heads", "head_dim")
    assert flat["blocks/attn/k/kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert flat["blocks/attn/o/kernel"] == ("layers", "heads", "head_dim", "embed")
    assert flat["blocks/mlp/down/kernel"] == ("layers", "mlp", "embed")
    for path, names in flat.items():
        leaf = path.split("/")[-1]
        assert leaf in ("kernel", "bias", "scale", "embedding"), path
        if path.startswith("blocks/"):
            assert names[0] == "layers", path
        if leaf == "scale":
            assert "norm" in path.split("/")[-2], path
        if leaf == "kernel" and "lm_head" not in path:
            body = names[1:]
            assert body[0] == "embed" or body[-1] == "embed", path
            assert "embed" not in path and "vocab" not in body, path


def test_dtypes():
    """fp32 params, bf16 compute: params stay fp32, hidden states are bf16, logits come back fp32 and close to
    the fp32 model's (bf16 keeps ~3 significant digits)."""
    cfg32 = ModelConfig(**TINY, n_kv_heads=2, qk_norm=True)
    cfg16 = cfg32.replace(compute_dtype="bfloat16")
    tokens = _tokens(cfg32)
    shapes = jax.eval_shape(Transformer(cfg16).init, jax.random.key(0), tokens)
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype("float32")}
    variables = _random_variables(cfg32, tokens)

    model16 = Transformer(cfg16)
    hidden16, _ = jax.eval_shape(lambda v, t: model16.apply(v, t, return_hidden=True), shapes, tokens)
    assert hidden16.dtype == jnp.bfloat16
    logits16, logits32 = jax.jit(lambda v, t: (Transformer(cfg16).apply(v, t)[0],
                                               Transformer(cfg32).apply(v, t)[0]))(variables, tokens)
    assert logits16.dtype == jnp.float32
    scale = float(jnp.abs(logits32).max())
    assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale
    assert float(jnp.abs(logits16 - logits32).max()) > 0  # really ran in bf16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(remat="sometimes"), "remat='sometimes' is not one of"),
        (dict(param_dtype="float8"), "param_dtype='float8' is not one of"),
        (dict(compute_dtype="fp32"), "compute_dtype='fp32' is not one of"),
        (dict(attention_impl="flash"), "attention_impl='flash' is not one of"),
        (dict(head_dim=7, d_model=28, n_heads=4), "head_dim=7 must be even"),
        (dict(n_layers=0), "n_layers=0 must be a positive integer"),
        (dict(vocab_size=10.5), "vocab_size=10.5 must be a positive integer"),
        (dict(family="sparse"), "family='sparse' is not one of"),
        (dict(norm_eps=-1.0), "norm_eps=-1.0 must be a positive (finite) number"),
        (dict(attention_impl="cudnn"), 'attention_impl="cudnn" needs compute_dtype'),
    ],
)
def test_config_validation_errors(overrides, message):
    cfg = ModelConfig(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate()
    with pytest.raises(ValueError, match="invalid ModelConfig"):  # the model refuses it too
        jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_bad_inputs():
    cfg = ModelConfig(**TINY)
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="integer array"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.float32))


def test_every_remat_policy_name_resolves():
    from models.config import REMAT_POLICIES
    from models.transformer import _remat_policy

    for name in REMAT_POLICIES:
        if name != "none":
            assert callable(_remat_policy(name)), name


def test_default_config_is_valid_and_d_ff_rule():
    cfg = ModelConfig().validate()
    assert cfg.resolved_d_ff % 64 == 0 and cfg.resolved_d_ff >= 8 * cfg.d_model / 3
    assert ModelConfig(d_model=768, n_heads=12).resolved_d_ff == 2048


def test_residual_output_projections_get_gpt2_init_scale():
    """GPT-2 init: the two layers per block that write into the residual stream (attention out, MLP down) are
    drawn with std init_std / sqrt(2 * n_layers) = 0.02 / 4 at 8 layers; the others keep init_std."""
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=8, n_heads=4, d_ff=256, max_seq_len=8)
    tokens = jnp.zeros((1, 8), jnp.int32)
    blocks = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens))["params"]["blocks"]
    # scanned: every kernel carries all 8 layers (>= 131k draws each, so the sample std is within ~0.2%)
    for kernel, std in ((blocks["attn"]["o"]["kernel"], 0.005), (blocks["mlp"]["down"]["kernel"], 0.005),
                        (blocks["attn"]["q"]["kernel"], 0.02), (blocks["mlp"]["up"]["kernel"], 0.02)):
        assert float(jnp.std(kernel)) == pytest.approx(std, rel=0.1)


def test_rmsnorm_adds_eps_inside_the_root():
    """y = x / sqrt(mean(x^2) + eps) * scale: zero input gives zeros (not 0 * inf = nan), and at an input
    scale (1e-4) far below sqrt(eps) (0.1) the eps term dominates the denominator."""
    from models.layers import RMSNorm

    norm = RMSNorm(eps=1e-2, axis_name="embed")
    scale = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    x = 1e-4 * np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x[0] = 0.0
    y = np.asarray(norm.apply({"params": {"scale": scale}}, jnp.asarray(x)))
    np.testing.assert_array_equal(y[0], 0.0)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-2) * scale
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=0)
