"""Retrieval as a stage: every mention's K best KB entities, the first stage of a two-stage linker.

    dim-mel retrieve --run RUN [--split all|train|dev|test] [--top-k 20] [--checkpoint best] [--faiss ivfpq|hnsw]

writes ``RUN/retrieval/<split>.jsonl`` (one line per mention, in feature-cache order: the gold's full-KB ranks and
counts, as in ``predictions/``, and ``top``: the K best entities with their float32 scores, best first, equal scores
in KB row order) with ``<split>.meta.json``, and ``RUN/retrieval/report.json`` with the lists' recall@1/5/10/K per
split. Nothing here ranks on its own: the lists come from the run's evaluation pass (``nel_model.evaluation``: the
same encoded embeddings, the same arithmetic, the same top-K as ``predictions/``), exact over the whole KB. The
retriever may be a trained run or an untrained one (``train --epochs 0``: the zero-shot ranking), a bi-encoder or a
pairwise model (MIMIC: every pair scored, in chunks bounded by its run's ``pair_memory_mb``). ``--faiss``: the
lists come from an approximate index over the same embeddings instead (``nel_model.index``, as ``dim-mel index``
builds them: ivfpq or hnsw, a candidate pool re-scored exactly; ``ivf`` is ivfpq's older name; for KBs too large to
rank exactly on a CPU); the gold's ranks stay exact, and the report adds each split's overlap with the exact top K. A re-ranker
(``nel_model.rerank``) trains on the train split's lists and is evaluated on dev and test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json
from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from nel_model import distributed as D
from nel_model.encoding import ENCODE_DTYPE
from nel_model.evaluation.evaluate import FAISS_KINDS, evaluate_counts, open_run, write_predictions
from nel_model.evaluation.metrics import RankCounts
from nel_model.runs import RETRIEVAL_DIR

MAX_TOP_K = 100
RECALL_AT = (1, 5, 10)
REPORT_FILE = "report.json"
SPLIT_CHOICES = {"all": ("train", "dev", "test"), "train": ("train",), "dev": ("dev",), "test": ("test",)}


def list_recall(counts: RankCounts, gold: torch.Tensor, k: int) -> dict[str, float]:
    """Share of mentions whose gold entity is among the first 1, 5, 10 and ``k`` entries of its retrieved list."""
    top = counts.top_rows
    hit = top == gold.reshape(-1, 1).to(top.device)
    n = len(top)
    out = {f"recall@{j}": float(hit[:, :j].any(1).double().mean()) if n else 0.0
           for j in sorted({*RECALL_AT, k}) if j <= k}
    out["n"] = n
    return out


def index_lists(counts: dict[str, RankCounts], emb: torch.Tensor, queries: dict[str, torch.Tensor], top_k: int,
                kind: str) -> dict[str, float]:
    """Replace each split's exact top lists in ``counts`` by those of an approximate index of ``kind`` over ``emb``
    (``nel_model.index``); returns each split's overlap of the index's lists with the exact ones (recall@K vs exact
    search). A list the index leaves short (it found fewer entities) is an error naming the mention: lists hold
    real, distinct entities only."""
    from nel_model.index import matrix_index

    overlap = {}
    with matrix_index(emb.cpu(), FAISS_KINDS[kind]) as index:
        for split, c in counts.items():
            scores, rows = index.search_rows(queries[split].float().cpu().numpy(), top_k)
            short = next(((i, len(x)) for i, x in enumerate(rows) if len(x) < top_k), None)
            if short is not None:
                raise ValueError(f"--faiss {kind}: the index found only {short[1]} of {top_k} entities for {split} "
                                 f"mention {short[0] + 1}; give a smaller --top-k, or exact lists (no --faiss)")
            approx = torch.from_numpy(np.stack(rows)).long() if rows else torch.zeros(0, top_k, dtype=torch.long)
            exact = c.top_rows.cpu()
            overlap[split] = (float((approx[:, :, None] == exact[:, None, :]).any(2).double().mean())
                              if len(exact) else 0.0)
            c.top_rows = approx
            c.top_scores = torch.from_numpy(np.stack(scores)).float() if rows else torch.zeros(0, top_k)
    return overlap


def retrieve(run: str | Path, splits: tuple[str, ...], top_k: int, checkpoint: str = "best",
             device: str = "auto", faiss: str | None = None) -> dict[str, Any]:
    """Write the retrieved lists of ``splits`` into ``RUN/retrieval/`` and return the report."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"--top-k must be in 1..{MAX_TOP_K}, got {top_k}")
    r = open_run(run, device, checkpoint)
    data, settings, dev = r.data, r.settings, r.device
    if top_k > data.num_entities:
        raise ValueError(f"--top-k {top_k} is larger than the KB ({data.num_entities} entities): a list holds each "
                         f"entity once; give --top-k {data.num_entities} or less")
    if faiss and r.pairwise:
        raise ValueError(f"--faiss {faiss}: an index holds a bi-encoder's KB embeddings; {run} is a pairwise run "
                         "(MIMIC), whose lists are exact (no --faiss)")
    emb = r.kb                      # the encoded KB side (a pairwise run: its EntitySide)
    wanted = [s for s in splits if len(data.splits[s])]
    counts = evaluate_counts(r.model, data, r.source, wanted, D.DistInfo(device=dev), settings, top_k=top_k,
                             entity_emb=emb)
    vs_exact = None
    if faiss:
        queries = {s: r.mention_embeddings(data.splits[s]) for s in wanted}
        vs_exact = index_lists(counts["full_kb"], emb, queries, top_k, faiss)
    recall = {s: list_recall(c, torch.from_numpy(data.gold[data.splits[s]]), top_k)
              for s, c in counts["full_kb"].items()}
    retriever = {"run": str(r.run.resolve()), "label": r.config.get("label"), "checkpoint": checkpoint,
                 "epoch": r.epoch, "checkpoint_sha256": r.checkpoint_sha256}
    write_predictions(r.run, r.model, data, r.source, counts, settings, dev, emb, checkpoint=retriever, top_k=top_k,
                      folder_name=RETRIEVAL_DIR)
    report = {"top_k": top_k, "retriever": retriever, "kb_entities": data.num_entities, "encode_dtype": ENCODE_DTYPE,
              "score_dtype": str(settings.score_dtype).replace("torch.", ""), "top_ties": "KB row order",
              "splits": recall, "skipped_empty_splits": [s for s in splits if s not in wanted],
              "lists": "exact" if not faiss else f"faiss {FAISS_KINDS[faiss]}", "overlap_with_exact_top_k": vs_exact}
    atomic_write_json(r.run / RETRIEVAL_DIR / REPORT_FILE, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    k = report["top_k"]
    cols = [c for c in (f"recall@{j}" for j in sorted({*RECALL_AT, k}) if j <= k)]
    lines = [f"retrieved top {k} of {report['kb_entities']} entities ({report['lists']}, scores "
             f"{report['score_dtype']})",
             f"{'split':<7}" + "".join(f"{c:>11}" for c in cols) + f"{'n':>8}"]
    for split, m in report["splits"].items():
        lines.append(f"{split:<7}" + "".join(f"{100 * m[c]:11.2f}" for c in cols) + f"{m['n']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ToolkitParser(prog="dim-mel retrieve", description="Retrieve every mention's K best KB entities with a run "
                      "(the first stage of a two-stage linker): RUN/retrieval/<split>.jsonl and a recall report.")
    p.add_argument("--run", required=True, help="run folder written by dim-mel train (trained or --epochs 0)")
    p.add_argument("--split", choices=list(SPLIT_CHOICES), default="all",
                   help="all = train, dev and test (a re-ranker trains on train)")
    p.add_argument("--top_k", type=int, default=20, help=f"entities per mention (1..{MAX_TOP_K})")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="auto")
    p.add_argument("--faiss", choices=list(FAISS_KINDS), default=None,
                   help="take the lists from an approximate faiss index (large KBs on a CPU); ranks stay exact")
    a = p.parse_args(argv)
    report = retrieve(a.run, SPLIT_CHOICES[a.split], a.top_k, a.checkpoint, a.device, a.faiss)
    print(format_report(report))
    print(f"wrote {Path(a.run) / RETRIEVAL_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
