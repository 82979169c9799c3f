"""Checks on compiled XLA programs (their HLO text): what a step allocates, moves and talks about.

Used by the GPU bench on every train row (on a GPU they inspect the real GPU program), by the CPU tests that
stand in for it, and by ``experiments.bench_muon_sharding``.
"""

from __future__ import annotations

import math
import re

_HLO_ARRAY = re.compile(r"\b(f32|bf16|f16)\[(\d+(?:,\d+)*)\]")
_HOST_OPS = re.compile(r"\b(infeed|outfeed|send|recv|send-done|recv-done)\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def full_logits_buffers(hlo_text: str, tokens: int, vocab: int, dtype: str = "f32") -> list[str]:
    """Array shapes in ``hlo_text`` of dtype ``dtype`` that hold a vocab axis and at least ``tokens`` x
    ``vocab`` elements: the full-batch logits (or their softmax / gradient) in any layout or reshape."""
    found = set()
    for dt, dims in _HLO_ARRAY.findall(hlo_text):
        shape = tuple(int(d) for d in dims.split(","))
        if dt == dtype and vocab in shape and math.prod(shape) >= tokens * vocab:
            found.add(f"{dt}[{dims}]")
    return sorted(found)


def host_transfers(hlo_text: str) -> list[str]:
    """Device<->host traffic inside a compiled program: infeed/outfeed/send/recv ops and custom calls to
    host callbacks (jax.debug.callback / pure_callback / io_callback lower to python-callback targets)."""
    found = {m for m in _HOST_OPS.findall(hlo_text)}
    found |= {t for t in _CUSTOM_CALL.findall(hlo_text)
              if any(w in t.lower() for w in ("callback", "python", "host"))}
    return sorted(found)


_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
)
_ANY_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind: ``{"count": ops, "bytes": result bytes}`` summed over the ops written in the
    (SPMD-partitioned, per-device) program. A static count: an op inside a loop body counts once, however
    many times the loop runs (the layer scan's per-layer FSDP gathers show up once)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(re.sub(r"/\*.*?\*/", "", line))  # "/*index=5*/" comments hold "="
        if not m:
            continue
        nbytes = sum(_dtype_bytes(dt) * math.prod(int(d) for d in dims.split(",") if d)
                     for dt, dims in _ANY_ARRAY.findall(m.group(1)))
        agg = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        agg["count"] += 1
        agg["bytes"] += nbytes
    return out


def _dtype_bytes(dt: str) -> int:
    if dt == "pred":
        return 1
    bits = int(re.sub(r"[a-z]", "", dt.split("e")[0]) or 32)  # f32 / bf16 / s8 / u32 / f8e4m3fn ...
    return max(1, bits // 8)


def ragged_dot_lowering(hlo_text: str) -> dict[str, object]:
    """How a compiled program executes ``jax.lax.ragged_dot`` (the dropless MoE's grouped matmuls): the
    ``ragged-dot`` ops left in it and its cuDNN custom calls. XLA may instead rewrite a ragged dot into a
    dense matmul over every expert (on CPU no ragged-dot op is left; some GPU builds do it for the weight
    gradient), which costs
    n_experts / top_k times the routed FLOPs (zero ragged-dot ops left means the grouped matmuls are gone)."""
    return {"ragged_dot_ops": len(re.findall(r"\bragged-dot\(", hlo_text)),
            "cudnn_custom_calls": sorted({t for t in _CUSTOM_CALL.findall(hlo_text) if "cudnn" in t.lower()})}

