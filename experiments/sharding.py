"""Device mesh (data, fsdp, tensor), logical-axis rules, and the shardings of parameters and batches.

Model code names logical axes only; ``MeshConfig.rules`` (one table, see ``experiments.config``) maps them to
mesh axes, and flax's ``logical_to_mesh_sharding`` turns the names on each parameter into a ``NamedSharding``.
A dimension that a mesh axis does not divide is replicated along that axis instead of crashing (with a
warning), both for parameters (per array) and for activations (the rule is dropped for the whole model).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.config import MESH_AXES, ConfigError, MeshConfig
from optim.muon_layout import MUON_LAYERS

Rules = tuple[tuple[str, Any], ...]


def maybe_initialize_distributed() -> bool:
    """Start multi-host JAX when the environment describes a multi-process job; return whether it did.

    Triggers: ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or a SLURM / Open MPI
    job with more than one task, which ``jax.distributed.initialize()`` auto-detects. Must run before any
    other JAX call touches the backend.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kw: dict[str, Any] = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
        if "JAX_NUM_PROCESSES" in os.environ:
            kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kw)
        return True
    n_tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if n_tasks is not None and int(n_tasks) > 1:
        jax.distributed.initialize()
        return True
    return False


def resolve_mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; ConfigError if their product is not the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes {sizes} must be positive with at most one -1")
    if free:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {sizes}: the fixed sizes (product {fixed}) do not divide the "
                f"{n_devices} available devices, so -1 cannot be filled"
            )
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
            f"{math.prod(sizes.values())} must equal the number of devices ({n_devices}); "
            "set mesh.data/fsdp/tensor (use -1 for one axis to fill)"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware placement (ICI/NVLink neighbours on the fast axes) where jax knows the topology
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _axes_of(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _ways(mesh: Mesh, mesh_axes: Any) -> int:
    return math.prod(mesh.shape[a] for a in _axes_of(mesh_axes))


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
    """Rules as hashable tuples (JSON round-trips turn them into lists)."""
    out = []
    for name, axes in rules:
        out.append((name, axes if axes is None or isinstance(axes, str) else tuple(axes)))
    return tuple(out)


def logical_dim_sizes(abstract_boxed: Any) -> dict[str, set[int]]:
    """All sizes each logical axis name takes across the (boxed) parameter tree."""
    sizes: dict[str, set[int]] = {}
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)
    for spec, x in zip(
        jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        for name, n in zip(tuple(spec), x.shape, strict=False):
            if isinstance(name, str):
                sizes.setdefault(name, set()).add(n)
    return sizes


def effective_rules(rules: Sequence[Sequence[Any]], mesh: Mesh, dim_sizes: dict[str, set[int]]) -> Rules:
    """Drop (replicate) rules whose mesh axes do not divide every size of that logical axis.

    Activations are constrained inside the model with the same rules; uneven activation shardings would be
    padded by XLA and uneven parameter shardings cannot be placed at all, so e.g. 6 heads on tensor=4 makes
    "heads" unsharded everywhere, consistently for parameters and activations.

    ``muon_layers`` (Muon's orthogonalisation layout, :mod:`optim.muon_layout`) has the sizes of ``layers``
    and, silently, keeps the group of its mesh axes with the most devices that divides them, else its single
    largest axis, split unevenly (XLA pads); with no axis of more than one device, no rule (XLA decides).
    (On the 8 simulated devices, 12 layers: split unevenly over fsdp=8, the step's Muon reshards were
    all-to-alls and its temporaries fell below XLA's own layout; split unevenly over data=2 x fsdp=4, XLA
    resharded through full all-gathers and the temporaries grew past it, hence one axis only.)
    """
    out = []
    for name, axes in normalize_rules(rules):
        if name == MUON_LAYERS:
            out.append((name, _muon_layers_axes(mesh, axes, dim_sizes.get("layers", ()))))
            continue
        ways = _ways(mesh, axes)
        bad = sorted(n for n in dim_sizes.get(name, ()) if n % ways)
        if ways > 1 and bad:
            warnings.warn(
                f"logical axis {name!r} (sizes {bad}) is not divisible by mesh axes {axes} "
                f"({ways} ways): replicating it instead",
                stacklevel=2,
            )
            axes = None
        out.append((name, axes))
    return tuple(out)


def _muon_layers_axes(mesh: Mesh, axes: Any, sizes: Any) -> tuple[str, ...] | None:
    """The sub-tuple of ``axes`` (order kept) with the most devices that divides every size, else the single
    axis with the most devices; None when no axis has more than one device, or when the rule is null (no
    layer split: XLA lays out the orthogonalisation)."""
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    groups = [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(1, 2 ** len(axes))]
    groups = [g for g in groups if _ways(mesh, g) > 1]
    even = [g for g in groups if all(n % _ways(mesh, g) == 0 for n in sizes)]
    single = [g for g in groups if len(g) == 1]
    return max(even or single, key=lambda g: _ways(mesh, g), default=None)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replace the mesh axes of any dimension they do not divide by None (replication)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return PartitionSpec(
        *(e if n % _ways(mesh, e) == 0 else None for e, n in zip(entries, shape, strict=True))
    )


def shardings_from_logical(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of arrays/ShapeDtypeStructs given a same-structured tree of logical
    PartitionSpecs (for parameters: ``nn.get_partition_spec`` of the boxed tree; for optimiser state:
    ``optim.opt_state_logical_specs``). Non-divisible dimensions are replicated."""
    mesh_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh)), mesh_shardings, shapes
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(rules: Sequence[Sequence[Any]]) -> tuple[str, ...]:
    """The mesh axes of the ``batch`` rule: where a batch's examples are split. The input batch is placed by
    the same rule the model's activation constraints use, so the step starts without a reshard; no rule (or
    a null one) leaves the batch replicated, as flax does for the activations."""
    for name, axes in normalize_rules(rules):
        if name == "batch":
            return _axes_of(axes)
    return ()


def batch_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]], leading: int = 0) -> NamedSharding:
    """Examples split over the ``batch`` rule's mesh axes after ``leading`` unsharded axes (e.g. the
    microbatch axis)."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), axes or None))


def check_batch_divisible(batch: int, mesh: Mesh, rules: Sequence[Sequence[Any]], what: str) -> None:
    axes = batch_axes(rules)
    ways = _ways(mesh, axes)
    if batch % ways:
        raise ConfigError(
            f"{what}={batch} is not divisible by mesh {'*'.join(axes)}={ways} (the 'batch' rule's axes): "
            "each device must hold a whole number of sequences"
        )


def process_row_block(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """``(block, n_blocks)``: this process's devices hold rows ``[block*B/n_blocks, (block+1)*B/n_blocks)``
    of dimension ``axis`` (size B) of a global array placed by ``sharding``; these are the rows the process
    loads (``experiments.data.host_rows``).

    Read from the sharding, not assumed from the process count: a batch replicated over a mesh axis that spans
    hosts (a ``batch`` rule without it) puts the same rows on several processes, and each must load them.
    ConfigError if the rows are not one aligned block (a mesh whose device order interleaves hosts)."""
    B = global_shape[axis]
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(B)[index[axis]])
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or B % size or lo % size:
        raise ConfigError(
            f"this process's devices hold rows {sorted(rows)[:8]}... of the batch's {B}, not one aligned "
            f"block: the mesh interleaves hosts along the batch axes {sharding.spec}"
        )
    return lo // size, B // size


def host_batch(global_batch: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """Assemble a global jax.Array from this process's rows (all rows when single-process)."""
    return jax.make_array_from_process_local_data(sharding, global_batch, global_shape)


def describe_mesh(mesh: Mesh) -> str:
    dev = mesh.devices.flat[0]
    return (
        f"mesh {dict(mesh.shape)} over {mesh.devices.size} {dev.platform} device(s), "
        f"{jax.process_count()} process(es)"
    )
