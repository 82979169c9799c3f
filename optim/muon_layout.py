"""Where Muon's orthogonalisation runs on a device mesh: whole matrices, split over the layers axis.

Newton-Schulz is five rounds of (s x s) and (s x l) matmuls on every per-layer matrix. Left to XLA's sharding
propagation, a stacked (layers, embed, mlp) gradient keeps the parameters' FSDP layout (``embed`` split) and
every round re-gathers the matrices; under data parallelism every replica repeats the whole iteration.

Each layer's matrix is orthogonalised independently, so the work splits exactly over the layers axis
instead: this wrapper constrains the Muon group's incoming gradients and outgoing updates to the parameters'
logical names with ``layers`` renamed ``muon_layers``. The rules table maps ``muon_layers`` first, to the
``data`` and ``fsdp`` mesh axes, so ``embed`` finds ``fsdp`` taken and stays whole: an all-to-all per matrix
in and out replaces the per-round gathers, and each device orthogonalises its own layers. Tensor-parallel
sharding of ``mlp`` / heads stays (a version that made those whole too needed 2867 MB of temporaries on 2x2x2
below, more than XLA's own layout). The momentum keeps the parameters' layout: memory at rest and checkpoints
are unchanged.

Measured by ``python -m experiments.bench_muon_sharding`` (the 350m preset, 24 layers, d=1024, batch 8 x 256,
8 simulated CPU devices; XLA's per-device cost and memory analysis of the compiled step, nothing timed),
XLA's layout -> split, per device:

=========  ====================  ======================  ===================  =====================
mesh       GFLOP                 collective MB           temporaries MB       bf16 NS: coll. / temp
=========  ====================  ======================  ===================  =====================
1x8x1      1358 -> 1134          15841 -> 2093           3148 -> 1696         1789 / 1333
8x1x1      8137 -> 1106          463 -> 2891             4489 -> 1399         2891 / 1399
2x4x1      2330 -> 1133          15905 -> 2764           3460 -> 1669         2460 / 1436
2x2x2      1524 -> 1326          12770 -> 3427           1645 -> 1337         3124 / 1063
=========  ====================  ======================  ===================  =====================

The last column is ``ns_dtype="bfloat16"`` (:mod:`optim.muon_lowp`), which applies the same layout change
itself, to the bf16 copy of the momentum direction (:func:`layer_split_constraints`): the momentum update
stays in the parameters' layout, only the matrices being orthogonalised move. XLA's CPU backend compiles
those bf16 all-to-alls as f32, so the bytes above are an upper bound for a backend with bf16 collectives.

(AdamW on the same meshes: 111-130 GFLOP and 463-1246 MB; Newton-Schulz is 1003 GFLOP per device when split
evenly eight ways.) Under pure data parallelism the split trades an all-gather of the updates for 7x fewer
FLOPs. Which axes ``muon_layers`` gets is decided by ``experiments.sharding.effective_rules``: the mesh axes
that divide the layer count, else one axis split unevenly. Without a rule for ``muon_layers`` (or outside a
mesh) the wrapper changes nothing and XLA chooses, as before. Leaves without a layers axis (MoR's unstacked
shared blocks, unrolled ``blocks_0`` layers) are left to XLA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

from optim.partition import Partition, path_str

MUON_LAYERS = "muon_layers"


def orthogonalisation_layouts(partition: Partition) -> dict[str, tuple[str | None, ...]]:
    """Per Muon leaf with a ``layers`` axis: its logical names with ``layers`` renamed ``muon_layers``. The
    other names stay: ``muon_layers`` comes first in the rules table and claims ``data`` and ``fsdp``, so
    ``embed`` (and ``expert``) find their mesh axis taken and stay whole, while ``mlp`` / ``heads`` keep
    ``tensor``."""
    out = {}
    for path, a in partition.info.items():
        names = a.logical_axes
        if a.dimension_numbers is None or names is None or "layers" not in names:
            continue
        out[path] = tuple(MUON_LAYERS if n == "layers" else n for n in names)
    return out


def _rule_is_set() -> bool:
    """True when the logical rules in scope send ``muon_layers`` to some mesh axis."""
    rules = nn.get_logical_axis_rules()
    return any(name == MUON_LAYERS and axes for name, axes in rules)


LeafConstraint = Callable[[str, Any], Any]


def layer_split_constraints(partition: Partition) -> tuple[LeafConstraint, LeafConstraint]:
    """``(to_split, to_params)``: per-leaf ``f(path, x)`` constraining ``x`` to the whole-matrix,
    layers-split layout and back to the parameter's own layout. Both return ``x`` unchanged for leaves
    without a ``layers`` axis, and everywhere when the rules in scope (read at trace time) have no
    ``muon_layers`` entry. :mod:`optim.muon_lowp` uses them around its bf16 cast, so both all-to-alls move
    bf16."""
    layouts = orthogonalisation_layouts(partition)
    own = {p: partition.info[p].logical_axes for p in layouts}

    def make(names_of: dict[str, tuple[str | None, ...]]) -> LeafConstraint:
        def f(path: str, x: Any) -> Any:
            names = names_of.get(path)
            if names is None or not hasattr(x, "shape") or not _rule_is_set():
                return x
            return nn.with_logical_constraint(x, names)

        return f

    return make(layouts), make(own)


def split_over_layers(inner: optax.GradientTransformation,
                      partition: Partition) -> optax.GradientTransformation:
    """``inner`` (the Muon group) with its gradients and updates laid out whole-matrix, layers-split."""
    to_split, _ = layer_split_constraints(partition)

    def constrain(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda kp, x: to_split(path_str(kp), x), tree)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(constrain(updates), state, params)
        return constrain(updates), state

    return optax.GradientTransformation(inner.init, update_fn)
