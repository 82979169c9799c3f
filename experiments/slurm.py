"""Cluster executors for a plan: Slurm through submitit (``run_slurm``) and, for clusters without Python
access on the login node, an exported job-array script (``export_job_array``).

Both run ``experiments.executors.run_one`` per run, so skipping finished runs, resuming interrupted ones and
``error.json`` work as locally. WSD branches wait on their parents: through ``afterok`` on the parent's own
job (submitit), or through ``afterany`` between job-array levels plus a check in ``run_one`` that the parent
finished (arrays cannot express per-task dependencies). Tested end to end under a fake Slurm
(tests/test_slurm.py), not on a real cluster.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.executors import _failed, _parent_ids, run_one
from experiments.sweep import PlannedRun

# submitit's own default time limit is 5 minutes: too short for any real run
SLURM_TIMEOUT_MIN = 24 * 60


def _wsd_depths(runs: Sequence[PlannedRun]) -> dict[str, int]:
    """Run name -> how many parents above it (0 for a run without one); parents precede their branches."""
    depth: dict[str, int] = {}
    for r in runs:
        depth[r.name] = 0 if r.parent is None else depth[r.parent["run"]] + 1
    return depth


class RunFailed(RuntimeError):
    """Raised by a Slurm job whose run failed, with ``run_one``'s error as the message: the job FAILS, so the
    jobs waiting on it (``afterok``) never start, and the submitting side reads the error back."""


def run_slurm(
    runs: Sequence[PlannedRun],
    runs_dir: str | Path,
    *,
    folder: str | Path,
    post_run: str | None = None,
    wait_for_results: bool = True,
    **slurm_params: Any,
) -> list[Any]:
    """Submit the plan through submitit (``pip install submitit``): the runs without a parent as one job
    array, then each WSD continuation or branch as a job of its own, ``afterok`` on its parent's job only
    (``ID_TASK`` for a root in the array), so a failed run holds back its own descendants and nothing else. A
    job whose run failed exits with an error (``RunFailed``). ``slurm_params`` go to
    ``AutoExecutor.update_parameters`` (e.g. ``slurm_partition``, ``gpus_per_node``, ``timeout_min``);
    ``timeout_min`` defaults to 24 hours (``SLURM_TIMEOUT_MIN``; submitit's default is 5 minutes).

    Returns the run records in plan order. A run that failed is a failed record with its error (as in
    ``error.json``); a job that returned nothing (it crashed outside ``run_one`` or was killed) is a failed
    record naming the remote error or the Slurm state, as a crashed worker in ``run_parallel``; a job
    waiting on a failed parent is cancelled if it is still pending (without Slurm's ``kill_invalid_depend``
    it would stay pending forever) and is a failed record naming the parent. With
    ``wait_for_results=False``: the submitit jobs, in plan order."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError(
            "the Slurm executor needs submitit (`pip install submitit`); without Python access on the "
            "cluster, export a job-array script instead (experiments.slurm.export_job_array)"
        ) from e
    parents = _parent_ids(runs)
    level = _wsd_depths(runs)
    roots = [r for r in runs if r.parent is None]
    children = sorted((r for r in runs if r.parent is not None), key=lambda r: level[r.name])
    ex = submitit.AutoExecutor(folder=str(folder))
    ex.update_parameters(**{"timeout_min": SLURM_TIMEOUT_MIN, **slurm_params})
    n = len(roots)
    root_jobs = ex.map_array(_slurm_entry, roots, [str(runs_dir)] * n, [None] * n, [post_run] * n)
    jobs = {r.name: j for r, j in zip(roots, root_jobs, strict=True)}
    # parameters accumulate over update_parameters calls; only the additional ones are replaced, so keep the
    # caller's next to the dependency (passing slurm_params again would repeat slurm_additional_parameters)
    extra = dict(slurm_params.get("slurm_additional_parameters") or {})
    for r in children:  # by depth: a parent's job id is known before its branches are submitted
        dep = jobs[r.parent["run"]].job_id
        ex.update_parameters(slurm_additional_parameters={**extra, "dependency": f"afterok:{dep}"})
        jobs[r.name] = ex.submit(_slurm_entry, r, str(runs_dir), parents[r.name], post_run)
    if not wait_for_results:
        return [jobs[r.name] for r in runs]
    results: dict[str, dict[str, Any]] = {}
    for r in roots + children:  # parents first
        par = r.parent["run"] if r.parent is not None else None
        if par is not None and results[par]["status"] == "failed":
            results[r.name] = _orphan_result(r, jobs[r.name], par)
        else:
            results[r.name] = _slurm_result(r, jobs[r.name])
    return [results[r.name] for r in runs]


# Slurm states of a job that started (sacct may append details: "CANCELLED by 1234")
_STARTED = ("RUNNING", "COMPLETING", "COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def _orphan_result(record: PlannedRun, job: Any, parent: str) -> dict[str, Any]:
    """The record of a job waiting (``afterok``) on the job of a failed parent. Not started: cancelled (Slurm
    without ``kill_invalid_depend`` keeps it pending forever, and waiting for its result would hang) and
    failed. Started anyway (its parent's job completed, but its result could not be read): waited for."""
    try:
        state = str(job.get_info(mode="force").get("State") or "UNKNOWN")
    except Exception:  # noqa: BLE001 -- sacct trouble: treat the job as not started
        state = "UNKNOWN"
    if state.split(" ")[0] in _STARTED:
        return _slurm_result(record, job)
    if not state.startswith("CANCELLED"):
        job.cancel(check=False)
    return _failed(record, f"parent {parent!r} failed (slurm job {job.job_id} cancelled)")


def _slurm_result(record: PlannedRun, job: Any) -> dict[str, Any]:
    """The job's ``run_one`` record; for a run that failed, a failed record with the run's own error (raised
    as ``RunFailed`` by the job); else a failed record naming the remote error (a job that raised outside
    ``run_one``) or the Slurm state (a job killed or never run) and the job's log."""
    try:
        return job.result()
    except Exception as e:  # noqa: BLE001 -- reported per run, as a crashed worker in run_parallel
        text = str(e)
        parts = text.split("\n----------------------\n")  # submitit's FailedJobError: the remote traceback
        trace = parts[1] if len(parts) >= 3 else ""
        # the exception line of the traceback (``experiments.slurm.RunFailed: ERROR``, ERROR possibly
        # several lines); the traceback's source lines are indented
        m = re.search(rf"^(?:[\w.]+\.)?{RunFailed.__name__}: ", trace, re.MULTILINE)
        if m is not None:
            return _failed(record, trace[m.end() :].strip())
        if trace.strip():
            what = trace.strip().splitlines()[-1]
        else:
            what = next((ln.strip() for ln in text.splitlines() if "(state:" in ln), type(e).__name__)
        return _failed(record, f"slurm job {job.job_id}: {what} (log: {job.paths.stderr})")


def _slurm_entry(record: PlannedRun, runs_dir: str, parent_id: str | None, post_run: str | None) -> dict:
    res = run_one(record, runs_dir, parent_id=parent_id, post_run=post_run)
    if res["status"] == "failed":
        raise RunFailed(res["error"])
    return res


def export_job_array(
    runs: Sequence[PlannedRun],
    plan_path: str | Path,
    runs_dir: str | Path,
    out_path: str | Path,
    *,
    max_parallel: int = 16,
    sbatch_options: Sequence[str] = (),
    python: str = "python",
    post_run: str | None = None,
) -> Path:
    """Write ``out_path`` (a bash script submitting the plan as Slurm job arrays, one per WSD dependency
    level, each ``--dependency=afterany`` on the level before) and ``<out_path stem>_task.sh`` (what each
    array task runs: ``python -m experiments.executors run-one --plan PLAN --index $SLURM_ARRAY_TASK_ID
    --runs-dir DIR [--post-run MODULE:FN]``). An array's dependency holds for all its tasks, so a task cannot
    wait on just its own parent: a level starts once the level before ended, however it ended, and a task
    whose parent run did not finish fails at once (``error.json``: ``parent ... has not finished``) without
    training, so a failed run holds back only its own descendants. Needs only sbatch and Python on the
    nodes, not submitit. Returns ``out_path``."""
    import shlex

    from experiments.sweep import distinct_runs

    index = {r.name: i for i, r in enumerate(runs)}  # task index = position in the plan file
    runs = distinct_runs(runs)  # an experiment planned twice: one task, not two writing one directory
    level = _wsd_depths(runs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    task = out.with_name(out.stem + "_task.sh")
    hook = f" --post-run {shlex.quote(post_run)}" if post_run else ""
    task.write_text(
        "#!/bin/bash\n"
        "# One Slurm array task = one run of the plan (skipped if finished, resumed if interrupted;\n"
        "# a run whose parent run did not finish fails at once without training).\n"
        f"exec {python} -m experiments.executors run-one "
        f"--plan {shlex.quote(str(Path(plan_path).absolute()))} "
        f'--index "$SLURM_ARRAY_TASK_ID" --runs-dir {shlex.quote(str(Path(runs_dir).absolute()))}{hook}\n'
    )
    task.chmod(0o755)
    lines = [
        "#!/bin/bash",
        f"# Submits {len(runs)} runs of {plan_path} as Slurm job arrays (from experiments.slurm).",
        "# Each task trains one run; finished runs are skipped, interrupted ones resume. Re-submit to retry.",
        "# WSD levels are chained with afterany: a level starts when the level before ended, however it",
        "# ended; a task whose parent run did not finish fails at once (error.json) without training.",
        "set -euo pipefail",
        f"TASK={shlex.quote(str(task.absolute()))}",
        'DEP=""',
    ]
    opts = " ".join(shlex.quote(f"--{o.lstrip('-')}") for o in sbatch_options)
    for lev in range(max(level.values(), default=-1) + 1):
        arr = ",".join(str(index[r.name]) for r in runs if level[r.name] == lev)
        lines.append(
            f"JOB=$(sbatch --parsable --job-name=sweep-l{lev} --array={arr}%{max_parallel} $DEP {opts} "
            '"$TASK")'
        )
        lines.append("JOB=${JOB%%;*}  # --parsable prints ID;CLUSTER where there are several clusters")
        lines.append(f'echo "submitted level {lev} ($JOB)"')
        lines.append('DEP="--dependency=afterany:$JOB"')
    out.write_text("\n".join(lines) + "\n")
    out.chmod(0o755)
    return out
