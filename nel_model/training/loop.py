"""Train DIM on a feature cache, evaluate dev every epoch, keep the best model by a dev metric (``--select_by``, default
the full-KB MRR), test it at the end.

    python -m nel_model.train --config configs/synthetic.yaml --features FEAT_DIR --output_dir RUN_DIR [flags]
    torchrun --nproc_per_node N -m nel_model.train ...            # DistributedDataParallel, same flags

Reproducibility and resume: the shuffle and negatives of epoch ``e`` come from ``default_rng([seed, e])`` and the
torch RNG (dropout) is re-seeded from ``(seed, e, rank)`` at the start of every epoch, so an epoch's computation
depends only on the model/optimizer state at its start. ``checkpoints/last.pt`` (written atomically after every
epoch) holds that state; ``--resume`` restarts at the first unfinished epoch (after a mid-epoch kill, the
interrupted epoch is redone from its start) and finishes with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_process.core.durable_io import atomic_write_json
from data_process.core.records import ENTITIES_FILE, read_entities
from nel_model import distributed as D
from nel_model.args import parse_args, parse_select_by
from nel_model.training.batches import TrainBatches, kept_mentions, make_epoch_plan, make_loader
from nel_model.data import FeatureSource, available_memory, load_mel_data, to_device
from nel_model.encoding import encode_entities
from nel_model.evaluation.evaluate import (PREDICTION_TOP_K, evaluate_counts, evaluate_splits, results_block,
                                           settings_from_config, write_predictions)
from nel_model.training.hard_negatives import hard_negative_table
from nel_model.losses import NORMALISED_LOSSES, batch_loss_sum
from nel_model.nel import DIM, config_from_args
from nel_model.training.tfidf_negatives import TfidfNegatives
from nel_model.loaded_run import save_kb_embeddings
from nel_model.runs import (CHECKPOINTS_DIR, CONFIG_FILE, ENV_FILE, METRICS_FILE, RESULTS_FILE, append_metrics,
                            check_resume_config, environment, load_checkpoint, save_checkpoint, truncate_metrics)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % (2 ** 63))


def set_determinism(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # deterministic mode would also fill every new tensor with NaN (hundreds of fill kernels a step); nothing
        # here reads memory before writing it, so that guard only costs time
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    if device.type != "cuda" or mode == "off":
        return None, False
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def linear_schedule(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    # fused: one kernel for the whole update instead of a dozen per parameter group (CUDA and CPU)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """Host RNG states, plus the CUDA state of the training ``device`` only: ``get_rng_state_all`` would create a
    CUDA context on every visible GPU (from rank 0 under DDP) and tie the checkpoint to that GPU count."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device is not None and device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def restore_rng(st: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    cuda = st.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


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
        return f"Re-split it: dim-mel prepare --format melbench --src RELEASE --out DATASET --splits 70,10,20; {again}"
    return (f"Its {fmt!r} release fixes the splits and has none for dev: add a dev split to the release (or "
            "convert it with a format that makes one), then prepare and encode it again")


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps of one epoch: the epoch plan's global batches (under DDP a last batch smaller than the
    number of processes is dropped: :func:`kept_mentions`) grouped by ``grad_accum``."""
    return math.ceil(math.ceil(kept_mentions(n_train, batch_size, world_size) / batch_size) / grad_accum)


class NonFiniteLoss(FloatingPointError, ValueError):
    """The training loss became NaN or infinite; the message names the epoch, the step and the checkpoint to go
    back to."""


class Trainer:
    def __init__(self, args, dist: D.DistInfo):
        self.args, self.dist = args, dist
        if not args.features or not args.output_dir:
            raise ValueError("--features and --output_dir are required")
        self.out = Path(args.output_dir)
        self.device = dist.device
        if args.threads:
            torch.set_num_threads(args.threads)
        set_determinism(args.deterministic)
        seed_everything(args.seed)
        self.data = load_mel_data(args.features, args.dataset)
        if len(self.data.splits["train"]) == 0:
            raise ValueError(f"{args.features}: the dataset has no train mentions")
        self.select = parse_select_by(args.select_by)
        if args.epochs > 0 and len(self.data.splits["dev"]) == 0:
            metric = "MRR" if self.select[1] == "mrr" else self.select[1]
            raise ValueError(f"{args.features}: the dataset has no dev mentions; the best model is chosen by dev "
                             f"{metric} (--select-by {args.select_by}). {dev_split_advice(self.data)}")
        if self.select[0] == "candidates" and self.data.candidates is None:
            print(f"warning: --select_by {args.select_by}: the dataset has no candidate lists; the best checkpoint "
                  "is chosen by full_kb:mrr instead (recorded in config.json and results.json)", file=sys.stderr)
            self.select = ("full_kb", "mrr")
        self.tfidf = None
        if args.negatives == "tfidf":
            self.tfidf = tfidf_table(self.data)
        if args.batch_size < dist.world_size:
            raise ValueError(f"--batch_size {args.batch_size} is smaller than the {dist.world_size} processes")
        self.cfg = config_from_args(args, self.data)
        self.model = DIM(self.cfg).to(self.device)
        on_device, feature_dtype = self._decide_on_device()
        self.source = FeatureSource(self.data, self.cfg.mention_views(), self.cfg.entity_views(), self.device,
                                    on_device=on_device, dtype=feature_dtype)
        self._check_flag_effects()
        self.amp_dtype, use_scaler = amp_setup(args.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.optimizer = make_optimizer(self.model, args.lr, args.weight_decay)
        self.steps_per_epoch = steps_per_epoch(len(self.data.splits["train"]), args.batch_size, args.grad_accum,
                                               dist.world_size)
        total = max(1, args.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(args.warmup_steps, total))
        self.eval_settings = settings_from_config(vars(args), self.device)
        self.train_model: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.train_model = torch.compile(self.train_model)
        # training state (checkpointed)
        self.epoch = 0            # completed epochs
        self.global_step = 0
        self.best_score = -1.0     # dev value of the --select_by metric
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.hard_table: np.ndarray | None = None
        self.tb = None

    def _check_flag_effects(self) -> None:
        """Flags that the data, the device or the model's sizes make ineffective: a warning naming each, or an
        error where an explicit flag cannot hold (``--residual`` with an output size other than the text's)."""
        a, given = self.args, set(getattr(self.args, "given", ()))
        cfg = self.cfg
        if a.residual and not cfg.is_residual:
            why = (f"--output-size {cfg.output_size} differs from the text feature size {cfg.text_dim}: the raw "
                   "features cannot be added to the outputs")
            if "residual" in given:
                raise ValueError(f"--residual contradicts {why}; drop --output-size or pass --no-residual")
            print(f"warning: no residual (zero-shot) start: {why} (--no-residual says so explicitly)", file=sys.stderr)
        device_only = {"num_workers": (a.num_workers > 0 and self.source.on_device,
                                       "the features are kept on the device (--data-on-device)"),
                       "pin_memory": (self.device.type != "cuda", "the device is not CUDA"),
                       "amp": (a.amp != "auto" and self.device.type != "cuda", "mixed precision runs on CUDA only")}
        for flag, (idle, why) in device_only.items():
            if flag in given and idle:
                print(f"warning: --{flag.replace('_', '-')} has no effect: {why}", file=sys.stderr)

    def _decide_on_device(self) -> tuple[bool, torch.dtype]:
        """Keep the features on the device (on a CPU: in RAM as tensors) when they fit: float32 when that fits in
        half of the free GPU memory (a quarter of the host's available memory), float16 when only that fits."""
        a = self.args
        if a.data_on_device == "no":
            return False, torch.float16
        probe = FeatureSource(self.data, self.cfg.mention_views(), self.cfg.entity_views())
        need16 = probe.nbytes()
        budget = available_memory(self.device) * (0.5 if self.device.type == "cuda" else 0.25)
        if 2 * need16 < budget:
            return True, torch.float32
        return (a.data_on_device == "yes" or need16 < budget), torch.float16

    # -- records -----------------------------------------------------------------------------
    def _ckpt_dir(self) -> Path:
        return self.out / CHECKPOINTS_DIR

    def run_config(self) -> dict[str, Any]:
        """What config.json records: every flag as resolved, the resolved paths and the model's configuration."""
        a = self.args
        conf = {k: v for k, v in vars(a).items() if k != "given"}
        conf["features"] = str(Path(a.features).resolve())
        conf["dataset_resolved"] = str(Path(self.data.dataset).resolve())
        conf["label"] = a.label or self.out.name
        conf["world_size"] = self.dist.world_size
        conf["model_config"] = asdict(self.cfg)
        conf["data_on_device"] = self.source.on_device
        conf["selection"] = ":".join(self.select)
        return conf

    def start_records(self) -> None:
        a, dist = self.args, self.dist
        last = self._ckpt_dir() / "last.pt"
        conf = self.run_config()
        if a.resume:
            if not last.is_file():
                raise FileNotFoundError(f"{last}: --resume given but there is no checkpoint (no epoch of this "
                                        "run finished; start it again with --overwrite)")
            check_resume_config(self.out, conf, a.force)
            self.load_state(load_checkpoint(last))
            if dist.is_main:
                truncate_metrics(self.out, self.epoch)
        elif dist.is_main:
            if self._ckpt_dir().exists() and any(self._ckpt_dir().iterdir()) and not a.overwrite:
                raise FileExistsError(f"{self.out}: run folder already has checkpoints; use --resume or --overwrite")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            for name in ("best.pt", "last.pt"):
                (self._ckpt_dir() / name).unlink(missing_ok=True)
        if dist.is_main:
            atomic_write_json(self.out / CONFIG_FILE, conf)
            env_name = ENV_FILE if not a.resume else f"env.resume{self.epoch}.json"
            atomic_write_json(self.out / env_name, environment(self.device, a.seed, dist.world_size))
            if a.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"))
        D.barrier(dist)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_config": asdict(self.cfg),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_states(self.device),
                "epoch": self.epoch, "global_step": self.global_step, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "stopped": self.stopped,
                "hard_table": None if self.hard_table is None else self.hard_table.astype(np.int32),
                "world_size": self.dist.world_size}

    def load_state(self, st: dict[str, Any]) -> None:
        if st["model_config"] != asdict(self.cfg):
            raise ValueError("checkpoint model configuration differs from the current flags; resume with the "
                             "same configuration (see config.json)")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        restore_rng(st["rng"], self.device)
        self.epoch, self.global_step = st["epoch"], st["global_step"]
        self.best_score = st["best_score"]
        self.best_epoch, self.bad_epochs = st["best_epoch"], st["bad_epochs"]
        self.stopped = st["stopped"]
        ht = st.get("hard_table")
        self.hard_table = None if ht is None else np.asarray(ht, dtype=np.int64)

    # -- training ----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def train_epoch(self) -> float:
        a, dist = self.args, self.dist
        torch.manual_seed(epoch_seed(a.seed, self.epoch, dist.rank))
        plan = make_epoch_plan(a.seed, self.epoch, self.data.splits["train"], self.data.gold,
                               self.data.num_entities, a.batch_size, a.num_negatives,
                               self.hard_table if a.hard_negatives else None, a.hard_negative_ratio,
                               min_batch=dist.world_size, tfidf=self.tfidf)
        ds = TrainBatches(plan, self.source, dist.rank, dist.world_size)
        pin = a.pin_memory and self.device.type == "cuda" and not self.source.on_device
        loader = make_loader(ds, 0, a.num_workers, pin)
        self.train_model.train()
        n_batches = len(ds)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # the first optimizer step whose loss is not finite (-1: none), kept on the device: no sync per step
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, total=n_batches, desc=f"epoch {self.epoch + 1}", disable=not dist.is_main,
                   leave=False, dynamic_ncols=True)
        for b, batch in enumerate(bar):
            group_start = (b // a.grad_accum) * a.grad_accum
            group_size = min(a.grad_accum, n_batches - group_start)
            last_in_group = b == group_start + group_size - 1
            batch = to_device(batch, self.device)
            lo, hi = batch["local"]
            sync = contextlib.nullcontext() if (last_in_group or not dist.enabled) else self._no_sync()
            with sync:
                with self._autocast():
                    q, e = self.train_model(batch["mention"], batch["entity"], normalize=a.loss in NORMALISED_LOSSES)
                raw = batch_loss_sum(a.loss, q.float(), e.float(), batch["entity_rows"], lo, hi, batch["global_n"],
                                     batch["num_negatives"], a.margin, a.temperature, a.npair_l2,
                                     a.npair_negatives == "batch")
                loss = raw * (dist.world_size / batch["global_n"] / group_size)
                self.scaler.scale(loss).backward()
            loss_sum += raw.detach().double()
            bad = ~torch.isfinite(raw.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, self.global_step + 1), first_bad)
            if last_in_group:
                self._step()
                if a.stop_after_steps and self.global_step >= a.stop_after_steps:
                    os._exit(17)    # simulated crash (tests): no cleanup, no checkpoint
        total = D.all_reduce_sum(float(loss_sum), dist)
        if not math.isfinite(total):
            step = int(first_bad)
            last = self._ckpt_dir() / "last.pt"
            raise NonFiniteLoss(
                f"{self.out}: the training loss is not finite at epoch {self.epoch + 1}, optimizer step "
                f"{step if step > 0 else '?'} (loss {total}); nothing of this epoch was saved. "
                + (f"{last} holds the last good epoch ({self.epoch}): lower --lr (or raise --max-grad-norm "
                   "clipping) and continue with --resume --force" if self.epoch > 0 else
                   "no epoch finished: lower --lr and start again with --overwrite"))
        return total / max(1, len(plan.order))

    def _no_sync(self):
        m = self.train_model
        m = getattr(m, "_orig_mod", m)
        return m.no_sync()

    def _step(self) -> None:
        a = self.args
        if a.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def evaluate(self, splits: list[str]) -> dict[str, dict[str, dict[str, float]]]:
        return evaluate_splits(self.model, self.data, self.source, splits, self.dist, self.eval_settings)

    def fit(self) -> dict[str, Any]:
        a, dist = self.args, self.dist
        self.start_records()
        if self.epoch == 0 and a.epochs > 0:
            self._untrained_as_first_best()
        while self.epoch < a.epochs and not self.stopped:
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch()
            train_s = time.time() - t0
            self.epoch += 1
            dev = self.evaluate(["dev"])
            dev_full = dev["full_kb"]["dev"]
            score = self._selected(dev)
            if a.hard_negatives:
                self.hard_table = hard_negative_table(self.model, self.data, self.source, self.data.splits["train"],
                                                      a.hard_negative_pool, dist, self.eval_settings)
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            else:
                self.bad_epochs += 1
                if a.patience and self.bad_epochs >= a.patience:
                    self.stopped = True
            if dist.is_main:
                rec = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss, "lr": lr,
                       "time_s": round(time.time() - t0, 3), "train_s": round(train_s, 3), "dev": dev_full}
                if "candidates" in dev:
                    rec["dev_candidates"] = dev["candidates"]["dev"]
                append_metrics(self.out / METRICS_FILE, rec)
                if improved:
                    save_checkpoint(self._ckpt_dir() / "best.pt",
                                    {"model": self.model.state_dict(), "model_config": asdict(self.cfg),
                                     "epoch": self.epoch, "dev": dev_full})
                save_checkpoint(self._ckpt_dir() / "last.pt", self.state())
                if self.tb is not None:
                    self.tb.add_scalar("train/loss", train_loss, self.epoch)
                    self.tb.add_scalar("train/lr", lr, self.epoch)
                    for k, v in dev_full.items():
                        if k != "n":
                            self.tb.add_scalar(f"dev/{k}", v, self.epoch)
                    self.tb.flush()     # the writer buffers up to 120 s; a stop or crash would lose those epochs
                print(f"epoch {self.epoch}: loss {train_loss:.4f}  dev MRR {100 * dev_full['mrr']:.2f}  "
                      f"H@1 {100 * dev_full['hits@1']:.2f}" + ("  *" if improved else ""), file=sys.stderr)
            D.barrier(dist)
            if a.stop_after_epochs and self.epoch >= a.stop_after_epochs and self.epoch < a.epochs:
                if self.tb is not None:
                    self.tb.close()
                return {"stopped_at_epoch": self.epoch}
        return self.finish()

    def _selected(self, dev: dict[str, Any]) -> float:
        """The dev value of the ``--select_by`` metric in an evaluation ``{protocol: {"dev": metrics}}``; minus
        infinity when any dev mention's gold score is NaN (a diverged model is never "best")."""
        m = dev[self.select[0]]["dev"]
        if any(dev[p]["dev"].get("nan", 0) for p in dev):
            print(f"warning: epoch {self.epoch}: NaN scores on dev; this checkpoint cannot be the best one",
                  file=sys.stderr)
            return -math.inf
        return m[self.select[1]]

    def _untrained_as_first_best(self) -> None:
        """The untrained model (the zero-shot start of the residual model) is the first candidate for "best", so
        a run whose training only hurts dev MRR still returns the zero-shot model rather than a worse one."""
        dev = self.evaluate(["dev"])
        dev_full = dev["full_kb"]["dev"]
        self.best_score, self.best_epoch = self._selected(dev), 0
        if self.dist.is_main:
            save_checkpoint(self._ckpt_dir() / "best.pt", {"model": self.model.state_dict(),
                                                           "model_config": asdict(self.cfg), "epoch": 0,
                                                           "dev": dev_full})
            print(f"epoch 0 (untrained): dev MRR {100 * dev_full['mrr']:.2f}  H@1 {100 * dev_full['hits@1']:.2f}",
                  file=sys.stderr)
        D.barrier(self.dist)

    def finish(self) -> dict[str, Any]:
        a, dist = self.args, self.dist
        best = self._ckpt_dir() / "best.pt"
        if dist.is_main and not best.is_file():       # --epochs 0: the untrained (zero-shot) model
            save_checkpoint(best, {"model": self.model.state_dict(), "model_config": asdict(self.cfg),
                                   "epoch": 0, "dev": None})
        D.barrier(dist)
        self.model.load_state_dict(load_checkpoint(best)["model"])
        emb = encode_entities(self.model, self.source, self.device, self.eval_settings)
        counts = evaluate_counts(self.model, self.data, self.source, ["dev", "test"], dist, self.eval_settings,
                                 top_k=PREDICTION_TOP_K, entity_emb=emb)
        results = {"dataset": self.data.dataset_name, "label": a.label or self.out.name, "seed": a.seed,
                   "best_epoch": self.best_epoch, "epochs_run": self.epoch, "selection": ":".join(self.select),
                   **results_block(counts, self.data, self.eval_settings)}
        if dist.is_main:
            save_kb_embeddings(self.out, emb, best, self.data, self.cfg.entity_views(), self.eval_settings)
            write_predictions(self.out, self.model, self.data, self.source, counts, self.eval_settings, self.device,
                              emb, checkpoint={"name": "best", "epoch": self.best_epoch})
            atomic_write_json(self.out / RESULTS_FILE, results)
            if self.tb is not None:
                self.tb.close()
        D.barrier(dist)
        return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist = D.setup(args.device)
    try:
        return Trainer(args, dist).fit()
    finally:
        D.cleanup(dist)


def command(argv: list[str] | None = None) -> int:
    """``python -m nel_model.train``: train, then print the test metrics."""
    out = main(argv)
    print(json.dumps(out.get("protocols", out), indent=1))
    return 0
