"""The index folder: a KB's entity vectors in shards, a manifest, and optionally a faiss structure over them.

::

    index = KBIndexFolder.build(out, batches, encode, fingerprint, kind="ivfpq", sample_queries=q)
    index = KBIndexFolder.open(out, fingerprint)          # another fingerprint: refused with one error line
    scores, ids = index.search(queries, k=10)             # lists, one a query, best first, never padded
    index.add(more_batches, encode); index.remove(["Q42"])

``batches`` is any iterable of :class:`EntityBatch` (ids + whatever ``encode`` needs) in KB order; ``encode(batch)``
returns the batch's float32 ``[n, D]`` L2-normalised vectors (the run-specific encoder is the caller's). Batches
should be cheap to produce: every process reads all of them, ``encode`` does the work. Shards close at the first
batch boundary at or past ``shard_size`` entities, so the same batches give the same shards.

* **Resumable**: each shard is written atomically as soon as it is encoded; a rerun after a kill (kill -9
  included) verifies every finished shard (its ids and the sha256 of its vectors) and skips it without encoding.
  The manifest is written last: a folder without ``manifest.json`` is an unfinished build (rerun ``build``).
* **Distributed** (``torchrun``; pass ``nel_model.distributed.setup()``'s ``DistInfo``): shard ``i`` is encoded by
  rank ``i % world_size``; rank 0 holds the folder's lock (``data_process.core.locks.output_lock``), checks every
  shard once all ranks are done and writes the manifest. The index is the ordered union of the shards, whatever the
  number of processes. Ranks other than 0 return ``None``.
* **Kinds**: ``flat`` (exact: every entity scored, :mod:`nel_model.index.exact`), ``ivfpq`` and ``hnsw``
  (:mod:`nel_model.index.approx`: a candidate pool scored exactly from the shards); every kind can also be searched
  exactly (``exact=True``). Each approximate kind records its parameters and, from the sample queries given at build
  time, its recall@1 and recall@10 against exact search.
* **add / remove** without re-encoding the rest or retraining (module docstring of :mod:`nel_model.index.approx`
  and ``docs/CONTRACTS.md`` "KB index folders": what "equal to a rebuild" means for each kind).

The layout is in ``docs/CONTRACTS.md`` ("KB index folders").
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_bytes, atomic_write_json
from data_process.core.locks import output_lock
from nel_model import distributed as D
from nel_model.index import approx
from nel_model.index.exact import exact_topk
from nel_model.index.texts import TEXTS_FILE
from nel_model.index.shards import (DTYPES, SHARD_DIR, ShardRecord, ShardSet, finished_shard, ids_sha256, shard_dim,
                                    shard_name, write_shard)

FORMAT = "dim-mel KB index"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_STATE = "build.json"
FAISS_DIR = "faiss"
SAMPLE_QUERIES = "sample_queries.npy"
INDEX_KINDS = ("flat", *approx.APPROX_KINDS)
DEFAULT_APPROX_KIND = "hnsw"          # bench/results/index_scale_cpu.md: recall on real-shaped embeddings
DEFAULT_SHARD_SIZE = 65536
RECALL_KS = (1, 10)
NORM_TOLERANCE = 1e-3
OWN_ENTRIES = (MANIFEST, BUILD_STATE, SHARD_DIR, FAISS_DIR, SAMPLE_QUERIES, TEXTS_FILE)


@dataclass(frozen=True)
class EntityBatch:
    """Entities to encode: their ids in KB order and whatever the caller's ``encode`` needs (texts, feature rows)."""

    ids: Sequence[str]
    data: Any = None


Encoder = Callable[[EntityBatch], "np.ndarray | torch.Tensor"]


class IndexMismatch(ValueError):
    """The index was built for another run (its fingerprint differs)."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _check_fingerprint(fingerprint: Any) -> dict:
    if not isinstance(fingerprint, dict) or not fingerprint:
        raise ValueError("the index fingerprint must be a non-empty dict (the run's checkpoint fingerprint and "
                         "encoder ids)")
    try:
        return json.loads(_canonical(fingerprint))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the index fingerprint must be JSON-serialisable: {exc}") from None


def _as_vectors(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _checked(vectors: Any, batch: EntityBatch, dim: int | None) -> np.ndarray:
    """``encode``'s answer for ``batch``, checked: ``[len(ids), D]``, finite, L2-normalised."""
    arr = _as_vectors(vectors)
    first = batch.ids[0] if len(batch.ids) else "?"
    if arr.ndim != 2 or arr.shape[0] != len(batch.ids) or (dim is not None and arr.shape[1] != dim):
        want = f"[{len(batch.ids)}, {dim if dim is not None else 'D'}]"
        raise ValueError(f"entity batch starting at {first!r}: encode returned shape {list(arr.shape)}, "
                         f"expected {want}")
    bad = ~np.isfinite(arr).all(1)
    norms = np.linalg.norm(arr, axis=1)
    bad |= np.abs(norms - 1) > NORM_TOLERANCE
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"entity {batch.ids[i]!r}: encode returned a vector of norm {norms[i]:.6g}; the index "
                         "holds finite L2-normalised vectors (inner product = cosine)")
    return arr


def _queries(queries: Any, dim: int) -> np.ndarray:
    q = _as_vectors(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [N, {dim}], got {list(q.shape)}")
    return q


@dataclass
class _ShardPlan:
    """One planned shard: its number, the fingerprint of its ids and its size."""

    number: int
    ids_hash: str
    rows: int


def _encode_shards(root: Path, batches: Iterable[EntityBatch], encode: Encoder, *, dtype: str, shard_size: int,
                   first_number: int, info: D.DistInfo, verify: bool, dim: int | None, known_ids: set[str] | None,
                   check_ids: bool, log: Callable[[str], None]) -> tuple[list[_ShardPlan], int | None, dict]:
    """Stream ``batches`` into shards (this process encodes shard ``i`` when ``i % world == rank``); return the
    plan of every shard, the dimension (if this process saw a vector) and counts. ``check_ids``: refuse an id seen
    twice or already in ``known_ids``."""
    plan: list[_ShardPlan] = []
    counts = {"encoded": 0, "skipped": 0, "entities": 0}
    pending: list[EntityBatch] = []
    seen: set[str] = set()

    def flush() -> None:
        nonlocal dim
        ids = [x for b in pending for x in b.ids]
        number = first_number + len(plan)
        item = _ShardPlan(number, ids_sha256(ids), len(ids))
        plan.append(item)
        if (len(plan) - 1) % info.world_size != info.rank:      # shard i is encoded by rank i % world
            return
        name = shard_name(number)
        rec = finished_shard(root, name, item.ids_hash, item.rows, dim, dtype, verify=verify)
        if rec is not None:
            dim = dim if dim is not None else shard_dim(root, rec)
            counts["skipped"] += 1
            return
        parts = []
        for b in pending:
            parts.append(_checked(encode(b), b, dim))
            dim = parts[-1].shape[1]
        write_shard(root, name, ids, np.concatenate(parts), dtype)
        counts["encoded"] += 1
        log(f"shard {name}: {len(ids)} entities")

    rows = 0
    for batch in batches:
        if not isinstance(batch, EntityBatch):
            raise ValueError(f"entity batches must be EntityBatch objects, got {type(batch).__name__}")
        if not len(batch.ids):
            continue
        if check_ids:
            for x in batch.ids:
                if not isinstance(x, str) or not x:
                    raise ValueError(f"entity id {x!r}: ids must be non-empty strings")
                if x in seen or (known_ids is not None and x in known_ids):
                    raise ValueError(f"entity {x!r} is given twice" if x in seen else
                                     f"entity {x!r} is already in the index (remove it first to replace it)")
                seen.add(x)
        pending.append(batch)
        rows += len(batch.ids)
        counts["entities"] += len(batch.ids)
        if rows >= shard_size:
            flush()
            pending, rows = [], 0
    if pending:
        flush()
    return plan, dim, counts


class KBIndexFolder:
    """An index folder opened for search, add and remove (module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.dim: int = int(manifest["dim"])
        self.dtype: str = manifest["dtype"]
        removed = None
        if manifest.get("removed"):
            removed = np.load(self.root / manifest["removed"]["file"], allow_pickle=False)
        self.shards = ShardSet(self.root, [ShardRecord.from_json(s) for s in manifest["shards"]], self.dim,
                               self.dtype, removed)
        self.params: approx.Params | None = None
        self.index = None
        if self.kind != "flat":
            self.params = approx.params_from_json(self.kind, manifest["faiss"]["params"])
            self.index = approx.read_index(self.root / manifest["faiss"]["file"])

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, fingerprint: dict | None) -> "KBIndexFolder":
        """Open a finished index. ``fingerprint``: the run's; an index built for another one is refused
        (:class:`IndexMismatch`). ``None`` skips the check (reading an index without a run: ``info``, benchmarks)."""
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            if (root / BUILD_STATE).is_file():
                raise ValueError(f"{root}: an unfinished index build (no {MANIFEST}); run the build again to finish it")
            raise ValueError(f"{root}: not an index folder (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{mpath}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{mpath}: not a {FORMAT} version {VERSION} manifest")
        if fingerprint is not None and _canonical(manifest["fingerprint"]) != _canonical(
                _check_fingerprint(fingerprint)):
            raise IndexMismatch(f"{root}: the index was built for fingerprint {_canonical(manifest['fingerprint'])}, "
                                f"not {_canonical(fingerprint)}; build an index with this run")
        for s in manifest["shards"]:
            if not (root / s["vectors"]).is_file() or not (root / s["record"]).is_file():
                raise ValueError(f"{root / s['vectors']}: missing (the manifest lists it); rebuild the index")
        return cls(root, manifest)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, out: str | Path, batches: Iterable[EntityBatch], encode: Encoder, fingerprint: dict, *,
              kind: str = "flat", dtype: str = "float32", params: approx.Params | None = None,
              sample_queries: Any = None, shard_size: int = DEFAULT_SHARD_SIZE, dist: D.DistInfo | None = None,
              overwrite: bool = False, verify: bool = True, trained_from: "KBIndexFolder | None" = None,
              log: Callable[[str], None] | None = None) -> "KBIndexFolder | None":
        """Encode ``batches`` into a new index folder ``out`` (module docstring), or finish an interrupted build.

        ``trained_from``: an open ivfpq index whose trained quantiser is reused instead of training one (the
        rebuild that ``add``/``remove`` results equal, ``docs/CONTRACTS.md``)."""
        root = Path(out)
        info = dist or D.DistInfo()
        log = log or (lambda _msg: None)
        fp = _check_fingerprint(fingerprint)
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown index dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        if params is not None and not isinstance(params, approx.PARAM_TYPES.get(kind, ())):
            raise ValueError(f"params {type(params).__name__} do not fit the index kind {kind!r}")
        state = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "dtype": dtype, "shard_size": shard_size}
        with output_lock(root) if info.is_main else contextlib.nullcontext():
            error = None
            if info.is_main:
                try:
                    cls._start(root, state, overwrite)
                except ValueError as exc:
                    error = exc
            if _any_failed(error is not None, info):
                raise error or ValueError(f"{root}: rank 0 refused to build the index (see its error)")
            error = None
            try:
                plan, dim, counts = _encode_shards(root, batches, encode, dtype=dtype, shard_size=shard_size,
                                                   first_number=0, info=info, verify=verify, dim=None,
                                                   known_ids=None, check_ids=info.is_main, log=log)
            except Exception as exc:            # noqa: BLE001 - re-raised below, after telling the other ranks
                error = exc
            if _any_failed(error is not None, info):
                raise error or ValueError(f"{root}: another rank failed while encoding (see its error)")
            if not info.is_main:
                return None
            log(f"encoded {counts['encoded']} shards, {counts['skipped']} finished ones verified and skipped")
            records = cls._collect(root, plan, dtype)
            if not records:
                raise ValueError(f"{root}: no entities to index")
            dim = dim if dim is not None else shard_dim(root, records[0])
            manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "kind": "flat", "dim": dim,
                        "dtype": dtype, "shard_size": shard_size, "entities": 0, "slots": 0, "shards": [],
                        "removed": None, "faiss": None, "recall": None, "generation": 0,
                        "build": {"encoded_shards": counts["encoded"], "skipped_shards": counts["skipped"],
                                  "processes": info.world_size},
                        "history": [{"op": "build", "entities": sum(r.rows for r in records)}]}
            manifest["shards"] = [r.to_json() for r in records]
            index = cls(root, _counted(manifest))
            if sample_queries is not None:
                q = _queries(sample_queries, dim)
                buf = _npy_bytes(q)
                atomic_write_bytes(root / SAMPLE_QUERIES, buf)
            index._set_kind(kind, params, trained_from, log)
            (root / BUILD_STATE).unlink(missing_ok=True)
            return index

    @staticmethod
    def _start(root: Path, state: dict, overwrite: bool) -> None:
        """Rank 0, holding the lock: a finished index is refused (or cleared with ``overwrite``); an unfinished one
        with other settings too; the build's settings are recorded for the next resume."""
        foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES
                         and not p.name.startswith("removed-")) if root.is_dir() else []
        if foreign or ((root / TEXTS_FILE).exists() and not (root / SHARD_DIR).exists()):
            what = ", ".join(foreign[:3]) or f"{TEXTS_FILE} without shards"
            raise ValueError(f"{root}: a folder with other files, not an index folder ({what}); give an empty or "
                             "new folder")
        if (root / MANIFEST).exists() and not overwrite:
            raise ValueError(f"{root}: an index is already there; add or remove entities, or build with overwrite "
                             "(dim-mel index --overwrite)")
        old = root / BUILD_STATE
        if overwrite:
            for name in OWN_ENTRIES:
                p = root / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            for p in root.glob("removed-*.npy"):
                p.unlink()
        elif old.is_file():
            prev = json.loads(old.read_text(encoding="utf-8"))
            if _canonical(prev) != _canonical(state):
                changed = sorted(k for k in state if prev.get(k) != state[k])
                raise ValueError(f"{root}: an unfinished build with other settings ({', '.join(changed)}); "
                                 "rerun it with the same ones, or build with overwrite")
        atomic_write_json(old, state)

    @staticmethod
    def _collect(root: Path, plan: list[_ShardPlan], dtype: str) -> list[ShardRecord]:
        """The records of every planned shard (each rank's), checked against the plan and one dimension."""
        out, dims = [], set()
        for item in plan:
            rec = finished_shard(root, shard_name(item.number), item.ids_hash, item.rows, None, dtype, verify=False)
            if rec is None:
                raise ValueError(f"{root / SHARD_DIR / shard_name(item.number)}.json: missing or not the planned "
                                 "entities after every rank finished; run the build again")
            dims.add(shard_dim(root, rec))
            out.append(rec)
        if len(dims) > 1:
            raise ValueError(f"{root}: shards of different dimensions {sorted(dims)}; build with overwrite")
        return out

    # ------------------------------------------------------------------ kinds
    def set_kind(self, kind: str, params: approx.Params | None = None, sample_queries: Any = None,
                 trained_from: "KBIndexFolder | None" = None, log: Callable[[str], None] | None = None) -> None:
        """Replace the approximate structure by one of ``kind`` over the stored vectors (no encoding); ``flat``
        drops it. Recall is measured on ``sample_queries`` (or the ones stored at build time)."""
        with output_lock(self.root):
            if sample_queries is not None:
                atomic_write_bytes(self.root / SAMPLE_QUERIES, _npy_bytes(_queries(sample_queries, self.dim)))
            self._set_kind(kind, params, trained_from, log or (lambda _msg: None))

    def _set_kind(self, kind: str, params: approx.Params | None, trained_from: "KBIndexFolder | None",
                  log: Callable[[str], None]) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
        m = dict(self.manifest)
        m["kind"], m["faiss"], index, resolved = kind, None, None, None
        if kind != "flat":
            if trained_from is not None:
                index, resolved, timing = self._reuse_training(kind, trained_from)
            else:
                resolved = (params or approx.default_params(kind)).resolve(len(self.shards), self.dim)
                log(f"{kind}: training ({approx.factory_string(kind, resolved)}, {resolved.train_size} entities)")
                index, train_s = approx.train_index(kind, resolved, self.shards, self.dim)
                timing = {"train_s": round(train_s, 3), "trained_on": resolved.train_size}
            t0 = time.perf_counter()
            approx.add_slots(index, self.shards)
            timing["add_s"] = round(time.perf_counter() - t0, 3)
            log(f"{kind}: {len(self.shards)} entities added in {timing['add_s']:.1f} s")
            m["faiss"] = {"file": None, "factory": approx.factory_string(kind, resolved),
                          "params": approx.params_json(resolved), **timing}
        self._commit(m, index=index, faiss_changed=True)
        self.manifest["recall"] = self._recall_block()
        self._commit(dict(self.manifest))

    def _reuse_training(self, kind: str, other: "KBIndexFolder") -> tuple[Any, approx.Params, dict]:
        if other.kind != kind or other.index is None:
            raise ValueError(f"{other.root}: a {other.kind} index has no trained {kind} structure to reuse")
        if other.dim != self.dim or _canonical(other.manifest["fingerprint"]) != _canonical(
                self.manifest["fingerprint"]):
            raise ValueError(f"{other.root}: built for another run or dimension; its training cannot be reused")
        faiss = approx.faiss_module()
        index = faiss.clone_index(other.index)
        index.reset()                            # keeps the trained quantiser, drops every entity
        return index, other.params, {"trained_from": str(other.root)}

    # ------------------------------------------------------------------ manifest
    def _commit(self, manifest: dict, index=None, faiss_changed: bool = False, removed: np.ndarray | None = None
                ) -> None:
        """Write the next generation: a changed faiss structure or tombstone list to new files, then the manifest
        (atomic), then delete the files the previous generation used."""
        gen = int(manifest.get("generation", 0)) + 1
        manifest = dict(manifest, generation=gen)
        if faiss_changed and manifest.get("faiss") is not None:
            rel = f"{FAISS_DIR}/{manifest['kind']}-{gen}.faiss"
            approx.write_index(index, self.root / rel)
            manifest["faiss"] = dict(manifest["faiss"], file=rel)
        if removed is not None:
            rel = f"removed-{gen}.npy"
            atomic_write_bytes(self.root / rel, _npy_bytes(removed.astype(np.int64)))
            manifest["removed"] = {"file": rel, "count": int(len(removed))}
        atomic_write_json(self.root / MANIFEST, _counted(manifest))
        self.manifest = _counted(manifest)
        if faiss_changed:
            self.index = index
            self.kind = manifest["kind"]
            self.params = (approx.params_from_json(self.kind, manifest["faiss"]["params"])
                           if manifest.get("faiss") else None)
        if removed is not None:
            self.shards.removed = np.unique(removed.astype(np.int64))
            self.shards._id_slot = None
        self._clean()

    def _clean(self) -> None:
        keep = {self.manifest["faiss"]["file"]} if self.manifest.get("faiss") else set()
        if self.manifest.get("removed"):
            keep.add(self.manifest["removed"]["file"])
        for p in [*self.root.glob(f"{FAISS_DIR}/*.faiss"), *self.root.glob("removed-*.npy")]:
            if str(p.relative_to(self.root)) not in keep:
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ recall
    def _recall_block(self) -> dict[str, Any] | None:
        if self.kind == "flat":
            return None
        path = self.root / SAMPLE_QUERIES
        if not path.is_file():
            return {"queries": 0, "note": "no sample queries were given at build time: recall not measured"}
        return self.measure_recall(np.load(path, allow_pickle=False))

    def measure_recall(self, queries: Any, ks: Sequence[int] = RECALL_KS, **overrides) -> dict[str, Any]:
        """Recall@k of this index's approximate search against exact search on ``queries`` (``overrides``:
        ``nprobe``, ``ef_search``, ``pool`` as in :meth:`search`)."""
        if self.kind == "flat":
            raise ValueError(f"{self.root}: a flat index is exact; there is no recall to measure")
        q = _queries(queries, self.dim)
        t0 = time.perf_counter()
        _, exact = exact_topk(self.shards, q, max(ks))
        exact_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, found = self._approx_slots(q, max(ks), **overrides)
        approx_s = time.perf_counter() - t0
        out: dict[str, Any] = {"queries": len(q), "entities": len(self.shards),
                               "reference": "exact search over the shards (float32 scores)",
                               "search": self._search_settings(max(ks), **overrides)}
        for k in ks:
            out[f"recall@{k}"] = round(approx.recall_at(found, exact, k), 6)
        out["exact_s"], out["approx_s"] = round(exact_s, 3), round(approx_s, 3)
        return out

    def _search_settings(self, k: int, nprobe: int | None = None, ef_search: int | None = None,
                         pool: int | None = None) -> dict[str, int]:
        p = self.params
        size = approx.pool_size(p, k, pool)
        if self.kind == "ivfpq":
            return {"nprobe": min(int(nprobe or p.nprobe), p.nlist), "pool": size}
        return {"ef_search": max(int(ef_search or p.ef_search), size), "pool": size}

    # ------------------------------------------------------------------ searching
    def __len__(self) -> int:
        return len(self.shards)

    @property
    def entity_ids(self) -> list[str]:
        """The live entities' ids in KB order (row ``r`` of every search answer is ``entity_ids[r]``)."""
        return self.shards.live_ids()

    def _approx_slots(self, q: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
                      pool: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        size = approx.pool_size(self.params, k, pool)
        cands = approx.candidates(self.kind, self.index, self.params, q, size, self.shards.removed, nprobe,
                                  ef_search)
        return approx.rescore(self.shards, q, cands, k)

    def _search_slots(self, queries: Any, k: int, exact: bool = False, nprobe: int | None = None,
                      ef_search: int | None = None, pool: int | None = None
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _queries(queries, self.dim)
        if exact or self.kind == "flat":
            scores, slots = exact_topk(self.shards, q, int(k))
            return list(scores), list(slots)
        return self._approx_slots(q, int(k), nprobe, ef_search, pool)

    def search_rows(self, queries: Any, k: int, *, exact: bool = False, nprobe: int | None = None,
                    ef_search: int | None = None, pool: int | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(scores, rows)``: for each query, its best ``min(k, len(self))`` entities (fewer where an approximate
        kind found fewer; never padding), best first, equal scores in KB order; rows index :attr:`entity_ids`.
        ``exact``: score every entity whatever the kind. ``nprobe`` (ivfpq), ``ef_search`` (hnsw) and ``pool`` (the
        candidates re-scored exactly) override the recorded settings."""
        scores, slots = self._search_slots(queries, k, exact, nprobe, ef_search, pool)
        return scores, [self.shards.rows_of(s) for s in slots]

    def search(self, queries: Any, k: int, *, exact: bool = False, nprobe: int | None = None,
               ef_search: int | None = None, pool: int | None = None) -> tuple[list[np.ndarray], list[list[str]]]:
        """``(scores, ids)`` of :meth:`search_rows` (one list a query, best first, distinct entities)."""
        scores, slots = self._search_slots(queries, k, exact, nprobe, ef_search, pool)
        return scores, [self.shards.ids_of(s) for s in slots]

    # ------------------------------------------------------------------ add / remove
    def add(self, batches: Iterable[EntityBatch], encode: Encoder, *, verify: bool = True, remeasure: bool = True,
            log: Callable[[str], None] | None = None) -> int:
        """Encode new entities into new shards after the existing ones (KB order: after every entity already there)
        and add them to the approximate structure with its trained quantiser; nothing else is encoded or trained.
        An id already in the index is refused. Resumable like ``build``. Returns the number added."""
        log = log or (lambda _msg: None)
        with output_lock(self.root):
            live = set(self.shards.slot_of_id())
            first = len(self.shards.shards)
            plan, dim, counts = _encode_shards(self.root, batches, encode, dtype=self.dtype,
                                               shard_size=int(self.manifest["shard_size"]), first_number=first,
                                               info=D.DistInfo(), verify=verify, dim=self.dim, known_ids=live,
                                               check_ids=True, log=log)
            if not plan:
                return 0
            records = self._collect(self.root, plan, self.dtype)
            old_slots = self.shards.slots
            m = dict(self.manifest)
            m["shards"] = [*m["shards"], *(r.to_json() for r in records)]
            m["history"] = [*m["history"], {"op": "add", "entities": counts["entities"]}]
            self.shards = ShardSet(self.root, [ShardRecord.from_json(s) for s in m["shards"]], self.dim, self.dtype,
                                   self.shards.removed)
            if self.index is not None:
                approx.add_slots(self.index, self.shards, old_slots)
            self._commit(m, index=self.index, faiss_changed=self.index is not None)
            if remeasure:
                self.manifest["recall"] = self._recall_block()
                self._commit(dict(self.manifest))
            return counts["entities"]

    def remove(self, ids: Iterable[str], *, remeasure: bool = True) -> int:
        """Drop entities by id (their slots become tombstones: not returned, not counted; IVF-PQ drops their codes).
        An id not in the index is refused. Returns the number removed."""
        with output_lock(self.root):
            table = self.shards.slot_of_id()
            want = list(dict.fromkeys(ids))
            missing = [x for x in want if x not in table]
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise ValueError(f"{self.root}: not in the index: {', '.join(map(repr, missing[:3]))}{more}")
            if not want:
                return 0
            slots = np.array(sorted(table[x] for x in want), dtype=np.int64)
            if self.index is not None:
                approx.remove_slots(self.kind, self.index, slots)
            m = dict(self.manifest)
            m["history"] = [*m["history"], {"op": "remove", "entities": len(slots)}]
            removed = np.union1d(self.shards.removed, slots)
            self._commit(m, index=self.index, faiss_changed=self.kind == "ivfpq", removed=removed)
            if remeasure:
                self.manifest["recall"] = self._recall_block()
                self._commit(dict(self.manifest))
            return len(slots)

    # ------------------------------------------------------------------ reporting
    def verify(self) -> None:
        """Check every shard's vectors and ids against the manifest (sha256); raise naming the first bad file."""
        for rec in self.shards.shards:
            if finished_shard(self.root, rec.name, rec.ids_sha256, rec.rows, self.dim, self.dtype) is None:
                raise ValueError(f"{self.root / rec.vectors}: does not match the manifest (sha256 or ids); rebuild "
                                 "the index")

    def info(self) -> dict[str, Any]:
        """The manifest's summary: kind, entities, dim, dtype, shards, faiss parameters, recall, bytes on disk."""
        m = self.manifest
        disk = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {"path": str(self.root), "kind": self.kind, "entities": len(self.shards), "slots": self.shards.slots,
                "removed": int(len(self.shards.removed)), "dim": self.dim, "dtype": self.dtype,
                "shards": len(self.shards.shards), "fingerprint": m["fingerprint"],
                "faiss": {k: v for k, v in (m.get("faiss") or {}).items() if k != "file"} or None,
                "recall": m.get("recall"), "disk_bytes": disk, "history": m["history"]}


@contextlib.contextmanager
def matrix_index(vectors: Any, kind: str, sample_queries: Any = None,
                 params: approx.Params | None = None) -> Iterator[KBIndexFolder]:
    """A throwaway index of an in-memory matrix ``[n, D]`` (float32, L2-normalised; ids ``"0"`` .. ``"n-1"``, so
    ``search_rows`` gives matrix rows) in a temporary folder removed on exit: what ``dim-mel evaluate --faiss`` and
    ``dim-mel retrieve --faiss`` search."""
    x = _as_vectors(vectors)
    ids = [str(i) for i in range(len(x))]
    batches = (EntityBatch(ids[s:s + DEFAULT_SHARD_SIZE], slice(s, s + DEFAULT_SHARD_SIZE))
               for s in range(0, len(x), DEFAULT_SHARD_SIZE))
    with tempfile.TemporaryDirectory(prefix="dim-mel-index-") as tmp:
        index = KBIndexFolder.build(Path(tmp) / "index", batches, lambda b: x[b.data], {"matrix": len(x)}, kind=kind,
                                    params=params, sample_queries=sample_queries)
        try:
            yield index
        finally:
            index.shards.close()


def _counted(manifest: dict) -> dict:
    """The manifest with its entity and slot counts filled in from its shards and tombstones."""
    slots = sum(int(s["rows"]) for s in manifest["shards"])
    removed = int(manifest["removed"]["count"]) if manifest.get("removed") else 0
    return dict(manifest, entities=slots - removed, slots=slots)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _any_failed(failed: bool, info: D.DistInfo) -> bool:
    """Whether any rank failed (a collective: every rank must call it at the same point)."""
    return D.all_reduce_sum(1.0 if failed else 0.0, info) > 0 if info.enabled else failed


