"""Scoring encoded mentions against an encoded KB, one abstraction for both kinds of model, feeding the evaluation's
one counting code (:func:`~nel_model.evaluation.metrics.score_counts`,
:func:`~nel_model.evaluation.metrics.list_counts`, :func:`~nel_model.evaluation.metrics.topk_by_row`).

A :class:`KBScorer` scores a block of mentions against a block of entities (:meth:`KBScorer.block`) and each mention
against its own entities (:meth:`KBScorer.pairs`); the whole-KB counts, the candidate-list counts and the top-K
lists are built on those two, in chunks:

* :class:`DotScorer` (a bi-encoder, DIM): a block is a matrix product of the two sides' embeddings; its whole-KB
  counts and candidate counts are :func:`~nel_model.evaluation.metrics.full_kb_counts` and
  :func:`~nel_model.evaluation.metrics.candidate_counts` (exact low-precision scoring, one product-sum per listed
  entity), which end in the same counting functions.
* :class:`PairScorer` (a pairwise model, MIMIC): a block is ``model.pair_scores`` of the mentions' and the entities'
  encoded sides (:class:`~nel_model.mimic.MentionSide`, :class:`~nel_model.mimic.EntitySide`: no KB embedding
  matrix), in float32. The mention and entity chunks are the run's (``eval_batch_size``, ``entity_chunk``), cut down
  so that one call stays within ``pair_memory_mb`` (:func:`nel_model.mimic.pair_bytes`, plus the ``[b, E]`` row of
  scores the counts read). Mentions are scored in order of their token count and the KB is held in order of its
  entities' (the model cuts the token positions no row of a block uses, so similar lengths side by side do less
  work); the counts and the scores come back in the mentions' and the KB's order.

Chunking changes no rank: every score of a mention is computed from that mention and that entity alone
(``tests/test_pairwise_eval.py`` compares chunked and unchunked whole-KB evaluations).
"""

from __future__ import annotations

from typing import Any

import torch

from nel_model.encoding import Encoded, EvalSettings, is_pairwise, take_rows
from nel_model.evaluation.metrics import (RankCounts, candidate_counts, full_kb_counts, list_counts, score_counts,
                                          topk_by_row)
from nel_model.mimic import MIMIC, EntitySide, MentionSide, pair_bytes

MiB = 1 << 20


class KBScorer:
    """Encoded mentions against an encoded KB (module docstring). Subclasses give :meth:`block` and :meth:`pairs`."""

    pairwise = False

    def __init__(self, kb: Encoded, settings: EvalSettings):
        self.kb, self.settings = kb, settings
        self.num_entities = len(kb)
        self.mention_chunk = max(1, int(settings.mention_chunk))
        self.entity_chunk = max(1, int(settings.entity_chunk))
        self.list_chunk = self.mention_chunk

    # -- what a kind of model gives -------------------------------------------------------------
    def block(self, m: Encoded, start: int, end: int) -> torch.Tensor:
        """``[b, end - start]`` float32 scores of the mentions ``m`` against KB rows ``start:end``."""
        raise NotImplementedError

    def pairs(self, m: Encoded, rows: torch.Tensor) -> torch.Tensor:
        """``[b, k]`` float32 scores of each mention of ``m`` against its own KB rows ``rows`` [b, k]."""
        raise NotImplementedError

    def order(self, m: Encoded) -> torch.Tensor | None:
        """The order to score the mentions in (``None``: as given)."""
        return None

    # -- built on them --------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, m: Encoded) -> torch.Tensor:
        """``[b, E]`` float32 scores of the mentions ``m`` against the whole KB, entity chunk by entity chunk."""
        E, step = self.num_entities, self.entity_chunk
        if step >= E:
            return self.block(m, 0, E)
        out = torch.empty(len(m), E, dtype=torch.float32, device=self._device())
        for s in range(0, E, step):
            out[:, s:min(E, s + step)] = self.block(m, s, min(E, s + step))
        return out

    def _chunks(self, m: Encoded, step: int):
        """``(rows, mentions)`` of each chunk of ``m``, in :meth:`order`."""
        order = self.order(m)
        for s in range(0, len(m), step):
            rows = order[s:s + step] if order is not None else torch.arange(s, min(len(m), s + step))
            yield rows, take_rows(m, rows.to(self._device()) if order is not None else slice(s, s + step))

    @staticmethod
    def _in_order(parts: list[tuple[torch.Tensor, Any]], n: int, cat) -> Any:
        """Chunk results put back in the mentions' order."""
        if not parts:
            return cat([])
        rows = torch.cat([r for r, _ in parts])
        whole = cat([x for _, x in parts])
        if torch.equal(rows, torch.arange(n)):
            return whole
        back = torch.empty_like(rows)
        back[rows] = torch.arange(n)
        return whole.map(lambda t: t[back.to(t.device)]) if isinstance(whole, RankCounts) else tuple(
            t[back.to(t.device)] for t in whole)

    @torch.no_grad()
    def full_kb_counts(self, m: Encoded, gold: torch.Tensor, top_k: int = 0) -> RankCounts:
        """:class:`RankCounts` of each mention's gold among all KB entities (with ``top_k``: its best entities from
        the same scores)."""
        parts = [(rows, score_counts(self.scores(chunk), gold[rows.to(gold.device)], top_k))
                 for rows, chunk in self._chunks(m, self.mention_chunk)]
        out = self._in_order(parts, len(m), RankCounts.cat)
        return out if parts else out.to(gold.device)

    @torch.no_grad()
    def candidate_counts(self, m: Encoded, candidates: torch.Tensor, gold: torch.Tensor, rule: str) -> RankCounts:
        """:class:`RankCounts` of the gold against each mention's candidate list ([N, C] KB rows, ``-1`` padding):
        the gold and the listed entities scored by :meth:`pairs` (the rules of
        :func:`~nel_model.evaluation.metrics.candidate_counts`)."""
        dev = gold.device
        cands, gold = candidates.to(dev).long(), gold.long()
        rows = torch.cat([gold[:, None], cands.clamp(min=0)], 1)
        parts = [(r, (self.pairs(chunk, rows[r.to(dev)]),)) for r, chunk in self._chunks(m, self.list_chunk)]
        (scores,) = self._in_order(parts, len(m), lambda xs: (torch.cat([x[0] for x in xs]) if xs
                                                              else torch.zeros(0, rows.shape[1], device=dev),))
        return list_counts(scores.to(dev), cands, gold, rule)

    @torch.no_grad()
    def top(self, m: Encoded, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each mention's ``k`` best KB entities: ``(scores [N, k] float32, rows [N, k])`` on the CPU, best first,
        equal scores in KB row order, a NaN last (:func:`~nel_model.evaluation.metrics.topk_by_row`)."""
        k = min(k, self.num_entities)
        parts = [(rows, tuple(t.cpu() for t in topk_by_row(self.scores(chunk), k)))
                 for rows, chunk in self._chunks(m, self.mention_chunk)]
        return self._in_order(parts, len(m), lambda xs: (
            torch.cat([x[0] for x in xs]) if xs else torch.zeros(0, k),
            torch.cat([x[1] for x in xs]) if xs else torch.zeros(0, k, dtype=torch.long)))

    def _device(self) -> torch.device:
        raise NotImplementedError


class DotScorer(KBScorer):
    """A bi-encoder's KB: embeddings ``[E, D]``; a mention's score is the dot product of the two embeddings."""

    def _device(self) -> torch.device:
        return self.kb.device

    def block(self, m: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return m.float() @ self.kb[start:end].float().T

    def pairs(self, m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (self.kb[rows].float() * m.float()[:, None, :]).sum(-1)

    def scores(self, m: torch.Tensor) -> torch.Tensor:
        return m.float() @ self.kb.float().T

    def full_kb_counts(self, m: torch.Tensor, gold: torch.Tensor, top_k: int = 0) -> RankCounts:
        return full_kb_counts(m, self.kb, gold, self.mention_chunk, self.settings.score_dtype, top_k)

    def candidate_counts(self, m: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor,
                         rule: str) -> RankCounts:
        c = self.mention_chunk
        return RankCounts.cat([candidate_counts(m[s:s + c], self.kb, candidates[s:s + c], gold[s:s + c], rule)
                               for s in range(0, len(m), c)]).to(gold.device)


class PairScorer(KBScorer):
    """A pairwise model's KB: its :class:`~nel_model.mimic.EntitySide`, scored by ``MIMIC.pair_scores`` in chunks
    whose memory stays within ``settings.pair_memory_mb`` (module docstring)."""

    pairwise = True

    def __init__(self, model: MIMIC, kb: EntitySide, settings: EvalSettings):
        # the KB in order of its entities' token counts: self.kb = kb.rows(self.perm), KB row r at self.pos[r]
        self.perm = self.pos = None
        if kb.token_weight is not None and len(kb):
            perm = torch.argsort((kb.token_weight > 0).sum(1).cpu(), stable=True)
            if not torch.equal(perm, torch.arange(len(kb))):
                self.perm = perm.to(kb.token_weight.device)
                self.pos = torch.empty_like(self.perm)
                self.pos[self.perm] = torch.arange(len(kb), device=self.perm.device)
                kb = kb.rows(self.perm)
        super().__init__(kb, settings)
        self.model = getattr(model, "module", model)
        cfg = self.model.cfg
        budget = max(1, int(settings.pair_memory_mb)) * MiB
        self.text_len = cfg.text_len if cfg.use_text_unit else 0
        self.entity_len = int(kb.queries.shape[1]) if kb.queries is not None else 0
        self.text_dim = int(kb.text.shape[1]) if kb.text is not None else 0

        def cost(b: int, e: int, candidates: bool = False) -> int:
            return pair_bytes(b, e, self.text_len, self.entity_len, cfg.hidden, cfg.units, candidates=candidates,
                              text_dim=self.text_dim)

        E = max(1, self.num_entities)
        row = 3 * 4 * E       # the [b, E] float32 scores, their comparisons and top-K copy, per mention
        self.mention_chunk = max(1, min(self.mention_chunk, budget // (cost(1, 1) + row)))
        self.entity_chunk = max(1, min(self.entity_chunk, E,
                                       (budget - row * self.mention_chunk) // cost(self.mention_chunk, 1)))
        self.list_cost = lambda k: cost(1, k, candidates=True)
        self.budget = budget

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def block(self, m: MentionSide, start: int, end: int) -> torch.Tensor:
        return self.model.pair_scores(m, self.kb.rows(slice(start, end))).float()

    def pairs(self, m: MentionSide, rows: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            rows = self.pos[rows.to(self.pos.device)]
        step = max(1, min(self.mention_chunk, self.budget // self.list_cost(rows.shape[1])))
        out = [self.model.pair_scores(m.rows(slice(s, s + step)), self.kb, rows[s:s + step]).float()
               for s in range(0, len(m), step)]
        return torch.cat(out) if out else torch.zeros(0, rows.shape[1], device=self._device())

    def order(self, m: MentionSide) -> torch.Tensor | None:
        if m.key_keep is None:
            return None
        return torch.argsort(m.key_keep.sum(1).cpu(), stable=True)

    def scores(self, m: MentionSide) -> torch.Tensor:
        self.model.eval()
        out = super().scores(m)
        return out if self.pos is None else out[:, self.pos]

    def describe(self) -> dict[str, Any]:
        """The chunks and the bound one call was held to (``results.json``'s ``chunks``)."""
        return {"mention": self.mention_chunk, "entity": self.entity_chunk,
                "pair_memory_mb": self.budget // MiB}


def kb_scorer(model: torch.nn.Module, kb: Encoded, settings: EvalSettings) -> KBScorer:
    """The scorer of a model's encoded KB (:func:`nel_model.encoding.encode_entities`)."""
    if is_pairwise(model):
        return PairScorer(model, kb, settings)
    return DotScorer(kb, settings)
