"""Which optimiser each parameter gets, whether it is weight-decayed, and how Muon sees it as a matrix.

Rules, applied in order to each parameter (path components are the pytree keys, lower-cased; "non-batch
axes" are the axes that are not a stacking axis, see below). Format: condition -> optimiser, decay (why).

1. leaf named ``bias`` (or ``*_bias``) -> AdamW, no decay (a vector; decay would only shift activations).
2. a module path component contains ``norm``, or the leaf is named ``scale`` -> AdamW, no decay (norm gains
   should stay near 1).
3. a path component contains ``embed`` (token/position embedding table), or the first non-batch axis is
   ``vocab`` -> AdamW, no decay (rows are looked up, not multiplied; rare tokens' rows should not shrink).
4. a path component contains ``lm_head``, or any axis is ``vocab`` -> AdamW, decay (output head: a softmax
   read-out, not a hidden linear map, so Muon's spectral-norm geometry does not apply).
5. a path component contains ``router`` -> AdamW, decay (small (embed, expert) gating map).
6. fewer than 2 non-batch axes (scalars, vectors) -> AdamW, no decay.
7. everything else, the hidden weight matrices -> Muon, decay (AdamW, decay, when name="adamw").

So with AdamW, what is decayed is every hidden weight matrix plus the LM head (and routers); norms, biases and
embedding tables are not. Muon's group is decayed as well (Liu et al. 2025, arXiv:2502.16982, found decay
essential for Muon at scale).

**Stacking axes.** Logical axes ``"layers"`` (the ``nn.scan`` axis) and ``"expert"`` are *batch* axes: Muon
orthogonalises each layer's (and each expert's) matrix separately, through ``optax.contrib.muon``'s
``MuonDimensionNumbers`` (every axis that is neither reduction nor output is vmapped over). Flattening a
(layers, in, out) stack into one matrix would couple the layers: a layer with small gradients would get an
almost-zero update. For the remaining axes: if the last one is ``"embed"`` the kernel writes to the residual
stream, so reduction = the other non-batch axes and output = the last (o: (heads, head_dim) -> embed, down:
mlp -> embed); otherwise reduction = the first non-batch axis and output = the rest (q: embed -> (heads,
head_dim), up/gate: embed -> mlp).

**Without logical axes** (``logical_axes=None``, or a leaf whose spec names no axis) rules 1-6 use the path
alone and the matrix layout is guessed from ``ndim``: a >= 3-D parameter's leading axis is taken as the
``nn.scan`` layers axis, unless a module name ends in ``_<int>`` (``blocks_0``: layers unrolled in a Python
loop, nothing stacked); then if a path component contains ``expert`` the next axis is the expert axis; the
remaining axes are split into (reduction, output) at the point that makes the matrix most square (right for
q (embed | heads, head_dim), o (heads, head_dim | embed), GQA k/v and MLP kernels). Shape alone cannot tell
a (experts, in, out) stack under a path without ``expert`` (this repo's MoE kernels: ``mlp/gate``) from a
q kernel, nor MLA's (rank, heads, dim) from (embed, heads, dim), so every Muon parameter of 3 or more axes
whose layout was guessed is named in a warning: pass logical axes whenever you have them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

BATCH_AXES = frozenset({"layers", "expert"})
MUON = "muon"
ADAMW = "adamw"

AxisNames = tuple[str | None, ...]


@dataclass(frozen=True)
class ParamAssignment:
    """Where one parameter goes. ``dimension_numbers`` is set only for Muon parameters."""

    path: str
    shape: tuple[int, ...]
    optimizer: str
    decay: bool
    rule: str
    logical_axes: AxisNames | None = None
    dimension_numbers: MuonDimensionNumbers | None = None


def matrix_axes(a: ParamAssignment) -> tuple[frozenset[int], frozenset[int]]:
    """A Muon parameter's (reduction, output) axes as non-negative indices; every other axis is a batch
    axis (one matrix per index). Raises for a parameter without Muon dimension numbers."""
    d, nd = a.dimension_numbers, len(a.shape)
    if d is None:
        raise ValueError(f"parameter {a.path!r} is not a Muon matrix ({a.optimizer})")
    return tuple(  # type: ignore[return-value]
        frozenset(i % nd for i in ((ax,) if isinstance(ax, int) else ax))
        for ax in (d.reduction_axis, d.output_axis)
    )


class Partition(dict):
    """``dict[path, "muon" | "adamw"]`` (paths like ``"layers/attn/q/kernel"``) with details in ``.info``."""

    def __init__(self, assignments: Sequence[ParamAssignment]):
        super().__init__({a.path: a.optimizer for a in assignments})
        self.info: dict[str, ParamAssignment] = {a.path: a for a in assignments}

    def dimension_numbers(self) -> dict[str, MuonDimensionNumbers]:
        return {p: a.dimension_numbers for p, a in self.info.items() if a.dimension_numbers is not None}

    def decay(self) -> dict[str, bool]:
        return {p: a.decay for p, a in self.info.items()}


def path_str(keypath: Sequence[Any]) -> str:
    """jax key path -> "a/b/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_axes_leaf(x: Any) -> bool:
    if x is None or isinstance(x, PartitionSpec):
        return True
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _is_boxed(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _check_unboxed(params: Any) -> None:
    boxed = [
        path_str(kp)
        for kp, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]
        if _is_boxed(x)
    ]
    if boxed:
        raise ValueError(
            f"params contain flax boxed (logically partitioned) leaves, e.g. {boxed[0]!r}: pass "
            "nn.meta.unbox(params) as params and nn.get_partition_spec(params) as logical_axes"
        )


def flatten_params(params: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] for a plain parameter pytree, rejecting flax boxed leaves with a clear message."""
    _check_unboxed(params)
    return [(path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def logical_axes_by_path(params: Any, logical_axes: Any) -> dict[str, AxisNames | None]:
    """Map each parameter path to its logical axis names (None where unknown), checking shapes agree."""
    flat = flatten_params(params)
    if logical_axes is None:
        return {p: None for p, _ in flat}
    # Accept the whole variables' spec ({"params": ...}) for the params collection alone.
    if isinstance(logical_axes, dict) and set(logical_axes) == {"params"} and not (
        isinstance(params, dict) and set(params) == {"params"}
    ):
        logical_axes = logical_axes["params"]
    axes_flat = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_axes_leaf)[0]
    by_path = {path_str(kp): a for kp, a in axes_flat}
    missing = [p for p, _ in flat if p not in by_path]
    if missing:
        raise ValueError(
            f"logical_axes has no entry for parameter(s) {missing[:5]}; its paths start "
            f"{sorted(by_path)[:5]} "
            "(logical_axes must have the same tree structure as params)"
        )
    out: dict[str, AxisNames | None] = {}
    for p, x in flat:
        out[p] = _normalise_axes(p, np.shape(x), by_path[p])
    return out


def _normalise_axes(path: str, shape: tuple[int, ...], axes: Any) -> AxisNames | None:
    if axes is None:
        return None
    names = tuple(axes)
    for n in names:
        if n is not None and not isinstance(n, str):
            raise ValueError(f"logical axes of {path!r} must be names or None per dimension, got {axes!r}")
    if len(names) > len(shape):
        raise ValueError(f"logical axes {names} of {path!r} have more entries than its shape {shape}")
    # PartitionSpec semantics: missing trailing entries mean "unnamed".
    names = names + (None,) * (len(shape) - len(names))
    if all(n is None for n in names):
        return None
    return names


def _components(path: str) -> list[str]:
    return [c.lower() for c in path.split("/")]


def _most_square_split(shape: Sequence[int], axes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split ``axes`` into (reduction, output) so that the two products are as close as possible; an exact
    tie goes to the earliest split (fewest reduction axes), so the layout never depends on float noise."""
    best = None
    for k in range(1, len(axes)):
        red, out = tuple(axes[:k]), tuple(axes[k:])
        gap = abs(math.log(math.prod(shape[a] for a in red)) - math.log(math.prod(shape[a] for a in out)))
        if best is None or gap < best[0] - 1e-12:
            best = (gap, red, out)
    assert best is not None
    return best[1], best[2]


def _dims_from_names(names: AxisNames) -> tuple[list[int], MuonDimensionNumbers | None]:
    nonbatch = [i for i, n in enumerate(names) if n not in BATCH_AXES]
    if len(nonbatch) < 2:
        return nonbatch, None
    if names[nonbatch[-1]] == "embed":
        red, out = tuple(nonbatch[:-1]), (nonbatch[-1],)
    else:
        red, out = (nonbatch[0],), tuple(nonbatch[1:])
    return nonbatch, MuonDimensionNumbers(reduction_axis=red, output_axis=out)


def _unrolled(path: str) -> bool:
    """True if a module name ends in ``_<int>`` (flax's name for a layer built in a Python loop)."""
    return any(re.fullmatch(r".+_\d+", c) for c in _components(path)[:-1])


def _dims_from_shape(path: str, shape: tuple[int, ...]) -> tuple[list[int], MuonDimensionNumbers | None]:
    ndim = len(shape)
    n_batch = 0 if ndim < 3 or _unrolled(path) else 1
    if ndim >= n_batch + 3 and any("expert" in c for c in _components(path)):
        n_batch += 1
    nonbatch = list(range(n_batch, ndim))
    if len(nonbatch) < 2:
        return nonbatch, None
    red, out = _most_square_split(shape, nonbatch)
    return nonbatch, MuonDimensionNumbers(reduction_axis=red, output_axis=out)


def assign_param(path: str, shape: tuple[int, ...], names: AxisNames | None,
                 optimizer: str) -> ParamAssignment:
    """Apply the module docstring's rules to one parameter."""
    comps = _components(path)
    leaf, modules = comps[-1], comps[:-1]
    names_set = set(names or ())
    if names is not None:
        nonbatch, dims = _dims_from_names(names)
        first_nonbatch = names[nonbatch[0]] if nonbatch else None
    else:
        nonbatch, dims = _dims_from_shape(path, shape)
        first_nonbatch = None

    def mk(opt: str, decay: bool, rule: str, dim_nums: MuonDimensionNumbers | None = None) -> ParamAssignment:
        return ParamAssignment(path, tuple(shape), opt, decay, rule, names, dim_nums)

    is_head = any("lm_head" in c for c in comps)
    if leaf == "bias" or leaf.endswith("_bias"):
        return mk(ADAMW, False, "bias")
    if leaf == "scale" or any("norm" in c for c in modules):
        return mk(ADAMW, False, "norm")
    if not is_head and (any("embed" in c for c in comps) or first_nonbatch == "vocab"):
        return mk(ADAMW, False, "embedding table")
    if is_head or "vocab" in names_set:
        return mk(ADAMW, True, "output head (vocab axis)")
    if any("router" in c for c in comps):
        return mk(ADAMW, True, "router")
    if dims is None:
        return mk(ADAMW, False, "scalar/vector")
    if optimizer == MUON:
        return mk(MUON, True, "hidden matrix", dims)
    return mk(ADAMW, True, "hidden matrix")


def compute_partition(params: Any, logical_axes: Any = None, optimizer: str = MUON) -> Partition:
    """Assign every parameter of ``params`` (plain pytree) to ``optimizer``'s groups; see module docstring."""
    if optimizer not in (MUON, ADAMW):
        raise ValueError(f"optimizer must be {MUON!r} or {ADAMW!r}, got {optimizer!r}")
    axes = logical_axes_by_path(params, logical_axes)
    assignments = []
    guessed = []
    for path, x in flatten_params(params):
        shape = tuple(np.shape(x))
        a = assign_param(path, shape, axes[path], optimizer)
        if a.optimizer == MUON and axes[path] is None and len(shape) >= 3:
            guessed.append(path)
        assignments.append(a)
    if guessed:
        warnings.warn(
            f"Muon matrix layout of {len(guessed)} parameter(s) (e.g. {guessed[0]!r}) was guessed from ndim "
            "and path names (leading axis = scan layers axis unless a module is named *_<int>; most-square "
            "split); pass logical_axes to make it exact",
            stacklevel=2,
        )
    return Partition(assignments)


def _fmt_dims(shape: tuple[int, ...], d: MuonDimensionNumbers | None) -> str:
    if d is None:
        return "-"
    red = (d.reduction_axis,) if isinstance(d.reduction_axis, int) else tuple(d.reduction_axis)
    out = (d.output_axis,) if isinstance(d.output_axis, int) else tuple(d.output_axis)
    batch = [i for i in range(len(shape)) if i not in red and i not in out]
    n_batch = math.prod(shape[i] for i in batch)
    mat = f"{math.prod(shape[i] for i in red)}x{math.prod(shape[i] for i in out)}"
    return f"{n_batch} x [{mat}]" if batch else f"[{mat}]"


def describe_partition(partition: Partition, params: Any = None) -> str:
    """Printable table: path, shape, optimiser, Muon matrix (count x [in x out]), decay, rule; then totals.

    ``params`` (optional) must have the partition's paths; its shapes are shown instead of the stored ones.
    """
    if not isinstance(partition, Partition):
        raise TypeError("describe_partition expects the Partition returned by build_optimizer")
    shapes = {p: a.shape for p, a in partition.info.items()}
    if params is not None:
        given = {p: tuple(np.shape(x)) for p, x in flatten_params(params)}
        if set(given) != set(shapes):
            raise ValueError(
                "params paths differ from the partition's: only in params "
                f"{sorted(set(given) - set(shapes))[:5]}, "
                f"only in partition {sorted(set(shapes) - set(given))[:5]}"
            )
        shapes = given
    rows = [("path", "shape", "optimizer", "muon matrix", "decay", "rule")]
    totals: dict[str, int] = {}
    for p, a in partition.info.items():
        rows.append((p, str(shapes[p]), a.optimizer, _fmt_dims(shapes[p], a.dimension_numbers),
                     "yes" if a.decay else "no", a.rule))
        totals[a.optimizer] = totals.get(a.optimizer, 0) + math.prod(shapes[p])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(totals.values()) or 1
    parts = [f"{k} {v:,} params ({100 * v / total:.1f}%)" for k, v in sorted(totals.items())]
    lines.append("totals: " + ", ".join(parts))
    return "\n".join(lines)
