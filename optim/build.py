"""``build_optimizer``: config + params (+ logical axes) -> (optax transformation, partition).

The chain is ``clip_by_global_norm(grad_clip_norm)`` (over *all* gradients, before any group sees them) then
either AdamW on everything or ``optax.partition`` into {"muon": Muon, "adamw": AdamW}. Both groups follow
``make_schedule``; the AdamW group of Muon peaks at ``adam_learning_rate`` (None -> ``learning_rate``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optim.adamw import adamw_group
from optim.config import OptimizerConfig
from optim.muon import muon_group
from optim.partition import ADAMW, MUON, Partition, compute_partition, path_str
from optim.schedules import schedule_from_params, schedule_params


def optimizer_hyperparams(cfg: OptimizerConfig, total_steps: int) -> dict[str, dict[str, float]]:
    """The run-time numbers of ``cfg``'s optimiser: the schedule parameters of the main learning rate
    ("lr") and of the AdamW group under Muon ("adam_lr", peaking at ``adam_learning_rate``)."""
    adam_peak = cfg.adam_learning_rate or cfg.learning_rate
    return {"lr": schedule_params(cfg, total_steps),
            "adam_lr": schedule_params(cfg, total_steps, peak_value=adam_peak)}


def build_optimizer(
    cfg: OptimizerConfig, params: Any, logical_axes: Any, total_steps: int, *,
    hyperparams: dict[str, Any] | None = None,
) -> tuple[optax.GradientTransformation, Partition]:
    """Build the optimiser for ``params`` (plain, unboxed pytree).

    ``logical_axes``: same tree as ``params`` with tuples of logical axis names or ``PartitionSpec`` leaves
    (e.g. ``nn.get_partition_spec(boxed_params)``), or None for path/ndim rules (see :mod:`optim.partition`).
    ``hyperparams``: ``optimizer_hyperparams(cfg, total_steps)`` (the default), or the same tree of traced
    scalars inside a jitted step, which then does not depend on the learning rate or the schedule's length.
    Returns ``(tx, partition)``; ``partition[path]`` is "muon" or "adamw" and ``partition.info[path]`` has
    the decay flag and Muon dimension numbers. Log ``describe_partition(partition)`` at start-up.
    """
    cfg.validate()
    partition = compute_partition(params, logical_axes, optimizer=cfg.name)
    hp = optimizer_hyperparams(cfg, total_steps) if hyperparams is None else hyperparams
    lr = schedule_from_params(hp["lr"])
    if cfg.name == ADAMW:
        core = adamw_group(cfg, lr, partition)
    else:
        adam_lr = schedule_from_params(hp["adam_lr"])
        # A fixed label tree (not a callable) so that optax.tree_map_params can walk the state.
        labels = jax.tree_util.tree_map_with_path(lambda kp, _: partition[path_str(kp)], params)
        groups = {MUON: muon_group(cfg, lr, partition), ADAMW: adamw_group(cfg, adam_lr, partition)}
        core = optax.partition(groups, labels)
    if cfg.grad_clip_norm is not None:
        core = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
    return core, partition
