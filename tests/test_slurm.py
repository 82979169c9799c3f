"""The cluster paths of experiments/executors.py end to end under a fake Slurm, training tiny runs for real:

* ``run_slurm``: the real submitit (``AutoExecutor``) submits the roots of the plan as one job (array) and
  every WSD continuation or branch as a job ``afterok`` on its own parent's job; the jobs train through
  submitit's own job script and ``srun`` line; a job whose run failed fails, so only its descendants stop;
* ``export_job_array``: the exported ``submit.sh`` is executed with ``bash`` and its ``sbatch`` calls
  submit ``submit_task.sh`` arrays (``python -m experiments.executors run-one``), one per dependency level
  chained with ``afterany``; a task whose parent run did not finish fails at once without training.

The fake (tests/fake_slurm/, documented in ``_fakeslurm.py``) puts ``sbatch``, ``srun``, ``sacct``,
``squeue`` and ``scancel`` first on ``PATH``. It emulates what these paths use: ``#SBATCH`` lines and
command-line options, ``--array=LIST%N``, ``--dependency=afterok|afterany:ID[_TASK][:...]``, ``--parsable``
(``ID;CLUSTER`` output), output-file patterns, the ``SLURM_*`` environment of a one-node, one-task job, and
``sacct``'s parsable state table, with job states in a JSON file. ``sbatch`` returns at once; a detached
runner starts the job when its dependencies are decided (submitit moves its pickles into place only after
``sbatch`` returns, so jobs cannot run inside ``sbatch``). A job whose ``afterok`` parent failed is
CANCELLED (DependencyNeverSatisfied) without running, or with ``FAKE_SLURM_KEEP_INVALID_DEPEND`` stays
PENDING until cancelled (Slurm's default). It does not emulate scheduling or resources
(partitions, time limits, memory, GPUs are ignored), multi-node or multi-task jobs, requeueing or preemption.

The plan is one cpu-micro model's WSD chain: stable S1 -> {stable S2, branch T1}, S2 -> branch T2, i.e. three
dependency levels (1, 2 and 1 runs); the failure tests add roots of other sizes (submitit's array
submission). Jobs share a JAX compilation cache (``JAX_COMPILATION_CACHE_DIR``), so later tests mostly skip
compiling.
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

from experiments import executors, slurm
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


def _assert_after_dependencies(jobs: list[dict]) -> None:
    """Every task that started did so after every task its job depends on (``ID`` or ``ID_TASK``) ended."""
    by_id = {j["id"]: j for j in jobs}
    for job in jobs:
        if not job["dependency"]:
            continue
        _, *refs = job["dependency"].split(":")
        ends = []
        for ref in refs:
            jid, _, key = ref.partition("_")
            tasks = by_id[jid]["tasks"]
            ends += [tasks[key]["end_seq"]] if key else [t["end_seq"] for t in tasks.values()]
        for t in job["tasks"].values():
            assert "start_seq" not in t or t["start_seq"] > max(ends), (job, refs)


def test_run_slurm_through_submitit(fake_slurm, tmp_path):
    runs = _wsd_plan()
    runs_dir = tmp_path / "runs"
    params = dict(
        timeout_min=30, slurm_partition="debug", slurm_additional_parameters={"comment": "scalelab-test"}
    )
    res = slurm.run_slurm(runs, runs_dir, folder=tmp_path / "submitit", **params)
    assert [r["name"] for r in res] == [r.name for r in runs]  # the plan's order, as the local executors
    assert [r["status"] for r in res] == ["done"] * len(runs), res
    for r, out in zip(runs, res, strict=True):
        assert out["run_id"] == r.run_id
        assert out["summary"] == executors.finished_summary(executors.run_dir(runs_dir, r), r)
    _assert_all_finished(runs_dir, runs)

    jobs = fake_slurm.wait()  # submitit returns on the result file, a moment before the job ends
    # the root (an array of one: a plain job), then a job per run with a parent, afterok on that parent only:
    # S2 and T1 wait for S1, T2 for S2 alone (it need not wait for T1)
    assert len(jobs) == len(runs) and all(j["array"] is None for j in jobs)
    s1, s2, _, _ = (j["id"] for j in jobs)
    assert [j["dependency"] for j in jobs] == ["", f"afterok:{s1}", f"afterok:{s1}", f"afterok:{s2}"]
    assert all(t["state"] == "COMPLETED" for j in jobs for t in j["tasks"].values())
    _assert_after_dependencies(jobs)
    for j in jobs:  # every job keeps the caller's Slurm parameters next to the dependency
        script = Path(j["script"]).read_text()
        assert "#SBATCH --partition=debug" in script and "#SBATCH --comment=scalelab-test" in script
        assert "#SBATCH --time=30" in script
        assert ("#SBATCH --dependency=" in script) == bool(j["dependency"])

    # a second call re-submits the plan; every run is finished, so every job skips without training
    before = _mtimes(runs_dir, runs, "metrics.jsonl")
    res2 = slurm.run_slurm(runs, runs_dir, folder=tmp_path / "submitit", **params)
    assert [r["status"] for r in res2] == ["skipped"] * len(runs)
    assert _mtimes(runs_dir, runs, "metrics.jsonl") == before
    assert len(fake_slurm.wait()) == 2 * len(runs)


def test_run_slurm_failed_run_stops_only_its_descendants(fake_slurm, tmp_path, monkeypatch):
    """Three roots: A fails inside run_one (error.json; its job fails with that error), C crashes outside it
    (no result), B trains. A's branch never runs: Slurm (by default) keeps it pending on a dependency that can
    never be satisfied, and run_slurm cancels it instead of waiting forever. B's branch waits for B alone and
    trains. Every run comes back as a record, none raises."""
    monkeypatch.setenv("FAKE_SLURM_KEEP_INVALID_DEPEND", "1")
    b, _, b_branch, _ = _wsd_plan()  # the shape the first test compiled (the JAX cache is shared)
    a, a_branch = _micro_wsd(1, budgets=1)
    c = _micro_wsd(2, budgets=1)[0]
    runs = [a, c, b, a_branch, b_branch]
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (executors.run_dir(runs_dir, a) / "train.log").mkdir(parents=True)  # training fails: error.json
    executors.run_dir(runs_dir, c).write_text("not a directory")  # run_one itself raises
    res = slurm.run_slurm(runs, runs_dir, folder=tmp_path / "submitit")  # no timeout_min: the default
    st = {r["name"]: r for r in res}
    assert [r["name"] for r in res] == [r.name for r in runs]
    assert [r["status"] for r in res] == ["failed", "failed", "done", "failed", "done"], res
    jobs = fake_slurm.wait()
    assert len(jobs) == 3
    roots, a_job, b_job = jobs
    r0 = roots["id"]
    assert roots["array"] == [0, 1, 2] and a_job["array"] is None and b_job["array"] is None
    assert [t["state"] for t in roots["tasks"].values()] == ["FAILED", "FAILED", "COMPLETED"]
    assert a_job["dependency"] == f"afterok:{r0}_0" and b_job["dependency"] == f"afterok:{r0}_2"
    assert a_job["tasks"][""]["state"] == "CANCELLED" and "start_seq" not in a_job["tasks"][""]
    assert b_job["tasks"][""]["state"] == "COMPLETED"
    _assert_after_dependencies(jobs)
    assert all("#SBATCH --time=1440" in Path(j["script"]).read_text() for j in jobs)  # 24 h, not 5 min
    # the failed run: its own error, as in its error.json (the job raised RunFailed with it)
    err = json.loads((executors.run_dir(runs_dir, a) / "error.json").read_text())
    assert "IsADirectoryError" in err["error"] and "Traceback" in err["traceback"]
    assert st[a.name]["error"] == err["error"]
    # the crashed job: its remote exception; the cancelled one: its failed parent
    assert st[c.name]["error"].startswith(f"slurm job {r0}_1: FileExistsError")
    assert st[a_branch.name]["error"] == f"parent {a.name!r} failed (slurm job {a_job['id']} cancelled)"
    assert not executors.run_dir(runs_dir, a_branch).exists()
    _assert_all_finished(runs_dir, [b, b_branch])


class _StubJob:
    job_id = "77_3"

    class paths:  # noqa: N801 -- submitit's job.paths
        stderr = Path("/logs/77_3_0_log.err")

    def __init__(self, trace: str):
        self.trace = trace

    def result(self):
        from submitit.core.utils import FailedJobError

        raise FailedJobError(  # the text of submitit's Job.exception()
            "Job (task=0) failed during processing with trace:\n"
            f"----------------------\n{self.trace}\n----------------------\n"
            "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - x\n  - y"
        )


def _trace(exc: Exception) -> str:
    import traceback

    try:
        raise exc
    except Exception:
        return traceback.format_exc()


def test_slurm_result_of_a_failed_run_is_the_run_error():
    r = _wsd_plan()[0]
    msg = "ConfigError: plan.jsonl:3: bad value\n  expected a number"  # a run error of several lines
    got = slurm._slurm_result(r, _StubJob(_trace(slurm.RunFailed(msg))))
    assert got == {"name": r.name, "run_id": r.run_id, "status": "failed", "error": msg}
    got = slurm._slurm_result(r, _StubJob(_trace(KeyError("x"))))  # raised outside run_one
    assert got["error"] == "slurm job 77_3: KeyError: 'x' (log: /logs/77_3_0_log.err)"


def test_study_slurm_options(tmp_path, monkeypatch):
    """``--slurm KEY=VALUE`` (numbers parsed) reaches run_slurm through run_study and execute."""
    from experiments import study

    got = study.parse_slurm_params(
        ["slurm_partition=gpu", "timeout_min=720", "mem_gb=40.5", "gpus_per_node=2", "cpus_per_task=1e1"]
        + ["slurm_time=01:00:00", "slurm_account=007", "slurm_comment=a=b", "slurm_qos=1.2.3"]
        + ["slurm_use_srun=false", 'slurm_additional_parameters={"reservation": "r1"}', "x=+2"]
    )
    assert got == {
        "slurm_partition": "gpu",
        "timeout_min": 720,
        "mem_gb": 40.5,
        "gpus_per_node": 2,
        "cpus_per_task": 10.0,
        "slurm_time": "01:00:00",
        "slurm_account": "007",  # not a JSON number: stays the string it is
        "slurm_comment": "a=b",
        "slurm_qos": "1.2.3",
        "slurm_use_srun": False,
        "slurm_additional_parameters": {"reservation": "r1"},
        "x": "+2",
    }
    assert all(type(got[k]) is int for k in ("timeout_min", "gpus_per_node"))
    for bad in ("timeout_min", "=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            study.parse_slurm_params([bad])

    calls = []
    monkeypatch.setattr(study, "run_study", lambda *a, **k: calls.append(k))
    study.main(["--out", str(tmp_path), "--executor", "slurm", "--slurm", "timeout_min=90", "--slurm", "a=b"])
    assert calls[-1]["slurm_params"] == {"timeout_min": 90, "a": "b"}
    with pytest.raises(SystemExit):  # not for the local executors
        study.main(["--out", str(tmp_path), "--slurm", "timeout_min=90"])
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), "--executor", "slurm", "--slurm", "timeout_min"])

    seen = {}
    monkeypatch.setattr(slurm, "run_slurm", lambda runs, runs_dir, **k: seen.update(k) or [])
    study.execute([], tmp_path / "runs", workers=1, post_run="m:f", executor="slurm", slurm_params=got)
    assert seen == {"folder": tmp_path / "slurm", "post_run": "m:f", **got}


def _export(runs, tmp_path: Path, post_run: str | None = None) -> tuple[Path, Path]:
    plan = write_plan(runs, tmp_path / "plan.jsonl")
    runs_dir = tmp_path / "runs"
    script = slurm.export_job_array(
        runs,
        plan,
        runs_dir,
        tmp_path / "submit.sh",
        max_parallel=2,
        sbatch_options=["partition=debug"],
        python=sys.executable,
        post_run=post_run,
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
    assert "--post-run" not in (tmp_path / "submit_task.sh").read_text()
    work = tmp_path / "work"  # sbatch's working directory: slurm-%A_%a.out land there
    work.mkdir()
    stdout = _submit(script, work)
    jobs = fake_slurm.wait()
    ids = [j["id"] for j in jobs]
    assert stdout.splitlines() == [f"submitted level {lev} ({i})" for lev, i in enumerate(ids)]
    assert [j["array"] for j in jobs] == [[0], [1, 2]]
    assert [j["max_parallel"] for j in jobs] == [2, 2]
    assert [j["dependency"] for j in jobs] == ["", f"afterany:{ids[0]}"]  # the whole array before
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


def post_run_marker(cfg, run_dir) -> None:
    """A post-run hook for the exported task script (the job imports it as ``test_slurm:post_run_marker``)."""
    (Path(run_dir) / "post_run.txt").write_text(json.dumps(cfg.to_dict()["model"]))


def test_export_job_array_failed_root_stops_only_its_branch(fake_slurm, tmp_path, monkeypatch):
    """Levels are chained with afterany: the branch of a failed root starts, but fails at once without
    training (its parent has not finished); the branch of a root that trained trains, then runs the
    post-run hook the script passes (``--post-run``)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ["PYTHONPATH"]]))
    b, _, b_branch, _ = _wsd_plan()
    a, a_branch = _micro_wsd(1, budgets=1)
    runs = [a, b, a_branch, b_branch]
    script, runs_dir = _export(runs, tmp_path, post_run="test_slurm:post_run_marker")
    assert "--post-run test_slurm:post_run_marker" in (tmp_path / "submit_task.sh").read_text()
    (executors.run_dir(runs_dir, a) / "train.log").mkdir(parents=True)  # training fails
    _submit(script, tmp_path)
    jobs = fake_slurm.wait()
    assert [j["dependency"] for j in jobs] == ["", f"afterany:{jobs[0]['id']}"]
    assert [[t["state"] for t in j["tasks"].values()] for j in jobs] == [["FAILED", "COMPLETED"]] * 2
    _assert_levels_in_order(jobs)
    err = json.loads((executors.run_dir(runs_dir, a) / "error.json").read_text())
    assert err["run"] == a.name and "IsADirectoryError" in err["error"]
    assert executors.run_status(runs_dir, a) == "failed"
    # A's branch: failed fast, nothing seeded or trained; the error names the parent and its status
    d = executors.run_dir(runs_dir, a_branch)
    err = json.loads((d / "error.json").read_text())
    assert err["run"] == a_branch.name
    assert err["error"] == f"parent {a.name!r} has not finished (status: failed)"
    assert not (d / "checkpoints").exists() and not (d / "metrics.jsonl").exists()
    assert executors.run_status(runs_dir, a_branch) == "failed"
    last = json.loads((tmp_path / f"slurm-{jobs[1]['id']}_2.out").read_text().strip().splitlines()[-1])
    assert last["status"] == "failed" and last["error"] == err["error"]
    # B's branch trained, and the hook ran for it (not for the stable runs: the hook skips those)
    _assert_all_finished(runs_dir, [b, b_branch])
    assert (executors.run_dir(runs_dir, b_branch) / "post_run.txt").exists()
    assert not (executors.run_dir(runs_dir, b) / "post_run.txt").exists()
    assert not (d / "post_run.txt").exists()


def _array_tasks(script: Path) -> list[int]:
    return [int(i) for line in script.read_text().splitlines() if "--array=" in line
            for i in line.split("--array=")[1].split("%")[0].split(",")]


def test_study_exports_its_lr_sweep_then_the_main_stage_with_the_fitted_rule(tmp_path):
    """``--export-slurm`` of a preset that sweeps LR: the first script holds only stage 1 (the LR sweep) and
    no plan.jsonl is written -- the main stage's learning rates come from the rule fitted on stage 1, which a
    one-shot export would have frozen at the prior rule. Once stage 1 has finished, the same command fits the
    rule and exports the whole plan, whose task script runs the study's downstream battery (--post-run)."""
    import math

    from experiments import study
    from experiments.sweep import distinct_runs, read_plan

    spec = get_study_preset("cpu-tiny")
    assert spec.downstream
    out, script = tmp_path / "s", tmp_path / "submit.sh"
    assert study.run_study(spec, out, export_slurm=str(script)) == {}
    assert not (out / study.PLAN_FILE).exists() and not (out / study.LR_RULES_FILE).exists()
    stage1 = read_plan(out / study.LR_STAGE_PLAN_FILE)
    assert stage1 and {r.kind for r in stage1} == {"lr_sweep"}
    assert sorted(_array_tasks(script)) == list(range(len(stage1)))
    assert "--post-run" not in (tmp_path / "submit_task.sh").read_text()  # as the local stage 1
    # Stage 1 "runs" on the cluster: every cell's loss is a parabola in log(lr) with its minimum at 2x the
    # prior rule's lr, so the fitted rule doubles the prior's learning rates.
    prior = spec.groups[0].lr
    for r in stage1:
        x = math.log(r.learning_rate / prior(N=r.params, D=r.tokens, C=r.budget) / 2.0)
        d = executors.run_dir(out / "runs", r)
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps(
            {"config": r.config, "steps": r.steps, "final_eval_loss": 3.0 + 0.1 * x * x}))
    assert study.run_study(spec, out, export_slurm=str(script)) == {}
    rules = json.loads((out / study.LR_RULES_FILE).read_text())
    assert rules["dense-adamw"]["error"] is None
    plan = read_plan(out / study.PLAN_FILE)
    iso = [r for r in plan if r.kind == "isoflop"]
    doubled = [2 * prior(N=r.params, D=r.tokens, C=r.budget) for r in iso]
    assert iso and [r.learning_rate for r in iso] == pytest.approx(doubled, rel=1e-6)
    assert f"--post-run {study.POST_RUN}" in (tmp_path / "submit_task.sh").read_text()
    # Each experiment is one array task (an experiment planned twice would be two tasks in one directory).
    ids = [plan[i].run_id for i in _array_tasks(script)]
    assert len(ids) == len(set(ids)) == len({r.run_id for r in distinct_runs(plan)})
    study.run_study(spec, out, export_slurm=str(script), downstream=False)
    assert "--post-run" not in (tmp_path / "submit_task.sh").read_text()


def test_fit_only_without_a_plan_refuses_and_writes_nothing(tmp_path):
    """--fit-only on a new directory used to write plan.jsonl at the prior LR rule (its LR sweep skipped),
    which the real study then reused: every later run trained at an untuned learning rate."""
    from experiments import study

    with pytest.raises(SystemExit, match="--fit-only: .*plan.jsonl does not exist"):
        study.run_study(get_study_preset("cpu-tiny"), tmp_path / "s", fit_only=True)
    assert not (tmp_path / "s").exists()  # nothing created either
