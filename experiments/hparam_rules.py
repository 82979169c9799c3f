"""Per-scale hyperparameter rules: learning rate and batch size as power laws, and fitting the LR rule.

Untuned learning rates and batch sizes bias fitted scaling exponents (Porian et al. 2024, "Resolving
Discrepancies in Compute-Optimal Scaling of Language Models", arXiv:2406.19146), so a sweep sets them per run
from a rule instead of one constant:

* ``LRRule``: ``lr = coef * C^c_exp`` (DeepSeek LLM, Bi et al. 2024, arXiv:2401.02954: eta_opt =
  0.3118 C^-0.125) or ``lr = coef * N^n_exp * D^d_exp`` (StepLaw, Li et al. 2025, "Predictable Scale: Part I",
  arXiv:2503.04715: eta_opt = 1.79 N^-0.713 D^0.307). ``fit_lr_rule`` fits either form by least squares in
  log space to the best learning rate of each (N, D) cell of a small LR sweep, where "best" is the vertex
  of a parabola in log(lr) through the three lowest losses (the grid point itself at the edge of the grid).
  Muon and AdamW need separate fits (their optimal lr differ by orders of magnitude).
* ``BatchRule``: ``tokens per step = coef * C^exp`` (DeepSeek LLM: B_opt = 0.292 C^0.3271 tokens), rounded
  to a power of two sequences and clamped, then halved until the run has at least ``min_steps`` steps (so the
  rounding of D to whole steps stays below 1 / (2 min_steps) of the budget).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LRRule:
    """``lr = coef * C^c_exp * N^n_exp * D^d_exp`` (zero exponents drop a factor; all zero = constant)."""

    coef: float
    c_exp: float = 0.0
    n_exp: float = 0.0
    d_exp: float = 0.0
    source: str = "manual"  # "manual" or "fitted from N lr-sweep cells"

    def __call__(self, *, N: float, D: float, C: float) -> float:
        return float(self.coef * C**self.c_exp * N**self.n_exp * D**self.d_exp)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> LRRule:
        return cls(**d)


@dataclass(frozen=True)
class BatchRule:
    """Sequences per step: ``round_pow2(coef * C^exp / seq_len)`` clamped to [min_batch, max_batch]; exp = 0
    with coef = batch * seq_len gives a fixed batch. Halved (not below ``min_batch``) while the run would
    have fewer than ``min_steps`` steps."""

    coef: float
    exp: float = 0.0
    min_batch: int = 1
    max_batch: int = 1 << 20
    min_steps: int = 50

    def batch_size(self, C: float, tokens: float, seq_len: int) -> int:
        raw = self.coef * C**self.exp / seq_len
        b = 2 ** max(0, round(math.log2(max(raw, 1.0))))
        b = int(min(max(b, self.min_batch), self.max_batch))
        while b > self.min_batch and tokens / (b * seq_len) < self.min_steps:
            b //= 2
        return max(b, self.min_batch)

    def to_dict(self) -> dict:
        return asdict(self)


def best_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The loss-minimising lr of one sweep cell: the vertex of a parabola in log(lr) through the best grid
    point and its two neighbours (the best grid point itself when it is at the edge or the parabola is not
    convex). Non-finite losses (diverged runs) are ignored."""
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(y)
    if ok.sum() == 0:
        raise ValueError(f"every run of this lr-sweep cell diverged (lrs {list(lrs)})")
    order = np.argsort(x[ok])
    x, y = x[ok][order], y[ok][order]
    i = int(np.argmin(y))
    if 0 < i < len(x) - 1:
        a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
        if a > 0:
            return float(np.exp(np.clip(-b / (2 * a), x[i - 1], x[i + 1])))
    return float(np.exp(x[i]))


def _edge_gap(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """Loss of the edge grid point's neighbour minus the edge point's (finite losses, sorted by lr)."""
    pts = sorted((lr, y) for lr, y in zip(lrs, losses, strict=True) if math.isfinite(y))
    if len(pts) < 2:
        return float("nan")
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    return pts[1][1] - pts[0][1] if best == 0 else pts[-2][1] - pts[-1][1]


def _edge_note(gaps: Sequence[float]) -> str:
    """The rule's caveat when optima were not bracketed. The gap says whether that matters: a cell whose edge
    point beats its neighbour by less than the run-to-run noise is flat, not unbracketed (measured on
    cpu-tiny, lr_rules.json of the README's first command: 2.43-2.46 nats across an 8x lr range at 1e11
    FLOPs, zig-zagging by ~0.02 between neighbours)."""
    if not gaps:
        return ""
    return (
        f"; {len(gaps)} cell(s) best at the edge of the lr grid, by {', '.join(f'{g:.3g}' for g in gaps)} "
        "nats over the neighbouring lr (widen the sweep unless that is within run-to-run noise)"
    )


def _weakest_span(logs_KxF: np.ndarray) -> float:
    """Spread (max - min, in the logs' units) of K cells along their least-varied direction in F features:
    the spread itself for one feature, the smallest principal-axis spread for several -- 0 when the cells
    lie on a line (one budget; one tokens-per-parameter ratio), where the exponents are not identified."""
    Z = logs_KxF - logs_KxF.mean(axis=0)
    _, _, vt = np.linalg.svd(Z, full_matrices=False)
    spreads = np.ptp(Z @ vt.T, axis=0)
    return float(spreads.min()) if len(spreads) == Z.shape[1] else 0.0  # fewer cells than features: 0


def fit_lr_rule(
    cells: Sequence[Mapping],
    form: str = "C",
    *,
    prior: LRRule | None = None,
    min_decades: float = 1.0,
) -> LRRule:
    """Fit ``LRRule`` to lr-sweep results.

    cells: one mapping per run with keys N, D, C, lr, loss; runs sharing (N, D) form one cell whose best lr
    (``best_lr``) is one data point. form: "C" (DeepSeek LLM: log lr = log coef + c_exp log C) or "ND"
    (StepLaw: + n_exp log N + d_exp log D). Needs at least 2 cells for "C" and 3 for "ND".

    prior: when the cells span less than ``min_decades`` decades of C (form "C"), or of (N, D) along their
    least-varied direction (form "ND": cells on one tokens-per-parameter ridge, as one size per budget
    gives, determine only a combination of the two exponents), or are fewer than the form's parameters, the
    exponents are not identified -- the best lr of one cell is only known to within a grid step, and
    measured on the cpu-tiny sweep two cells 3x apart in C gave c_exp = +0.96 from flat loss-vs-lr curves --
    so the exponents are taken from ``prior`` (e.g. DeepSeek LLM's -0.125, or 0) and only the coefficient
    is fitted (the geometric mean of best_lr / prior-shape). Without a prior such cells raise ValueError
    (a least-squares fit would return its minimum-norm exponents, which look plausible and mean nothing).
    """
    if form not in ("C", "ND"):
        raise ValueError(f"form must be 'C' or 'ND', got {form!r}")
    groups: dict[tuple[float, float], list[Mapping]] = {}
    for c in cells:
        groups.setdefault((float(c["N"]), float(c["D"])), []).append(c)
    n_params = 2 if form == "C" else 3
    need = n_params if prior is None else 1  # with a prior, one cell sets the coefficient
    if len(groups) < need:
        raise ValueError(
            f"fitting an lr rule of form {form!r} needs >= {need} (N, D) cells, got {len(groups)}"
        )
    rows = []
    edge_gaps = []  # per cell best at a grid edge: how much it beats its neighbour (nats)
    for (n, d), g in sorted(groups.items()):
        lrs = [r["lr"] for r in g]
        lr = best_lr(lrs, [r["loss"] for r in g])
        if np.isclose(lr, min(lrs), rtol=1e-9) or np.isclose(lr, max(lrs), rtol=1e-9):
            edge_gaps.append(_edge_gap(lrs, [r["loss"] for r in g]))
        rows.append((n, d, float(g[0]["C"]), lr))
    edge = _edge_note(edge_gaps)
    arr = np.asarray(rows)
    y = np.log(arr[:, 3])
    span = _weakest_span(np.log10(arr[:, 2:3] if form == "C" else arr[:, :2]))
    where = "" if form == "C" else " of (N, D) along their least-varied direction"
    if len(arr) < n_params or span < min_decades:
        if prior is None:
            raise ValueError(
                f"the lr-rule exponents of form {form!r} are not determined by {len(arr)} cell(s) spanning "
                f"{span:.2g} decade(s){where} (need {n_params} cells and >= {min_decades:g} decade(s)); "
                "give a prior rule to fit only its coefficient"
            )
        shape = np.array([prior(N=n, D=d, C=c) / prior.coef for n, d, c, _ in rows])
        coef0 = float(np.exp(np.mean(y - np.log(shape))))
        src = (
            f"coefficient fitted from {len(arr)} lr-sweep cells spanning {span:.2g} decade(s){where} "
            f"(< {min_decades:g}: exponents kept from the prior rule)"
        )
        return dataclasses.replace(prior, coef=coef0, source=src + edge)
    if form == "C":
        X = np.stack([np.ones(len(arr)), np.log(arr[:, 2])], axis=1)
    else:
        X = np.stack([np.ones(len(arr)), np.log(arr[:, 0]), np.log(arr[:, 1])], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    src = f"fitted ({form}) from {len(arr)} lr-sweep cells" + edge
    if form == "C":
        return LRRule(coef=float(np.exp(coef[0])), c_exp=float(coef[1]), source=src)
    return LRRule(coef=float(np.exp(coef[0])), n_exp=float(coef[1]), d_exp=float(coef[2]), source=src)
