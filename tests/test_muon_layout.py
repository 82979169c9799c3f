"""Muon's orthogonalisation split over the layers axis (optim/muon_layout.py, the "muon_layers" rule).

The split must not change the optimiser's arithmetic (same parameters after training steps as XLA's own
layout, to float tolerance), must cut the step's communication and per-device FLOPs on an FSDP mesh, and the
rule must resolve to mesh axes that divide the layer count where any do.
"""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from experiments import bench_muon_sharding as bms
from experiments import sharding as shd
from experiments.config import LOGICAL_AXIS_RULES, MeshConfig
from experiments.presets import get_preset
from experiments.trainer import build_program
from optim.muon_layout import MUON_LAYERS, orthogonalisation_layouts, split_over_layers
from optim.partition import compute_partition, path_str


def _nest(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


SPEC = {
    "layers/mlp/up/kernel": ((4, 16, 32), ("layers", "embed", "mlp")),
    "layers/attn/o/kernel": ((4, 2, 8, 16), ("layers", "heads", "head_dim", "embed")),
    "layers/moe/w_in": ((4, 3, 16, 32), ("layers", "expert", "embed", "mlp")),
    "blocks_0/mlp/up/kernel": ((16, 32), ("embed", "mlp")),  # unrolled layer: no layers axis
    "embed/embedding": ((40, 16), ("vocab", "embed")),  # AdamW
}


def test_layouts_rename_the_layers_axis_of_stacked_muon_leaves():
    params = _nest({p: jnp.zeros(s) for p, (s, _) in SPEC.items()})
    part = compute_partition(params, _nest({p: a for p, (_, a) in SPEC.items()}), optimizer="muon")
    assert orthogonalisation_layouts(part) == {
        "layers/mlp/up/kernel": (MUON_LAYERS, "embed", "mlp"),
        "layers/attn/o/kernel": (MUON_LAYERS, "heads", "head_dim", "embed"),
        "layers/moe/w_in": (MUON_LAYERS, "expert", "embed", "mlp"),
    }


@pytest.mark.parametrize(
    ("mesh_shape", "layers", "expected"),
    [
        ((2, 4, 1), 8, ("data", "fsdp")),  # divides: every data and fsdp device gets its own layers
        ((2, 4, 1), 12, ("fsdp",)),  # 12 % 8 != 0: the largest group that divides
        ((1, 8, 1), 12, ("fsdp",)),  # nothing divides: the largest single axis, split unevenly
        ((8, 1, 1), 2, ("data",)),
        ((1, 1, 8), 8, None),  # tensor is not in the rule: nothing to split over, XLA decides
    ],
)
def test_muon_layers_rule_resolves_to_dividing_axes(mesh_shape, layers, expected, recwarn):
    d, f, t = mesh_shape
    mesh = shd.make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), jax.devices())
    rules = dict(shd.effective_rules(LOGICAL_AXIS_RULES, mesh, {"layers": {layers}, "embed": {64}}))
    assert rules[MUON_LAYERS] == expected
    assert not [w for w in recwarn if MUON_LAYERS in str(w.message)]


def test_wrapper_lays_out_layers_leaves_on_a_mesh_and_nothing_outside_one():
    params = _nest({p: jnp.asarray(np.random.default_rng(0).normal(size=s), jnp.float32)
                    for p, (s, _) in SPEC.items()})
    part = compute_partition(params, _nest({p: a for p, (_, a) in SPEC.items()}), optimizer="muon")
    inner = optax.scale(2.0)
    tx = split_over_layers(inner, part)
    want, _ = inner.update(params, inner.init(params))
    got, _ = tx.update(params, tx.init(params))  # no rules in scope: the inner transformation, untouched
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(x, y)

    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    rules = shd.effective_rules(LOGICAL_AXIS_RULES, mesh, {"layers": {4}})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(params)
    specs = {path_str(k): x.sharding.spec for k, x in jax.tree_util.tree_leaves_with_path(out)}
    assert specs["layers/mlp/up/kernel"] == P("fsdp")  # (trailing Nones dropped)
    assert specs["layers/moe/w_in"] == P("fsdp")  # "expert" yields: fsdp is taken
    # with tensor parallelism the matrices stay split over "tensor"; "embed" still yields "fsdp"
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    rules = shd.effective_rules(LOGICAL_AXIS_RULES, mesh, {"layers": {4}})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out2 = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(params)
    assert out2["layers"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", None, "tensor")
    up = params["layers"]["mlp"]["up"]["kernel"]
    np.testing.assert_array_equal(out["layers"]["mlp"]["up"]["kernel"], 2 * up)


def _programs(mesh_shape):
    base = get_preset("tiny").override(
        ["model.d_model=128", "model.n_layers=8", "model.n_heads=4", "data.seq_len=32",
         "model.max_seq_len=32", "data.batch_size=8", "trainer.microbatches=1", "trainer.eval_batch_size=8",
         "optimizer.warmup_steps=0"]
    )
    out = {}
    for variant in bms.VARIANTS:
        cfg = bms.variant_config(base, variant, mesh_shape)
        mesh = shd.make_mesh(cfg.mesh, jax.devices()[: math.prod(mesh_shape)])
        out[variant] = build_program(cfg, mesh)
    return out


def test_split_trains_like_xla_layout_with_less_communication_and_flops():
    progs = _programs((1, 8, 1))
    stats = {v: bms.program_stats(prog) for v, prog in progs.items()}
    ns_per_device = stats["muon-split"]["ns_flops_total"] / 8
    adam_flops = stats["adamw"]["flops_per_device"]
    split_flops, split_bytes, split_colls = (
        stats["muon-split"][k] for k in ("flops_per_device", "collective_bytes_per_device", "collectives")
    )
    xla_flops, xla_bytes, xla_colls = (
        stats["muon-xla"][k] for k in ("flops_per_device", "collective_bytes_per_device", "collectives")
    )
    # XLA's layout re-gathers the matrices in every Newton-Schulz round; the split moves them twice.
    assert split_bytes < 0.3 * xla_bytes, (split_colls, xla_colls)
    adam_gathers = stats["adamw"]["collectives"]["all-gather"]["bytes"]
    assert split_colls["all-gather"]["bytes"] <= adam_gathers * 1.01
    # Each device orthogonalises its own 8 / 8 layers: the NS FLOPs are split evenly, nothing repeated.
    assert split_flops <= adam_flops + 1.1 * ns_per_device, (split_flops, adam_flops, ns_per_device)
    assert split_flops <= xla_flops
    # bf16 Newton-Schulz (optim.muon_lowp) keeps the momentum in the parameters' layout and moves only the
    # matrices it orthogonalises: no more communication or temporaries than the fp32 split, even with XLA's
    # CPU backend compiling its bf16 all-to-alls as f32
    bf16 = stats["muon-split-bf16"]
    assert bf16["collective_bytes_per_device"] <= split_bytes, (bf16["collectives"], split_colls)
    assert bf16["temp_bytes"] <= stats["muon-split"]["temp_bytes"]
    assert bf16["flops_per_device"] <= 1.05 * split_flops

    # Same arithmetic: three steps from the same state on the same batch land on the same parameters.
    tokens = np.random.default_rng(0).integers(0, 64, size=(1, 8, 33), dtype=np.int32)
    finals = {}
    for v in ("muon-xla", "muon-split", "muon-split-bf16"):
        prog = progs[v]
        state = prog.init_state()
        batch = shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape)
        for _ in range(3):
            state, metrics = prog.step(state, batch)
        finals[v] = jax.tree.map(np.asarray, state["params"])
        assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(finals["muon-xla"]), jax.tree.leaves(finals["muon-split"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    # and training moved them: the comparison is not between two untouched initialisations
    init = jax.tree.map(np.asarray, progs["muon-split"].init_state()["params"])
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(finals["muon-split"]),
                                                 strict=True)]
    assert max(moved) > 1e-3
    # bf16 orthogonalisation: each update within a few percent of fp32's (tests/test_muon_lowp.py), so
    # after three steps every parameter's change is within 10% of the fp32 change
    for a, b, c in zip(jax.tree.leaves(finals["muon-split-bf16"]), jax.tree.leaves(finals["muon-split"]),
                       jax.tree.leaves(init), strict=True):
        assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b - c) + 1e-6


def test_bench_cli_writes_one_row_per_mesh_and_variant(tmp_path, capsys):
    out = tmp_path / "ms.json"
    argv = ["--preset", "tiny", "--meshes", "1x2x1", "--set", "model.n_layers=2", "--set", "model.d_model=32",
            "--json", str(out)]
    assert bms.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["mesh"], r["variant"]) for r in rows] == [("1x2x1", v) for v in bms.VARIANTS]
    assert rows[2]["muon_layers_axes"] == ["fsdp"] and rows[1]["muon_layers_axes"] is None
    assert rows[0]["ns_flops_total"] == 0 < rows[2]["ns_flops_total"] == rows[1]["ns_flops_total"]
    assert "muon-split" in capsys.readouterr().out
    assert bms.main(["--meshes", "2x2"]) == 2
    assert "not DATAxFSDPxTENSOR" in capsys.readouterr().err
    assert bms.main(["--preset", "tiny", "--meshes", "4x4x1"]) == 2
    assert "needs 16 devices" in capsys.readouterr().err


def test_layouts_skip_adamw_leaves_even_with_a_layers_axis():
    """Only Muon matrices are orthogonalised: a stacked norm scale or bias (AdamW) keeps its own layout."""
    spec = {**SPEC, "layers/attn_norm/scale": ((4, 16), ("layers", "embed")),
            "layers/mlp/up/bias": ((4, 32), ("layers", "mlp"))}
    params = _nest({p: jnp.zeros(s) for p, (s, _) in spec.items()})
    part = compute_partition(params, _nest({p: a for p, (_, a) in spec.items()}), optimizer="muon")
    assert part["layers/attn_norm/scale"] == part["layers/mlp/up/bias"] == "adamw"
    assert set(orthogonalisation_layouts(part)) == {
        "layers/mlp/up/kernel", "layers/attn/o/kernel", "layers/moe/w_in"}


def _lowered_constraints(rules):
    params = _nest({p: jnp.zeros(s, jnp.float32) for p, (s, _) in SPEC.items()})
    part = compute_partition(params, _nest({p: a for p, (_, a) in SPEC.items()}), optimizer="muon")
    tx = split_over_layers(optax.scale(2.0), part)
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        text = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(params).as_text()
    return [ln for ln in text.splitlines() if "sharding_constraint" in ln]


def test_wrapper_constrains_the_gradients_in_and_the_updates_out():
    """Two layout changes per stacked Muon leaf (3 in SPEC): its gradient into the layers-split layout
    before the inner transformation and its update after it; nothing for the unrolled or AdamW leaves."""
    constraints = _lowered_constraints((("muon_layers", "fsdp"), ("embed", "fsdp")))
    assert len(constraints) == 2 * 3, constraints


def test_a_null_muon_layers_rule_adds_no_constraint():
    """A rules table that maps muon_layers to None (what effective_rules returns when no mesh axis can take
    the layers) has no layer split: the wrapper leaves the layout to XLA, as with no entry at all."""
    assert _lowered_constraints((("muon_layers", None), ("embed", "fsdp"))) == []
    assert _lowered_constraints((("embed", "fsdp"),)) == []
