"""The cluster paths of experiments/executors.py end to end under a fake Slurm, training tiny runs for real:

* ``run_slurm``: the real submitit (``AutoExecutor``) submits the plan as one job (array) per WSD dependency
  level chained with ``afterok``; the jobs train through submitit's own job script and ``srun`` line;
* ``export_job_array``: the exported ``submit.sh`` is executed with ``bash`` and its ``sbatch`` calls
  submit ``submit_task.sh`` arrays (``python -m experiments.executors run-one``).

The fake (tests/fake_slurm/, documented in ``_fakeslurm.py``) puts ``sbatch``, ``srun``, ``sacct``,
``squeue`` and ``scancel`` first on ``PATH``. It emulates what these paths use: ``#SBATCH`` lines and
command-line options, ``--array=LIST%N``, ``--dependency=afterok:ID[_TASK][:...]``, ``--parsable``
(``ID;CLUSTER`` output), output-file patterns, the ``SLURM_*`` environment of a one-node, one-task job, and
``sacct``'s parsable state table, with job states in a JSON file. ``sbatch`` returns at once; a detached
runner starts the job when its dependencies are decided (submitit moves its pickles into place only after
``sbatch`` returns, so jobs cannot run inside ``sbatch``). A job whose ``afterok`` parent failed is
CANCELLED (DependencyNeverSatisfied) without running. It does not emulate scheduling or resources
(partitions, time limits, memory, GPUs are ignored), multi-node or multi-task jobs, requeueing or preemption.

The plan is one cpu-micro model's WSD chain: stable S1 -> {stable S2, branch T1}, S2 -> branch T2, i.e. three
dependency levels (1, 2 and 1 runs: both submitit's single-job and array submissions). Jobs share a JAX
compilation cache (``JAX_COMPILATION_CACHE_DIR``), so later tests mostly skip compiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit  # noqa: F401 -- in the test extra: a missing submitit fails here instead of skipping

from experiments import executors
from experiments.study_presets import get_study_preset
from experiments.sweep import Rules, plan_wsd, resolve, write_plan

REPO = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake_slurm"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class FakeSlurm:
    """The fake controller's state, read from the test."""

    def __init__(self, ctl: Path):
        self.ctl = ctl

    def state(self) -> dict:
        f = self.ctl / "state.json"
        return json.loads(f.read_text()) if f.exists() else {"jobs": {}}

    def jobs(self) -> list[dict]:
        """Jobs in submission order."""
        return sorted(self.state()["jobs"].values(), key=lambda j: j["submit_seq"])

    def wait(self, timeout: float = 120.0) -> list[dict]:
        """Until every task of every job is finished (COMPLETED, FAILED or CANCELLED)."""
        t0 = time.time()
        while True:
            jobs = self.jobs()
            if jobs and all(t["state"] in TERMINAL for j in jobs for t in j["tasks"].values()):
                return jobs
            if time.time() - t0 > timeout:
                raise TimeoutError(f"fake slurm jobs not finished after {timeout}s: {jobs}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch, jax_cache):
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    ctl = tmp_path / "slurmctld"
    py_bin = str(Path(sys.executable).parent)  # the venv's python3 runs the fake and the jobs
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKE), py_bin, os.environ.get("PATH", "")]))
    monkeypatch.setenv("FAKE_SLURM_DIR", str(ctl))
    monkeypatch.delenv("FAKE_SLURM_CLUSTER", raising=False)
    monkeypatch.setenv("FAKE_SLURM_PARALLEL", "2")  # array tasks at a time (2 cores)
    # jobs import the package from the repository wherever they run (as an installed package would)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(jax_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # submitit's watcher is a class attribute caching job states across calls: fresh ids, fresh watcher
    monkeypatch.setattr(SlurmJob, "watcher", SlurmInfoWatcher(delay_s=1))
    monkeypatch.setattr(SlurmJob, "_results_timeout_s", 1)  # a job that never ran: no 15 s wait for output
    yield FakeSlurm(ctl)
    if (ctl / "state.json").exists():  # leave no runner behind (a failed test's pending jobs)
        subprocess.run(["scancel", "-u", "all"], check=False)


def _micro_wsd(size: int, budgets: int = 2) -> list:
    """cpu-micro's WSD runs for its ``size``-th smallest shape (rules as test_sweep.py's ``_spec_base``)."""
    spec = get_study_preset("cpu-micro")
    g = spec.groups[0]
    rules = Rules(lr=g.lr, batch=spec.batch, warmup_fraction=spec.warmup_fraction)
    m = g.shape.candidates(g.base.model)[size]
    return resolve(plan_wsd(g.base, [m], spec.budgets[:budgets], rules))


def _wsd_plan() -> list:
    runs = _micro_wsd(0)
    assert [r.kind for r in runs] == ["wsd_stable", "wsd_stable", "wsd_branch", "wsd_branch"]
    assert [r.parent and r.parent["run"] for r in runs] == [None, runs[0].name, runs[0].name, runs[1].name]
    return runs


def _mtimes(runs_dir: Path, runs, name: str) -> dict[str, int]:
    return {r.name: (executors.run_dir(runs_dir, r) / name).stat().st_mtime_ns for r in runs}


def _assert_all_finished(runs_dir: Path, runs) -> None:
    for r in runs:
        d = executors.run_dir(runs_dir, r)
        assert executors.finished_summary(d, r) is not None, (r.name, sorted(p.name for p in d.iterdir()))
        assert executors.run_status(runs_dir, r) == "done"
        if r.parent is not None:  # seeded from the parent's final checkpoint, after the parent finished
            parent = next(p for p in runs if p.name == r.parent["run"])
            assert (d / "checkpoints" / str(r.parent["step"])).is_dir()
            pd = executors.run_dir(runs_dir, parent)
            assert (pd / "summary.json").stat().st_mtime_ns <= (d / "plan_record.json").stat().st_mtime_ns


def _assert_levels_in_order(jobs: list[dict]) -> None:
    """Every task of a job started after every task of the job before it ended."""
    for prev, job in zip(jobs, jobs[1:], strict=False):
        last_end = max(t["end_seq"] for t in prev["tasks"].values())
        assert all(t["start_seq"] > last_end for t in job["tasks"].values()), (prev, job)


def test_run_slurm_through_submitit(fake_slurm, tmp_path):
    runs = _wsd_plan()
    runs_dir = tmp_path / "runs"
    params = dict(
        timeout_min=30, slurm_partition="debug", slurm_additional_parameters={"comment": "scalelab-test"}
    )
    res = executors.run_slurm(runs, runs_dir, folder=tmp_path / "submitit", **params)
    assert [r["name"] for r in res] == [r.name for r in runs]  # the plan's order, as the local executors
    assert [r["status"] for r in res] == ["done"] * len(runs), res
    for r, out in zip(runs, res, strict=True):
        assert out["run_id"] == r.run_id
        assert out["summary"] == executors.finished_summary(executors.run_dir(runs_dir, r), r)
    _assert_all_finished(runs_dir, runs)

    jobs = fake_slurm.wait()  # submitit returns on the result file, a moment before the job ends
    assert len(jobs) == 3  # one submission per dependency level: 1 run (a job), 2 runs (an array), 1 run
    assert [j["array"] for j in jobs] == [None, [0, 1], None]
    j0, j1, _ = (j["id"] for j in jobs)
    assert [j["dependency"] for j in jobs] == ["", f"afterok:{j0}", f"afterok:{j1}_0:{j1}_1"]
    assert all(t["state"] == "COMPLETED" for j in jobs for t in j["tasks"].values())
    _assert_levels_in_order(jobs)
    for j in jobs:  # every level keeps the caller's Slurm parameters next to the dependency
        script = Path(j["script"]).read_text()
        assert "#SBATCH --partition=debug" in script and "#SBATCH --comment=scalelab-test" in script
        assert "#SBATCH --time=30" in script
        assert ("#SBATCH --dependency=" in script) == bool(j["dependency"])

    # a second call re-submits the plan; every run is finished, so every job skips without training
    before = _mtimes(runs_dir, runs, "metrics.jsonl")
    res2 = executors.run_slurm(runs, runs_dir, folder=tmp_path / "submitit", **params)
    assert [r["status"] for r in res2] == ["skipped"] * len(runs)
    assert _mtimes(runs_dir, runs, "metrics.jsonl") == before
    assert len(fake_slurm.wait()) == 6


def test_run_slurm_failures_are_reported_not_raised(fake_slurm, tmp_path):
    """A run that fails inside run_one (its job succeeds) and a job that crashes outside it (no result):
    both come back as failed records, and the branch waiting on them never runs."""
    stable, _, branch, _ = _wsd_plan()
    other = _micro_wsd(1, budgets=1)[0]  # another root
    runs = [stable, other, branch]
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    executors.run_dir(runs_dir, stable).write_text("not a directory")  # run_one itself raises: job FAILED
    (executors.run_dir(runs_dir, other) / "train.log").mkdir(parents=True)  # training fails: error.json
    res = executors.run_slurm(runs, runs_dir, folder=tmp_path / "submitit")
    st = {r["name"]: r for r in res}
    assert [r["name"] for r in res] == [r.name for r in runs]
    assert all(r["status"] == "failed" for r in res), res
    jobs = fake_slurm.wait()
    assert [[t["state"] for t in j["tasks"].values()] for j in jobs] == [
        ["FAILED", "COMPLETED"],
        ["CANCELLED"],
    ]
    assert jobs[1]["tasks"][""]["reason"] == "DependencyNeverSatisfied"
    # the crashed job: its remote exception; the job that never ran: its Slurm state
    assert st[stable.name]["error"].startswith(f"slurm job {jobs[0]['id']}_0: FileExistsError")
    assert st[branch.name]["error"].startswith(f"slurm job {jobs[1]['id']}: ")
    assert "(state: CANCELLED)" in st[branch.name]["error"]
    assert "IsADirectoryError" in st[other.name]["error"]
    err = json.loads((executors.run_dir(runs_dir, other) / "error.json").read_text())
    assert "IsADirectoryError" in err["error"] and "Traceback" in err["traceback"]
    assert not executors.run_dir(runs_dir, branch).exists()


def _export(runs, tmp_path: Path) -> tuple[Path, Path]:
    plan = write_plan(runs, tmp_path / "plan.jsonl")
    runs_dir = tmp_path / "runs"
    script = executors.export_job_array(
        runs,
        plan,
        runs_dir,
        tmp_path / "submit.sh",
        max_parallel=2,
        sbatch_options=["partition=debug"],
        python=sys.executable,
    )
    return script, runs_dir


def _submit(script: Path, cwd: Path) -> str:
    out = subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_export_job_array_under_sbatch(fake_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_CLUSTER", "fakecluster")  # --parsable prints ID;CLUSTER
    runs = _wsd_plan()[:3]  # S1 -> {S2, T1}: two levels (three: the run_slurm test)
    script, runs_dir = _export(runs, tmp_path)
    work = tmp_path / "work"  # sbatch's working directory: slurm-%A_%a.out land there
    work.mkdir()
    stdout = _submit(script, work)
    jobs = fake_slurm.wait()
    ids = [j["id"] for j in jobs]
    assert stdout.splitlines() == [f"submitted level {lev} ({i})" for lev, i in enumerate(ids)]
    assert [j["array"] for j in jobs] == [[0], [1, 2]]
    assert [j["max_parallel"] for j in jobs] == [2, 2]
    assert [j["dependency"] for j in jobs] == ["", f"afterok:{ids[0]}"]  # the whole array before
    assert all("--partition=debug" in j["argv"] and j["name"] == f"sweep-l{n}" for n, j in enumerate(jobs))
    assert all(t["state"] == "COMPLETED" for j in jobs for t in j["tasks"].values()), jobs
    _assert_levels_in_order(jobs)
    _assert_all_finished(runs_dir, runs)
    log = (work / f"slurm-{ids[1]}_2.out").read_text()  # array task 2 = plan index 2 = the first branch
    assert json.loads(log.strip().splitlines()[-1])["name"] == runs[2].name

    # re-submitting skips every finished run (no training: metrics untouched)
    before = _mtimes(runs_dir, runs, "metrics.jsonl")
    _submit(script, work)
    jobs = fake_slurm.wait()
    assert len(jobs) == 4 and all(t["state"] == "COMPLETED" for j in jobs for t in j["tasks"].values())
    assert _mtimes(runs_dir, runs, "metrics.jsonl") == before
    for j in jobs[2:]:
        for k in j["tasks"]:
            last = (work / f"slurm-{j['id']}_{k}.out").read_text().strip().splitlines()[-1]
            assert json.loads(last)["status"] == "skipped"


def test_export_job_array_failed_root_blocks_its_branch(fake_slurm, tmp_path):
    stable, _, branch, _ = _wsd_plan()
    runs = [stable, branch]
    script, runs_dir = _export(runs, tmp_path)
    (executors.run_dir(runs_dir, stable) / "train.log").mkdir(parents=True)  # training fails
    _submit(script, tmp_path)
    jobs = fake_slurm.wait()
    assert [j["tasks"][str(i)]["state"] for i, j in enumerate(jobs)] == ["FAILED", "CANCELLED"]
    assert jobs[1]["tasks"]["1"]["reason"] == "DependencyNeverSatisfied"
    err = json.loads((executors.run_dir(runs_dir, stable) / "error.json").read_text())
    assert err["run"] == stable.name and "IsADirectoryError" in err["error"]
    assert executors.run_status(runs_dir, stable) == "failed"
    assert not executors.run_dir(runs_dir, branch).exists()  # never started
