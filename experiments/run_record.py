"""A run directory's record: its file names, the config check that guards resuming, and summary.json.

Kept apart from the training loop (experiments/trainer.py) because it is pure bookkeeping: what a finished
run leaves behind and which config differences a resumed run may have. The sweep (run ids) and the
evaluator read the same names from here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from experiments.config import ConfigError, ExperimentConfig, config_diff
from experiments.data import TokenDataset
from experiments.files import write_text_atomic
from models import accounting, inference_mode
from models.config import ModelConfig, mor_resolved

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_SCHEMA_VERSION = 1
# How final_eval_loss is computed: the model's inference mode (models.inference_mode; experiments/trainer.py).
EVAL_MODE = "inference"

# Settings that change how a run executes but not what it computes: they may differ when resuming a workdir
# (e.g. a checkpoint written on 8 devices resumed on 1). Anything else differing is an error.
EXECUTION_ONLY_FIELDS = (
    "mesh.",
    "trainer.progress",
    "trainer.async_metrics",
    "trainer.async_checkpoint",
    "trainer.peak_flops",
    "trainer.keep_checkpoints",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.eval_every",
    "model.remat",
    "model.attention_impl",
    "data.synthetic_dir",
    "trainer.eval_tasks",
    "trainer.loss_chunk_tokens",  # chunked vs full-logits cross-entropy: the same loss (models/loss.py)
)


def has_progress(workdir: Path) -> bool:
    """Whether a run in ``workdir`` has anything a changed config would contradict: a summary, or anything
    in its checkpoint directory (a step being written included)."""
    ckpt = workdir / CHECKPOINT_DIR
    return (workdir / SUMMARY_FILE).exists() or (ckpt.is_dir() and any(ckpt.iterdir()))


def check_and_save_config(cfg: ExperimentConfig, workdir: Path) -> None:
    """Write WORKDIR/config.json; refuse to continue a workdir that was started with a different
    experiment. A workdir without progress (a run refused before its first checkpoint, e.g. for a dataset
    without a val split) takes the new config: there is nothing to contradict, and the fix should not need a
    new --workdir."""
    path = workdir / CONFIG_FILE
    new = cfg.to_dict()
    if path.exists() and has_progress(workdir):
        old = json.loads(path.read_text())
        diff = [
            k
            for k in config_diff(old, new)
            if not any(k == f or k.startswith(f) for f in EXECUTION_ONLY_FIELDS)
        ]
        if diff:
            details = "\n".join(f"  {k}: saved {_get(old, k)!r} != now {_get(new, k)!r}" for k in diff)
            raise ConfigError(
                f"{workdir} holds a run with a different config ({path}); use a new --workdir or "
                f"the same settings. Differences:\n{details}"
            )
    # A finished run keeps the config its summary.json records (execution-only fields may differ now: a
    # re-run with another checkpoint cadence must not make config.json and the summary disagree); the
    # trainer writes both together when it (re)writes a summary (save_config).
    if jax.process_index() == 0 and not (workdir / SUMMARY_FILE).exists():
        save_config(cfg, workdir)


def save_config(cfg: ExperimentConfig, workdir: Path) -> None:
    """Write WORKDIR/config.json (whole or not at all)."""
    write_text_atomic(workdir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<missing>"
        d = d[k]
    return d


def eval_tokens(cfg: ExperimentConfig, ds: TokenDataset) -> int:
    """Distinct validation tokens scored: ``eval_steps`` x ``eval_batch_size`` sequential windows of the val
    split, wrapping around it (experiments.data.sequential_batch). Runs compare on one validation set only
    when this and the windows agree: fix ``trainer.eval_batch_size`` across batch sizes (the study does)."""
    windows = ds.n_windows("val", cfg.data.seq_len)
    return min(cfg.trainer.eval_steps * cfg.eval_batch_size, windows) * cfg.data.seq_len


def build_summary(
    cfg: ExperimentConfig,
    ds: TokenDataset,
    *,
    final_loss: float,
    final_eval_loss: float,
    meta: dict[str, Any],
    n_devices: int,
) -> dict[str, Any]:
    c, L = cfg.model, cfg.data.seq_len
    counts = accounting.param_counts(c)
    steps = cfg.total_steps
    tokens = steps * cfg.tokens_per_step
    family = family_fields(c, L)
    fpt = family["active_flops_per_token"]  # = flops_per_token(c, L)["training"]: model FLOPs are active
    tps = meta["timed_tokens"] / meta["train_seconds"] if meta.get("train_seconds") else None
    peak = cfg.trainer.peak_flops
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "family": c.family,
        "optimizer": cfg.optimizer.name,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "embedding_params": counts["embedding"],
        "tokens": tokens,
        "flops_per_token": fpt,
        "flops": fpt * tokens,
        "kaplan_flops_per_token": accounting.kaplan_flops_per_token(c, L),
        "chinchilla_flops_per_token": accounting.chinchilla_flops_per_token(c),
        "steps": steps,
        "batch_size": cfg.data.batch_size,
        "seq_len": L,
        # Windows are drawn with replacement from the train split: above 1, tokens were repeated, and a law
        # fitted on "tokens" as D reads them as unique data (trainer.data_warnings, when training starts).
        # A streamed run (data.stream) reads no split and repeats nothing: None.
        "epochs": None if cfg.data.stream else tokens / ds.n_tokens("train"),
        "eval_tokens": eval_tokens(cfg, ds),
        "final_loss": final_loss,
        "final_eval_loss": final_eval_loss,
        "eval_mode": EVAL_MODE,
        "entropy_floor": ds.entropy_rate,
        "unigram_entropy": ds.unigram_entropy,
        "tokens_per_second": tps,
        "mfu": (fpt * tps / (peak * n_devices)) if (peak and tps) else None,
        "wall_seconds": meta.get("wall_seconds"),
        "compile_seconds": meta.get("compile_seconds"),
        "devices": n_devices,
        "seed": cfg.seed,
        **family,
        "config": cfg.to_dict(),
    }


def is_finite_loss(value: Any) -> bool:
    """Whether a summary's loss field is a usable number: an int or float (not a bool, which JSON would let
    through as 1.0), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eval_is_current(summary: dict[str, Any], model: ModelConfig | None = None) -> bool:
    """Whether ``summary``'s final_eval_loss is the inference-mode loss. Summaries written before validation
    used the inference mode carry no ``eval_mode``; that matters only where the modes differ (MoR expert
    choice, MoE capacity dispatch), and such a run is re-evaluated from its final checkpoint rather than
    mixed into a study with its leaky (MoR) or batch-dependent (MoE) training-mode loss. ``model``: the
    run's model config, read from the summary's own config when not given (only for such old summaries:
    the sweep checks every run's summary this way, and most carry ``eval_mode``)."""
    if summary.get("eval_mode") == EVAL_MODE:
        return True
    if model is None:
        model = ExperimentConfig.from_dict(summary["config"]).model
    inference_cfg, kwargs = inference_mode(model)
    return inference_cfg == model and not kwargs


def family_fields(c: Any, seq_len: int) -> dict[str, Any]:
    """summary.json's family fields: ``models.accounting.family_summary`` (active_params,
    active_flops_per_token, kv_cache_bytes_per_token, attention, MoE: experts, top_k, ...) plus, for MoR,
    recursions, sharing, router, kv_strategy, capacity and the expected depth; for MLA its latent sizes."""
    out = dict(accounting.family_summary(c, seq_len))
    if c.family == "mor":
        res = mor_resolved(c)
        flops = accounting.flops_per_token(c, seq_len)
        out.setdefault("recursions", c.mor_recursions)
        out.setdefault("sharing", c.mor_sharing)
        out.setdefault("router", c.mor_router)
        out.setdefault("kv_strategy", c.mor_kv_strategy)
        out.setdefault("capacity", list(res["capacity"]))
        out.setdefault("mor_aux_loss", res["aux_loss"])
        out.setdefault("expected_depth", flops["expected_depth"])
        out.setdefault("full_depth_flops_per_token", 3.0 * flops["full_depth_forward"])
    if c.attention == "mla":
        out.setdefault("kv_lora_rank", c.resolved_mla_kv_lora_rank)
        out.setdefault("q_lora_rank", c.mla_q_lora_rank)
        out.setdefault("rope_head_dim", c.resolved_mla_rope_head_dim)
    return out
