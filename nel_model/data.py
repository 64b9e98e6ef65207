"""Feature-cache data for the DIM model: memory-mapped views joined with gold rows, splits and candidates, and
whole-batch gathering of views (host memory or the GPU).

Everything in the hot loop is whole-batch numpy/torch fancy indexing: rows of a batch are gathered at once (no
per-sample Python work, no per-sample collate). Epoch plans and training batches are in ``nel_model.training.batches``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from data_process.encode.feature_store import PROFILE_ROWS, FeatureStore
from data_process.core.records import SPLITS, DatasetInfo, read_info, read_mentions

# (side.view) -> batch key; masks get "<key>_mask". desc_tokens and regions of the entity side: MIMIC's (views a
# feature cache holds only when asked for them, docs/CONTRACTS.md)
MENTION_VIEWS = ("mention", "sentence", "context", "image", "regions", "profile")
ENTITY_VIEWS = ("desc", "image", "profile", "desc_tokens", "regions")


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
    dataset: Path | None = None   # the unified dataset folder the labels come from

    @property
    def num_entities(self) -> int:
        return len(self.entity_ids)

    @property
    def dataset_info(self) -> DatasetInfo:
        """The dataset's ``dataset.json``, whatever the working directory (its folder's name when it has none)."""
        return read_info(Path(self.dataset).resolve())

    @property
    def dataset_name(self) -> str:
        return self.dataset_info.name

    def view(self, side: str, view: str) -> tuple[np.ndarray, np.ndarray | None]:
        return self.arrays.get(side, view)


def load_mel_data(features: str | Path, dataset: str | Path | None = None) -> MELData:
    """Open a feature folder and join it with the unified dataset (``dataset`` or ``meta.json['dataset']``)."""
    root = Path(features)
    store = FeatureStore(root)
    if not store.meta_path.exists():
        raise FileNotFoundError(f"{store.meta_path}: not a feature folder (run python -m data_process.encode.features)")
    meta = store.meta()
    # the KB's text: every model reads it (the other views are checked against what a model reads: FeatureSource)
    if not store.has("entity", "desc"):
        raise FileNotFoundError(f"{root}: required view entity.desc is missing from the feature cache")
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
    text_dim = int(meta.get("text_dim") or arrays.get("entity", "desc")[0].shape[-1])
    image_dim = int(meta.get("image_dim") or 0)
    if not image_dim:
        for side, v in (("mention", "image"), ("mention", "regions"), ("entity", "image")):
            if (v in (mviews if side == "mention" else eviews)):
                image_dim = int(arrays.get(side, v)[0].shape[-1])
                break
    rows = meta.get("views", {}).get("mention.profile", {}).get("rows", list(PROFILE_ROWS))
    return MELData(root=root, meta=meta, mention_ids=mention_ids, entity_ids=entity_ids, gold=gold, splits=splits,
                   candidates=candidates, mention_views=mviews, entity_views=eviews, text_dim=text_dim,
                   image_dim=image_dim, profile_rows=tuple(rows), arrays=arrays, dataset=ds)


# ---------------------------------------------------------------------------------------------
# Gathering whole batches


class FeatureSource:
    """Gathers batches of mention/entity views as torch tensors, from the memory-mapped cache (host) or from
    copies of the needed views kept on ``device`` (``on_device=True``; on a CPU that means in RAM as tensors), in
    ``dtype`` (float32 saves a cast per view per batch; float16 halves the memory). Rows are numpy arrays or, for
    a resident source, index tensors already on the device (no host-device copy per batch)."""

    def __init__(self, data: MELData, mention_views: Iterable[str], entity_views: Iterable[str],
                 device: torch.device | None = None, on_device: bool = False, dtype: torch.dtype = torch.float16):
        self.data = data
        self.mention_views, self.entity_views = tuple(mention_views), tuple(entity_views)
        for side, views, have in (("mention", self.mention_views, data.mention_views),
                                  ("entity", self.entity_views, data.entity_views)):
            missing = [v for v in views if v not in have]
            if missing:
                raise ValueError(f"{data.root}: the feature cache has no {side} view {missing[0]!r}, which the model "
                                 f"uses (views here: {', '.join(have) or 'none'}); encode it with the feature step, "
                                 "or pass the features the run was trained on")
        self.on_device = on_device
        self.device = device
        self._tensors: dict[str, torch.Tensor] = {}
        if on_device:
            for side, views in (("mention", self.mention_views), ("entity", self.entity_views)):
                for v in views:
                    arr, mask = data.view(side, v)
                    self._tensors[f"{side}.{v}"] = torch.from_numpy(np.array(arr)).to(device, dtype)
                    if mask is not None:
                        self._tensors[f"{side}.{v}.mask"] = torch.from_numpy(np.array(mask)).to(device)

    def nbytes(self) -> int:
        """Bytes of the needed views as cached (float16 features, bool masks)."""
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

    def _gather(self, side: str, views: tuple[str, ...], rows) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.on_device:
            idx = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows, dtype=torch.long)
            idx = idx.to(self.device, non_blocking=True)
            for v in views:
                out[v] = self._tensors[f"{side}.{v}"].index_select(0, idx)
                mk = self._tensors.get(f"{side}.{v}.mask")
                if mk is not None:
                    out[v + "_mask"] = mk.index_select(0, idx)
            return out
        rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.int64)
        # Sorted unique reads are kinder to memory maps; scatter back to batch order afterwards.
        uniq, inverse = np.unique(rows, return_inverse=True)
        for v in views:
            arr, mask = self.data.view(side, v)
            out[v] = torch.from_numpy(np.ascontiguousarray(arr[uniq][inverse]))
            if mask is not None:
                out[v + "_mask"] = torch.from_numpy(np.ascontiguousarray(mask[uniq][inverse]))
        return out

    def mentions(self, rows) -> dict[str, torch.Tensor]:
        return self._gather("mention", self.mention_views, rows)

    def entities(self, rows) -> dict[str, torch.Tensor]:
        return self._gather("entity", self.entity_views, rows)


def available_memory(device: torch.device) -> int:
    """Bytes free for features: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
