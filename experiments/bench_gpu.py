"""The GPU benchmark suite (issue 7): every row of the single-GPU targets, measured in ONE process.

    python -m experiments.bench --suite gpu --json OUT.json          # on the GPU machine
    python -m experiments.bench --suite gpu --dry --json OUT.json    # tiny shapes, same code path (CPU CI)
    python -m experiments.bench --suite gpu --rows dense-124m-adamw,decode-dense-b1   # a subset
    python -m experiments.bench --suite gpu --memory   # CPU: compiled memory of the full-size dense rows

First the practical peak: a dense bf16 n x n x n matmul (n = 8192 on a GPU) on the device, next to the
vendor's datasheet peak for the detected device kind (dense bf16, no sparsity; unknown kinds and CPUs ->
null). Then:

  train rows (one optimiser step = one microbatch; param fp32, compute bf16, cudnn attention on GPU):
    dense-124m-adamw    GPT-2 small shape, T=1024, batch 16
    dense-354m-adamw    24 x 1024, T=2048, batch 8
    dense-354m-muon     the same with Muon, Newton-Schulz in bf16 (its step-time overhead vs AdamW is
                        reported, and its Newton-Schulz FLOPs as a share of the step's model FLOPs)
    dense-354m-muon-nsfp32  the same with optax.contrib.muon's fp32 Newton-Schulz
    dense-354m-{adamw,muon}-acc8  the same pair with 8 microbatches (batch 64) per optimiser step
    moe-124m-adamw      8 experts, top-2, dropless, expert width d_ff/2: the active size of dense-124m
    mor-124m-ec         MoR, N_r=3, expert choice, middle-cycle sharing (1 + 4 shared x 3 + 1 layers)
    mor-124m-looped-eq  the looped (router "none") baseline at equal active FLOPs: N_r=2 over the same 6
                        unique layers (expected depth of MoR's capacities 1, 2/3, 1/3 is 2 recursions)
    mor-124m-looped-full  the looped model at MoR's full depth (N_r=3): MoR's FLOP saving in tokens/s
    dense-354m-adamw-noremat  the 350m row without its remat policy (the speed that costs; it may run out
                        of memory in JAX's default 75% pool: XLA_PYTHON_CLIENT_MEM_FRACTION=.95 gives it
                        the whole card)
  decode rows (models.decode; bf16 weights, greedy, one token per sequence per step):
    decode-{dense,mla,mor-kvshare}-b{1,64}: tokens/s and KV-cache bytes per token
    decode-mor-kvshare-noskip-b1  MoR at batch 1 with exited tokens' steps run masked instead of skipped

FLOPs per token (model FLOPs; remat recomputation not counted, Chowdhery et al. 2022 appendix B):
  * GPT-2 rows use the issue's formula 6 N + 12 L d T, N = non-embedding + V d (the head matmul: the tied
    table counted once, as the reference nanoGPT counts it), L layers, d = d_model, T = seq_len.
  * MoE / MoR rows use ``models.accounting`` active training FLOPs (3 x forward of the routed/expected-depth
    matmuls and full-T attention), which for a dense MHA model is the same 6 N_matmul + 12 L d T.
MFU = model FLOP/s / peak, against the measured matmul and the vendor peak.

Timing: warm-up steps (compilation included) excluded; the timed steps are dispatched back to back with no
host sync inside (the state is donated) and ``jax.block_until_ready`` at the end. Memory: the compiled
program's ``memory_analysis()`` (arguments + outputs - aliased + temporaries) on every platform, and on a GPU
also the device allocator's peak (``memory_stats()["peak_bytes_in_use"]``) -- a high-water mark of the whole
process, so it is an upper bound for the rows after the largest one (rows run in the order above).

``--dry`` swaps every shape for a tiny one (d=64, 2 layers, T=64, batch 4, vocab 509) and keeps everything
else: the same configs, builders, timing and reporting code, so a CPU run exercises the whole suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import sharding as shd
from experiments.config import ExperimentConfig
from experiments.files import write_text_atomic
from experiments.hlo_checks import full_logits_buffers, host_transfers, ragged_dot_lowering
from experiments.presets import get_preset
from experiments.trainer import build_program
from models import accounting
from models.config import ModelConfig
from optim.muon import newton_schulz_flops

# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets (no 2:4 sparsity). Matched in order
# against jax's device_kind, so the more specific names come first.
VENDOR_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM5 (device_kind "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
)

TARGETS = {  # issue 7
    "dense-124m-adamw": {"mfu_measured": 0.60, "tokens_per_second": 530e3},
    "dense-354m-adamw": {"mfu_measured": 0.65},
    "muon_overhead_pct": 3.0,
    "moe_mfu_vs_dense": 0.70,
    "mor_tokens_per_s_vs_looped_eq": 0.80,
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the suite uses; ``--dry`` swaps FULL for DRY and nothing else."""

    matmul_n: int
    d124: tuple[int, int, int]  # d_model, n_layers, n_heads of the "124m" shape
    d354: tuple[int, int, int]
    seq124: int
    batch124: int
    seq354: int
    batch354: int
    vocab: int | None  # None: the presets' 50304
    moe_d_ff: int  # expert width: half the dense SwiGLU width, so top-2 matches the dense active size
    mor_block: int  # shared layers per recursion (middle-cycle: n_layers = 2 + N_r * block)
    loss_chunk_tokens: int | None  # None: the presets' own setting
    decode_max_len: int
    decode_steps: int
    train_steps: int
    train_warmup: int


FULL = Shapes(matmul_n=8192, d124=(768, 12, 12), d354=(1024, 24, 16), seq124=1024, batch124=16, seq354=2048,
              batch354=8, vocab=None, moe_d_ff=1024, mor_block=4, loss_chunk_tokens=None, decode_max_len=1024,
              decode_steps=64, train_steps=10, train_warmup=3)
DRY = Shapes(matmul_n=256, d124=(64, 2, 4), d354=(64, 2, 4), seq124=64, batch124=4, seq354=64, batch354=4,
             vocab=509, moe_d_ff=96, mor_block=1, loss_chunk_tokens=64, decode_max_len=32, decode_steps=4,
             train_steps=2, train_warmup=1)
DECODE_BATCHES = (1, 64)
ACCUM = 8  # microbatches per optimiser step in the accumulated Muon-vs-AdamW pair


@dataclasses.dataclass(frozen=True)
class TrainRow:
    name: str
    preset: str
    overrides: tuple[str, ...]
    flops: str  # "gpt2" (6N + 12 L d T) or "active" (models.accounting)


def _model_overrides(s: Shapes, size: str, platform: str) -> list[str]:
    d, n, h = s.d124 if size == "124m" else s.d354
    T, B = (s.seq124, s.batch124) if size == "124m" else (s.seq354, s.batch354)
    out = [f"model.d_model={d}", f"model.n_layers={n}", f"model.n_heads={h}", f"model.max_seq_len={T}",
           f"data.seq_len={T}", f"data.batch_size={B}", "trainer.microbatches=1", "trainer.eval_batch_size=1",
           "optimizer.warmup_steps=0", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
           # cuDNN flash attention on NVIDIA GPUs; XLA's attention elsewhere (the CPU dry run).
           f"model.attention_impl={'cudnn' if platform == 'gpu' else 'xla'}"]
    if s.vocab is not None:
        out += [f"model.vocab_size={s.vocab}", f"data.synthetic.vocab_size={min(256, s.vocab)}"]
    if s.loss_chunk_tokens is not None:
        out.append(f"trainer.loss_chunk_tokens={s.loss_chunk_tokens}")
    return out


# Muon as the issue asks for it: orthogonalisation in bf16 (fp32 momentum), batched over layers
MUON = ("optimizer.name=muon", "optimizer.ns_dtype=bfloat16")


def train_rows(s: Shapes, platform: str) -> list[TrainRow]:
    m124, m354 = _model_overrides(s, "124m", platform), _model_overrides(s, "354m", platform)
    moe = ["model.family=moe", "model.n_experts=8", "model.moe_top_k=2", "model.moe_dispatch=dropless",
           f"model.moe_d_ff={s.moe_d_ff}"]

    def mor(router: str, n_r: int) -> list[str]:
        return ["model.family=mor", f"model.mor_router={router}", f"model.mor_recursions={n_r}",
                "model.mor_sharing=middle_cycle", f"model.n_layers={2 + n_r * s.mor_block}"]

    accum = [f"data.batch_size={ACCUM * s.batch354}", f"trainer.microbatches={ACCUM}"]
    return [
        TrainRow("dense-124m-adamw", "gpt2-124m", (*m124, "optimizer.name=adamw"), "gpt2"),
        TrainRow("dense-354m-adamw", "350m", (*m354, "optimizer.name=adamw"), "gpt2"),
        TrainRow("dense-354m-muon", "350m", (*m354, *MUON), "gpt2"),
        # optax.contrib.muon's fp32 orthogonalisation: what the bf16 one (optim.muon_lowp) buys
        TrainRow("dense-354m-muon-nsfp32", "350m", (*m354, "optimizer.name=muon"), "gpt2"),
        # The same pair with one optimiser step per ACCUM microbatches: Muon's orthogonalisation costs the
        # same per step, so its share (and overhead) falls ACCUM-fold (optim.muon.newton_schulz_flops).
        TrainRow(f"dense-354m-adamw-acc{ACCUM}", "350m", (*m354, "optimizer.name=adamw", *accum), "gpt2"),
        TrainRow(f"dense-354m-muon-acc{ACCUM}", "350m", (*m354, *MUON, *accum), "gpt2"),
        TrainRow("moe-124m-adamw", "gpt2-124m", (*m124, *moe), "active"),
        TrainRow("mor-124m-ec", "gpt2-124m", (*m124, *mor("expert_choice", 3)), "active"),
        TrainRow("mor-124m-looped-eq", "gpt2-124m", (*m124, *mor("none", 2)), "active"),
        TrainRow("mor-124m-looped-full", "gpt2-124m", (*m124, *mor("none", 3)), "active"),
        # Last: the 350m preset's remat traded for speed; it may not fit JAX's default 75% memory pool.
        TrainRow("dense-354m-adamw-noremat", "350m", (*m354, "optimizer.name=adamw", "model.remat=none"),
                 "gpt2"),
    ]


def decode_models(s: Shapes, platform: str) -> dict[str, ModelConfig]:
    """The decode rows' models: the 124m shape as dense MHA, MLA, and MoR with recursive KV sharing."""
    base = get_preset("gpt2-124m").override(_model_overrides(s, "124m", platform)).model
    base = base.replace(param_dtype="bfloat16", max_seq_len=max(base.max_seq_len, s.decode_max_len))
    mor = base.replace(family="mor", mor_recursions=3, mor_sharing="middle_cycle", mor_kv_strategy="shared",
                       n_layers=2 + 3 * s.mor_block)
    return {"dense": base, "mla": base.replace(attention="mla"), "mor-kvshare": mor}


# ----- measurements -----------------------------------------------------------------------------------------
def vendor_peak(device_kind: str) -> float | None:
    for key, peak in VENDOR_BF16_PEAKS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def matmul_peak(n: int, device: jax.Device, min_seconds: float) -> float:
    """Achieved bf16 FLOP/s of an n x n x n matmul (2 n^3 FLOPs), timed without host syncs between reps."""
    from experiments.bench import matmul_flops

    return matmul_flops("bfloat16", n, device, min_seconds=min_seconds)


def compiled_bytes(compiled: Any) -> dict[str, int] | None:
    """Peak-memory estimate of a compiled program: arguments + outputs - donated/aliased + temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_peak_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats() if device.platform != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def gpt2_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The issue's 6 N + 12 L d T, N = non-embedding params + V d (the output head's matmul)."""
    counts = accounting.param_counts(cfg)
    n = counts["non_embedding"] + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def _config_summary(cfg: ExperimentConfig) -> str:
    c = cfg.model
    parts = [f"{c.family}", f"d={c.d_model}", f"L={c.n_layers}", f"H={c.n_heads}", f"V={c.vocab_size}",
             f"T={cfg.data.seq_len}", f"B={cfg.data.batch_size}", cfg.optimizer.name, f"remat={c.remat}",
             f"attn={c.attention_impl}", f"ce_chunk={cfg.trainer.loss_chunk_tokens}"]
    if c.family == "moe":
        parts.append(f"E={c.n_experts} top{c.moe_top_k} F_e={c.resolved_moe_d_ff} {c.moe_dispatch}")
    if c.family == "mor":
        parts.append(f"N_r={c.mor_recursions} {c.mor_router} {c.mor_sharing}")
    return " ".join(parts)


def run_train_row(row: TrainRow, device: jax.Device, s: Shapes, peaks: dict[str, float | None]) -> dict:
    cfg = get_preset(row.preset).override(list(row.overrides)).validate()
    mesh = shd.make_mesh(cfg.mesh, [device])
    prog = build_program(cfg, mesh)
    state = prog.init_state()
    B, L, M = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.microbatches
    # Throughput does not depend on token values: random tokens, no dataset.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(M, B // M, L + 1), dtype=np.int32)
    batch = shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape)
    for _ in range(s.train_warmup):
        state, metrics = prog.step(state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(s.train_steps):  # no host sync in here: steps queue up on the device
        state, metrics = prog.step(state, batch)
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - t0) / s.train_steps
    loss = float(metrics["loss"])
    del state
    tps = B * L / step_time
    active = accounting.family_summary(cfg.model, L)["active_flops_per_token"]
    fpt = gpt2_flops_per_token(cfg.model, L) if row.flops == "gpt2" else active
    formula = ("6N + 12*L*d*T, N = non_embedding + V*d" if row.flops == "gpt2"
               else "models.accounting active training FLOPs (3 x routed / expected-depth forward, full T)")
    counts = accounting.param_counts(cfg.model)
    mem = compiled_bytes(prog.train_step)
    hlo = prog.train_step.as_text()
    hlo_checks = {"full_logits_f32_buffers": full_logits_buffers(hlo, B * L, cfg.model.vocab_size),
                  "host_transfers": host_transfers(hlo)}
    if cfg.model.family == "moe":  # grouped matmuls kept, or rewritten into dense ones over every expert?
        hlo_checks["ragged_dot"] = ragged_dot_lowering(hlo)
    out = {
        "name": row.name,
        "kind": "train",
        "status": "ok" if math.isfinite(loss) else f"error: non-finite loss {loss}",
        "summary": _config_summary(cfg),
        "preset": row.preset,
        "overrides": list(row.overrides),
        "config": cfg.to_dict(),
        "params": counts["total"],
        "active_params": counts.get("active", counts["total"]),
        "flops_per_token": fpt,
        "flops_formula": formula,
        "accounting_flops_per_token": active,
        "tokens_per_step": B * L,
        "timed_steps": s.train_steps,
        "warmup_steps": s.train_warmup,
        "step_time_s": step_time,
        "tokens_per_second": tps,
        "model_flops_per_second": fpt * tps,
        "compile_s": prog.compile_seconds,
        "loss": loss,
        "hlo_checks": hlo_checks,
    }
    out.update(muon_ns_share(cfg, prog, fpt))
    out.update(_mfu(fpt * tps, peaks))
    out.update(_memory(mem, device))
    return out


def muon_ns_share(cfg: ExperimentConfig, prog: Any, flops_per_token: float) -> dict[str, float]:
    """For a Muon row: the orthogonalisation's FLOPs per optimiser step and their share of the step's model
    FLOPs -- the overhead Muon pays at an equal FLOP rate. It does not shrink with the batch, so with one
    microbatch per step it is far larger than with gradient accumulation to a real batch. {} otherwise."""
    if cfg.optimizer.name != "muon":
        return {}
    ns = newton_schulz_flops(prog.partition, cfg.optimizer.ns_steps)
    step_flops = flops_per_token * cfg.data.batch_size * cfg.data.seq_len
    return {"muon_ns_flops_per_step": ns, "muon_ns_fraction_of_step_flops": ns / step_flops}


def _mfu(flops_per_s: float, peaks: dict[str, float | None]) -> dict[str, float | None]:
    measured, vendor = peaks["measured"], peaks["vendor"]
    return {"mfu_measured": flops_per_s / measured if measured else None,
            "mfu_vendor": flops_per_s / vendor if vendor else None}


# The device's high-water mark after the previous row, per device id: peak_bytes_in_use never goes down in a
# process, so a row only learns its own device peak when it raises the mark.
_SEEN_DEVICE_PEAK: dict[int, int] = {}


def _memory(mem: dict[str, int] | None, device: jax.Device) -> dict[str, Any]:
    """``peak_memory_bytes``: the row's compiled estimate (comparable across rows). The device's own
    ``peak_bytes_in_use`` is the whole process's high-water mark -- after the 354m rows every later 124m row
    would show the 354m peak -- so it is reported beside it, with whether this row set it."""
    dev_peak = device_peak_bytes(device)
    prev = _SEEN_DEVICE_PEAK.get(device.id)
    if dev_peak is not None:
        _SEEN_DEVICE_PEAK[device.id] = dev_peak
    return {
        "peak_memory_bytes": mem["total"] if mem else None,
        "peak_memory_source": "compiled memory_analysis (argument + output - alias + temp)",
        "device_peak_bytes_in_use": dev_peak,
        "device_peak_set_by_this_row": None if dev_peak is None else (prev is None or dev_peak > prev),
        "compiled_memory": mem,
    }


def run_decode_row(name: str, model_cfg: ModelConfig, batch: int, device: jax.Device, s: Shapes,
                   skip_exited: bool = True) -> dict:
    base = {"name": name, "kind": "decode", "summary": f"{model_cfg.family} attention={model_cfg.attention} "
            f"kv={model_cfg.mor_kv_strategy if model_cfg.family == 'mor' else '-'} d={model_cfg.d_model} "
            f"L={model_cfg.n_layers} batch={batch} max_len={s.decode_max_len}"
            + ("" if skip_exited else " (exited tokens run masked)"), "batch": batch,
            "max_len": s.decode_max_len, "config": dataclasses.asdict(model_cfg), "skip_exited": skip_exited}
    try:
        from models import decode
    except ImportError as e:
        return {**base, "status": f"skipped: models.decode missing ({e})"}
    import flax.linen as nn

    from models import build_model

    model = build_model(model_cfg)
    with jax.default_device(device):
        variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        cache = decode.init_cache(model_cfg, batch, s.decode_max_len)

    def greedy(variables, cache, tokens_B, pos):
        logits_BxV, cache = decode.decode_step(model_cfg, variables, cache, tokens_B, pos,
                                               skip_exited=skip_exited)
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache

    step = jax.jit(greedy, donate_argnums=(1,))
    tokens_B = jax.device_put(jnp.zeros((batch,), jnp.int32), device)
    lowered = step.lower(variables, cache, tokens_B, jnp.int32(0))
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    warmup = 2
    if warmup + s.decode_steps > s.decode_max_len:
        raise ValueError(f"decode: {warmup} + {s.decode_steps} steps exceed max_len {s.decode_max_len}")
    for pos in range(warmup):
        tokens_B, cache = compiled(variables, cache, tokens_B, jnp.int32(pos))
    jax.block_until_ready((tokens_B, cache))
    t0 = time.perf_counter()
    for pos in range(warmup, warmup + s.decode_steps):
        tokens_B, cache = compiled(variables, cache, tokens_B, jnp.int32(pos))
    jax.block_until_ready((tokens_B, cache))
    step_time = (time.perf_counter() - t0) / s.decode_steps
    kv_bytes = float(decode.kv_cache_bytes(model_cfg, batch, s.decode_max_len))
    return {
        **base,
        "status": "ok",
        "params": accounting.param_counts(model_cfg)["total"],
        "positions_timed": [warmup, warmup + s.decode_steps],
        "step_time_s": step_time,
        "tokens_per_second": batch / step_time,
        "compile_s": compile_s,
        "kv_cache_bytes": kv_bytes,
        "kv_bytes_per_token": kv_bytes / (batch * s.decode_max_len),
        "accounting_kv_bytes_per_token": accounting.kv_cache_bytes_per_token(model_cfg),
        **_memory(compiled_bytes(compiled), device),
    }


# ----- the suite --------------------------------------------------------------------------------------------
def _guard(name: str, kind: str, fn: Callable[[], dict]) -> dict:
    """Run one row; an exception becomes the row's status (the rest of the suite still runs)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- a failed row must not lose the other rows' measurements
        traceback.print_exc()
        return {"name": name, "kind": kind, "status": f"error: {type(e).__name__}: {e}"}


def _train_with_fallback(row: TrainRow, device: jax.Device, s: Shapes, peaks: dict) -> dict:
    """A row that fails with cuDNN attention (e.g. a mask layout the kernel rejects) is measured again with
    XLA's attention, so the suite still reports it; its status says so."""
    try:
        return run_train_row(row, device, s, peaks)
    except Exception as e:  # noqa: BLE001
        # Only an error from the cuDNN attention path earns a second try: an out-of-memory error would come
        # back worse (XLA's attention keeps the full T x T probabilities) and any other failure would just
        # cost the row's compile and run twice out of the session's fixed device time.
        if "model.attention_impl=cudnn" not in row.overrides or not _cudnn_attention_error(e):
            raise
        traceback.print_exc()
        out = run_train_row(dataclasses.replace(row, overrides=(*row.overrides, "model.attention_impl=xla")),
                            device, s, peaks)
        if out["status"] == "ok":
            out["status"] = f"ok: XLA attention (cudnn failed: {type(e).__name__}: {str(e)[:200]})"
        return out


def _cudnn_attention_error(e: BaseException) -> bool:
    """Whether ``e`` looks like cuDNN fused attention refusing or failing (not memory, nor anything else)."""
    text = f"{type(e).__name__}: {e}".lower()
    if "resource_exhausted" in text or "out of memory" in text:
        return False
    return isinstance(e, NotImplementedError) or "cudnn" in text or "dot_product_attention" in text


def decode_rows(s: Shapes, platform: str) -> list[tuple[str, ModelConfig, int, bool]]:
    """(name, model, batch, skip_exited) of every decode row: each model at each batch, and MoR at batch 1
    with its exited tokens run masked (``skip_exited=False``): what skipping the steps no row needs buys."""
    models = decode_models(s, platform)
    rows = [(f"decode-{m}-b{b}", cfg, b, True) for m, cfg in models.items() for b in DECODE_BATCHES]
    rows.append(("decode-mor-kvshare-noskip-b1", models["mor-kvshare"], 1, False))
    return rows


def row_names(dry: bool = True) -> list[str]:
    s = DRY if dry else FULL
    return [r.name for r in train_rows(s, "cpu")] + [r[0] for r in decode_rows(s, "cpu")]


def unknown_rows(only: Sequence[str] | None, dry: bool) -> list[str]:
    """The names in ``only`` that are not rows of the suite."""
    known = row_names(dry)
    return [r for r in (only or ()) if r not in known]


def run_suite(dry: bool, only: Sequence[str] | None = None, log: Callable[[str], None] = print,
              on_row: Callable[[dict], None] | None = None, deadline_s: float | None = None,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Every selected row in this process; returns the results. ``on_row`` gets the results so far after
    each row (``main`` rewrites ``--json`` with them: a run cut short by a time limit keeps its rows).

    ``only`` also sets the order (most important rows first). ``deadline_s``: no row starts once that many
    seconds have passed since the suite began; the rows left are reported as skipped, by name, so a device
    session with a fixed time budget (this project's: 15 minutes in all, 10 a command) ends with a complete
    table instead of a killed process. Each row records its wall time (compile + measure) to plan the next."""
    s = DRY if dry else FULL
    device = jax.devices()[0]
    platform = device.platform
    known = row_names(dry)
    unknown = unknown_rows(only, dry)
    if unknown:
        raise ValueError(f"unknown rows {unknown}; rows: {known}")
    order = list(dict.fromkeys(only)) if only else known
    t_start = clock()
    n = s.matmul_n if (platform == "gpu" or dry) else min(s.matmul_n, 2048)
    log(f"measuring the bf16 {n}^3 matmul peak on {device.device_kind} ...")
    peaks = {"measured": matmul_peak(n, device, min_seconds=0.1 if dry else 1.0),
             "vendor": vendor_peak(device.device_kind) if platform == "gpu" else None}
    rows: list[dict] = []

    def results() -> dict:
        return {
            "suite": "gpu",
            "dry": dry,
            "device": device.device_kind,
            "platform": platform,
            "jax_version": jax.__version__,
            "matmul": {"n": n, "dtype": "bfloat16", "measured_flops_per_s": peaks["measured"],
                       "vendor_peak_flops_per_s": peaks["vendor"]},
            "rows": rows,
            "comparisons": comparisons(rows),
            "targets": TARGETS,
        }

    jobs = [(row.name, "train", functools.partial(_train_with_fallback, row, device, s, peaks))
            for row in train_rows(s, platform)]
    jobs += [(name, "decode", functools.partial(run_decode_row, name, mcfg, b, device, s, skip))
             for name, mcfg, b, skip in decode_rows(s, platform)]
    by_name = {name: (kind, fn) for name, kind, fn in jobs}
    for name in order:
        kind, fn = by_name[name]
        elapsed = clock() - t_start
        if deadline_s is not None and elapsed >= deadline_s:
            log(f"row {name}: skipped (deadline)")
            rows.append({"name": name, "kind": kind, "status": f"skipped: not started, {elapsed:.0f} s had "
                         f"passed of the suite's {deadline_s:g} s deadline"})
        else:
            log(f"row {name} ...")
            t0 = clock()
            rows.append({**_guard(name, kind, fn), "wall_s": clock() - t0})
        if on_row is not None:
            on_row(results())
    return results()


def comparisons(rows: list[dict]) -> dict[str, float | None]:
    """The issue's ratios, from the rows measured in this process (None where a row is missing/failed)."""
    ok = {r["name"]: r for r in rows if r.get("status", "").startswith("ok")}

    def get(name: str, key: str) -> float | None:
        return ok[name][key] if name in ok and ok[name].get(key) is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    muon, adamw = get("dense-354m-muon", "step_time_s"), get("dense-354m-adamw", "step_time_s")
    ns_share = get("dense-354m-muon", "muon_ns_fraction_of_step_flops")
    muon_fp32 = get("dense-354m-muon-nsfp32", "step_time_s")
    muon_acc = get(f"dense-354m-muon-acc{ACCUM}", "step_time_s")
    adamw_acc = get(f"dense-354m-adamw-acc{ACCUM}", "step_time_s")
    return {
        "muon_overhead_pct": 100.0 * (muon / adamw - 1.0) if muon and adamw else None,
        "muon_overhead_pct_accumulated": (
            100.0 * (muon_acc / adamw_acc - 1.0) if muon_acc and adamw_acc else None
        ),
        "muon_ns_flops_pct_of_step": 100.0 * ns_share if ns_share is not None else None,
        "muon_fp32_ns_overhead_pct": 100.0 * (muon_fp32 / adamw - 1.0) if muon_fp32 and adamw else None,
        "moe_mfu_vs_dense": ratio(get("moe-124m-adamw", "mfu_measured"),
                                  get("dense-124m-adamw", "mfu_measured")),
        "mor_tokens_per_s_vs_looped_eq": ratio(get("mor-124m-ec", "tokens_per_second"),
                                               get("mor-124m-looped-eq", "tokens_per_second")),
        "mor_tokens_per_s_vs_looped_full": ratio(get("mor-124m-ec", "tokens_per_second"),
                                                 get("mor-124m-looped-full", "tokens_per_second")),
        "mor_decode_skip_speedup_b1": ratio(get("decode-mor-kvshare-b1", "tokens_per_second"),
                                            get("decode-mor-kvshare-noskip-b1", "tokens_per_second")),
    }


def _fmt(x: float | None, scale: float = 1.0, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def format_table(res: dict) -> str:
    m = res["matmul"]
    lines = [
        f"device {res['device']} ({res['platform']}), jax {res['jax_version']}"
        + ("  [DRY: tiny shapes]" if res["dry"] else ""),
        f"bf16 matmul {m['n']}^3: {m['measured_flops_per_s'] / 1e12:.2f} TFLOP/s measured; vendor peak "
        f"{_fmt(m['vendor_peak_flops_per_s'], 1e-12, '.0f', ' TFLOP/s')}",
        "",
        f"{'row':<28} {'status':<8} {'tok/s':>12} {'step ms':>9} {'MFU meas':>8} {'MFU vend':>8} "
        f"{'mem GiB':>8} {'FLOPs/tok':>10} {'KV B/tok':>9} {'wall s':>7}",
    ]
    for r in res["rows"]:
        st = r["status"].split(":")[0]
        lines.append(
            f"{r['name']:<28} {st:<8} {_fmt(r.get('tokens_per_second')):>12} "
            f"{_fmt(r.get('step_time_s'), 1e3, '.2f'):>9} {_fmt(r.get('mfu_measured'), 100, '.1f', '%'):>8} "
            f"{_fmt(r.get('mfu_vendor'), 100, '.1f', '%'):>8} "
            f"{_fmt(r.get('peak_memory_bytes'), 2**-30, '.2f'):>8} "
            f"{_fmt(r.get('flops_per_token'), 1e-6, '.1f', 'M'):>10} "
            f"{_fmt(r.get('kv_bytes_per_token'), 1, ',.0f'):>9} {_fmt(r.get('wall_s'), 1, '.0f'):>7}"
        )
    lines.append("")
    for r in res["rows"]:
        extra = "" if r["status"] == "ok" else f"  [{r['status']}]"
        lines.append(f"  {r['name']}: {r.get('summary', '')}{extra}")
    c = res["comparisons"]
    lines += [
        "",
        f"Muon step-time overhead vs AdamW (354m): {_fmt(c['muon_overhead_pct'], 1, '.1f', '%')} "
        f"(target <= 3%); its Newton-Schulz FLOPs are {_fmt(c['muon_ns_flops_pct_of_step'], 1, '.1f', '%')} "
        "of the step's model FLOPs (optim.muon.newton_schulz_flops)",
        f"  with {ACCUM} microbatches per optimiser step: "
        f"{_fmt(c['muon_overhead_pct_accumulated'], 1, '.1f', '%')}; with optax's fp32 Newton-Schulz: "
        f"{_fmt(c['muon_fp32_ns_overhead_pct'], 1, '.1f', '%')}",
        f"MoE MFU / dense MFU (124m, active FLOPs): {_fmt(c['moe_mfu_vs_dense'], 1, '.2f')} (target >= 0.70)",
        f"MoR tok/s / looped at equal active FLOPs: {_fmt(c['mor_tokens_per_s_vs_looped_eq'], 1, '.2f')} "
        f"(target >= 0.80); / looped at full depth: {_fmt(c['mor_tokens_per_s_vs_looped_full'], 1, '.2f')}",
        f"MoR decode at batch 1, exited tokens skipped / run masked: "
        f"{_fmt(c['mor_decode_skip_speedup_b1'], 1, '.2f')}x tokens/s",
        "FLOPs/token: GPT-2 rows 6N + 12*L*d*T (N = non-embedding + V*d); MoE/MoR rows: active FLOPs "
        "(models.accounting)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench --suite gpu",
                                description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="gpu", choices=["gpu"])
    p.add_argument("--dry", action="store_true", help="tiny shapes through the same code path (CPU check)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated subset, run in this order: {','.join(row_names())}")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no row after this many seconds; the rest are reported as skipped")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    p.add_argument("--memory", action="store_true",
                   help="instead: CPU memory_analysis of the full-size dense train rows (no device)")
    args = p.parse_args(argv)
    if args.memory:
        est = [estimate_train_memory(r) for r in MEMORY_ROWS]
        for e in est:
            print(f"{e['row']:<26} {e['total'] / 2**30:6.2f} GiB (args {e['argument'] / 2**30:.2f}, temp "
                  f"{e['temp'] / 2**30:.2f}; compiled in {e['compile_s']:.0f} s)  {e['summary']}"
                  + (f"  [Muon Newton-Schulz FLOPs = {100 * e['muon_ns_fraction_of_step_flops']:.1f}% of the "
                     "step's model FLOPs]" if "muon_ns_fraction_of_step_flops" in e else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(est, f, indent=2)
        return 0
    only = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    # Refused as a usage error, before JAX starts a device (run_suite would raise the same as a traceback).
    unknown = unknown_rows(only, args.dry)
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows: {','.join(row_names(args.dry))}")
    if args.deadline_s is not None and args.deadline_s <= 0:
        p.error(f"--deadline-s must be > 0, got {args.deadline_s:g}")

    def save(res: dict) -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            write_text_atomic(args.json, json.dumps(res, indent=2))

    res = run_suite(args.dry, only, log=lambda msg: print(msg, file=sys.stderr, flush=True), on_row=save,
                    deadline_s=args.deadline_s)
    print(format_table(res))
    save(res)
    failed = [r["name"] for r in res["rows"] if r["status"].startswith("error")]
    return 1 if failed else 0


# ----- CPU memory estimate of the GPU programs --------------------------------------------------------------
def _flash_attention_standin(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                             query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                             implementation=None, return_residual=False):
    """Causal attention with the *memory footprint* of cuDNN flash attention, for CPU memory estimates.

    cuDNN's fused kernel keeps only q, k, v, the output and the per-row logsumexp for the backward pass and
    recomputes the probabilities there; XLA's CPU attention instead saves the [B, H, L, L] probabilities of
    every layer, which would dominate (and misstate) a CPU estimate of the GPU program. This stand-in has the
    cuDNN residuals (a custom VJP) and XLA's arithmetic. Only what the GPU presets use: causal, no mask/bias.
    """
    if bias is not None or mask is not None or not is_causal or query_seq_lengths is not None \
            or key_value_seq_lengths is not None or local_window_size is not None or return_residual:
        raise NotImplementedError("the flash-attention memory stand-in supports plain causal attention only")
    H, G = query.shape[2], key.shape[2]
    if G != H:  # GQA: repeat the K/V heads (costs memory the real kernel does not, i.e. a safe over-estimate)
        key, value = (jnp.repeat(x, H // G, axis=2) for x in (key, value))
    return _flash_core(query, key, value, float(scale or query.shape[-1] ** -0.5))


def _probs(q, k, scale):
    s_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q, k, preferred_element_type=jnp.float32) * scale
    L, S = s_BxHxLxS.shape[-2:]
    causal_LxS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None]
    s_BxHxLxS = jnp.where(causal_LxS, s_BxHxLxS, -jnp.inf)
    lse_BxHxL = jax.nn.logsumexp(s_BxHxLxS, axis=-1)
    return jnp.exp(s_BxHxLxS - lse_BxHxL[..., None]), lse_BxHxL


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_core(q, k, v, scale):
    p, _ = _probs(q, k, scale)
    return jnp.einsum("bhls,bshk->blhk", p.astype(v.dtype), v)


def _flash_fwd(q, k, v, scale):
    p, lse = _probs(q, k, scale)
    out = jnp.einsum("bhls,bshk->blhk", p.astype(v.dtype), v)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, res, dout):
    q, k, v, out, lse = res
    s = jnp.einsum("blhk,bshk->bhls", q, k, preferred_element_type=jnp.float32) * scale
    L, S = s.shape[-2:]
    p = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(L)[:, None], jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bhls,blhk->bshk", p.astype(dout.dtype), dout)
    dp = jnp.einsum("blhk,bshk->bhls", dout, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("blhk,blhk->bhl", dout.astype(jnp.float32), out.astype(jnp.float32))
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bhls,bshk->blhk", ds, k)
    dk = jnp.einsum("bhls,blhk->bshk", ds, q)
    return dq, dk, dv


_flash_core.defvjp(_flash_fwd, _flash_bwd)



MEMORY_ROWS = ("dense-124m-adamw", "dense-354m-adamw", "dense-354m-muon", "dense-354m-adamw-noremat")


def estimate_train_memory(row_name: str, extra_overrides: Sequence[str] = (), flash_standin: bool = True
                          ) -> dict[str, Any]:
    """``memory_analysis()`` of a full-size GPU train row's step, compiled for the CPU without allocating
    anything (build_program lowers from abstract shapes): the GPU dtypes, remat policy and loss chunking of
    the preset, XLA attention in place of cuDNN -- with ``flash_standin`` (default) its memory footprint
    replaced by cuDNN flash attention's (see ``_flash_attention_standin``)."""
    rows = {r.name: r for r in train_rows(FULL, "gpu")}
    row = rows[row_name]
    cfg = get_preset(row.preset).override([*row.overrides, "model.attention_impl=xla", *extra_overrides])
    cfg = cfg.validate()
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    original = jax.nn.dot_product_attention
    if flash_standin:
        jax.nn.dot_product_attention = _flash_attention_standin
    try:
        t0 = time.perf_counter()
        prog = build_program.__wrapped__(cfg, mesh)  # bypass the memo: the patched program must not leak
        seconds = time.perf_counter() - t0
    finally:
        jax.nn.dot_product_attention = original
    out = {"row": row_name, "summary": _config_summary(cfg), "flash_standin": flash_standin,
           "compile_s": seconds, **compiled_bytes(prog.train_step)}
    out.update(muon_ns_share(cfg, prog, gpt2_flops_per_token(cfg.model, cfg.data.seq_len)))
    return out
