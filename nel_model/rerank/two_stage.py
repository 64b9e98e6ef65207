"""Two-stage linking: a retriever run's top-K lists (``dim-mel retrieve``) re-ordered by a re-ranker, measured
like any run.

The final ranking of a mention puts its K retrieved entities first, in the re-ranker's order, and every other KB
entity after them in the retriever's order. :func:`final_scores` writes that ranking as one score matrix (the
retriever's cosine, in [-1, 1], for the entities outside the list; ``4 + (entries scored below it) / K`` for the
entities in it, so ties of the re-ranker stay ties), and the counts come from the evaluation's own counting
(:func:`nel_model.evaluation.metrics.score_counts`, :func:`~nel_model.evaluation.metrics.list_counts`): the full-KB
and the candidate protocols, three tie rules, NaN handling, exactly as for a one-stage run. A re-ranker only ever
supplies ``[N, K]`` scores aligned with the lists (:class:`RetrievedLists`); a NaN score (a malformed answer) is
the lowest.

:func:`write_two_stage_run` writes a run folder that ``dim-mel table``, ``plot`` and ``analyze`` read like any
other: ``results.json`` (with ``two_stage``: the retriever, K and the re-ranker) and ``predictions/<split>.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json
from nel_model.data import FeatureSource, MELData
from nel_model.encoding import encode_mentions
from nel_model.evaluation.evaluate import PREDICTION_TOP_K, EvalSettings, open_run, results_block, write_predictions
from nel_model.evaluation.metrics import RankCounts, list_counts, score_counts
from nel_model.runs import RESULTS_FILE, RETRIEVAL_DIR, RunError, load_predictions

LIST_BASE = 4.0        # final scores of listed entities: above every cosine


@dataclass
class RetrievedLists:
    """One split's retrieved lists, aligned with the feature cache: ``rows`` [N] mention rows, ``top`` [N,K]
    entity rows (best first), ``scores`` [N,K] the retriever's float32 scores, ``gold`` [N] entity rows."""

    split: str
    rows: np.ndarray
    top: torch.Tensor
    scores: torch.Tensor
    gold: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.top.shape[1])

    def gold_position(self) -> torch.Tensor:
        """[N] the gold's index in its list, -1 when the list does not hold it."""
        hit = self.top == self.gold[:, None]
        return torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(self.gold, -1))


@dataclass
class Retriever:
    """The first stage: a run folder with its model, its feature cache and its KB embeddings (float32, as the
    run's evaluation encodes them)."""

    run: Path
    config: dict[str, Any]
    model: torch.nn.Module
    data: MELData
    source: FeatureSource
    settings: EvalSettings
    entity_emb: torch.Tensor
    device: torch.device
    checkpoint: str = "best"

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", checkpoint: str = "best", **open_kw: Any) -> "Retriever":
        """``open_kw``: ``features`` / ``dataset`` folders and setting overrides, as for
        :func:`~nel_model.evaluation.evaluate.open_run`."""
        r = open_run(run, device, checkpoint, **open_kw)
        return cls(r.path, r.config, r.model, r.data, r.source, r.settings, r.entity_embeddings(), r.device,
                   checkpoint)

    def lists(self, split: str) -> RetrievedLists:
        """The split's lists of ``RUN/retrieval/<split>.jsonl``, checked against the feature cache."""
        preds = load_predictions(self.run, split, RETRIEVAL_DIR)
        rows = self.data.splits[split]
        ids = [self.data.mention_ids[r] for r in rows]
        if [p.mention_id for p in preds.mentions] != ids:
            raise RunError(f"{preds.path}: its mentions are not the feature cache's {split} mentions "
                           "(the cache changed since retrieval? rerun dim-mel retrieve)")
        row_of = {eid: i for i, eid in enumerate(self.data.entity_ids)}
        k = min((len(p.top) for p in preds.mentions), default=0)
        try:
            top = torch.tensor([[row_of[e] for e, _ in p.top[:k]] for p in preds.mentions], dtype=torch.long)
        except KeyError as exc:
            raise RunError(f"{preds.path}: entity {exc.args[0]!r} is not in the feature cache's KB") from None
        scores = torch.tensor([[float("nan") if s is None else s for _, s in p.top[:k]] for p in preds.mentions],
                              dtype=torch.float32)
        return RetrievedLists(split, rows, top.reshape(len(rows), k), scores.reshape(len(rows), k),
                              torch.from_numpy(self.data.gold[rows]).long(), preds.meta)

    def mention_embeddings(self, rows: np.ndarray) -> torch.Tensor:
        return encode_mentions(self.model, self.source, rows, self.device, self.settings)


def final_scores(retriever_scores: torch.Tensor, top: torch.Tensor, rerank: torch.Tensor) -> torch.Tensor:
    """[c,E] scores of the final ranking (module docstring): the listed entities ``top`` [c,K] above all others,
    ordered by ``rerank`` [c,K] (NaN lowest, ties kept), the rest by ``retriever_scores`` [c,E]."""
    r = rerank.float().nan_to_num(nan=-float("inf"))
    below = (r[:, None, :] < r[:, :, None]).sum(-1)                    # [c,K]: entries of the list below each one
    out = retriever_scores.float().clone()
    out.scatter_(1, top.to(out.device), (LIST_BASE + below.float() / max(1, top.shape[1])).to(out.device))
    return out


@torch.no_grad()
def two_stage_counts(retriever: Retriever, lists: RetrievedLists, rerank: torch.Tensor,
                     top_k: int = PREDICTION_TOP_K) -> dict[str, RankCounts]:
    """``{protocol: RankCounts}`` of the final ranking of ``lists`` re-ordered by ``rerank`` [N,K]; the full-KB
    counts carry each mention's ``top_k`` final entities."""
    if tuple(rerank.shape) != tuple(lists.top.shape):
        raise ValueError(f"re-ranker scores of shape {tuple(rerank.shape)} for lists of shape {tuple(lists.top.shape)}")
    data, dev = retriever.data, retriever.device
    q = retriever.mention_embeddings(lists.rows)
    chunk = retriever.settings.mention_chunk
    full, cand = [], []
    for s in range(0, len(q), chunk):
        scores = final_scores(q[s:s + chunk] @ retriever.entity_emb.T, lists.top[s:s + chunk], rerank[s:s + chunk])
        gold = lists.gold[s:s + chunk].to(dev)
        full.append(score_counts(scores, gold, top_k))
        if data.candidates is not None:
            cands = torch.from_numpy(data.candidates[lists.rows[s:s + chunk]]).to(dev)
            cols = torch.cat([gold[:, None], cands.clamp(min=0)], 1)
            cand.append(list_counts(scores.gather(1, cols), cands, gold, retriever.settings.candidate_rule))
    out = {"full_kb": RankCounts.cat(full).to("cpu")}
    if cand:
        out["candidates"] = RankCounts.cat(cand).to("cpu")
    return out


def write_two_stage_run(out_dir: str | Path, retriever: Retriever, counts: dict[str, dict[str, RankCounts]],
                        top_k: int, reranker: dict[str, Any], label: str, seed: Any = None,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``OUT/results.json`` and ``OUT/predictions/<split>.jsonl`` of a two-stage evaluation (``counts``:
    ``{protocol: {split: RankCounts}}`` from :func:`two_stage_counts`) and return the results."""
    out = Path(out_dir)
    data = retriever.data
    results = {"dataset": data.dataset_name, "label": label, "seed": seed,
               **results_block(counts, data, retriever.settings),
               "two_stage": {"retriever": {"run": str(retriever.run.resolve()),
                                           "label": retriever.config.get("label"),
                                           "checkpoint": retriever.checkpoint},
                             "top_k": top_k, "reranker": reranker},
               **(extra or {})}
    write_two_stage_predictions(out, retriever, counts, reranker)
    atomic_write_json(out / RESULTS_FILE, results)
    return results


def write_two_stage_predictions(out_dir: str | Path, retriever: Retriever, counts: dict[str, dict[str, RankCounts]],
                                reranker: dict[str, Any]) -> list[Path]:
    """``OUT/predictions/<split>.jsonl`` of the final ranking (``counts`` as for :func:`write_two_stage_run`)."""
    return write_predictions(out_dir, None, retriever.data, retriever.source, counts, retriever.settings,
                             retriever.device, checkpoint={"name": "two-stage", "reranker": reranker.get("kind")})
