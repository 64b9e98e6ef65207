"""Two-stage linking: a retriever run's top-K lists (``dim-mel retrieve``) re-ordered by a re-ranker, measured
like any run.

The final ranking of a mention puts its K retrieved entities first, in the re-ranker's order, and every other KB
entity after them in the retriever's order. :func:`final_scores` writes that ranking as one score matrix (the
retriever's cosine, in [-1, 1], for the entities outside the list; ``4 + (entries scored below it) / K`` for the
entities in it, so ties of the re-ranker stay ties), and the counts come from the evaluation's own counting
(:func:`nel_model.evaluation.metrics.score_counts`, :func:`~nel_model.evaluation.metrics.list_counts`): the full-KB
and the candidate protocols, three tie rules, NaN handling, exactly as for a one-stage run. A re-ranker only ever
supplies ``[N, K]`` scores aligned with the lists (:class:`~nel_model.loaded_run.RetrievedLists`, of a
:class:`~nel_model.loaded_run.LoadedRun`); a NaN score (a malformed answer) is the lowest.

:func:`write_two_stage_run` writes a run folder that ``dim-mel table``, ``plot`` and ``analyze`` read like any
other: ``results.json`` (with ``two_stage``: the retriever and its checkpoint's SHA-256, K and the re-ranker) and
``predictions/<split>.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_process.core.durable_io import atomic_write_json
from nel_model.evaluation.evaluate import PREDICTION_TOP_K, results_block, write_predictions
from nel_model.encoding import take_rows
from nel_model.evaluation.metrics import RankCounts, list_counts, score_counts
from nel_model.evaluation.scoring import kb_scorer
from nel_model.loaded_run import LoadedRun, RetrievedLists
from nel_model.runs import RESULTS_FILE, RunError

LIST_BASE = 4.0        # final scores of listed entities: above every cosine


def check_retriever(run_dir: str | Path, info: dict[str, Any], retriever: LoadedRun, moved: bool = False) -> None:
    """A trained re-ranker scores the lists of the retriever it was trained on: ``info`` (the re-ranker run's
    ``two_stage.retriever``) must name ``retriever``: the same checkpoint file (its SHA-256), or for an older run
    that did not record one, the same run folder (not compared when ``moved``: the user named the folder) and
    checkpoint. Else a :class:`RunError` naming both."""
    recorded = info.get("checkpoint_sha256")
    if recorded is not None:
        same = recorded == retriever.checkpoint_sha256
    else:
        same = ((moved or Path(str(info.get("run"))).resolve() == retriever.run.resolve())
                and info.get("checkpoint", "best") == retriever.checkpoint)
    if not same:
        raise RunError(f"{Path(run_dir) / RESULTS_FILE}: the re-ranker was trained on the retriever {info.get('run')} "
                       f"({info.get('checkpoint', 'best')} checkpoint"
                       + (f", sha256 {recorded[:12]}" if recorded else "") + f"), not on {retriever.run} "
                       f"({retriever.checkpoint} checkpoint, sha256 {retriever.checkpoint_sha256[:12]}): give the "
                       "retriever it was trained on, or train the re-ranker on this one")


def final_scores(retriever_scores: torch.Tensor, top: torch.Tensor, rerank: torch.Tensor) -> torch.Tensor:
    """[c,E] scores of the final ranking (module docstring): the listed entities ``top`` [c,K] above all others,
    ordered by ``rerank`` [c,K] (NaN lowest, ties kept), the rest by ``retriever_scores`` [c,E]."""
    r = rerank.float().nan_to_num(nan=-float("inf"))
    below = (r[:, None, :] < r[:, :, None]).sum(-1)                    # [c,K]: entries of the list below each one
    out = retriever_scores.float().clone()
    out.scatter_(1, top.to(out.device), (LIST_BASE + below.float() / max(1, top.shape[1])).to(out.device))
    return out


@torch.no_grad()
def two_stage_counts(retriever: LoadedRun, lists: RetrievedLists, rerank: torch.Tensor,
                     top_k: int = PREDICTION_TOP_K) -> dict[str, RankCounts]:
    """``{protocol: RankCounts}`` of the final ranking of ``lists`` re-ordered by ``rerank`` [N,K]; the full-KB
    counts carry each mention's ``top_k`` final entities."""
    if tuple(rerank.shape) != tuple(lists.top.shape):
        raise ValueError(f"re-ranker scores of shape {tuple(rerank.shape)} for lists of shape {tuple(lists.top.shape)}")
    data, dev = retriever.data, retriever.device
    q = retriever.mention_embeddings(lists.rows)
    scorer = kb_scorer(retriever.model, retriever.kb, retriever.settings)     # embeddings, or a pairwise KB side
    chunk = scorer.mention_chunk
    full, cand = [], []
    for s in range(0, len(q), chunk):
        scores = final_scores(scorer.scores(take_rows(q, slice(s, s + chunk))), lists.top[s:s + chunk],
                              rerank[s:s + chunk])
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


def write_two_stage_run(out_dir: str | Path, retriever: LoadedRun, counts: dict[str, dict[str, RankCounts]],
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
                                           "checkpoint": retriever.checkpoint,
                                           "checkpoint_sha256": retriever.checkpoint_sha256},
                             "top_k": top_k, "reranker": reranker},
               **(extra or {})}
    write_two_stage_predictions(out, retriever, counts, reranker)
    atomic_write_json(out / RESULTS_FILE, results)
    return results


def write_two_stage_predictions(out_dir: str | Path, retriever: LoadedRun, counts: dict[str, dict[str, RankCounts]],
                                reranker: dict[str, Any]) -> list[Path]:
    """``OUT/predictions/<split>.jsonl`` of the final ranking (``counts`` as for :func:`write_two_stage_run`)."""
    return write_predictions(out_dir, None, retriever.data, retriever.source, counts, retriever.settings,
                             retriever.device, checkpoint={"name": "two-stage", "reranker": reranker.get("kind")})
