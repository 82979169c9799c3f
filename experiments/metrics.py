"""Metrics sinks: ``metrics.jsonl`` (one JSON object per line, the machine-readable record) and TensorBoard.

Resuming from a checkpoint at step ``s`` drops every jsonl record with ``step > s`` (those steps are
recomputed, identically, after the resume) and writes a TensorBoard ``SessionLog.START`` at ``s``, which tells
TensorBoard to purge the orphaned events of the interrupted session. So both sinks read like one uninterrupted
run. TensorBoard files are written with tensorboard's own TF-free ``EventFileWriter``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from experiments.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(
    workdir: str | Path, *, drop_torn_tail: bool = False, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl (none if it does not exist). A line that is not a JSON object
    raises DataError naming the file and line -- except, with ``drop_torn_tail``, the last line: a process
    killed mid-write leaves it cut short, and resuming drops it (its step is recomputed anyway), telling
    ``log``."""
    from experiments.data import DataError

    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    out = []
    for j, (i, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:  # json.JSONDecodeError included
            if drop_torn_tail and j == len(lines) - 1:
                if log is not None:
                    log(f"{path}:{i}: dropped a torn last record ({e}); its step is recomputed")
                break
            raise DataError(f"{path}:{i}: unreadable metrics record ({e})") from e
        out.append(rec)
    return out


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, resume_step: int, enabled: bool = True,
                 log: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tb: EventFileWriter | None = None
        if not enabled:
            return
        kept = [r for r in read_metrics(workdir, drop_torn_tail=True, log=log) if r["step"] <= resume_step]
        # replaced whole: a kill now loses no record
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = EventFileWriter(str(Path(workdir) / "tensorboard"))
        self._tb.add_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=resume_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None
        ]
        assert self._tb is not None
        self._tb.add_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        )

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._file.close()
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    # JSON has no NaN/inf; keep them visible as strings rather than writing invalid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
