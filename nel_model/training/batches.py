"""Epoch plans and training batches: the order, negatives and global batches of each epoch.

Reproducibility: an epoch's mention order and sampled negatives are a pure function of ``(seed, epoch)`` (and the
previous epoch's hard-negative table), so a resumed run and a multi-process run see exactly the same global batches.
Under DDP each process takes its contiguous slice of every global batch. A DataLoader item is a *batch index*: the
dataset gathers all rows of that batch at once through :class:`nel_model.data.FeatureSource`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nel_model.data import FeatureSource
from nel_model.training.tfidf_negatives import TfidfNegatives


def sample_random_negatives(rng: np.random.Generator, gold: np.ndarray, n: int, num_entities: int) -> np.ndarray:
    """``[len(gold), n]`` uniformly random entity rows, never the gold row (vectorised)."""
    if num_entities < 2:
        raise ValueError("negative sampling needs at least 2 entities in the KB")
    r = rng.integers(0, num_entities - 1, size=(len(gold), n))
    return r + (r >= gold[:, None])


@dataclass
class EpochPlan:
    """Mention order and negatives of one epoch, cut into global batches."""

    order: np.ndarray          # [N] mention rows
    negatives: np.ndarray      # [N, n] entity rows
    gold: np.ndarray           # [N] entity rows
    batch_size: int

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def batch(self, b: int) -> slice:
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, len(self.order)))


def kept_mentions(n_train: int, batch_size: int, min_batch: int = 1) -> int:
    """How many training mentions an epoch plan keeps: all, unless the last global batch is smaller than
    ``min_batch`` (the number of DDP processes): then that batch is dropped so every process has a mention."""
    tail = n_train % batch_size
    return n_train - tail if tail and tail < min_batch else n_train


def make_epoch_plan(seed: int, epoch: int, train_rows: np.ndarray, gold_all: np.ndarray, num_entities: int,
                    batch_size: int, num_negatives: int, hard_table: np.ndarray | None = None,
                    hard_ratio: float = 0.5, min_batch: int = 1, tfidf: TfidfNegatives | None = None) -> EpochPlan:
    """Shuffle and sample negatives from ``np.random.default_rng([seed, epoch])``.

    Negatives are uniformly random KB entities, or DIM's TF-IDF negatives with ``tfidf``. ``hard_table`` is
    ``[M, k]`` (indexed by mention row; ``-1`` = none) of each mention's top-ranked wrong entities; each negative is
    drawn from it with probability ``hard_ratio``. A last global batch smaller than ``min_batch`` (the number of DDP
    processes) is dropped so every process has at least one mention.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = train_rows[rng.permutation(len(train_rows))]
    order = order[: kept_mentions(len(order), batch_size, min_batch)]
    gold = gold_all[order]
    if tfidf is not None:
        negs = tfidf.sample(rng, gold, num_negatives)
    else:
        negs = sample_random_negatives(rng, gold, num_negatives, num_entities)
    if hard_table is not None and num_negatives > 0:
        table = hard_table[order]                                       # [N, k]
        k = table.shape[1]
        pick = table[np.arange(len(order))[:, None], rng.integers(0, k, size=negs.shape)]
        use = (rng.random(negs.shape) < hard_ratio) & (pick >= 0) & (pick != gold[:, None])
        negs = np.where(use, pick, negs)
    return EpochPlan(order=order, negatives=negs, gold=gold, batch_size=batch_size)


class TrainBatches(torch.utils.data.Dataset):
    """Item ``b`` = this process's share of global batch ``b`` of an :class:`EpochPlan`.

    Returns ``{"mention": views of the local mentions, "entity": views of all global-batch entities
    (gold rows first, then negatives), "local": slice bounds, "global_n", "num_negatives"}``. Every process encodes
    all entities of the global batch (cheap vectors), so in-batch negatives need no cross-process gather. With a
    device-resident source the plan is moved to the device once per epoch and every batch is gathered there from
    index tensors alone.
    """

    def __init__(self, plan: EpochPlan, source: FeatureSource, rank: int = 0, world_size: int = 1):
        self.plan, self.source, self.rank, self.world = plan, source, rank, world_size
        self._device_plan = None
        if source.on_device:
            as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(source.device)  # noqa: E731
            self._device_plan = (as_t(plan.order), as_t(plan.gold), as_t(plan.negatives))

    def __len__(self) -> int:
        return self.plan.num_batches

    def local_bounds(self, n: int) -> tuple[int, int]:
        sizes = [len(a) for a in np.array_split(np.arange(n), self.world)]
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def __getitem__(self, b: int) -> dict[str, Any]:
        sl = self.plan.batch(b)
        order, gold, negatives = self._device_plan or (self.plan.order, self.plan.gold, self.plan.negatives)
        rows, gold, negs = order[sl], gold[sl], negatives[sl]
        lo, hi = self.local_bounds(len(rows))
        if isinstance(rows, torch.Tensor):
            ent_rows = torch.cat([gold, negs.reshape(-1)])
        else:
            ent_rows = torch.from_numpy(np.concatenate([gold, negs.reshape(-1)]))
        return {"mention": self.source.mentions(rows[lo:hi]), "entity": self.source.entities(ent_rows),
                "entity_rows": ent_rows, "local": (lo, hi), "global_n": len(rows), "num_negatives": negs.shape[1]}


def make_loader(dataset: TrainBatches, start_batch: int, num_workers: int, pin_memory: bool):
    """DataLoader over batch indices ``start_batch..`` (``batch_size=None``: items are already batches)."""
    if dataset.source.on_device:
        return (dataset[b] for b in range(start_batch, len(dataset)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(range(start_batch, len(dataset))),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False)
