"""Ranking metrics: full-KB ranks by chunked matrix products, candidate-list ranks, MRR and Hits@k.

Tie rule (pessimistic, both protocols): the rank of the gold entity is ``1 + #{other entities j : not (s_j < s_gold)}``,
i.e. every other entity scoring *equal to or higher than* the gold one (and any NaN score) is ranked ahead of it.
A degenerate model that gives all entities the same score therefore gets the worst rank, never the best. The gold
score is read from the same score matrix as the others (same precision, same kernel), so the gold never ties
against itself because of rounding. Rank ``0`` means "gold not ranked" (candidate protocol: gold not among the
candidates); it counts as a miss (reciprocal rank 0).
"""

from __future__ import annotations

import torch

HITS_AT = (1, 3, 5, 10, 20)


def metrics_from_ranks(ranks: torch.Tensor | list[int], ks: tuple[int, ...] = HITS_AT) -> dict[str, float]:
    """``{"mrr", "hits@k"..., "n"}`` as fractions in [0, 1]; rank 0 = miss."""
    r = torch.as_tensor(ranks, dtype=torch.float64).reshape(-1)
    n = int(r.numel())
    out: dict[str, float] = {}
    if n == 0:
        out["mrr"] = 0.0
        for k in ks:
            out[f"hits@{k}"] = 0.0
        out["n"] = 0
        return out
    found = r > 0
    rr = torch.where(found, 1.0 / r.clamp(min=1), torch.zeros_like(r))
    out["mrr"] = float(rr.mean())
    for k in ks:
        out[f"hits@{k}"] = float((found & (r <= k)).double().mean())
    out["n"] = n
    return out


def full_kb_ranks(queries: torch.Tensor, entities: torch.Tensor, gold: torch.Tensor, chunk: int = 512,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rank of each query's gold entity among all ``entities`` ([N,D] × [E,D] → [N] long, on the queries' device).

    Scores are computed ``chunk`` queries at a time as one matrix product (in ``dtype``, default the inputs');
    no Python loop over entities."""
    dtype = dtype or queries.dtype
    ent = entities.to(dtype)
    gold = gold.to(queries.device).long()
    out = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    for s in range(0, len(queries), chunk):
        q = queries[s: s + chunk].to(dtype)
        scores = q @ ent.T                                                       # [c,E]
        g = scores.gather(1, gold[s: s + chunk, None])                           # [c,1]
        # Entities not strictly below the gold (the gold itself, ties and NaN) = E - #below. Counting on a
        # uint8 view in int32 is several times faster on CPU than summing a bool tensor.
        below = (scores < g).view(torch.uint8).sum(1, dtype=torch.int32)
        out[s: s + chunk] = len(ent) - below
    return out


def candidate_ranks(queries: torch.Tensor, entities: torch.Tensor, candidates: torch.Tensor,
                    gold: torch.Tensor) -> torch.Tensor:
    """Rank of the gold among each query's candidate list ([N,C] entity rows, ``-1`` = padding).

    Repeated copies of the gold row in a list are ignored; returns 0 where the gold is not a candidate."""
    dev = queries.device
    cands = candidates.to(dev).long()
    gold = gold.to(dev).long()
    valid = cands >= 0
    ce = entities[cands.clamp(min=0)]                                            # [N,C,D]
    scores = torch.einsum("nd,ncd->nc", queries.to(ce.dtype), ce)
    is_gold = valid & (cands == gold[:, None])
    present = is_gold.any(1)
    gpos = is_gold.float().argmax(1)
    g = scores.gather(1, gpos[:, None])
    ahead = valid & ~is_gold & ~(scores < g)
    return torch.where(present, 1 + ahead.sum(1), torch.zeros_like(gold))
