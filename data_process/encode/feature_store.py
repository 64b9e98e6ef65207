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
mention    image         [Di]           whole mention image (mask: image present)
mention    regions       [R, Di]        image regions (CLIP patch grid, pooled)
mention    profile       [K, Dt]        entity-relevant text: LLM enrichment, BLIP-2 caption
entity     desc          [Dt]           name + description + attributes
entity     image         [Di]           first entity image (mask: image present)
entity     profile       [Dt]           LLM enrichment of the entity (mask: present)
=========  ============  =============  ==================================================

A view is written through :class:`ViewWriter` in row chunks into ``<name>.npy.partial``; after each
chunk the number of finished rows is saved atomically, so a killed run resumes at the first
unfinished chunk. ``commit`` renames the finished file into place. A view whose fingerprint (encoder
+ inputs) matches ``meta.json`` is skipped on re-runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_process.core.durable_io import atomic_write_json

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


class ViewWriter:
    """Resumable writer for one view. Use ``start_row`` to skip rows already written."""

    def __init__(self, store: "FeatureStore", side: str, view: str, n_rows: int, row_shape: tuple[int, ...],
                 mask_shape: tuple[int, ...] | None, fingerprint: str, dtype=np.float16):
        self.store, self.name, self.fingerprint = store, _name(side, view), fingerprint
        root = store.root
        self.data_path = root / f"{self.name}.npy.partial"
        self.mask_path = root / f"{self.name}.mask.npy.partial" if mask_shape is not None else None
        self.progress_path = root / f"{self.name}.progress.json"
        shape = (n_rows, *row_shape)
        resume = False
        if self.progress_path.exists() and self.data_path.exists():
            prog = json.loads(self.progress_path.read_text())
            resume = prog.get("fingerprint") == fingerprint and tuple(prog.get("shape", ())) == shape
        if resume:
            self.start_row = int(prog["rows_done"])
            self.data = np.lib.format.open_memmap(self.data_path, mode="r+")
            self.mask = np.lib.format.open_memmap(self.mask_path, mode="r+") if self.mask_path else None
        else:
            self.start_row = 0
            self.data = np.lib.format.open_memmap(self.data_path, mode="w+", dtype=dtype, shape=shape)
            self.mask = (np.lib.format.open_memmap(self.mask_path, mode="w+", dtype=np.bool_,
                                                   shape=(n_rows, *mask_shape)) if self.mask_path else None)
            self._save_progress(0)
        self.n_rows = n_rows

    def _save_progress(self, rows_done: int) -> None:
        atomic_write_json(self.progress_path, {"fingerprint": self.fingerprint, "shape": list(self.data.shape),
                                               "rows_done": rows_done})

    def write(self, start: int, rows: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Write rows ``[start, start+len(rows))`` and record them as done (rows must be written in order)."""
        end = start + len(rows)
        self.data[start:end] = rows
        if self.mask is not None:
            if mask is None:
                raise ValueError(f"{self.name}: this view has a mask; pass mask= for rows {start}:{end}")
            self.mask[start:end] = mask
        self.data.flush()
        if self.mask is not None:
            self.mask.flush()
        self._save_progress(end)

    def commit(self, info: dict[str, Any] | None = None) -> None:
        prog = json.loads(self.progress_path.read_text())
        if prog["rows_done"] != self.n_rows:
            raise RuntimeError(f"{self.name}: only {prog['rows_done']} of {self.n_rows} rows written")
        del self.data, self.mask
        root = self.store.root
        # Forget the previous version of the view before its files are replaced: a kill between the renames
        # and the meta update below must not leave the old fingerprint vouching for new (or mixed) files.
        self.store.drop_view_meta(self.name)
        os.replace(self.data_path, root / f"{self.name}.npy")
        if self.mask_path:
            os.replace(self.mask_path, root / f"{self.name}.mask.npy")
        self.store.set_view_meta(self.name, {"fingerprint": self.fingerprint, **(info or {})})
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
        return json.loads(self.meta_path.read_text())

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
        if path.exists() and json.loads(path.read_text()) != ids:
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
        return json.loads(path.read_text())

    # -- views ---------------------------------------------------------------------------------
    def has(self, side: str, view: str, fingerprint: str | None = None) -> bool:
        name = _name(side, view)
        info = self.meta().get("views", {}).get(name)
        if info is None or not (self.root / f"{name}.npy").exists():
            return False
        return fingerprint is None or info.get("fingerprint") == fingerprint

    def writer(self, side: str, view: str, n_rows: int, row_shape: tuple[int, ...],
               mask_shape: tuple[int, ...] | None, fingerprint: str) -> ViewWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return ViewWriter(self, side, view, n_rows, tuple(row_shape),
                          tuple(mask_shape) if mask_shape is not None else None, fingerprint)

    def load(self, side: str, view: str, mmap: bool = True) -> View:
        name = _name(side, view)
        path = self.root / f"{name}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path}: view {name!r} not in the feature cache {self.root}")
        mode = "r" if mmap else None
        data = np.load(path, mmap_mode=mode)
        mpath = self.root / f"{name}.mask.npy"
        mask = np.load(mpath, mmap_mode=mode) if mpath.exists() else None
        return View(data=data, mask=mask)

    def views(self) -> list[str]:
        return sorted(self.meta().get("views", {}))
