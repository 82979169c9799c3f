"""Checkpoints through orbax's CheckpointManager: keep-N, optional async, restore onto any mesh.

A checkpoint holds the train state (params + optimiser state) and a small JSON ``meta`` dict (run bookkeeping:
timings, last train loss). Restoring takes an abstract target whose leaves are ``jax.ShapeDtypeStruct``s
carrying the *current* mesh's shardings, so orbax reads each array straight into the new layout: a checkpoint
written on 8 devices restores onto 1 (or any other mesh) without a resharding step of our own.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored (each step directory is named in the message)."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        # cleanup_tmp_directories: a save cut short by a kill leaves a "<step>.orbax-checkpoint-tmp*"
        # directory; the next run removes it (in the background, done before its first save).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        # With async saving, orbax copies device buffers to host before returning, so the caller may donate
        # `state` to the next train step right away.
        with _sigint_deferred():
            self._mngr.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """State laid out as ``abstract_state``'s shardings, plus the saved meta dict."""
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def set_aside(self, steps: list[int], dest: Path) -> list[Path]:
        """Move the step directories ``steps`` (unreadable ones) to ``dest``, out of the manager's sight, so
        the next save of those steps starts clean; returns the new paths. Moved, not deleted: a step that
        failed to restore for a reason other than damage can still be inspected or put back."""
        self._mngr.wait_until_finished()
        dest.mkdir(parents=True, exist_ok=True)
        moved = []
        for step in steps:
            target = dest / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(self.directory / str(step)), str(target))
            moved.append(target)
        self._mngr.reload()
        return moved

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives while orbax starts a save until the save call has returned, then
    raise it. Interrupted midway, the save's background threads went on writing while the interpreter shut
    down: tracebacks ("cannot schedule new futures after interpreter shutdown") and a temporary directory
    left behind. Only the main thread can handle signals; elsewhere this does nothing. Nor does it replace a
    handler installed outside Python (``getsignal`` gives None), which could not be put back afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` with the given shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
