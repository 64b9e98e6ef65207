"""Evaluate a two-stage run folder again: its retriever's lists re-ordered by its re-ranker, counted by the one
evaluation (``dim-mel evaluate --run RERANK_RUN``; ``nel_model.evaluate`` sends one-stage runs to
:mod:`nel_model.evaluation.evaluate`).

The run folder says how it was made (:func:`nel_model.runs.two_stage_of`): the retriever run and checkpoint, K and
the re-ranker. A feature re-ranker (``dim-mel rerank``) is loaded from its checkpoint and scores the retriever's
lists as its training's final evaluation did (same inputs, same batch size). A pairwise re-ranker (``dim-mel
rerank-pairwise``) is its pairwise run (MIMIC) at ``--checkpoint``, scoring the lists as the run folder's writer
did. An LLM re-ranker (``dim-mel
rerank-llm``) answers from its run's cache alone: no request is made and no file is touched; the same mentions are
evaluated (the run's ``sample``), and a mention whose answer the cache lacks keeps the retriever's order and is
reported. The counts, metrics, table and ``--predictions`` are those of a one-stage run; the printed numbers are
``results.json``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data_process.core.records import SPLITS
from nel_model.evaluation.evaluate import open_run, print_results, results_block, splits_of
from nel_model.evaluation.metrics import RankCounts
from nel_model.loaded_run import LoadedRun
from nel_model.rerank import llm, pairwise
from nel_model.rerank.feature import FeatureReranker
from nel_model.rerank.two_stage import check_retriever, two_stage_counts, write_two_stage_predictions
from nel_model.config import eval_settings_of
from nel_model.runs import CONFIG_FILE, RESULTS_FILE, RunError, load_config, load_results, two_stage_summary

Counts = dict[str, dict[str, RankCounts]]


def _add(counts: Counts, split: str, per_protocol: dict[str, RankCounts]) -> None:
    for proto, c in per_protocol.items():
        counts.setdefault(proto, {})[split] = c


def feature_counts(run: Path, retriever: LoadedRun, splits: list[str], checkpoint: str) -> Counts:
    """The counts of a ``dim-mel rerank`` run at its ``checkpoint`` (its re-ranker's best or last)."""
    reranker = FeatureReranker.load(run, checkpoint)
    reranker.model.to(retriever.device)
    batch = int(eval_settings_of(load_config(run))["eval_batch_size"])
    counts: Counts = {}
    for split in splits:
        _add(counts, split, reranker.counts(retriever, reranker.inputs(retriever, retriever.lists(split)), batch))
    return counts


def llm_counts(run: Path, retriever: LoadedRun, splits: list[str], results: dict[str, Any]
               ) -> tuple[Counts, LoadedRun]:
    """The counts of a ``dim-mel rerank-llm`` run from its cache, and the retriever cut to the run's sample."""
    reranker = llm.load_reranker(run, retriever)
    sample = results.get("sample") or {}
    lists, views = llm.split_lists(retriever, splits, sample.get("limit"), sample.get("seed"))
    counts: Counts = {}
    for split in splits:
        _add(counts, split, two_stage_counts(retriever, lists[split], reranker.score(views[split], cache_only=True)))
    missing = reranker.stats.unanswered
    recorded = (results.get("two_stage") or {}).get("reranker", {}).get("unanswered")
    if missing:
        print(f"warning: {run / llm.CACHE_FILE}: no answer for {missing} of {reranker.stats.mentions} mentions; "
              f"they keep the retriever's order (the run recorded {recorded} unanswered)", file=sys.stderr)
    return counts, llm.sampled_retriever(retriever, lists)


def _splits(a, run: Path, info: dict[str, Any], results: dict[str, Any] | None) -> list[str]:
    wanted = splits_of(a)
    if info["reranker"]["kind"] != "llm":
        return wanted
    done = sorted((results or {}).get("protocols", {}).get("full_kb", {}), key=SPLITS.index)
    lacking = [s for s in wanted if s not in done]
    if lacking:
        raise RunError(f"{run}: the LLM re-ranker answered the {', '.join(done) or 'no'} split(s), not "
                       f"{', '.join(lacking)} (give --split {done[0] if len(done) == 1 else 'all'})")
    return wanted


def evaluate_two_stage(a, info: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the two-stage run ``a.run`` (``info``: its :func:`~nel_model.runs.two_stage_of`) under the flags
    of ``dim-mel evaluate``; print and return ``{protocol: {split: metrics}}``."""
    run, kind = Path(a.run), info["reranker"]["kind"]
    if kind not in ("feature", "llm", pairwise.KIND):
        raise RunError(f"{run / RESULTS_FILE}: re-ranker kind {kind!r} cannot be evaluated again "
                       "(dim-mel evaluate knows feature, llm and pairwise)")
    if a.faiss:
        raise RunError(f"{run}: --faiss ranks a one-stage run's embeddings; a two-stage run ranks its retriever's "
                       "lists: evaluate the retriever run with --faiss")
    if kind == "llm" and a.checkpoint != "best":
        raise RunError(f"{run}: an LLM re-ranker has no checkpoints (--checkpoint {a.checkpoint})")
    results = load_results(run) if (run / RESULTS_FILE).is_file() else None
    retriever_dir = Path(a.retriever or info["retriever"]["run"])
    if not (retriever_dir / CONFIG_FILE).is_file():
        raise RunError(f"{run}: its retriever run {retriever_dir} is not there (moved? give --retriever FOLDER)")
    splits = _splits(a, run, info, results)
    retriever = open_run(retriever_dir, a.device, info["retriever"].get("checkpoint", "best"), a.features, a.dataset,
                         eval_dtype=a.eval_dtype, tie_rule=a.tie_rule, candidate_rule=a.candidate_rule)
    if kind == "feature":
        check_retriever(run, info["retriever"], retriever, moved=a.retriever is not None)
        counts, view = feature_counts(run, retriever, splits, a.checkpoint), retriever
    elif kind == pairwise.KIND:
        scorer_run = pairwise.open_pairwise(info["reranker"]["run"], retriever.device, a.checkpoint)
        counts, view = pairwise.pairwise_counts(scorer_run, retriever, splits, int(info["top_k"])), retriever
    else:
        counts, view = llm_counts(run, retriever, splits, results or {})
    out = results_block(counts, view.data, view.settings)["protocols"]
    if a.predictions:
        for path in write_two_stage_predictions(run, view, counts, info["reranker"]):
            print(f"wrote {path}", file=sys.stderr)
    named = {**info, "retriever": {**info["retriever"], "label": retriever.config.get("label") or retriever.run.name}}
    heading = f"two-stage run {run}: {two_stage_summary(named, (results or {}).get('sample'))}"
    print_results(out, view.data, view.settings, a.json, heading)
    return out
