"""Training throughput benchmark: tokens/s and MFU of a preset, against this device's measured matmul peak.

    python -m experiments.bench --preset gpt2-124m [--set k=v ...] [--steps 10] [--json OUT]
    python -m experiments.bench --smoke            # CPU-sized shapes, a few seconds
    python -m experiments.bench --families --smoke # one row per model family (tiny, tiny-moe/-mla/-mor)
    python -m experiments.bench --suite gpu [--dry] [--rows A,B] --json OUT.json   # issue 7's GPU suite
                                                   # (experiments/bench_gpu.py; --dry: tiny shapes, CPU)

The baseline is measured in the same process: a large square matmul in fp32 and bf16 on one device gives the
achievable FLOP/s per device (a tighter reference than the datasheet peak, which is also reported when
``trainer.peak_flops`` is set). MFU = model FLOPs/s / (peak x devices), with model FLOPs the exact training
FLOPs per token from ``models.accounting`` (as in Chowdhery et al. 2022, PaLM, appendix B: recomputation from
remat is not counted). For MoE and MoR these are the *active* FLOPs (routed top-k + shared experts + router;
MoR's expected depth under its routing capacity), so MFU measures useful work: on CPU, XLA lowers MoE's
dropless ragged_dot to a dense matmul over all experts, which shows up as a lower MFU.
Timings belong here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from experiments import sharding as shd
from experiments.presets import get_preset
from experiments.trainer import build_program
from models import accounting

FAMILY_PRESETS = ("tiny", "tiny-moe", "tiny-mla", "tiny-mor")  # --families: one of each family / attention

SMOKE_OVERRIDES = (
    "model.d_model=32",
    "model.n_layers=1",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "trainer.steps=10",
    "optimizer.warmup_steps=0",
)


def matmul_flops(dtype: str, n: int, device: jax.Device, min_seconds: float = 0.5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in ``dtype`` on one device (2 n^3 FLOPs per product)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()  # compile + warm up
    reps, elapsed = 1, 0.0
    while elapsed < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        elapsed = time.perf_counter() - t0
        if elapsed < min_seconds:
            reps *= 2
    return 2.0 * n**3 * reps / elapsed


def bench_train(cfg, steps: int, warmup: int = 2) -> dict[str, Any]:
    mesh = shd.make_mesh(cfg.mesh)
    prog = build_program(cfg, mesh)
    state = prog.init_state()
    M, B, L = cfg.trainer.microbatches, cfg.data.batch_size, cfg.data.seq_len
    # Throughput does not depend on token values: random tokens avoid needing a dataset.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(M, B // M, L + 1)).astype(np.int32)
    batch = shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape)
    for _ in range(warmup):
        state, m = prog.step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = prog.step(state, batch)
        float(m["loss"])  # the trainer syncs on the loss every step too
    elapsed = time.perf_counter() - t0
    return {
        "steps": steps,
        "step_time": elapsed / steps,
        "tokens_per_second": steps * cfg.tokens_per_step / elapsed,
        "compile_seconds": prog.compile_seconds,
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
    }


def run(preset: str, overrides: Sequence[str], steps: int, matmul_size: int | None, smoke: bool) -> dict:
    smoke_overrides = list(SMOKE_OVERRIDES if smoke else ())
    if get_preset(preset).model.family == "mor":  # MoR's depth is set by its sharing layout: keep n_layers
        smoke_overrides = [o for o in smoke_overrides if not o.startswith("model.n_layers=")]
    overrides = [*smoke_overrides, *overrides]
    cfg = get_preset(preset).override(overrides).validate()
    dev = jax.devices()[0]
    n = matmul_size or (256 if smoke else (1024 if dev.platform == "cpu" else 8192))
    peaks = {
        dt: matmul_flops(dt, n, dev, min_seconds=0.1 if smoke else 0.5) for dt in ("float32", "bfloat16")
    }
    train = bench_train(cfg, steps)
    fpt = accounting.family_summary(cfg.model, cfg.data.seq_len)["active_flops_per_token"]
    model_flops = fpt * train["tokens_per_second"]
    compute_peak = peaks.get(cfg.model.compute_dtype, peaks["float32"])
    out = {
        "preset": preset,
        "overrides": list(overrides),
        "device": dev.device_kind,
        "platform": dev.platform,
        "matmul_size": n,
        "matmul_flops_per_device": peaks,
        "compute_dtype": cfg.model.compute_dtype,
        "family": cfg.model.family,
        "attention": cfg.model.attention,
        "params": accounting.param_counts(cfg.model)["total"],
        "active_params": accounting.param_counts(cfg.model).get("active"),
        "flops_per_token": fpt,
        **train,
        "model_flops_per_second": model_flops,
        "mfu_vs_measured_matmul": model_flops / (compute_peak * train["devices"]),
        "peak_flops_config": cfg.trainer.peak_flops,
        "mfu_vs_config_peak": (model_flops / (cfg.trainer.peak_flops * train["devices"]))
        if cfg.trainer.peak_flops
        else None,
    }
    return out


def format_table(r: dict) -> str:
    rows = [
        ("device", f"{r['device']} x{r['devices']} ({r['platform']}), mesh {r['mesh']}"),
        (
            "matmul fp32 / device",
            f"{r['matmul_flops_per_device']['float32'] / 1e12:.3f} TFLOP/s (n={r['matmul_size']})",
        ),
        ("matmul bf16 / device", f"{r['matmul_flops_per_device']['bfloat16'] / 1e12:.3f} TFLOP/s"),
        (
            "model",
            f"{r['preset']} ({r['family']}, {r['attention']}): {r['params']:,} params "
            f"({r['active_params']:,} active), {r['flops_per_token']:,.0f} active train FLOPs/token, "
            f"compute {r['compute_dtype']}",
        ),
        ("step time", f"{r['step_time'] * 1e3:.2f} ms (compile {r['compile_seconds']:.1f} s)"),
        ("tokens/s", f"{r['tokens_per_second']:,.0f}"),
        ("model FLOP/s", f"{r['model_flops_per_second'] / 1e12:.4f} TFLOP/s"),
        ("MFU vs measured matmul", f"{100 * r['mfu_vs_measured_matmul']:.1f}%"),
        (
            "MFU vs trainer.peak_flops",
            "n/a (unset)" if r["mfu_vs_config_peak"] is None else f"{100 * r['mfu_vs_config_peak']:.1f}%",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=["single", "gpu"], default="single")
    if suite.parse_known_args(argv)[0].suite == "gpu":  # the multi-row GPU suite has its own options
        from experiments import bench_gpu

        return bench_gpu.main(argv)
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (after 2 warm-up steps)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n baseline matmul")
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a quick CPU check")
    p.add_argument("--families", action="store_true", help=f"benchmark each of {FAMILY_PRESETS} in turn")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--suite", choices=["single", "gpu"], default="single",
                   help="gpu: every issue-7 row in one process (experiments/bench_gpu.py, --suite gpu -h)")
    args = p.parse_args(argv)
    from experiments.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    presets = FAMILY_PRESETS if args.families else (args.preset,)
    results = [run(name, args.overrides, args.steps, args.matmul_size, args.smoke) for name in presets]
    print("\n\n".join(format_table(r) for r in results))
    if len(results) > 1:
        print("\nfamily comparison (MFU on active FLOPs vs measured matmul):")
        for r in results:
            print(f"  {r['preset']:<10} {r['tokens_per_second']:>12,.0f} tok/s  "
                  f"{100 * r['mfu_vs_measured_matmul']:5.1f}% MFU  {r['active_params']:,} active params")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if args.families else results[0], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
