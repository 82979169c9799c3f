"""Pareto frontiers: non-dominated sets, bootstrap membership probability, and law-implied frontiers.

Conventions: ``points_NxK`` holds N candidates (runs, models) and K objectives; ``sense`` says, per objective,
whether smaller ("min", e.g. loss, FLOPs, wall-clock) or larger ("max", e.g. accuracy) is better. Point p
*dominates* q when p is at least as good as q in every objective and strictly better in one. Identical points
do not dominate each other, so duplicates on the frontier are all kept.

Algorithms
- K = 2: exact O(N log N) sort-and-sweep (Kung, Luccio & Preparata 1975, "On finding the maxima of a set of
  vectors"), with explicit tie handling, vectorised in numpy (also across bootstrap replicates).
- K >= 3: "sort-filter-skyline" (Chomicki et al. 2003): visit points by increasing sum of per-objective ranks;
  a dominator always has a strictly smaller rank sum, so each point only needs to be compared with the
  frontier found so far (worst case O(N^2 K), typically O(N |front| K)), processed in vectorised blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "pareto_mask",
    "pareto_front",
    "membership_probability",
    "LawFrontier",
    "law_frontier",
]

_BLOCK = 256  # points per vectorised block in the K >= 3 method: bounds memory at BLOCK x |front| x K


def _as_min_objectives(points_NxK, sense) -> np.ndarray:
    """Validate and flip "max" objectives so that every column is to be minimised."""
    pts = np.asarray(points_NxK, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D array (N points x K objectives); got shape {pts.shape}")
    k = pts.shape[1]
    if k < 1:
        raise ValueError("points need at least one objective column")
    signs = _signs(sense, k)
    bad = np.isnan(pts)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"points contain NaN in rows {rows[:10].tolist()}{' ...' if rows.size > 10 else ''}")
    return pts * signs


def _signs(sense, k: int) -> np.ndarray:
    if isinstance(sense, str):
        sense = (sense,) * k
    sense = tuple(sense)
    if len(sense) != k:
        raise ValueError(f"sense has {len(sense)} entries but points have {k} objectives")
    bad = [s for s in sense if s not in ("min", "max")]
    if bad:
        raise ValueError(f"sense entries must be 'min' or 'max'; got {bad}")
    return np.array([1.0 if s == "min" else -1.0 for s in sense])


def _mask_2d_batched(x_BxN: np.ndarray, y_BxN: np.ndarray) -> np.ndarray:
    """Non-dominated mask (both minimised) for B independent point sets at once; O(B N log N)."""
    b, n = x_BxN.shape
    # Sort by x, ties broken by y: two stable sorts = a lexsort along the last axis (np.lexsort can't batch).
    order = np.argsort(y_BxN, axis=1, kind="stable")
    by_x = np.argsort(np.take_along_axis(x_BxN, order, 1), axis=1, kind="stable")
    order = np.take_along_axis(order, by_x, 1)
    xs = np.take_along_axis(x_BxN, order, 1)
    ys = np.take_along_axis(y_BxN, order, 1)
    idx = np.broadcast_to(np.arange(n), (b, n))
    new_group = np.ones((b, n), dtype=bool)
    new_group[:, 1:] = xs[:, 1:] != xs[:, :-1]
    start = np.maximum.accumulate(np.where(new_group, idx, 0), axis=1)  # first index of each equal-x group
    run_min = np.minimum.accumulate(ys, axis=1)
    prev_min = np.where(start > 0, np.take_along_axis(run_min, np.maximum(start - 1, 0), 1), np.inf)
    group_min = np.take_along_axis(ys, start, 1)  # ys ascend within a group, so its first y is its minimum
    # p is dominated by a point with smaller x iff that point's y <= p's y, and by a point with equal x iff
    # that point's y is strictly smaller. Equal points (same x and y) survive together.
    # The first x-group has no predecessor (prev_min is a stand-in +inf): its minimum is kept even when that
    # is +inf itself, e.g. a diverged run with the fewest FLOPs, which nothing dominates.
    keep_sorted = ((start == 0) | (ys < prev_min)) & (ys == group_min)
    mask = np.empty_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, 1)
    return mask


def _dense_ranks(pts_NxK: np.ndarray) -> np.ndarray:
    """Per-column dense ranks: keep order and ties exactly, and make sums finite even with +-inf values."""
    ranks = np.empty(pts_NxK.shape, dtype=np.int64)
    for j in range(pts_NxK.shape[1]):
        ranks[:, j] = np.unique(pts_NxK[:, j], return_inverse=True)[1].ravel()
    return ranks


def _mask_general(pts_NxK: np.ndarray) -> np.ndarray:
    n = pts_NxK.shape[0]
    ranks = _dense_ranks(pts_NxK)
    order = np.argsort(ranks.sum(axis=1), kind="stable")
    r = ranks[order]
    keep_sorted = np.zeros(n, dtype=bool)
    front_FxK = np.empty((0, r.shape[1]), dtype=np.int64)
    for lo in range(0, n, _BLOCK):
        blk_BxK = r[lo : lo + _BLOCK]
        # Dominated by the frontier found so far (all earlier points with a non-dominated status).
        le = (front_FxK[None, :, :] <= blk_BxK[:, None, :]).all(-1)
        lt = (front_FxK[None, :, :] < blk_BxK[:, None, :]).any(-1)
        dom = (le & lt).any(1)
        # Dominated within the block (dominance by a dominated point implies dominance by a frontier point, so
        # comparing against all block members is exact).
        le = (blk_BxK[None, :, :] <= blk_BxK[:, None, :]).all(-1)
        lt = (blk_BxK[None, :, :] < blk_BxK[:, None, :]).any(-1)
        dom |= (le & lt).any(1)
        keep_sorted[lo : lo + len(blk_BxK)] = ~dom
        front_FxK = np.concatenate([front_FxK, blk_BxK[~dom]])
    mask = np.empty(n, dtype=bool)
    mask[order] = keep_sorted
    return mask


def pareto_mask(points_NxK, sense: str | Sequence[str] = "min") -> np.ndarray:
    """Boolean mask of the non-dominated points.

    Args:
      points_NxK: array [N, K] of objective values (NaN rejected; +-inf allowed).
      sense: "min"/"max" for all objectives, or one entry per objective, e.g. ("min", "max") for
        (inference FLOPs, accuracy).
    Returns:
      bool array [N], True for points on the Pareto frontier (ties all kept).
    """
    pts = _as_min_objectives(points_NxK, sense)
    n, k = pts.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if k == 1:
        return pts[:, 0] == pts[:, 0].min()
    if k == 2:
        return _mask_2d_batched(pts[None, :, 0], pts[None, :, 1])[0]
    return _mask_general(pts)


def pareto_front(points_NxK, sense: str | Sequence[str] = "min") -> np.ndarray:
    """Indices of the non-dominated points, ordered by the first objective (best first), then the second."""
    pts = _as_min_objectives(points_NxK, sense)
    idx = np.flatnonzero(pareto_mask(points_NxK, sense))
    keys = tuple(pts[idx, j] for j in reversed(range(pts.shape[1])))
    return idx[np.lexsort(keys)] if idx.size else idx


def membership_probability(
    points_NxK,
    sigma,
    sense: str | Sequence[str] = "min",
    *,
    n_boot: int = 1000,
    noise: str = "absolute",
    seed: int = 0,
) -> np.ndarray:
    """Probability that each point is on the frontier when its measurements carry noise.

    Each replicate perturbs every objective value, ``v + sigma * z`` ("absolute") or ``v * exp(sigma * z)``
    ("relative", i.e. sigma is a log-scale / fractional error, natural for losses and FLOPs), z ~ N(0, 1), and
    recomputes the frontier; the result is the fraction of replicates in which the point is non-dominated.
    A parametric bootstrap in the sense of Efron & Tibshirani (1993).

    Args:
      points_NxK: observed objective values.
      sigma: noise scale broadcastable to [N, K] (scalar, per objective [K], or per point [N, K]); 0 = exact.
      n_boot: number of noisy replicates; the standard error of each probability is <= 0.5 / sqrt(n_boot).
    Returns:
      float array [N] in [0, 1].
    """
    pts = np.asarray(points_NxK, dtype=np.float64)
    _as_min_objectives(pts, sense)  # validation
    n, k = pts.shape
    signs = _signs(sense, k)
    try:
        sig_NxK = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n, k))
    except ValueError as e:
        msg = f"sigma with shape {np.shape(sigma)} does not broadcast to points' shape {(n, k)}"
        raise ValueError(msg) from e
    if (sig_NxK < 0).any() or not np.isfinite(sig_NxK).all():
        raise ValueError("sigma must be finite and non-negative")
    if noise not in ("absolute", "relative"):
        raise ValueError(f"noise must be 'absolute' or 'relative'; got {noise!r}")
    if noise == "relative" and (pts <= 0).any():
        raise ValueError("noise='relative' needs strictly positive objective values")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    rng = np.random.default_rng(seed)
    z_BxNxK = rng.standard_normal((n_boot, n, k))
    noisy = pts + sig_NxK * z_BxNxK if noise == "absolute" else pts * np.exp(sig_NxK * z_BxNxK)
    noisy = noisy * signs
    if k == 2:
        masks = _mask_2d_batched(noisy[..., 0], noisy[..., 1])
    elif k == 1:
        masks = noisy[..., 0] == noisy[..., 0].min(axis=1, keepdims=True)
    else:
        masks = np.stack([_mask_general(rep) for rep in noisy])
    return masks.mean(axis=0)


@dataclass(frozen=True)
class LawFrontier:
    """Frontier implied by fitted laws of several model families over a compute grid.

    Attributes:
      compute: the grid [G].
      names: family names, in the order of ``values``' rows.
      values: predicted metric per family on the grid, [F, G].
      best: index of the best family at each grid point [G] (ties -> first family).
      frontier: the best value at each grid point [G].
      crossovers: (compute, from_family, to_family) where the best family changes, located by root finding on
        the difference of the two predictions (to rtol 1e-10 in log compute).
      sense: "min" (loss) or "max" (accuracy).
    """

    compute: np.ndarray
    names: tuple[str, ...]
    values: np.ndarray
    best: np.ndarray
    frontier: np.ndarray
    crossovers: tuple[tuple[float, str, str], ...]
    sense: str

    def best_family(self, compute: float) -> str:
        """Name of the best family at a given compute (evaluated on the grid's nearest log point)."""
        i = int(np.argmin(np.abs(np.log(self.compute) - np.log(compute))))
        return self.names[int(self.best[i])]

    def segments(self) -> list[tuple[str, float, float]]:
        """Contiguous ranges (family, C_start, C_end) where one family is best (crossovers as boundaries)."""
        out, lo = [], float(self.compute[0])
        for c, a, _ in self.crossovers:
            out.append((a, lo, c))
            lo = c
        out.append((self.names[int(self.best[-1])], lo, float(self.compute[-1])))
        return out

    def to_dict(self) -> dict:
        return {
            "compute": self.compute.tolist(),
            "names": list(self.names),
            "best": [self.names[int(i)] for i in self.best],
            "frontier": self.frontier.tolist(),
            "crossovers": [{"compute": c, "from": a, "to": b} for c, a, b in self.crossovers],
            "sense": self.sense,
        }


def _as_predictor(obj) -> Callable[[np.ndarray], np.ndarray]:
    """C -> value from a callable, a fitted single-input law, or a fitted L(N, D) law (via its optimum)."""
    law = getattr(obj, "law", None)
    if law is None and isinstance(obj, tuple) and len(obj) == 2 and hasattr(obj[0], "inputs"):
        law = obj[0]  # a (law, params) pair
    if law is not None:
        inputs = tuple(law.inputs)
        if {"N", "D"} <= set(inputs):
            from scaling.optimal import compute_optimal  # lazy: only needed for L(N, D) laws

            # The family's best loss at compute C: its compute-optimal allocation L*(C) (C = 6ND).
            return lambda c: np.asarray(compute_optimal(obj, np.atleast_1d(c)).loss, dtype=np.float64)
        if len(inputs) != 1:
            raise ValueError(f"a fitted law with inputs {inputs} needs a compute -> value function")
        if not hasattr(obj, "predict"):
            raise TypeError("a (law, params) pair is only accepted for L(N, D) laws; pass a callable instead")
        name = inputs[0]
        return lambda c: np.asarray(obj.predict(**{name: c}), dtype=np.float64)
    if callable(obj):
        return lambda c: np.asarray(obj(c), dtype=np.float64)
    raise TypeError(f"expected a callable C -> value or a fitted law; got {type(obj).__name__}")


def law_frontier(
    predictors: Mapping[str, object],
    compute,
    *,
    sense: str = "min",
) -> LawFrontier:
    """Which family is best at each compute, and where the best family changes.

    Args:
      predictors: family name -> a callable C -> metric; or a fitted law: a FitResult (or a (law, params)
        pair) of an L(N, D) law such as "chinchilla" -- the family's compute-optimal loss L*(C) from
        ``scaling.optimal.compute_optimal`` (C = 6ND) -- or a FitResult of a single-input law in C.
      compute: grid of compute values (> 0, will be sorted); crossovers are searched between grid points, so
        use a grid fine enough not to skip a double crossing (a few hundred log-spaced points).
      sense: "min" for losses, "max" for accuracies.
    """
    if sense not in ("min", "max"):
        raise ValueError(f"sense must be 'min' or 'max'; got {sense!r}")
    if len(predictors) < 1:
        raise ValueError("predictors is empty")
    c = np.sort(np.asarray(compute, dtype=np.float64).ravel())
    if c.size < 2 or (c <= 0).any() or not np.isfinite(c).all():
        raise ValueError("compute must hold at least 2 finite positive values")
    names = tuple(predictors)
    fns = [_as_predictor(predictors[k]) for k in names]
    vals_FxG = np.stack([np.broadcast_to(f(c), c.shape) for f in fns]).astype(np.float64)
    if not np.isfinite(vals_FxG).all():
        bad = [names[i] for i in np.unique(np.nonzero(~np.isfinite(vals_FxG))[0])]
        raise ValueError(f"non-finite predictions from families {bad}")
    s = 1.0 if sense == "min" else -1.0
    best = np.argmin(s * vals_FxG, axis=0)
    crossovers = []
    for g in np.flatnonzero(best[1:] != best[:-1]):
        a, b = int(best[g]), int(best[g + 1])
        diff = lambda logc, a=a, b=b: float(np.ravel(fns[a](np.exp(logc)) - fns[b](np.exp(logc)))[0])
        lo, hi = np.log(c[g]), np.log(c[g + 1])
        d_lo, d_hi = vals_FxG[a, g] - vals_FxG[b, g], vals_FxG[a, g + 1] - vals_FxG[b, g + 1]
        if d_lo == 0 or d_hi == 0:
            # The predictions meet exactly at a grid point (a tie there, given to the first family): that
            # point is the crossover. diff() re-evaluates at exp(log c), whose rounding can hide the zero,
            # and "no sign change" then put the crossover at the interval's midpoint, where they differ.
            root = lo if d_lo == 0 else hi
        else:
            try:
                root = brentq(diff, lo, hi, rtol=1e-10) if diff(lo) * diff(hi) < 0 else 0.5 * (lo + hi)
            except ValueError:  # no sign change (a third family took over within the interval): the midpoint
                root = 0.5 * (lo + hi)
        crossovers.append((float(np.exp(root)), names[a], names[b]))
    return LawFrontier(
        compute=c,
        names=names,
        values=vals_FxG,
        best=best,
        frontier=vals_FxG[best, np.arange(c.size)],
        crossovers=tuple(crossovers),
        sense=sense,
    )
