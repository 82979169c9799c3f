"""Writing a file whole or not at all: the records runs, plans and benchmarks keep on disk go through here."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace`` (atomic within a filesystem):
    a reader never sees, and a process killed mid-write never leaves, a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
