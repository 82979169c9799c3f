"""GPU-deciding properties checked on the CPU (issue 7): the chunked cross-entropy is exact, the compiled
train step holds no full-batch fp32 logits and no host transfers, and the full-size GPU presets' train steps
fit one 80 GB device by XLA's own buffer assignment. Timings live in ``python -m experiments.bench``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import bench_gpu, hlo_checks
from experiments import sharding as shd
from experiments.presets import get_preset
from experiments.trainer import build_program
from models import build_model
from models.loss import chunked_cross_entropy, output_head

GiB = 2**30


# ----- chunked cross-entropy == full-logits cross-entropy ---------------------------------------------------
def _reference_ce(h_BxLxD, w, targets_BxL, vocab_first):
    logits = jnp.einsum("bld,vd->blv" if vocab_first else "bld,dv->blv", h_BxLxD, w)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL).mean()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_tokens", [6, 9, 21, 10_000])  # 9 -> 3 positions: 10 % 3 != 0 (padded chunk)
def test_chunked_ce_value_and_grad_match_full_logits(tied, chunk_tokens):
    B, L, D, V = 3, 10, 16, 37
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k[0], (B, L, D), jnp.float32)
    w = 0.5 * jax.random.normal(k[1], (V, D) if tied else (D, V), jnp.float32)
    t = jax.random.randint(k[2], (B, L), 0, V)
    head = "table_VxD" if tied else "kernel_DxV"

    def chunked(h, w):
        return chunked_cross_entropy(h, t, chunk_tokens=chunk_tokens, **{head: w})

    val, (dh, dw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
    ref, (rdh, rdw) = jax.value_and_grad(lambda h, w: _reference_ce(h, w, t, tied), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(val, ref, rtol=1e-6)
    np.testing.assert_allclose(dh, rdh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_tokens, positions", [(9, 3), (2, 1), (10_000, 10), (6, 2)])
def test_chunked_ce_chunk_size_rule(chunk_tokens, positions):
    """Documented rule: a chunk is max(1, chunk_tokens // B) positions of all B rows, at most L. The value is
    exact whatever the chunk size, so check the size itself and the scan the forward runs (ceil(L / C) chunks,
    so no padded giant chunk at 10_000 tokens and a 1-position chunk when B > chunk_tokens)."""
    from models.loss import chunk_positions

    B, L, D, V = 3, 10, 4, 7
    assert chunk_positions(B, L, chunk_tokens) == positions
    jaxpr = jax.make_jaxpr(lambda h, w: chunked_cross_entropy(
        h, jnp.zeros((B, L), jnp.int32), kernel_DxV=w, chunk_tokens=chunk_tokens))(
        jnp.zeros((B, L, D)), jnp.zeros((D, V)))
    # the scan sits inside the custom_vjp's sub-jaxpr: read its length from the printed program
    assert re.findall(r"\blength=(\d+)", str(jaxpr)) == [str(-(-L // positions))]


def test_chunked_ce_bf16_inputs_close_to_fp32():
    B, L, D, V = 2, 8, 32, 50
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    h = jax.random.normal(k[0], (B, L, D))
    w = 0.3 * jax.random.normal(k[1], (D, V))
    t = jax.random.randint(k[2], (B, L), 0, V)
    ce = jax.jit(lambda h, w: chunked_cross_entropy(h, t, kernel_DxV=w, chunk_tokens=4))
    val = ce(h.astype(jnp.bfloat16), w)
    assert val.dtype == jnp.float32
    np.testing.assert_allclose(val, _reference_ce(h, w, t, False), rtol=2e-2)


def test_chunked_ce_rejects_bad_input():
    h, t = jnp.zeros((2, 4, 8)), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="exactly one output head"):
        chunked_cross_entropy(h, t)
    with pytest.raises(ValueError, match="d_model axis"):
        chunked_cross_entropy(h, t, kernel_DxV=jnp.zeros((7, 5)))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(h, t, kernel_DxV=jnp.zeros((8, 5)), chunk_tokens=0)
    with pytest.raises(ValueError, match="lm_head/kernel"):
        output_head({"embed": {}}, tie_embeddings=False)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mor"])
def test_hidden_path_keeps_family_extras_and_loss(preset):
    """The trainer's chunked path (return_hidden + chunked CE) gives the full-logits CE and the same extras,
    auxiliary losses included, for the families whose forward returns them. (Gradients: the function-level
    test above and the train-step test below.)"""
    c = get_preset(preset).model.replace(vocab_size=48, d_model=32, n_heads=2, max_seq_len=16)
    if c.family == "mor":
        c = c.replace(n_layers=3, mor_sharing="cycle")  # 1 shared layer x 3 recursions: the smallest MoR
    else:
        c = c.replace(n_layers=1)
    model = build_model(c)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, c.vocab_size)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :-1]))

    @jax.jit
    def both(variables):
        logits, extras = model.apply(variables, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        h, extras_h = model.apply(variables, tokens[:, :-1], return_hidden=True)
        ce_h = chunked_cross_entropy(h, tokens[:, 1:], chunk_tokens=6,
                                     **output_head(variables["params"], c.tie_embeddings))
        return ce, extras, ce_h, extras_h

    ce, extras, ce_h, extras_h = both(variables)
    assert any(k.endswith("loss") and float(v) > 0 for k, v in extras.items())  # the family has an aux loss
    np.testing.assert_allclose(ce_h, ce, rtol=1e-5)
    assert set(extras_h) == set(extras)
    for k in extras:
        np.testing.assert_allclose(extras_h[k], extras[k], rtol=1e-6, err_msg=k)


# ----- compiled train step: no full-batch fp32 logits, no host transfers ----------------------------------
SMALL_BF16 = ("model.compute_dtype=bfloat16", "model.vocab_size=320", "model.max_seq_len=64",
              "model.tie_embeddings=true",  # as the GPU presets: the table is both embedding and head
              "data.seq_len=48", "data.batch_size=4", "trainer.steps=2", "optimizer.warmup_steps=0",
              "trainer.eval_batch_size=4", "mesh.data=1")


def _program(chunk: int):
    cfg = get_preset("tiny").override([*SMALL_BF16, f"trainer.loss_chunk_tokens={chunk}"]).validate()
    # One device, so the HLO holds global shapes (per-device shards would hide a [B, L, V] buffer).
    return cfg, build_program(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))


def test_train_step_has_no_full_batch_fp32_logits_only_with_chunked_loss():
    cfg_c, chunked = _program(64)  # 64 tokens = 16 positions of all 4 rows per chunk
    cfg_p, plain = _program(0)
    tokens, V = cfg_c.data.batch_size * cfg_c.data.seq_len, cfg_c.model.vocab_size
    assert hlo_checks.full_logits_buffers(chunked.train_step.as_text(), tokens, V) == []
    assert hlo_checks.full_logits_buffers(chunked.eval_step.as_text(), tokens, V) == []
    # The same check catches the plain path: the test can fail.
    assert "f32[4,48,320]" in hlo_checks.full_logits_buffers(plain.train_step.as_text(), tokens, V)
    # Both programs train the same: one step from the same init gives the same loss (bf16 rounding apart).
    batch = np.random.default_rng(0).integers(0, V, size=(1, 4, 49), dtype=np.int32)
    got = []
    for prog in (chunked, plain):
        train_batch = shd.host_batch(batch, prog.train_batch_sharding, batch.shape)
        state, metrics = prog.step(prog.init_state(), train_batch)
        eval_batch = shd.host_batch(batch[0], prog.eval_batch_sharding, batch[0].shape)
        got.append([float(metrics["loss"]), float(metrics["grad_norm"]),
                    float(prog.eval_step(state["params"], {}, eval_batch))])
    np.testing.assert_allclose(got[0], got[1], rtol=2e-2)  # loss, gradient norm, eval loss after the step
    # ... and neither moves data to or from the host inside the step.
    assert hlo_checks.host_transfers(chunked.train_step.as_text()) == []
    assert hlo_checks.host_transfers(plain.train_step.as_text()) == []


def test_host_transfer_detector_catches_callbacks():
    def step(x):
        jax.debug.callback(lambda v: None, x)
        return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(x.shape, x.dtype), x) * 2

    text = jax.jit(step).lower(jnp.ones(3)).compile().as_text()
    assert hlo_checks.host_transfers(text) != []
    assert hlo_checks.host_transfers(jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile().as_text()) == []


# ----- memory of the full-size GPU presets, by XLA's buffer assignment (nothing allocated) ----------------
# Budgets per device (arguments + outputs - donated + temporaries of the compiled train step, CPU buffer
# assignment with cuDNN flash attention's residuals; bench_gpu.estimate_train_memory). An H100 has 80 GB.
# The budgets stay under the 75% of 80 GB (~56 GiB) that JAX's GPU allocator takes by default.
# Measured (jax 0.10.2, CPU; python -m experiments.bench --suite gpu --memory): 124m 21.3 GiB (no remat), 354m
# 30.8 GiB (dots_with_no_batch_dims_saveable), 354m with Muon (bf16 Newton-Schulz) 29.4 GiB.
MEMORY_BUDGET_GIB = {"dense-124m-adamw": 32.0, "dense-354m-adamw": 40.0, "dense-354m-muon": 40.0}


@pytest.mark.parametrize("row", sorted(MEMORY_BUDGET_GIB))
def test_gpu_preset_train_step_fits_memory_budget(row):
    est = bench_gpu.estimate_train_memory(row)
    assert "ce_chunk=0" not in est["summary"]  # the GPU presets use the chunked loss
    assert 0 < est["total"] < MEMORY_BUDGET_GIB[row] * GiB, (row, est)


def test_memory_column_is_per_row_and_the_device_mark_is_flagged():
    """peak_bytes_in_use is a process high-water mark: a small row after a big one would report the big
    one's peak. The column is the row's compiled estimate; the device mark is beside it, flagged when the
    row raised it (exercised with a fake GPU device, as the CPU rehearsal never reads memory_stats)."""
    class FakeGPU:
        platform, id = "gpu", 12345
        peak = 0

        def memory_stats(self):
            return {"peak_bytes_in_use": self.peak}

    dev = FakeGPU()
    small, big = {"total": 10}, {"total": 100}
    dev.peak = 100
    first = bench_gpu._memory(big, dev)
    second = bench_gpu._memory(small, dev)  # mark unchanged at 100
    dev.peak = 150
    third = bench_gpu._memory(big, dev)
    assert [r["peak_memory_bytes"] for r in (first, second, third)] == [100, 10, 100]
    assert [r["device_peak_set_by_this_row"] for r in (first, second, third)] == [True, False, True]
    assert second["device_peak_bytes_in_use"] == 100
