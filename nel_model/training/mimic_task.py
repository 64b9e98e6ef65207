"""MIMIC (``nel_model.mimic``, docs/MIMIC.md) as a task of the training engine (:mod:`nel_model.training.engine`):
``dim-mel train --model mimic`` (or ``--config configs/mimic.yaml``).

    python -m nel_model.train --config configs/mimic.yaml --features FEAT_DIR --output-dir RUN_DIR [flags]

A batch is B train mentions and their B gold entities; the loss is the official one (``losses.mimic_loss_sum``:
the in-batch cross-entropy of the overall score plus that of each unit's), summed over the batch and divided by B.
The order of an epoch's mentions is ``default_rng([seed, epoch]).permutation`` of the train split (the last batch
may be smaller, as the official DataLoader's). The optimiser is the official AdamW (eps 1e-4, weight decay on every
parameter but biases, a constant rate: :meth:`MIMICTask.optimizer`).

Dev after every epoch, on the protocol ``--dev-protocol`` names: ``full_kb`` (every dev mention against the whole
KB, the official selection: ``Val/mrr``), ``candidates`` (the candidate lists only: seconds where the whole KB takes
minutes on a CPU) or ``subset`` (a fixed sample of ``--dev-subset`` dev mentions against the whole KB, and every
candidate list). The checkpoint with the best ``--select-by`` metric is tested at the end: the test split against
the whole KB and on its candidate lists (with the top 10 of each mention from the same pass), and dev as its
protocol measured it (``results.json`` records which: ``dev_protocol``). The run lifecycle (resume, checkpoints,
selection, ``metrics.jsonl``) is the engine's; one process (no DDP).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json
from nel_model import distributed as D
from nel_model.config import MIMICTrainConfig, mimic_config
from nel_model.data import FeatureSource, load_mel_data, to_device
from nel_model.encoding import encode_entities
from nel_model.evaluation.evaluate import (PREDICTION_TOP_K, metrics_of, results_block, settings_from_config,
                                           split_counts, write_predictions)
from nel_model.evaluation.metrics import RankCounts
from nel_model.losses import mimic_loss_sum
from nel_model.mimic import MIMIC
from nel_model.runs import RESULTS_FILE
from nel_model.training.engine import Epoch, Fitted, Task, linear_schedule
from nel_model.training.loop import dev_split_advice

Counts = dict[str, dict[str, RankCounts]]


def dev_subset(rows: np.ndarray, n: int) -> np.ndarray:
    """A fixed sample of ``n`` dev mention rows (the same for every seed and run: ``default_rng(0)``), in order."""
    if n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, size=n, replace=False))


class MIMICTask(Task):
    """MIMIC on a feature cache (:class:`nel_model.config.MIMICTrainConfig`), the
    :class:`~nel_model.training.engine.Task` of ``dim-mel train --model mimic``."""

    distributed = False
    epoch0 = "untrained"

    def __init__(self, cfg: MIMICTrainConfig, dist: D.DistInfo):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        d, e = cfg.data, cfg.eval
        if not d.features or not cfg.run.output_dir:
            raise ValueError("--features and --output_dir are required")
        self.data = load_mel_data(d.features, d.dataset)
        if len(self.data.splits["train"]) == 0:
            raise ValueError(f"{d.features}: the dataset has no train mentions")
        if cfg.optim.epochs > 0 and len(self.data.splits["dev"]) == 0:
            raise ValueError(f"{d.features}: the dataset has no dev mentions; the best model is chosen on dev "
                             f"(--dev-protocol {e.dev_protocol}). {dev_split_advice(self.data)}")
        if e.dev_protocol != "full_kb" and self.data.candidates is None:
            raise ValueError(f"{d.features}: --dev-protocol {e.dev_protocol} reads the dev candidate lists and the "
                             "dataset has none: use --dev-protocol full_kb")
        self.model_cfg = mimic_config(cfg.model, self.data)
        self.model = MIMIC(self.model_cfg).to(self.device)
        self.source = FeatureSource(self.data, self.model_cfg.mention_views(), self.model_cfg.entity_views())
        self.eval_settings = settings_from_config(cfg, self.device)
        self.dev_rows = self.data.splits["dev"]
        self.subset_rows = dev_subset(self.dev_rows, e.dev_subset) if e.dev_protocol == "subset" else None

    # -- what the engine asks ------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        return {"model": "mimic", **asdict(self.model_cfg)}

    def resolved(self) -> dict[str, Any]:
        return {"features": str(Path(self.cfg.data.features).resolve()),
                "dataset_resolved": str(Path(self.data.dataset).resolve()), "model_config": self.model_config()}

    def has_candidates(self) -> bool:
        return self.data.candidates is not None

    def train_size(self) -> int:
        return len(self.data.splits["train"])

    def optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
        """The official AdamW (``lightning_mimic.py``): weight decay on every parameter whose name has no "bias"
        (layer-norm weights included, unless ``--no-decay-norm-weights``), ``--adam-eps``; a constant rate after
        ``--warmup-steps`` (``--lr-schedule linear``: the engine's warm-up and decay)."""
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if "bias" in name or (not o.decay_norm_weights and p.ndim < 2) else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(0.9, 0.999),
                                eps=o.adam_eps, fused=True)
        if o.lr_schedule == "linear":
            return opt, linear_schedule(o.warmup_steps, total_steps)
        warmup = o.warmup_steps
        return opt, (lambda step: min(1.0, (step + 1) / warmup)) if warmup > 0 else (lambda step: 1.0)

    def epoch(self, epoch: int) -> Epoch:
        bs = self.cfg.optim.batch_size
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(self.data.splits["train"])

        def batches() -> Iterator[dict[str, Any]]:
            for s in range(0, len(order), bs):
                rows = order[s:s + bs]
                gold = self.data.gold[rows]
                yield to_device({"mention": self.source.mentions(rows), "entity": self.source.entities(gold),
                                 "entity_rows": torch.from_numpy(gold)}, self.device)

        return Epoch(batches(), -(-len(order) // bs), len(order))

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(batch["mention"], batch["entity"])

    def loss(self, outputs: tuple[torch.Tensor, dict[str, torch.Tensor]], batch: dict[str, Any],
             accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        overall, units = outputs
        b = overall.shape[0]
        raw = mimic_loss_sum(overall, units, 0, b, batch["entity_rows"] if self.cfg.loss.mask_gold_copies else None)
        return raw / b / accumulation, raw

    # -- evaluation -----------------------------------------------------------------------------
    def _counts(self, split: str, protocol: str, kb: Any, top_k: int = 0) -> Counts:
        """``{protocol: {split: counts}}`` of one split under a dev protocol (``full_kb``: the whole KB and the
        lists; ``candidates``: the lists; ``subset``: the whole KB on the fixed dev sample, the lists on all)."""
        rows = self.data.splits[split]
        if protocol == "full_kb":
            per = split_counts(self.model, self.data, self.source, rows, self.dist, self.eval_settings, kb, top_k)
        elif protocol == "candidates":
            per = split_counts(self.model, self.data, self.source, rows, self.dist, self.eval_settings, kb,
                               protocols=("candidates",))
        else:
            per = {**split_counts(self.model, self.data, self.source, self.subset_rows, self.dist,
                                  self.eval_settings, kb, protocols=("full_kb",)),
                   **split_counts(self.model, self.data, self.source, rows, self.dist, self.eval_settings, kb,
                                  protocols=("candidates",))}
        return {proto: {split: c} for proto, c in per.items()}

    def _kb(self) -> Any:
        return encode_entities(self.model, self.source, self.device, self.eval_settings)

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        counts = self._counts("dev", self.cfg.eval.dev_protocol, self._kb())
        return {proto: per["dev"] for proto, per in metrics_of(counts, self.eval_settings.tie_rule).items()}

    def finish(self, fitted: Fitted) -> dict[str, Any]:
        """The best checkpoint on test (whole KB with the top 10 of each mention, and the lists) and on dev as its
        protocol measured it: ``results.json``, ``predictions/`` (the splits ranked against the whole KB) and the
        seconds each part took (``eval_s``)."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        kb = self._kb()
        timing = {"kb_side": time.perf_counter() - t0}
        counts: Counts = {}
        dev_protocol = e.dev_protocol if e.dev_protocol != "subset" else "candidates"   # no whole-KB dev in full
        for split, protocol in (("test", "full_kb"), ("dev", dev_protocol)):
            if not len(self.data.splits[split]):
                continue
            t = time.perf_counter()
            for proto, per in self._counts(split, protocol, kb, PREDICTION_TOP_K).items():
                counts.setdefault(proto, {}).update(per)
            timing[split] = time.perf_counter() - t
        results = {"dataset": self.data.dataset_name, "label": fitted.label, "seed": fitted.seed,
                   "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run, "selection": fitted.selection,
                   "dev_protocol": {"protocol": e.dev_protocol,
                                    "subset": len(self.subset_rows) if self.subset_rows is not None else None},
                   **results_block(counts, self.data, self.eval_settings),
                   "eval_s": {k: round(v, 2) for k, v in timing.items()}}
        results["chunks"]["pair_memory_mb"] = e.pair_memory_mb
        write_predictions(fitted.out, self.model, self.data, self.source, counts, self.eval_settings, self.device,
                          kb, checkpoint={"name": "best", "epoch": fitted.best_epoch})
        atomic_write_json(fitted.out / RESULTS_FILE, results)
        return results
