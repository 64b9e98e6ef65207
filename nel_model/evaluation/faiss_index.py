"""Optional approximate KB index (faiss-cpu) for CPU users with large knowledge bases.

Exact full-KB ranking (``nel_model.evaluation.metrics.full_kb_ranks``) is the reference protocol. On a CPU with a
100k+ entity KB, an IVF or HNSW index answers top-k queries much faster at a small loss of recall;
:func:`recall_vs_exact` measures that loss so it can be reported beside the metrics.

Embeddings are L2-normalised, so inner product = cosine, the model's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as exc:  # pragma: no cover - faiss-cpu is in req.txt
        raise ImportError("the faiss index needs faiss-cpu: pip install faiss-cpu") from exc
    return faiss


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "ivf"
    nlist: int = 1024        # IVF cells; ~sqrt(N) to 4*sqrt(N) is usual
    nprobe: int = 32         # IVF cells visited per query
    hnsw_m: int = 32         # HNSW graph degree
    ef_search: int = 128     # HNSW search breadth


class KBIndex:
    """Top-k inner-product search over entity embeddings ``[E, D]`` (float32, L2-normalised)."""

    def __init__(self, entities: np.ndarray | torch.Tensor, settings: IndexSettings = IndexSettings(), seed: int = 0):
        faiss = _faiss()
        if settings.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {settings.kind!r}; expected one of {INDEX_KINDS}")
        x = np.ascontiguousarray(_as_numpy(entities), dtype=np.float32)
        n, d = x.shape
        self.settings = settings
        if settings.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif settings.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = settings.ef_search
        else:
            nlist = max(1, min(settings.nlist, n // 39))  # faiss wants >= 39 training points per cell
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(x)
            index.nprobe = min(settings.nprobe, nlist)
            self._quantizer = quantizer  # keep alive: the IVF index does not own it
        index.add(x)
        self.index = index

    @property
    def size(self) -> int:
        """Entities in the index."""
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and entity rows of the top-k entities per query, best first; ``k`` is cut to the KB's size (a
        list never repeats an entity), and an approximate index that finds fewer entities for a query marks the
        missing places with row -1 and score -inf (:func:`missing_entries` finds such a list)."""
        q = np.ascontiguousarray(_as_numpy(queries), dtype=np.float32)
        scores, rows = self.index.search(q, min(k, self.size))
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        return scores, rows


def missing_entries(rows: np.ndarray) -> tuple[int, int] | None:
    """``(query index, entities found)`` of the first list an index left short (rows of -1), or ``None``."""
    short = np.flatnonzero((rows < 0).any(axis=1))
    return None if not len(short) else (int(short[0]), int((rows[short[0]] >= 0).sum()))


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def ranks_from_topk(topk_rows: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of the gold row in each top-k list; ``k + 1`` where the gold is not retrieved.

    With ``k >= 20`` Hits@1..20 are exact for the index's ranking; MRR counts a miss as 0 only in the
    limit, so an MRR from this is a lower bound of ``1/(k+1)`` per missed mention at most.
    """
    k = topk_rows.shape[1]
    hit = topk_rows == gold[:, None]
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1) + 1, k + 1)


def recall_vs_exact(index: KBIndex, queries: np.ndarray | torch.Tensor, entities: np.ndarray | torch.Tensor,
                    k: int = 20, chunk: int = 1024) -> float:
    """Recall@k of the index against exact search: |approx top-k ∩ exact top-k| / k, averaged."""
    q = torch.as_tensor(_as_numpy(queries), dtype=torch.float32)
    e = torch.as_tensor(_as_numpy(entities), dtype=torch.float32)
    k = min(k, len(e))           # a KB smaller than k: topk would fail, and the index pads with -1 rows
    exact = np.concatenate([torch.topk(q[i:i + chunk] @ e.T, k, dim=1).indices.numpy()
                            for i in range(0, len(q), chunk)])
    _, approx = index.search(q.numpy(), k)
    inter = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact)]
    return float(np.mean(inter) / k)
