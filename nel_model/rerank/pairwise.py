r"""A trained pairwise model (MIMIC, ``dim-mel train --model mimic``) as the re-ranker of a two-stage run: it scores
each of a retriever's top-K lists (``dim-mel retrieve``) pair by pair, and the lists are re-ordered by its scores.

::

    dim-mel rerank-pairwise --retriever RUN --pairwise MIMIC_RUN --output-dir OUT [--top-k K] [--split all]

``OUT`` is a two-stage run folder (``rerank.two_stage.write_two_stage_run``: ``results.json`` with ``two_stage``,
``predictions/``), read by ``dim-mel evaluate``, ``table`` and ``analyze`` like any run and usable by
``dim-mel link --run RUN --rerank OUT``. Nothing is trained here: the pairwise run is trained on its own and does not
depend on the retriever (any retriever over the same KB may feed it; no retriever check). The pairwise run reads
its own feature cache (its mentions and entities matched to the retriever's by id; a listed entity missing from
its KB scores NaN, the lowest); its scores are :meth:`nel_model.mimic.MIMIC.pair_scores` of each mention against its
own K entities, in chunks bounded by its run's ``pair_memory_mb`` (:class:`~nel_model.evaluation.scoring.PairScorer`).

For new mentions (the linker) the mention's views are encoded with the pairwise run's encoders, or taken from the
retriever's (already encoded) when both feature caches were made with the same encoders and settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.entry import run_main
from data_process.core.locks import output_lock
from data_process.core.settings import ToolkitParser
from nel_model.encoding import encode_mention_batch
from nel_model.evaluation.evaluate import open_run
from nel_model.evaluation.metrics import RankCounts
from nel_model.evaluation.scoring import PairScorer, kb_scorer
from nel_model.linking import MentionLists
from nel_model.loaded_run import LoadedRun, RetrievedLists
from nel_model.rerank.two_stage import two_stage_counts, write_two_stage_run
from nel_model.runs import RunError, two_stage_of

KIND = "pairwise"
SPLIT_CHOICES = {"all": ("dev", "test"), "dev": ("dev",), "test": ("test",)}
# what decides a cache's mention views: two caches that agree on these encode a new mention alike
ENCODING_KEYS = ("text_encoder", "image_encoder", "max_len", "text_max_len", "region_grid", "regions", "jpeg_draft")


def open_pairwise(run: str | Path, device: str | torch.device = "cpu", checkpoint: str = "best") -> LoadedRun:
    """A pairwise run (MIMIC) loaded with its own evaluation settings; a bi-encoder run is a :class:`RunError`."""
    r = open_run(run, device, checkpoint)
    if not r.pairwise:
        raise RunError(f"{run}: not a pairwise run (a bi-encoder scores one embedding per side; train one with "
                       "dim-mel train --model mimic)")
    return r


def _rows_of(ids: list[str], row_of: dict[str, int]) -> np.ndarray:
    return np.array([row_of.get(i, -1) for i in ids], dtype=np.int64)


def list_scores(pairwise: LoadedRun, scorer: PairScorer, mention_ids: list[str],
                entity_ids: list[list[str]]) -> torch.Tensor:
    """``[N, K]`` float32 scores of the pairwise run for mentions of its feature cache (by id) against their listed
    entities (by id); NaN for an entity missing from its KB."""
    data = pairwise.data
    m_rows = _rows_of(mention_ids, {mid: i for i, mid in enumerate(data.mention_ids)})
    missing = [mid for mid, r in zip(mention_ids, m_rows) if r < 0]
    if missing:
        raise RunError(f"{data.root}: mention {missing[0]!r} of the retriever's lists is not in the pairwise run's "
                       "feature cache (a re-ranker run scores its own dataset's mentions)")
    row_of = {eid: i for i, eid in enumerate(data.entity_ids)}
    e_rows = torch.from_numpy(np.array([_rows_of(ids, row_of) for ids in entity_ids], dtype=np.int64)
                              .reshape(len(mention_ids), -1))
    m = pairwise.mention_embeddings(m_rows)
    scores = scorer.pairs(m, e_rows.clamp(min=0).to(pairwise.device)).float().cpu()
    return scores.masked_fill(e_rows < 0, float("nan"))


class PairwiseReranker:
    """A pairwise run as a :class:`~nel_model.linking.Reranker` of the linker (module docstring)."""

    kind = KIND

    def __init__(self, pairwise: LoadedRun, top_k: int | None, retriever: LoadedRun | None = None,
                 source: Path | None = None):
        self.run, self.top_k, self.source = pairwise, top_k, source
        self.fingerprint = pairwise.checkpoint_sha256        # what decides its scores (the linker's provenance)
        self.scorer = kb_scorer(pairwise.model, pairwise.kb, pairwise.settings)
        self.row_of = {eid: i for i, eid in enumerate(pairwise.data.entity_ids)}
        self.shared_views = retriever is not None and all(
            retriever.data.meta.get(k) == pairwise.data.meta.get(k) for k in ENCODING_KEYS)

    def _mentions(self, lists: MentionLists):
        wanted = set(self.run.model.cfg.mention_views())
        if self.shared_views and lists.views is not None:
            views = {k: v.to(self.run.device) for k, v in lists.views.items() if k.removesuffix("_mask") in wanted}
            return encode_mention_batch(self.run.model, views)
        sides = [self.run.encode_query(q)[1] for q in lists.mentions]
        return type(sides[0]).cat(sides)

    @torch.no_grad()
    def score(self, lists: MentionLists) -> torch.Tensor:
        """``[N, K]`` scores of each mention's first ``top_k`` candidates (NaN: an entity not in the run's KB)."""
        k = max((len(c) for c in lists.candidates), default=0) if self.top_k is None else self.top_k
        if not lists.mentions:
            return torch.zeros(0, k)
        rows = torch.full((len(lists.mentions), k), -1, dtype=torch.long)
        for i, cands in enumerate(lists.candidates):
            for j, c in enumerate(cands[:k]):
                rows[i, j] = self.row_of.get(c.entity_id, -1)
        scores = self.scorer.pairs(self._mentions(lists), rows.clamp(min=0).to(self.run.device)).float().cpu()
        return scores.masked_fill(rows < 0, float("nan"))

    def info(self) -> dict[str, Any]:
        return reranker_info(self.run, self.top_k, self.source)


def reranker_info(pairwise: LoadedRun, top_k: int | None, source: Path | None = None) -> dict[str, Any]:
    """What a two-stage run records of its pairwise re-ranker (``two_stage.reranker``)."""
    return {"kind": KIND, "run": str(pairwise.run.resolve()), "label": pairwise.config.get("label"),
            "checkpoint": pairwise.checkpoint, "checkpoint_sha256": pairwise.checkpoint_sha256, "top_k": top_k,
            **({"two_stage_run": str(source.resolve())} if source is not None else {})}


def load_reranker(run: Path, retriever: LoadedRun) -> PairwiseReranker:
    """The pairwise re-ranker of a ``dim-mel rerank-pairwise`` run folder, for the linker over ``retriever``."""
    info = two_stage_of(run)
    if info is None or info["reranker"].get("kind") != KIND:
        raise RunError(f"{run}: not a pairwise two-stage run (dim-mel rerank-pairwise)")
    rr = info["reranker"]
    pairwise = open_pairwise(rr["run"], retriever.device, rr.get("checkpoint", "best"))
    return PairwiseReranker(pairwise, info.get("top_k"), retriever, run)


def split_counts(pairwise: LoadedRun, scorer: PairScorer, retriever: LoadedRun, lists: RetrievedLists,
                 top_k: int) -> dict[str, RankCounts]:
    """The two-stage counts of one split: its lists cut to ``top_k``, re-ordered by the pairwise run's scores."""
    if lists.top_k < top_k:
        raise ValueError(f"--top-k {top_k}: the {lists.split} lists hold {lists.top_k} entities (run dim-mel retrieve "
                         f"--top-k {top_k})")
    lists = RetrievedLists(lists.split, lists.rows, lists.top[:, :top_k], lists.scores[:, :top_k], lists.gold,
                           lists.meta)
    ids = retriever.data.entity_ids
    scores = list_scores(pairwise, scorer, [retriever.data.mention_ids[r] for r in lists.rows],
                         [[ids[e] for e in row] for row in lists.top.tolist()])
    return two_stage_counts(retriever, lists, scores)


def pairwise_counts(pairwise: LoadedRun, retriever: LoadedRun, splits: tuple[str, ...] | list[str],
                    top_k: int) -> dict[str, dict[str, RankCounts]]:
    """``{protocol: {split: RankCounts}}`` of the retriever's lists of ``splits`` re-ranked by ``pairwise``."""
    scorer = kb_scorer(pairwise.model, pairwise.kb, pairwise.settings)
    counts: dict[str, dict[str, RankCounts]] = {}
    for split in splits:
        for proto, c in split_counts(pairwise, scorer, retriever, retriever.lists(split), top_k).items():
            counts.setdefault(proto, {})[split] = c
    return counts


def rerank_pairwise(retriever_dir: str | Path, pairwise_dir: str | Path, out: str | Path, top_k: int = 0,
                    splits: tuple[str, ...] = ("dev", "test"), device: str = "cpu", checkpoint: str = "best",
                    retriever_checkpoint: str = "best", label: str | None = None) -> dict[str, Any]:
    """Write the two-stage run ``out``: ``retriever_dir``'s lists of ``splits`` (their first ``top_k``; 0: all)
    re-ranked by the pairwise run ``pairwise_dir``; the results."""
    retriever = open_run(retriever_dir, device, retriever_checkpoint)
    pairwise = open_pairwise(pairwise_dir, retriever.device, checkpoint)
    k = top_k or retriever.lists(splits[0]).top_k
    counts = pairwise_counts(pairwise, retriever, splits, k)
    out = Path(out)
    return write_two_stage_run(out, retriever, counts, k, reranker_info(pairwise, k),
                               label or f"{retriever.config.get('label') or retriever.run.name} + "
                                        f"{pairwise.config.get('label') or pairwise.run.name} (K={k})")


def main(argv: list[str] | None = None) -> int:
    p = ToolkitParser(prog="dim-mel rerank-pairwise", description="Re-rank a retriever run's top-K lists with a "
                      "trained pairwise run (MIMIC) and write the two-stage run (dim-mel evaluate, table, link "
                      "--rerank read it).")
    p.add_argument("--retriever", required=True, help="retriever run folder with retrieval/ lists (dim-mel retrieve)")
    p.add_argument("--pairwise", required=True, help="a pairwise run folder (dim-mel train --model mimic)")
    p.add_argument("--output_dir", required=True, help="the two-stage run folder to write")
    p.add_argument("--top_k", type=int, default=0, help="entries of each list to re-rank (0: the lists' K)")
    p.add_argument("--split", choices=list(SPLIT_CHOICES), default="all")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="the pairwise run's checkpoint")
    p.add_argument("--retriever_checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default=None)
    a = p.parse_args(argv)
    if a.top_k < 0:
        p.error("--top-k must be >= 0")
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        results = rerank_pairwise(a.retriever, a.pairwise, out, a.top_k, SPLIT_CHOICES[a.split], a.device,
                                  a.checkpoint, a.retriever_checkpoint, a.label)
    print(json.dumps(results["protocols"], indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
