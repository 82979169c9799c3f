"""Scaling-study presets (``python -m experiments.study --preset NAME``): what to sweep and how.

* ``cpu-tiny``: the README's first command. Dense AdamW on the synthetic order-2 Markov corpus (exact entropy
  rate known): 3 budgets x 5 sizes isoFLOP, a held-out run at 3x the largest budget, a small LR sweep at the
  two smallest budgets (fitted LR rule used everywhere), and a WSD-branch sweep of 3 sizes for the
  compute-reuse comparison. About 7 minutes on 2 CPU cores (measured: README).
* ``cpu-micro``: the same pipeline at toy size (2 budgets x 3 sizes, no WSD / LR sweep) for tests.
* ``cpu-families``: dense vs MoE vs MoR (AdamW) and dense Muon vs AdamW at matched budgets: per-group laws,
  Muon's compute multiplier at a target loss, the cross-family Pareto frontier.
* ``gpu-quick`` / ``gpu-full``: real sweeps for one H100 (meant to take < 8 min; not yet run on a GPU) and
  for a cluster. ``--dry`` rehearses either on the CPU (experiments/rehearsal.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from experiments.config import ConfigError, DataConfig, ExperimentConfig, MeshConfig, TrainerConfig
from experiments.hparam_rules import BatchRule, LRRule
from experiments.sweep import ShapeRule
from experiments.synthetic import MarkovSourceConfig
from models.config import ModelConfig
from optim.config import OptimizerConfig


@dataclass(frozen=True)
class GroupSpec:
    """One model family x optimiser: its base config, shape rule and LR rule (or LR sweep)."""

    name: str
    base: ExperimentConfig
    lr: LRRule
    shape: ShapeRule = ShapeRule()
    lr_sweep_factors: tuple[float, ...] = ()  # () = no LR sweep; else multiples of the rule's lr to try
    lr_sweep_budgets: int = 2  # the LR sweep uses the middle size of this many smallest budgets
    lr_rule_form: str = "C"  # "C" (DeepSeek LLM) or "ND" (StepLaw), see experiments/hparam_rules.py


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    groups: tuple[GroupSpec, ...]
    budgets: tuple[float, ...]
    sizes_per_budget: int
    heldout_budgets: tuple[float, ...]
    batch: BatchRule
    span: float = 16.0  # largest / smallest parameter count on one isoFLOP curve
    tokens_per_param: float = 10.0  # where each curve is centred (a guess; the fits find the optimum)
    warmup_fraction: float = 0.1
    wsd_sizes: int = 0  # 0 = no WSD sweep; else that many sizes (from the middle budget's curve)
    wsd_decay_fraction: float = 0.2
    wsd_span: float = 4.0  # largest / smallest WSD size, around the middle budget's curve centre
    n_bootstrap: int = 200
    downstream: bool = True
    workers: int | None = None  # None -> auto (min(cores, devices, 2) on CPU)
    target_loss: float | None = None  # for compute multipliers between groups (None -> auto)
    extrapolate: tuple[float, ...] = (10.0, 100.0)  # report N*, D*, L* at these multiples of max budget
    # Run-to-run noise: the isoFLOP and held-out runs at ``replicate_budgets`` are repeated with each of these
    # seeds (not fitted); the report compares their spread with the fit residuals and the held-out errors.
    replicate_seeds: tuple[int, ...] = ()
    replicate_budgets: tuple[float, ...] = ()
    # ... and at these budgets only the middle size of each group's curve: noise shrinks with budget, so a
    # comparison at a large budget needs that budget's noise, which one run per curve measures at a tenth of
    # the cost of replicating them all.
    replicate_middle_budgets: tuple[float, ...] = ()
    # Law forms compared by a rolling-origin backtest (scaling.backtest): each is fitted on the smaller
    # budgets and scored on the next one, the held-out budgets included; () turns the comparison off.
    law_forms: tuple[str, ...] = ("chinchilla", "kaplan", "farseer")
    # After training, an isoFLOP curve whose lowest loss is its smallest (largest) size gets one more size
    # beyond that edge, up to this many per curve (study.plan_edge_extensions): N* must be bracketed.
    extend_edges: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def _cpu_base(optimizer: str = "adamw", family: str = "dense", **model_kw) -> ExperimentConfig:
    """The synthetic-corpus CPU base (as the ``tiny`` training preset: 64-token order-2 Markov source)."""
    return ExperimentConfig(
        model=ModelConfig(
            family=family, vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **model_kw
        ),
        optimizer=OptimizerConfig(name=optimizer, learning_rate=3e-3, weight_decay=0.0, warmup_steps=10),
        data=DataConfig(
            seq_len=64,
            batch_size=16,
            # 8M tokens (0.7 s to generate): the longest cpu-tiny / cpu-families runs read 4.3M / 6.9M
            # tokens; with the 1M corpus these presets had, 19/46 and 42/96 runs repeated data (up to 6.9
            # epochs) while the fits read their tokens as unique
            n_train_tokens=8_000_000,
            n_val_tokens=32_768,
            synthetic=MarkovSourceConfig(vocab_size=64),
        ),
        mesh=MeshConfig(data=1),
        trainer=TrainerConfig(
            steps=100,
            eval_every=0,
            # 31 x 16 windows: 31.7k of the 32k val tokens, the same for every run (the planner keeps this
            # eval batch whatever batch a run trains with); eval noise ~0.01 nats, below run-to-run spread
            eval_steps=31,
            eval_batch_size=16,
            log_every=50,
            checkpoint_every=0,
            async_checkpoint=False,
            progress=False,
        ),
        seed=0,
    )


# head_dim 8 and a wide aspect band give a fine ladder of small shapes (d = 8, 16, 24, ..., 1-3 layers); with
# head_dim 16 the smallest budgets had only 2-3 candidates below their optimum, so curves were one-sided.
_CPU_SHAPES = ShapeRule(head_dim=8, aspect_ratio=32.0, aspect_tolerance=4.0, max_layers=6, max_d_model=256)
# AdamW lr 1e-2 at C = 1e11 FLOPs (the first cpu-tiny lr sweep was flat over 1e-2..4e-2), falling as
# C^-0.125 (DeepSeek LLM's exponent; the sweep's 2 cells, 3x apart in C, refit only the coefficient).
_CPU_LR = LRRule(coef=1e-2 * 1e11**0.125, c_exp=-0.125)
# 16 sequences of 64 tokens at 1e11 FLOPs, growing as C^0.33 (DeepSeek LLM's batch exponent).
_CPU_BATCH = BatchRule(coef=16 * 64 / 1e11**0.33, exp=0.33, min_batch=4, max_batch=64, min_steps=50)


def cpu_tiny() -> StudySpec:
    return StudySpec(
        name="cpu-tiny",
        description="dense AdamW isoFLOP study on the synthetic Markov corpus (2 CPU cores, ~7 min)",
        groups=(
            GroupSpec(
                "dense-adamw", _cpu_base(), _CPU_LR, _CPU_SHAPES, lr_sweep_factors=(0.5, 1.0, 2.0, 4.0)
            ),
        ),
        budgets=(3e10, 1e11, 3e11),
        sizes_per_budget=5,
        heldout_budgets=(1e12,),
        batch=_CPU_BATCH,
        span=10.0,
        # Measured (study with 10): on this corpus the loss-optimal D/N is ~40-110 at these budgets, so
        # curves centred at 10 put the optimum at their low-N edge (Approach 2 rejected every budget).
        tokens_per_param=64.0,
        wsd_sizes=3,  # 3 sizes x 3 cool-downs = 9 points: the fewest that identify the 5-parameter law
        wsd_span=2.5,  # sizes near the optimum (wider, the largest sits in the slow early phase at small D)
        n_bootstrap=200,
        # the smallest budget's 5 runs and the held-out run twice more: noise at both ends of the sweep
        replicate_seeds=(1, 2),
        replicate_budgets=(3e10, 1e12),
        extend_edges=1,  # no curve of this sweep has an edge minimum (measured), so no run is added
    )


def cpu_micro() -> StudySpec:
    """Toy size for tests: seconds per run, the whole pipeline (no WSD, no LR sweep, few bootstraps)."""
    base = _cpu_base()
    base = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, n_train_tokens=100_000, n_val_tokens=8192),
        trainer=dataclasses.replace(base.trainer, eval_steps=1),
    )
    return StudySpec(
        name="cpu-micro",
        description="toy pipeline check",
        groups=(
            GroupSpec(
                "dense-adamw",
                base,
                LRRule(3e-3),
                ShapeRule(head_dim=16, aspect_ratio=32.0, max_layers=2, max_d_model=64),
            ),
        ),
        budgets=(2e9, 6e9),
        sizes_per_budget=3,
        heldout_budgets=(1.5e10,),
        batch=BatchRule(coef=8 * 64, min_batch=4, max_batch=8, min_steps=20),
        span=6.0,
        n_bootstrap=20,
        downstream=False,
    )


def cpu_families() -> StudySpec:
    """Dense / MoE / MoR with AdamW and dense Muon at matched budgets (3 budgets x 4 sizes each). AdamW and
    Muon each get an lr sweep at the smallest budget (their optima differ; Muon's update is RMS-matched to
    AdamW's, optim/muon.py); MoE and MoR use the dense AdamW prior rule (an untuned-lr caveat the report
    carries in its notes). No held-out runs: the point is the comparison between groups."""
    sweep = dict(lr_sweep_factors=(0.5, 1.0, 2.0, 4.0), lr_sweep_budgets=1)
    groups = (
        GroupSpec("dense-adamw", _cpu_base(), _CPU_LR, _CPU_SHAPES, **sweep),
        GroupSpec("dense-muon", _cpu_base("muon"), _CPU_LR, _CPU_SHAPES, **sweep),
        GroupSpec(
            "moe-adamw", _cpu_base(family="moe", n_experts=4, moe_top_k=1), _CPU_LR, _CPU_SHAPES
        ),
        GroupSpec(
            "mor-adamw",
            _cpu_base(family="mor", mor_recursions=2, mor_sharing="cycle"),
            _CPU_LR,
            _CPU_SHAPES,
        ),
    )
    return StudySpec(
        name="cpu-families",
        description="dense vs MoE vs MoR (AdamW) and Muon vs AdamW (dense) at matched budgets",
        groups=groups,
        budgets=(3e10, 1e11, 3e11),
        sizes_per_budget=4,
        heldout_budgets=(),
        batch=_CPU_BATCH,
        span=8.0,
        tokens_per_param=64.0,
        n_bootstrap=100,
        notes=("moe-adamw and mor-adamw use the dense AdamW lr rule (not swept)",),
        replicate_seeds=(1, 2),  # every group's smallest-budget runs: the noise behind the multipliers
        replicate_budgets=(3e10,),
        replicate_middle_budgets=(1e11, 3e11),  # and each larger budget's noise, for the matched-budget gaps
        # MoR's smallest budget has its lowest loss at its smallest size, but its shape rule has no smaller
        # one: the study says so and Approach 2 drops that budget
        extend_edges=1,
    )


def _gpu_base(optimizer: str = "adamw") -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(
            vocab_size=1024,
            d_model=256,
            n_layers=4,
            n_heads=4,
            max_seq_len=512,
            compute_dtype="bfloat16",
            attention_impl="cudnn",
        ),
        # Muon orthogonalises in bf16 on the GPU (optim.muon_lowp); AdamW has no such choice
        optimizer=OptimizerConfig(name=optimizer, learning_rate=2e-3, weight_decay=0.1, warmup_steps=100,
                                  ns_dtype="bfloat16" if optimizer == "muon" else "float32"),
        data=DataConfig(
            seq_len=512,
            batch_size=64,
            n_train_tokens=200_000_000,
            n_val_tokens=1_000_000,
            synthetic=MarkovSourceConfig(vocab_size=1024, order=2, successors=(16, 8)),
        ),
        mesh=MeshConfig(data=-1),
        trainer=TrainerConfig(
            steps=100,
            eval_every=0,
            eval_steps=8,
            eval_batch_size=64,  # 8 x 64 windows (262k tokens) for every run, whatever its batch
            log_every=100,
            checkpoint_every=1000,
            async_checkpoint=True,
            progress=False,
        ),
    )


_GPU_SHAPES = ShapeRule(head_dim=64, aspect_ratio=64.0, aspect_tolerance=2.0, max_layers=24, max_d_model=2048)


def gpu_quick() -> StudySpec:
    """Sized for one H100 in under 8 minutes but never measured on one (no GPU has been lent yet): 19 runs,
    9.7e15 FLOPs, ~42k optimiser steps, 10 model shapes. Its budgets were 3x larger until a review of the
    plan counted ~75k steps, 14 shapes to compile and 3.4e16 FLOPs, likely over 8 minutes. On a fixed budget
    run it with ``--train-limit-s`` (experiments/gpu_session.sh): the report comes back even if training
    runs long."""
    base = _gpu_base()
    # 50M tokens: runs sample random windows (the largest reads 2.0e8 tokens, 4 epochs, from a Markov source
    # that no model here can memorise; the report notes the repetition), and a smaller corpus takes less of
    # the 8 minutes to generate (2e8 tokens: ~75 s on the 2-core CPU machine, measured at 20M in 7.2 s).
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, n_train_tokens=50_000_000))
    return StudySpec(
        name="gpu-quick",
        description="dense AdamW isoFLOP sweep for one H100 (< 8 min)",
        groups=(GroupSpec("dense-adamw", base, LRRule(coef=0.3118, c_exp=-0.125), _GPU_SHAPES),),
        budgets=(1e14, 3e14, 1e15),
        sizes_per_budget=4,
        heldout_budgets=(3e15,),
        batch=BatchRule(coef=0.292, exp=0.3271, min_batch=32, max_batch=512, min_steps=200),
        tokens_per_param=20.0,
        wsd_sizes=1,
        workers=1,
        extend_edges=0,  # a second training phase would risk the 8-minute target; the report flags edges
    )


def _streamed(base: ExperimentConfig) -> ExperimentConfig:
    """``base`` training on windows sampled fresh from the source (data.stream): gpu-full's largest runs read
    3.5e10 tokens, which a prepared corpus would repeat (a 200M-token one up to 173 times, 160 of the 174
    runs more than once) or take hours to write. The train split that remains on disk is not read."""
    data = dataclasses.replace(base.data, stream=True, n_train_tokens=1_000_000)
    return dataclasses.replace(base, data=data)


def gpu_full() -> StudySpec:
    return StudySpec(
        name="gpu-full",
        description="cluster sweep: dense AdamW and Muon, 5 budgets x 6 sizes, WSD reuse",
        groups=(
            GroupSpec(
                "dense-adamw",
                _streamed(_gpu_base()),
                LRRule(coef=0.3118, c_exp=-0.125),
                _GPU_SHAPES,
                lr_sweep_factors=(0.5, 1.0, 2.0),
            ),
            GroupSpec(
                "dense-muon",
                _streamed(_gpu_base("muon")),
                LRRule(coef=0.3118, c_exp=-0.125),
                _GPU_SHAPES,
                lr_sweep_factors=(0.5, 1.0, 2.0),
            ),
        ),
        budgets=(1e17, 3e17, 1e18, 3e18, 1e19),
        sizes_per_budget=6,
        heldout_budgets=(3e19,),
        batch=BatchRule(coef=0.292, exp=0.3271, min_batch=64, max_batch=4096, min_steps=500),
        tokens_per_param=20.0,
        wsd_sizes=3,
        n_bootstrap=1000,
        workers=1,
        # run-to-run noise per group: every run at the smallest budget (0.8% of the planned FLOPs) and the
        # middle size at each larger one (19% more: cpu-families' seed sd fell tenfold over its budgets, so a
        # comparison at a large budget needs that budget's noise). Adding the held-out budget's runs would
        # measure it where the prediction is checked, for about 29% more.
        replicate_seeds=(1, 2),
        replicate_budgets=(1e17,),
        replicate_middle_budgets=(3e17, 1e18, 3e18, 1e19),
        extend_edges=2,  # up to two sizes beyond a curve's edge: N* must be bracketed for Approach 2
        notes=(
            "training windows are sampled fresh from the synthetic source (data.stream): no run repeats a "
            "token, up to the 3.5e10 tokens of the largest",
        ),
    )


STUDY_PRESETS: dict[str, Callable[[], StudySpec]] = {
    "cpu-tiny": cpu_tiny,
    "cpu-micro": cpu_micro,
    "cpu-families": cpu_families,
    "gpu-quick": gpu_quick,
    "gpu-full": gpu_full,
}


def get_study_preset(name: str) -> StudySpec:
    if name not in STUDY_PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; available: {sorted(STUDY_PRESETS)}")
    return STUDY_PRESETS[name]()
