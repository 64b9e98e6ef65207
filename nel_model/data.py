"""Feature-cache data for the DIM model: memory-mapped views, gold rows, splits, candidates, batch plans.

Everything in the hot loop is whole-batch numpy/torch fancy indexing: a DataLoader item is a *batch index*,
the dataset gathers all rows of that batch at once (no per-sample Python work, no per-sample collate).

Reproducibility: an epoch's mention order and sampled negatives are a pure function of ``(seed, epoch)`` (and the
previous epoch's hard-negative table), so a resumed run and a multi-process run see exactly the same global batches.
Under DDP each process takes its contiguous slice of every global batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from data_process.feature_store import FeatureStore
from data_process.records import SPLITS, read_mentions

# (side.view) -> batch key; masks get "<key>_mask".
MENTION_VIEWS = ("mention", "sentence", "image", "regions", "profile")
ENTITY_VIEWS = ("desc", "image", "profile")
DEFAULT_PROFILE_ROWS = ("enrichment", "caption")


class _LazyArrays:
    """Memory-mapped views of a feature folder, opened on first use (and again in each DataLoader worker:
    pickling drops the maps instead of copying gigabytes of features into every worker)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, side: str, view: str) -> tuple[np.ndarray, np.ndarray | None]:
        key = f"{side}.{view}"
        if key not in self._arrays:
            v = FeatureStore(self.root).load(side, view, mmap=True)
            self._arrays[key] = v.data
            if v.mask is not None:
                self._arrays[key + ".mask"] = v.mask
        return self._arrays[key], self._arrays.get(key + ".mask")

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "_arrays": {}}


@dataclass
class MELData:
    """A feature cache joined with its dataset's labels.

    ``gold[m]`` is the entity row of mention row ``m``; ``splits[name]`` the mention rows of a split;
    ``candidates`` is ``[M, C]`` entity rows padded with ``-1`` (``None`` when the dataset has no candidates).
    ``mention_views`` / ``entity_views`` name the views present in the cache.
    """

    root: Path
    meta: dict[str, Any]
    mention_ids: list[str]
    entity_ids: list[str]
    gold: np.ndarray
    splits: dict[str, np.ndarray]
    candidates: np.ndarray | None
    mention_views: tuple[str, ...]
    entity_views: tuple[str, ...]
    text_dim: int
    image_dim: int
    profile_rows: tuple[str, ...]
    arrays: _LazyArrays = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def num_entities(self) -> int:
        return len(self.entity_ids)

    def view(self, side: str, view: str) -> tuple[np.ndarray, np.ndarray | None]:
        return self.arrays.get(side, view)


def load_mel_data(features: str | Path, dataset: str | Path | None = None) -> MELData:
    """Open a feature folder and join it with the unified dataset (``dataset`` or ``meta.json['dataset']``)."""
    root = Path(features)
    store = FeatureStore(root)
    if not store.meta_path.exists():
        raise FileNotFoundError(f"{store.meta_path}: not a feature folder (run python -m data_process.features)")
    meta = store.meta()
    for side, view in (("mention", "mention"), ("entity", "desc")):
        if not store.has(side, view):
            raise FileNotFoundError(f"{root}: required view {side}.{view} is missing from the feature cache")
    ds = dataset or meta.get("dataset")
    if not ds:
        raise ValueError(f"{root}/meta.json names no dataset; pass --dataset DIR")
    ds = Path(ds)
    if not ds.is_absolute() and not ds.exists() and (root / ds).exists():
        ds = root / ds
    mention_ids = store.ids("mention")
    entity_ids = store.ids("entity")
    ent_row = {eid: i for i, eid in enumerate(entity_ids)}
    if len(ent_row) != len(entity_ids):
        raise ValueError(f"{root}/entity_ids.json: duplicate entity ids")
    records = {m.id: m for m in read_mentions(ds / "mentions.jsonl")}
    gold = np.empty(len(mention_ids), dtype=np.int64)
    split_of = np.empty(len(mention_ids), dtype=object)
    cand_lists: list[list[int]] = []
    any_cands = False
    for i, mid in enumerate(mention_ids):
        m = records.get(mid)
        if m is None:
            raise ValueError(f"{root}/mention_ids.json: mention {mid!r} is not in {ds}/mentions.jsonl "
                             "(stale feature cache? re-run the feature step)")
        if m.gold_id not in ent_row:
            raise ValueError(f"{ds}/mentions.jsonl: mention {mid!r} has gold entity {m.gold_id!r} "
                             f"that is not in {root}/entity_ids.json")
        gold[i] = ent_row[m.gold_id]
        split_of[i] = m.split
        if m.candidates is not None:
            any_cands = True
            missing = [c for c in m.candidates if c not in ent_row]
            if missing:
                raise ValueError(f"{ds}/mentions.jsonl: mention {mid!r} candidate {missing[0]!r} not in the KB")
        cand_lists.append([ent_row[c] for c in (m.candidates or ())])
    candidates = None
    if any_cands:
        width = max(1, max(len(c) for c in cand_lists))
        candidates = np.full((len(mention_ids), width), -1, dtype=np.int64)
        for i, c in enumerate(cand_lists):
            candidates[i, : len(c)] = c
    splits = {s: np.flatnonzero(split_of == s).astype(np.int64) for s in SPLITS}
    mviews = tuple(v for v in MENTION_VIEWS if store.has("mention", v))
    eviews = tuple(v for v in ENTITY_VIEWS if store.has("entity", v))
    arrays = _LazyArrays(root)
    text_dim = int(meta.get("text_dim") or arrays.get("mention", "mention")[0].shape[-1])
    image_dim = int(meta.get("image_dim") or 0)
    if not image_dim:
        for side, v in (("mention", "image"), ("mention", "regions"), ("entity", "image")):
            if (v in (mviews if side == "mention" else eviews)):
                image_dim = int(arrays.get(side, v)[0].shape[-1])
                break
    rows = meta.get("views", {}).get("mention.profile", {}).get("rows", list(DEFAULT_PROFILE_ROWS))
    return MELData(root=root, meta=meta, mention_ids=mention_ids, entity_ids=entity_ids, gold=gold, splits=splits,
                   candidates=candidates, mention_views=mviews, entity_views=eviews, text_dim=text_dim,
                   image_dim=image_dim, profile_rows=tuple(rows), arrays=arrays)


# ---------------------------------------------------------------------------------------------
# Gathering whole batches


class FeatureSource:
    """Gathers batches of mention/entity views as torch tensors, from the memory-mapped cache (host) or from
    copies of the needed views kept on ``device`` (``on_device=True``)."""

    def __init__(self, data: MELData, mention_views: Iterable[str], entity_views: Iterable[str],
                 device: torch.device | None = None, on_device: bool = False):
        self.data = data
        self.mention_views = tuple(v for v in mention_views if v in data.mention_views)
        self.entity_views = tuple(v for v in entity_views if v in data.entity_views)
        self.on_device = on_device
        self.device = device
        self._tensors: dict[str, torch.Tensor] = {}
        if on_device:
            for side, views in (("mention", self.mention_views), ("entity", self.entity_views)):
                for v in views:
                    arr, mask = data.view(side, v)
                    self._tensors[f"{side}.{v}"] = torch.from_numpy(np.array(arr)).to(device)
                    if mask is not None:
                        self._tensors[f"{side}.{v}.mask"] = torch.from_numpy(np.array(mask)).to(device)

    def nbytes(self) -> int:
        total = 0
        for side, views in (("mention", self.mention_views), ("entity", self.entity_views)):
            for v in views:
                arr, mask = self.data.view(side, v)
                total += arr.nbytes + (mask.nbytes if mask is not None else 0)
        return total

    def __getstate__(self) -> dict[str, Any]:
        if self.on_device:
            raise RuntimeError("a device-resident FeatureSource cannot be sent to DataLoader workers")
        return self.__dict__

    def _gather(self, side: str, views: tuple[str, ...], rows: np.ndarray) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.on_device:
            idx = torch.as_tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
            for v in views:
                out[v] = self._tensors[f"{side}.{v}"].index_select(0, idx)
                mk = self._tensors.get(f"{side}.{v}.mask")
                if mk is not None:
                    out[v + "_mask"] = mk.index_select(0, idx)
            return out
        # Sorted unique reads are kinder to memory maps; scatter back to batch order afterwards.
        uniq, inverse = np.unique(rows, return_inverse=True)
        for v in views:
            arr, mask = self.data.view(side, v)
            out[v] = torch.from_numpy(np.ascontiguousarray(arr[uniq][inverse]))
            if mask is not None:
                out[v + "_mask"] = torch.from_numpy(np.ascontiguousarray(mask[uniq][inverse]))
        return out

    def mentions(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self._gather("mention", self.mention_views, np.asarray(rows, dtype=np.int64))

    def entities(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self._gather("entity", self.entity_views, np.asarray(rows, dtype=np.int64))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensors (nested one level) to ``device``; non_blocking pairs with pinned host memory."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Epoch plans (order + negatives), a pure function of (seed, epoch, hard-negative table)


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


def make_epoch_plan(seed: int, epoch: int, train_rows: np.ndarray, gold_all: np.ndarray, num_entities: int,
                    batch_size: int, num_negatives: int, hard_table: np.ndarray | None = None,
                    hard_ratio: float = 0.5, min_batch: int = 1) -> EpochPlan:
    """Shuffle and sample negatives from ``np.random.default_rng([seed, epoch])``.

    ``hard_table`` is ``[M, k]`` (indexed by mention row; ``-1`` = none) of each mention's top-ranked wrong entities;
    each negative is drawn from it with probability ``hard_ratio``. A last global batch smaller than ``min_batch``
    (the number of DDP processes) is dropped so every process has at least one mention.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = train_rows[rng.permutation(len(train_rows))]
    tail = len(order) % batch_size
    if tail and tail < min_batch:
        order = order[: len(order) - tail]
    gold = gold_all[order]
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
    all entities of the global batch (cheap vectors), so in-batch negatives need no cross-process gather.
    """

    def __init__(self, plan: EpochPlan, source: FeatureSource, rank: int = 0, world_size: int = 1):
        self.plan, self.source, self.rank, self.world = plan, source, rank, world_size

    def __len__(self) -> int:
        return self.plan.num_batches

    def local_bounds(self, n: int) -> tuple[int, int]:
        sizes = [len(a) for a in np.array_split(np.arange(n), self.world)]
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def __getitem__(self, b: int) -> dict[str, Any]:
        sl = self.plan.batch(b)
        rows, gold, negs = self.plan.order[sl], self.plan.gold[sl], self.plan.negatives[sl]
        lo, hi = self.local_bounds(len(rows))
        ent_rows = np.concatenate([gold, negs.reshape(-1)])
        return {"mention": self.source.mentions(rows[lo:hi]), "entity": self.source.entities(ent_rows),
                "entity_rows": torch.from_numpy(ent_rows), "local": (lo, hi), "global_n": len(rows),
                "num_negatives": negs.shape[1]}


def make_loader(dataset: TrainBatches, start_batch: int, num_workers: int, pin_memory: bool):
    """DataLoader over batch indices ``start_batch..`` (``batch_size=None``: items are already batches)."""
    if dataset.source.on_device:
        return (dataset[b] for b in range(start_batch, len(dataset)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(range(start_batch, len(dataset))),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# A synthetic feature cache (demos and tests; no encoders needed)


def write_synthetic(dataset_dir: str | Path, features_dir: str | Path, *, num_entities: int = 64,
                    mentions_per_split: tuple[int, int, int] = (384, 96, 96), text_dim: int = 32,
                    image_dim: int = 24, seq_len: int = 6, regions: int = 4, signal: str = "image",
                    noise: float = 0.5, text_hint: float = 0.15, image_missing: float = 0.1,
                    num_candidates: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny unified dataset and its feature cache where the gold entity is recoverable from one view.

    ``signal="image"``: the mention image and regions are noisy copies of the gold entity's image; the text views
    carry only a weak hint (``text_hint`` × gold description) plus noise, so zero-shot text cosine is poor.
    ``signal="text"``: a sentence token carries a fixed random rotation of the gold description (learnable, not
    zero-shot). ``image_missing`` of the mentions have no image (masked views).
    """
    from data_process.records import DatasetInfo, Entity, Mention, save_dataset

    if signal not in ("image", "text"):
        raise ValueError(f"signal must be 'image' or 'text', got {signal!r}")
    rng = np.random.default_rng(seed)
    E = num_entities

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    desc = unit(rng.standard_normal((E, text_dim)))
    eimg = unit(rng.standard_normal((E, image_dim)))
    eprof = unit(desc + 0.5 * rng.standard_normal((E, text_dim)))
    rot = np.linalg.qr(rng.standard_normal((text_dim, text_dim)))[0]
    entities = [Entity(id=f"Q{i}", name=f"entity {i}", description=f"synthetic entity {i}") for i in range(E)]
    mentions: list[Mention] = []
    golds: list[int] = []
    for split, n in zip(SPLITS, mentions_per_split):
        for j in range(n):
            g = int(rng.integers(E))
            golds.append(g)
            cands = None
            if num_candidates:
                others = rng.choice(np.delete(np.arange(E), g), size=min(num_candidates - 1, E - 1), replace=False)
                cands = tuple(f"Q{c}" for c in rng.permutation(np.append(others, g)))
            mentions.append(Mention(id=f"{split}-{j}", sentence=f"mention {j} of {split}", mention="mention",
                                    gold_id=f"Q{g}", split=split, candidates=cands))
    gold = np.array(golds)
    M = len(mentions)
    ds = save_dataset(dataset_dir, DatasetInfo(name="synthetic", source_format="synthetic",
                                               split_rule=f"synthetic seed={seed}"), entities, mentions)
    store = FeatureStore(features_dir)
    store.set_ids("entity", [e.id for e in entities])
    store.set_ids("mention", [m.id for m in mentions])
    store.update_meta(text_encoder="synthetic", image_encoder="synthetic", text_dim=text_dim, image_dim=image_dim,
                      max_len=seq_len, region_grid=regions, dataset=str(Path(ds).resolve()))

    def put(side, view, data, mask=None, **info):
        w = store.writer(side, view, len(data), data.shape[1:], None if mask is None else mask.shape[1:],
                         fingerprint=f"synthetic-{seed}-{signal}")
        w.write(0, data.astype(np.float16), mask)
        w.commit(info)

    hint = text_hint * desc[gold]
    mention = unit(hint + noise * unit(rng.standard_normal((M, text_dim))))
    sent = rng.standard_normal((M, seq_len, text_dim)) * noise / np.sqrt(text_dim)
    lens = rng.integers(2, seq_len + 1, size=M)
    smask = np.arange(seq_len)[None, :] < lens[:, None]
    if signal == "text":
        pos = rng.integers(0, lens)
        sent[np.arange(M), pos] = desc[gold] @ rot.T + 0.3 * noise * rng.standard_normal((M, text_dim)) / np.sqrt(text_dim)
    sent *= smask[..., None]
    has_img = rng.random(M) >= image_missing
    if signal == "image":
        img = eimg[gold] + noise * rng.standard_normal((M, image_dim)) / np.sqrt(image_dim)
        reg = eimg[gold][:, None, :] + 2 * noise * rng.standard_normal((M, regions, image_dim)) / np.sqrt(image_dim)
    else:
        img = unit(rng.standard_normal((M, image_dim)))
        reg = rng.standard_normal((M, regions, image_dim)) / np.sqrt(image_dim)
    img *= has_img[:, None]
    rmask = np.repeat(has_img[:, None], regions, axis=1)
    reg *= rmask[..., None]
    prof = rng.standard_normal((M, 2, text_dim)) * noise / np.sqrt(text_dim)
    pmask = rng.random((M, 2)) < 0.7
    prof *= pmask[..., None]
    put("mention", "mention", mention)
    put("mention", "sentence", sent, smask)
    put("mention", "image", img, has_img)
    put("mention", "regions", reg, rmask)
    put("mention", "profile", prof, pmask, rows=list(DEFAULT_PROFILE_ROWS))
    put("entity", "desc", desc)
    emask = np.ones(E, dtype=bool)
    emask[rng.random(E) < 0.05] = False
    put("entity", "image", eimg * emask[:, None], emask)
    pm = rng.random(E) < 0.8
    put("entity", "profile", eprof * pm[:, None], pm)
    return Path(ds), Path(features_dir)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nel_model.data",
                                description="Write a synthetic dataset + feature cache (demo and tests).")
    p.add_argument("--dataset_out", required=True)
    p.add_argument("--features_out", required=True)
    p.add_argument("--signal", choices=["image", "text"], default="image")
    p.add_argument("--num_entities", type=int, default=64)
    p.add_argument("--mentions", type=int, nargs=3, default=[384, 96, 96], metavar=("TRAIN", "DEV", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ds, feat = write_synthetic(a.dataset_out, a.features_out, num_entities=a.num_entities,
                               mentions_per_split=tuple(a.mentions), signal=a.signal, seed=a.seed)
    print(json.dumps({"dataset": str(ds), "features": str(feat)}))


if __name__ == "__main__":
    main()
