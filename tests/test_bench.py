"""The GPU benchmark suite's CPU dry mode (``python -m experiments.bench --suite gpu --dry``): every row runs
through the real code path on tiny shapes and the JSON/table are well formed. Only structure and positivity
are asserted -- speed is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench_gpu
from experiments.presets import get_preset
from models import accounting

REPO = Path(__file__).resolve().parent.parent


def test_vendor_peak_by_device_kind():
    assert bench_gpu.vendor_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_gpu.vendor_peak("NVIDIA H100 PCIe") == 756e12
    assert bench_gpu.vendor_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench_gpu.vendor_peak("cpu") is None


def test_gpt2_flops_formula():
    """6N + 12 L d T with N = non-embedding + V d; for the dense MHA presets it is the accounting's training
    FLOPs plus the norm scales (which do no matmul) -- an independent check of both."""
    c = get_preset("gpt2-124m").model
    n = accounting.param_counts(c)["non_embedding"] + 50304 * 768
    assert bench_gpu.gpt2_flops_per_token(c, 1024) == 6 * n + 12 * 12 * 768 * 1024
    norms = (2 * 12 + 1) * 768
    assert bench_gpu.gpt2_flops_per_token(c, 1024) - 6 * norms == pytest.approx(
        accounting.training_flops_per_token(c, 1024), rel=1e-12)


def test_gpu_suite_dry_run_is_well_formed(tmp_path):
    """The exact CI command of the issue, in a subprocess: there XLA may skip its LLVM optimisations (the dry
    suite compiles ~20 tiny programs and runs each a few steps, so compile time is all its cost)."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, "-m", "experiments.bench", "--suite", "gpu", "--dry", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    printed = proc.stdout
    assert res["suite"] == "gpu" and res["dry"] is True and res["platform"] == "cpu"
    assert res["matmul"]["measured_flops_per_s"] > 0 and res["matmul"]["vendor_peak_flops_per_s"] is None
    names = [r["name"] for r in res["rows"]]
    assert names == bench_gpu.row_names(dry=True)
    assert {"dense-124m-adamw", "dense-354m-adamw", "dense-354m-muon", "moe-124m-adamw", "mor-124m-ec",
            "mor-124m-looped-eq", "decode-dense-b1", "decode-mla-b64", "decode-mor-kvshare-b64"} <= set(names)
    for r in res["rows"]:
        assert r["status"] == "ok", (r["name"], r["status"])
        assert r["tokens_per_second"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["summary"] and r["config"] and r["name"] in printed
        if r["kind"] == "train":
            assert r["flops_per_token"] > 0 and r["flops_formula"]
            assert 0 < r["mfu_measured"] and r["mfu_vendor"] is None and math.isfinite(r["loss"])
            assert r["model_flops_per_second"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"])
            assert r["config"]["trainer"]["loss_chunk_tokens"] > 0
            # the dry programs are the GPU programs in miniature: no full logits, no host transfers
            checks = {k: v for k, v in r["hlo_checks"].items() if k != "ragged_dot"}
            assert checks == {"full_logits_f32_buffers": [], "host_transfers": []}
            assert ("ragged_dot" in r["hlo_checks"]) == (r["config"]["model"]["family"] == "moe")
        else:
            assert r["batch"] in bench_gpu.DECODE_BATCHES and r["kv_bytes_per_token"] > 0
    c = res["comparisons"]
    assert set(c) == {"muon_overhead_pct", "muon_overhead_pct_accumulated", "muon_ns_flops_pct_of_step",
                      "muon_fp32_ns_overhead_pct",
                      "moe_mfu_vs_dense",
                      "mor_tokens_per_s_vs_looped_eq", "mor_tokens_per_s_vs_looped_full",
                      "mor_decode_skip_speedup_b1"}
    muon = next(r for r in res["rows"] if r["name"] == "dense-354m-muon")
    fp32 = next(r for r in res["rows"] if r["name"] == "dense-354m-muon-nsfp32")
    assert muon["config"]["optimizer"]["ns_dtype"] == "bfloat16" != fp32["config"]["optimizer"]["ns_dtype"]
    ns_share = muon["muon_ns_flops_per_step"] / (muon["flops_per_token"] * muon["tokens_per_step"])
    assert muon["muon_ns_fraction_of_step_flops"] == pytest.approx(ns_share)
    assert c["muon_ns_flops_pct_of_step"] == pytest.approx(100 * muon["muon_ns_fraction_of_step_flops"])
    acc = next(r for r in res["rows"] if r["name"] == f"dense-354m-muon-acc{bench_gpu.ACCUM}")
    assert acc["tokens_per_step"] == bench_gpu.ACCUM * muon["tokens_per_step"]  # one step, ACCUM microbatches
    assert acc["config"]["trainer"]["microbatches"] == bench_gpu.ACCUM
    assert acc["muon_ns_fraction_of_step_flops"] == pytest.approx(
        muon["muon_ns_fraction_of_step_flops"] / bench_gpu.ACCUM
    )
    assert all(isinstance(v, float) and math.isfinite(v) for v in c.values())
    assert "Muon step-time overhead" in printed
    # XLA CPU rewrites ragged_dot into dense matmuls over every expert: no ragged-dot op is left (what a GPU
    # session's row then says about its own lowering)
    moe = next(r for r in res["rows"] if r["name"] == "moe-124m-adamw")
    assert moe["hlo_checks"]["ragged_dot"] == {"ragged_dot_ops": 0, "cudnn_custom_calls": []}


def test_cudnn_fallback_retries_only_cudnn_attention_errors(monkeypatch):
    """A row that fails with cuDNN attention is measured again with XLA's; an out-of-memory error or any
    other failure is not (the retry would use more memory, or just spend the session's device time twice)."""
    calls = []

    def failing(error):
        def run(row, device, s, peaks):
            calls.append(row.overrides)
            if "model.attention_impl=xla" in row.overrides:
                return {"status": "ok"}
            raise error
        return run

    row = bench_gpu.TrainRow("r", "gpt2-124m", ("model.attention_impl=cudnn",), "gpt2")
    cases = [(NotImplementedError("cuDNN SDPA: head_dim 72 unsupported"), True),
             (RuntimeError("INTERNAL: cuDNN error executing fused attention"), True),
             (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 12.3GiB (cudnn workspace)"), False),
             (ValueError("shapes (4, 8) and (3,) do not broadcast"), False)]
    for error, retried in cases:
        calls.clear()
        monkeypatch.setattr(bench_gpu, "run_train_row", failing(error))
        if retried:
            out = bench_gpu._train_with_fallback(row, None, None, {})
            assert out["status"].startswith("ok: XLA attention (cudnn failed") and len(calls) == 2
        else:
            with pytest.raises(type(error)):
                bench_gpu._train_with_fallback(row, None, None, {})
            assert len(calls) == 1


def test_gpu_suite_rejects_unknown_rows():
    with pytest.raises(ValueError, match="unknown rows"):
        bench_gpu.run_suite(dry=True, only=["dense-7b"])


@pytest.mark.parametrize("args, message", [
    (["--rows", "dense-124m-adamw,dense-7b"], "--rows: unknown ['dense-7b']"),
    (["--deadline-s", "0"], "--deadline-s must be > 0"),
])
def test_gpu_suite_cli_refuses_bad_arguments_before_measuring(monkeypatch, capsys, args, message):
    monkeypatch.setattr(bench_gpu, "run_suite", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit) as e:
        bench_gpu.main(["--dry", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_suite_reports_results_after_every_row():
    """A suite cut short (the device tool's 10-minute limit) keeps the rows it finished: on_row gets the
    results so far after each row, and main writes them to --json."""
    seen = []
    res = bench_gpu.run_suite(dry=True, only=["decode-dense-b1", "decode-mla-b1"], log=lambda m: None,
                              on_row=lambda r: seen.append([row["name"] for row in r["rows"]]))
    assert seen == [["decode-dense-b1"], ["decode-dense-b1", "decode-mla-b1"]]
    assert [r["name"] for r in res["rows"]] == seen[-1] and res["comparisons"]["muon_overhead_pct"] is None
    assert all(r["wall_s"] > 0 for r in res["rows"])


def test_gpu_suite_deadline_skips_the_rest_by_name_in_the_given_order():
    """--rows sets the order; --deadline-s starts no row after the deadline and names the rows it skipped
    (the clock is a counter here: each call advances it 10 s, so the deadline falls after the first row)."""
    ticks = iter(range(0, 10_000, 10))
    rows = ["decode-mla-b1", "decode-dense-b1", "decode-mla-b64"]
    res = bench_gpu.run_suite(dry=True, only=rows, log=lambda m: None, deadline_s=15.0,
                              clock=lambda: float(next(ticks)))
    assert [r["name"] for r in res["rows"]] == rows
    first, *rest = res["rows"]
    assert first["status"] == "ok" and first["wall_s"] == 10.0
    for r in rest:
        assert r["status"].startswith("skipped: not started") and "15 s deadline" in r["status"], r
    table = bench_gpu.format_table(res)
    assert "decode-mla-b64" in table and "skipped" in table


def test_gpu_session_script_runs_every_row_once():
    """experiments/gpu_session.sh (the prepared device command) lists each row of the suite exactly once, so a
    row added to the suite cannot silently miss the GPU session."""
    text = (REPO / "experiments" / "gpu_session.sh").read_text()
    body = text.split("rows=(", 1)[1].split(")", 1)[0]
    listed = body.split()
    assert len(listed) == len(set(listed)) and set(listed) == set(bench_gpu.row_names(dry=False))
    assert listed[:3] == ["dense-124m-adamw", "dense-354m-adamw", "dense-354m-muon"]  # the targets first


def test_metrics_fetch_bench_reports_both_modes(capsys):
    from experiments import bench_metrics_fetch

    small = ["model.n_layers=1", "model.d_model=32", "data.batch_size=8", "data.seq_len=32",
             "trainer.microbatches=1", "optimizer.warmup_steps=0"]
    out = bench_metrics_fetch.measure("tiny", steps=3, rounds=1, overrides=small)
    assert set(out["tokens_per_second"]) == {"sync", "async"}
    assert all(len(v) == 1 and v[0] > 0 for v in out["tokens_per_second"].values())
    assert out["median_ratio_async_over_sync"] == pytest.approx(
        out["tokens_per_second"]["async"][0] / out["tokens_per_second"]["sync"][0])
    assert "async / sync tokens/s" in capsys.readouterr().out
