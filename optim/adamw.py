"""AdamW group: ``optax.adamw`` with weight decay masked by the partition's decay flags.

Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101. As in ``optax.adamw``
(and PyTorch), the decay is multiplied by the scheduled learning rate: each step a decayed weight is scaled by
``1 - lr_t * weight_decay`` on top of the Adam update. Which parameters decay: see :mod:`optim.partition`
(hidden matrices, LM head and routers yes; norms, biases and embedding tables no).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optim.config import OptimizerConfig
from optim.partition import Partition, path_str


def decay_mask_fn(partition: Partition):
    """Callable mask for ``optax.add_decayed_weights``: looks each leaf's path up in the partition.

    A callable (not a fixed tree) because inside ``optax.partition`` the group sees a tree in which the other
    group's leaves are ``MaskedNode``s; mapping by path works for both views.
    """
    decay = partition.decay()

    def mask(tree: Any) -> Any:
        def leaf(kp, _):
            p = path_str(kp)
            if p not in decay:
                raise KeyError(f"parameter {p!r} is not in the optimiser partition (built for other params?)")
            return decay[p]

        return jax.tree_util.tree_map_with_path(leaf, tree)

    return mask


def adamw_group(cfg: OptimizerConfig, learning_rate: optax.ScalarOrSchedule,
                partition: Partition) -> optax.GradientTransformation:
    """AdamW with ``cfg``'s b1, b2, eps, weight_decay; decay only where ``partition`` says so."""
    return optax.adamw(
        learning_rate=learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask_fn(partition),
    )
