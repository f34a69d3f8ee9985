"""A JSON-lines results store: one row per completed sweep point, appended atomically.

Each row is one JSON object on one line. A row is written with a single `write` of the
whole line (newline included) on a file opened for appending, then flushed and fsynced
before the next point starts, so a process killed at any moment leaves at most one
incomplete line: the last one. Opening a store detects such a line (no final newline,
or a last line that is not valid JSON) and truncates it away with a warning, so the row
is simply computed again. While a store is open it holds an exclusive lock on the file,
so two sweeps cannot interleave their rows.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ResultStore",
    "ResultsError",
    "filter_rows",
    "format_value",
    "lookup",
    "override_keys",
    "parse_filters",
    "read_results",
    "repair",
    "summary_table",
]


class ResultsError(ValueError):
    """A results file that cannot be used (locked, or not JSON lines)."""


def _to_json(obj: Any) -> Any:
    """JSON-safe copy: NumPy scalars/arrays to Python, tuples to lists, NaN/inf to strings."""
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str):  # NumPy / JAX arrays and scalars
        return _to_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # strict JSON has no NaN/inf; keep the information readable
    return obj


def repair(path: str | os.PathLike) -> int:
    """Drops an incomplete or corrupt last line (left by a process killed mid-write).

    Args:
      path: the results file; a missing file is left alone.

    Returns:
      The number of bytes dropped (0 when the file was intact).
    """
    p = Path(path)
    if not p.exists():
        return 0
    with open(p, "rb+") as f:
        data = f.read()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        else:
            # A complete but unparsable last line: a torn write that happened to end in "\n".
            start = data.rfind(b"\n", 0, max(keep - 1, 0)) + 1
            last = data[start:keep].strip()
            if last and not _parses(last):
                keep = start
        if keep == len(data):
            return 0
        dropped = data[keep:]
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    preview = dropped[:80].decode("utf-8", "replace")
    warnings.warn(f"{p}: dropped an incomplete last line ({len(dropped)} bytes: "
                  f"{preview!r}{'...' if len(dropped) > 80 else ''}); its point will be "
                  "computed again", stacklevel=2)
    return len(dropped)


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _iter_rows(path: Path) -> Iterator[tuple[int, dict | None, bytes]]:
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                row = None
            yield i, row if isinstance(row, dict) else None, line


def _warn_corrupt(path: Path, lineno: int, line: bytes, consequence: str = "") -> None:
    warnings.warn(f"{path}:{lineno}: skipping a line that is not a JSON object: "
                  f"{line[:60]!r}{consequence}", stacklevel=3)


def read_results(path: str | os.PathLike, dedupe: bool = True) -> list[dict]:
    """Reads the rows of a results file.

    Corrupt lines (anywhere but a repaired last line they can only come from editing by
    hand) are skipped with a warning rather than stopping a plot of the other rows.

    Args:
      path: a JSON-lines results file.
      dedupe: keep only the last row of each `point_id` (files concatenated from reruns).

    Returns:
      The rows, in file order.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"results file not found: {p}")
    rows = []
    for i, row, line in _iter_rows(p):
        if row is None:
            _warn_corrupt(p, i, line)
            continue
        rows.append(row)
    if dedupe:
        last = {r.get("point_id"): i for i, r in enumerate(rows)}
        rows = [r for i, r in enumerate(rows)
                if r.get("point_id") is None or last[r.get("point_id")] == i]
    return rows


class ResultStore:
    """An append-only JSON-lines file of sweep rows, safe against being killed.

    Use as a context manager: opening repairs a torn last line and takes an exclusive
    lock; `append` writes one row durably.

    Args:
      path: the results file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._done: set[str] = set()

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Creates, locks and repairs the file and reads the completed point ids."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResultsError(f"{self.path} is locked by another running sweep") from None
        self._fd = fd
        if created:  # make the new directory entry durable too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        repair(self.path)
        self._done = set()
        for i, row, line in _iter_rows(self.path):
            if row is None:
                _warn_corrupt(self.path, i, line, "; a point whose row it was is computed "
                              "again (delete the line to silence this)")
            elif "point_id" in row:
                self._done.add(row["point_id"])

    def close(self) -> None:
        """Releases the lock."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def completed(self) -> frozenset[str]:
        """Point ids that have a row."""
        return frozenset(self._done)

    def append(self, row: Mapping[str, Any]) -> None:
        """Writes one row as one line, then flushes it to disk.

        Args:
          row: a JSON-serializable mapping (NumPy values are converted); should hold a
            `point_id`.
        """
        if self._fd is None:
            raise ResultsError("the store is not open")
        data = (json.dumps(_to_json(row), separators=(",", ":"), allow_nan=False)
                + "\n").encode()
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, large rows)
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        if "point_id" in row:
            self._done.add(row["point_id"])


# ---- querying rows (plot, table) ----------------------------------------------------------

_MISSING = object()


def lookup(row: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value of a dotted key in a row.

    Looks in the point's overrides first, then in the resolved crossbar config
    (`device.programming_error.sigma`), the network config (`calibration.samples`) and
    the row itself (`n_images`, `mean`).

    Args:
      row: a results row.
      key: a dotted key.
      default: returned when the key is found nowhere.
    """
    over = row.get("overrides") or {}
    if key in over:
        return over[key]
    if key == "config":  # the override key, not the resolved config stored under that name
        return default
    net = row.get("config") or {}
    for root in (net.get("crossbar") or {}, net, row):
        node: Any = root
        for part in key.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                node = _MISSING
                break
        if node is not _MISSING:
            return node
    return default


def parse_filters(items: Iterable[str], option: str = "--filter") -> list[tuple[str, Any]]:
    """`key=value` strings to (key, value) pairs.

    Values are YAML: `0.02`, `1e-5`, `null`, `offset`.

    Args:
      items: the strings.
      option: the command-line option they came from, named in errors.

    Raises:
      ConfigError: an item without `=` or with a value that is not YAML.
    """
    from jaxbar.config import parse_override

    return [parse_override(item, option) for item in items]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or str(a) == str(b)


def filter_rows(rows: Iterable[Mapping], filters: Iterable[tuple[str, Any]],
                keep_missing: bool = False) -> list[dict]:
    """Rows whose `lookup(key)` equals each filter value.

    Args:
      rows: results rows.
      filters: (dotted key, value) pairs, all of which must match.
      keep_missing: also keep rows that lack a filter's key altogether (a digital
        reference row has no crossbar settings).

    Returns:
      The matching rows.
    """
    filters = list(filters)

    def ok(r, k, v):
        got = lookup(r, k, _MISSING)
        return (keep_missing and got is _MISSING) or (got is not _MISSING and _same(got, v))

    return [dict(r) for r in rows if all(ok(r, k, v) for k, v in filters)]


# ---- summary table -------------------------------------------------------------------------

def format_value(v: Any, key: str = "") -> str:
    """A compact text form of a setting (`None` on/off ratio reads as ∞)."""
    if v is None:
        return "∞" if key.endswith("on_off_ratio") else "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def override_keys(rows: Iterable[Mapping]) -> list[str]:
    """The override keys of the rows, in first-appearance order."""
    return list(dict.fromkeys(k for r in rows for k in (r.get("overrides") or {})))


def summary_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                  fmt: str = "plain", sort: Sequence[str] = ()) -> str:
    """A table of results: settings, accuracy mean ± 95% CI half-width, trials, images, time.

    Args:
      rows: results rows.
      columns: dotted keys to show (default: the override keys whose values differ
        between rows, or all override keys when none differ).
      fmt: "plain" (aligned text), "markdown" or "csv".
      sort: dotted keys to sort rows by (default: file order).

    Returns:
      The table as text.
    """
    rows = list(rows)
    if not columns:
        keys = override_keys(rows)
        # Digital rows lack crossbar settings: judge variation on the analog rows.
        analog = [r for r in rows if (r.get("config") or {}).get("crossbar")] or rows
        varying = [k for k in keys
                   if k == "config" or len({repr(lookup(r, k)) for r in analog}) > 1]
        columns = varying or keys
    columns = list(columns)
    for key in reversed(list(sort)):
        rows.sort(key=lambda r, k=key: _sort_key(lookup(r, k)))
    head = [*columns, "accuracy %", "± CI95", "trials", "images", "seconds"]
    body = []
    missing = object()
    for r in rows:
        mean = r.get("mean")
        lo, hi = (r.get("ci95") or (mean, mean))
        body.append([
            *("-" if (v := lookup(r, c, missing)) is missing else format_value(v, c)
              for c in columns),
            "-" if mean is None else f"{100 * mean:.2f}",
            "-" if mean is None else f"{100 * (hi - lo) / 2:.2f}",
            str(r.get("trials", "-")), str(r.get("n_images", "-")),
            "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
        ])
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([head, *body])
        return buf.getvalue().rstrip("\n")
    if fmt not in ("plain", "markdown"):
        raise ValueError(f"table format must be plain, markdown or csv, got {fmt!r}")
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    numeric = [i >= len(columns) for i in range(len(head))]

    def line(cells):
        out = [c.rjust(w) if num else c.ljust(w)
               for c, w, num in zip(cells, widths, numeric, strict=True)]
        return ("| " + " | ".join(out) + " |") if fmt == "markdown" else "  ".join(out)

    lines = [line(head)]
    if fmt == "markdown":
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                    for w, num in zip(widths, numeric, strict=True)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [line(b) for b in body]
    return "\n".join(lines)


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))
