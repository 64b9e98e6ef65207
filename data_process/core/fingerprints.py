"""Fingerprints: what decides whether cached work (captions, features) is still valid.

* :func:`stable_hash`: SHA-256 of a JSON-able value (canonical JSON), for cache keys and view fingerprints.
* :func:`file_sha256`: SHA-256 of a file's bytes.
* :class:`ImageHasher`: the one content fingerprint of an image, shared by the caption and feature steps. It is the
  SHA-256 of the file's bytes, remembered per (path, size, mtime) so an unchanged image is read once, ever: with a
  ``cache_path`` the hashes persist in an append-only :class:`~data_process.core.durable_io.JsonlCache`. An image
  edited in place gets a new mtime (and usually a new size), hence a new hash: captions and features of the old
  bytes are never reused for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from data_process.core.durable_io import JsonlCache
from data_process.core.safe_paths import open_regular_file, regular_file_problem

MISSING = "missing"
UNREADABLE = "unreadable"


def stable_hash(obj: Any) -> str:
    """SHA-256 hex digest of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open_regular_file(path) as fh:  # never blocks on a FIFO or a device
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageHasher:
    """Content hashes of image files, cached by (absolute path, size, mtime).

    ``sha256(path)`` returns the hex digest, :data:`MISSING` when the file does not exist, or :data:`UNREADABLE`
    for what is not a regular file (a FIFO, a device, a directory, a path with a NUL byte: never opened, so never
    a hang); an unreadable directory entry raises ``OSError``. New hashes are kept in memory and, with
    ``cache_path``, appended to that file by :meth:`flush` (called by :meth:`hash_all` and on close), one fsync for
    many hashes.
    """

    def __init__(self, cache_path: str | Path | None = None):
        self._store = JsonlCache(cache_path) if cache_path is not None else None
        self._known: dict[str, str] = {}
        if self._store is not None:
            self._known.update((key, rec["sha256"]) for key, rec in self._store.items() if "sha256" in rec)
        self._new: list[tuple[str, dict[str, Any]]] = []

    @staticmethod
    def _key(path: Path, st: os.stat_result) -> str:
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def sha256(self, path: str | Path) -> str:
        problem = regular_file_problem(path)
        if problem is not None:
            return MISSING if problem.startswith("missing") else UNREADABLE
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return MISSING
        key = self._key(path, st)
        sha = self._known.get(key)
        if sha is None:
            sha = file_sha256(path)
            self._known[key] = sha
            self._new.append((key, {"sha256": sha}))
        return sha

    def hash_all(self, paths: Iterable[str | Path | None]) -> list[str | None]:
        """``sha256`` of each path (``None`` for ``None``, :data:`UNREADABLE` where the file cannot be read), then
        :meth:`flush`."""
        out: list[str | None] = []
        for p in paths:
            try:
                out.append(None if p is None else self.sha256(p))
            except (OSError, ValueError):  # ValueError: swapped for a non-regular file after the check (UnsafePath)
                out.append(UNREADABLE)
        self.flush()
        return out

    def flush(self) -> None:
        if self._store is not None and self._new:
            self._store.put_many(self._new)
        self._new = []

    def close(self) -> None:
        self.flush()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "ImageHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
