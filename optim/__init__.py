"""scalelab optimisers: AdamW and Muon (optax), parameter partition, learning-rate schedules.

Entry points: :func:`build_optimizer` -> ``(tx, partition)``; :func:`describe_partition` for start-up logs;
:func:`make_schedule` for logging the lr; :func:`opt_state_logical_specs` to shard the optimiser state;
:func:`optimizer_hyperparams` for the run-time numbers (learning rates, schedule) a jitted step takes as
arguments.
"""

from optim.build import build_optimizer, optimizer_hyperparams
from optim.config import DECAY_SHAPES, OPTIMIZERS, SCHEDULES, OptimizerConfig
from optim.lr_scaling import adam_sqrt_scaling, linear_scaling_rule, sqrt_scaling_rule
from optim.partition import ParamAssignment, Partition, compute_partition, describe_partition
from optim.schedules import make_schedule, wsd_decay_start
from optim.state_axes import opt_state_logical_specs

__all__ = [
    "DECAY_SHAPES",
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerConfig",
    "ParamAssignment",
    "Partition",
    "adam_sqrt_scaling",
    "build_optimizer",
    "compute_partition",
    "describe_partition",
    "linear_scaling_rule",
    "make_schedule",
    "opt_state_logical_specs",
    "optimizer_hyperparams",
    "sqrt_scaling_rule",
    "wsd_decay_start",
]
