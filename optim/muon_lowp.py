"""Muon with fp32 momentum and the Newton-Schulz orthogonalisation in a lower dtype (bfloat16 on GPUs).

Why not ``optax.contrib.muon`` here: optax orthogonalises in the momentum's dtype, so the choice is fp32
Newton-Schulz (every one of the 5 rounds' matmuls in fp32: on an H100 at best TF32 tensor cores at half the
bf16 rate, and twice the bytes) or a bf16 momentum accumulator (whose 8-bit mantissa rounds the
(1 - beta) g increments of a 0.95 EMA). Jordan's modded-nanogpt and Moonlight (Liu et al. 2025) do neither:
they keep the momentum in the parameter dtype and cast only the orthogonalisation's input to bf16. This
module does that and nothing else: the momentum, its Nesterov blend and bias correction, the Frobenius
pre-normalisation, the quintic iteration, the per-matrix reshapes and the update scale follow
``optax.contrib.muon`` exactly -- ``tests/test_muon_lowp.py`` checks that at ``ns_dtype=float32`` the two
give the same updates -- so ``OptimizerConfig.ns_dtype="float32"`` (the default) keeps optax's own code.

bf16 Newton-Schulz is safe because the iteration is self-correcting (each round maps singular values back
towards the [0.7, 1.2] band) and its output is only a direction: the tests check that its result is as close
to the exact polar factor U V^T as fp32's, with singular values in the same band, and that a small model
trains along the fp32 loss curve (within 10%). On a mesh the layers split of :mod:`optim.muon_layout` is
applied to the bf16 copy (:func:`orthogonalise`), so the matrices move at half the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.adamw import decay_mask_fn
from optim.config import OptimizerConfig
from optim.muon_layout import layer_split_constraints
from optim.partition import ParamAssignment, Partition, matrix_axes, path_str

_EPS = 1e-8  # optax.contrib.muon's default eps (added to the Frobenius norm)
Coeffs = tuple[float, float, float]
Constraint = Callable[[str, jax.Array], jax.Array]


def _keep(path: str, x: jax.Array) -> jax.Array:
    return x


class MuonLowpState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: Any  # fp32 momentum (EMA of gradients), the parameters' tree


def newton_schulz(x_BxMxN: jax.Array, coeffs: Coeffs, steps: int, dtype: Any) -> jax.Array:
    """Quintic Newton-Schulz on each of B matrices, computed in ``dtype``; returns ``dtype``.

    The Frobenius norm is accumulated in fp32 (bf16 keeps fp32's exponent range, so an input cast before
    normalising loses nothing to overflow or underflow). Tall matrices are transposed so the Gram matrix is
    the small (s x s) one.
    """
    tall = x_BxMxN.shape[1] > x_BxMxN.shape[2]
    x = jnp.swapaxes(x_BxMxN, 1, 2) if tall else x_BxMxN
    norm_Bx1x1 = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True))
    x = (x / (norm_Bx1x1 + _EPS)).astype(dtype)
    a0, a1, a2 = (jnp.asarray(c, dtype) for c in coeffs)
    for _ in range(steps):
        gram_BxSxS = jnp.einsum("bsl,btl->bst", x, x)
        poly_BxSxS = a1 * gram_BxSxS + a2 * jnp.einsum("bst,btu->bsu", gram_BxSxS, gram_BxSxS)
        x = a0 * x + jnp.einsum("bst,btl->bsl", poly_BxSxS, x)
    return jnp.swapaxes(x, 1, 2) if tall else x


def orthogonalise(x: jax.Array, a: ParamAssignment, coeffs: Coeffs, steps: int, dtype: Any,
                  to_split: Constraint = _keep, to_params: Constraint = _keep) -> jax.Array:
    """One parameter's update, orthogonalised per matrix: (batch..., reduction..., output...) flattened to
    (B, fan_in, fan_out) as ``optax.contrib.muon`` does, and back. Returns ``x.dtype``.

    ``to_split`` / ``to_params`` (:func:`optim.muon_layout.layer_split_constraints`) move the matrix into
    the whole-matrix, layers-split layout and back; they are applied to the ``dtype`` copy, so on a mesh
    the two all-to-alls carry bf16, half the bytes of splitting the fp32 gradient."""
    x_in = x
    x = to_split(a.path, x.astype(dtype))
    red, out = (sorted(s) for s in matrix_axes(a))
    batch = [i for i in range(x.ndim) if i not in red and i not in out]
    order = batch + red + out
    moved = jnp.transpose(x, order)
    flat = moved.reshape(math.prod(x.shape[i] for i in batch), math.prod(x.shape[i] for i in red),
                         math.prod(x.shape[i] for i in out))
    o = newton_schulz(flat, coeffs, steps, dtype).reshape(moved.shape)
    return to_params(a.path, jnp.transpose(o, [order.index(i) for i in range(x.ndim)])).astype(x_in.dtype)


def update_scale(a: ParamAssignment, consistent_rms: float | None) -> float:
    """``optax.contrib.muon``'s per-matrix update scale: ``r sqrt(max(fan_in, fan_out))`` (Moonlight's
    consistent RMS) or, with None, Jordan's ``sqrt(max(1, fan_out / fan_in))``."""
    red, out = matrix_axes(a)
    fan_in, fan_out = (math.prod(a.shape[i] for i in s) for s in (red, out))
    if consistent_rms is None:
        return math.sqrt(max(1.0, fan_out / fan_in))
    return consistent_rms * math.sqrt(max(fan_in, fan_out))


def scale_by_muon_lowp(partition: Partition, *, beta: float, nesterov: bool, coeffs: Coeffs, steps: int,
                       ns_dtype: Any, consistent_rms: float | None) -> optax.GradientTransformation:
    """Muon's direction: fp32 momentum (in the parameters' layout), orthogonalised in ``ns_dtype`` (split
    over layers on a mesh whose rules map ``muon_layers``), scaled per matrix."""
    info = partition.info
    to_split, to_params = layer_split_constraints(partition)

    def init_fn(params: Any) -> MuonLowpState:
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return MuonLowpState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates: Any, state: MuonLowpState, params: Any = None) -> tuple[Any, MuonLowpState]:
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        if nesterov:  # optax's Nesterov blend of the bias-corrected momentum and gradient
            direction = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                optax.tree.bias_correction(updates, beta, count),
            )
        else:
            direction = optax.tree.bias_correction(mu, beta, count)

        def leaf(kp: Any, d: jax.Array) -> jax.Array:
            a = info[path_str(kp)]
            o = orthogonalise(d, a, coeffs, steps, ns_dtype, to_split, to_params)
            return o * update_scale(a, consistent_rms)

        return jax.tree_util.tree_map_with_path(leaf, direction), MuonLowpState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon_lowp(cfg: OptimizerConfig, learning_rate: optax.ScalarOrSchedule, partition: Partition,
              coeffs: Coeffs, ns_dtype: Any | None = None) -> optax.GradientTransformation:
    """The Muon group of ``optim.muon.muon_group`` with Newton-Schulz in ``ns_dtype`` (default
    ``cfg.ns_dtype``): direction, then decoupled weight decay on the masked leaves, then the learning rate,
    the order of ``optax.contrib.muon``."""
    return optax.chain(
        scale_by_muon_lowp(partition, beta=cfg.muon_momentum, nesterov=cfg.nesterov, coeffs=coeffs,
                           steps=cfg.ns_steps, ns_dtype=jnp.dtype(ns_dtype or cfg.ns_dtype),
                           consistent_rms=cfg.muon_consistent_rms),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask_fn(partition)),
        optax.scale_by_learning_rate(learning_rate),
    )
