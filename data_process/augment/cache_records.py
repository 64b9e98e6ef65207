"""The shape check of the augment steps' cache records: a record of the wrong shape (``"answer": 5``, hand-edited or
written by another version) is a :class:`~data_process.core.records.DataError` naming the cache file and line.

It holds paid or slow work, so it is neither dropped silently nor redone behind the user's back: the user fixes or
deletes that line and reruns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from data_process.core.durable_io import JsonlCache
from data_process.core.records import DataError


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def line_of(path: Path, key: str) -> int | None:
    """The line of ``path`` holding the last record of ``key`` (for an error message only)."""
    found = None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("key") == key:
                found = lineno
    return found


def record_error(cache: JsonlCache, key: str, field_name: str, problem: str) -> DataError:
    """The error for the record of ``key`` in ``cache`` whose ``field_name`` is wrong."""
    return DataError(cache.path, f"line {line_of(cache.path, key)}", field_name,
                     f"{problem} (a cache record of the wrong shape; fix or delete that line and rerun)")


def checked_record(cache: JsonlCache, key: str,
                   problem_of: Callable[[Mapping[str, Any]], tuple[str, str] | None]) -> dict[str, Any] | None:
    """The cache record of ``key`` (None when absent); one whose ``problem_of`` is ``(field, problem)`` is the
    :func:`record_error` naming the cache file and line."""
    rec = cache.get(key)
    if rec is not None and (problem := problem_of(rec)) is not None:
        raise record_error(cache, key, *problem)
    return rec
