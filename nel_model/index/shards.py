"""The index folder's vector store: shards of entity vectors, written as they are encoded, read memory-mapped.

A shard is two files in ``INDEX/shards/``: ``NNNNN.npy`` (the vectors, ``[rows, dim]`` float32 or float16, a plain
``.npy``) and ``NNNNN.json``, its record (``rows``, ``dim``, ``dtype``, ``vectors_sha256``, ``ids_sha256``, ``ids``).
Both are written atomically, the vectors first: a record on disk means a finished shard, and a shard whose record
is missing, or whose files do not match it, is encoded again. The index is the ordered union of its shards; a
*slot* is a vector's position in that union (shard after shard, row after row). Slots never move: a removed entity
keeps its slot (a tombstone, :class:`ShardSet` ``removed``) and an added one gets the next free slot.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data_process.core.durable_io import atomic_write_bytes

SHARD_DIR = "shards"
DTYPES = ("float32", "float16")
HASH_BLOCK = 1 << 24


def ids_sha256(ids: Sequence[str]) -> str:
    """The fingerprint of an ordered id list (its compact JSON, UTF-8)."""
    return hashlib.sha256(json.dumps(list(ids), ensure_ascii=False).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def shard_name(number: int) -> str:
    return f"{number:05d}"


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard, as the manifest lists it (the ids themselves are in the shard's record file)."""

    name: str
    rows: int
    vectors_sha256: str
    ids_sha256: str

    @property
    def vectors(self) -> str:
        return f"{SHARD_DIR}/{self.name}.npy"

    @property
    def record(self) -> str:
        return f"{SHARD_DIR}/{self.name}.json"

    def to_json(self) -> dict:
        return {"name": self.name, "rows": self.rows, "vectors": self.vectors, "record": self.record,
                "vectors_sha256": self.vectors_sha256, "ids_sha256": self.ids_sha256}

    @classmethod
    def from_json(cls, obj: dict) -> "ShardRecord":
        return cls(str(obj["name"]), int(obj["rows"]), str(obj["vectors_sha256"]), str(obj["ids_sha256"]))


def write_shard(root: Path, name: str, ids: Sequence[str], vectors: np.ndarray, dtype: str) -> ShardRecord:
    """Write one shard atomically (vectors, then the record that marks it finished); return its record."""
    arr = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    rec = ShardRecord(name, len(ids), hashlib.sha256(data).hexdigest(), ids_sha256(ids))
    atomic_write_bytes(root / rec.vectors, data)
    body = {"rows": rec.rows, "dim": int(arr.shape[1]), "dtype": dtype, "vectors_sha256": rec.vectors_sha256,
            "ids_sha256": rec.ids_sha256, "ids": list(ids)}
    atomic_write_bytes(root / rec.record, (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8"))
    return rec


def finished_shard(root: Path, name: str, ids_hash: str, rows: int, dim: int | None, dtype: str,
                   verify: bool = True) -> ShardRecord | None:
    """The record of shard ``name`` if it is finished and holds exactly the planned entities (``ids_hash``, ``rows``)
    in ``dtype`` (and ``dim`` when known), its vectors' sha256 checked when ``verify``; ``None`` otherwise (to be
    encoded again)."""
    path = root / SHARD_DIR / f"{name}.json"
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        ok = (body["ids_sha256"] == ids_hash and int(body["rows"]) == rows and body["dtype"] == dtype
              and (dim is None or int(body["dim"]) == dim))
        rec = ShardRecord(name, rows, str(body["vectors_sha256"]), str(body["ids_sha256"]))
        if not ok or (verify and file_sha256(root / rec.vectors) != rec.vectors_sha256):
            return None
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_dim(root: Path, rec: ShardRecord) -> int:
    return int(json.loads((root / rec.record).read_text(encoding="utf-8"))["dim"])


class ShardSet:
    """The ordered union of an index's shards: slots, ids, memory-mapped vectors and tombstones.

    ``removed`` holds the removed slots (sorted); every other slot is *live*. A live entity's *row* is its
    position among the live ones (what a rebuild over the same entities would number it): the rows and ids that
    searches return."""

    def __init__(self, root: Path, shards: Sequence[ShardRecord], dim: int, dtype: str,
                 removed: np.ndarray | None = None):
        self.root = Path(root)
        self.shards = list(shards)
        self.dim = dim
        self.dtype = dtype
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards]).astype(np.int64)
        self.removed = np.unique(np.asarray(removed if removed is not None else [], dtype=np.int64))
        self._maps: dict[int, np.ndarray] = {}
        self._ids: dict[int, list[str]] = {}
        self._id_slot: dict[str, int] | None = None

    # -- sizes and numbering
    @property
    def slots(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.slots - len(self.removed)

    def live_slots(self, lo: int, hi: int) -> np.ndarray:
        """The live slots in ``[lo, hi)``."""
        dead = self.removed[(self.removed >= lo) & (self.removed < hi)]
        return np.setdiff1d(np.arange(lo, hi, dtype=np.int64), dead, assume_unique=True)

    def rows_of(self, slots: np.ndarray) -> np.ndarray:
        """Live rows of live slots (a slot minus the removed slots before it)."""
        slots = np.asarray(slots, dtype=np.int64)
        return slots - np.searchsorted(self.removed, slots)

    # -- ids
    def shard_ids(self, i: int) -> list[str]:
        if i not in self._ids:
            body = json.loads((self.root / self.shards[i].record).read_text(encoding="utf-8"))
            self._ids[i] = list(body["ids"])
        return self._ids[i]

    def ids_of(self, slots: np.ndarray) -> list[str]:
        slots = np.asarray(slots, dtype=np.int64)
        which = np.searchsorted(self.offsets, slots, side="right") - 1
        return [self.shard_ids(int(w))[int(s - self.offsets[w])] for s, w in zip(slots, which)]

    def live_ids(self) -> list[str]:
        out: list[str] = []
        for i in range(len(self.shards)):
            ids = self.shard_ids(i)
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            dead = self.removed[(self.removed >= lo) & (self.removed < hi)] - lo
            if len(dead):
                gone = set(dead.tolist())
                out.extend(x for j, x in enumerate(ids) if j not in gone)
            else:
                out.extend(ids)
        return out

    def slot_of_id(self) -> dict[str, int]:
        """Live id -> slot (built on first use)."""
        if self._id_slot is None:
            dead = set(self.removed.tolist())
            table: dict[str, int] = {}
            for i in range(len(self.shards)):
                base = int(self.offsets[i])
                for j, x in enumerate(self.shard_ids(i)):
                    if base + j not in dead:
                        table[x] = base + j
            self._id_slot = table
        return self._id_slot

    # -- vectors
    def open_shard(self, i: int) -> np.ndarray:
        """A fresh read-only memory map of shard ``i`` (dropped by the caller when done, so a scan of the whole
        index does not keep every page it read mapped into this process)."""
        arr = np.load(self.root / self.shards[i].vectors, mmap_mode="r", allow_pickle=False)
        if arr.shape != (self.shards[i].rows, self.dim) or arr.dtype != np.dtype(self.dtype):
            raise ValueError(f"{self.root / self.shards[i].vectors}: holds {arr.dtype} {list(arr.shape)}, the "
                             f"manifest says {self.dtype} [{self.shards[i].rows}, {self.dim}]; rebuild the index")
        return arr

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = self.open_shard(i)
        return self._maps[i]

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """float32 vectors ``[len(slots), dim]`` of any slots (random access through kept memory maps)."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        out = np.empty((len(slots), self.dim), dtype=np.float32)
        if not len(slots):
            return out
        order = np.argsort(slots, kind="stable")
        s = slots[order]
        which = np.searchsorted(self.offsets, s, side="right") - 1
        bounds = np.flatnonzero(np.diff(which)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(s)]):
            w = int(which[a])
            out[order[a:b]] = self._map(w)[s[a:b] - self.offsets[w]]
        return out

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(slots, float32 vectors)`` of the live entities from slot ``start`` on, in slot order, ``block_rows``
        rows at a time; each shard is mapped only while it is read (a scan of the whole index keeps no page of it
        mapped into this process)."""
        for i in range(len(self.shards)):
            base, end = int(self.offsets[i]), int(self.offsets[i + 1])
            if end <= start:
                continue
            arr = self.open_shard(i)
            for lo in range(max(0, start - base), len(arr), block_rows):
                hi = min(len(arr), lo + block_rows)
                slots = self.live_slots(base + lo, base + hi)
                if len(slots) == hi - lo:
                    yield slots, np.array(arr[lo:hi], dtype=np.float32)      # a copy: the map is read-only
                elif len(slots):
                    yield slots, np.array(arr[slots - base], dtype=np.float32)
            del arr

    def close(self) -> None:
        self._maps.clear()
