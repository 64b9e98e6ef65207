"""On-disk feature cache: one ``.npy`` per (side, view), memory-mappable, written resumably.

Layout of a feature folder::

    FEATURES/
      meta.json                    # encoders, dims, dataset fingerprint, per-view fingerprints
      entity_ids.json              # row i of every entity view  <-> entity id
      mention_ids.json             # row i of every mention view <-> mention id
      entity.desc.npy              # [E, Dt]      float16
      entity.image.npy             # [E, Di]      float16   + entity.image.mask.npy [E] bool
      mention.sentence.npy         # [M, L, Dt]   float16   + mask [M, L]
      ...

Views (names are the contract between ``data_process.encode.features`` and ``nel_model``):

=========  ============  =============  ==================================================
side       view          row shape      meaning
=========  ============  =============  ==================================================
mention    mention       [Dt]           the mention phrase
mention    sentence      [L, Dt]        sentence tokens (mask: real tokens)
mention    context       [Dt]           the mention in its sentence, one pooled feature
mention    image         [Di]           whole mention image (mask: image present)
mention    regions       [R, Di]        image regions (CLIP patch grid, pooled)
mention    profile       [K, Dt]        entity-relevant text: LLM enrichment, BLIP-2 caption
entity     desc          [Dt]           name + description + attributes
entity     image         [Di]           first entity image (mask: image present)
entity     profile       [Dt]           LLM enrichment of the entity (mask: present)
=========  ============  =============  ==================================================

A view is written through :class:`ViewWriter` in row chunks into ``<name>.npy.partial`` (blocks preallocated: a
full disk is an ``OSError`` at creation, not a SIGBUS later); after each chunk the number of finished rows and a
checksum of them are saved atomically, so a killed run resumes at the first unfinished chunk, and a ``.partial``
truncated or altered since starts again. ``commit`` refuses NaN / inf values (naming view and row), renames the
finished files into place and records each file's size and SHA-256 in ``meta.json`` (``views[name]["files"]``).
A view whose fingerprint (encoder + inputs) matches ``meta.json`` is skipped on re-runs when its files verify
(:meth:`FeatureStore.verify`: sizes and content hash); :meth:`FeatureStore.load` always checks the sizes (a
truncated file is a :class:`CacheError` naming it) and, with ``mmap=False``, that every value is finite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_process.core.durable_io import atomic_write_json
from data_process.core.fingerprints import file_sha256
from data_process.core.safe_paths import open_regular_file

log = logging.getLogger(__name__)
CHECKSUM_MOD = 1 << 64
NAN_CHECK_BYTES = 64 << 20  # FeatureStore.load checks every value of a memory-mapped view up to this size

SIDES = ("mention", "entity")
PROFILE_ROWS = ("enrichment", "caption")  # rows of mention.profile, in cache order (meta.json records them too)


def _name(side: str, view: str) -> str:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")
    return f"{side}.{view}"


@dataclass
class View:
    """A loaded view: ``data`` [N, ...] (float16, memory-mapped) and an optional boolean ``mask``."""

    data: np.ndarray
    mask: np.ndarray | None


def first_nonfinite_row(arr: np.ndarray, chunk: int = 4096) -> int | None:
    """The first row with a value that is not finite as float16 (NaN, inf, or beyond its range); ``None``."""
    for start in range(0, len(arr), chunk):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is what is looked for
            part = np.asarray(arr[start:start + chunk], dtype=np.float32).astype(np.float16)
        bad = ~np.isfinite(part).reshape(len(part), -1).all(1)
        if bad.any():
            return start + int(np.flatnonzero(bad)[0])
    return None


def npy_size(path: Path) -> int:
    """The size a ``.npy`` file must have, from its own header (shape and dtype)."""
    with open_regular_file(path) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(fh)
        return fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class CacheError(ValueError):
    """A committed view (or its half-written file) that does not verify: the message names the file and why."""


def _row_checksum(rows: np.ndarray, mask: np.ndarray | None, index: np.ndarray) -> int:
    """Order-free checksum of rows ``index`` (their data and mask bytes, each tied to its row number)."""
    total = 0
    for k, r in enumerate(index):
        c = zlib.crc32(np.ascontiguousarray(rows[k]).tobytes(), zlib.crc32(int(r).to_bytes(8, "little")))
        if mask is not None:
            c = zlib.crc32(np.ascontiguousarray(mask[k]).tobytes(), c)
        total += c
    return total % CHECKSUM_MOD


def _preallocate(path: Path) -> None:
    """Reserve the blocks of a freshly created memmap file: a full disk is an ``OSError`` (ENOSPC) now, not a
    SIGBUS when a page of the sparse file is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # the filesystem cannot: sparse as before
            return
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def _read_json(path: Path, kind: type) -> Any:
    """A cache's JSON file, or a :class:`CacheError` naming it (not a bare JSON traceback)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); remove the feature folder, or the file, and rerun") from None
    if not isinstance(value, kind):
        raise CacheError(f"{path}: expected a JSON {kind.__name__}, found {type(value).__name__}")
    return value


class ViewWriter:
    """Resumable writer for one view. Use ``start_row`` to skip rows already written.

    ``order`` (a permutation of the rows): the order rows are written in (the feature step writes texts sorted by
    length, so a batch pads little); ``write(start, ...)`` takes positions ``start..`` of that order and puts each
    row at its own index, so the file is always in row order. Progress counts positions done, with a checksum of
    the rows done: a ``.partial`` file that was truncated or altered since does not verify and the view restarts.
    """

    def __init__(self, store: "FeatureStore", side: str, view: str, n_rows: int, row_shape: tuple[int, ...],
                 mask_shape: tuple[int, ...] | None, fingerprint: str, dtype=np.float16,
                 order: np.ndarray | None = None):
        self.store, self.name, self.fingerprint = store, _name(side, view), fingerprint
        root = store.root
        self.data_path = root / f"{self.name}.npy.partial"
        self.mask_path = root / f"{self.name}.mask.npy.partial" if mask_shape is not None else None
        self.progress_path = root / f"{self.name}.progress.json"
        self.order = np.arange(n_rows) if order is None else np.asarray(order, dtype=np.int64)
        if sorted(self.order.tolist()) != list(range(n_rows)):
            raise ValueError(f"{self.name}: order is not a permutation of {n_rows} rows")
        self.order_id = None if order is None else hashlib.sha256(self.order.tobytes()).hexdigest()
        self.n_rows = n_rows
        shape = (n_rows, *row_shape)
        prog = self._resumable(shape, dtype, mask_shape)
        if prog is not None:
            self.start_row, self.checksum = int(prog["rows_done"]), int(prog["checksum"])
            self.data = np.lib.format.open_memmap(self.data_path, mode="r+")
            self.mask = np.lib.format.open_memmap(self.mask_path, mode="r+") if self.mask_path else None
        else:
            self.start_row, self.checksum = 0, 0
            self.data = np.lib.format.open_memmap(self.data_path, mode="w+", dtype=dtype, shape=shape)
            _preallocate(self.data_path)
            self.mask = None
            if self.mask_path:
                self.mask = np.lib.format.open_memmap(self.mask_path, mode="w+", dtype=np.bool_,
                                                      shape=(n_rows, *mask_shape))
                _preallocate(self.mask_path)
            self._save_progress(0)

    def _resumable(self, shape: tuple[int, ...], dtype, mask_shape) -> dict[str, Any] | None:
        """The progress of an earlier run to resume, when its files verify; ``None``: start afresh."""
        if not (self.progress_path.exists() and self.data_path.exists()):
            return None
        try:
            prog = json.loads(self.progress_path.read_text())
            if (prog.get("fingerprint") != self.fingerprint or tuple(prog.get("shape", ())) != shape
                    or prog.get("order") != self.order_id or "checksum" not in prog):
                return None
            done = int(prog["rows_done"])
            paths = [self.data_path] + ([self.mask_path] if self.mask_path else [])
            if any(p.stat().st_size != npy_size(p) for p in paths):
                raise CacheError("the file is shorter than its header says (truncated)")
            data = np.load(self.data_path, mmap_mode="r")
            mask = np.load(self.mask_path, mmap_mode="r") if self.mask_path else None
            if data.shape != shape or data.dtype != dtype or (mask is not None and mask.shape[1:] != mask_shape):
                return None
            if self._checksum(data, mask, self.order[:done]) != int(prog["checksum"]):
                raise CacheError(f"the {done} rows marked done do not match their checksum (altered)")
            return prog
        except (ValueError, OSError, KeyError, TypeError) as exc:
            log.warning("%s: cannot resume the half-written view (%s): starting it again", self.name, exc)
            return None

    @staticmethod
    def _checksum(data: np.ndarray, mask: np.ndarray | None, index: np.ndarray, chunk: int = 4096) -> int:
        total = 0
        for s in range(0, len(index), chunk):
            idx = np.sort(index[s:s + chunk])
            total += _row_checksum(np.asarray(data[idx]), None if mask is None else np.asarray(mask[idx]), idx)
        return total % CHECKSUM_MOD

    def _save_progress(self, rows_done: int) -> None:
        atomic_write_json(self.progress_path, {"fingerprint": self.fingerprint, "shape": list(self.data.shape),
                                               "order": self.order_id, "rows_done": rows_done,
                                               "checksum": self.checksum})

    def write(self, start: int, rows: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Write positions ``[start, start+len(rows))`` of the order (rows in order: their own row numbers unless
        an ``order`` was given) and record them as done (positions must be written in order; rewriting positions
        already done is allowed)."""
        end = start + len(rows)
        if start > self.start_row:
            raise ValueError(f"{self.name}: positions {start}:{end} leave a gap after {self.start_row}")
        if self.mask is not None and mask is None:
            raise ValueError(f"{self.name}: this view has a mask; pass mask= for rows {start}:{end}")
        idx = self.order[start:end]
        rows = np.asarray(rows, dtype=self.data.dtype)
        mask = None if self.mask is None else np.asarray(mask, dtype=np.bool_)
        redo = idx[: max(0, self.start_row - start)]  # rewritten rows: their old bytes leave the checksum
        if len(redo):
            self.checksum -= self._checksum(self.data, self.mask, redo)
        self.data[idx] = rows
        if self.mask is not None:
            self.mask[idx] = mask
        self.checksum = (self.checksum + _row_checksum(rows, mask, idx)) % CHECKSUM_MOD
        self.data.flush()
        if self.mask is not None:
            self.mask.flush()
        self.start_row = max(self.start_row, end)
        self._save_progress(self.start_row)

    def commit(self, info: dict[str, Any] | None = None) -> None:
        """Check the finished view (every value finite), record each file's size and content hash, rename the
        files into place, then vouch for them in ``meta.json``."""
        prog = json.loads(self.progress_path.read_text())
        if prog["rows_done"] != self.n_rows:
            raise RuntimeError(f"{self.name}: only {prog['rows_done']} of {self.n_rows} rows written")
        bad = first_nonfinite_row(self.data)
        if bad is not None:
            raise CacheError(f"{self.data_path}, row {bad}{self.store.row_id(self.name, bad)}: NaN or infinite "
                             f"feature values in view {self.name} (the encoder gave non-finite values)")
        del self.data, self.mask
        root = self.store.root
        final = {self.data_path: root / f"{self.name}.npy"}
        if self.mask_path:
            final[self.mask_path] = root / f"{self.name}.mask.npy"
        files = {dst.name: {"size": src.stat().st_size, "sha256": file_sha256(src)} for src, dst in final.items()}
        # Forget the previous version of the view before its files are replaced: a kill between the renames
        # and the meta update below must not leave the old fingerprint vouching for new (or mixed) files.
        self.store.drop_view_meta(self.name)
        for src, dst in final.items():
            os.replace(src, dst)
        self.store.set_view_meta(self.name, {"fingerprint": self.fingerprint, **(info or {}), "files": files})
        self.progress_path.unlink(missing_ok=True)


class FeatureStore:
    """A feature folder (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def meta(self) -> dict[str, Any]:
        if not self.meta_path.exists():
            return {"views": {}}
        return _read_json(self.meta_path, dict)

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta()
        meta.update(fields)
        atomic_write_json(self.meta_path, meta)

    def set_view_meta(self, name: str, info: dict[str, Any]) -> None:
        meta = self.meta()
        meta.setdefault("views", {})[name] = info
        atomic_write_json(self.meta_path, meta)

    def drop_view_meta(self, name: str) -> None:
        meta = self.meta()
        if name in meta.get("views", {}):
            del meta["views"][name]
            atomic_write_json(self.meta_path, meta)

    def set_ids(self, side: str, ids: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{side}_ids.json"
        if path.exists() and _read_json(path, list) != ids:
            # Rows no longer line up with the records: every view of this side is stale.
            meta = self.meta()
            for name in [n for n in meta.get("views", {}) if n.startswith(side + ".")]:
                del meta["views"][name]
            atomic_write_json(self.meta_path, meta)
        atomic_write_json(path, ids)

    def ids(self, side: str) -> list[str]:
        path = self.root / f"{side}_ids.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {side} ids; run the feature step (python -m data_process.encode.features)")
        return _read_json(path, list)

    def row_id(self, name: str, row: int) -> str:
        """`` (id X)`` for row ``row`` of view ``name`` when the ids are known, for messages."""
        try:
            return f" (id {self.ids(name.split('.')[0])[row]})"
        except (OSError, ValueError, IndexError):
            return ""

    # -- views ---------------------------------------------------------------------------------
    def _files(self, name: str) -> list[Path]:
        files = [self.root / f"{name}.npy"]
        mask = self.root / f"{name}.mask.npy"
        return files + [mask] if mask.exists() else files

    def size_problem(self, name: str) -> str | None:
        """Why the committed files of ``name`` cannot be what was written (cheap: sizes only), or ``None``: each
        file's size must be what its header says and, when ``meta.json`` records it, the size written."""
        recorded = self.meta().get("views", {}).get(name, {}).get("files", {})
        for path in self._files(name):
            try:
                size, want = path.stat().st_size, npy_size(path)
            except (OSError, ValueError) as exc:
                return f"{path}: unreadable view file ({exc})"
            if size != want:
                return f"{path}: truncated: {size} bytes, its header needs {want}"
            if path.name in recorded and recorded[path.name]["size"] != size:
                return f"{path}: {size} bytes, {recorded[path.name]['size']} were written"
        return None

    def verify(self, name: str) -> str | None:
        """Why the committed files of ``name`` are not what was written, or ``None``: sizes, and the content hash
        ``meta.json`` records (a full read; views from before the hashes: sizes and a NaN / inf scan)."""
        problem = self.size_problem(name)
        if problem is not None:
            return problem
        recorded = self.meta().get("views", {}).get(name, {}).get("files", {})
        for path in self._files(name):
            if path.name in recorded:
                if file_sha256(path) != recorded[path.name]["sha256"]:
                    return f"{path}: altered since it was written (content hash differs)"
            elif not path.name.endswith(".mask.npy"):
                bad = first_nonfinite_row(np.load(path, mmap_mode="r"))
                if bad is not None:
                    return f"{path}, row {bad}{self.row_id(name, bad)}: NaN or infinite values in view {name}"
        return None

    def has(self, side: str, view: str, fingerprint: str | None = None, verify: bool = False) -> bool:
        """Whether view ``side.view`` is committed (with ``fingerprint``, when given) and its files are whole
        (:meth:`size_problem`; ``verify``: also unaltered, :meth:`verify`). A view that fails is logged."""
        name = _name(side, view)
        info = self.meta().get("views", {}).get(name)
        if info is None or not (self.root / f"{name}.npy").exists():
            return False
        if fingerprint is not None and info.get("fingerprint") != fingerprint:
            return False
        problem = self.verify(name) if verify else self.size_problem(name)
        if problem is not None:
            log.warning("%s: %s: encoding it again", name, problem)
            return False
        return True

    def writer(self, side: str, view: str, n_rows: int, row_shape: tuple[int, ...],
               mask_shape: tuple[int, ...] | None, fingerprint: str, order: np.ndarray | None = None) -> ViewWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return ViewWriter(self, side, view, n_rows, tuple(row_shape),
                          tuple(mask_shape) if mask_shape is not None else None, fingerprint, order=order)

    def load(self, side: str, view: str, mmap: bool = True) -> View:
        """Open a committed view. Its file sizes are always checked (:meth:`size_problem`: a truncated file is a
        :class:`CacheError` naming it). Every value is checked to be finite (a :class:`CacheError` naming view and
        row) when the data is read whole (``mmap=False``) or is at most :data:`NAN_CHECK_BYTES`; a larger
        memory-mapped view is not read on open (its content hash, checked by every rerun of the feature step,
        vouches for the values checked at commit)."""
        name = _name(side, view)
        path = self.root / f"{name}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path}: view {name!r} not in the feature cache {self.root}")
        problem = self.size_problem(name)
        if problem is not None:
            raise CacheError(f"{problem} (rerun the feature step: it encodes the view again)")
        mode = "r" if mmap else None
        data = np.load(path, mmap_mode=mode)
        if not mmap or data.nbytes <= NAN_CHECK_BYTES:
            bad = first_nonfinite_row(data)
            if bad is not None:
                raise CacheError(f"{path}, row {bad}{self.row_id(name, bad)}: NaN or infinite values in view "
                                 f"{name} (rerun the feature step with --force)")
        mpath = self.root / f"{name}.mask.npy"
        mask = np.load(mpath, mmap_mode=mode) if mpath.exists() else None
        return View(data=data, mask=mask)

    def views(self) -> list[str]:
        return sorted(self.meta().get("views", {}))
