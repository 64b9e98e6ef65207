"""Train the feature re-ranker (:mod:`nel_model.rerank.feature`) on a retriever's train lists, select it on dev,
evaluate dev and test as a two-stage run.

    dim-mel rerank --retriever RUN --output-dir OUT [--config configs/rerank.yaml] [--top-k 10] [flags]

``RUN`` is a trained (or ``--epochs 0``) run with ``RUN/retrieval/{train,dev,test}.jsonl`` (``dim-mel retrieve``);
``--top-k`` re-ranks the first K entries of its lists. Training: the train mentions whose gold entity is in its list
(the other entries are the hard negatives), a softmax over the K entries; the untrained re-ranker ranks as the
retriever does and is the first candidate for "best" (epoch 0), so selection on dev (``--select-by``, default
``full_kb:mrr``) never returns a re-ranker worse on dev than its retriever. The discipline is ``train``'s
(:mod:`nel_model.training.loop`): the shuffle of epoch ``e`` comes from ``default_rng([seed, e])`` and the torch RNG
(dropout) is re-seeded from ``(seed, e)``; ``checkpoints/last.pt`` after every epoch; ``--resume`` continues at the
first unfinished epoch and ends with exactly the metrics of an uninterrupted run. ``OUT`` holds ``config.json``,
``env.json``, ``metrics.jsonl``, ``checkpoints/{best,last}.pt`` and, at the end, ``results.json`` (with
``two_stage`` and ``rerank_speed``: mentions per second of re-ranking and of retrieval on this machine) and
``predictions/``, read by ``dim-mel table`` / ``analyze`` like any run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_process.core.durable_io import atomic_write_json
from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser, add_bool, load_settings, settings_from_parser
from nel_model.args import parse_select_by
from nel_model.evaluation.metrics import metrics_from_counts
from nel_model.rerank.feature import FeatureReranker, SplitInputs
from nel_model.evaluation.evaluate import open_run
from nel_model.rerank.two_stage import write_two_stage_run
from nel_model.runs import (CHECKPOINTS_DIR, CONFIG_FILE, ENV_FILE, METRICS_FILE, append_metrics,
                            check_resume_config, environment, load_checkpoint, save_checkpoint,
                            truncate_metrics)
from nel_model.training.loop import (epoch_seed, linear_schedule, make_optimizer, restore_rng, rng_states,
                                     seed_everything)

SWITCHES = ("lexical", "token_attention", "retriever_embeddings", "cross_candidates")
VIEW_SWITCHES = ("sentence", "profile", "image", "regions", "entity_image", "entity_profile")
ARCH = ("hidden", "proj", "heads", "layers", "dropout", "temperature")


def build_parser() -> ToolkitParser:
    p = ToolkitParser(prog="dim-mel rerank", description="Train the feature re-ranker on a retriever run's train "
                      "lists (dim-mel retrieve), select it on dev, evaluate dev and test as a two-stage run.")
    p.add_argument("--config", default=None, help="YAML file of flag defaults (configs/rerank.yaml)")
    p.add_argument("--retriever", required=False, help="retriever run folder with retrieval/ lists")
    p.add_argument("--retriever_checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--output_dir", required=False, help="the re-ranker's run folder")
    p.add_argument("--top_k", type=int, default=0, help="entries of each list to re-rank (0: the lists' K)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--proj", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=0.05, help="the retriever's score enters as score / T")
    for name, help_ in (("lexical", "string features of mention vs entity name, sentence vs description"),
                        ("token_attention", "the description attends over sentence tokens (and regions)"),
                        ("retriever_embeddings", "the retriever's q * e as a feature"),
                        ("cross_candidates", "attention across the K candidates")):
        add_bool(p, name, True, help_)
    for name in VIEW_SWITCHES:
        add_bool(p, name, True, f"use the {name.replace('_', ' ')} view when the cache has it")
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better dev score")
    p.add_argument("--select_by", default="full_kb:mrr", help="PROTOCOL:METRIC chosen on dev")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--label", default=None)
    add_bool(p, "resume", False, "continue from checkpoints/last.pt")
    add_bool(p, "overwrite", False, "start again in a run folder that has checkpoints")
    add_bool(p, "force", False, "--resume with a configuration other than the run's")
    p.add_argument("--stop_after_epochs", type=int, default=0, help="stop (as if killed) after this many epochs")
    return p


def parse_args(argv: list[str] | None = None):
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_settings(first.config, settings_from_parser(parser)))
    a = parser.parse_args(argv)
    if not a.retriever or not a.output_dir:
        parser.error("--retriever and --output-dir are required")
    if a.resume and a.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    if a.epochs < 0 or a.batch_size < 1 or a.top_k < 0:
        parser.error("--epochs and --top-k must be >= 0, --batch-size >= 1")
    if a.hidden % a.heads:
        parser.error(f"--hidden {a.hidden} is not divisible by --heads {a.heads}")
    try:
        parse_select_by(a.select_by)
    except ValueError as exc:
        parser.error(str(exc))
    return a


class RerankTrainer:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.output_dir)
        if a.threads:
            torch.set_num_threads(a.threads)
        seed_everything(a.seed)
        self.select = parse_select_by(a.select_by)
        self.retriever = open_run(a.retriever, a.device, a.retriever_checkpoint)
        self.device = self.retriever.device
        if self.select[0] == "candidates" and self.retriever.data.candidates is None:
            self.select = ("full_kb", "mrr")
        t0 = time.perf_counter()
        lists = {s: self.retriever.lists(s) for s in ("train", "dev", "test")}
        k = a.top_k or lists["train"].top_k
        switches = {n: getattr(a, n) for n in (*SWITCHES, *VIEW_SWITCHES, *ARCH)}
        self.reranker = FeatureReranker(FeatureReranker.config_for(self.retriever, k, **switches))
        self.reranker.model.to(self.device)
        self.inputs: dict[str, SplitInputs] = {s: self.reranker.inputs(self.retriever, lists[s]) for s in lists}
        self.prep_s = time.perf_counter() - t0
        pos = self.inputs["train"].lists.gold_position()
        self.train_idx = np.flatnonzero(pos.numpy() >= 0)
        self.train_label = pos
        if not len(self.train_idx):
            raise ValueError(f"{a.retriever}: no train list holds its gold entity; nothing to learn from")
        if not len(self.inputs["dev"].lists.rows) and a.epochs:
            raise ValueError(f"{a.retriever}: no dev mentions to select the re-ranker on")
        self.model = self.reranker.model
        self.optimizer = make_optimizer(self.model, a.lr, a.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_idx) / a.batch_size)
        total = max(1, a.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(a.warmup_steps, total))
        self.epoch, self.step = 0, 0
        self.best_score, self.best_epoch, self.bad_epochs, self.stopped = -math.inf, 0, 0, False

    # -- records --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        conf = {k: v for k, v in vars(self.a).items()}
        conf["retriever_resolved"] = str(Path(self.a.retriever).resolve())
        conf["reranker"] = self.reranker.state()["model_config"]
        conf["train_lists_with_gold"] = int(len(self.train_idx))
        return conf

    def ckpt(self, name: str) -> Path:
        return self.out / CHECKPOINTS_DIR / name

    def state(self) -> dict[str, Any]:
        return {**self.reranker.state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_states(self.device), "epoch": self.epoch,
                "step": self.step, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def start(self) -> None:
        a, conf = self.a, self.config()
        last = self.ckpt("last.pt")
        if a.resume:
            if not last.is_file():
                raise FileNotFoundError(f"{last}: --resume given but there is no checkpoint")
            check_resume_config(self.out, conf, a.force)
            st = load_checkpoint(last)
            if st["model_config"] != self.reranker.state()["model_config"]:
                raise ValueError(f"{last}: the checkpoint's re-ranker configuration differs from the flags")
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            restore_rng(st["rng"], self.device)
            self.epoch, self.step = st["epoch"], st["step"]
            self.best_score, self.best_epoch = st["best_score"], st["best_epoch"]
            self.bad_epochs, self.stopped = st["bad_epochs"], st["stopped"]
            truncate_metrics(self.out, self.epoch)
        else:
            if self.ckpt("").exists() and any(self.ckpt("").iterdir()) and not a.overwrite:
                raise FileExistsError(f"{self.out}: run folder already has checkpoints; use --resume or --overwrite")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            for name in ("best.pt", "last.pt"):
                self.ckpt(name).unlink(missing_ok=True)
        atomic_write_json(self.out / CONFIG_FILE, conf)
        atomic_write_json(self.out / (ENV_FILE if not a.resume else f"env.resume{self.epoch}.json"),
                          environment(self.device, a.seed, 1))

    # -- training -------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        a = self.a
        torch.manual_seed(epoch_seed(a.seed, self.epoch, 0))
        order = np.random.default_rng([a.seed, self.epoch]).permutation(self.train_idx)
        self.model.train()
        inp = self.inputs["train"]
        total = 0.0
        for s in range(0, len(order), a.batch_size):
            idx = order[s:s + a.batch_size]
            logits = self.model(self.reranker.batch(self.retriever, inp, idx, self.device))
            loss = F.cross_entropy(logits.float(), self.train_label[idx].to(logits.device), reduction="sum")
            (loss / len(idx)).backward()
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            total += float(loss.detach())
        return total / len(order)

    def counts(self, split: str):
        return self.reranker.counts(self.retriever, self.inputs[split], self.a.eval_batch_size)

    def dev_metrics(self) -> dict[str, dict[str, float]]:
        return {p: metrics_from_counts(c) for p, c in self.counts("dev").items()}

    def selected(self, dev: dict[str, dict[str, float]]) -> float:
        if any(m.get("nan", 0) for m in dev.values()):
            return -math.inf
        return dev[self.select[0]][self.select[1]]

    def save_best(self, dev: dict[str, Any]) -> None:
        save_checkpoint(self.ckpt("best.pt"), {**self.reranker.state(), "epoch": self.epoch, "dev": dev})

    def fit(self) -> dict[str, Any]:
        a = self.a
        self.start()
        if self.epoch == 0:                      # the untrained re-ranker = the retriever's order
            dev = self.dev_metrics()
            self.best_score, self.best_epoch = self.selected(dev), 0
            self.save_best(dev["full_kb"])
            print(f"epoch 0 (= the retriever): dev MRR {100 * dev['full_kb']['mrr']:.2f}  "
                  f"H@1 {100 * dev['full_kb']['hits@1']:.2f}", file=sys.stderr)
        while self.epoch < a.epochs and not self.stopped:
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_epoch()
            self.epoch += 1
            dev = self.dev_metrics()
            score = self.selected(dev)
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            else:
                self.bad_epochs += 1
                self.stopped = bool(a.patience and self.bad_epochs >= a.patience)
            rec = {"epoch": self.epoch, "step": self.step, "train_loss": loss, "lr": lr,
                   "time_s": round(time.time() - t0, 3), "dev": dev["full_kb"]}
            if "candidates" in dev:
                rec["dev_candidates"] = dev["candidates"]
            append_metrics(self.out / METRICS_FILE, rec)
            if improved:
                self.save_best(dev["full_kb"])
            save_checkpoint(self.ckpt("last.pt"), self.state())
            print(f"epoch {self.epoch}: loss {loss:.4f}  dev MRR {100 * dev['full_kb']['mrr']:.2f}  "
                  f"H@1 {100 * dev['full_kb']['hits@1']:.2f}" + ("  *" if improved else ""), file=sys.stderr)
            if a.stop_after_epochs and self.epoch >= a.stop_after_epochs and self.epoch < a.epochs:
                return {"stopped_at_epoch": self.epoch}
        return self.finish()

    def speed(self) -> dict[str, Any]:
        """Mentions per second on the test lists: re-ranking (inputs built from the lists, then scored) and the
        retrieval it follows (mention encoding, whole-KB scores, top K)."""
        r, lists = self.retriever, self.inputs["test"].lists
        n = len(lists.rows)
        if not n:
            return {}
        t0 = time.perf_counter()
        inp = self.reranker.inputs(r, lists)
        self.reranker.score_inputs(r, inp, self.a.eval_batch_size)
        t1 = time.perf_counter()
        q = r.mention_embeddings(lists.rows)
        for s in range(0, n, r.settings.mention_chunk):
            (q[s:s + r.settings.mention_chunk] @ r.entity_emb.T).topk(lists.top_k, dim=1)
        t2 = time.perf_counter()
        return {"mentions": n, "top_k": self.reranker.cfg.top_k, "rerank_mentions_per_s": round(n / (t1 - t0), 1),
                "retrieval_mentions_per_s": round(n / (t2 - t1), 1), "torch_threads": torch.get_num_threads(),
                "device": str(self.device)}

    def finish(self) -> dict[str, Any]:
        a = self.a
        best = load_checkpoint(self.ckpt("best.pt"))
        self.model.load_state_dict(best["model"])
        counts: dict[str, dict[str, Any]] = {}
        for split in ("dev", "test"):
            if len(self.inputs[split].lists.rows):
                for proto, c in self.counts(split).items():
                    counts.setdefault(proto, {})[split] = c
        oracle = {s: float((self.inputs[s].lists.gold_position() >= 0).double().mean())
                  for s in ("dev", "test") if len(self.inputs[s].lists.rows)}
        info = {"kind": "feature", "run": str(self.out.resolve()), "best_epoch": self.best_epoch,
                "epochs_run": self.epoch, "selection": ":".join(self.select),
                "config": self.reranker.state()["model_config"]}
        return write_two_stage_run(self.out, self.retriever, counts, self.reranker.cfg.top_k, info,
                                   a.label or self.out.name, a.seed,
                                   extra={"best_epoch": self.best_epoch, "epochs_run": self.epoch,
                                          "oracle_recall_at_k": oracle, "rerank_speed": self.speed(),
                                          "prepare_s": round(self.prep_s, 2)})


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = RerankTrainer(a).fit()
    print(json.dumps(out.get("protocols", out), indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
