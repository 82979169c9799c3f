"""Sharding: mesh construction, the logical-axis rules applied to real parameter trees, non-divisible
fallbacks."""

from __future__ import annotations

import warnings
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optim
from experiments import sharding as shd
from experiments.config import LOGICAL_AXIS_RULES, ConfigError, MeshConfig
from experiments.presets import get_preset
from experiments.trainer import build_program
from models.config import ModelConfig
from models.transformer import Transformer

MESH_222 = MeshConfig(data=2, fsdp=2, tensor=2)


def test_mesh_sizes_fill_and_mismatch():
    assert shd.resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == {
        "data": 4,
        "fsdp": 2,
        "tensor": 1,
    }
    assert shd.resolve_mesh_shape(MeshConfig(data=1, fsdp=1, tensor=-1), 8)["tensor"] == 8
    with pytest.raises(ConfigError, match=r"3\*1\*1 = 3 must equal the number of devices \(8\)"):
        shd.resolve_mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="do not divide the 8 available devices"):
        shd.resolve_mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    mesh = shd.make_mesh(MESH_222)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2} and mesh.devices.size == 8
    assert dict(shd.make_mesh(MeshConfig(), jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    # A zero size is not "fill in": named, not a ZeroDivisionError from the -1 fill or a product mismatch.
    for sizes in ((0, -1, 1), (0, 8, 1), (2, 2, -2)):
        with pytest.raises(ConfigError, match="must be positive with at most one -1"):
            shd.resolve_mesh_shape(MeshConfig(*sizes), 8)
    with pytest.raises(ConfigError, match="must be positive with at most one -1"):
        shd.resolve_mesh_shape(MeshConfig(data=-1, fsdp=-1, tensor=2), 8)


def test_mesh_axis_sizes_land_on_their_named_axes():
    """Unequal sizes: each configured size goes to the mesh axis of that name (a 2x2x2 mesh cannot tell)."""
    for data, fsdp, tensor in ((4, 2, 1), (1, 2, 4), (2, 4, 1)):
        mesh = shd.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        assert mesh.axis_names == ("data", "fsdp", "tensor")
        assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
        assert mesh.devices.shape == (data, fsdp, tensor)
    # The batch rule's axes (data, fsdp) then split a batch data*fsdp = 8 ways on a 4x2x1 mesh.
    mesh = shd.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    shd.check_batch_divisible(8, mesh, LOGICAL_AXIS_RULES, "batch")
    with pytest.raises(ConfigError, match=r"batch=4 is not divisible by mesh data\*fsdp=8"):
        shd.check_batch_divisible(4, mesh, LOGICAL_AXIS_RULES, "batch")


def _abstract(model_cfg, seq=8):
    return jax.eval_shape(Transformer(model_cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, seq), jnp.int32))[
        "params"
    ]


def _specs(model_cfg, mesh):
    boxed = _abstract(model_cfg)
    rules = shd.effective_rules(LOGICAL_AXIS_RULES, mesh, shd.logical_dim_sizes(boxed))
    sh = shd.shardings_from_logical(nn.get_partition_spec(boxed), nn.meta.unbox(boxed), mesh, rules)
    return (
        boxed,
        rules,
        {optim.partition.path_str(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(sh)},
    )


def test_config_knows_every_logical_axis_the_models_use():
    """experiments.config.LOGICAL_AXES (what mesh.rules may name) covers every parameter's logical axes in
    each family, MLA with both low-rank projections included."""
    from experiments.config import LOGICAL_AXES
    from models import build_model

    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    configs = [
        ModelConfig(**base),
        ModelConfig(**base, family="moe", n_experts=4, moe_top_k=2),
        ModelConfig(**base, family="mor", mor_recursions=2, mor_sharing="cycle"),
        ModelConfig(**base, attention="mla", mla_kv_lora_rank=16, mla_q_lora_rank=16),
    ]
    used = set()
    for cfg in configs:
        boxed = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
        used |= {name for spec in specs for name in spec if name is not None}
    assert {"embed", "mlp", "heads", "expert", "q_lora", "kv_lora"} <= used
    assert used <= set(LOGICAL_AXES), used - set(LOGICAL_AXES)


def test_rules_table_shards_parameters_megatron_and_fsdp_style():
    mesh = shd.make_mesh(MESH_222)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=8)
    _, _, specs = _specs(cfg, mesh)
    # embed -> fsdp; heads/kv_heads/mlp/vocab -> tensor; layers and head_dim unsharded.
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["blocks/attn/q/kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["blocks/attn/k/kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["blocks/attn/o/kernel"] == P(None, "tensor", None, "fsdp")
    assert specs["blocks/mlp/gate/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/mlp/down/kernel"] == P(None, "tensor", "fsdp")
    assert specs["final_norm/scale"] == P("fsdp")


def test_mla_up_projections_are_fsdp_sharded():
    """MLA's k_up / v_up / q_up have no embed axis: without rules for their low-rank axes they (and their
    optimiser state) were replicated on an FSDP mesh. q_down / kv_down keep fsdp on embed."""
    mesh = shd.make_mesh(MESH_222)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=8,
                      attention="mla", mla_kv_lora_rank=16, mla_q_lora_rank=16)
    _, _, specs = _specs(cfg, mesh)
    for name in ("k_up", "v_up", "q_up"):
        assert specs[f"blocks/attn/{name}/kernel"] == P(None, "fsdp", "tensor", None), name
    assert specs["blocks/attn/q_down/kernel"] == P(None, "fsdp", None)
    assert specs["blocks/attn/kv_down/kernel"] == P(None, "fsdp", None)


def test_a_null_muon_layers_rule_means_no_layer_split():
    """Null means "unsharded" for every other row; for muon_layers it crashed inside the rules code."""
    mesh = shd.make_mesh(MESH_222)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=8)
    rules = tuple((k, None if k == "muon_layers" else v) for k, v in LOGICAL_AXIS_RULES)
    out = dict(shd.effective_rules(rules, mesh, shd.logical_dim_sizes(_abstract(cfg))))
    assert out["muon_layers"] is None and out["embed"] == "fsdp"


def test_non_divisible_dims_fall_back_to_replication():
    mesh = shd.make_mesh(MESH_222)
    # 3 heads and 1 KV head on tensor=2, vocab 51 on tensor=2, d_ff 36 fine.
    cfg = ModelConfig(vocab_size=51, d_model=24, n_layers=1, n_heads=3, n_kv_heads=1, d_ff=36, max_seq_len=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rules, specs = _specs(cfg, mesh)
    messages = " | ".join(str(w.message) for w in caught)
    for name in ("'heads'", "'kv_heads'", "'vocab'"):
        assert f"logical axis {name}" in messages and "replicating" in messages
    assert dict(rules)["heads"] is None and dict(rules)["kv_heads"] is None and dict(rules)["vocab"] is None
    assert dict(rules)["mlp"] == "tensor"
    assert specs["blocks/attn/q/kernel"] == P(None, "fsdp", None, None)
    assert specs["embed/embedding"] == P(None, "fsdp")
    assert specs["blocks/mlp/up/kernel"] == P(None, "fsdp", "tensor")
    assert shd.fit_spec(P("tensor", ("data", "fsdp")), (3, 8), mesh) == P(None, ("data", "fsdp"))


def test_optimizer_state_mirrors_parameter_shardings():
    mesh = shd.make_mesh(MESH_222)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=8)
    boxed, rules, _ = _specs(cfg, mesh)
    logical = nn.get_partition_spec(boxed)
    params = nn.meta.unbox(boxed)
    tx, _ = optim.build_optimizer(optim.OptimizerConfig(name="adamw"), params, logical, 10)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = shd.shardings_from_logical(
        optim.opt_state_logical_specs(tx, params, logical), opt_abstract, mesh, rules
    )
    adam = [
        s
        for s in jax.tree.leaves(opt_sh, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert adam, "no Adam state found"
    assert adam[0].mu["blocks"]["mlp"]["gate"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert adam[0].count.spec == P()


def test_indivisible_model_trains_on_eight_devices(tmp_path):
    """End to end: a model whose heads/vocab/kv_heads do not divide the mesh still compiles and steps."""
    cfg = (
        get_preset("tiny")
        .override(
            [
                "model.vocab_size=51",
                "data.synthetic.vocab_size=51",
                "model.d_model=24",
                "model.n_heads=3",
                "model.n_kv_heads=1",
                "model.n_layers=1",
                "model.d_ff=36",
                "model.max_seq_len=8",
                "data.seq_len=8",
                "data.batch_size=8",
                "trainer.steps=2",
                "optimizer.warmup_steps=0",
                "mesh.data=2",
                "mesh.fsdp=2",
                "mesh.tensor=2",
            ]
        )
        .validate()
    )
    mesh = shd.make_mesh(cfg.mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replication warnings are checked above
        prog = build_program(cfg, mesh)
    state = prog.init_state()
    tokens = np.random.default_rng(0).integers(0, 51, size=(1, 8, 9)).astype(np.int32)
    batch = shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape)
    state, m = prog.step(state, batch)
    assert np.isfinite(float(m["loss"])) and abs(float(m["loss"]) - np.log(51)) < 0.5
    assert state["params"]["embed"]["embedding"].sharding.spec == P(None, "fsdp")


def test_batch_sharding_and_divisibility_follow_the_batch_rule():
    mesh = shd.make_mesh(MESH_222)
    assert shd.batch_sharding(mesh, LOGICAL_AXIS_RULES, leading=1).spec == P(None, ("data", "fsdp"))
    shd.check_batch_divisible(8, mesh, LOGICAL_AXIS_RULES, "batch")
    with pytest.raises(ConfigError, match="batch=6 is not divisible by mesh data\\*fsdp=4"):
        shd.check_batch_divisible(6, mesh, LOGICAL_AXIS_RULES, "batch")
    # A user's table that splits examples over data only: the input follows it, and 2 sequences suffice.
    data_only = tuple((n, "data" if n == "batch" else a) for n, a in LOGICAL_AXIS_RULES)
    assert shd.batch_axes(data_only) == ("data",)
    assert shd.batch_sharding(mesh, data_only).spec == P("data")
    shd.check_batch_divisible(2, mesh, data_only, "batch")
    with pytest.raises(ConfigError, match="batch=3 is not divisible by mesh data=2"):
        shd.check_batch_divisible(3, mesh, data_only, "batch")
    # No batch rule (or a null one): replicated, like flax leaves the activations.
    no_rule = tuple(r for r in LOGICAL_AXIS_RULES if r[0] != "batch")
    assert shd.batch_axes(no_rule) == () and shd.batch_sharding(mesh, no_rule, leading=1).spec == P(
        None, None
    )
    shd.check_batch_divisible(3, mesh, no_rule, "batch")


class _FakeSharding:
    """The one method process_row_block reads, as a process of a multi-host job would see it."""

    spec = P("data")

    def __init__(self, slices, axis=0):
        self._slices, self._axis = slices, axis

    def addressable_devices_indices_map(self, shape):
        # the given rows along dimension `axis`, everything along the others
        return {i: tuple(s if d == self._axis else slice(None) for d in range(len(shape)))
                for i, s in enumerate(self._slices)}


def test_process_row_block_reads_the_rows_from_the_sharding():
    mesh = shd.make_mesh(MESH_222)
    # One process holds every device: it loads the whole batch, whatever the rule.
    for rules in (LOGICAL_AXIS_RULES, tuple(r for r in LOGICAL_AXIS_RULES if r[0] != "batch")):
        sharding = shd.batch_sharding(mesh, rules, leading=1)
        assert shd.process_row_block(sharding, (2, 8, 5), axis=1) == (0, 1)
    # The third of four hosts, each with two devices, batch split 8 ways: rows 8..11 of 16.
    assert shd.process_row_block(_FakeSharding([slice(8, 10), slice(10, 12)]), (16, 5), axis=0) == (2, 4)
    # Batch split over data=2 only, hosts spanning fsdp: two hosts hold the same half and both must load it.
    assert shd.process_row_block(_FakeSharding([slice(8, 16), slice(8, 16)]), (16, 5), axis=0) == (1, 2)
    # Replicated batch: every host loads every row.
    assert shd.process_row_block(_FakeSharding([slice(None)] * 2), (16, 5), axis=0) == (0, 1)
    with pytest.raises(ConfigError, match="not one aligned block"):  # a device order interleaving hosts
        shd.process_row_block(_FakeSharding([slice(0, 4), slice(8, 12)]), (16, 5), axis=0)
    with pytest.raises(ConfigError, match="not one aligned block"):  # contiguous but not on a block boundary
        shd.process_row_block(_FakeSharding([slice(2, 6)]), (16, 5), axis=0)
    with pytest.raises(ConfigError, match="not one aligned block"):  # a block of 6 rows does not tile 16
        shd.process_row_block(_FakeSharding([slice(0, 6)]), (16, 5), axis=0)
    # The train batch is [M, B/M, L+1] with its rows on axis 1: the microbatch axis (replicated) is not read.
    # Second of two hosts, each holding 4 of the 8 rows: block 1 of 2; the first host: block 0.
    second, first = _FakeSharding([slice(4, 6), slice(6, 8)], axis=1), _FakeSharding([slice(0, 4)], axis=1)
    assert shd.process_row_block(second, (2, 8, 5), axis=1) == (1, 2)
    assert shd.process_row_block(first, (2, 8, 5), axis=1) == (0, 2)


def test_a_batch_rule_over_data_only_trains_like_the_default(monkeypatch):
    """The input batch is placed by the user's batch rule (no reshard into the first activation constraint)
    and the run's losses match the default table's. The rows each process loads are read along the dimension
    that rule shards: axis 1 of the [M, B/M, L+1] train batch, axis 0 of the eval batch (on one process
    either axis gives the whole batch, so the call's arguments are what a multi-host job depends on)."""
    row_reads = []
    real = shd.process_row_block

    def spy(sharding, shape, axis):
        row_reads.append((sharding.spec, shape, axis))
        return real(sharding, shape, axis)

    monkeypatch.setattr(shd, "process_row_block", spy)
    base = get_preset("tiny").override(
        [
            "model.n_layers=1",
            "data.batch_size=8",
            "trainer.steps=3",
            "optimizer.warmup_steps=0",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
        ]
    )
    data_only = tuple((n, "data" if n == "batch" else a) for n, a in LOGICAL_AXIS_RULES)
    losses = {}
    for name, rules in (("default", LOGICAL_AXIS_RULES), ("data_only", data_only)):
        cfg = replace(base, mesh=replace(base.mesh, rules=rules)).validate()
        prog = build_program(cfg, shd.make_mesh(cfg.mesh))
        if name == "data_only":
            assert prog.train_batch_sharding.spec == P(None, "data")
            assert prog.eval_batch_sharding.spec == P("data")
        (train_spec, train_shape, train_axis), (eval_spec, eval_shape, eval_axis) = row_reads[-2:]
        batch_axes = shd.batch_axes(cfg.mesh.rules)
        assert train_shape == (1, 8, cfg.data.seq_len + 1) and eval_shape[0] == cfg.eval_batch_size
        for spec, axis in ((train_spec, train_axis), (eval_spec, eval_axis)):
            read = spec[axis] if axis < len(spec) else None
            assert ((read,) if isinstance(read, str) else tuple(read or ())) == batch_axes != (), (spec, axis)
        state = prog.init_state()
        tokens = (
            np.random.default_rng(0)
            .integers(0, cfg.model.vocab_size, size=(1, 8, cfg.data.seq_len + 1))
            .astype(np.int32)
        )
        run = []
        for _ in range(3):
            state, m = prog.step(state, shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape))
            run.append(float(m["loss"]))
        losses[name] = run
    np.testing.assert_allclose(losses["data_only"], losses["default"], rtol=1e-5)


def test_no_distributed_init_without_env(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert shd.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task SLURM job is not multi-host
    assert shd.maybe_initialize_distributed() is False
