"""Sweep planning: isoFLOP curves, N x D grids, user lists, LR sweeps and WSD branch sweeps, as a plan file.

A plan is a list of ``PlannedRun`` records, written as JSON lines (one full ``ExperimentConfig`` each, plus
the predicted FLOPs), so it can be read, edited and re-run (``read_plan`` re-derives every number from the
edited configs). Each run's directory is named by ``run_id(cfg)``, a hash of the resolved config without the
execution-only fields (mesh, logging, checkpoint cadence): the same experiment always lands in the same
directory, so finished runs are reused and interrupted ones resume. A run that starts from a parent's
checkpoint (WSD reuse) is named by ``branch_id``, which hashes its parent's id and step too: the weights it
starts from are part of the experiment, so a parent whose config is edited gets new descendants instead of
reusing ones trained from the old parent.

Shape rule (``ShapeRule``): models are LLaMA-style Transformers with a fixed head size (``head_dim``) whose
aspect ratio d_model / n_layers stays within a factor ``aspect_tolerance`` of ``aspect_ratio`` (Kaplan et
al. 2020 found loss flat over a wide band of aspect ratios; Hoffmann et al. 2022 used ~ 30-130). Every
(n_layers, d_model = k * head_dim) pair in that band is a candidate; ``pick_sizes`` places ``n`` sizes
log-uniformly over a factor ``span`` in parameters, centred on the size whose D / N is closest to
``tokens_per_param`` at that budget, taking the candidate nearest in log N (ties to the nominal aspect).

isoFLOP runs (Hoffmann et al. 2022, Approach 2): for budget C and shape s, tokens D = C / F(s), where F(s)
is the exact training FLOPs per token of ``models.accounting.training_flops_per_token`` (not 6N), rounded to
whole steps of the batch from ``BatchRule``; the batch rule guarantees >= ``min_steps`` steps, so the
planned FLOPs are within 1 / (2 min_steps) of C (1% at the default 50).

WSD branches (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", arXiv:2405.18392): a warmup-stable-decay run of T steps equals a constant-lr run up to its
decay start S = T - round(f T) followed by a cool-down. So per model size the planner emits a chain of
constant-lr "stable" segments ending at each branch's S (each segment resumes from the previous one's final
checkpoint) and one ordinary WSD run per branch that resumes from the segment ending at its S: a loss-vs-D
curve for the price of one long run plus short cool-downs. Every branch is an ordinary run (own
summary.json, exact FLOPs); ``incremental_flops`` counts only what a run adds to its parent, so summing it
counts the shared prefix once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.config import ConfigError, ExperimentConfig, TrainerConfig
from experiments.files import write_text_atomic
from experiments.hparam_rules import BatchRule, LRRule

# Settings that change how a run executes, not what it computes, are left out of the run hash.
from experiments.run_record import EXECUTION_ONLY_FIELDS
from models import accounting
from models.config import ModelConfig
from optim.schedules import wsd_decay_start
from scaling.io import iter_jsonl

PLAN_FILE = "plan.jsonl"
RUN_KINDS = ("isoflop", "heldout", "lr_sweep", "wsd_stable", "wsd_branch", "grid", "user", "seed_replicate")


# ----- identity ---------------------------------------------------------------------------------------------
_MISSING = object()


def _strip(d: dict, prefix: str = "", default: Any = None) -> dict:
    """``d`` without execution-only fields and without fields equal to their default: a config field added
    to scalelab later (with a behaviour-preserving default) must not change the id of every finished run.
    The flip side -- changing an existing default is a breaking change of run identity -- is documented."""
    default = default if isinstance(default, dict) else {}
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if any(key == f or key.startswith(f) for f in EXECUTION_ONLY_FIELDS):
            continue
        dv = default.get(k, _MISSING)
        if isinstance(v, dict):
            sub = _strip(v, key + ".", dv)
            if sub or not isinstance(dv, dict):
                out[k] = sub
        elif dv is _MISSING or v != dv:
            out[k] = v
    return out


@functools.cache
def _default_config_dict() -> dict:
    return ExperimentConfig().to_dict()


def run_id(cfg: ExperimentConfig | Mapping) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON config without execution-only fields and without
    fields at their default values (see ``_strip``)."""
    d = cfg.to_dict() if isinstance(cfg, ExperimentConfig) else dict(cfg)
    blob = json.dumps(_strip(d, default=_default_config_dict()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def branch_id(config_id: str, parent_id: str, step: int) -> str:
    """Run id of a run with config hash ``config_id`` that starts from run ``parent_id``'s step ``step``."""
    return hashlib.sha256(f"{config_id}|{parent_id}|{int(step)}".encode()).hexdigest()[:12]


# ----- the plan record --------------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    """One run of a plan. Everything but name/kind/group/budget/fit/parent is derived from ``config``.

    parent: None, or {"run": NAME, "step": S}: start from NAME's checkpoint at step S (WSD reuse).
    fit: whether the scaling fits may use this run (held-out runs and LR-sweep runs are not).
    """

    name: str
    kind: str
    config: dict[str, Any]
    group: str = "default"
    budget: float | None = None
    fit: bool = True
    parent: dict[str, Any] | None = None
    # derived (recomputed by ``resolve``)
    run_id: str = ""
    params: int = 0
    non_embedding_params: int = 0
    tokens: int = 0
    steps: int = 0
    flops_per_token: float = 0.0
    predicted_flops: float = 0.0
    incremental_flops: float = 0.0
    learning_rate: float = 0.0
    batch_size: int = 0

    @property
    def experiment(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.config)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)


def resolve(runs: Sequence[PlannedRun]) -> list[PlannedRun]:
    """Validate every config and (re)derive ids, sizes and FLOPs; checks names and parents."""
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"plan has duplicate run names {dup}")
    by_name = {}
    out = []
    for r in runs:
        if r.kind not in RUN_KINDS:
            raise ConfigError(f"run {r.name!r}: kind {r.kind!r} is not one of {RUN_KINDS}")
        try:
            cfg = ExperimentConfig.from_dict(r.config).validate()
        except ConfigError as e:
            raise ConfigError(f"run {r.name!r}: {e}") from e
        counts = accounting.param_counts(cfg.model)
        fpt = accounting.training_flops_per_token(cfg.model, cfg.data.seq_len)
        steps = cfg.total_steps
        tokens = steps * cfg.tokens_per_step
        r = dataclasses.replace(
            r,
            config=cfg.to_dict(),
            run_id=run_id(cfg),
            params=int(counts["total"]),
            non_embedding_params=int(counts["non_embedding"]),
            tokens=int(tokens),
            steps=int(steps),
            flops_per_token=float(fpt),
            predicted_flops=float(fpt * tokens),
            incremental_flops=float(fpt * tokens),
            learning_rate=float(cfg.optimizer.learning_rate),
            batch_size=int(cfg.data.batch_size),
        )
        if r.parent is not None:
            p = by_name.get(r.parent.get("run"))
            if p is None:
                raise ConfigError(f"run {r.name!r}: parent {r.parent!r} is not an earlier run of the plan")
            step = int(r.parent["step"])
            if step != p.steps:
                raise ConfigError(
                    f"run {r.name!r}: resumes from {p.name!r} at step {step}, but that run ends at step "
                    f"{p.steps} (only its final checkpoint is kept)"
                )
            if step >= steps:
                raise ConfigError(f"run {r.name!r}: parent step {step} >= its own length {steps}")
            r.incremental_flops = float(fpt * (steps - step) * cfg.tokens_per_step)
            r.run_id = branch_id(r.run_id, p.run_id, step)  # parents precede their children
        by_name[r.name] = r
        out.append(r)
    return out


def write_plan(runs: Sequence[PlannedRun], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "".join(r.to_json() + "\n" for r in runs))


def read_plan(path: str | Path) -> list[PlannedRun]:
    """Read a (possibly hand-edited) plan; ids and FLOPs are recomputed from the configs."""
    path = Path(path)
    runs = []
    fields = {f.name for f in dataclasses.fields(PlannedRun)}
    for i, d in iter_jsonl(path, error=ConfigError):
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"{path}:{i}: unknown plan fields {unknown}")
        problems = _plan_entry_problems(d)
        if problems:
            raise ConfigError(f"{path}:{i}: " + "; ".join(problems))
        runs.append(PlannedRun(**d))
    return resolve(runs)


def _plan_entry_problems(d: dict[str, Any]) -> list[str]:
    """Type errors of one hand-edited plan line, in words: a wrong type would otherwise pass silently
    ("fit": "false" drops the run from every report table) or fail later with an unrelated error."""
    out = []
    for key in ("name", "kind", "config"):
        if key not in d:
            out.append(f"missing field {key!r}")
    for key in ("name", "kind", "group"):
        if key in d and not (isinstance(d[key], str) and d[key]):
            out.append(f"{key} must be a non-empty string, got {d[key]!r}")
    if "config" in d and not isinstance(d["config"], dict):
        out.append(f"config must be a JSON object, got {type(d['config']).__name__}")
    if "fit" in d and not isinstance(d["fit"], bool):
        out.append(f"fit must be true or false, got {d['fit']!r}")
    b = d.get("budget")
    number = isinstance(b, (int, float)) and not isinstance(b, bool)
    if b is not None and not (number and math.isfinite(b) and b > 0):
        out.append(f"budget must be a positive number or null, got {b!r}")
    par = d.get("parent")
    if par is not None and not (
        isinstance(par, dict) and set(par) == {"run", "step"} and isinstance(par["run"], str)
        and isinstance(par["step"], int) and not isinstance(par["step"], bool) and par["step"] >= 0
    ):
        out.append(f'parent must be null or {{"run": NAME, "step": STEP (an integer >= 0)}}, got {par!r}')
    return out


# ----- shapes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRule:
    """Candidate shapes: fixed ``head_dim``, d_model / n_layers within ``aspect_tolerance`` x of
    ``aspect_ratio``; d_model a multiple of ``head_dim``."""

    head_dim: int = 16
    aspect_ratio: float = 32.0
    aspect_tolerance: float = 2.0
    min_layers: int = 1
    max_layers: int = 24
    max_d_model: int = 2048

    def candidates(self, base: ModelConfig) -> list[ModelConfig]:
        kv_ratio = base.n_heads // base.resolved_n_kv_heads if base.n_kv_heads else 1
        out = []
        for n_layers in range(self.min_layers, self.max_layers + 1):
            for d in range(self.head_dim, self.max_d_model + 1, self.head_dim):
                a = d / n_layers
                if not (
                    self.aspect_ratio / self.aspect_tolerance
                    <= a
                    <= self.aspect_ratio * self.aspect_tolerance
                ):
                    continue
                heads = d // self.head_dim
                if heads % kv_ratio:
                    continue
                m = base.replace(
                    d_model=d,
                    n_layers=n_layers,
                    n_heads=heads,
                    n_kv_heads=None if kv_ratio == 1 else heads // kv_ratio,
                    head_dim=None,
                    d_ff=None,
                    moe_d_ff=None,
                )
                try:
                    m.validate()
                except ValueError:
                    continue  # e.g. MoR depths not divisible by the recursion count
                out.append(m)
        return sorted(out, key=lambda m: accounting.param_counts(m)["total"])


def _ladder(candidates: Sequence[ModelConfig], aspect_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate shape's log parameter count and its distance |log(d / L / aspect_ratio)| from the
    rule's aspect ratio: what :func:`pick_sizes` and :func:`edge_extension` choose sizes by."""
    logn = np.log([accounting.param_counts(m)["total"] for m in candidates])
    aspect = np.array([abs(math.log(m.d_model / m.n_layers / aspect_ratio)) for m in candidates])
    return logn, aspect


def _distance(logn: np.ndarray, aspect: np.ndarray, target_logn: float) -> np.ndarray:
    """How far each candidate is from a target size; the aspect term breaks near-ties."""
    return np.abs(logn - target_logn) + 0.05 * aspect


def pick_sizes(
    candidates: Sequence[ModelConfig],
    budget: float,
    n: int,
    *,
    seq_len: int,
    span: float,
    tokens_per_param: float,
    aspect_ratio: float,
) -> list[ModelConfig]:
    """``n`` distinct shapes log-uniform over a factor ``span`` in parameters around the size whose
    D / N = C / (F N) is closest to ``tokens_per_param`` (documented in the module docstring)."""
    if n < 1 or len(candidates) < n:
        raise ConfigError(f"need {n} sizes but the shape rule gives only {len(candidates)} candidates")
    logn, aspect = _ladder(candidates, aspect_ratio)
    fpt = np.array([accounting.training_flops_per_token(m, seq_len) for m in candidates])
    ratio = budget / fpt / np.exp(logn)  # D / N at this budget
    center = logn[int(np.argmin(np.abs(np.log(ratio) - math.log(tokens_per_param))))]
    targets = center + np.log(span) * (np.linspace(-0.5, 0.5, n) if n > 1 else np.zeros(1))
    used: set[int] = set()
    picked = []
    for t in targets:
        score = _distance(logn, aspect, t)
        for i in np.argsort(score):
            if int(i) not in used and all(abs(logn[i] - logn[j]) > 0.05 for j in used):
                used.add(int(i))
                picked.append(candidates[int(i)])
                break
    if len(picked) < n:
        raise ConfigError(f"could not find {n} distinct sizes around budget {budget:.3g}")
    return sorted(picked, key=lambda m: accounting.param_counts(m)["total"])


def edge_extension(
    params: Sequence[float],
    losses: Sequence[float],
    candidates: Sequence[ModelConfig],
    *,
    step: float,
    aspect_ratio: float,
) -> ModelConfig | None:
    """The shape one grid ``step`` (in log N) beyond the edge of an isoFLOP curve whose lowest loss sits at
    that edge; None when the lowest loss is interior; ConfigError when the shape rule has no size beyond.

    Why: a curve whose lowest point is its smallest (largest) size does not bracket N*, and Approach 2 drops
    such a budget; the remedy is the next size out, not a hand-tuned ``tokens_per_param``. Ties on distance
    go to the shape nearest the rule's aspect ratio, as in :func:`pick_sizes`."""
    if len(params) != len(losses) or len(params) < 2:
        return None
    logn = np.log(np.asarray(params, np.float64))
    j = int(np.argmin(losses))
    if logn[j] not in (logn.min(), logn.max()):
        return None
    direction = -1.0 if logn[j] == logn.min() else 1.0
    cand_logn, aspect = _ladder(candidates, aspect_ratio)
    beyond = direction * (cand_logn - logn[j]) > 0.05
    if not beyond.any():
        side = "smaller" if direction < 0 else "larger"
        raise ConfigError(f"the lowest loss is at N={params[j]:,.0f}, and the shape rule has no {side} size")
    score = np.where(beyond, _distance(cand_logn, aspect, logn[j] + direction * step), np.inf)
    return candidates[int(np.argmin(score))]


# ----- building runs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rules:
    """The per-run hyperparameter rules of a sweep (see experiments/hparam_rules.py)."""

    lr: LRRule
    batch: BatchRule
    warmup_fraction: float = 0.1  # warmup = round(fraction * steps), at least 1 step
    max_warmup_steps: int = 1000


def _experiment(
    base: ExperimentConfig,
    model: ModelConfig,
    *,
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    **opt_changes: Any,
) -> ExperimentConfig:
    opt = dataclasses.replace(base.optimizer, learning_rate=lr, warmup_steps=warmup, **opt_changes)
    data = dataclasses.replace(base.data, batch_size=batch)
    # One validation set for every run of a sweep: it is eval_steps x eval batch windows, and left to its
    # default the eval batch follows the planned batch, so each budget scored another prefix of the val split
    # (cpu-tiny: 8k/16k/32k tokens, whose true-source losses differ by up to 0.017 nats, as large as the
    # seed noise). The base's eval batch is kept whatever batch a run is planned with.
    trainer: TrainerConfig = dataclasses.replace(
        base.trainer, steps=steps, tokens=None, eval_batch_size=base.eval_batch_size
    )
    return dataclasses.replace(base, model=model, optimizer=opt, data=data, trainer=trainer).validate()


def _warmup(rules: Rules, steps: int) -> int:
    return max(1, min(rules.max_warmup_steps, round(rules.warmup_fraction * steps)))


def budget_run(
    base: ExperimentConfig,
    model: ModelConfig,
    budget: float,
    rules: Rules,
    *,
    name: str,
    kind: str = "isoflop",
    group: str = "default",
    fit: bool = True,
    lr_factor: float = 1.0,
) -> PlannedRun:
    """One run of ``model`` spending ``budget`` training FLOPs (rounded to whole steps)."""
    L = base.data.seq_len
    fpt = accounting.training_flops_per_token(model, L)
    d_target = budget / fpt
    batch = rules.batch.batch_size(budget, d_target, L)
    steps = max(1, round(d_target / (batch * L)))
    n = accounting.param_counts(model)["total"]
    lr = rules.lr(N=n, D=steps * batch * L, C=budget) * lr_factor
    cfg = _experiment(base, model, steps=steps, batch=batch, lr=lr, warmup=_warmup(rules, steps))
    return PlannedRun(name=name, kind=kind, config=cfg.to_dict(), group=group, budget=float(budget), fit=fit)


def _size_tag(model: ModelConfig) -> str:
    return f"L{model.n_layers}d{model.d_model}"


def isoflop_run_name(group: str, kind: str, budget: float, model: ModelConfig) -> str:
    """``GROUP/KIND-C<budget>-L<layers>d<width>``: the name of a run of ``model`` on ``budget``'s curve."""
    return f"{group}/{kind}-C{budget:.2e}-{_size_tag(model)}"


def plan_isoflop(
    base: ExperimentConfig,
    budgets: Sequence[float],
    sizes_per_budget: int,
    rules: Rules,
    *,
    shape_rule: ShapeRule = ShapeRule(),
    span: float = 16.0,
    tokens_per_param: float = 20.0,
    group: str = "default",
    kind: str = "isoflop",
    fit: bool = True,
) -> list[PlannedRun]:
    """``sizes_per_budget`` runs per budget along each isoFLOP curve (names ``GROUP/KIND-C..-L..d..``)."""
    cands = shape_rule.candidates(base.model)
    runs = []
    for c in budgets:
        for m in pick_sizes(
            cands,
            c,
            sizes_per_budget,
            seq_len=base.data.seq_len,
            span=span,
            tokens_per_param=tokens_per_param,
            aspect_ratio=shape_rule.aspect_ratio,
        ):
            runs.append(
                budget_run(
                    base,
                    m,
                    c,
                    rules,
                    name=isoflop_run_name(group, kind, c, m),
                    kind=kind,
                    group=group,
                    fit=fit,
                )
            )
    return resolve(runs)


def plan_heldout(
    base: ExperimentConfig,
    budgets: Sequence[float],
    rules: Rules,
    *,
    shape_rule: ShapeRule = ShapeRule(),
    tokens_per_param: float = 20.0,
    group: str = "default",
) -> list[PlannedRun]:
    """One run per (larger) budget at the guessed optimum size; never used in fits (``fit=False``)."""
    return plan_isoflop(
        base,
        budgets,
        1,
        rules,
        shape_rule=shape_rule,
        span=1.0,
        tokens_per_param=tokens_per_param,
        group=group,
        kind="heldout",
        fit=False,
    )


def plan_lr_sweep(runs: Iterable[PlannedRun], lr_factors: Sequence[float]) -> list[PlannedRun]:
    """Copies of ``runs`` with the learning rate multiplied by each factor (kind "lr_sweep", not fitted)."""
    out = []
    for r in runs:
        cfg = r.experiment
        for f in lr_factors:
            c2 = dataclasses.replace(
                cfg,
                optimizer=dataclasses.replace(cfg.optimizer, learning_rate=cfg.optimizer.learning_rate * f),
            )
            out.append(
                dataclasses.replace(
                    r, name=f"{r.name}-lrx{f:g}", kind="lr_sweep", fit=False, config=c2.to_dict()
                )
            )
    return resolve(out)


_SEED_SUFFIX = "-seed"


def replicated_name(name: str) -> str:
    """The name of the run a seed replicate (``plan_seed_replicates``) copies; other names are unchanged."""
    base, sep, seed = name.rpartition(_SEED_SUFFIX)
    return base if sep and seed.isdigit() else name


def plan_seed_replicates(runs: Iterable[PlannedRun], seeds: Sequence[int]) -> list[PlannedRun]:
    """Copies of ``runs`` with another ``seed`` each (kind "seed_replicate", not fitted): the same model,
    data and schedule with a different initialisation and data order. The spread of their final losses is the
    run-to-run noise that a law's bootstrap over the fitted points cannot see (experiments.report)."""
    out = []
    for r in runs:
        if r.parent is not None:
            raise ConfigError(f"run {r.name!r} resumes from another run; replicate its root instead")
        cfg = r.experiment
        for seed in seeds:
            if seed == cfg.seed:
                raise ConfigError(f"run {r.name!r} already has seed {seed}; replicate with other seeds")
            c2 = dataclasses.replace(cfg, seed=int(seed))
            out.append(dataclasses.replace(r, name=f"{r.name}{_SEED_SUFFIX}{seed}", kind="seed_replicate",
                                           fit=False, config=c2.to_dict()))
    return resolve(out)


def plan_grid(
    base: ExperimentConfig,
    models: Sequence[ModelConfig],
    token_counts: Sequence[float],
    rules: Rules,
    *,
    group: str = "default",
) -> list[PlannedRun]:
    """Every model x every token count (an N x D grid; ``budget`` is None)."""
    L = base.data.seq_len
    runs = []
    for m in models:
        fpt = accounting.training_flops_per_token(m, L)
        n = accounting.param_counts(m)["total"]
        for d in token_counts:
            c = fpt * d
            batch = rules.batch.batch_size(c, d, L)
            steps = max(1, round(d / (batch * L)))
            lr = rules.lr(N=n, D=steps * batch * L, C=c)
            cfg = _experiment(base, m, steps=steps, batch=batch, lr=lr, warmup=_warmup(rules, steps))
            runs.append(
                PlannedRun(
                    name=f"{group}/grid-{_size_tag(m)}-D{d:.2e}",
                    kind="grid",
                    config=cfg.to_dict(),
                    group=group,
                )
            )
    return resolve(runs)


def plan_user_list(
    base: ExperimentConfig, entries: Sequence[Mapping[str, Any]], *, group: str = "default"
) -> list[PlannedRun]:
    """Runs from a user list: each entry {"name": ..., "set": ["section.field=value", ...]} overrides
    ``base`` (the same syntax as ``--set``)."""
    runs = []
    for i, e in enumerate(entries):
        cfg = base.override(list(e.get("set", []))).validate()
        runs.append(
            PlannedRun(
                name=e.get("name", f"{group}/user-{i}"), kind="user", config=cfg.to_dict(), group=group
            )
        )
    return resolve(runs)


def plan_wsd(
    base: ExperimentConfig,
    models: Sequence[ModelConfig],
    budgets: Sequence[float],
    rules: Rules,
    *,
    decay_fraction: float = 0.2,
    decay_shape: str = "1-sqrt",
    group: str = "default",
) -> list[PlannedRun]:
    """WSD compute reuse (module docstring): per model a chain of constant-lr stable segments and one WSD
    cool-down branch per budget. The batch comes from the smallest budget (so every branch has
    >= min_steps steps) and the lr from the rule at the geometric-mean budget, rescaled by
    sqrt(batch / the rule's batch there) (Adam's square-root rule, Malladi et al. 2022): the lr rule was
    calibrated at the batch rule's batch, and measured on cpu-tiny the unscaled lr at half that batch left a
    27k-parameter model's stable phase stuck near the bigram plateau (+0.6 nats vs its cosine twins)."""
    L = base.data.seq_len
    runs: list[PlannedRun] = []
    c_mid = float(np.exp(np.mean(np.log(budgets))))
    for m in models:
        fpt = accounting.training_flops_per_token(m, L)
        n = accounting.param_counts(m)["total"]
        batch = rules.batch.batch_size(min(budgets), min(budgets) / fpt, L)
        rule_batch = rules.batch.batch_size(c_mid, c_mid / fpt, L)
        lr = rules.lr(N=n, D=c_mid / fpt, C=c_mid) * math.sqrt(batch / rule_batch)
        opt = dataclasses.replace(base.optimizer, decay_fraction=decay_fraction, decay_shape=decay_shape)
        b0 = dataclasses.replace(base, optimizer=opt)
        lengths = sorted({max(2, round(c / fpt / (batch * L))) for c in budgets})
        warmup = _warmup(rules, lengths[0])
        starts = []
        for T in lengths:
            probe = _experiment(b0, m, steps=T, batch=batch, lr=lr, warmup=warmup, schedule="wsd")
            starts.append(wsd_decay_start(probe.optimizer, T))
        prev: str | None = None
        prev_step = 0
        stable_of: dict[int, str] = {}
        for s in sorted(set(starts)):
            cfg = _experiment(b0, m, steps=s, batch=batch, lr=lr, warmup=warmup, schedule="constant")
            name = f"{group}/wsd-stable-{_size_tag(m)}-S{s}"
            runs.append(
                PlannedRun(
                    name=name,
                    kind="wsd_stable",
                    config=cfg.to_dict(),
                    group=group,
                    fit=False,
                    parent=None if prev is None else {"run": prev, "step": prev_step},
                )
            )
            stable_of[s] = name
            prev, prev_step = name, s
        for T, s in zip(lengths, starts, strict=True):
            cfg = _experiment(b0, m, steps=T, batch=batch, lr=lr, warmup=warmup, schedule="wsd")
            c = fpt * T * batch * L
            runs.append(
                PlannedRun(
                    name=f"{group}/wsd-branch-{_size_tag(m)}-T{T}",
                    kind="wsd_branch",
                    config=cfg.to_dict(),
                    group=group,
                    budget=float(c),
                    parent={"run": stable_of[s], "step": s},
                )
            )
    return resolve(runs)


def distinct_runs(runs: Sequence[PlannedRun]) -> list[PlannedRun]:
    """The runs to train and to count compute for: a run whose id equals an earlier run's (the same
    experiment, so the same run directory) is dropped, and a child of a dropped run is linked to the one
    kept. Why: a plan may hold one experiment under two roles -- e.g. cpu-tiny's ``-lrx1`` LR-sweep run and
    the middle isoFLOP size of that budget when the LR rule is the prior (stage 1 not trained yet, or
    failed), or a WSD chain planned twice -- and training both would put two workers into one directory at
    once and count that compute twice. Both names still read the one result. Ids include a run's lineage
    (``branch_id``), so only whole identical chains collapse."""
    kept: dict[str, str] = {}  # run id -> name of the run trained for it
    alias: dict[str, str] = {}  # dropped name -> kept name
    out = []
    for r in runs:
        if r.run_id in kept:
            alias[r.name] = kept[r.run_id]
            continue
        kept[r.run_id] = r.name
        if r.parent is not None and r.parent["run"] in alias:
            r = dataclasses.replace(r, parent={**r.parent, "run": alias[r.parent["run"]]})
        out.append(r)
    return out


@dataclass(frozen=True)
class PlanSummary:
    n_runs: int
    predicted_flops: float  # without reuse: each run from scratch (a branch with its prefix; no stable runs)
    study_flops: float  # compute actually spent: shared WSD prefixes counted once
    by_kind: dict[str, int] = field(default_factory=dict)


def summarize(runs: Sequence[PlannedRun]) -> PlanSummary:
    """Counts by kind over the plan; compute over its distinct runs (:func:`distinct_runs`), with the WSD
    stable runs left out of ``predicted_flops`` (they exist only to be reused: without reuse each branch is
    a run from scratch), as the report's ``flops_if_no_reuse``."""
    kinds: dict[str, int] = {}
    for r in runs:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    distinct = distinct_runs(runs)
    return PlanSummary(
        len(runs),
        float(sum(r.predicted_flops for r in distinct if r.kind != "wsd_stable")),
        float(sum(r.incremental_flops for r in distinct)),
        kinds,
    )
