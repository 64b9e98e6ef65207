"""The retriever, DIM's bi-encoder, as a task of the training engine (:mod:`nel_model.training.engine`): trained on
a feature cache with sampled KB negatives (random, TF-IDF, or the previous epoch's hard negatives), evaluated on dev
every epoch (full KB and candidate lists), the best model by a dev metric (``--select-by``, default the full-KB MRR)
tested at the end.

    python -m nel_model.train --config configs/synthetic.yaml --features FEAT_DIR --output-dir RUN_DIR [flags]
    torchrun --nproc_per_node N -m nel_model.train ...            # DistributedDataParallel, same flags

An epoch's mention order and negatives come from ``default_rng([seed, epoch])`` (and the hard-negative table of the
previous epoch, which the checkpoint holds): :mod:`nel_model.training.batches`. The run lifecycle (resume,
checkpoints, selection, metrics.jsonl) is the engine's; the configuration is :class:`nel_model.config.TrainConfig`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json
from data_process.core.records import ENTITIES_FILE, read_entities
from nel_model import distributed as D
from nel_model.config import TrainConfig, dim_config, parse_select_by
from nel_model.data import FeatureSource, available_memory, load_mel_data, to_device
from nel_model.encoding import encode_entities
from nel_model.evaluation.evaluate import (PREDICTION_TOP_K, evaluate_counts, evaluate_splits, results_block,
                                           settings_from_config, write_predictions)
from nel_model.losses import NORMALISED_LOSSES, batch_loss_sum
from nel_model.nel import DIM
from nel_model.loaded_run import save_kb_embeddings
from nel_model.runs import RESULTS_FILE, checkpoint_path
from nel_model.training.batches import TrainBatches, make_epoch_plan, make_loader
from nel_model.training.engine import Epoch, Fitted, Task
from nel_model.training.hard_negatives import hard_negative_table
from nel_model.training.tfidf_negatives import TfidfNegatives


def tfidf_table(data) -> TfidfNegatives:
    """DIM's TF-IDF negative tables over the KB's descriptions (names where there is none), in entity-row order."""
    if data.dataset is None:
        raise ValueError("--negatives tfidf needs the dataset's entity descriptions (pass --dataset DIR)")
    texts = {e.id: e.description or e.name for e in read_entities(Path(data.dataset) / ENTITIES_FILE)}
    missing = [eid for eid in data.entity_ids if eid not in texts]
    if missing:
        raise ValueError(f"{data.dataset}/{ENTITIES_FILE}: entity {missing[0]!r} of the feature cache is missing")
    return TfidfNegatives.build([texts[eid] for eid in data.entity_ids])


def dev_split_advice(data) -> str:
    """Which command gives this dataset a dev split, for the format it was converted from."""
    fmt = data.dataset_info.source_format
    again = "then encode the features again (dim-mel features)"
    if fmt == "ghmfc":
        return ("Carve one from train: dim-mel prepare --format ghmfc --src RELEASE --out DATASET --dev-from-train "
                f"0.1; {again}")
    if fmt == "melbench":
        return f"Re-split it: dim-mel prepare --format melbench --src RELEASE --out DATASET --splits 0.7,0.1,0.2; {again}"
    return (f"Its {fmt!r} release fixes the splits and has none for dev: add a dev split to the release (or "
            "convert it with a format that makes one), then prepare and encode it again")


class RetrieverTask(Task):
    """DIM on a feature cache (:class:`nel_model.config.TrainConfig`), the :class:`~nel_model.training.engine.Task`
    of ``dim-mel train``."""

    distributed = True
    epoch0 = "untrained"

    def __init__(self, cfg: TrainConfig, dist: D.DistInfo):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        d = cfg.data
        if not d.features or not cfg.run.output_dir:
            raise ValueError("--features and --output_dir are required")
        self.data = load_mel_data(d.features, d.dataset)
        if len(self.data.splits["train"]) == 0:
            raise ValueError(f"{d.features}: the dataset has no train mentions")
        select = parse_select_by(cfg.optim.select_by)
        if cfg.optim.epochs > 0 and len(self.data.splits["dev"]) == 0:
            metric = "MRR" if select[1] == "mrr" else select[1]
            raise ValueError(f"{d.features}: the dataset has no dev mentions; the best model is chosen by dev "
                             f"{metric} (--select-by {cfg.optim.select_by}). {dev_split_advice(self.data)}")
        self.tfidf = tfidf_table(self.data) if cfg.loss.negatives == "tfidf" else None
        self.model_cfg = dim_config(cfg.model, self.data)
        self.model = DIM(self.model_cfg).to(self.device)
        on_device, feature_dtype = self._decide_on_device()
        self.source = FeatureSource(self.data, self.model_cfg.mention_views(), self.model_cfg.entity_views(),
                                    self.device, on_device=on_device, dtype=feature_dtype)
        self._check_flag_effects()
        self.eval_settings = settings_from_config(cfg, self.device)
        self.hard_table: np.ndarray | None = None

    def _check_flag_effects(self) -> None:
        """Settings that the data, the device or the model's sizes make ineffective: a warning naming each, or an
        error where an explicit setting cannot hold (``--residual`` with an output size other than the text's)."""
        c, given, model = self.cfg, self.cfg.given, self.model_cfg
        if c.model.residual and not model.is_residual:
            why = (f"--output-size {model.output_size} differs from the text feature size {model.text_dim}: the raw "
                   "features cannot be added to the outputs")
            if "residual" in given:
                raise ValueError(f"--residual contradicts {why}; drop --output-size or pass --no-residual")
            print(f"warning: no residual (zero-shot) start: {why} (--no-residual says so explicitly)", file=sys.stderr)
        device_only = {"num_workers": (c.data.num_workers > 0 and self.source.on_device,
                                       "the features are kept on the device (--data-on-device)"),
                       "pin_memory": (self.device.type != "cuda", "the device is not CUDA"),
                       "amp": (c.optim.amp != "auto" and self.device.type != "cuda",
                               "mixed precision runs on CUDA only")}
        for flag, (idle, why) in device_only.items():
            if flag in given and idle:
                print(f"warning: --{flag.replace('_', '-')} has no effect: {why}", file=sys.stderr)

    def _decide_on_device(self) -> tuple[bool, torch.dtype]:
        """Keep the features on the device (on a CPU: in RAM as tensors) when they fit: float32 when that fits in
        half of the free GPU memory (a quarter of the host's available memory), float16 when only that fits."""
        mode = self.cfg.data.data_on_device
        if mode == "no":
            return False, torch.float16
        probe = FeatureSource(self.data, self.model_cfg.mention_views(), self.model_cfg.entity_views())
        need16 = probe.nbytes()
        budget = available_memory(self.device) * (0.5 if self.device.type == "cuda" else 0.25)
        if 2 * need16 < budget:
            return True, torch.float32
        return (mode == "yes" or need16 < budget), torch.float16

    # -- what the engine asks ------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        return asdict(self.model_cfg)

    def resolved(self) -> dict[str, Any]:
        return {"features": str(Path(self.cfg.data.features).resolve()),
                "dataset_resolved": str(Path(self.data.dataset).resolve()), "model_config": self.model_config(),
                "data_on_device": self.source.on_device}

    def has_candidates(self) -> bool:
        return self.data.candidates is not None

    def train_size(self) -> int:
        return len(self.data.splits["train"])

    def epoch(self, epoch: int) -> Epoch:
        c, dist = self.cfg, self.dist
        plan = make_epoch_plan(c.run.seed, epoch, self.data.splits["train"], self.data.gold, self.data.num_entities,
                               c.optim.batch_size, c.loss.num_negatives,
                               self.hard_table if c.loss.hard_negatives else None, c.loss.hard_negative_ratio,
                               min_batch=dist.world_size, tfidf=self.tfidf)
        ds = TrainBatches(plan, self.source, dist.rank, dist.world_size)
        pin = c.data.pin_memory and self.device.type == "cuda" and not self.source.on_device
        loader = make_loader(ds, 0, c.data.num_workers, pin)
        return Epoch((to_device(batch, self.device) for batch in loader), len(ds), len(plan.order))

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["mention"], batch["entity"], normalize=self.cfg.loss.loss in NORMALISED_LOSSES)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, Any],
             accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, e = outputs
        c = self.cfg.loss
        lo, hi = batch["local"]
        raw = batch_loss_sum(c.loss, q.float(), e.float(), batch["entity_rows"], lo, hi, batch["global_n"],
                             batch["num_negatives"], c.margin, c.temperature, c.npair_l2,
                             c.npair_negatives == "batch")
        return raw * (self.dist.world_size / batch["global_n"] / accumulation), raw

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        dev = evaluate_splits(self.model, self.data, self.source, ["dev"], self.dist, self.eval_settings)
        return {proto: splits["dev"] for proto, splits in dev.items()}

    def end_of_epoch(self) -> None:
        if self.cfg.loss.hard_negatives:
            self.hard_table = hard_negative_table(self.model, self.data, self.source, self.data.splits["train"],
                                                  self.cfg.loss.hard_negative_pool, self.dist, self.eval_settings)

    def state(self) -> dict[str, Any]:
        return {"hard_table": None if self.hard_table is None else self.hard_table.astype(np.int32)}

    def load_state(self, st: dict[str, Any]) -> None:
        ht = st.get("hard_table")
        self.hard_table = None if ht is None else np.asarray(ht, dtype=np.int64)

    def finish(self, fitted: Fitted) -> dict[str, Any]:
        dist = self.dist
        emb = encode_entities(self.model, self.source, self.device, self.eval_settings)
        counts = evaluate_counts(self.model, self.data, self.source, ["dev", "test"], dist, self.eval_settings,
                                 top_k=PREDICTION_TOP_K, entity_emb=emb)
        results = {"dataset": self.data.dataset_name, "label": fitted.label, "seed": fitted.seed,
                   "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run, "selection": fitted.selection,
                   **results_block(counts, self.data, self.eval_settings)}
        if dist.is_main:
            save_kb_embeddings(fitted.out, emb, checkpoint_path(fitted.out, "best"), self.data,
                               self.model_cfg.entity_views(), self.eval_settings)
            write_predictions(fitted.out, self.model, self.data, self.source, counts, self.eval_settings,
                              self.device, emb, checkpoint={"name": "best", "epoch": fitted.best_epoch})
            atomic_write_json(fitted.out / RESULTS_FILE, results)
        return results
