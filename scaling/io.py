"""Data loaders for scaling-law tables (numpy + stdlib only).

A *table* is a ``dict[str, np.ndarray]`` of equal-length columns: float64 where every non-blank entry parses
as a number (blanks -> NaN), otherwise an object array of strings. Sources:
- CSV files (header row), JSON lines (one object per line), a JSON file holding a list of objects;
- a directory of training runs: every ``summary.json`` below it (the trainer's output; nested dicts such as
  ``config`` are flattened with dots, e.g. ``config.model.d_model``), plus a ``run`` column (relative path).

``law_data`` turns a table into the arrays a law needs, mapping law variables to columns, and derives the
token count D = C / (6 N) (Kaplan et al. 2020; Hoffmann et al. 2022) -- or D = C / flops_per_token(N) for a
user FLOP model -- when only compute is given, saying so in a message. Missing columns, NaN/inf and
non-positive values raise ValueError naming the column and the offending rows.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "load_table",
    "read_csv",
    "read_jsonl",
    "iter_jsonl",
    "read_summaries",
    "parse_columns",
    "filter_rows",
    "source_rows",
    "file_rows",
    "law_data",
    "derive_tokens",
    "SUMMARY_COLUMNS",
]

# Default mapping of law variables to the trainer's summary.json keys (see DESIGN: summary.json keys).
SUMMARY_COLUMNS = {"N": "params", "D": "tokens", "C": "flops", "loss": "final_eval_loss"}


def _column(values: list) -> np.ndarray:
    """Numeric column if every non-blank value is a number (None/"" -> NaN), else strings."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip() == ""):
            out[i] = np.nan
        elif isinstance(v, bool):
            out[i] = float(v)
        else:
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                return np.array(["" if x is None else str(x) for x in values], dtype=object)
    return out


def _rows_to_table(rows: list[dict], source: str) -> dict[str, np.ndarray]:
    if not rows:
        raise ValueError(f"{source}: no data rows")
    keys: list[str] = []
    for r in rows:  # union of keys, first-seen order, so ragged JSON lines still load
        keys.extend(k for k in r if k not in keys)
    return {k: _column([r.get(k) for r in rows]) for k in keys}


def read_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a CSV file with a header row into a table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                         "(Excel: CSV UTF-8)") from None
    header = text.split("\n", 1)[0]
    # Tab-separated (a .tsv, or a header with tabs and no commas) is read as such.
    tabs = path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tabs else ",")
    if reader.fieldnames is None:
        raise ValueError(f"{path}: empty CSV (no header row)")
    if len(reader.fieldnames) == 1 and ";" in reader.fieldnames[0]:
        raise ValueError(f"{path}: the header is one column, {reader.fieldnames[0]!r}: semicolon-separated? "
                         "Save it comma-separated (with '.' as the decimal point)")
    rows = [dict(r) for r in reader]
    return _rows_to_table(rows, str(path))


def read_jsonl(path: str | Path) -> dict[str, np.ndarray]:
    """Read JSON lines (one object per non-blank line) into a table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = [_flatten(obj) for _, obj in iter_jsonl(path)]
    return _rows_to_table(rows, str(path))


def iter_jsonl(
    path: str | Path,
    *,
    error: Callable[[str], Exception] = ValueError,
    invalid: str = "invalid JSON ({e.msg})",
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON lines file (numbers count from 1,
    blank lines included). A line that is not valid JSON, or not a JSON object, raises ``error`` with a
    message starting ``"{path}:{lineno}: "``; ``invalid`` is the rest of the bad-JSON message, formatted
    with ``e`` = the ``json.JSONDecodeError``. Callers do their own validation of each object."""
    with Path(path).open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if any("\udc80" <= ch <= "\udcff" for ch in line):  # an undecodable byte, kept to be named
                raise error(f"{path}:{lineno}: not UTF-8 text")
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\n"))  # without it, an error at the end reads "line 2 column 1"
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: {invalid.format(e=e)}") from e
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _flatten(obj: Mapping, prefix: str = "") -> dict:
    """Flatten nested dicts with dotted keys; lists are kept only if they are scalars (else dropped)."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            continue
        else:
            out[key] = v
    return out


def read_summaries(directory: str | Path, filename: str = "summary.json") -> dict[str, np.ndarray]:
    """Collect every ``summary.json`` under ``directory`` (recursively) into one table, one row per run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"run directory not found: {directory}")
    files = sorted(directory.rglob(filename))
    if not files:
        raise ValueError(f"no {filename} files found under {directory}")
    rows = []
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: invalid JSON ({e.msg})") from e
        row = {"run": str(f.parent.relative_to(directory))}
        row.update(_flatten(obj))
        rows.append(row)
    return _rows_to_table(rows, str(directory))


def load_table(path: str | Path) -> dict[str, np.ndarray]:
    """Load a CSV / JSON lines / JSON-list file, or a directory of run summaries, by its kind."""
    path = Path(path)
    if path.is_dir():
        return read_summaries(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        rows = obj if isinstance(obj, list) else [obj]
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a JSON object or a list of objects")
        return _rows_to_table([_flatten(r) for r in rows], str(path))
    return read_csv(path)


def parse_columns(spec: str | None) -> dict[str, str]:
    """Parse ``"N=params,D=tokens,loss=final_loss"`` into {"N": "params", ...} (names may hold spaces)."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--columns entry {part!r} is not VAR=COLUMN (e.g. N=params)")
        var, col = part.split("=", 1)
        var, col = var.strip(), col.strip()
        if not var or not col:
            raise ValueError(f"--columns entry {part!r} has an empty variable or column name")
        if var in out:  # the later one would silently win
            raise ValueError(f"--columns maps {var!r} twice ({out[var]!r} and {col!r})")
        out[var] = col
    return out


_OPS = {"<=": np.less_equal, ">=": np.greater_equal, "!=": np.not_equal, "==": np.equal, "<": np.less,
        ">": np.greater}


class _Filtered(dict):
    """A table that ``filter_rows`` returned: ``source_rows`` holds its rows' numbers in the table as loaded,
    so that messages keep naming rows as the file numbers them (``ROWS_ARE``)."""

    source_rows: np.ndarray


def source_rows(table: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The loaded table's row numbers of ``table``'s rows, if ``filter_rows`` made it (else None)."""
    return getattr(table, "source_rows", None)


def file_rows(table: Mapping[str, np.ndarray] | None, idx) -> np.ndarray:
    """The file's row numbers of ``table``'s rows ``idx``: ``idx`` itself unless ``filter_rows`` made it."""
    src = source_rows(table)
    idx = np.asarray(idx)
    return idx if src is None else src[idx]


def filter_rows(table: Mapping[str, np.ndarray], conditions: Iterable[str]) -> dict[str, np.ndarray]:
    """Keep the rows satisfying every condition ``COLUMN<op>VALUE`` (op in <, <=, >, >=, ==, !=).

    Numeric columns compare numerically; string columns support == and != only. E.g. ``"loss<3.44"``,
    ``"family==dense"``. Row numbers in later messages stay those of the unfiltered table.
    """
    n = len(next(iter(table.values()))) if table else 0
    keep = np.ones(n, dtype=bool)
    for cond in conditions:
        for op in _OPS:  # two-character operators first (dict order), so "<=" is not read as "<"
            if op in cond:
                col, val = (x.strip() for x in cond.split(op, 1))
                break
        else:
            raise ValueError(f"condition {cond!r} has no comparison (use <, <=, >, >=, == or !=)")
        if col not in table:
            raise ValueError(f"condition {cond!r}: column {col!r} not found; columns: {list(table)}")
        arr = table[col]
        if arr.dtype == object:
            if op not in ("==", "!="):
                raise ValueError(f"condition {cond!r}: column {col!r} holds text; only == and != apply")
            keep &= _OPS[op](arr.astype(str), val)
        else:
            try:
                v = float(val)
            except ValueError as e:
                raise ValueError(f"condition {cond!r}: {val!r} is not a number") from e
            keep &= _OPS[op](arr, v)
    src = source_rows(table)
    out = _Filtered({k: v[keep] for k, v in table.items()})
    out.source_rows = (np.arange(n) if src is None else np.asarray(src))[keep]
    return out


def derive_tokens(
    n: np.ndarray, c: np.ndarray, flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """Training tokens from compute: D = C / (6 N) by default, or D = C / flops_per_token(N)."""
    n = np.asarray(n, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    per_token = 6.0 * n if flops_per_token is None else np.asarray(flops_per_token(n), dtype=np.float64)
    return c / per_token


# How error messages number rows: a CSV's first data row (the line after the header) is row 0.
ROWS_ARE = "0-based data rows, header excluded"


def _bad_rows(x: np.ndarray, table: Mapping[str, np.ndarray] | None = None, rows: np.ndarray | None = None
              ) -> str:
    """The rows where mask ``x`` is set (``rows``: their table indices, if ``x`` covers a subset), as
    0-based data rows, or as run names for a table of run summaries (whose row order nobody sees)."""
    idx = np.flatnonzero(x) if rows is None else rows[np.asarray(x)]
    more = f" ... ({idx.size} rows)" if idx.size > 10 else ""
    if table is not None and "run" in table:
        return f"runs {[str(table['run'][i]) for i in idx[:10]]}{more}"
    return f"rows {file_rows(table, idx)[:10].tolist()}{more} ({ROWS_ARE})"


def numeric_column(table: Mapping[str, np.ndarray], col: str, label: str) -> np.ndarray:
    """``table[col]`` as float64, or ValueError naming ``label`` and the first cell that is not a number, by
    its row (by its run, for a table of run summaries). A blank cell is a missing value (NaN), not text."""
    arr = table[col]
    if arr.dtype == object:  # some cell did not parse as a number (load_table): name the first such one
        for i, v in enumerate(arr):
            if v is None or str(v).strip() == "":
                continue
            try:
                float(v)
            except (TypeError, ValueError):
                row = f"row {int(file_rows(table, i))} ({ROWS_ARE})"
                where = f"run {table['run'][i]!r}" if "run" in table else row
                raise ValueError(f"{label} is not numeric: {where} holds {v!r}") from None
    return np.asarray(arr, dtype=np.float64)


def law_data(
    table: Mapping[str, np.ndarray],
    variables: Iterable[str],
    columns: Mapping[str, str] | None = None,
    *,
    flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None,
    dropna: bool = False,
    positive: bool | Collection[str] = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, np.ndarray]:
    """Arrays for a law's variables (inputs + target), read from a table.

    Args:
      table: column name -> array (see ``load_table``).
      variables: names the law needs, e.g. ("N", "D", "loss").
      columns: variable -> column name; a variable without an entry is looked up under its own name.
      flops_per_token: FLOP model used when D must be derived from compute (default 6 N, i.e. C = 6 N D).
      dropna: drop rows with NaN in any needed column (reported via ``log``) instead of raising.
      positive: require every value to be > 0 (true for N, D, C and losses), or the names of the variables
        that must be (a law's ``signed_inputs`` may be zero or negative).
      log: where derivation / dropping messages go (None = silent).
    Returns:
      dict variable -> float64 array, plus "row" (indices of the used rows in the table).
    """
    columns = dict(columns or {})
    variables = list(variables)
    unknown = set(columns) - set(variables) - {"C", "N"}
    if unknown:
        raise ValueError(f"--columns maps {sorted(unknown)}, unused by the law; it needs {variables}")
    n_rows = len(next(iter(table.values()))) if table else 0
    avail = list(table)

    def get(var: str) -> np.ndarray | None:
        col = columns.get(var, var)
        if col in table:
            return numeric_column(table, col, f"column {col!r} (for {var})")
        if var in columns:
            raise ValueError(f"column {col!r} (for {var}) not found; available columns: {avail}")
        return None

    out: dict[str, np.ndarray] = {}
    for var in variables:
        x = get(var)
        if x is None and var == "D":
            n, c = get("N"), get("C")
            if n is not None and c is not None:
                x = derive_tokens(n, c, flops_per_token)
                how = "C / (6 N)" if flops_per_token is None else "C / flops_per_token(N)"
                if log:
                    log(f"no token column: derived D = {how} from columns "
                        f"{columns.get('C', 'C')!r} and {columns.get('N', 'N')!r}")
        if x is None and var == "C":
            n, d = get("N"), get("D")
            if n is not None and d is not None:
                x = (6.0 * n if flops_per_token is None else np.asarray(flops_per_token(n))) * d
                if log:
                    log("no compute column: derived C = 6 N D" if flops_per_token is None
                        else "no compute column: derived C = flops_per_token(N) * D")
        if x is None:
            hint = " (or give C and N so that D = C/(6N) can be derived)" if var == "D" else ""
            raise ValueError(
                f"no column for {var!r}{hint}; map it with --columns {var}=COLUMN; available columns: {avail}"
            )
        out[var] = x
    keep = np.ones(n_rows, dtype=bool)
    for var, x in out.items():
        nan = np.isnan(x)
        if nan.any():
            if not dropna:
                raise ValueError(f"{var}: missing/NaN values in {_bad_rows(nan, table)} (--dropna, or "
                                 "dropna=True, skips them)")
            keep &= ~nan
    if not keep.all() and log:
        log(f"dropped {int((~keep).sum())} rows with missing values: {_bad_rows(~keep, table)}")
    out = {k: v[keep] for k, v in out.items()}
    rows = np.flatnonzero(keep)
    for var, x in out.items():
        if np.isinf(x).any():
            raise ValueError(f"{var}: infinite values in {_bad_rows(np.isinf(x), table, rows)}")
        must = positive if isinstance(positive, bool) else var in positive
        if must and (x <= 0).any():
            raise ValueError(f"{var}: non-positive values in {_bad_rows(x <= 0, table, rows)}")
    if rows.size == 0:
        raise ValueError("no rows left after dropping missing values")
    out["row"] = rows
    return out

