"""Precomputed features from a release, imported into the feature cache instead of encoding
(``python -m data_process.encode.features ... --import SIDE.VIEW=FILE[,ids=IDS.json][,key=NAME][,by=id|image]``).

Files (``key`` names the array; default ``features``):

* ``.h5`` / ``.hdf5`` (``h5py``): the dataset ``key``; ids from ``ids=`` or a dataset ``ids`` in the file. DIM's
  entity features are ``gt_feats_<type>.h5`` (``features`` [E, D]) in ``qids_ordered.json`` order; GHMFC's mention
  image features ``img_features.h5`` in ``img_list.json`` order (image paths: use ``by=image``).
* ``.npy``: the array; ids from ``ids=``.
* ``.npz``: arrays ``key`` and ``ids`` (``ids=`` overrides).
* ``.pt``: a tensor (ids from ``ids=``) or a dict with ``key`` and ``ids`` (loaded with ``weights_only=True``).

An id list is a JSON list of strings, row i of the features <-> id i. Ids are entity ids for ``entity.*`` views
and mention ids for ``mention.*`` views; with ``by=image`` (mention views) an id is a mention image: its file name
(``images/1097.jpg`` -> ``1097.jpg``) matches mentions whose image has that name, else mentions whose image has its
stem (``1097``); every mention with that image gets the row.

Checks, each a :class:`~data_process.core.records.DataError` naming the file and the row: the array is 2-D
``[N, D]`` (``mention.sentence`` ``[N, L, Dt]`` with L = ``--max_len``, ``mention.regions`` ``[N, R, Di]``,
``mention.profile`` ``[N, 2, Dt]``); as many ids as rows; no repeated id; every id known in the dataset; finite
values (also after the cast to float16); D equal to the cache's text dimension (text views) or image dimension
(image views): that of the encoders of this run, of the cache's other views (``meta.json``), and of the other
imports. Dataset records the file has no row for: zero and mask False in a view with a mask (counted in
``meta.json``); an error listing how many and the first few in a view without one (``mention.mention``,
``entity.desc``). An all-zero row (token, region slot, profile row) is taken as absent (mask False), as the
releases pad with zeros.

An imported view's fingerprint is the files' content hashes (+ ``key``, ``by`` and the cache's row ids): a rerun
with the same files skips it; ``meta.json`` records the source (``meta["views"][view]["imported"]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from data_process.core.fingerprints import ImageHasher, stable_hash
from data_process.core.records import DataError
from data_process.encode.feature_store import PROFILE_ROWS, FeatureStore, first_nonfinite_row

FIRST_IDS = 5
# side.view -> (space: "text" | "image", extra axis: None | "max_len" | "regions" | "profile", has a mask)
VIEWS: dict[str, tuple[str, str | None, bool]] = {
    "mention.mention": ("text", None, False),
    "mention.sentence": ("text", "max_len", True),
    "mention.context": ("text", None, False),
    "mention.image": ("image", None, True),
    "mention.regions": ("image", "regions", True),
    "mention.profile": ("text", "profile", True),
    "entity.desc": ("text", None, False),
    "entity.image": ("image", None, True),
    "entity.profile": ("text", None, True),
}
SUFFIXES = (".h5", ".hdf5", ".npy", ".npz", ".pt")


@dataclass(frozen=True)
class ImportSpec:
    """One ``--import SIDE.VIEW=FILE[,ids=IDS.json][,key=NAME][,by=id|image]``."""

    view: str
    path: Path
    ids: Path | None = None
    key: str = "features"
    by: str = "id"

    @property
    def side(self) -> str:
        return self.view.split(".")[0]

    @classmethod
    def parse(cls, text: str, default_ids: str | Path | None = None) -> "ImportSpec":
        """Parse the flag's value; ``default_ids`` (``--import_ids``) applies when it names no ``ids=``."""
        view, sep, rest = text.partition("=")
        if not sep or not rest:
            raise ValueError(f"--import {text!r}: expected SIDE.VIEW=FILE[,ids=IDS.json][,key=NAME][,by=id|image]")
        if view not in VIEWS:
            raise ValueError(f"--import {text!r}: unknown view {view!r}; one of {', '.join(VIEWS)}")
        path, *options = rest.split(",")
        opts: dict[str, str] = {}
        for opt in options:
            name, sep, value = opt.partition("=")
            if not sep or name not in ("ids", "key", "by") or not value:
                raise ValueError(f"--import {text!r}: unknown option {opt!r} (ids=FILE, key=NAME, by=id|image)")
            opts[name] = value
        by = opts.get("by", "id")
        if by not in ("id", "image") or (by == "image" and not view.startswith("mention.")):
            raise ValueError(f"--import {text!r}: by={by} (by=image is for mention views; else by=id)")
        if Path(path).suffix.lower() not in SUFFIXES:
            raise ValueError(f"--import {text!r}: {path}: unknown feature file type (one of {', '.join(SUFFIXES)})")
        ids = opts.get("ids", default_ids)
        return cls(view=view, path=Path(path), ids=None if ids is None else Path(ids), key=opts.get("key", "features"),
                   by=by)


def _read_ids(path: Path) -> list[str]:
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: id list not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", None, f"not valid JSON ({exc.msg})") from None
    if not isinstance(ids, list):
        raise DataError(path, "top level", None, f"expected a JSON list of ids, got {type(ids).__name__}")
    for i, x in enumerate(ids):
        if not isinstance(x, str):
            raise DataError(path, f"row {i}", None, f"expected an id string, got {x!r}")
    return ids


def _as_ids(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def read_features(spec: ImportSpec) -> tuple[np.ndarray, list[str], Path]:
    """The feature array, its ids, and the file the ids come from."""
    path = spec.path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file not found (--import {spec.view}=...)")
    suffix = path.suffix.lower()
    ids: list[str] | None = None
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            if spec.key not in f:
                raise DataError(path, "top level", spec.key, f"no dataset {spec.key!r} (has: {', '.join(f.keys())})")
            arr = np.asarray(f[spec.key][()])
            if spec.ids is None and "ids" in f:
                ids = _as_ids(f["ids"][()])
    elif suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if spec.key not in z:
                raise DataError(path, "top level", spec.key, f"no array {spec.key!r} (has: {', '.join(z.files)})")
            arr = z[spec.key]
            if spec.ids is None and "ids" in z:
                ids = _as_ids(z["ids"])
    else:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if spec.key not in obj:
                raise DataError(path, "top level", spec.key, f"no entry {spec.key!r} (has: {', '.join(map(str, obj))})")
            if spec.ids is None and "ids" in obj:
                ids = [str(x) for x in obj["ids"]]
            obj = obj[spec.key]
        if not isinstance(obj, torch.Tensor):
            raise DataError(path, "top level", spec.key, f"expected a tensor, got {type(obj).__name__}")
        arr = obj.float().numpy()
    ids_from = path
    if spec.ids is not None:
        ids, ids_from = _read_ids(spec.ids), spec.ids
    if ids is None:
        raise ValueError(f"{path}: no id list; pass ids=IDS.json (or --import_ids) naming the id of each row")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(path, "top level", spec.key, f"expected numbers, got dtype {arr.dtype}")
    if len(ids) != len(arr):
        raise DataError(ids_from, "top level", None, f"{len(ids)} ids for {len(arr)} feature rows of {path}")
    return arr, ids, ids_from


@dataclass
class PreparedImport:
    """A checked import: the dataset rows it fills (``rows[i]`` = file row of record i, -1 where absent)."""

    spec: ImportSpec
    array: np.ndarray
    rows: np.ndarray
    dim: int
    fingerprint: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> str:
        return VIEWS[self.spec.view][0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def mask_shape(self) -> tuple[int, ...] | None:
        if not VIEWS[self.spec.view][2]:
            return None
        return tuple(self.array.shape[1:-1])


def _match_rows(spec: ImportSpec, ids: list[str], ids_from: Path, records: Sequence[Any]) -> np.ndarray:
    """``rows[i]``: the file row for dataset record i (-1: none); errors name ``ids_from`` and the row."""
    kind = "an entity" if spec.side == "entity" else "a mention"
    first: dict[str, int] = {}
    for r, x in enumerate(ids):
        if x in first:
            raise DataError(ids_from, f"row {r}", None, f"id {x!r} repeats row {first[x]}")
        first[x] = r
    rows = np.full(len(records), -1, dtype=np.int64)
    if spec.by == "id":
        index = {rec.id: i for i, rec in enumerate(records)}
        for r, x in enumerate(ids):
            if x not in index:
                raise DataError(ids_from, f"row {r}", None, f"id {x!r} is not {kind} id of the dataset "
                                                            f"(features: {spec.path})")
            rows[index[x]] = r
        return rows
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for i, m in enumerate(records):
        if m.image is not None:
            name = PurePosixPath(m.image).name
            by_name.setdefault(name, []).append(i)
            by_stem.setdefault(PurePosixPath(name).stem, []).append(i)
    for r, x in enumerate(ids):
        name = PurePosixPath(x.replace("\\", "/")).name
        hits = by_name.get(name) or by_stem.get(PurePosixPath(name).stem)
        if not hits:
            raise DataError(ids_from, f"row {r}", None, f"image {x!r} is no mention's image (by file name or stem; "
                                                        f"features: {spec.path})")
        for i in hits:
            if rows[i] >= 0:
                raise DataError(ids_from, f"row {r}", None, f"image {x!r} names mention {records[i].id!r}, already "
                                                            f"given row {rows[i]}")
            rows[i] = r
    return rows


def prepare_import(spec: ImportSpec, records: Sequence[Any], record_ids: list[str], max_len: int | None,
                   hasher: ImageHasher) -> PreparedImport:
    """Read and check one import against the dataset's records of its side (dimension checks come later, against
    the other views: :func:`check_dims`)."""
    arr, ids, ids_from = read_features(spec)
    _, extra, has_mask = VIEWS[spec.view]
    want_ndim = 2 if extra is None else 3
    if arr.ndim != want_ndim:
        shape = "[N, D]" if extra is None else {"max_len": "[N, L, Dt]", "regions": "[N, R, Di]",
                                                "profile": f"[N, {len(PROFILE_ROWS)}, Dt]"}[extra]
        raise DataError(spec.path, "top level", spec.key, f"{spec.view} needs an array {shape}, got shape "
                                                          f"{list(arr.shape)}")
    if extra == "max_len" and max_len is not None and arr.shape[1] != max_len:
        raise DataError(spec.path, "top level", spec.key, f"{arr.shape[1]} sentence tokens per row, but --max_len "
                                                          f"is {max_len}")
    if extra == "profile" and arr.shape[1] != len(PROFILE_ROWS):
        raise DataError(spec.path, "top level", spec.key, f"{arr.shape[1]} profile rows per mention; the cache has "
                                                          f"{len(PROFILE_ROWS)} ({', '.join(PROFILE_ROWS)})")
    bad = first_nonfinite_row(arr)
    if bad is not None:
        raise DataError(spec.path, f"row {bad}", spec.key, "values that are not finite (NaN, inf, or beyond float16's "
                                                           "range)")
    rows = _match_rows(spec, ids, ids_from, records)
    missing = np.flatnonzero(rows < 0)
    if len(missing) and not has_mask:
        first = ", ".join(repr(record_ids[i]) for i in missing[:FIRST_IDS])
        raise DataError(spec.path, "top level", None, f"no row for {len(missing)} of {len(records)} {spec.side} "
                                                      f"records (first: {first}); {spec.view} has no mask, so every "
                                                      "record needs a row")
    shas = {"file": hasher.sha256(spec.path), "ids": None if spec.ids is None else hasher.sha256(spec.ids)}
    hasher.flush()
    fingerprint = stable_hash({"view": spec.view, "import": shas, "key": spec.key, "by": spec.by,
                               "rows": stable_hash(record_ids)})
    source = {"file": str(spec.path), "sha256": shas["file"], "ids": str(ids_from), "key": spec.key, "by": spec.by,
              "rows_in_file": len(arr), "missing": int(len(missing)),
              "missing_first": [record_ids[i] for i in missing[:FIRST_IDS]]}
    return PreparedImport(spec=spec, array=arr, rows=rows, dim=int(arr.shape[-1]), fingerprint=fingerprint,
                          source=source)


def check_dims(imports: Sequence[PreparedImport], known: dict[str, tuple[int, str]]) -> dict[str, int]:
    """Every import's dimension equals its space's (``known``: ``{"text"|"image": (dim, where it comes from)}``,
    e.g. the encoders or ``meta.json``) and the other imports'; returns the dimension of each space."""
    dims = dict(known)
    for imp in imports:
        have = dims.get(imp.space)
        if have is not None and have[0] != imp.dim:
            raise DataError(imp.spec.path, "top level", imp.spec.key,
                            f"features of dimension {imp.dim}, but the cache's {imp.space} views have dimension "
                            f"{have[0]} ({have[1]})")
        dims.setdefault(imp.space, (imp.dim, f"--import {imp.spec.view}={imp.spec.path}"))
    return {space: d for space, (d, _) in dims.items()}


def write_import(store: FeatureStore, imp: PreparedImport, chunk: int = 4096) -> None:
    """Write one checked import into the cache (resumable, like an encoded view)."""
    n = len(imp.rows)
    w = store.writer(imp.spec.side, imp.spec.view.split(".")[1], n, imp.row_shape, imp.mask_shape, imp.fingerprint)
    for start in range(w.start_row, n, chunk):
        src = imp.rows[start:start + chunk]
        data = np.zeros((len(src), *imp.row_shape), np.float32)
        have = src >= 0
        data[have] = imp.array[src[have]]
        mask = None
        if imp.mask_shape is not None:  # an all-zero row / token / slot is absent
            mask = (np.abs(data).max(-1) > 0) & have.reshape(-1, *([1] * len(imp.mask_shape)))
        w.write(start, data.astype(np.float16), mask)
    w.commit({"imported": imp.source})
