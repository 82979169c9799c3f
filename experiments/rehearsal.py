"""A CPU rehearsal of a study plan (``python -m experiments.study --preset gpu-quick --out DIR --dry``).

A GPU or cluster study spends its first minutes finding bugs that have nothing to do with the accelerator: a
plan that does not validate, a corpus that does not fit, a WSD branch whose parent checkpoint is missing, a
report that chokes on a fit. ``rehearse`` keeps every run of the real plan -- names, kinds, model shapes,
sequence length, dtypes, optimiser, schedules, WSD parent links, checkpoints, the downstream battery -- and
cuts only what costs time: each run trains a few steps on a batch of one sequence per data-parallel device,
evaluates one batch, and the corpus is just large enough. The whole pipeline then runs on a laptop in minutes;
its losses and fits are meaningless (the report says so) and its run ids differ from the real plan's.

What it cannot check: cuDNN attention (replaced by XLA attention unless told otherwise), GPU memory, speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from experiments.sweep import PlannedRun, resolve
from optim.config import OptimizerConfig
from optim.schedules import wsd_decay_start


def _branch_steps(opt: OptimizerConfig, start: int) -> tuple[int, float]:
    """Total steps and decay fraction of a WSD run whose cool-down starts exactly at ``start`` (the parent's
    last step) and lasts the 2 steps a cool-down needs to decay at all (optim.schedules): the fewest steps at
    the planned fraction, else start + 2 steps at fraction 2 / (start + 2). The fraction is a traced argument
    of the compiled step, like the learning rate, so changing it exercises the same program."""
    for total in range(start + 2, 4 * start + 16):
        if wsd_decay_start(opt, total) == start:
            return total, opt.decay_fraction
    return start + 2, 2.0 / (start + 2)


def rehearse(
    runs: Sequence[PlannedRun],
    *,
    steps: int = 4,
    sequences_per_device: int = 1,
    devices: int = 1,
    keep_cudnn: bool = False,
) -> list[PlannedRun]:
    """The plan ``runs`` cut down for a CPU rehearsal (module docstring); returns resolved runs.

    Roots train ``min(steps, planned)`` steps (a WSD root: enough more for a 2-step cool-down); a child
    continuing its parent's constant-lr phase trains ``steps`` more; a WSD cool-down branch gets the fewest
    steps whose cool-down starts at its parent's last step and lasts at least 2 steps, at the planned decay
    fraction where one fits, else at the fraction that does (``_branch_steps``): WSD reuse is exercised as
    planned, resuming from the parent's checkpoint. ``devices`` is the data-parallel width the runs will
    see (``jax.device_count()`` for ``mesh.data=-1``): batches stay divisible by it. ``keep_cudnn`` keeps
    cuDNN attention (a rehearsal on a GPU); otherwise it becomes XLA attention.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (warmup + one more step), got {steps}")
    by_name = {r.name: r for r in runs}
    new_steps: dict[str, int] = {}
    decay_fractions: dict[str, float] = {}  # WSD runs whose fraction had to change (_branch_steps)

    def steps_of(r: PlannedRun) -> int:
        if r.name not in new_steps:
            exp = r.experiment
            wsd = exp.optimizer.schedule == "wsd"
            if r.parent is None:
                n = min(steps, exp.total_steps)
                if wsd:  # its own cool-down, from the stable phase the cut leaves
                    n, decay_fractions[r.name] = _branch_steps(exp.optimizer, max(1, n - 2))
            else:
                start = steps_of(by_name[r.parent["run"]])
                n = start + steps
                if wsd:
                    n, decay_fractions[r.name] = _branch_steps(exp.optimizer, start)
            new_steps[r.name] = n
        return new_steps[r.name]

    out = []
    longest = 0  # tokens the longest run reads
    for r in runs:
        n = steps_of(r)
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in r.config.items()}
        mesh_data = int(cfg["mesh"].get("data", -1))
        width = devices if mesh_data == -1 else mesh_data * int(cfg["mesh"].get("fsdp", 1))
        batch = sequences_per_device * width
        cfg["trainer"].update(
            steps=n, tokens=None, eval_steps=1, eval_every=0, eval_batch_size=None, microbatches=1,
            checkpoint_every=max(1, n // 2), log_every=1,
        )
        cfg["optimizer"].update(warmup_steps=1)
        if r.name in decay_fractions:
            cfg["optimizer"]["decay_fraction"] = decay_fractions[r.name]
        seq_len = int(cfg["data"]["seq_len"])
        cfg["data"].update(batch_size=batch, n_val_tokens=max(16_384, 2 * batch * seq_len))
        longest = max(longest, n * batch * seq_len)
        if cfg["model"].get("attention_impl") == "cudnn" and not keep_cudnn:
            cfg["model"]["attention_impl"] = "xla"  # cuDNN kernels do not compile for the CPU
        parent = None if r.parent is None else {"run": r.parent["run"], "step": new_steps[r.parent["run"]]}
        out.append(dataclasses.replace(r, config=cfg, parent=parent))
    # One corpus for every run (generated once, shared), twice as long as the longest run reads.
    for c in out:
        c.config["data"]["n_train_tokens"] = max(65_536, 2 * longest)
    return resolve(out)
