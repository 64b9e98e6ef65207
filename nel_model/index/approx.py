"""The approximate kinds: a faiss structure proposes a pool of candidates, the stored vectors score them exactly.

* ``ivfpq`` (:class:`IVFPQParams`): an inverted file (``nlist`` k-means cells over the entity vectors) of
  product-quantised residuals (``m`` sub-vectors of ``nbits`` bits: ``m * nbits / 8`` bytes an entity in memory,
  96 at 384-d); a search visits the ``nprobe`` cells nearest the query. The compact kind (about 1 GB for 10 million
  384-d entities); its recall needs queries that fall in the entities' cells (``bench/results/index_scale_cpu.md``:
  untrained mention vectors do not). Removing entities removes their codes; adding encodes new ones with the same
  trained quantiser.
* ``hnsw`` (:class:`HNSWParams`, the default approximate kind): a navigable small-world graph (``m`` links a node,
  ``ef_construction`` breadth while inserting) over scalar-quantised vectors (``storage`` ``sq8``: one byte a
  dimension, so 10 million 384-d entities take 3.8 GB plus about 2.6 GB of graph; ``flat``: float32); a search
  explores ``ef_search`` nodes. Added entities are inserted into the graph; removed ones stay in it as waypoints and
  are filtered out of every answer (a faiss ``IDSelector``).

Both propose ``pool`` candidates (never padding: faiss's ``-1`` labels are dropped), which are then scored exactly
from the shards (float32 inner products) and ordered like exact search: higher first, ties in KB order. So an
approximate answer differs from the exact one only in which entities it found, never in their scores or order.
faiss labels are slots (:mod:`nel_model.index.shards`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nel_model.index.shards import ShardSet

APPROX_KINDS = ("ivfpq", "hnsw")
HNSW_STORAGE = ("sq8", "flat")
ADD_ROWS = 65536
MAX_AUTO_NLIST = 8192          # k-means and assignment cost on a CPU grow with nlist
RESCORE_QUERIES = 64


def faiss_module():
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as exc:  # pragma: no cover - faiss-cpu is in req.txt
        raise ImportError("the ivfpq and hnsw index kinds need faiss-cpu: pip install faiss-cpu") from exc
    return faiss


@dataclass(frozen=True)
class IVFPQParams:
    """IVF-PQ settings; 0 means "chosen from the entity count and dimension" (:meth:`resolve`)."""

    nlist: int = 0          # cells: the power of two nearest 4 sqrt(n), at most 8192 and n / 39
    m: int = 0              # sub-quantisers: dim / 4 (4 dimensions each, 1 byte each); must divide dim
    nbits: int = 8          # bits a sub-quantiser (fewer for tiny KBs: 39 training points a centroid)
    nprobe: int = 128       # cells visited a query (overridable at search time)
    pool: int = 0           # candidates re-scored exactly: max(100, 10 k) when 0 (overridable at search time)
    train_size: int = 0     # entities sampled to train: min(n, max(65536, 40 nlist)) when 0
    seed: int = 0

    def resolve(self, n: int, dim: int) -> "IVFPQParams":
        nlist = self.nlist or max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), MAX_AUTO_NLIST,
                                         n // 39))
        m = self.m or max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 4))
        if dim % m:
            raise ValueError(f"ivfpq: m={m} sub-quantisers must divide the dimension {dim}")
        nbits = max(1, min(self.nbits, int(math.log2(max(2, n // 39)))))
        train = min(n, self.train_size or max(65536, 40 * nlist))
        return replace(self, nlist=min(nlist, max(1, n)), m=m, nbits=nbits, train_size=train)

    @staticmethod
    def default_pool(k: int) -> int:
        return max(100, 10 * k)     # PQ codes rank coarsely: a wide pool


@dataclass(frozen=True)
class HNSWParams:
    """HNSW settings (``storage``: how the graph holds the vectors; the exact re-scoring reads the shards)."""

    m: int = 32
    ef_construction: int = 80
    ef_search: int = 1024   # overridable at search time
    storage: str = "sq8"
    pool: int = 0           # candidates re-scored exactly: max(50, 5 k) when 0
    train_size: int = 0     # entities sampled to train the scalar quantiser: min(n, 65536) when 0
    seed: int = 0

    def resolve(self, n: int, dim: int) -> "HNSWParams":
        if self.storage not in HNSW_STORAGE:
            raise ValueError(f"hnsw: unknown storage {self.storage!r}; expected one of {', '.join(HNSW_STORAGE)}")
        return replace(self, train_size=min(n, self.train_size or 65536))

    @staticmethod
    def default_pool(k: int) -> int:
        return max(50, 5 * k)       # 8-bit scalar quantisation ranks almost exactly: a narrow pool


Params = IVFPQParams | HNSWParams
PARAM_TYPES = {"ivfpq": IVFPQParams, "hnsw": HNSWParams}


def default_params(kind: str) -> Params:
    return PARAM_TYPES[kind]()


def params_from_json(kind: str, obj: dict[str, Any]) -> Params:
    return PARAM_TYPES[kind](**obj)


def params_json(params: Params) -> dict[str, Any]:
    return asdict(params)


def pool_size(params: Params, k: int, pool: int | None) -> int:
    return int(pool or params.pool or params.default_pool(k))


# ---------------------------------------------------------------------------------------------
# Building


def training_sample(shards: ShardSet, size: int, seed: int) -> np.ndarray:
    """float32 vectors of ``size`` live entities drawn without replacement (seeded), in slot order."""
    live = shards.live_slots(0, shards.slots)
    if size < len(live):
        live = np.sort(np.random.default_rng(seed).choice(live, size=size, replace=False))
    return np.ascontiguousarray(shards.gather(live))


def factory_string(kind: str, params: Params) -> str:
    if kind == "ivfpq":
        return f"IVF{params.nlist},PQ{params.m}x{params.nbits}"
    return f"IDMap,HNSW{params.m}" + ("_SQ8" if params.storage == "sq8" else ",Flat")


def empty_index(kind: str, params: Params, dim: int):
    faiss = faiss_module()
    index = faiss.index_factory(dim, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        ivf = faiss.downcast_index(index)
        ivf.do_polysemous_training = False    # Hamming pre-filtering is not used; its training is slow
        ivf.cp.seed = params.seed
        ivf.pq.cp.seed = params.seed
        ivf.nprobe = min(params.nprobe, params.nlist)
    else:
        hnsw = faiss.downcast_index(faiss.downcast_index(index).index).hnsw
        hnsw.efConstruction = params.ef_construction
        hnsw.efSearch = params.ef_search
    return index


def train_index(kind: str, params: Params, shards: ShardSet, dim: int) -> tuple[Any, float]:
    """A trained, empty faiss index over a sample of the live entities, and the seconds it took."""
    t0 = time.perf_counter()
    index = empty_index(kind, params, dim)
    sample = training_sample(shards, params.train_size, params.seed)
    shards.close()                            # drop the pages the sample touched
    index.train(sample)
    return index, time.perf_counter() - t0


def add_slots(index, shards: ShardSet, start: int = 0, block_rows: int = ADD_ROWS) -> None:
    """Add the live entities from slot ``start`` on to ``index`` (labels = slots), block by block."""
    for slots, x in shards.blocks(block_rows, start):
        index.add_with_ids(x, slots)


def remove_slots(kind: str, index, slots: np.ndarray) -> None:
    """IVF-PQ drops the codes of removed entities; HNSW keeps them as waypoints (filtered at search)."""
    if kind == "ivfpq" and len(slots):
        index.remove_ids(faiss_module().IDSelectorBatch(np.asarray(slots, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` for a writer that wants a file name; fsynced and renamed over ``path`` when
    the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_index(index, path: Path) -> None:
    with _atomic_path(path) as tmp:
        faiss_module().write_index(index, tmp)


def read_index(path: Path):
    faiss = faiss_module()
    return faiss.read_index(str(path))


# ---------------------------------------------------------------------------------------------
# Searching


def search_params(kind: str, params: Params, pool: int, removed: np.ndarray, nprobe: int | None,
                  ef_search: int | None):
    faiss = faiss_module()
    if kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=min(int(nprobe or params.nprobe), params.nlist))
    sp = faiss.SearchParametersHNSW(efSearch=max(int(ef_search or params.ef_search), pool))
    if len(removed):
        sp.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(removed, dtype=np.int64)))
    return sp


def candidates(kind: str, index, params: Params, queries: np.ndarray, pool: int, removed: np.ndarray,
               nprobe: int | None = None, ef_search: int | None = None) -> np.ndarray:
    """``[N, pool]`` candidate slots of each query, ``-1`` where faiss found fewer."""
    sp = search_params(kind, params, pool, removed, nprobe, ef_search)
    # the selector's lifetime must cover the search: keep a reference in this frame
    keep = getattr(sp, "sel", None)
    _, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), pool, params=sp)
    del keep
    return labels


def rescore(shards: ShardSet, queries: np.ndarray, cands: np.ndarray, k: int
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each query's best ``k`` of its candidates (``-1`` and removed slots dropped, repeats counted once), scored
    exactly from the shards: ``(scores, slots)`` lists, best first, ties in slot (KB) order, NaN last."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out_s: list[np.ndarray] = []
    out_l: list[np.ndarray] = []
    for a in range(0, len(q), RESCORE_QUERIES):
        c = cands[a:a + RESCORE_QUERIES]
        valid = c >= 0
        if len(shards.removed):
            valid &= ~np.isin(c, shards.removed)
        uniq, inv = np.unique(np.where(valid, c, -1), return_inverse=True)
        inv = inv.reshape(c.shape)
        vecs = shards.gather(uniq[uniq >= 0])
        if uniq[0] < 0:                       # keep positions aligned with uniq
            vecs = np.concatenate([np.zeros((1, shards.dim), np.float32), vecs])
        scores = np.einsum("nd,npd->np", q[a:a + RESCORE_QUERIES], vecs[inv], optimize=False)
        for i in range(len(c)):
            sl, first = np.unique(c[i][valid[i]], return_index=True)
            sc = scores[i][valid[i]][first]
            sc = np.where(np.isnan(sc), -np.inf, sc).astype(np.float32)
            order = np.lexsort((sl, -sc))[:k]
            out_s.append(sc[order])
            out_l.append(sl[order])
    return out_s, out_l


def recall_at(approx: list[np.ndarray], exact: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top ``k`` that the approximate top ``k`` holds (1.0 for an empty index)."""
    kk = min(k, exact.shape[1])
    if kk == 0 or not len(approx):
        return 1.0
    return float(np.mean([len(np.intersect1d(a[:kk], e[:kk])) / kk for a, e in zip(approx, exact)]))
