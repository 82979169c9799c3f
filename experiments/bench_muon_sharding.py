"""How Muon's orthogonalisation is sharded: the compiled train step per device, on simulated CPU devices.

    python -m experiments.bench_muon_sharding [--preset 350m] [--meshes 1x8x1,8x1x1,2x4x1,2x2x2]
                                              [--variants adamw,...] [--set KEY=VALUE ...] [--json OUT]

For each mesh (data x fsdp x tensor) it compiles four steps of the same model -- AdamW, Muon with XLA's own
sharding of Newton-Schulz (the ``muon_layers`` rule removed), Muon split over layers (the default rules,
:mod:`optim.muon_layout`), and the same with Newton-Schulz in bf16 (:mod:`optim.muon_lowp`) -- and prints
what XLA says of each per-device program: FLOPs (cost analysis),
bytes written by collectives (static: an op in the layer scan counts once) and temporary memory. Nothing
runs, so the answer is the same on any host and holds for a GPU mesh of the same shape as far as XLA's SPMD
partitioner is concerned; times on real interconnects are not measured here. The simulated devices are
requested before JAX starts (``--xla_force_host_platform_device_count``).
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # must precede the first import of jax (via experiments.*)
    _flag = "--xla_force_host_platform_device_count=8"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from experiments import sharding as shd  # noqa: E402
from experiments.config import ConfigError, ExperimentConfig, MeshConfig  # noqa: E402
from experiments.hlo_checks import collective_bytes  # noqa: E402
from experiments.presets import get_preset  # noqa: E402
from experiments.trainer import Program, build_program  # noqa: E402
from optim.muon import newton_schulz_flops  # noqa: E402
from optim.muon_layout import MUON_LAYERS  # noqa: E402

VARIANTS = ("adamw", "muon-xla", "muon-split", "muon-split-bf16")
DEFAULT_OVERRIDES = ("data.seq_len=256", "model.max_seq_len=256", "data.batch_size=8",
                     "trainer.microbatches=1", "trainer.eval_batch_size=8", "model.attention_impl=xla")


def variant_config(cfg: ExperimentConfig, variant: str, mesh_shape: tuple[int, int, int]) -> ExperimentConfig:
    data, fsdp, tensor = mesh_shape
    rules = cfg.mesh.rules
    if variant == "muon-xla":
        rules = tuple(r for r in rules if r[0] != MUON_LAYERS)
    opt = dataclasses.replace(cfg.optimizer, name="adamw" if variant == "adamw" else "muon",
                              ns_dtype="bfloat16" if variant.endswith("-bf16") else "float32")
    mesh = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=rules)
    return dataclasses.replace(cfg, optimizer=opt, mesh=mesh).validate()


def measure(cfg: ExperimentConfig) -> dict[str, Any]:
    n = math.prod((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:n])
    # no memo: three variants per mesh would evict each other
    return program_stats(build_program.__wrapped__(cfg, mesh))


def program_stats(prog: Program) -> dict[str, Any]:
    """What XLA says of ``prog``'s compiled train step, per device (module docstring)."""
    cfg = prog.cfg
    cost = prog.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    colls = collective_bytes(prog.train_step.as_text())
    rules = dict(prog.rules)
    return {
        "flops_per_device": float(cost["flops"]),
        "collective_bytes_per_device": sum(c["bytes"] for c in colls.values()),
        "collectives": colls,
        "temp_bytes": int(prog.train_step.memory_analysis().temp_size_in_bytes),
        "muon_layers_axes": rules.get(MUON_LAYERS),
        "ns_flops_total": newton_schulz_flops(prog.partition, cfg.optimizer.ns_steps)
        if cfg.optimizer.name == "muon" else 0.0,
        "compile_s": prog.compile_seconds,
    }


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--meshes entry {item!r} is not DATAxFSDPxTENSOR (e.g. 2x4x1)")
        out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def run(preset: str, meshes: Sequence[tuple[int, int, int]], overrides: Sequence[str] = (),
        log: Any = print, variants: Sequence[str] = VARIANTS) -> list[dict[str, Any]]:
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    base = get_preset(preset).override([*DEFAULT_OVERRIDES, *overrides])
    n_dev = len(jax.devices())
    rows = []
    for shape in meshes:
        if math.prod(shape) > n_dev:
            raise ConfigError(f"mesh {shape} needs {math.prod(shape)} devices, this process has {n_dev}")
        for variant in variants:
            row = {"mesh": "x".join(map(str, shape)), "variant": variant,
                   **measure(variant_config(base, variant, shape))}
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(r: dict[str, Any]) -> str:
    kinds = " ".join(f"{k} {v['bytes'] / 1e6:.0f}" for k, v in sorted(r["collectives"].items()))
    ideal = r["ns_flops_total"] / math.prod(int(x) for x in r["mesh"].split("x"))
    return (f"{r['mesh']:>7} {r['variant']:<11} GFLOP/dev {r['flops_per_device'] / 1e9:9.1f} "
            f"(NS/devices {ideal / 1e9:7.1f})  "
            f"collectives MB/dev {r['collective_bytes_per_device'] / 1e6:7.0f} "
            f"[{kinds}]  temp MB {r['temp_bytes'] / 1e6:6.0f}  muon_layers->{r['muon_layers_axes']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="350m")
    p.add_argument("--meshes", default="1x8x1,8x1x1,2x4x1,2x2x2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        rows = run(a.preset, parse_meshes(a.meshes), a.set, variants=a.variants.split(","))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
