"""Logical axes of the optimiser state, so the trainer can shard it exactly like the parameters."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from optim.partition import logical_axes_by_path, path_str


def opt_state_logical_specs(tx: optax.GradientTransformation, params: Any, logical_axes: Any) -> Any:
    """PartitionSpec-of-logical-names tree with the structure of ``jax.eval_shape(tx.init, params)``.

    Every copy of the parameter tree inside the state (Adam moments, Muon momentum) gets its parameter's
    logical axes; everything else (step counts, Newton-Schulz coefficients) gets ``PartitionSpec()``
    (replicated). Leaves that a group masks out stay ``optax.MaskedNode`` (they hold no array). Feed the
    result to ``nn.logical_to_mesh_sharding`` with the mesh rules.
    """
    axes = logical_axes_by_path(params, logical_axes)
    specs = jax.tree_util.tree_map_with_path(
        lambda kp, _: PartitionSpec(*(axes[path_str(kp)] or ())), params
    )
    state_shapes = jax.eval_shape(tx.init, params)
    is_masked = lambda v: isinstance(v, optax.MaskedNode)
    return optax.tree_map_params(
        tx,
        lambda leaf, spec: leaf if is_masked(leaf) else spec,
        state_shapes,
        specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=is_masked,
    )
