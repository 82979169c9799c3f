"""A fake Slurm for tests: ``sbatch``, ``srun``, ``sacct``, ``squeue`` and ``scancel`` on one machine.

The executables in this folder are thin wrappers around ``main()`` below; put the folder first on ``PATH``
and set ``FAKE_SLURM_DIR`` (the controller's state: ``state.json``, copies of submitted scripts, runner logs).

What it emulates
* ``sbatch [OPTIONS] SCRIPT [ARGS]``: options from the command line and from the script's leading
  ``#SBATCH`` lines (the command line wins); ``--array=LIST[%N]`` (``0-3``, ``1,4,7``, ``0-9:2``),
  ``--dependency=afterok|afterany|afternotok:ID[_TASK][:ID...]`` (several joined with ``,``),
  ``--job-name``, ``--output``/``--error`` (``%j %A %a %t %N %u %x`` patterns; the default
  ``slurm-%j.out`` / ``slurm-%A_%a.out`` in the working directory), ``--chdir``, ``--parsable`` (prints
  ``ID``, or ``ID;CLUSTER`` when ``FAKE_SLURM_CLUSTER`` is set) or else ``Submitted batch job ID``. Other
  options are accepted and ignored. A dependency on an unknown job is refused, as Slurm does.
* Job ids: an array takes one id per task, the first being the array's id (``SLURM_ARRAY_JOB_ID``), so
  ``ID_TASK`` names one task, ``ID`` the whole array.
* Execution: ``sbatch`` returns at once; a detached runner process waits until the job's dependencies are
  decided, then runs the script with ``bash`` in the submission directory with the submitter's environment
  plus the ``SLURM_*`` variables of a one-node, one-task allocation, one process per array task, at most
  ``min(%N, FAKE_SLURM_PARALLEL)`` at a time (default 1). Exit status 0 -> COMPLETED, else FAILED.
  A job whose dependency can no longer be satisfied is CANCELLED with reason DependencyNeverSatisfied
  without running (Slurm with ``SchedulerParameters=kill_invalid_depend``); with
  ``FAKE_SLURM_KEEP_INVALID_DEPEND`` set it stays PENDING with that reason until cancelled (Slurm's default).
* ``srun [OPTIONS] CMD...`` inside a job: runs CMD once (task 0) with ``SLURM_PROCID/LOCALID/NODEID`` set,
  its output appended to ``--output``/``--error``.
* ``sacct -j ID [-j ID] -o FIELDS [--parsable2|-P|--parsable|-p] [-n] [-X]``: one row per job or array task
  (``ID`` or ``ID_TASK``) plus a ``.batch`` step row for tasks that started; fields JobID, JobName, State,
  ExitCode, NodeList, Reason. Output is always ``|``-separated.
* ``squeue [-j ID,...] [-h]``: pending and running tasks. ``scancel ID|ID_TASK ... | -u USER``: cancels
  pending tasks and SIGTERMs the process group of running ones (``--signal`` is accepted and ignored).

What it does not emulate: scheduling and resources (partitions, time limits, memory, GPUs are ignored, every
job starts as soon as its dependencies allow), multi-node or multi-task jobs (refused at submission),
requeueing (no ``scontrol``), accounting beyond the fields above, job steps other than ``.batch``.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODE = "fakenode0"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
POLL_S = 0.05
# sbatch / srun short options and the long options that take a separate value (``-J name``, ``--output f``);
# any other ``--name`` without ``=`` is a flag
_SHORT = {"-J": "job-name", "-a": "array", "-d": "dependency", "-o": "output", "-e": "error", "-D": "chdir"}
_SHORT |= {"-N": "nodes", "-n": "ntasks", "-p": "partition", "-t": "time", "-c": "cpus-per-task"}
_VALUED = set(_SHORT.values()) | {
    "wrap",
    "ntasks-per-node",
    "qos",
    "account",
    "mem",
    "gres",
    "signal",
    "open-mode",
}


# ----- state ------------------------------------------------------------------------------------------------
def _dir() -> Path:
    d = os.environ.get("FAKE_SLURM_DIR")
    if not d:
        sys.exit("fake slurm: FAKE_SLURM_DIR is not set")
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _load(d: Path) -> dict:
    f = d / "state.json"
    if not f.exists():
        return {"next_id": int(os.environ.get("FAKE_SLURM_FIRST_ID", "4200")), "seq": 0, "jobs": {}}
    return json.loads(f.read_text())


@contextlib.contextmanager
def locked_state():
    """The state, read under an exclusive lock and written back (atomically) on leaving the block."""
    d = _dir()
    with open(d / "state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = _load(d)
        yield st
        tmp = d / f".state.{os.getpid()}.json"
        tmp.write_text(json.dumps(st, indent=1))
        tmp.replace(d / "state.json")


def read_state(d: str | Path | None = None) -> dict:
    """A snapshot of the state (writes are atomic renames, so no lock is needed to read)."""
    return _load(Path(d) if d is not None else _dir())


def _tick(st: dict) -> int:
    st["seq"] += 1
    return st["seq"]


def task_name(job: dict, key: str) -> str:
    return job["id"] if key == "" else f"{job['id']}_{key}"


# ----- option parsing ---------------------------------------------------------------------------------------
def _parse_opts(args: list[str], stop_at_positional: bool = True) -> tuple[dict[str, str | bool], list[str]]:
    """``--name=value`` / ``--name value`` (known valued options) / ``--flag`` / ``-X value``; returns the
    options and the remaining arguments from the first positional one on."""
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            if eq:
                opts[name] = val
            elif name in _VALUED and i + 1 < len(args):
                opts[name] = args[i + 1]
                i += 1
            else:
                opts[name] = True
        elif a.startswith("-") and len(a) >= 2 and a[:2] in _SHORT:
            val = a[2:] if len(a) > 2 else (args[i + 1] if i + 1 < len(args) else "")
            if len(a) == 2:
                i += 1
            opts[_SHORT[a[:2]]] = val
        elif a.startswith("-") and a != "-":
            opts[a.lstrip("-")] = True
        elif stop_at_positional:
            return opts, args[i:]
        i += 1
    return opts, []


def _script_directives(text: str) -> list[str]:
    """Tokens of the ``#SBATCH`` lines before the first command (as sbatch reads them)."""
    import shlex

    out: list[str] = []
    for line in text.splitlines()[1:]:
        s = line.strip()
        if s.startswith("#SBATCH"):
            out += shlex.split(s[len("#SBATCH") :], comments=True)
        elif s and not s.startswith("#"):
            break
    return out


def parse_array(spec: str) -> tuple[list[int], int | None]:
    spec, _, limit = spec.partition("%")
    idx: list[int] = []
    for part in spec.split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        idx += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return sorted(set(idx)), (int(limit) if limit else None)


def parse_dependency(spec: str) -> list[tuple[str, list[str]]]:
    """``afterok:1:2_3,afterany:4`` -> [("afterok", ["1", "2_3"]), ("afterany", ["4"])] (all must hold)."""
    if "?" in spec:
        raise ValueError("'?' (any-of) dependencies are not emulated")
    out = []
    for clause in spec.split(","):
        kind, *ids = clause.split(":")
        if kind not in ("afterok", "afterany", "afternotok") or not ids or not all(ids):
            raise ValueError(f"unsupported dependency {clause!r}")
        out.append((kind, ids))
    return out


def _dep_tasks(st: dict, ref: str) -> list[dict] | None:
    """The task records a dependency reference names (``ID`` = every task of the job), None if unknown."""
    jid, _, key = ref.partition("_")
    job = st["jobs"].get(jid)
    if job is None:
        return None
    if key:
        return [job["tasks"][key]] if key in job["tasks"] else None
    return list(job["tasks"].values())


def _verdict(st: dict, job: dict) -> str:
    """ "run", "wait" or "never" for a job's dependency."""
    if not job["dependency"]:
        return "run"
    waiting = False
    for kind, refs in parse_dependency(job["dependency"]):
        for ref in refs:
            for t in _dep_tasks(st, ref) or []:
                if t["state"] not in TERMINAL:
                    waiting = True
                elif kind == "afterok" and t["state"] != "COMPLETED":
                    return "never"
                elif kind == "afternotok" and t["state"] == "COMPLETED":
                    return "never"
    return "wait" if waiting else "run"


def _expand(pattern: str, job: dict, key: str, rank: int | None = None) -> str:
    tid = job["tasks"][key]["job_id"]
    rep = {
        "%j": tid,
        "%A": job["id"],
        "%a": key or "4294967294",
        "%t": str(rank if rank is not None else 0),
        "%N": NODE,
        "%u": getpass.getuser(),
        "%x": job["name"],
        "%%": "%",
    }
    return re.sub(r"%[jAatNux%]", lambda m: rep[m.group(0)], pattern)


# ----- commands ---------------------------------------------------------------------------------------------
def sbatch(argv: list[str]) -> int:
    opts, rest = _parse_opts(argv)
    if not rest or "wrap" in opts:
        print("sbatch: error: this fake needs a script file (no stdin scripts, no --wrap)", file=sys.stderr)
        return 1
    script, args = Path(rest[0]), rest[1:]
    text = script.read_text()
    directives, _ = _parse_opts(_script_directives(text), stop_at_positional=False)
    opts = {**directives, **opts}
    for key in ("nodes", "ntasks", "ntasks-per-node"):
        if key in opts and int(str(opts[key]).split("-")[0]) > 1:
            msg = f"fake slurm runs one task on one node (got --{key}={opts[key]})"
            print(f"sbatch: error: {msg}", file=sys.stderr)
            return 1
    array, limit = parse_array(str(opts["array"])) if "array" in opts else (None, None)
    dependency = str(opts.get("dependency") or "")
    cwd = str(Path(str(opts.get("chdir") or os.getcwd())).absolute())
    try:
        deps = parse_dependency(dependency) if dependency else []
    except ValueError as e:
        print(f"sbatch: error: {e}", file=sys.stderr)
        return 1
    with locked_state() as st:
        for _, refs in deps:
            if any(_dep_tasks(st, ref) is None for ref in refs):
                print("sbatch: error: Batch job submission failed: Job dependency problem", file=sys.stderr)
                return 1
        jid = st["next_id"]
        keys = [str(i) for i in array] if array is not None else [""]
        st["next_id"] += len(keys)
        copy = _dir() / "scripts" / f"{jid}.sh"
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(text)  # Slurm keeps its own copy: the submitter may move or delete the file
        default_out = "slurm-%A_%a.out" if array is not None else "slurm-%j.out"
        seq = _tick(st)
        st["jobs"][str(jid)] = {
            "id": str(jid),
            "name": str(opts.get("job-name") or script.name),
            "argv": argv,
            "script": str(copy),
            "args": args,
            "cwd": cwd,
            "array": array,
            "max_parallel": limit,
            "dependency": dependency,
            "output": str(opts.get("output") or default_out),
            "error": str(opts.get("error") or opts.get("output") or default_out),
            "submit_seq": seq,
            "submit_time": time.time(),
            "tasks": {
                k: {"job_id": str(jid + n), "state": "PENDING", "reason": "None", "exit_code": "0:0"}
                for n, k in enumerate(keys)
            },
        }
    with open(_dir() / f"runner-{jid}.log", "ab") as log:  # the runner outlives sbatch, as slurmd would
        subprocess.Popen(
            [sys.executable, str(Path(__file__).absolute()), "_run", str(jid)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = os.environ.get("FAKE_SLURM_CLUSTER")
    if opts.get("parsable"):
        print(f"{jid};{cluster}" if cluster else jid)
    else:
        print(f"Submitted batch job {jid}" + (f" on cluster {cluster}" if cluster else ""))
    if opts.get("wait"):
        while any(t["state"] not in TERMINAL for t in read_state()["jobs"][str(jid)]["tasks"].values()):
            time.sleep(POLL_S)
        bad = [t for t in read_state()["jobs"][str(jid)]["tasks"].values() if t["state"] != "COMPLETED"]
        return 1 if bad else 0
    return 0


def _task_env(job: dict, key: str) -> dict[str, str]:
    env = dict(os.environ)
    t = job["tasks"][key]
    env.update(
        SLURM_JOB_ID=t["job_id"],
        SLURM_JOBID=t["job_id"],
        SLURM_JOB_NAME=job["name"],
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST=NODE,
        SLURM_NODELIST=NODE,
        SLURMD_NODENAME=NODE,
        SLURM_NTASKS="1",
        SLURM_NPROCS="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_SUBMIT_DIR=job["cwd"],
        SLURM_SUBMIT_HOST=socket.gethostname(),
        SLURM_CLUSTER_NAME=os.environ.get("FAKE_SLURM_CLUSTER", "fake"),
    )
    for k in [k for k in env if k.startswith("SLURM_ARRAY_")]:
        del env[k]
    if key:
        env.update(
            SLURM_ARRAY_JOB_ID=job["id"],
            SLURM_ARRAY_TASK_ID=key,
            SLURM_ARRAY_TASK_COUNT=str(len(job["array"])),
            SLURM_ARRAY_TASK_MIN=str(min(job["array"])),
            SLURM_ARRAY_TASK_MAX=str(max(job["array"])),
        )
    return env


def run_job(jid: str) -> int:
    """The runner of one job (started detached by sbatch): wait for the dependency, then run the tasks."""
    while True:
        with locked_state() as st:
            job = st["jobs"][jid]
            pending = [k for k, t in job["tasks"].items() if t["state"] == "PENDING"]
            if not pending:
                return 0  # cancelled meanwhile
            v = _verdict(st, job)
            if v == "never" and not os.environ.get("FAKE_SLURM_KEEP_INVALID_DEPEND"):
                for k in pending:
                    t = job["tasks"][k]
                    t.update(state="CANCELLED", reason="DependencyNeverSatisfied", end_seq=_tick(st))
                return 0
            if v != "run":  # "never" kept pending (Slurm's default): until scancel
                for k in pending:
                    job["tasks"][k]["reason"] = "Dependency" if v == "wait" else "DependencyNeverSatisfied"
        if v == "run":
            break
        time.sleep(POLL_S)
    width = max(1, int(os.environ.get("FAKE_SLURM_PARALLEL", "1")))
    if job["max_parallel"]:
        width = min(width, job["max_parallel"])
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < width:
            k = pending.pop(0)
            with locked_state() as st:
                t = st["jobs"][jid]["tasks"][k]
                if t["state"] != "PENDING":
                    continue
                t.update(
                    state="RUNNING", reason="None", start_seq=_tick(st), start_time=time.time(), node=NODE
                )
            out = Path(job["cwd"]) / _expand(job["output"], job, k)
            err = Path(job["cwd"]) / _expand(job["error"], job, k)
            out.parent.mkdir(parents=True, exist_ok=True)
            err.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "ab") as fo, open(err, "ab") as fe:
                p = subprocess.Popen(
                    ["bash", job["script"], *job["args"]],
                    cwd=job["cwd"],
                    env=_task_env(job, k),
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe if err != out else subprocess.STDOUT,
                    start_new_session=True,
                )
            running[k] = p
            with locked_state() as st:
                st["jobs"][jid]["tasks"][k]["pid"] = p.pid
        for k, p in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            del running[k]
            with locked_state() as st:
                t = st["jobs"][jid]["tasks"][k]
                if t["state"] == "RUNNING":
                    t["state"] = "COMPLETED" if rc == 0 else "FAILED"
                t.update(
                    exit_code=f"{max(rc, 0)}:{max(-rc, 0)}", end_seq=_tick(st), end_time=time.time(), pid=None
                )
        time.sleep(POLL_S)
    return 0


def srun(argv: list[str]) -> int:
    opts, cmd = _parse_opts(argv)
    if not cmd:
        print("srun: error: no command", file=sys.stderr)
        return 1
    if int(str(opts.get("ntasks", 1))) > 1 or int(str(opts.get("nodes", 1)).split("-")[0]) > 1:
        print("srun: error: fake slurm runs one task on one node", file=sys.stderr)
        return 1
    env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_STEP_ID="0")
    env["SLURM_STEPID"] = "0"
    jid = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    job = read_state()["jobs"].get(jid or "") if jid else None
    key = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    files = []
    for name in ("output", "error"):
        v = opts.get(name)
        if isinstance(v, str) and job is not None:
            files.append(open(_expand(v, job, key, rank=0), "ab"))
        else:
            files.append(None)
    out, err = files
    if err is None and out is not None:
        err = subprocess.STDOUT
    try:
        return subprocess.call(cmd, env=env, stdout=out, stderr=err)
    finally:
        for f in files:
            if f is not None:
                f.close()


def _selected(st: dict, ids: list[str]) -> list[tuple[dict, str]]:
    out = []
    for jid, job in st["jobs"].items():
        for k in job["tasks"]:
            name = task_name(job, k)
            if not ids or jid in ids or name in ids:
                out.append((job, k))
    return out


def sacct(argv: list[str]) -> int:
    ids: list[str] = []
    fields = ["JobID", "JobName", "State", "ExitCode"]
    header, steps, trailing = True, True, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-j", "--jobs", "-o", "--format"):
            val = argv[i + 1]
            i += 1
        elif a.startswith(("--jobs=", "--format=")):
            a, val = a.split("=", 1)
        else:
            val = ""
        if a in ("-j", "--jobs"):
            ids += [x for x in val.split(",") if x]
        elif a in ("-o", "--format"):
            fields = [f.split("%")[0] for f in val.split(",")]
        elif a in ("-n", "--noheader"):
            header = False
        elif a in ("-X", "--allocations"):
            steps = False
        elif a in ("-p", "--parsable"):
            trailing = True
        i += 1
    st = read_state()
    rows = []
    for job, k in _selected(st, ids):
        t = job["tasks"][k]
        row = {
            "JobID": task_name(job, k),
            "JobName": job["name"],
            "State": t["state"],
            "ExitCode": t["exit_code"],
            "NodeList": t.get("node", "None assigned"),
            "Reason": t["reason"],
        }
        rows.append(row)
        if steps and "start_seq" in t:
            rows.append(dict(row, JobID=row["JobID"] + ".batch", JobName="batch"))
    end = "|" if trailing else ""
    lines = ["|".join(fields) + end] if header else []
    lines += ["|".join(str(r.get(f, "")) for f in fields) + end for r in rows]
    print("\n".join(lines))
    return 0


def squeue(argv: list[str]) -> int:
    opts, _ = _parse_opts(argv, stop_at_positional=False)
    ids = str(opts.get("jobs") or opts.get("j") or "").split(",")
    ids = [x for x in ids if x]
    if not (opts.get("h") or opts.get("noheader")):
        print("JOBID NAME STATE REASON")
    for job, k in _selected(read_state(), ids):
        t = job["tasks"][k]
        if t["state"] not in TERMINAL:
            print(task_name(job, k), job["name"], t["state"], t["reason"])
    return 0


def scancel(argv: list[str]) -> int:
    ids: list[str] = []
    everyone = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-u", "--user", "--signal", "-s"):
            everyone |= a in ("-u", "--user")
            i += 1
        elif a.startswith("--user="):
            everyone = True
        elif not a.startswith("-"):
            ids.append(a)
        i += 1
    if not ids and not everyone:
        print("scancel: error: no job identification provided", file=sys.stderr)
        return 1
    with locked_state() as st:
        for job, k in _selected(st, [] if everyone else ids):
            t = job["tasks"][k]
            if t["state"] == "PENDING":
                t.update(state="CANCELLED", reason="None", end_seq=_tick(st))
            elif t["state"] == "RUNNING":
                t["state"] = "CANCELLED"
                if t.get("pid"):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(t["pid"], signal.SIGTERM)
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel}


def main(name: str, argv: list[str]) -> int:
    return COMMANDS[name](argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_run"]:
        sys.exit(run_job(sys.argv[2]))
    sys.exit(main(sys.argv[1], sys.argv[2:]))
