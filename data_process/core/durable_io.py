"""Durable file primitives: atomic writes and an append-only JSON Lines cache.

Nothing the toolkit has written is lost to a crash:

* :func:`atomic_write_text` / :func:`atomic_write_json` write to a temporary file in the same folder,
  fsync it, then ``os.replace`` it over the target: readers see the old file or the new one, never half.
* :class:`JsonlCache` is an append-only, fsync'ed key → record store for paid or slow work (LLM answers,
  captions). A crash can leave at most one torn trailing line; it is detected on open, moved aside to
  ``<file>.corrupt`` and reported, and every complete line before it is kept.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from data_process.core.safe_paths import check_output_file

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def parse_cache_records(path: Path, data: bytes) -> tuple[dict[str, dict[str, Any]], int, ValueError | None]:
    """The records of a :class:`JsonlCache` file's bytes (``{key: record}``, the last record of a key wins), the byte
    offset where its intact part ends, and why its last line is torn (``None``: intact). An invalid line before the
    end raises ``ValueError`` naming the file and line. Reads only: a reader that must not write (an index's names)
    calls it directly."""
    records: dict[str, dict[str, Any]] = {}
    lines = data.split(b"\n")
    # lines[-1] is b"" when the file ends with a newline (the intact case).
    good_end = 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            good_end += len(raw) + 1
            continue
        is_last = i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1 :])
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError("not an object with a string 'key'")
        except ValueError as exc:
            if is_last:
                return records, good_end, exc
            raise ValueError(f"{path}, line {i + 1}: corrupt cache record ({exc}); "
                             "only a torn last line is repaired automatically") from None
        records[rec["key"]] = rec
        good_end += len(raw) + 1
    return records, good_end, None


class JsonlCache:
    """Append-only JSON Lines store of records ``{"key": str, ...}``; the last record of a key wins.

    ``put`` appends one line and fsyncs before returning, so a record is on disk before the caller
    uses it. Opening scans the file once; a torn trailing line (no newline or invalid JSON at the end)
    is moved to ``<path>.corrupt`` with a warning. An invalid line *before* the end is not a crash
    artefact: it raises ``ValueError`` naming the file and line, so the cache is never silently edited.
    """

    def __init__(self, path: str | Path):
        self.path = check_output_file(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self.recovered_corrupt_tail = False
        self._load()
        self._fh = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        self._records, good_end, torn = parse_cache_records(self.path, data)
        if torn is not None:
            self._move_tail_aside(data[good_end:], torn)
            return
        if data and not data.endswith(b"\n"):
            # A complete record whose newline was not written: keep it, terminate it.
            with self.path.open("ab") as fh:
                fh.write(b"\n")

    def _move_tail_aside(self, tail: bytes, why: Exception) -> None:
        corrupt = self.path.with_name(self.path.name + ".corrupt")
        with corrupt.open("ab") as fh:
            fh.write(tail + b"\n")
        data = self.path.read_bytes()
        atomic_write_bytes(self.path, data[: len(data) - len(tail)])
        self.recovered_corrupt_tail = True
        log.warning("%s: torn last line (%s) moved to %s; %d complete records kept",
                    self.path, why, corrupt, len(self._records))

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self._records.items())

    def put(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        return self.put_many([(key, record)])[0]

    def put_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Append several records with one fsync (cheap work, e.g. image hashes, where one fsync each is waste)."""
        recs = [{"key": key, **{k: v for k, v in record.items() if k != "key"}} for key, record in items]
        if not recs:
            return recs
        self._fh.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for rec in recs:
            self._records[rec["key"]] = rec
        return recs

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "JsonlCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
