"""Hard-negative mining for training (``--hard_negatives``): each training mention's top-ranked wrong entities
under the current model, recomputed after every epoch and sampled by ``nel_model.training.batches.make_epoch_plan``."""

from __future__ import annotations

import numpy as np
import torch

from nel_model import distributed as D
from nel_model.data import FeatureSource, MELData
from nel_model.encoding import EncodeSettings, encode_entities, encode_mentions


def top_wrong(queries: torch.Tensor, entities: torch.Tensor, gold: torch.Tensor, k: int, chunk: int = 512,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``k`` highest-scoring entities other than the gold one, per query ([N,k] long; hard negatives)."""
    dtype = dtype or queries.dtype
    ent = entities.to(dtype)
    gold = gold.to(queries.device).long()
    k = min(k, len(entities) - 1)
    out = torch.empty(len(queries), k, dtype=torch.long, device=queries.device)
    for s in range(0, len(queries), chunk):
        scores = (queries[s: s + chunk].to(dtype) @ ent.T).float()
        scores.scatter_(1, gold[s: s + chunk, None], float("-inf"))
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        out[s: s + chunk] = scores.topk(k, dim=1).indices
    return out


@torch.no_grad()
def hard_negative_table(model: torch.nn.Module, data: MELData, source: FeatureSource, rows: np.ndarray, k: int,
                        dist: D.DistInfo, settings: EncodeSettings) -> np.ndarray:
    """``[M, k]`` (indexed by mention row, ``-1`` elsewhere): each of ``rows``' top-``k`` wrong entities."""
    emb = encode_entities(model, source, dist.device, settings)
    local = rows[D.shard(len(rows), dist)]
    q = encode_mentions(model, source, local, dist.device, settings)
    gold = torch.from_numpy(data.gold[local]).to(dist.device)
    top = D.gather_rows(top_wrong(q, emb, gold, k, settings.mention_chunk, settings.score_dtype).cpu(), dist)
    table = np.full((len(data.mention_ids), top.shape[1]), -1, dtype=np.int64)
    table[rows] = top.numpy()
    return table
