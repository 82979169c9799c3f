"""GPU presets of the model families at the sizes of their seed papers (registered in experiments/presets.py).

* ``muon-mla-moe-{30m,60m,120m,200m}``: MLA + fine-grained MoE decoders trained with Muon, spanning the
  30M-200M range of Mehta et al. 2025, "Muon: Training and Trade-offs with Latent Attention and MoE"
  (arXiv:2509.24406). The AdamW counterpart of each is ``--set optimizer.name=adamw``.
* ``smollm-{135m,360m}`` and ``mor-{135m,360m}-r{2,3,4}``: the vanilla SmolLM baselines and
  Mixture-of-Recursions models of Bae et al. 2025 (arXiv:2507.10524), with the official pretraining recipe.

Like ``gpt2-124m`` they default to the synthetic corpus (1024 tokens, so they run anywhere); point
``data.path`` at a prepared dataset (``python -m experiments.data prepare``) for real text: GPT-2 BPE for the
Muon presets, the SmolLM tokenizer (49152 tokens) on FineWeb-Edu for the MoR/SmolLM ones. Microbatch sizes are
set from analytic activation-memory estimates for one 80 GB GPU (not measured: raise
``trainer.microbatches`` if a run does not fit).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from experiments.config import DataConfig, ExperimentConfig, TrainerConfig
from experiments.synthetic import MarkovSourceConfig
from models.accounting import flops_per_token
from models.config import ModelConfig
from optim.config import OptimizerConfig


def _synthetic_data(seq_len: int, batch_size: int) -> DataConfig:
    """The placeholder corpus of ``gpt2_124m`` (experiments/presets.py) at this sequence length / batch."""
    synthetic = MarkovSourceConfig(vocab_size=1024, order=2, successors=(16, 8))
    return DataConfig(seq_len=seq_len, batch_size=batch_size, n_train_tokens=50_000_000,
                      n_val_tokens=1_000_000, synthetic=synthetic)


def _trainer(**kw) -> TrainerConfig:
    return TrainerConfig(eval_every=1000, eval_steps=20, log_every=20, checkpoint_every=1000,
                         keep_checkpoints=3, loss_chunk_tokens=4096, **kw)


def _gpu_model(**kw) -> ModelConfig:
    return ModelConfig(param_dtype="float32", compute_dtype="bfloat16", attention_impl="cudnn", **kw)


# ----- Muon + MLA + MoE (Mehta et al. 2025) ---------------------------------------------------------------
# name -> (d_model, n_layers). The paper states its range (30M-200M parameters) but these shapes are ours,
# chosen so that the *total* parameter count (tied embeddings included) matches the name within 2%.
MUON_MLA_MOE_SIZES: dict[str, tuple[int, int]] = {"30m": (256, 5), "60m": (320, 8), "120m": (512, 7),
                                                   "200m": (640, 8)}
MUON_TOKENS_PER_PARAM = 20  # Chinchilla's budget (Hoffmann et al. 2022), per total parameter


def muon_mla_moe(size: str) -> ExperimentConfig:
    """MLA + fine-grained MoE decoder of Mehta et al. 2025 (arXiv:2509.24406), trained with Muon.

    Reproduced: the architecture family the paper studies -- DeepSeek-V2 multi-head latent attention with the
    joint KV latent at half the model width (r = d/2) and fine-grained MoE with 2 always-on shared experts
    plus 62 routed experts, top-6, balanced without an auxiliary loss (the setting of the same authors'
    MoE-MLA-RoPE paper, arXiv:2508.01261, which the Muon paper builds on) -- and Muon (Newton-Schulz,
    momentum 0.95, 5 steps) on the hidden matrices with AdamW on embeddings, norms and routers
    (optim/partition.py). Routing follows DeepSeek-V3: sigmoid scores, renormalised top-k gates, bias update
    rate 1e-3. AdamW counterpart: ``--set optimizer.name=adamw`` (Muon's updates are scaled to AdamW's RMS,
    ``muon_consistent_rms=0.2``, Liu et al. 2025, so both share this learning rate and weight decay).

    Differs: the per-size widths/depths, expert width (d_model/4), data (GPT-2 BPE; the synthetic placeholder
    by default), batch (256 x 1024 tokens), token budget (20 tokens per total parameter) and learning rate
    are ours -- we could not find the paper's per-size tables, so these are approximations of its range.
    """
    d_model, n_layers = MUON_MLA_MOE_SIZES[size]
    model = _gpu_model(
        family="moe", attention="mla", vocab_size=50304, d_model=d_model, n_layers=n_layers,
        n_heads=d_model // 64, max_seq_len=1024, tie_embeddings=True, remat="none",
        mla_kv_lora_rank=d_model // 2, n_experts=62, n_shared_experts=2, moe_top_k=6, moe_d_ff=d_model // 4,
        moe_router="sigmoid", moe_renormalize=True, moe_aux_loss_weight=0.0, moe_bias_update_rate=1e-3,
    )
    data = _synthetic_data(seq_len=1024, batch_size=256)
    tokens = MUON_TOKENS_PER_PARAM * model.param_counts()["total"]
    steps = math.ceil(tokens / (data.batch_size * data.seq_len))
    return ExperimentConfig(
        model=model,
        optimizer=OptimizerConfig(name="muon", learning_rate=1e-3, weight_decay=0.1,
                                  warmup_steps=max(1, steps // 50), ns_dtype="bfloat16"),
        data=data,
        trainer=_trainer(tokens=tokens, microbatches=8),
    )


# ----- Mixture-of-Recursions (Bae et al. 2025) -------------------------------------------------------------
# SmolLM shapes (HuggingFaceTB/SmolLM-135M / -360M configs: LLaMA blocks, GQA, tied embeddings, 49152 vocab).
SMOLLM_SHAPES: dict[str, dict[str, int]] = {
    "135m": dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536),
    "360m": dict(d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560),
}
MOR_RECURSIONS = (2, 3, 4)
# Optimiser steps of the official 360M pretraining configs (raymin0223/mixture_of_recursions,
# conf/pretrain/250720_pretrain_smollm-360m_{vanilla,recN_middle_cycle_..._mor_expert_...}.yaml): 1024 x 2048
# tokens per step; the MoR runs get more steps so that every model spends the vanilla model's training FLOPs.
OFFICIAL_360M_STEPS: dict[int | None, int] = {None: 9438, 2: 12619, 3: 14161, 4: 14216}
SEQ_LEN, BATCH = 2048, 1024


def smollm_model(size: str) -> ModelConfig:
    """The vanilla SmolLM model (a dense LLaMA-style decoder) of the given size, bf16 / cuDNN attention."""
    return _gpu_model(vocab_size=49152, max_seq_len=SEQ_LEN, tie_embeddings=True, norm_eps=1e-5,
                      remat="none", **SMOLLM_SHAPES[size])


def mor_model(size: str, recursions: int) -> ModelConfig:
    """MoR on the SmolLM shape: Middle-Cycle sharing (unique first and last layer, a block of
    ceil((N_L - 2) / N_r) shared layers applied N_r times), expert-choice routing with the paper's defaults
    (sigmoid router x 0.1, capacities (N_r - i) / N_r, BCE auxiliary loss 0.001), recursion-wise KV caching.

    ceil: when N_r does not divide N_L - 2 the official configs round the block up (SmolLM-360M at N_r = 4
    runs num_hidden_layers 34 = 2 + 4 x 8), so the full depth is at least the vanilla model's.
    """
    base = smollm_model(size)
    block = -(-(base.n_layers - 2) // recursions)
    return base.replace(family="mor", n_layers=2 + recursions * block, mor_recursions=recursions,
                        mor_sharing="middle_cycle", mor_router="expert_choice",
                        mor_kv_strategy="recursion_wise").validate()


def equal_flops_steps(model: ModelConfig, vanilla: ModelConfig, vanilla_steps: int) -> int:
    """Steps at which ``model`` spends the training FLOPs of ``vanilla`` trained for ``vanilla_steps`` (same
    batch): the paper's equal-compute comparison, with this repo's accounting (expected FLOPs per token under
    the capacity schedule for MoR, models/mor_accounting.py)."""
    ratio = flops_per_token(vanilla, SEQ_LEN)["training"] / flops_per_token(model, SEQ_LEN)["training"]
    return round(vanilla_steps * ratio)


def _mor_recipe(model: ModelConfig, steps: int, warmup: int) -> ExperimentConfig:
    microbatches = 64 if model.d_model < 960 else 128  # 16 / 8 sequences of 2048 tokens per microbatch
    return ExperimentConfig(
        model=model,
        optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, weight_decay=0.1, b1=0.9, b2=0.95,
                                  schedule="wsd", warmup_steps=warmup, decay_fraction=0.2,
                                  decay_shape="linear", min_lr_ratio=0.0, grad_clip_norm=1.0),
        data=_synthetic_data(seq_len=SEQ_LEN, batch_size=BATCH),
        trainer=_trainer(steps=steps, microbatches=microbatches),
    )


def smollm(size: str) -> ExperimentConfig:
    """Vanilla Transformer baseline of Bae et al. 2025 (arXiv:2507.10524): SmolLM-{135M,360M} (134.5M /
    361.8M parameters) with the official MoR pretraining recipe -- 1024 x 2048-token batches, AdamW (lr 3e-3,
    betas 0.9/0.95, weight decay 0.1, clip 1.0), warmup-stable-decay with a linear decay over the last 20%,
    bf16. 360M: the official 9438 steps (19.8B tokens) and 57 warmup steps; 135M: the same steps (the
    official repository ships no 135M config, so its budget is our choice)."""
    return _mor_recipe(smollm_model(size), OFFICIAL_360M_STEPS[None], 57)


def mor(size: str, recursions: int) -> ExperimentConfig:
    """Mixture-of-Recursions of Bae et al. 2025 (arXiv:2507.10524) at the paper's SmolLM scales.

    Reproduced: SmolLM-135M/360M shapes and vocabulary, Middle-Cycle sharing (the paper's default),
    expert-choice routing with its official defaults (linear router, sigmoid x 0.1, capacity (N_r - i)/N_r,
    BCE auxiliary loss 0.001), recursion-wise KV caching, and the official pretraining recipe (see ``smollm``)
    with 86 warmup steps. 360M: the official step counts (N_r = 2, 3, 4: 12619 / 14161 / 14216), i.e. the
    vanilla model's training FLOPs. Unique non-embedding parameters at 360M are 167M / 118M / 98M for
    N_r = 2 / 3 / 4 against 315M for the vanilla model, the paper's numbers.

    Differs: 135M budgets are derived, not copied: the steps at which the MoR model spends the vanilla
    135M model's FLOPs (``equal_flops_steps``; at 360M this derivation lands within 2.5% of the official
    counts, tests/test_presets_families.py). N_r = 3 at 135M uses 2 + 3 x 10 = 32 layer applications (N_L - 2
    = 28 is not a multiple of 3; rounded up as the official 360M/N_r = 4 config does). The router's top-k over
    a training sequence is non-causal; decoding uses the router's own sigmoid >= 0.5 decision (models/mor.py).
    Data: the synthetic placeholder unless ``data.path`` points at a SmolLM-tokenised FineWeb-Edu dataset.
    """
    model = mor_model(size, recursions)
    if size == "360m":
        steps = OFFICIAL_360M_STEPS[recursions]
    else:
        steps = equal_flops_steps(model, smollm_model(size), OFFICIAL_360M_STEPS[None])
    return _mor_recipe(model, steps, 86)


FAMILY_PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    **{f"muon-mla-moe-{s}": functools.partial(muon_mla_moe, s) for s in MUON_MLA_MOE_SIZES},
    **{f"smollm-{s}": functools.partial(smollm, s) for s in SMOLLM_SHAPES},
    **{f"mor-{s}-r{r}": functools.partial(mor, s, r) for s in SMOLLM_SHAPES for r in MOR_RECURSIONS},
}
