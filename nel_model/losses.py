"""Training losses over one global batch's entity embeddings.

Layout of ``entities`` (L2-normalised, except for the N-pair loss, which uses raw dot products as DIM's code does): rows ``[0, G)`` are the gold entities of the G mentions of the global
batch, rows ``G + i*n + j`` mention ``i``'s ``j``-th sampled negative. ``queries`` are this process's mentions
``[lo, hi)`` of the global batch. Both losses return the **sum** over local mentions; the trainer divides by the
global batch size (times the number of processes, which DDP's gradient averaging undoes), so 1 process and N
processes optimise exactly the same objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def triplet_loss_sum(queries: torch.Tensor, entities: torch.Tensor, lo: int, hi: int, global_n: int,
                     num_negatives: int, margin: float) -> torch.Tensor:
    """DIM's default: ``mean_j relu(margin - cos(q, e+) + cos(q, e-_j))`` summed over local mentions."""
    if num_negatives < 1:
        raise ValueError("the triplet loss needs --num_negatives >= 1")
    b = hi - lo
    pos = entities[lo:hi]                                                        # [b,D]
    neg = entities[global_n + lo * num_negatives: global_n + hi * num_negatives].reshape(b, num_negatives, -1)
    s_pos = (queries * pos).sum(-1, keepdim=True)                                # [b,1]
    s_neg = torch.einsum("bd,bnd->bn", queries, neg)                             # [b,n]
    return F.relu(margin - s_pos + s_neg).mean(1).sum()


def infonce_loss_sum(queries: torch.Tensor, entities: torch.Tensor, entity_rows: torch.Tensor, lo: int, hi: int,
                     global_n: int, temperature: float) -> torch.Tensor:
    """Cross-entropy of each mention's gold among all batch entities (in-batch golds + sampled negatives).

    Copies of the gold entity elsewhere in the batch (another mention with the same gold, or a negative that is
    the gold) are masked out, so they are never pushed away."""
    logits = queries @ entities.T / temperature                                  # [b, G(1+n)]
    target = torch.arange(lo, hi, device=queries.device)
    gold_rows = entity_rows[lo:hi].to(queries.device)
    same = entity_rows.to(queries.device).unsqueeze(0) == gold_rows.unsqueeze(1)  # [b, G(1+n)]
    same[torch.arange(hi - lo, device=queries.device), target] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits.float(), target, reduction="sum")


def npair_loss_sum(queries: torch.Tensor, entities: torch.Tensor, lo: int, hi: int, global_n: int,
                   num_negatives: int, l2: float, in_batch: bool = False) -> torch.Tensor:
    """DIM's N-pair loss on raw (not normalised) dot products, summed over local mentions:
    ``log(1 + sum_j exp(q.e-_j - q.e+)) + l2 * (|q|^2 + |e+|^2)``.

    ``j`` runs over the mention's own negatives, or with ``in_batch`` over **every** sampled negative of the global
    batch, as DIM's code computes it: its ``anchor [B,1,D] @ (negative [B,D] - positive [B,1,D])`` broadcasts to
    ``[B,1,B]``, every query against all B negatives of the batch (a negative that is the query's own gold stays
    in the sum, as there: it adds exp(0) = 1)."""
    if num_negatives < 1:
        raise ValueError("the N-pair loss needs --num_negatives >= 1")
    b = hi - lo
    pos = entities[lo:hi]
    if in_batch:
        neg = entities[global_n:]                                                # [G*n,D]
        s_neg = queries @ neg.T                                                  # [b,G*n]
    else:
        neg = entities[global_n + lo * num_negatives: global_n + hi * num_negatives].reshape(b, num_negatives, -1)
        s_neg = torch.einsum("bd,bnd->bn", queries, neg)                         # [b,n]
    s_pos = (queries * pos).sum(-1, keepdim=True)                                # [b,1]
    # log(1 + sum exp(x)) = logsumexp([0, x...]): no overflow for large raw dot products
    logits = torch.cat([torch.zeros_like(s_pos), s_neg - s_pos], 1)
    reg = l2 * (queries.pow(2).sum(-1) + pos.pow(2).sum(-1))
    return (torch.logsumexp(logits, 1) + reg).sum()


def mimic_loss_sum(overall: torch.Tensor, units, lo: int, hi: int,
                   entity_rows: torch.Tensor | None = None) -> torch.Tensor:
    """MIMIC's official loss on pairwise scores, summed over local mentions: the in-batch cross-entropy of the
    overall score plus that of each unit's score, all weighted 1 (``lightning_mimic.py``: ``overall_loss +
    text_loss + image_loss + image_text_loss``), on raw scores (no temperature).

    ``overall`` and each of ``units`` (a sequence, or a dict of the units switched on) are ``[b, G]``: this
    process's mentions ``[lo, hi)`` of the global batch against the G gold entities of the global batch, so mention
    ``i``'s gold is column ``lo + i``. As in the official code, another copy of the gold in the batch (a mention with
    the same gold) counts as a negative; pass ``entity_rows`` ([G], the batch entities' KB rows) to mask copies out
    as :func:`infonce_loss_sum` does."""
    scores = [overall, *(units.values() if isinstance(units, dict) else units)]
    target = torch.arange(lo, hi, device=overall.device)
    same = None
    if entity_rows is not None:
        rows = entity_rows.to(overall.device)
        same = rows.unsqueeze(0) == rows[lo:hi].unsqueeze(1)                       # [b, G]
        same[torch.arange(hi - lo, device=overall.device), target] = False
    total = overall.new_zeros((), dtype=torch.float32)
    for s in scores:
        logits = s.float() if same is None else s.float().masked_fill(same, float("-inf"))
        total = total + F.cross_entropy(logits, target, reduction="sum")
    return total


NORMALISED_LOSSES = ("triplet", "infonce")   # losses on cosines; npair works on raw dot products


def batch_loss_sum(kind: str, queries: torch.Tensor, entities: torch.Tensor, entity_rows: torch.Tensor, lo: int,
                   hi: int, global_n: int, num_negatives: int, margin: float, temperature: float,
                   l2: float = 0.02, npair_in_batch: bool = False) -> torch.Tensor:
    if kind == "triplet":
        return triplet_loss_sum(queries, entities, lo, hi, global_n, num_negatives, margin)
    if kind == "infonce":
        return infonce_loss_sum(queries, entities, entity_rows, lo, hi, global_n, temperature)
    if kind == "npair":
        return npair_loss_sum(queries, entities, lo, hi, global_n, num_negatives, l2, npair_in_batch)
    raise ValueError(f"unknown loss {kind!r}; expected triplet, infonce or npair")
