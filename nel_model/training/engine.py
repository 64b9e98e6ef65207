"""The training engine: one run lifecycle for every model the toolkit trains (in the manner of open_clip's training:
an engine, and a task that brings the model).

The engine owns what every run does the same way: the process setup (threads, deterministic algorithms, seeds), the
run folder (resume or overwrite, ``config.json``, ``env.json``, atomic ``checkpoints/{best,last}.pt``,
``metrics.jsonl`` appended per epoch and cut back on resume, TensorBoard), the optimiser (AdamW with linear warm-up
and decay), mixed precision, ``torch.compile``, DistributedDataParallel, gradient accumulation and clipping, the
epoch loop with the NaN guard, dev evaluation after every epoch, early stopping (``--patience``) and best-model
selection (``--select-by``; the untrained model is the epoch-0 candidate, so a run never returns a model worse on dev
than where it started), ``--stop-after-epochs`` and the end of the run. A :class:`Task` brings the rest: its model,
the batches of an epoch, the forward pass and the loss, the dev metrics, what else its checkpoint holds and the final
evaluation. ``nel_model.training.loop.RetrieverTask`` (DIM, ``dim-mel train``) and
``nel_model.rerank.train_feature.FeatureRerankTask`` (``dim-mel rerank``) are the two tasks today; a new model is a
new task (docs/ARCHITECTURE.md, "Where to add").

Reproducibility and resume: an epoch's batches are a pure function of ``(seed, epoch)`` (the task's contract) and the
torch RNG (dropout) is re-seeded from ``(seed, epoch, rank)`` at the start of every epoch, so an epoch's computation
depends only on the state at its start. ``checkpoints/last.pt`` (written atomically after every epoch) holds that
state; ``--resume`` restarts at the first unfinished epoch (after a mid-epoch kill, the interrupted epoch is redone
from its start) and finishes with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from data_process.core.durable_io import atomic_write_json
from nel_model import distributed as D
from nel_model.config import TaskConfig, parse_select_by
from nel_model.runs import (CHECKPOINTS_DIR, CONFIG_FILE, ENV_FILE, METRICS_FILE, append_metrics, environment,
                            load_checkpoint, save_checkpoint, truncate_metrics)
from nel_model.training.batches import kept_mentions


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


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps of one epoch: the epoch's global batches (under DDP a last batch smaller than the number of
    processes is dropped: :func:`~nel_model.training.batches.kept_mentions`) grouped by ``grad_accum``."""
    return math.ceil(math.ceil(kept_mentions(n_train, batch_size, world_size) / batch_size) / grad_accum)


class NonFiniteLoss(FloatingPointError, ValueError):
    """The training loss became NaN or infinite; the message names the epoch, the step and the checkpoint to go
    back to."""


@dataclass(frozen=True)
class Epoch:
    """One epoch's training batches for this process: ``batches`` (each what :meth:`Task.forward` takes),
    ``num_batches`` of them, over ``num_examples`` training examples (of every process: the mean loss's
    denominator)."""

    batches: Iterable[Any]
    num_batches: int
    num_examples: int


@dataclass(frozen=True)
class Fitted:
    """How the fit ended, for :meth:`Task.finish` (the best checkpoint is loaded into the task's model)."""

    out: Path
    label: str
    seed: int
    best_epoch: int
    epochs_run: int
    selection: str


class Task(Protocol):
    """What a model brings to the :class:`Engine` (it is built after the engine has seeded the process). A task
    class may subclass this one to inherit the optional hooks' defaults (:meth:`end_of_epoch`, :meth:`state`,
    :meth:`load_state`)."""

    model: torch.nn.Module          # the module trained and checkpointed (the engine wraps it for DDP / compile)
    distributed: bool               # whether it trains under torchrun (DDP)
    epoch0: str                     # how the untrained model is named in the log ("untrained")

    def model_config(self) -> dict[str, Any]:
        """The model's configuration (checkpointed beside its weights; a resume must match it)."""
        ...

    def resolved(self) -> dict[str, Any]:
        """What ``config.json`` records beside the configuration: the resolved paths, the model's configuration."""
        ...

    def has_candidates(self) -> bool:
        """Whether dev has candidate lists (else a ``candidates:`` selection falls back to ``full_kb:mrr``)."""
        ...

    def train_size(self) -> int:
        """Training examples of an epoch (before a DDP run drops a last batch too small to share)."""
        ...

    def epoch(self, epoch: int) -> Epoch:
        """The training batches of epoch ``epoch`` (0-based): a pure function of the seed, the epoch and the
        task's state (the engine has re-seeded torch's RNG)."""
        ...

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """The model's outputs on one batch (under the engine's autocast)."""
        ...

    def loss(self, outputs: Any, batch: Any, accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss to backpropagate, summed loss of the batch)``: the first is scaled so that the gradients of an
        optimizer step (``accumulation`` micro-batches, every process) average over its examples."""
        ...

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        """Dev metrics of the current model, ``{protocol: {metric: value}}`` (``full_kb``, or at least the protocol
        ``--select-by`` names)."""
        ...

    def finish(self, fitted: Fitted) -> dict[str, Any]:
        """The final evaluation of the best model and the run's records (``results.json`` ...); returns the
        results."""
        ...

    def end_of_epoch(self) -> None:
        """Work between epochs on the trained model (the retriever's hard-negative table); none by default."""

    def optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Callable[[int], float]] | None:
        """The task's own optimiser and learning-rate factor per step (MIMIC: the official AdamW settings, a
        constant rate); ``None`` (the default): the engine's AdamW with linear warm-up and decay."""
        return None

    def state(self) -> dict[str, Any]:
        """What else ``last.pt`` holds for an exact resume; nothing by default."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint."""


class Engine:
    """Runs a :class:`Task` under a :class:`~nel_model.config.TaskConfig` (module docstring)."""

    def __init__(self, cfg: TaskConfig, make_task: Callable[[Any, D.DistInfo], Task], dist: D.DistInfo):
        r, o = cfg.run, cfg.optim
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        if not r.output_dir:
            raise ValueError("--output-dir is required")
        self.out = Path(r.output_dir)
        if r.threads:
            torch.set_num_threads(r.threads)
        set_determinism(r.deterministic)
        seed_everything(r.seed)
        self.task = make_task(cfg, dist)
        if dist.enabled and not self.task.distributed:
            raise ValueError(f"{cfg.PROG} runs in one process (no torchrun)")
        if o.batch_size < dist.world_size:
            raise ValueError(f"--batch_size {o.batch_size} is smaller than the {dist.world_size} processes")
        self.select = parse_select_by(o.select_by)
        if self.select[0] == "candidates" and not self.task.has_candidates():
            print(f"warning: --select_by {o.select_by}: the dataset has no candidate lists; the best checkpoint "
                  "is chosen by full_kb:mrr instead (recorded in config.json and results.json)", file=sys.stderr)
            self.select = ("full_kb", "mrr")
        self.model = self.task.model
        self.amp_dtype, use_scaler = amp_setup(o.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.steps_per_epoch = steps_per_epoch(self.task.train_size(), o.batch_size, o.grad_accum, dist.world_size)
        total = max(1, o.epochs * self.steps_per_epoch)
        own = self.task.optimizer(total)
        self.optimizer, schedule = own if own is not None else (make_optimizer(self.model, o.lr, o.weight_decay),
                                                                linear_schedule(o.warmup_steps, total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.train_model: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if o.compile:
            self.train_model = torch.compile(self.train_model)
        # training state (checkpointed)
        self.epoch = 0             # completed epochs
        self.global_step = 0
        self.best_score = -math.inf   # dev value of the --select-by metric
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.tb = None

    # -- records -----------------------------------------------------------------------------
    def _ckpt(self, name: str = "") -> Path:
        return self.out / CHECKPOINTS_DIR / name

    @property
    def label(self) -> str:
        return self.cfg.run.label or self.out.name

    def record(self) -> dict[str, Any]:
        """What config.json holds: the typed configuration and what the run resolved."""
        return self.cfg.record({"label": self.label, "world_size": self.dist.world_size,
                                "selection": ":".join(self.select), **self.task.resolved()})

    def start_records(self) -> None:
        r, dist = self.cfg.run, self.dist
        last = self._ckpt("last.pt")
        record = self.record()
        if r.resume:
            if not last.is_file():
                raise FileNotFoundError(f"{last}: --resume given but there is no checkpoint (no epoch of this "
                                        "run finished; start it again with --overwrite)")
            self.cfg.check_resume(self.out, r.force)
            self.load_state(load_checkpoint(last))
            if dist.is_main:
                truncate_metrics(self.out, self.epoch)
        elif dist.is_main:
            if self._ckpt().exists() and any(self._ckpt().iterdir()) and not r.overwrite:
                raise FileExistsError(f"{self.out}: run folder already has checkpoints; use --resume or --overwrite")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            for name in ("best.pt", "last.pt"):
                self._ckpt(name).unlink(missing_ok=True)
        if dist.is_main:
            atomic_write_json(self.out / CONFIG_FILE, record)
            env_name = ENV_FILE if not r.resume else f"env.resume{self.epoch}.json"
            atomic_write_json(self.out / env_name, environment(self.device, r.seed, dist.world_size))
            if r.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"))
        D.barrier(dist)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_config": self.task.model_config(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_states(self.device),
                "epoch": self.epoch, "global_step": self.global_step, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "stopped": self.stopped,
                "world_size": self.dist.world_size, **self.task.state()}

    def load_state(self, st: dict[str, Any]) -> None:
        if st["model_config"] != self.task.model_config():
            raise ValueError(f"{self._ckpt('last.pt')}: the checkpoint's model configuration differs from the "
                             "current flags; resume with the run's configuration (config.json)")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if "scaler" in st:                      # older re-ranker checkpoints: no scaler (it never scaled)
            self.scaler.load_state_dict(st["scaler"])
        restore_rng(st["rng"], self.device)
        self.epoch = st["epoch"]
        self.global_step = st.get("global_step", st.get("step"))     # older re-ranker checkpoints: "step"
        self.best_score = st["best_score"]
        self.best_epoch, self.bad_epochs = st["best_epoch"], st["bad_epochs"]
        self.stopped = st["stopped"]
        self.task.load_state(st)

    def _save_best(self, dev: dict[str, float] | None) -> None:
        save_checkpoint(self._ckpt("best.pt"), {"model": self.model.state_dict(),
                                                "model_config": self.task.model_config(), "epoch": self.epoch,
                                                "dev": dev})

    # -- training ----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _no_sync(self):
        m = self.train_model
        m = getattr(m, "_orig_mod", m)
        return m.no_sync()

    def train_epoch(self) -> float:
        """One epoch of optimizer steps; the mean training loss over its examples."""
        o, dist = self.cfg.optim, self.dist
        torch.manual_seed(epoch_seed(self.cfg.run.seed, self.epoch, dist.rank))
        ep = self.task.epoch(self.epoch)
        self.train_model.train()
        n_batches, accum = ep.num_batches, o.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # the first optimizer step whose loss is not finite (-1: none), kept on the device: no sync per step
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(ep.batches, total=n_batches, desc=f"epoch {self.epoch + 1}", disable=not dist.is_main,
                   leave=False, dynamic_ncols=True)
        for b, batch in enumerate(bar):
            group_start = (b // accum) * accum
            group_size = min(accum, n_batches - group_start)
            last_in_group = b == group_start + group_size - 1
            sync = contextlib.nullcontext() if (last_in_group or not dist.enabled) else self._no_sync()
            with sync:
                with self._autocast():
                    outputs = self.task.forward(self.train_model, batch)
                loss, raw = self.task.loss(outputs, batch, group_size)
                self.scaler.scale(loss).backward()
            loss_sum += raw.detach().double()
            bad = ~torch.isfinite(raw.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, self.global_step + 1), first_bad)
            if last_in_group:
                self._step()
                if self.cfg.run.stop_after_steps and self.global_step >= self.cfg.run.stop_after_steps:
                    os._exit(17)    # simulated crash (tests): no cleanup, no checkpoint
        total = D.all_reduce_sum(float(loss_sum), dist)
        if not math.isfinite(total):
            step = int(first_bad)
            last = self._ckpt("last.pt")
            raise NonFiniteLoss(
                f"{self.out}: the training loss is not finite at epoch {self.epoch + 1}, optimizer step "
                f"{step if step > 0 else '?'} (loss {total}); nothing of this epoch was saved. "
                + (f"{last} holds the last good epoch ({self.epoch}): lower --lr (or raise --max-grad-norm "
                   "clipping) and continue with --resume --force" if self.epoch > 0 else
                   "no epoch finished: lower --lr and start again with --overwrite"))
        return total / max(1, ep.num_examples)

    def _step(self) -> None:
        if self.cfg.optim.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _selected(self, dev: dict[str, dict[str, float]]) -> float:
        """The dev value of the ``--select-by`` metric in ``{protocol: metrics}``; minus infinity when any dev
        mention's gold score is NaN (a diverged model is never "best")."""
        if any(m.get("nan", 0) for m in dev.values()):
            print(f"warning: epoch {self.epoch}: NaN scores on dev; this checkpoint cannot be the best one",
                  file=sys.stderr)
            return -math.inf
        return dev[self.select[0]][self.select[1]]

    def _headline(self, dev: dict[str, dict[str, float]]) -> dict[str, float]:
        """The dev metrics the log shows and ``best.pt`` records: the whole KB's, or those of the selected protocol
        for a task that evaluates dev on it alone (MIMIC's ``--dev-protocol candidates``)."""
        return dev["full_kb"] if "full_kb" in dev else dev[self.select[0]]

    def _untrained_as_first_best(self) -> None:
        """The untrained model (e.g. the retriever's zero-shot start) is the first candidate for "best", so a run
        whose training only hurts dev returns the model it started from rather than a worse one."""
        dev = self.task.evaluate_dev()
        self.best_score, self.best_epoch = self._selected(dev), 0
        if self.dist.is_main:
            head = self._headline(dev)
            self._save_best(head)
            print(f"epoch 0 ({self.task.epoch0}): dev MRR {100 * head['mrr']:.2f}  "
                  f"H@1 {100 * head['hits@1']:.2f}", file=sys.stderr)
        D.barrier(self.dist)

    def fit(self) -> dict[str, Any]:
        """Train (or resume) to the end, or to ``--stop-after-epochs``; the results (or ``{"stopped_at_epoch"}``)."""
        o, dist = self.cfg.optim, self.dist
        self.start_records()
        if self.epoch == 0 and o.epochs > 0:
            self._untrained_as_first_best()
        while self.epoch < o.epochs and not self.stopped:
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch()
            train_s = time.time() - t0
            self.epoch += 1
            dev = self.task.evaluate_dev()
            score = self._selected(dev)
            self.task.end_of_epoch()
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            else:
                self.bad_epochs += 1
                if o.patience and self.bad_epochs >= o.patience:
                    self.stopped = True
            if dist.is_main:
                self._log_epoch(train_loss, lr, dev, time.time() - t0, train_s, improved)
            D.barrier(dist)
            stop = self.cfg.run.stop_after_epochs
            if stop and self.epoch >= stop and self.epoch < o.epochs:
                if self.tb is not None:
                    self.tb.close()
                return {"stopped_at_epoch": self.epoch}
        return self.finish()

    def _log_epoch(self, train_loss: float, lr: float, dev: dict[str, dict[str, float]], time_s: float,
                   train_s: float, improved: bool) -> None:
        full = self._headline(dev)
        rec = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss, "lr": lr,
               "time_s": round(time_s, 3), "train_s": round(train_s, 3), "dev": full}
        if "full_kb" not in dev:
            rec["dev_protocol"] = self.select[0]
        if "candidates" in dev:
            rec["dev_candidates"] = dev["candidates"]
        append_metrics(self.out / METRICS_FILE, rec)
        if improved:
            self._save_best(full)
        save_checkpoint(self._ckpt("last.pt"), self.state())
        if self.tb is not None:
            self.tb.add_scalar("train/loss", train_loss, self.epoch)
            self.tb.add_scalar("train/lr", lr, self.epoch)
            for k, v in full.items():
                if k != "n":
                    self.tb.add_scalar(f"dev/{k}", v, self.epoch)
            self.tb.flush()     # the writer buffers up to 120 s; a stop or crash would lose those epochs
        print(f"epoch {self.epoch}: loss {train_loss:.4f}  dev MRR {100 * full['mrr']:.2f}  "
              f"H@1 {100 * full['hits@1']:.2f}" + ("  *" if improved else ""), file=sys.stderr)

    def finish(self) -> dict[str, Any]:
        """The best checkpoint (with ``--epochs 0``: the untrained model) loaded, then the task's final evaluation
        and records."""
        dist = self.dist
        best = self._ckpt("best.pt")
        if dist.is_main and not best.is_file():
            self._save_best(None)
        D.barrier(dist)
        self.model.load_state_dict(load_checkpoint(best)["model"])
        results = self.task.finish(Fitted(self.out, self.label, self.cfg.run.seed, self.best_epoch, self.epoch,
                                          ":".join(self.select)))
        if dist.is_main and self.tb is not None:
            self.tb.close()
        D.barrier(dist)
        return results


def fit(cfg: TaskConfig, make_task: Callable[[Any, D.DistInfo], Task]) -> dict[str, Any]:
    """Run a task to its end in this process (joining a torchrun process group when launched by one)."""
    dist = D.setup(cfg.run.device)
    try:
        return Engine(cfg, make_task, dist).fit()
    finally:
        D.cleanup(dist)
