"""Evaluation: full-KB ranking (every KB entity) and candidate-list ranking, and re-evaluating a saved run.

``dim-mel evaluate --run RUN_DIR [--split test] [--checkpoint best] [--predictions]`` opens a one-stage run
(:func:`open_run`: a :class:`~nel_model.loaded_run.LoadedRun`), recomputes the metrics and prints a table
(percentages); ``--predictions`` also rewrites the per-mention ``RUN/predictions/<split>.jsonl`` (see
:func:`write_predictions`). The KB's entity embeddings are the run's saved ones when they match its checkpoint and
feature cache, else encoded once in chunks; mentions are scored by chunked matrix products on the device (see
``nel_model.evaluation.metrics`` for the tie rules, the candidate rules and exact low-precision scoring). A pairwise
run (MIMIC) is scored through the same counting code by its model's ``pair_scores`` against its encoded KB side, in
chunks bounded by ``--pair-memory-mb`` (:mod:`nel_model.evaluation.scoring`). ``--tie-rule`` and
``--candidate-rule`` default to the run's own settings. A two-stage run (``dim-mel rerank``, ``rerank-llm``) is
evaluated by ``nel_model.rerank.evaluate`` with the same flags, counts and table; ``dim-mel evaluate`` picks the one a
run needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.entry import run_main
from data_process.core.records import SPLITS
from data_process.core.settings import ToolkitParser, add_bool
from data_process.core.durable_io import atomic_write_json, atomic_write_text
from nel_model import distributed as D
from nel_model.config import eval_settings_of
from nel_model.data import FeatureSource, MELData
from nel_model.encoding import ENCODE_DTYPE, Encoded, EvalSettings, encode_entities, encode_mentions
from nel_model.evaluation.scoring import DotScorer, kb_scorer
from nel_model.loaded_run import LoadedRun
from nel_model.evaluation.metrics import (CANDIDATE_RULES, TIE_RULES, RankCounts, candidate_recall, metrics_from_counts,
                                          metrics_from_ranks)
from nel_model.runs import PREDICTIONS_DIR, PROTOCOLS, RunError, two_stage_of


PREDICTION_TOP_K = 10                         # entities listed per mention in RUN/predictions/<split>.jsonl


def settings_from_config(conf: Any, device: torch.device, **override: Any) -> EvalSettings:
    """The evaluation settings of a run from its configuration (a :class:`nel_model.config.TaskConfig` in training,
    its ``config.json`` after it, of either format): the one place both read them, so ``dim-mel evaluate`` measures
    as the end of training did. ``override``: the command line's ``eval_dtype``, ``tie_rule`` or ``candidate_rule``
    where given (None = the run's)."""
    conf = {**eval_settings_of(conf), **{k: v for k, v in override.items() if v is not None}}
    return EvalSettings(mention_chunk=conf["eval_batch_size"], entity_chunk=conf["entity_chunk"],
                        score_dtype=score_dtype_for(conf["eval_dtype"], device), tie_rule=conf["tie_rule"],
                        candidate_rule=conf["candidate_rule"],
                        pair_memory_mb=conf.get("pair_memory_mb", EvalSettings.pair_memory_mb))


def open_run(run: str | Path, device: str | torch.device = "auto", checkpoint: str = "best",
             features: str | Path | None = None, dataset: str | Path | None = None, **override: Any) -> LoadedRun:
    """The one way a command opens a run folder: a :class:`~nel_model.loaded_run.LoadedRun` measured with the
    run's own evaluation settings (:func:`settings_from_config`; ``override``: the command line's where given);
    ``features`` / ``dataset`` override the folders config.json records."""
    return LoadedRun.open(run, device, checkpoint, features, dataset,
                          settings=lambda conf, dev: settings_from_config(conf, dev, **override))


def score_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = float32 (exact and cheap at MEL sizes); float16/bfloat16 give the same ranks, faster on GPUs."""
    if name == "auto":
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@torch.no_grad()
def split_counts(model: torch.nn.Module, data: MELData, source: FeatureSource, rows: np.ndarray,
                 dist: D.DistInfo, settings: EvalSettings, entity_emb: Encoded | None = None,
                 top_k: int = 0, protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, RankCounts]:
    """Rank counts of the mentions ``rows`` (sharded over processes, gathered in order) for each protocol of
    ``protocols`` (the candidate lists only where the dataset has them); with ``top_k``, the full-KB counts also
    carry each mention's best entities, from the same scoring pass. ``entity_emb``: the encoded KB side (a
    bi-encoder's embeddings, a pairwise model's :class:`~nel_model.mimic.EntitySide`), else encoded here."""
    device = dist.device
    if entity_emb is None:
        entity_emb = encode_entities(model, source, device, settings)
    scorer = kb_scorer(model, entity_emb, settings)
    local = rows[D.shard(len(rows), dist)]
    q = encode_mentions(model, source, local, device, settings)
    gold = torch.from_numpy(data.gold[local]).to(device)
    counts = {}
    if "full_kb" in protocols:
        counts["full_kb"] = scorer.full_kb_counts(q, gold, top_k)
    if data.candidates is not None and "candidates" in protocols:
        counts["candidates"] = scorer.candidate_counts(q, torch.from_numpy(data.candidates[local]), gold,
                                                       settings.candidate_rule)
    return {proto: _gather_counts(cnt, dist) for proto, cnt in counts.items()}


def _gather_counts(counts: RankCounts, dist: D.DistInfo) -> RankCounts:
    return counts.map(lambda t: D.gather_rows(t.cpu(), dist))


def evaluate_counts(model: torch.nn.Module, data: MELData, source: FeatureSource, splits: list[str],
                    dist: D.DistInfo, settings: EvalSettings, top_k: int = 0,
                    entity_emb: Encoded | None = None,
                    protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, dict[str, RankCounts]]:
    """``{protocol: {split: RankCounts}}`` (with ``top_k``: the full-KB counts carry each mention's best entities,
    scored in the same pass); the encoded KB side (``entity_emb``: embeddings, or a pairwise model's
    ``EntitySide``; else computed here) serves all splits; ``protocols``: those counted."""
    emb = entity_emb if entity_emb is not None else encode_entities(model, source, dist.device, settings)
    out: dict[str, dict[str, RankCounts]] = {}
    for split in splits:
        for proto, cnt in split_counts(model, data, source, data.splits[split], dist, settings, emb, top_k,
                                       protocols).items():
            out.setdefault(proto, {})[split] = cnt
    return out


def metrics_of(counts: dict[str, dict[str, RankCounts]], rule: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol: {split: metrics}}`` under a tie rule."""
    return {proto: {split: metrics_from_counts(c, rule) for split, c in per_split.items()}
            for proto, per_split in counts.items()}


def evaluate_splits(model: torch.nn.Module, data: MELData, source: FeatureSource, splits: list[str],
                    dist: D.DistInfo, settings: EvalSettings) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol: {split: metrics}}`` under ``settings.tie_rule``."""
    return metrics_of(evaluate_counts(model, data, source, splits, dist, settings), settings.tie_rule)


def results_block(counts: dict[str, dict[str, RankCounts]], data: MELData, settings: EvalSettings) -> dict[str, Any]:
    """What ``results.json`` records of an evaluation: the metrics under the run's tie rule (``protocols``), under
    every tie rule (``tie_rules``), how they were measured, and the candidate lists' recall."""
    out: dict[str, Any] = {
        "tie_rule": settings.tie_rule, "candidate_rule": settings.candidate_rule if data.candidates is not None
        else None, "encode_dtype": ENCODE_DTYPE, "score_dtype": str(settings.score_dtype).replace("torch.", ""),
        "exact_float32_ranks": True, "kb_entities": data.num_entities,
        "chunks": {"mention": settings.mention_chunk, "entity": settings.entity_chunk},
        "protocols": metrics_of(counts, settings.tie_rule),
        "tie_rules": {rule: metrics_of(counts, rule) for rule in TIE_RULES},
    }
    if data.candidates is not None:
        splits = sorted({s for per in counts.values() for s in per}, key=SPLITS.index)
        out["candidate_recall"] = {s: candidate_recall(torch.from_numpy(data.candidates[data.splits[s]]),
                                                       torch.from_numpy(data.gold[data.splits[s]])) for s in splits}
    return out


FAISS_KINDS = {"ivfpq": "ivfpq", "hnsw": "hnsw", "ivf": "ivfpq"}    # --faiss: "ivf", the older name of ivfpq


def evaluate_with_index(r: LoadedRun, splits: list[str], kind: str, k: int) -> dict[str, dict[str, float]]:
    """Metrics when an approximate index of ``kind`` (``nel_model.index``: ivfpq or hnsw with their defaults, a
    candidate pool re-scored exactly) over the run's KB embeddings retrieves the top ``k`` (a gold entity outside
    them is a miss), plus ``recall@20_vs_exact``: the overlap of the index's top 20 with exact search."""
    from nel_model.index import matrix_index

    emb = r.entity_emb.cpu()
    k = min(k, len(emb))                # a KB smaller than k: every entity is retrieved
    out = {}
    with matrix_index(emb, FAISS_KINDS[kind]) as index:
        for split in splits:
            rows = r.data.splits[split]
            q = r.mention_embeddings(rows).cpu().numpy()
            _, top = index.search_rows(q, k)
            ranks = [int(np.flatnonzero(t == g)[0]) + 1 if (t == g).any() else 0 for t, g in zip(top, r.data.gold[rows])]
            m = metrics_from_ranks(torch.tensor(ranks, dtype=torch.long))
            m["recall@20_vs_exact"] = index.measure_recall(q, ks=(min(20, k),))[f"recall@{min(20, k)}"]
            out[split] = m
    return out


# ---------------------------------------------------------------------------------------------
# Per-mention predictions (docs/CONTRACTS.md, "Run folders": RUN/predictions/<split>.jsonl)


@torch.no_grad()
def top_entities(queries: torch.Tensor, entities: torch.Tensor, k: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` best entities by float32 score: ``(scores [N,k], rows [N,k])`` on the CPU, best first;
    equal scores are ordered by KB row, a NaN score ranks last (a bi-encoder's :meth:`KBScorer.top
    <nel_model.evaluation.scoring.KBScorer.top>`, ``chunk`` queries at a time)."""
    return DotScorer(entities, EvalSettings(mention_chunk=chunk)).top(queries, k)


def _rank_fields(counts: RankCounts) -> list[dict[str, Any]]:
    """Per mention: the ranks under each tie rule and the counts they come from (JSON-ready)."""
    cols = {"rank": counts.ranks("pessimistic"), "rank_strict": counts.ranks("strict"),
            "rank_mean": counts.ranks("mean"), "higher": counts.higher, "equal": counts.equal,
            "unordered": counts.unordered, "nan_gold": counts.nan_gold}
    lists = {key: t.cpu().tolist() for key, t in cols.items()}
    return [dict(zip(lists, vals)) for vals in zip(*lists.values())]


def _json_score(x: float) -> float | None:
    return float(f"{x:.9g}") if np.isfinite(x) else None     # 9 significant digits round-trip a float32


def write_predictions(run_dir: str | Path, model: torch.nn.Module, data: MELData, source: FeatureSource,
                      counts: dict[str, dict[str, RankCounts]], settings: EvalSettings, device: torch.device,
                      entity_emb: Encoded | None = None, checkpoint: dict[str, Any] | None = None,
                      top_k: int = PREDICTION_TOP_K, folder_name: str = PREDICTIONS_DIR) -> list[Path]:
    """Write ``RUN/predictions/<split>.jsonl`` (one line per mention, in feature-cache order) and
    ``<split>.meta.json`` for every split of ``counts["full_kb"]``, each file atomically. Ranks come from
    ``counts`` (as returned by :func:`evaluate_counts`); the top-``k`` lists too when the counts carry them (scored
    in the same pass), else they are computed here in float32 (from ``entity_emb``, or entity embeddings encoded
    here). ``folder_name`` ``retrieval``: the retrieved lists of ``dim-mel retrieve``."""
    folder = Path(run_dir) / folder_name
    written = []
    for split, full in counts["full_kb"].items():
        rows = data.splits[split]
        if full.top_rows is not None and full.top_rows.shape[1] >= min(top_k, data.num_entities):
            scores, top = full.top_scores[:, :top_k], full.top_rows[:, :top_k]
        else:
            if entity_emb is None:
                entity_emb = encode_entities(model, source, device, settings)
            q = encode_mentions(model, source, rows, device, settings)
            scores, top = kb_scorer(model, entity_emb, settings).top(q, top_k)
        lines = []
        cand = counts["candidates"][split] if "candidates" in counts else None
        cand_fields = _rank_fields(cand) if cand is not None else None
        for i, (row, ranks) in enumerate(zip(rows.tolist(), _rank_fields(full))):
            rec = {"mention_id": data.mention_ids[row], "gold": data.entity_ids[int(data.gold[row])], **ranks,
                   "top": [[data.entity_ids[r], _json_score(v)] for r, v in zip(top[i].tolist(), scores[i].tolist())]}
            if cand_fields is not None:
                rec["candidates"] = cand_fields[i]
            lines.append(json.dumps(rec, ensure_ascii=False))
        path = folder / f"{split}.jsonl"
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        atomic_write_json(folder / f"{split}.meta.json", {
            "split": split, "n": len(lines), "checkpoint": checkpoint or {}, "kb_entities": data.num_entities,
            "protocols": sorted(p for p in counts if split in counts[p]),
            "rank_score_dtype": str(settings.score_dtype).replace("torch.", ""), "exact_float32_ranks": True,
            "candidate_rule": settings.candidate_rule if "candidates" in counts else None,
            "top_k": int(top.shape[1]), "top_score_dtype": "float32", "top_ties": "KB row order",
            "encode_dtype": ENCODE_DTYPE})
        written.append(path)
    return written


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    cols = ["mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20"]
    lines = [f"{'protocol':<12}{'split':<7}" + "".join(f"{c:>9}" for c in cols) + f"{'n':>8}"]
    for proto, per_split in results.items():
        for split, m in per_split.items():
            line = f"{proto:<12}{split:<7}" + "".join(f"{100 * m[c]:9.2f}" for c in cols) + f"{m['n']:>8}"
            if "recall@20_vs_exact" in m:
                line += f"   recall@20 vs exact search {m['recall@20_vs_exact']:.3f}"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m nel_model.evaluation.evaluate``: print the metrics of a saved one-stage run
    (:func:`evaluate_run`; ``dim-mel evaluate`` also takes two-stage runs, ``nel_model.evaluate``)."""
    evaluate_run(argv)
    return 0


def build_parser() -> ToolkitParser:
    p = ToolkitParser(prog="dim-mel evaluate", description="Re-evaluate a saved run (one-stage, or two-stage: a "
                      "retriever's lists re-ordered by a re-ranker).")
    p.add_argument("--run", required=True, help="run folder written by train, rerank or rerank-llm")
    p.add_argument("--split", choices=["dev", "test", "all"], default="test")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="the run's checkpoint (a two-stage run: its re-ranker's; the retriever's is recorded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--features", default=None, help="override the feature folder recorded in config.json")
    p.add_argument("--dataset", default=None, help="override the dataset folder recorded in config.json")
    p.add_argument("--eval_dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    p.add_argument("--tie_rule", choices=TIE_RULES, default=None, help="default: the run's --tie_rule")
    p.add_argument("--candidate_rule", choices=CANDIDATE_RULES, default=None,
                   help="default: the run's --candidate_rule")
    p.add_argument("--pair_memory_mb", type=int, default=None,
                   help="a pairwise run (MIMIC): bound on the memory of one scoring call (default: the run's)")
    add_bool(p, "json", False, "print JSON instead of a table")
    p.add_argument("--faiss", choices=list(FAISS_KINDS), default=None,
                   help="also rank with an approximate faiss index (CPU users, large KBs) and report its recall")
    p.add_argument("--faiss_k", type=int, default=100, help="entities retrieved per mention by the faiss index")
    add_bool(p, "predictions", False,
             "also (re)write RUN/predictions/<split>.jsonl for the evaluated split(s) (docs/CONTRACTS.md)")
    return p


def splits_of(a) -> list[str]:
    return ["dev", "test"] if a.split == "all" else [a.split]


def print_results(results: dict[str, dict[str, dict[str, float]]], data: MELData, settings: EvalSettings,
                  as_json: bool, heading: str | None = None) -> None:
    """What ``dim-mel evaluate`` prints: JSON, or how it was measured and the table (``heading`` above both)."""
    if as_json:
        print(json.dumps(results, indent=2))
        return
    if heading:
        print(heading)
    print(f"KB {data.num_entities} entities; tie rule {settings.tie_rule}; candidate rule "
          f"{settings.candidate_rule if data.candidates is not None else '-'}; encoded {ENCODE_DTYPE}; scores "
          f"{str(settings.score_dtype).replace('torch.', '')} (exact float32 ranks)")
    print(format_table(results))


def evaluate_run(argv: list[str] | None = None) -> dict[str, Any]:
    """This module's command: :func:`evaluate` of a one-stage run (a two-stage one is an error naming the
    command that takes it)."""
    a = build_parser().parse_args(argv)
    if two_stage_of(a.run) is not None:
        raise RunError(f"{a.run}: a two-stage run (a retriever's lists and a re-ranker); evaluate it with "
                       "dim-mel evaluate (python -m nel_model.evaluate)")
    return evaluate(a)


def evaluate(a) -> dict[str, Any]:
    """Evaluate the one-stage run ``a.run`` under the flags of :func:`build_parser`, print and return
    ``{protocol: {split: metrics}}``."""
    r = open_run(a.run, a.device, a.checkpoint, a.features, a.dataset, eval_dtype=a.eval_dtype, tie_rule=a.tie_rule,
                 candidate_rule=a.candidate_rule, pair_memory_mb=a.pair_memory_mb)
    if r.pairwise and a.eval_dtype not in (None, "auto", "float32"):
        raise RunError(f"{a.run}: --eval-dtype {a.eval_dtype}: a pairwise run (MIMIC) scores in float32")
    data, settings = r.data, r.settings
    splits = splits_of(a)
    if a.faiss and r.pairwise:
        raise RunError(f"{a.run}: --faiss ranks a bi-encoder's KB embeddings; a pairwise run (MIMIC) has none")
    counts = evaluate_counts(r.model, data, r.source, splits, D.DistInfo(device=r.device), settings,
                             top_k=PREDICTION_TOP_K if a.predictions else 0, entity_emb=r.kb)
    results = results_block(counts, data, settings)["protocols"]
    if a.predictions:
        for path in write_predictions(r.run, r.model, data, r.source, counts, settings, r.device, r.kb,
                                      checkpoint={"name": a.checkpoint, "epoch": r.epoch}):
            print(f"wrote {path}", file=sys.stderr)
    if a.faiss:
        results[f"faiss_{FAISS_KINDS[a.faiss]}"] = evaluate_with_index(r, splits, a.faiss, a.faiss_k)
    print_results(results, data, settings, a.json)
    return results


if __name__ == "__main__":
    run_main(main)
