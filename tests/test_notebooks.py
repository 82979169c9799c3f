"""Every notebook in notebooks/ runs top to bottom (nbclient), and is committed executed, without errors.

The notebooks are documentation that must stay true: a change in an API they call breaks this test. They run
in a fresh kernel whose Python is the interpreter running pytest (a kernelspec written to a temporary
JUPYTER_PATH, so a globally installed "python3" kernel pointing at another Python cannot be picked up), with
the notebook's own directory as working directory, as Jupyter would start it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; generous: the training cells take ~1-2 min on 2 idle cores, more under load
FORCED_DEVICES = "--xla_force_host_platform_device_count"


def _kernel_env(monkeypatch, tmp_path: Path) -> None:
    """Kernelspec "python3" -> this interpreter, found first via JUPYTER_PATH; environment of a plain user."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (scalelab test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # tests/conftest.py fakes 8 CPU devices for the sharding tests; a user's notebook sees the real device
    # count, and the notebooks' small batches are sized for that.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FORCED_DEVICES))
    if flags:
        monkeypatch.setenv("XLA_FLAGS", flags)
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("SCALELAB_STUDY_DIR", raising=False)  # tiny_isoflop_study: train, don't load


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"chinchilla_replication.ipynb", "downstream_prediction.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed(path):
    """Committed with outputs (they must read well without running) and no error output."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code cells"
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} were not executed before committing"
    errors = [o.get("ename") for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with errors: {errors}"
    assert sum(len(c.get("outputs", [])) for c in code) >= len(code) // 2, f"{path.name}: outputs stripped?"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    _kernel_env(monkeypatch, tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The training notebooks write their runs under tempfile.mkdtemp(); point the kernel's TMPDIR at a
    # directory removed afterwards (short path: multiprocessing puts AF_UNIX sockets there, max ~100 chars).
    scratch = tempfile.mkdtemp(prefix="scalelab-nb-")
    monkeypatch.setenv("TMPDIR", scratch)
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised:\n{err}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {[o.get('ename') for o in errors]}"
