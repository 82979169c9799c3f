"""The training loop: one jitted, sharded train step with gradient accumulation, eval, metrics, checkpoints.

Structure:
- ``build_program(cfg, mesh)`` compiles everything device-side once: parameter/optimiser-state shardings
  from the logical-axis rules, the train step (ONE ``jax.jit`` with explicit in/out shardings and the state
  donated) and the eval step. The benchmark reuses it.
- ``train(cfg, workdir)`` runs it: data, automatic resume from the newest checkpoint, logging, NaN guard
  and summary.json (the run directory's file names, config check and summary live in
  experiments/run_record.py).

Exact resume: a batch is a pure function of (seed, step), the state (params + optimiser state, which holds the
step count) is checkpointed whole, and the train step is the same compiled program, so continuing from step k
recomputes bit-identical steps k+1..N. Metrics of the interrupted session after step k are dropped on resume.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

import optim
from experiments import sharding as shd
from experiments.checkpoint import Checkpointer, CheckpointError, abstract_like
from experiments.config import ConfigError, ExperimentConfig
from experiments.data import DataError, TokenDataset, prepare_synthetic
from experiments.files import read_json_object, write_text_atomic
from experiments.metrics import MetricsWriter, read_metrics
from experiments.run_record import (  # noqa: F401 -- re-exported: the run directory's names live there
    CHECKPOINT_DIR,
    CONFIG_FILE,
    EXECUTION_ONLY_FIELDS,
    SUMMARY_FILE,
    SUMMARY_SCHEMA_VERSION,
    build_summary,
    check_and_save_config,
    eval_is_current,
    family_fields,
    save_config,
)
from experiments.stream import SyntheticStream
from models import accounting, build_model, inference_mode
from models import moe as moe_lib
from models import mor as mor_lib
from models.loss import chunked_cross_entropy, output_head
from optim.schedules import schedule_from_params

UNREADABLE_CHECKPOINT_DIR = "checkpoints_unreadable"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the run stopped with its last good checkpoint intact."""


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in fp32 whatever the compute dtype."""
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return losses_BxL.mean()


def _aux_loss(extras: dict[str, Any]) -> jax.Array:
    # Families may return extra training losses (e.g. MoE load balancing) in `extras`; keys ending in "loss"
    # are added to the objective. Dense models return {}.
    return sum((v.astype(jnp.float32) for k, v in extras.items() if k.endswith("loss")), jnp.float32(0.0))


def update_model_state(c: Any, model_state: dict[str, Any], extras: dict[str, jax.Array]) -> dict[str, Any]:
    """Non-parameter model state after a step: the auxiliary-loss-free router biases (DeepSeek-V3; MoE's
    "moe_state", MoR token choice's "mor_state") move against this step's load. ``extras`` are the
    microbatch means, so the update is the same however the batch is accumulated or sharded."""
    new = dict(model_state)
    if moe_lib.STATE_COLLECTION in new:
        new[moe_lib.STATE_COLLECTION] = moe_lib.router_bias_update(
            new[moe_lib.STATE_COLLECTION], extras["moe_expert_load"], c.moe_bias_update_rate)
    if mor_lib.STATE_COLLECTION in new:
        new[mor_lib.STATE_COLLECTION] = mor_lib.router_bias_update(
            new[mor_lib.STATE_COLLECTION], extras["mor_depth_load"], c.mor_bias_update_rate)
    unknown = set(new) - {moe_lib.STATE_COLLECTION, mor_lib.STATE_COLLECTION}
    if unknown:
        raise ConfigError(f"model has state collections {sorted(unknown)} the trainer does not know how to "
                          "update; teach experiments.trainer.update_model_state about them")
    return new


@dataclass
class Program:
    """Everything device-side for one (config, mesh): model, optimiser, shardings, compiled steps."""

    cfg: ExperimentConfig
    mesh: Mesh
    rules: shd.Rules
    model: nn.Module  # models.build_model(cfg.model): Transformer (dense, MoE) or MoRTransformer
    tx: optax.GradientTransformation
    partition: dict[str, str]
    schedule: Callable[[int], Any]
    state_shardings: Any
    abstract_state: Any
    train_step: Any  # compiled: (state, tokens_MxBxL1, hyper) -> (state, metrics); call it through step()
    eval_step: Any  # compiled: (params, model_state, tokens_BxL1) -> mean loss
    init_state: Callable[[], Any]
    train_batch_sharding: NamedSharding
    eval_batch_sharding: NamedSharding
    compile_seconds: float
    hyper: Any  # optim.optimizer_hyperparams of this run, on the devices: train_step's run-time numbers
    # (block, n_blocks) of the batch rows this process's devices hold (shd.process_row_block), read once here
    # from the shardings above rather than on every step: the rows each host loads.
    train_rows: tuple[int, int]
    eval_rows: tuple[int, int]

    @property
    def micro_batch(self) -> int:
        return self.cfg.data.batch_size // self.cfg.trainer.microbatches

    def step(self, state: Any, tokens_MxBxL1: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        """One optimiser step of this run (its learning rates and schedule passed in as ``hyper``)."""
        return self.train_step(state, tokens_MxBxL1, self.hyper)


@functools.lru_cache(maxsize=4)
def build_program(cfg: ExperimentConfig, mesh: Mesh) -> Program:
    """Compile the train/eval programs for ``cfg`` on ``mesh``.

    Memoised on (cfg, mesh), both immutable and hashable: a process that trains the same experiment again (a
    resume in tests or notebooks) reuses the compiled executables instead of recompiling. The learning
    rates and the schedule are arguments of the train step, not constants in it
    (``optim.optimizer_hyperparams``), so runs of one shape that differ only in those compile to the same
    program: with JAX's persistent compilation cache on (the study's executors turn it on) the second such
    run loads the first one's executable instead of compiling (cpu-tiny: 42 runs, 16 distinct programs).
    """
    t0 = time.perf_counter()
    c, M, L = cfg.model, cfg.trainer.microbatches, cfg.data.seq_len
    B_micro = cfg.data.batch_size // M
    shd.check_batch_divisible(B_micro, mesh, cfg.mesh.rules, "data.batch_size / trainer.microbatches")
    shd.check_batch_divisible(cfg.eval_batch_size, mesh, cfg.mesh.rules, "eval batch size")
    model = build_model(c)
    rng = jax.random.PRNGKey(cfg.seed)
    dummy_BxL = jnp.zeros((1, L), jnp.int32)
    # Init runs without logical rules in scope, so activation constraints are no-ops on the dummy batch of 1.
    abstract_vars = jax.eval_shape(model.init, rng, dummy_BxL)
    abstract_boxed = abstract_vars["params"]
    # Non-parameter collections (router biases of MoE / MoR loss-free balancing): trained state without
    # gradients, sharded from their logical names and checkpointed with the parameters.
    abstract_mstate_boxed = {k: v for k, v in abstract_vars.items() if k != "params"}
    rules = shd.effective_rules(
        cfg.mesh.rules, mesh, shd.logical_dim_sizes({"params": abstract_boxed, **abstract_mstate_boxed})
    )
    logical_axes = nn.get_partition_spec(abstract_boxed)
    param_shardings = shd.shardings_from_logical(logical_axes, nn.meta.unbox(abstract_boxed), mesh, rules)
    abstract_params = abstract_like(nn.meta.unbox(abstract_boxed), param_shardings)
    mstate_shardings = shd.shardings_from_logical(
        nn.get_partition_spec(abstract_mstate_boxed), nn.meta.unbox(abstract_mstate_boxed), mesh, rules
    )
    abstract_mstate = abstract_like(nn.meta.unbox(abstract_mstate_boxed), mstate_shardings)

    hyper_host = optim.optimizer_hyperparams(cfg.optimizer, cfg.total_steps)
    tx, partition = optim.build_optimizer(
        cfg.optimizer, abstract_params, logical_axes, cfg.total_steps, hyperparams=hyper_host
    )
    schedule = schedule_from_params(hyper_host["lr"])  # the host's copy of the lr, for the logs
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_specs = optim.opt_state_logical_specs(tx, abstract_params, logical_axes)
    opt_shardings = shd.shardings_from_logical(opt_specs, abstract_opt, mesh, rules)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings}
    abstract_state = {"params": abstract_params, "opt_state": abstract_opt}
    if abstract_mstate:  # only stateful models carry the key, so dense checkpoints keep their layout
        state_shardings["model_state"] = mstate_shardings
        abstract_state["model_state"] = abstract_mstate
    abstract_state = abstract_like(abstract_state, state_shardings)

    def init_fn(rng):
        variables = nn.meta.unbox(model.init(rng, dummy_BxL))
        params = variables.pop("params")
        state = {"params": params, "opt_state": tx.init(params)}
        if variables:
            state["model_state"] = variables
        return state

    init_jit = jax.jit(init_fn, out_shardings=state_shardings)

    def forward_ce(module, apply_kw, params, model_state, tokens_BxL1):
        variables = {"params": params, **model_state}
        inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
        if cfg.trainer.loss_chunk_tokens:  # chunked head + loss: no full-batch fp32 logits (models/loss.py)
            h_BxLxD, extras = module.apply(variables, inputs_BxL, return_hidden=True, **apply_kw)
            ce = chunked_cross_entropy(h_BxLxD, targets_BxL, chunk_tokens=cfg.trainer.loss_chunk_tokens,
                                       **output_head(params, c.tie_embeddings))
        else:
            logits_BxLxV, extras = module.apply(variables, inputs_BxL, **apply_kw)
            ce = cross_entropy(logits_BxLxV, targets_BxL)
        return ce, extras

    def loss_fn(params, model_state, tokens_BxL1):
        ce, extras = forward_ce(model, {}, params, model_state, tokens_BxL1)
        return ce + _aux_loss(extras), (ce, extras)

    # Validation scores the model as it runs at inference (models.inference_mode): the loss of MoR expert
    # choice in its training mode ranks each token against later ones -- it sees the future -- and MoE
    # capacity drops depend on the batch, so neither is the loss a user of the model gets. Every other
    # family evaluates exactly the training forward.
    eval_cfg, eval_kw = inference_mode(c)
    eval_model = build_model(eval_cfg) if eval_cfg is not c else model

    def train_step(state, tokens_MxBxL1, hyper):
        params, model_state = state["params"], state.get("model_state", {})
        # The same optimiser as ``tx`` (same state layout), its schedules reading the traced ``hyper``.
        tx_run, _ = optim.build_optimizer(
            cfg.optimizer, params, logical_axes, cfg.total_steps, hyperparams=hyper
        )

        def micro(grads_acc, tokens_BxL1):
            (_, (ce, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, tokens_BxL1
            )
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return grads_acc, (ce, extras)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        grads, (ce_M, extras_M) = jax.lax.scan(micro, zeros, tokens_MxBxL1)
        grads = jax.tree.map(lambda g, p: (g / M).astype(p.dtype), grads, params)
        loss = ce_M.mean()  # microbatches hold equal token counts, so this is the mean over all tokens
        # Family statistics as microbatch means. For those linear in the tokens (MoE expert load, MoR depth
        # load: what the router-bias update reads) that is the mean over all the step's tokens. The balance
        # losses (E * sum_i f_i P_i) multiply two batch means, so with microbatches > 1 they (and their
        # gradient) are per-microbatch, as in Megatron-LM: a MoE / MoR-token-choice run then depends on
        # trainer.microbatches slightly; without them the step does not (test_families_train.py).
        extras = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0), extras_M)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx_run.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        if "model_state" in state:
            new_state["model_state"] = update_model_state(c, model_state, extras)
        # A non-finite step leaves the state untouched, so the caller stops with the last good state intact.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        return new_state, {**extras, "loss": loss, "grad_norm": grad_norm}

    def eval_step(params, model_state, tokens_BxL1):
        ce, _ = forward_ce(eval_model, eval_kw, params, model_state, tokens_BxL1)
        return ce

    train_batch_sharding = shd.batch_sharding(mesh, rules, leading=1)
    eval_batch_sharding = shd.batch_sharding(mesh, rules)
    rep = shd.replicated(mesh)
    hyper = jax.device_put(jax.tree.map(np.float32, hyper_host), rep)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_c = (
            jax.jit(
                train_step,
                in_shardings=(state_shardings, train_batch_sharding, rep),
                out_shardings=(state_shardings, rep),
                donate_argnums=(0,),
            )
            .lower(abstract_state, jax.ShapeDtypeStruct((M, B_micro, L + 1), jnp.int32),
                   jax.tree.map(lambda _: jax.ShapeDtypeStruct((), jnp.float32), hyper_host))
            .compile()
        )
        eval_shape = jax.ShapeDtypeStruct((cfg.eval_batch_size, L + 1), jnp.int32)
        eval_c = (
            jax.jit(
                eval_step,
                in_shardings=(param_shardings, mstate_shardings, eval_batch_sharding),
                out_shardings=rep,
            )
            .lower(abstract_params, abstract_mstate, eval_shape)
            .compile()
        )

    def init_state():
        # Traced outside jax.set_mesh: out_shardings already place the state, and with a mesh in context flax
        # would treat the names of nn.Partitioned-boxed model state (MoE's router bias, ("layers", "expert"))
        # as mesh axes instead of logical ones.
        return init_jit(rng)

    return Program(
        cfg,
        mesh,
        rules,
        model,
        tx,
        partition,
        schedule,
        state_shardings,
        abstract_state,
        train_c,
        eval_c,
        init_state,
        train_batch_sharding,
        eval_batch_sharding,
        time.perf_counter() - t0,
        hyper,
        shd.process_row_block(train_batch_sharding, (M, B_micro, L + 1), axis=1),
        shd.process_row_block(eval_batch_sharding, (cfg.eval_batch_size, L + 1), axis=0),
    )


# ----- data -------------------------------------------------------------------------------------------------
def open_dataset(cfg: ExperimentConfig, workdir: Path) -> TokenDataset:
    d = cfg.data
    if d.path != "synthetic":
        return TokenDataset.open(d.path)
    out = Path(d.synthetic_dir) if d.synthetic_dir else workdir / "data"
    s = d.synthetic
    if jax.process_index() == 0:
        prepare_synthetic(
            out,
            vocab_size=s.vocab_size,
            n_train_tokens=d.n_train_tokens,
            n_val_tokens=d.n_val_tokens,
            seed=s.seed,
            order=s.order,
            weights=s.weights,
            successors=s.successors,
            buckets=s.buckets,
            zipf_exponent=s.zipf_exponent,
            dirichlet_alpha=s.dirichlet_alpha,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data prepared")
    return TokenDataset.open(out, verify_tokens=False)  # prepare_synthetic validated the files


def check_dataset(cfg: ExperimentConfig, ds: TokenDataset) -> None:
    """Everything the run will need from the data, checked before it trains (not found at the final eval):
    the vocabulary fits the model, a train and a val split of at least one window each, and a synthetic
    source when the downstream battery is asked for."""
    if ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"dataset vocab_size {ds.vocab_size} ({ds.directory}) exceeds model.vocab_size "
            f"{cfg.model.vocab_size}"
        )
    for split in ("train", "val"):
        if split not in ds.splits:
            raise DataError(f"dataset {ds.directory} has no {split!r} split (it has {ds.splits}); training "
                            f"needs 'train' and 'val' (python -m experiments.data text ... writes both)")
        if ds.n_tokens(split) < cfg.data.seq_len + 1:
            raise DataError(f"split {split!r} of {ds.directory} has {ds.n_tokens(split)} tokens, fewer than "
                            f"one window (data.seq_len + 1 = {cfg.data.seq_len + 1})")
    if cfg.trainer.eval_tasks and "generator" not in ds.metadata:
        raise ConfigError(
            f"trainer.eval_tasks: the built-in downstream battery needs a synthetic dataset (its exact "
            f"source), and {ds.directory} is not one; set trainer.eval_tasks=false and score JSONL "
            f"multiple-choice items with python -m experiments.evaluate after training"
        )


def data_warnings(cfg: ExperimentConfig, ds: TokenDataset) -> list[str]:
    """What a run does with its data that a scaling study should know (not errors: multi-epoch training is
    a legitimate choice, Muennighoff et al. 2023): repeated training tokens, wrapped validation windows."""
    out = []
    tokens, train = cfg.total_steps * cfg.tokens_per_step, ds.n_tokens("train")
    if tokens > train and not cfg.data.stream:
        out.append(
            f"{tokens:,} training tokens from a {train:,}-token train split ({ds.directory}): "
            f"{tokens / train:.2f} epochs. Windows are drawn with replacement, so data repeats, while a "
            "scaling law fitted on summary.json's tokens reads them as unique; raise data.n_train_tokens "
            "(synthetic) or prepare more text"
        )
    windows = ds.n_windows("val", cfg.data.seq_len)
    asked = cfg.trainer.eval_steps * cfg.eval_batch_size
    if asked > windows:
        out.append(
            f"validation asks for {asked} windows (trainer.eval_steps x eval batch {cfg.eval_batch_size}) "
            f"but the val split holds {windows}: {asked - windows} are scored twice"
        )
    return out


def read_summary(path: Path, emit: Callable[[str], None]) -> dict | None:
    """A finished run's summary.json, or None when there is none or it is unreadable (torn by a kill while
    it was written, before summaries were written atomically): the caller then rewrites it from the final
    checkpoint instead of failing on every retry."""
    return read_json_object(
        path, on_unreadable=lambda why: emit(f"{why}; re-evaluating the final checkpoint to rewrite it")
    )


def restore_newest_readable(
    ckpt: Checkpointer, abstract_state: Any, workdir: Path, emit: Callable[[str], None]
) -> tuple[int | None, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores, or (None, None, {}) when there is none.

    A newer step that fails (an empty or torn step directory, left by a crash mid-save) is moved to
    WORKDIR/checkpoints_unreadable/ with a message naming it, and the run resumes from the last good step.
    When no step restores, CheckpointError names the directory and the newest step's error, and nothing is
    moved (the cause may be systematic rather than damage)."""
    failed: list[tuple[int, Exception]] = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            state, meta = ckpt.restore(step, abstract_state)
        except Exception as e:  # orbax and tensorstore raise many types for a damaged step
            failed.append((step, e))
            continue
        if failed and jax.process_index() == 0:
            moved = ckpt.set_aside([s for s, _ in failed], workdir / UNREADABLE_CHECKPOINT_DIR)
            for (s, e), where in zip(failed, moved, strict=True):
                emit(f"checkpoint step {s} is unreadable ({type(e).__name__}: {str(e)[:200]}); moved to "
                     f"{where}; resuming from step {step}")
        return step, state, meta
    if failed:
        s, e = failed[0]
        raise CheckpointError(
            f"no checkpoint in {ckpt.directory} could be restored (steps {[s for s, _ in failed]}); newest, "
            f"step {s}: {type(e).__name__}: {str(e)[:500]}. To start the run over, move that directory away"
        ) from e
    return None, None, {}


def async_metrics(setting: bool | None, mesh: Mesh) -> bool:
    """``trainer.async_metrics`` resolved: None -> on for accelerators, off for CPUs. On a CPU the device is
    the host's own cores, so a second step queued behind the first only competes with the loop for them:
    ``python -m experiments.bench_metrics_fetch`` (tiny preset, 60 steps, 3 rounds, 2 cores) measured async /
    sync tokens/s = 0.892 (median; rounds 0.896, 0.892, 0.808). On a GPU the synchronous loop leaves the
    device idle for the fetch and the next dispatch every step; that gain is not measured yet (no GPU)."""
    if setting is not None:
        return bool(setting)
    return mesh.devices.flat[0].platform != "cpu"


def train_batch(
    ds: TokenDataset, cfg: ExperimentConfig, prog: Program, step: int, stream: SyntheticStream | None = None
) -> jax.Array:
    """The global [M, B/M, L+1] batch of step ``step`` (0-based), assembled from this host's rows: windows of
    the train split, or fresh samples of the synthetic source with ``data.stream``."""
    B, L, M = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.microbatches
    block, n_blocks = prog.train_rows
    hosts = {"process_index": block, "process_count": n_blocks}
    if stream is not None:
        local = stream.batch(cfg.seed, step, B, L, **hosts)
    else:
        local = ds.batch("train", cfg.seed, step, B, L, **hosts)
    local = local.reshape(M, local.shape[0] // M, L + 1)
    return shd.host_batch(local, prog.train_batch_sharding, (M, B // M, L + 1))


EVAL_SYNC_EVERY = 8


def evaluate(ds: TokenDataset, cfg: ExperimentConfig, prog: Program, state: Any) -> float:
    """Mean loss over the first ``eval_steps`` fixed validation batches (the same every time), of the train
    state's parameters (and non-parameter model state, e.g. router biases)."""
    params, model_state = state["params"], state.get("model_state", {})
    Be, L = cfg.eval_batch_size, cfg.data.seq_len
    block, n_blocks = prog.eval_rows
    losses = []
    for i in range(cfg.trainer.eval_steps):
        local = ds.sequential_batch("val", i, Be, L, process_index=block, process_count=n_blocks)
        batch = shd.host_batch(local, prog.eval_batch_sharding, (Be, L + 1))
        losses.append(prog.eval_step(params, model_state, batch))
        if (i + 1) % EVAL_SYNC_EVERY == 0:
            # Dozens of queued sharded steps trip XLA:CPU's fixed 40 s all-reduce rendezvous timeout on a
            # simulated multi-device mesh (SIGABRT at eval_steps=100 on 8 CPU devices); a wait every few
            # steps costs nothing measurable on a GPU, where the steps are short.
            jax.block_until_ready(losses[-1])
    return float(np.mean(np.asarray(jax.device_get(losses), dtype=np.float64)))


def run_downstream(cfg: ExperimentConfig, workdir: Path, params: Any, emit: Callable[[str], None]) -> None:
    """Evaluate the downstream battery (``trainer.eval_tasks``) and write WORKDIR/downstream.json; ``params``:
    the variables {"params": ..., **model_state} (or bare params); with ``params=None`` the newest checkpoint
    is loaded."""
    from experiments import evaluate  # lazy: only runs that ask for the battery pay for its import

    if jax.process_count() > 1:  # params span hosts; evaluate the checkpoint afterwards in one process
        emit("downstream battery skipped on multi-host runs: run python -m experiments.evaluate WORKDIR")
        return
    names = None if cfg.trainer.eval_tasks is True else list(cfg.trainer.eval_tasks)
    if params is None:
        out = evaluate.evaluate_run(workdir, names=names)
    else:
        out = evaluate.evaluate_and_write(cfg, jax.device_get(params), workdir, cfg.total_steps, names=names)
    emit(f"downstream battery: {len(out['tasks'])} tasks in {out['eval_seconds']:.1f}s -> "
         f"{workdir / evaluate.DOWNSTREAM_FILE}")


# ----- the loop ---------------------------------------------------------------------------------------------
def train(
    cfg: ExperimentConfig,
    workdir: str | Path,
    *,
    devices: list[jax.Device] | None = None,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir`` (resuming from its newest checkpoint) and return the summary dict.

    ``on_step(step)`` is called after each completed step (1-based); tests raise from it to simulate a crash.
    """
    from tqdm.auto import tqdm

    wall0 = time.perf_counter()
    cfg.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    emit = log or (lambda s: tqdm.write(s) if is_main else None)
    check_and_save_config(cfg, workdir)
    mesh = shd.make_mesh(cfg.mesh, devices)
    n_devices = mesh.devices.size
    total = cfg.total_steps
    ckpt = Checkpointer(
        workdir / CHECKPOINT_DIR, keep=cfg.trainer.keep_checkpoints, async_save=cfg.trainer.async_checkpoint
    )
    writer: MetricsWriter | None = None
    try:
        latest = ckpt.latest_step()
        summary_path = workdir / SUMMARY_FILE
        finished = read_summary(summary_path, emit) if latest == total else None
        if finished is not None and not eval_is_current(finished, cfg.model):
            emit(f"{summary_path}: final_eval_loss predates inference-mode validation; re-evaluating")
            finished = None
        if finished is not None:
            emit(f"{workdir}: already finished ({total} steps); nothing to do")
            if cfg.trainer.eval_tasks and is_main and not (workdir / "downstream.json").exists():
                run_downstream(cfg, workdir, None, emit)
            return finished

        ds = open_dataset(cfg, workdir)
        check_dataset(cfg, ds)
        stream = SyntheticStream.of(ds) if cfg.data.stream else None
        for warning in data_warnings(cfg, ds):
            emit(f"warning: {warning}")
        prog = build_program(cfg, mesh)
        emit(shd.describe_mesh(mesh))
        counts = accounting.param_counts(cfg.model)
        emit(
            f"model ({cfg.model.family}, {cfg.model.attention}): {counts['total']:,} params "
            f"({counts['non_embedding']:,} non-embedding, {counts.get('active', counts['total']):,} active); "
            f"{total} steps x {cfg.tokens_per_step:,} tokens; compiled in {prog.compile_seconds:.1f}s"
        )
        emit("optimizer partition:\n" + optim.describe_partition(prog.partition))

        latest, state, meta = restore_newest_readable(ckpt, prog.abstract_state, workdir, emit)
        if latest is not None:
            emit(f"resumed from checkpoint at step {latest}")
        else:
            state, meta = prog.init_state(), {}
        start = latest or 0
        meta = {"train_seconds": 0.0, "timed_tokens": 0, "wall_seconds": 0.0, "last_loss": None, **meta}
        meta["compile_seconds"] = prog.compile_seconds
        wall_before = meta["wall_seconds"]
        writer = MetricsWriter(workdir, resume_step=start, enabled=is_main, log=emit)
        fpt = family_fields(cfg.model, cfg.data.seq_len)["active_flops_per_token"]
        peak = cfg.trainer.peak_flops
        t = cfg.trainer

        def save(step: int) -> None:
            meta["wall_seconds"] = wall_before + time.perf_counter() - wall0
            ckpt.save(step, state, dict(meta))

        # disable=None: tqdm turns itself off when stdout is not a terminal (logs, CI); log lines cover that.
        bar = tqdm(
            total=total,
            initial=start,
            disable=None if (t.progress and is_main) else True,
            unit="step",
            dynamic_ncols=True,
        )
        window_time, window_steps = 0.0, 0
        tick = time.perf_counter()

        def finish(s: int, m: Any) -> None:
            """The host side of step ``s`` (0-based): fetch its metrics, stop on a non-finite loss, log."""
            nonlocal tick, window_time, window_steps
            m = jax.device_get(m)
            now = time.perf_counter()
            step_time, tick = now - tick, now
            step = s + 1
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            family_metrics = {k: v for k, v in m.items() if k not in ("loss", "grad_norm")}
            window_time += step_time
            window_steps += 1
            meta["train_seconds"] += step_time
            meta["timed_tokens"] += cfg.tokens_per_step
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                writer.write(step, {"loss": loss, "grad_norm": grad_norm})
                ckpt.wait()
                good = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step} (loss={loss}, grad_norm={grad_norm}); "
                    f"stopping. The update was not applied. Last good checkpoint: "
                    f"{'step ' + str(good) if good is not None else 'none'} in {ckpt.directory}. "
                    "Lower optimizer.learning_rate or enable optimizer.grad_clip_norm."
                )
            meta["last_loss"] = loss
            bar.update(1)
            if step % t.log_every == 0 or step == total:
                tps = cfg.tokens_per_step * window_steps / window_time
                record = {
                    "loss": loss,
                    "lr": float(prog.schedule(s)),
                    "grad_norm": grad_norm,
                    "step_time": window_time / window_steps,
                    "tokens_per_second": tps,
                    "tokens": step * cfg.tokens_per_step,
                }
                if peak:
                    record["mfu"] = fpt * tps / (peak * n_devices)
                # Scalar family statistics of this step (moe_load_balance, mor_mean_depth, ...); per-layer
                # arrays (moe_expert_load) go out at eval intervals and at the end, below.
                record.update({k: float(v) for k, v in family_metrics.items() if np.ndim(v) == 0})
                writer.write(step, record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                if bar.disable:
                    emit(f"step {step}/{total}: loss {loss:.4f} grad_norm {grad_norm:.3f} tok/s {tps:,.0f}")
                window_time, window_steps = 0.0, 0
            arrays = {k: np.asarray(v).tolist() for k, v in family_metrics.items() if np.ndim(v) > 0}
            if arrays and ((t.eval_every and step % t.eval_every == 0) or step == total):
                writer.write(step, arrays)

        def needs_state(step: int) -> bool:  # eval or checkpoint after this step: the state must be its own
            return (step == total or bool(t.eval_every and step % t.eval_every == 0)
                    or bool(t.checkpoint_every and step % t.checkpoint_every == 0))

        # With async metrics, step s+1 is dispatched before step s's metrics are fetched, so the device never
        # waits for the host between steps; a non-finite step s is still caught (its update was not applied,
        # and nothing after it is saved). At eval/checkpoint steps the loop syncs.
        lag = async_metrics(t.async_metrics, mesh)
        pending: tuple[int, Any] | None = None
        batch = train_batch(ds, cfg, prog, start, stream) if start < total else None
        for s in range(start, total):
            state, m = prog.step(state, batch)
            if s + 1 < total:
                batch = train_batch(ds, cfg, prog, s + 1, stream)  # host work overlaps the device step
            if pending is not None:  # a step with no eval or checkpoint: it is complete once logged
                finish(*pending)
                if on_step is not None:
                    on_step(pending[0] + 1)
                pending = None
            step = s + 1
            if lag and not needs_state(step):
                pending = (s, m)
                continue
            finish(s, m)
            if t.eval_every and step % t.eval_every == 0 and step != total:
                ev = evaluate(ds, cfg, prog, state)
                writer.write(step, {"eval_loss": ev})
                emit(f"step {step}: eval_loss {ev:.4f}")
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == total:
                save(step)
            if on_step is not None:
                on_step(step)
            tick = time.perf_counter()
        bar.close()

        final_eval = evaluate(ds, cfg, prog, state)
        if not math.isfinite(final_eval):  # a summary with it would be neither finished nor failed
            raise NonFiniteLossError(
                f"non-finite validation loss after the final step {total} (eval_loss={final_eval}); the "
                f"training loss was finite, so the model overflows on the val split (checkpoint kept)"
            )
        # (start == total: finished before summary.json was written; the eval record may already be there.)
        if start < total or not any(r["step"] == total and "eval_loss" in r for r in read_metrics(workdir)):
            writer.write(total, {"eval_loss": final_eval})
        writer.close()
        ckpt.wait()
        meta["wall_seconds"] = wall_before + time.perf_counter() - wall0
        summary = build_summary(
            cfg, ds, final_loss=meta["last_loss"], final_eval_loss=final_eval, meta=meta, n_devices=n_devices
        )
        if is_main:  # written whole or not at all: a kill mid-write must not leave a torn summary behind
            save_config(cfg, workdir)  # config.json = the summary's config, also when a summary is rewritten
            write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        floor = f" (entropy floor {ds.entropy_rate:.4f})" if ds.entropy_rate is not None else ""
        emit(
            f"done: final loss {summary['final_loss']:.4f}, eval loss {final_eval:.4f}{floor}; "
            f"{summary['tokens_per_second'] or 0:,.0f} tok/s; summary in {summary_path}"
        )
        if t.eval_tasks and is_main:
            # with the model state: MoE/MoR router biases are needed to apply the model
            run_downstream(cfg, workdir, {"params": state["params"], **state.get("model_state", {})}, emit)
        return summary
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()
