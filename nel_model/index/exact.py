"""Exact search over an index's shards: every live entity scored, in chunks, with evaluation's tie rule.

Scores are float32 inner products (a float16 index: of its float16 vectors, converted); the top ``k`` of each query
come from :func:`nel_model.evaluation.metrics.topk_by_row` on each block of entities (higher first, equal scores in
KB order, a NaN last) and are merged block by block with a stable sort, so ties stay in KB order across blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from nel_model.evaluation.metrics import topk_by_row
from nel_model.index.shards import ShardSet

QUERY_CHUNK = 256
BLOCK_ROWS = 32768


def merge_topk(vals: torch.Tensor, slots: torch.Tensor, new_vals: torch.Tensor, new_slots: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of two top lists whose ties are each in slot order and whose second list's slots all come
    after the first's: a stable descending sort of the two side by side keeps ties in slot order."""
    v = torch.cat([vals, new_vals], 1)
    s = torch.cat([slots, new_slots], 1)
    v, order = v.sort(dim=1, descending=True, stable=True)
    return v[:, :k], s.gather(1, order[:, :k])


def exact_topk(shards: ShardSet, queries: np.ndarray, k: int, query_chunk: int = QUERY_CHUNK,
               block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [N, k'] float32, slots [N, k'] int64)``, ``k' = min(k, live entities)``, best first."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    n = len(q)
    k = min(k, len(shards))
    if k <= 0 or n == 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    chunks = [(a, min(n, a + query_chunk)) for a in range(0, n, query_chunk)]
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunks)
    for slots, x in shards.blocks(block_rows):
        xt = torch.from_numpy(x)
        st = torch.from_numpy(slots)
        for c, (a, b) in enumerate(chunks):
            v, cols = topk_by_row(q[a:b] @ xt.T, k)
            s = st[cols]
            best[c] = (v, s) if best[c] is None else merge_topk(*best[c], v, s, k)
    return (torch.cat([b[0] for b in best]).numpy(), torch.cat([b[1] for b in best]).numpy())
