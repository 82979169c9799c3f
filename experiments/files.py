"""Writing a file whole or not at all: the records runs, plans and benchmarks keep on disk go through here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace`` (atomic within a filesystem):
    a reader never sees, and a process killed mid-write never leaves, a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


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
