"""Executors for a plan: local sequential and local parallel worker processes (Slurm: experiments/slurm.py).

Every executor runs the same unit of work, ``run_one(record, runs_dir)``:

* the run directory is ``runs_dir/<run_id>`` (a hash of the resolved config, ``experiments.sweep.run_id``,
  and for a run with a parent of its lineage too, ``experiments.sweep.branch_id``);
* a finished run (a ``summary.json`` that parses, matches the config and has a finite eval loss) is skipped;
* an interrupted run resumes from its newest checkpoint (the trainer does that);
* a run with a ``parent`` (WSD reuse) is seeded with a copy of the parent's final checkpoint before the
  trainer starts, so it resumes from there; given the parent's plan record, a run whose parent has not
  finished fails at once without training (the job-array tasks, which start whatever their parents did);
* a failure writes ``error.json`` (message + traceback) into the run directory and is reported, not raised:
  the other runs go on, and re-running the study retries only the failed (and unfinished) runs.

``post_run`` (a ``"module:function"`` string, so worker processes can import it) is called as
``fn(cfg, run_dir)`` after training, e.g. the downstream task battery; its failure is recorded in
``eval_error.json`` without failing the run.

Parallel workers are separate processes (``spawn``: JAX is not fork-safe), each owning a fixed device set
(``devices_per_worker`` consecutive devices; on CPU one process with XLA limited to one intra-op thread, so
two workers share two cores instead of fighting over them).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.files import BusyError, exclusive_lock, read_json_object, write_text_atomic
from experiments.run_record import SUMMARY_FILE, eval_is_current, is_finite_loss
from experiments.sweep import PlannedRun, run_id

ERROR_FILE = "error.json"
EVAL_ERROR_FILE = "eval_error.json"
RECORD_FILE = "plan_record.json"
RUN_LOCK = ".run.lock"
# The worker of process i uses devices [i * k, (i + 1) * k) of its own jax.devices(); set by the pool.
_WORKER_DEVICES: list[int] | None = None


# ----- one run ----------------------------------------------------------------------------------------------
def run_dir(runs_dir: str | Path, record: PlannedRun) -> Path:
    return Path(runs_dir) / record.run_id


def finished_summary(path: str | Path, record: PlannedRun) -> dict | None:
    """The run's summary if it is finished and valid for ``record``, else None."""
    s = read_json_object(Path(path) / SUMMARY_FILE)
    if s is None:
        return None
    loss = s.get("final_eval_loss")
    ok = (
        isinstance(s.get("config"), dict)
        and run_id(s["config"]) == run_id(record.config)
        and s.get("steps") == record.steps
        and is_finite_loss(loss)
    )
    # A summary from before inference-mode validation (MoR expert choice, MoE capacity) is not finished:
    # the trainer re-evaluates its final checkpoint.
    return s if ok and eval_is_current(s) else None


def run_status(runs_dir: str | Path, record: PlannedRun) -> str:
    """ "done", "failed", "partial" (has checkpoints, not finished) or "pending"."""
    d = run_dir(runs_dir, record)
    if finished_summary(d, record) is not None:
        return "done"
    if (d / ERROR_FILE).exists():
        return "failed"
    if (d / "checkpoints").exists() and any((d / "checkpoints").iterdir()):
        return "partial"
    return "pending"


def _seed_from_parent(runs_dir: Path, record: PlannedRun, parent_id: str, d: Path) -> None:
    ck = d / "checkpoints"
    if ck.exists() and any(p.name.isdigit() for p in ck.iterdir()):
        return  # already seeded (or further along): the trainer resumes from the newest
    step = int(record.parent["step"])
    src = Path(runs_dir) / parent_id / "checkpoints" / str(step)
    if not src.is_dir():
        finished = (Path(runs_dir) / parent_id / SUMMARY_FILE).exists()
        how = (f"the parent finished but its checkpoint is gone, and a finished run is never retrained: "
               f"--retry {record.parent['run']!r} trains it again" if finished else "run the parent first")
        raise FileNotFoundError(
            f"run {record.name!r} branches from {record.parent['run']!r} at step {step}, but its checkpoint "
            f"{src} does not exist ({how})"
        )
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / f".seed-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(ck / str(step))


def _devices(cfg: Any) -> list | None:
    import jax

    devs = jax.devices()
    if _WORKER_DEVICES is not None:
        devs = [devs[i % len(devs)] for i in _WORKER_DEVICES]
    m = cfg.mesh
    if -1 in (m.data, m.fsdp, m.tensor):
        return devs
    return devs[: m.data * m.fsdp * m.tensor]


def _call(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def enable_compile_cache(directory: str | Path) -> None:
    """JAX's persistent compilation cache: runs of one shape share their init/eval (and downstream)
    executables, and a resumed run skips compiling; every executable is cached (no minimum compile time)."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _failed_run(record: PlannedRun, d: Path, error: str, tb: str, t0: float) -> dict[str, Any]:
    """Write ``error.json`` into the run directory ``d``; the failed result record of ``run_one``."""
    err = {"run": record.name, "run_id": record.run_id, "error": error, "traceback": tb, "time": time.time()}
    write_text_atomic(d / ERROR_FILE, json.dumps(err, indent=2) + "\n")
    return {**_failed(record, error), "seconds": time.time() - t0}


def run_one(
    record: PlannedRun,
    runs_dir: str | Path,
    *,
    parent_id: str | None = None,
    parent: PlannedRun | None = None,
    post_run: str | None = None,
    quiet: bool = True,
    compile_cache: str | None = None,
) -> dict[str, Any]:
    """Train one planned run (skip / resume / seed from parent), never raising; returns a status dict.
    ``parent``: the parent's plan record (``parent_id`` defaults to its run id); with it, a run whose parent
    has not finished is a failure (``error.json``) without training, instead of training from whatever
    checkpoint the parent left. ``compile_cache``: a directory for JAX's persistent compilation cache
    (process-wide once set)."""
    if compile_cache:
        enable_compile_cache(compile_cache)

    if parent is not None and parent_id is None:
        parent_id = parent.run_id
    d = run_dir(runs_dir, record)
    d.mkdir(parents=True, exist_ok=True)
    # One process per run directory: a job array submitted twice, or two studies, must not train into one.
    held = contextlib.ExitStack()
    try:
        held.enter_context(exclusive_lock(d / RUN_LOCK, f"the run directory {d} ({record.name})"))
    except BusyError as e:
        return {**_failed(record, str(e)), "seconds": 0.0}  # no error.json: the other process owns the run
    with held:
        return _run_one_locked(record, runs_dir, d, parent_id=parent_id, parent=parent, post_run=post_run,
                               quiet=quiet)


def _run_one_locked(
    record: PlannedRun,
    runs_dir: str | Path,
    d: Path,
    *,
    parent_id: str | None,
    parent: PlannedRun | None,
    post_run: str | None,
    quiet: bool,
) -> dict[str, Any]:
    from experiments.trainer import train

    write_text_atomic(d / RECORD_FILE, record.to_json() + "\n")
    t0 = time.time()
    summary = finished_summary(d, record)
    status = "skipped"
    if summary is None and parent is not None and record.parent is not None:
        par_status = run_status(runs_dir, parent)
        if par_status != "done":
            msg = f"parent {parent.name!r} has not finished (status: {par_status})"
            return _failed_run(record, d, msg, "", t0)
    if summary is None:
        status = "done"
        try:
            cfg = record.experiment
            if record.parent is not None:
                if parent_id is None:
                    raise ValueError(f"run {record.name!r} has a parent but no parent_id was given")
                _seed_from_parent(Path(runs_dir), record, parent_id, d)
            with open(d / "train.log", "a") as logf:

                def log(s: str) -> None:
                    logf.write(s + "\n")
                    if not quiet:
                        print(s, flush=True)

                summary = train(cfg, d, devices=_devices(cfg), log=log)
            (d / ERROR_FILE).unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 -- reported per run; the sweep goes on
            return _failed_run(record, d, f"{type(e).__name__}: {e}", traceback.format_exc(), t0)
    # The post-run hook (downstream battery) is for runs that enter the analysis, not LR-sweep probes or
    # WSD stable segments.
    if post_run and record.kind not in ("lr_sweep", "wsd_stable"):
        try:
            _call(post_run)(record.experiment, d)
            (d / EVAL_ERROR_FILE).unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001
            err = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            write_text_atomic(d / EVAL_ERROR_FILE, json.dumps(err, indent=2) + "\n")
    return {
        "name": record.name,
        "run_id": record.run_id,
        "status": status,
        "summary": summary,
        "seconds": time.time() - t0,
    }


# ----- progress ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Counts and FLOPs for a live one-line display (``line()``) and the final tally."""

    runs: Sequence[PlannedRun]
    stream: Any = None
    done: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    t0: float = field(default_factory=time.time)

    @property
    def planned_flops(self) -> float:
        return sum(r.incremental_flops for r in self.runs)

    @property
    def spent_flops(self) -> float:
        fin = self.done | self.skipped
        return sum(r.incremental_flops for r in self.runs if r.name in fin)

    def line(self) -> str:
        n = len(self.runs)
        fin = len(self.done) + len(self.skipped)
        pf = self.planned_flops
        return (
            f"[sweep] {fin}/{n} done ({len(self.skipped)} reused), {len(self.running)} running, "
            f"{len(self.failed)} failed | FLOPs {self.spent_flops:.3g} / {pf:.3g} "
            f"({100 * self.spent_flops / pf if pf else 0:.0f}%) | {time.time() - self.t0:.0f}s"
        )

    def show(self) -> None:
        if self.stream is not None:
            print(self.line(), file=self.stream, flush=True)

    def start(self, name: str) -> None:
        self.running.add(name)
        self.show()

    def not_started(self, n: int) -> None:
        if self.stream is not None and n:
            print(f"[sweep] time limit: {n} run(s) not started; they stay pending (run the command again to "
                  "train them)", file=self.stream, flush=True)

    def finish(self, res: dict[str, Any]) -> None:
        self.running.discard(res["name"])
        if res["status"] == "failed":
            self.failed[res["name"]] = res["error"]
            if self.stream is not None:
                print(f"[sweep] FAILED {res['name']}: {res['error']}", file=self.stream, flush=True)
        elif res["status"] == "skipped":
            self.skipped.add(res["name"])
        else:
            self.done.add(res["name"])
        self.show()


# ----- local executors --------------------------------------------------------------------------------------
def _parent_ids(runs: Sequence[PlannedRun]) -> dict[str, str]:
    """Run name -> its parent's run id, for the runs whose parent is in ``runs`` (a branch without its parent
    fails with that message instead: run_one, run_parallel)."""
    by_name = {r.name: r.run_id for r in runs}
    return {r.name: by_name[r.parent["run"]] for r in runs
            if r.parent is not None and r.parent["run"] in by_name}


def _failed(r: PlannedRun, error: str) -> dict[str, Any]:
    """The result record of a run that did not train (failed parent, missing parent, crashed worker)."""
    return {"name": r.name, "run_id": r.run_id, "status": "failed", "error": error}


def _not_trained(r: PlannedRun, runs_dir: str | Path, error: str) -> dict[str, Any]:
    """``_failed``, with the error also written to the run's ``error.json``, so the report shows the run as
    failed with its reason (a failed parent, a crashed worker) instead of pending."""
    d = run_dir(runs_dir, r)
    d.mkdir(parents=True, exist_ok=True)
    return _failed_run(r, d, error, "", time.time())


def run_sequential(
    runs: Sequence[PlannedRun],
    runs_dir: str | Path,
    *,
    post_run: str | None = None,
    progress: Progress | None = None,
    quiet: bool = True,
    compile_cache: str | None = None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Run the plan in order in this process (parents always precede their branches in a plan). No run
    starts after ``deadline`` (a ``time.monotonic()`` value); those left stay pending."""
    progress = progress or Progress(runs)
    parents = _parent_ids(runs)
    out = []
    for i, r in enumerate(runs):
        if deadline is not None and time.monotonic() >= deadline:
            progress.not_started(len(runs) - i)
            break
        if r.parent is not None and r.parent["run"] in progress.failed:
            res = _not_trained(r, runs_dir, f"parent {r.parent['run']!r} failed")
        else:
            progress.start(r.name)
            res = run_one(
                r,
                runs_dir,
                parent_id=parents.get(r.name),
                post_run=post_run,
                quiet=quiet,
                compile_cache=compile_cache,
            )
        progress.finish(res)
        out.append(res)
    return out


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this worker when the study process dies (e.g. ``kill PID`` of the
    study), instead of leaving an orphan that keeps training into a run directory the next invocation
    also writes to. Elsewhere a no-op (a Ctrl-C still reaches the whole process group)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _init_worker(queue: Any, xla_flags: str | None) -> None:
    """Take this worker's device set from ``queue``. A plain multiprocessing queue, handed over when the
    worker is spawned: a Manager queue would run in a server process of its own that outlives a killed
    study (SIGTERM, SIGKILL) as an orphan."""
    global _WORKER_DEVICES
    _die_with_parent()
    _WORKER_DEVICES = queue.get()
    if xla_flags is not None:
        os.environ["XLA_FLAGS"] = xla_flags


def cpu_worker_xla_flags(existing: str | None = None) -> str:
    """XLA flags for a CPU worker that should use one core (``--xla_cpu_multi_thread_eigen=false`` plus one
    intra-op thread), keeping flags already set (e.g. a forced host device count)."""
    extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return f"{existing} {extra}".strip() if existing else extra


def critical_path_order(runs: Sequence[PlannedRun]) -> list[PlannedRun]:
    """Runs by decreasing critical-path cost: a run's own FLOPs (incremental, for a branch) plus the costliest
    chain of runs waiting on it. Starting the longest chains first (longest-processing-time scheduling) keeps
    a large held-out run or a WSD chain from running alone at the end while the other workers idle."""
    children: dict[str, list[PlannedRun]] = {}
    for r in runs:
        if r.parent is not None:
            children.setdefault(r.parent["run"], []).append(r)
    memo: dict[str, float] = {}

    def chain(r: PlannedRun) -> float:
        if r.name not in memo:
            own = r.incremental_flops or r.predicted_flops
            memo[r.name] = own + max((chain(c) for c in children.get(r.name, [])), default=0.0)
        return memo[r.name]

    return sorted(runs, key=lambda r: -chain(r))  # stable: equal costs keep plan order


def _terminate_children(ctx: Any, timeout_s: float = 10.0) -> None:
    """Terminate this process's multiprocessing children (workers, the queue's manager) and wait until they
    are gone, so nothing writes into a run directory after we return. Repeated: the pool's management
    thread may still be starting a worker while the first ones are terminated."""
    deadline = time.monotonic() + timeout_s
    while (children := ctx.active_children()) and time.monotonic() < deadline:
        for proc in children:
            proc.terminate()
        for proc in children:
            proc.join(timeout=1.0)


def _new_pool(ctx: Any, workers: int, devices_per_worker: int, flags: str | None) -> ProcessPoolExecutor:
    """A worker pool whose worker i owns devices [i * k, (i + 1) * k)."""
    queue = ctx.Queue()
    for i in range(workers):
        queue.put(list(range(i * devices_per_worker, (i + 1) * devices_per_worker)))
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, flags)
    )


def run_parallel(
    runs: Sequence[PlannedRun],
    runs_dir: str | Path,
    *,
    workers: int,
    devices_per_worker: int = 1,
    post_run: str | None = None,
    progress: Progress | None = None,
    single_thread_cpu: bool = True,
    compile_cache: str | None = None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Run the plan on ``workers`` processes, each with its own ``devices_per_worker`` devices; a branch is
    submitted once its parent finished. ``single_thread_cpu`` limits XLA to one thread per worker (CPU).
    No run starts after ``deadline`` (a ``time.monotonic()`` value): the running ones finish, the rest stay
    pending.

    A worker process that dies (killed, out of memory, a crash in native code) breaks the whole pool and
    every run in flight with it, and the pool cannot say whose worker died. So the pool is rebuilt and the
    runs that were in flight are retried (they resume from their checkpoints), each alone: a retried run
    that breaks the pool again is the culprit, and fails with ``error.json``."""
    import multiprocessing as mp

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    progress = progress or Progress(runs)
    parents = _parent_ids(runs)
    ctx = mp.get_context("spawn")
    finished_ok: set[str] = set()
    flags = cpu_worker_xla_flags(os.environ.get("XLA_FLAGS")) if single_thread_cpu else None
    pending = critical_path_order(runs)
    results: dict[str, dict[str, Any]] = {}
    suspects: set[str] = set()  # in flight when a worker died: retried alone
    pool = _new_pool(ctx, workers, devices_per_worker, flags)

    def replace(broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """A new pool for one a dead worker broke, once the old one and its processes are gone."""
        broken.shutdown(wait=True, cancel_futures=True)
        _terminate_children(ctx)
        return _new_pool(ctx, workers, devices_per_worker, flags)

    def end(r: PlannedRun, res: dict[str, Any]) -> None:
        results[r.name] = res
        if res["status"] != "failed":
            finished_ok.add(r.name)
        progress.finish(res)

    try:
        futures: dict[Future, PlannedRun] = {}
        while pending or futures:
            if pending and deadline is not None and time.monotonic() >= deadline:
                progress.not_started(len(pending))
                pending = []
            for r in list(pending):
                par = r.parent["run"] if r.parent is not None else None
                if par is not None and par in progress.failed:
                    pending.remove(r)
                    end(r, _not_trained(r, runs_dir, f"parent {par!r} failed"))
                elif par is None or par in finished_ok:
                    isolated = any(futures[f].name in suspects for f in futures)
                    if len(futures) >= workers or isolated or (r.name in suspects and futures):
                        break
                    try:
                        f = pool.submit(run_one, r, runs_dir, parent_id=parents.get(r.name),
                                        post_run=post_run, compile_cache=compile_cache)
                    except BrokenProcessPool:  # a worker died between runs: the runs in flight say so below
                        if not futures:
                            pool = replace(pool)
                        break
                    pending.remove(r)
                    futures[f] = r
                    progress.start(r.name)
            if not futures:
                if pending:  # only branches whose parents are not in this plan: report, do not hang
                    for r in pending:
                        end(r, _not_trained(r, runs_dir, f"parent {r.parent['run']!r} is not in the plan"))
                    pending = []
                continue
            done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                # The pool is dead: every run in flight is lost with it.
                lost = [futures.pop(f) for f in list(futures)]
                err = next(f.exception() for f in done if isinstance(f.exception(), BrokenProcessPool))
                # A run lost for the first time is a suspect, even alone: a worker can also die idle or
                # after returning its result. A suspect that breaks the pool again, alone, is the culprit.
                culprits = [r for r in lost if r.name in suspects]
                for r in lost:
                    progress.running.discard(r.name)
                    if r in culprits:
                        end(r, _not_trained(r, runs_dir, f"worker crashed: {type(err).__name__}: {err}"))
                    else:
                        suspects.add(r.name)
                        pending.insert(0, r)
                if progress.stream is not None and len(culprits) < len(lost):
                    print(f"[sweep] a worker process died; retrying the {len(lost)} run(s) it may have taken "
                          "with it, one at a time", file=progress.stream, flush=True)
                pool = replace(pool)
                continue
            for f in done:
                r = futures.pop(f)
                try:
                    res = f.result()
                except Exception as e:  # noqa: BLE001 -- e.g. a result that could not be unpickled
                    res = _not_trained(r, runs_dir, f"worker failed: {type(e).__name__}: {e}")
                suspects.discard(r.name)
                end(r, res)
    except BaseException:
        # Ctrl-C, a time limit's SIGINT or an error here: stop now. The pool's context manager would wait for
        # the running runs to finish first (minutes); killed, they resume from their last checkpoint later.
        _terminate_children(ctx)
        # With its workers gone the pool's manager thread sees a broken pool and exits at once; joining it
        # (wait=True) lets it close the call queue, whose semaphores are otherwise reported as leaked at exit.
        # Not shutdown(wait=False) first: that drops the thread's handle, and a later wait=True joins nothing.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[r.name] for r in runs if r.name in results]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.executors run-one --plan PLAN --index I --runs-dir DIR`` (job-array task)."""
    import argparse

    from experiments.sweep import read_plan

    p = argparse.ArgumentParser(prog="python -m experiments.executors")
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run-one", help="train run number INDEX (0-based) of a plan")
    one.add_argument("--plan", required=True)
    one.add_argument("--index", type=int, required=True)
    one.add_argument("--runs-dir", required=True)
    one.add_argument(
        "--post-run", default=None, help="module:function called as fn(cfg, run_dir) after training"
    )
    a = p.parse_args(argv)
    runs = read_plan(a.plan)
    if not 0 <= a.index < len(runs):
        p.error(f"--index {a.index} out of range: the plan has {len(runs)} runs")
    r = runs[a.index]
    # the task of a branch starts whatever its parent's task did (afterany): run_one checks the parent
    parent = next((p for p in runs if p.name == r.parent["run"]), None) if r.parent is not None else None
    res = run_one(r, a.runs_dir, parent=parent, post_run=a.post_run, quiet=False)
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}))
    return 0 if res["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
