"""Experiment configuration: dataclasses, strict JSON round-trip, and typed ``--set a.b=value`` overrides.

An experiment is ``ExperimentConfig(model, optimizer, data, mesh, trainer, seed)``. ``model`` and
``optimizer`` are the library configs from ``models/`` and ``optim/``; the other three live here. Every leaf
has a type annotation and overrides are checked against it, so a typo (``trainer.step=10``) or a wrong type
(``trainer.steps=ten``) is an error naming the valid fields instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from experiments.synthetic import MarkovSourceConfig
from models.config import ModelConfig
from optim.config import OptimizerConfig


class ConfigError(ValueError):
    """A bad configuration or override; the message says which field and what is allowed."""


# The ONE logical-axis rules table (MaxText style): logical array axis -> mesh axes. Model code only names
# logical axes; this table decides how they are laid out. Rules are applied in order and a mesh axis is used
# at most once per array (flax semantics), so for activations ("batch", "seq", "embed") the batch rule claims
# "fsdp" first and "embed" falls back to unsharded, while for parameters "embed" is FSDP-sharded.
# Expert parallelism: "expert" comes before "embed", so MoE expert stacks (expert, embed, mlp) are split by
# expert over "fsdp" (each device holds whole experts; "embed" stays unsharded in them) and "mlp" over tensor.
# "muon_layers" names no parameter: it is the layers axis of Muon's orthogonalisation, split over every
# device so each computes its share of whole per-layer matrices (optim/muon_layout.py; drop the row to let
# XLA choose). First, so that it claims the mesh before "expert" in MoE expert stacks.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("muon_layers", ("data", "fsdp")),
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    # MLA's low-rank axes: the up-projections (q_lora / kv_lora, heads, head_dim) have no embed axis, so
    # without these rows FSDP left them (and their optimiser state) replicated; q_down / kv_down keep fsdp
    # on embed, which claims it first.
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)

MESH_AXES = ("data", "fsdp", "tensor")
# Every logical axis name the models give parameters and activations (the table's names): a rule naming
# another (a typo such as "embd") would match nothing and silently leave every parameter without its FSDP
# sharding. tests/test_sharding.py checks this list.
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_AXIS_RULES)


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched.

    ``path`` is a directory written by ``python -m experiments.data prepare`` or the word ``"synthetic"``:
    then the seeded Markov corpus described by ``synthetic`` (whose exact entropy rate becomes the loss floor)
    is generated into ``synthetic_dir`` (default ``WORKDIR/data``) on first use and reused afterwards.
    ``stream`` (synthetic data only) samples every training window fresh from the source instead of from the
    train split (``experiments.stream``), so a run of any length never repeats a token; the val split is still
    the prepared file.
    """

    path: str = "synthetic"
    synthetic: MarkovSourceConfig = field(default_factory=MarkovSourceConfig)
    synthetic_dir: str | None = None
    n_train_tokens: int = 2_000_000
    n_val_tokens: int = 100_000
    seq_len: int = 128
    batch_size: int = 32  # global batch, in sequences per optimiser step (all microbatches together)
    stream: bool = False


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (one may be -1 = all remaining devices) and the logical-axis rules table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = LOGICAL_AXIS_RULES


@dataclass(frozen=True)
class TrainerConfig:
    """Training loop settings. Exactly one of ``steps`` / ``tokens`` sets the run length."""

    steps: int | None = None
    tokens: int | None = None  # rounded up to whole steps of batch_size * seq_len tokens
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many sequential chunks
    eval_every: int = 0  # 0 -> evaluate only at the end
    eval_steps: int = 4  # validation batches per evaluation (always the same batches)
    eval_batch_size: int | None = None  # None -> batch_size // microbatches
    log_every: int = 10
    checkpoint_every: int = 0  # 0 -> checkpoint only at the end
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None = unknown (no MFU reported)
    progress: bool = True
    # Fetch step s's metrics after dispatching step s+1: no host sync between steps (trainer.async_metrics).
    # None = on for GPUs/TPUs, off on CPUs. Same results either way (tests/test_trainer.py).
    async_metrics: bool | None = None
    # Downstream battery (experiments.evaluate) at the end of training -> WORKDIR/downstream.json:
    # False = off, True = the default battery, or a list of task names from experiments.tasks.default_specs.
    eval_tasks: bool | tuple[str, ...] = False
    # Cross-entropy in chunks of this many tokens (models/loss.py): never materialises fp32 logits for the
    # whole microbatch, which at a 50k vocabulary are bigger than the model. 0 = plain full-logits loss.
    loss_chunk_tokens: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0

    # ----- derived quantities -------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        t = self.trainer
        if t.steps is not None:
            return t.steps
        assert t.tokens is not None, "validate() first"
        return math.ceil(t.tokens / self.tokens_per_step)

    @property
    def eval_batch_size(self) -> int:
        t = self.trainer
        return t.eval_batch_size if t.eval_batch_size is not None else self.data.batch_size // t.microbatches

    # ----- validation ---------------------------------------------------------------------------------------
    def validate(self) -> ExperimentConfig:
        """Raise ConfigError listing every problem; return self."""
        errors: list[str] = [f"{path}={v!r} must be finite" for path, v in _non_finite(self)]
        if self.seed < 0:
            errors.append(f"seed={self.seed} must be >= 0")
        valid = {}
        for name, sub in (("model", self.model), ("optimizer", self.optimizer)):
            try:
                sub.validate()
                valid[name] = True
            except ValueError as e:
                errors.append(f"{name}: {e}")
                valid[name] = False
        try:
            self.data.synthetic.validate()
        except ValueError as e:
            errors.append(f"data.synthetic: {e}")
        d, t, m = self.data, self.trainer, self.mesh
        for name in ("n_train_tokens", "n_val_tokens", "seq_len", "batch_size"):
            if getattr(d, name) < 1:
                errors.append(f"data.{name}={getattr(d, name)} must be >= 1")
        if d.path == "synthetic":  # known now, so not found only when the trained run is first evaluated
            for name in ("n_train_tokens", "n_val_tokens"):
                if 1 <= getattr(d, name) < d.seq_len + 1:
                    errors.append(f"data.{name}={getattr(d, name)} is shorter than one window "
                                  f"(data.seq_len + 1 = {d.seq_len + 1} tokens)")
        if d.seq_len > self.model.max_seq_len:
            errors.append(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if d.path == "synthetic" and d.synthetic.vocab_size > self.model.vocab_size:
            errors.append(
                f"data.synthetic.vocab_size={d.synthetic.vocab_size} exceeds model.vocab_size="
                f"{self.model.vocab_size}"
            )
        if (t.steps is None) == (t.tokens is None):
            errors.append(
                f"set exactly one of trainer.steps / trainer.tokens (got steps={t.steps}, tokens={t.tokens})"
            )
        for name in ("steps", "tokens"):
            v = getattr(t, name)
            if v is not None and v < 1:
                errors.append(f"trainer.{name}={v} must be >= 1")
        # not `(t.steps or t.tokens) >= 1`: steps=0 made that `None >= 1`, a TypeError
        length = t.steps if t.steps is not None else t.tokens
        length_ok = (t.steps is None) != (t.tokens is None) and length >= 1
        if (
            length_ok
            and d.batch_size >= 1
            and d.seq_len >= 1
            and isinstance(self.optimizer.warmup_steps, int)
        ):
            total = self.total_steps
            if self.optimizer.warmup_steps > total:
                errors.append(
                    f"optimizer.warmup_steps={self.optimizer.warmup_steps} exceeds the run length "
                    f"({total} steps)"
                )
            elif valid["optimizer"]:  # a bad optimizer field is reported once, above
                # the schedule's own checks: a WSD cool-down inside warmup, or too short to decay
                from optim.schedules import schedule_params

                try:
                    schedule_params(self.optimizer, total)
                except ValueError as e:
                    errors.append(f"optimizer: {e}")
        if t.microbatches < 1 or d.batch_size % t.microbatches:
            errors.append(
                f"trainer.microbatches={t.microbatches} must be >= 1 and divide "
                f"data.batch_size={d.batch_size}"
            )
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(t, name) < 0:
                errors.append(f"trainer.{name}={getattr(t, name)} must be >= 0")
        if t.log_every == 0:
            errors.append("trainer.log_every must be >= 1")
        if t.eval_steps < 1:
            errors.append(f"trainer.eval_steps={t.eval_steps} must be >= 1")
        if t.eval_batch_size is not None and t.eval_batch_size < 1:
            errors.append(f"trainer.eval_batch_size={t.eval_batch_size} must be >= 1")
        if t.keep_checkpoints < 1:
            errors.append(f"trainer.keep_checkpoints={t.keep_checkpoints} must be >= 1")
        if isinstance(t.eval_tasks, tuple):  # checked now, not after the run has trained
            from experiments.tasks import default_specs

            known = [s.name for s in default_specs()]
            unknown = [n for n in t.eval_tasks if n not in known]
            if unknown:
                errors.append(f"trainer.eval_tasks: unknown task(s) {unknown}; available: {known}")
        if t.loss_chunk_tokens < 0:
            errors.append(f"trainer.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0 = plain loss)")
        if t.peak_flops is not None and t.peak_flops <= 0:
            errors.append(f"trainer.peak_flops={t.peak_flops} must be positive or None")
        sizes = [m.data, m.fsdp, m.tensor]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            errors.append(
                f"mesh sizes (data={m.data}, fsdp={m.fsdp}, tensor={m.tensor}) must be positive, "
                "with at most one -1 (= fill with the remaining devices)"
            )
        for rule in m.rules:
            axes = (rule[1],) if isinstance(rule[1], str) else (rule[1] or ())
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                errors.append(f"mesh.rules entry {rule!r} names unknown mesh axes {bad}; valid: {MESH_AXES}")
            if len(set(axes)) < len(axes):
                errors.append(f"mesh.rules entry {rule!r} names a mesh axis twice")
            if rule[0] not in LOGICAL_AXES:
                errors.append(f"mesh.rules entry {rule!r}: unknown logical axis {rule[0]!r}; the models "
                              f"use {LOGICAL_AXES}")
        if errors:
            raise ConfigError("invalid experiment config:\n  - " + "\n  - ".join(errors))
        return self

    # ----- (de)serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Strict inverse of ``to_dict``: unknown keys and wrongly typed values raise ConfigError."""
        return _build(cls, d, "")

    def override(self, assignments: list[str] | tuple[str, ...]) -> ExperimentConfig:
        """Apply ``["section.field=value", ...]`` (values parsed against the field's annotated type).

        ``trainer.steps`` and ``trainer.tokens`` are alternatives (exactly one is set): overriding one of them
        clears the other unless both are given: ``--set trainer.steps=10`` works on a token-budgeted preset.
        """
        cfg = self
        keys = set()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"override {a!r} must look like section.field=value")
            key, raw = a.split("=", 1)
            keys.add(key.strip())
            cfg = _set_path(cfg, key.strip().split("."), raw, key.strip())
        for given, other in (("trainer.steps", "tokens"), ("trainer.tokens", "steps")):
            if given in keys and f"trainer.{other}" not in keys and _get_path(cfg, given) is not None:
                cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **{other: None}))
        return cfg


def _get_path(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----- typed conversion -------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_list(cls: type) -> str:
    hints = _hints(cls)
    return ", ".join(f"{f.name}: {_type_name(hints[f.name])}" for f in dataclasses.fields(cls))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(v: Any, tp: Any, where: str) -> Any:
    """Convert a JSON-like value to ``tp`` or raise ConfigError. Ints are never silently truncated."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if tp is type(None):
        if v is None:
            return None
        raise ConfigError(f"{where}: expected None, got {v!r}")
    if _is_union(tp):
        for a in sorted(args, key=lambda a: a is not type(None)):  # try None first, then the rest in order
            try:
                return _coerce(v, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {v!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if v in args:
            return v
        raise ConfigError(f"{where}: {v!r} is not one of {args}")
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(f"{where}: expected a bool (true/false), got {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():  # allows 1e6 for step/token counts
            return int(v)
        raise ConfigError(f"{where}: expected an int, got {v!r}")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"{where}: expected a string, got {v!r}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(x, args[0], f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} entries, got {v!r}")
        return tuple(_coerce(x, a, f"{where}[{i}]") for i, (x, a) in enumerate(zip(v, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            return v
        if isinstance(v, dict):
            return _build(tp, v, where)
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {v!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown} in {where or cls.__name__}; valid fields: {_field_list(cls)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def _parse_raw(raw: str, tp: Any, where: str) -> Any:
    """Parse a command-line string against ``tp``: JSON first (numbers, lists, true/null), else the raw
    string."""
    candidates: list[Any] = []
    low = raw.strip().lower()
    if low in ("none", "null"):
        candidates.append(None)
    if low in ("true", "false"):
        candidates.append(low == "true")
    try:
        candidates.append(json.loads(raw))
    except json.JSONDecodeError:
        pass
    candidates.append(raw)
    last: ConfigError | None = None
    for c in candidates:
        try:
            return _coerce(c, tp, where)
        except ConfigError as e:
            last = e
    assert last is not None
    raise ConfigError(f"{where}={raw!r}: wrong type, expected {_type_name(tp)} ({last})")


def _set_path(obj: Any, path: list[str], raw: str, full: str) -> Any:
    cls = type(obj)
    names = [f.name for f in dataclasses.fields(cls)]
    head = path[0]
    if head not in names:
        raise ConfigError(
            f"unknown field {head!r} in override {full!r}; valid fields of {cls.__name__}: {_field_list(cls)}"
        )
    tp = _hints(cls)[head]
    if len(path) == 1:
        value = _parse_raw(raw, tp, full)
    else:
        sub = getattr(obj, head)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{full!r}: {head!r} is a {_type_name(tp)}, not a section with fields")
        value = _set_path(sub, path[1:], raw, full)
    return dataclasses.replace(obj, **{head: value})


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` outputs."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out


def _non_finite(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted field path, value) of every NaN or infinite float in a config tree: overrides are parsed as
    JSON, which accepts NaN and Infinity, and a check written ``v <= 0`` lets NaN through."""
    out: list[tuple[str, float]] = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out += _non_finite(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += _non_finite(v, f"{prefix}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        out.append((prefix, obj))
    return out
