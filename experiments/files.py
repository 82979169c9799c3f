"""Writing a file whole or not at all: the records runs, plans and benchmarks keep on disk go through here."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace`` (atomic within a filesystem):
    a reader never sees, and a process killed mid-write never leaves, a half-written file.

    The temporary file is fsynced before the rename and the directory after it: without that, a power loss
    or kernel crash shortly after a run finished can leave ``summary.json`` empty (the rename reached the
    disk, the data did not), and the sweep would retrain a finished run. The cost is one or two fsyncs per
    run record, not per step."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on every platform (Windows)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    return path


def _fsync(path: Path, flags: int) -> None:
    """Flush ``path``'s data (or a directory's entries) to the disk: fsync acts on the file, whatever
    descriptor it is called through."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(
    path: str | os.PathLike, on_unreadable: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, torn (a kill mid-write before writes were
    atomic, or a copy cut short) or not an object, and then ``on_unreadable`` (if given) hears why unless the
    file was simply missing. Callers treat None as "not there": the run is resumed or re-evaluated instead of
    failing on every retry."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if on_unreadable is not None:
            on_unreadable(f"{path} is unreadable ({e})")
        return None
    if not isinstance(value, dict):
        if on_unreadable is not None:
            on_unreadable(f"{path} holds a JSON {type(value).__name__}, not an object")
        return None
    return value


_UNLOCKABLE_WARNED: set[str] = set()


def _warn_unlockable(path: Path, e: OSError) -> None:
    """Warn once per filesystem directory that locking is unavailable there."""
    key = str(path.parent.parent)
    if key not in _UNLOCKABLE_WARNED:
        _UNLOCKABLE_WARNED.add(key)
        warnings.warn(f"cannot lock {path} ({e.strerror or e}): this filesystem has no flock, so nothing "
                      "stops two study commands from writing into one directory at once here",
                      RuntimeWarning, stacklevel=3)


class BusyError(RuntimeError):
    """Another process holds the lock of a directory this process was about to write into."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created, and holding the holder's PID) for the with-block; raise
    BusyError naming ``what`` and the holder's PID if another process holds it. ``flock``: the kernel
    releases it when the holder exits or is killed, so a crash leaves no stale lock. Where ``fcntl`` does not
    exist (Windows) it is a no-op, and on a filesystem without flock a warning."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover -- not POSIX
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise BusyError(
                f"{what} is in use by another process (PID {holder}); two processes writing into it at once "
                "would train the same runs into the same directories. Wait for that one to finish, or stop it"
            ) from None
        except OSError as e:  # a filesystem without flock (e.g. Lustre mounted without -o flock): go on
            _warn_unlockable(Path(path), e)
            locked = False
        else:
            locked = True
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
