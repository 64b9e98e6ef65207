"""Train the feature re-ranker (:mod:`nel_model.rerank.feature`) on a retriever's train lists, select it on dev,
evaluate dev and test as a two-stage run: a task of the training engine (:mod:`nel_model.training.engine`).

    dim-mel rerank --retriever RUN --output-dir OUT [--config configs/rerank.yaml] [--top-k 10] [flags]

``RUN`` is a trained (or ``--epochs 0``) run with ``RUN/retrieval/{train,dev,test}.jsonl`` (``dim-mel retrieve``);
``--top-k`` re-ranks the first K entries of its lists. Training: the train mentions whose gold entity is in its list
(the other entries are the hard negatives), a softmax over the K entries; the untrained re-ranker ranks as the
retriever does and is the engine's epoch-0 candidate for "best", so selection on dev (``--select-by``, default
``full_kb:mrr``) never returns a re-ranker worse on dev than its retriever. The shuffle of epoch ``e`` comes from
``default_rng([seed, e])``; resume, checkpoints, ``metrics.jsonl`` and selection are the engine's, the flags and their
defaults :class:`nel_model.config.RerankConfig` (= ``configs/rerank.yaml``). ``OUT`` holds ``config.json``,
``env.json``, ``metrics.jsonl``, ``checkpoints/{best,last}.pt`` and, at the end, ``results.json`` (with
``two_stage`` and ``rerank_speed``: mentions per second of re-ranking and of retrieval on this machine) and
``predictions/``, read by ``dim-mel table`` / ``analyze`` like any run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from data_process.core.entry import run_main
from nel_model import distributed as D
from nel_model.config import RerankConfig
from nel_model.evaluation.metrics import metrics_from_counts
from nel_model.rerank.feature import FeatureReranker, SplitInputs
from nel_model.evaluation.evaluate import open_run
from nel_model.rerank.two_stage import write_two_stage_run
from nel_model.training.engine import Epoch, Fitted, Task, fit


def parse_args(argv: list[str] | None = None) -> RerankConfig:
    return RerankConfig.parse(argv)


class FeatureRerankTask(Task):
    """The feature re-ranker on a retriever's lists, the :class:`~nel_model.training.engine.Task` of
    ``dim-mel rerank``."""

    distributed = False
    epoch0 = "= the retriever"

    def __init__(self, cfg: RerankConfig, dist: D.DistInfo):
        self.cfg = cfg
        d = cfg.data
        self.retriever = open_run(d.retriever, cfg.run.device, d.retriever_checkpoint)
        self.device = self.retriever.device
        t0 = time.perf_counter()
        lists = {s: self.retriever.lists(s) for s in ("train", "dev", "test")}
        k = d.top_k or lists["train"].top_k
        self.reranker = FeatureReranker(FeatureReranker.config_for(self.retriever, k,
                                                                   **cfg.model.reranker_settings()))
        self.reranker.model.to(self.device)
        self.inputs: dict[str, SplitInputs] = {s: self.reranker.inputs(self.retriever, lists[s]) for s in lists}
        self.prep_s = time.perf_counter() - t0
        pos = self.inputs["train"].lists.gold_position()
        self.train_idx = np.flatnonzero(pos.numpy() >= 0)
        self.train_label = pos
        if not len(self.train_idx):
            raise ValueError(f"{d.retriever}: no train list holds its gold entity; nothing to learn from")
        if not len(self.inputs["dev"].lists.rows) and cfg.optim.epochs:
            raise ValueError(f"{d.retriever}: no dev mentions to select the re-ranker on")
        self.model = self.reranker.model

    # -- what the engine asks ------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        return self.reranker.state()["model_config"]

    def resolved(self) -> dict[str, Any]:
        return {"retriever_resolved": str(Path(self.cfg.data.retriever).resolve()), "reranker": self.model_config(),
                "train_lists_with_gold": int(len(self.train_idx))}

    def has_candidates(self) -> bool:
        return self.retriever.data.candidates is not None

    def train_size(self) -> int:
        return len(self.train_idx)

    def epoch(self, epoch: int) -> Epoch:
        bs = self.cfg.optim.batch_size
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(self.train_idx)
        inp = self.inputs["train"]

        def batches() -> Iterator[tuple[dict[str, Any], np.ndarray]]:
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                yield self.reranker.batch(self.retriever, inp, idx, self.device), idx

        return Epoch(batches(), math.ceil(len(order) / bs), len(order))

    def forward(self, model: torch.nn.Module, batch: tuple[dict[str, Any], np.ndarray]) -> torch.Tensor:
        return model(batch[0])

    def loss(self, logits: torch.Tensor, batch: tuple[dict[str, Any], np.ndarray],
             accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch[1]
        raw = F.cross_entropy(logits.float(), self.train_label[idx].to(logits.device), reduction="sum")
        loss = raw / len(idx)
        return (loss / accumulation if accumulation > 1 else loss), raw

    def counts(self, split: str):
        return self.reranker.counts(self.retriever, self.inputs[split], self.cfg.eval.eval_batch_size)

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        return {p: metrics_from_counts(c) for p, c in self.counts("dev").items()}

    def speed(self) -> dict[str, Any]:
        """Mentions per second on the test lists: re-ranking (inputs built from the lists, then scored) and the
        retrieval it follows (mention encoding, whole-KB scores, top K)."""
        r, lists = self.retriever, self.inputs["test"].lists
        n = len(lists.rows)
        if not n:
            return {}
        t0 = time.perf_counter()
        inp = self.reranker.inputs(r, lists)
        self.reranker.score_inputs(r, inp, self.cfg.eval.eval_batch_size)
        t1 = time.perf_counter()
        q = r.mention_embeddings(lists.rows)
        for s in range(0, n, r.settings.mention_chunk):
            (q[s:s + r.settings.mention_chunk] @ r.entity_emb.T).topk(lists.top_k, dim=1)
        t2 = time.perf_counter()
        return {"mentions": n, "top_k": self.reranker.cfg.top_k, "rerank_mentions_per_s": round(n / (t1 - t0), 1),
                "retrieval_mentions_per_s": round(n / (t2 - t1), 1), "torch_threads": torch.get_num_threads(),
                "device": str(self.device)}

    def finish(self, fitted: Fitted) -> dict[str, Any]:
        counts: dict[str, dict[str, Any]] = {}
        for split in ("dev", "test"):
            if len(self.inputs[split].lists.rows):
                for proto, c in self.counts(split).items():
                    counts.setdefault(proto, {})[split] = c
        oracle = {s: float((self.inputs[s].lists.gold_position() >= 0).double().mean())
                  for s in ("dev", "test") if len(self.inputs[s].lists.rows)}
        info = {"kind": "feature", "run": str(fitted.out.resolve()), "best_epoch": fitted.best_epoch,
                "epochs_run": fitted.epochs_run, "selection": fitted.selection, "config": self.model_config()}
        return write_two_stage_run(fitted.out, self.retriever, counts, self.reranker.cfg.top_k, info, fitted.label,
                                   fitted.seed,
                                   extra={"best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run,
                                          "oracle_recall_at_k": oracle, "rerank_speed": self.speed(),
                                          "prepare_s": round(self.prep_s, 2)})


def main(argv: list[str] | None = None) -> int:
    out = fit(parse_args(argv), FeatureRerankTask)
    print(json.dumps(out.get("protocols", out), indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
