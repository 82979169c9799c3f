"""Muon group: ``optax.contrib.muon`` with per-parameter ``MuonDimensionNumbers`` from the partition.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/ and modded-nanogpt) takes SGD-momentum
(Nesterov) and replaces each matrix update by its orthogonalisation, computed with 5 steps of the quintic
Newton-Schulz iteration with coefficients (3.4445, -4.7750, 2.0315) (singular values land in roughly
[0.7, 1.2] rather than exactly 1, which Jordan found not to hurt).

Every leaf this group sees is a Muon matrix: the partition sends embeddings, LM head, norms, biases and
routers to our own AdamW group (:mod:`optim.adamw`, with the decay mask), so ``optax.contrib.muon``'s internal
Adam branch (which would decay every one of its leaves and uses Nesterov Adam) receives no parameters.

Update scale: with ``cfg.muon_consistent_rms = r`` (default 0.2) each orthogonalised per-layer update O of an
(fan_in x fan_out) matrix is multiplied by ``r * sqrt(max(fan_in, fan_out))``, giving RMS ~ r like AdamW's, so
Muon can reuse AdamW's learning rate and weight decay (Liu et al. 2025, "Muon is Scalable for LLM Training"
(Moonlight), arXiv:2502.16982). fan_in / fan_out are those of the per-layer matrix (batch axes excluded).
With ``None``, Keller Jordan's ``sqrt(max(1, fan_out / fan_in))`` is used and the lr should be ~0.02.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers

from optim.adamw import decay_mask_fn
from optim.config import OptimizerConfig
from optim.muon_layout import split_over_layers
from optim.muon_lowp import muon_lowp
from optim.partition import Partition, matrix_axes, path_str

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def dimension_numbers_fn(partition: Partition):
    """Callable giving ``optax.contrib.muon`` the dimension numbers of each leaf, looked up by path."""
    dims = partition.dimension_numbers()

    def fn(tree: Any) -> Any:
        if not hasattr(tree, "shape") and jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
            # optax.tree_map_params (used to derive optimiser-state shardings) initialises the optimiser with
            # an opaque placeholder leaf; a prefix spec keeps that path working. Real trees never get here.
            return MuonDimensionNumbers()

        def leaf(kp, _):
            p = path_str(kp)
            if p not in dims:
                raise KeyError(f"parameter {p!r} reached Muon but the partition has no Muon layout for it")
            return dims[p]

        return jax.tree_util.tree_map_with_path(leaf, tree)

    return fn


def muon_group(cfg: OptimizerConfig, learning_rate: optax.ScalarOrSchedule,
               partition: Partition) -> optax.GradientTransformation:
    """``optax.contrib.muon`` over the partition's Muon matrices (orthogonalised per layer / per expert), on a
    mesh split over the layers axis (:mod:`optim.muon_layout`). With ``cfg.ns_dtype="bfloat16"`` the same
    update with the orthogonalisation in bf16 (:mod:`optim.muon_lowp`)."""
    if cfg.ns_dtype != "float32":  # splits over layers itself, after its bf16 cast
        return muon_lowp(cfg, learning_rate, partition, NS_COEFFS)
    muon = optax.contrib.muon(
        learning_rate=learning_rate,
        ns_coeffs=NS_COEFFS,
        ns_steps=cfg.ns_steps,
        beta=cfg.muon_momentum,
        weight_decay=cfg.weight_decay,
        weight_decay_mask=decay_mask_fn(partition),
        nesterov=cfg.nesterov,
        muon_weight_dimension_numbers=dimension_numbers_fn(partition),
        consistent_rms=cfg.muon_consistent_rms,
    )
    return split_over_layers(muon, partition)


def newton_schulz_flops(partition: Partition, ns_steps: int) -> float:
    """Matmul FLOPs of one Muon step's orthogonalisation, summed over the partition's Muon matrices.

    Each matrix is flattened as ``optax.contrib.muon`` does (batch x reduction x output) and orthogonalised
    as an (s x l) matrix, s <= l (optax transposes the tall ones); each quintic Newton-Schulz iteration
    computes A = X X^T (2 s^2 l), A A (2 s^3) and (b A + c A^2) X (2 s^2 l). The O(s l) elementwise work is
    left out. Against the model's ~6 N FLOPs per token this is the Muon overhead a step pays at equal FLOP
    rate: it grows with width and does not shrink with batch size, so small batches make it expensive.
    """
    total = 0
    for a in partition.info.values():
        if a.dimension_numbers is None:
            continue
        red, out = matrix_axes(a)
        batch = math.prod(n for i, n in enumerate(a.shape) if i not in red | out)
        m, n = math.prod(a.shape[i] for i in red), math.prod(a.shape[i] for i in out)
        s, big = min(m, n), max(m, n)
        total += batch * ns_steps * (4 * s * s * big + 2 * s**3)
    return float(total)
