r"""Feature step: encode every view of a unified dataset into a feature cache (:mod:`data_process.encode.feature_store`).

::

    python -m data_process.encode.features --data DATASET --out FEATURES --clip openai/clip-vit-base-patch32 \
        [--text_encoder NAME_OR_PATH] [--max_len 32] [--region_grid 3] [--batch_size 64] [--num_workers 2] \
        [--device auto] [--threads 0] [--force]

Each view's fingerprint is ``stable_hash(encoder id, settings, the exact inputs)`` (an image input is its path and
content hash, ``data_process.core.fingerprints``); a re-run skips views whose fingerprint matches ``meta.json`` (no model is even loaded when nothing changed) and re-encodes only the changed
ones (e.g. ``mention.profile`` after captions were added). A killed run resumes inside the view it was writing.

Images are decoded in DataLoader worker processes. A missing or unreadable image never stops the run: it is
counted, reported at the end and in ``meta.json`` (``meta["views"][view]["images"]``: counts and first ids),
and gets a zero feature with mask False.

For linking new mentions outside the cache (``nel_model/predict.py``) use :func:`load_encoders_from_meta` and
:func:`encode_mention_views`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from data_process.core.devices import cpu_threads, resolve_device
from data_process.core.fingerprints import ImageHasher, stable_hash
from data_process.core.images import decode_image, iter_decoded
from data_process.core.records import Entity, Mention, load_dataset
from data_process.encode.encoders import ImageEncoder, TextEncoder, describe_model_files, load_encoders
from data_process.encode.feature_store import PROFILE_ROWS, FeatureStore

log = logging.getLogger(__name__)

FIRST_IDS = 10  # how many problem ids meta.json lists per view
HASHES_FILE = "image_hashes.jsonl"  # image content hashes by (path, size, mtime), reused by later runs


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that decides the features (besides the inputs)."""

    clip: str
    text_encoder: str | None = None  # None: the CLIP text tower
    max_len: int = 32
    region_grid: int = 3

    @property
    def text_name(self) -> str:
        return self.text_encoder or self.clip


@dataclass
class ImageReport:
    """Images that could not be used for one side: records without one, and referenced but unusable files."""

    no_image: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)

    def add(self, rec_id: str, reason: str | None) -> None:
        if reason is None:
            return
        if reason == "no image":
            self.no_image += 1
            return
        self.failed += 1
        if len(self.failed_ids) < FIRST_IDS:
            self.failed_ids.append(rec_id)
            self.failed_reasons.append(reason)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Inputs of each view


def profile_texts(m: Mention) -> list[str | None]:
    """The mention's profile rows in order ``PROFILE_ROWS``; ``None`` where absent or empty."""
    out = []
    for row in PROFILE_ROWS:
        value = getattr(m, row)
        text = value.get("text") if isinstance(value, dict) else None
        out.append(text if isinstance(text, str) and text.strip() else None)
    return out


def entity_profile_text(e: Entity) -> str | None:
    text = e.enrichment.get("text") if isinstance(e.enrichment, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def _image_inputs(rels: Sequence[str | None], root: Path, hasher: ImageHasher) -> list[Any]:
    """Fingerprint inputs of images: path and content hash (``data_process.core.fingerprints``), so an image edited
    in place is re-encoded."""
    shas = hasher.hash_all([None if rel is None else root / rel for rel in rels])
    return [None if rel is None else [rel, sha] for rel, sha in zip(rels, shas)]


# ---------------------------------------------------------------------------------------------
# Images: decoded and preprocessed in worker processes (``data_process.core.images.iter_decoded``)


def _encode_image_batch(items, image_enc: ImageEncoder) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """``items`` of ``(index, preprocessed array | None, reason)`` -> global [b, Di], regions [b, R, Di],
    present [b] (zeros where absent), reasons."""
    b = len(items)
    glob = np.zeros((b, image_enc.dim), np.float32)
    regs = np.zeros((b, image_enc.n_regions, image_enc.dim), np.float32)
    present = np.array([arr is not None for _, arr, _ in items], dtype=bool)
    if present.any():
        g, r = image_enc.encode(np.stack([arr for _, arr, _ in items if arr is not None]))
        glob[present], regs[present] = g, r
    return glob, regs, present, [reason for _, _, reason in items]


# ---------------------------------------------------------------------------------------------
# Text helpers


def _pooled_or_zero(texts: Sequence[str | None], text_enc: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    present = np.array([t is not None for t in texts], dtype=bool)
    out = np.zeros((len(texts), text_enc.dim), np.float32)
    if present.any():
        out[present] = text_enc.encode([t for t in texts if t is not None]).pooled
    return out, present


# ---------------------------------------------------------------------------------------------
# Reusable: encode mentions in memory (predict)


def encode_mention_views(mentions: Sequence[Mention], image_root: str | Path | None, text_enc: TextEncoder,
                         image_enc: ImageEncoder, settings: FeatureSettings | None = None,
                         batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Encode every mention view in memory: ``{view: (data float32, mask bool or None)}`` with the same
    shapes as the cache rows (views ``mention``, ``sentence``, ``image``, ``regions``, ``profile``).

    Image paths are relative to ``image_root`` (absolute paths are used as they are); a missing image gives
    zeros and mask False. ``settings``, when given, must match the encoders (checked).
    """
    if settings is not None:
        if settings.max_len != text_enc.max_len or settings.region_grid != image_enc.region_grid:
            raise ValueError(f"settings (max_len {settings.max_len}, region_grid {settings.region_grid}) do not "
                             f"match the encoders (max_len {text_enc.max_len}, region_grid {image_enc.region_grid})")
    root = Path(image_root) if image_root is not None else Path(".")
    mentions = list(mentions)
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    out["mention"] = (text_enc.encode([m.mention for m in mentions]).pooled, None)
    sent = text_enc.encode([m.sentence for m in mentions])
    out["sentence"] = (sent.tokens, sent.mask)
    items = [(i, *decode_image(None if m.image is None else root / m.image, image_enc.preprocess))
             for i, m in enumerate(mentions)]
    globs, regs, pres = [], [], []
    for i in range(0, len(items), batch_size):
        g, r, p, _ = _encode_image_batch(items[i:i + batch_size], image_enc)
        globs.append(g), regs.append(r), pres.append(p)
    present = np.concatenate(pres) if pres else np.zeros(0, bool)
    out["image"] = (np.concatenate(globs) if globs else np.zeros((0, image_enc.dim), np.float32), present)
    regions = np.concatenate(regs) if regs else np.zeros((0, image_enc.n_regions, image_enc.dim), np.float32)
    out["regions"] = (regions, np.repeat(present[:, None], image_enc.n_regions, axis=1))
    rows = [profile_texts(m) for m in mentions]
    flat, mask = _pooled_or_zero([t for r in rows for t in r], text_enc)
    k = len(PROFILE_ROWS)
    out["profile"] = (flat.reshape(len(mentions), k, text_enc.dim), mask.reshape(len(mentions), k))
    return out


def load_encoders_from_meta(meta: dict[str, Any], device: str = "auto",
                            batch_size: int = 64) -> tuple[TextEncoder, ImageEncoder, FeatureSettings]:
    """Load the encoders a feature cache was built with (from its ``meta.json`` dict)."""
    for key in ("text_encoder", "image_encoder", "max_len", "region_grid"):
        if key not in meta:
            raise KeyError(f"feature meta.json has no {key!r}; rebuild the cache with python -m data_process.encode.features")
    clip = meta["image_encoder"]
    text = meta["text_encoder"] if meta["text_encoder"] != clip else None
    settings = FeatureSettings(clip=clip, text_encoder=text, max_len=int(meta["max_len"]),
                               region_grid=int(meta["region_grid"]))
    text_enc, image_enc = load_encoders(clip, text, device=device, max_len=settings.max_len,
                                        region_grid=settings.region_grid, batch_size=batch_size)
    return text_enc, image_enc, settings


# ---------------------------------------------------------------------------------------------
# The feature step


@dataclass
class _Job:
    """One view to write: its fingerprint and shapes."""

    side: str
    view: str
    row_shape: tuple[int, ...]
    mask_shape: tuple[int, ...] | None
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.side}.{self.view}"


def _fingerprints(ds, settings: FeatureSettings, hasher: ImageHasher) -> dict[str, str]:
    text_id = describe_model_files(settings.text_name)
    image_id = describe_model_files(settings.clip)
    ms, es = ds.mentions, ds.entities
    m_images = _image_inputs([m.image for m in ms], ds.root, hasher)
    e_images = _image_inputs([e.images[0] if e.images else None for e in es], ds.root, hasher)
    text_common = {"encoder": text_id, "max_len": settings.max_len}
    inputs = {
        "mention.mention": (text_common, [m.mention for m in ms]),
        "mention.sentence": (text_common, [m.sentence for m in ms]),
        "mention.image": ({"encoder": image_id}, m_images),
        "mention.regions": ({"encoder": image_id, "region_grid": settings.region_grid}, m_images),
        "mention.profile": ({**text_common, "rows": list(PROFILE_ROWS)}, [profile_texts(m) for m in ms]),
        "entity.desc": (text_common, [e.text() for e in es]),
        "entity.image": ({"encoder": image_id}, e_images),
        "entity.profile": (text_common, [entity_profile_text(e) for e in es]),
    }
    return {name: stable_hash({"view": name, "settings": s, "inputs": stable_hash(x)})
            for name, (s, x) in inputs.items()}


def _write_text_view(store: FeatureStore, job: _Job, n: int, batch_size: int,
                     encode: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]) -> None:
    w = store.writer(job.side, job.view, n, job.row_shape, job.mask_shape, job.fingerprint)
    if w.start_row:
        log.info("%s: resuming at row %d of %d", job.name, w.start_row, n)
    for start in tqdm(range(w.start_row, n, batch_size), desc=job.name, unit="batch", leave=False):
        end = min(n, start + batch_size)
        data, mask = encode(start, end)
        w.write(start, data, mask)
    w.commit(job.info)


def _write_image_views(store: FeatureStore, side: str, ids: list[str], paths: list[Path | None],
                       jobs: list[_Job], image_enc: ImageEncoder, batch_size: int, num_workers: int) -> ImageReport:
    """Write the image views of one side (``image`` and, for mentions, ``regions``) in one decoding pass."""
    n = len(paths)
    writers = {j.view: store.writer(side, j.view, n, j.row_shape, j.mask_shape, j.fingerprint) for j in jobs}
    # Resume from the earliest unfinished row; rows are deterministic, so rewriting a few is harmless.
    start = (min(w.start_row for w in writers.values()) // batch_size) * batch_size
    report = ImageReport()
    if start:
        log.info("%s images: resuming at row %d of %d", side, start, n)
        # rows finished by the earlier run: their masks say which images were unusable
        done_mask = np.asarray(next(iter(writers.values())).mask[:start]).reshape(start, -1)[:, 0]
        for j in np.flatnonzero(~done_mask):
            report.add(ids[j], "no image" if paths[j] is None else "missing or unreadable (earlier run)")
    batches = iter_decoded(paths[start:], batch_size, num_workers, image_enc.preprocess)
    i = start
    for items in tqdm(batches, total=(n - start + batch_size - 1) // batch_size, desc=f"{side} images",
                      unit="batch", leave=False):
        glob, regs, present, reasons = _encode_image_batch(items, image_enc)
        for j, reason in enumerate(reasons):
            report.add(ids[i + j], reason)
        end = i + len(items)
        if "image" in writers and end > writers["image"].start_row:
            writers["image"].write(i, glob, present)
        if "regions" in writers and end > writers["regions"].start_row:
            writers["regions"].write(i, regs, np.repeat(present[:, None], image_enc.n_regions, axis=1))
        i = end
    images_info = report.to_json()
    for j in jobs:
        writers[j.view].commit({**j.info, "images": images_info})
    return report


def build_features(data: str | Path, out: str | Path, settings: FeatureSettings, batch_size: int = 64,
                   num_workers: int = 2, device: str = "auto", force: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Write (or update) the feature cache ``out`` for the dataset ``data``; returns a summary
    ``{"written": [...], "skipped": [...], "images": {side: report}}``."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    ds = load_dataset(data)
    store = FeatureStore(out)
    m_ids, e_ids = [m.id for m in ds.mentions], [e.id for e in ds.entities]
    store.set_ids("mention", m_ids)
    store.set_ids("entity", e_ids)
    with ImageHasher(store.root / HASHES_FILE) as hasher:
        fps = _fingerprints(ds, settings, hasher)
    todo = [name for name, fp in fps.items() if force or not store.has(*name.split("."), fingerprint=fp)]
    skipped = [name for name in fps if name not in todo]
    for name in skipped:
        log.info("%s: up to date, skipped", name)
    summary: dict[str, Any] = {"written": todo, "skipped": skipped, "images": {}}
    base_meta = {"text_encoder": settings.text_name, "image_encoder": settings.clip, "max_len": settings.max_len,
                 "region_grid": settings.region_grid, "dataset": str(data)}
    if not todo:
        store.update_meta(**base_meta)
        return summary

    text_enc, image_enc = load_encoders(settings.clip, settings.text_encoder, device=device,
                                        max_len=settings.max_len, region_grid=settings.region_grid,
                                        batch_size=batch_size)
    dt, di, L, R, K = text_enc.dim, image_enc.dim, settings.max_len, image_enc.n_regions, len(PROFILE_ROWS)
    store.update_meta(**base_meta, text_dim=dt, image_dim=di)
    shapes = {
        "mention.mention": ((dt,), None), "mention.sentence": ((L, dt), (L,)),
        "mention.image": ((di,), ()), "mention.regions": ((R, di), (R,)),
        "mention.profile": ((K, dt), (K,)), "entity.desc": ((dt,), None),
        "entity.image": ((di,), ()), "entity.profile": ((dt,), ()),
    }
    jobs = {name: _Job(*name.split("."), *shapes[name], fingerprint=fps[name]) for name in todo}
    if "mention.profile" in jobs:
        jobs["mention.profile"].info["rows"] = list(PROFILE_ROWS)
    ms, es = ds.mentions, ds.entities

    def pooled(texts: list[str]) -> Callable[[int, int], tuple[np.ndarray, None]]:
        return lambda a, b: (text_enc.encode(texts[a:b]).pooled, None)

    def sentence(a: int, b: int):
        f = text_enc.encode([m.sentence for m in ms[a:b]])
        return f.tokens, f.mask

    def m_profile(a: int, b: int):
        flat, mask = _pooled_or_zero([t for m in ms[a:b] for t in profile_texts(m)], text_enc)
        return flat.reshape(b - a, K, dt), mask.reshape(b - a, K)

    def e_profile(a: int, b: int):
        return _pooled_or_zero([entity_profile_text(e) for e in es[a:b]], text_enc)

    text_views = {
        "mention.mention": (len(ms), pooled([m.mention for m in ms])),
        "mention.sentence": (len(ms), sentence),
        "mention.profile": (len(ms), m_profile),
        "entity.desc": (len(es), pooled([e.text() for e in es])),
        "entity.profile": (len(es), e_profile),
    }
    with tqdm(total=len(todo), desc="views", unit="view", disable=not progress) as bar:
        for name, (n, fn) in text_views.items():
            if name in jobs:
                _write_text_view(store, jobs[name], n, batch_size, fn)
                bar.update(1)
        m_jobs = [jobs[n] for n in ("mention.image", "mention.regions") if n in jobs]
        if m_jobs:
            paths = [ds.image_path(m.image) for m in ms]
            rep = _write_image_views(store, "mention", m_ids, paths, m_jobs, image_enc, batch_size, num_workers)
            summary["images"]["mention"] = rep.to_json()
            bar.update(len(m_jobs))
        if "entity.image" in jobs:
            paths = [ds.image_path(e.images[0] if e.images else None) for e in es]
            rep = _write_image_views(store, "entity", e_ids, paths, [jobs["entity.image"]], image_enc,
                                     batch_size, num_workers)
            summary["images"]["entity"] = rep.to_json()
            bar.update(1)
    return summary


def _report(summary: dict[str, Any], out: Path) -> str:
    lines = [f"feature cache {out}: wrote {len(summary['written'])} views, skipped {len(summary['skipped'])} "
             "up-to-date views"]
    for side, rep in summary["images"].items():
        lines.append(f"  {side} images: {rep['no_image']} records without an image, {rep['failed']} missing or "
                     "unreadable (zero feature, mask False)")
        for rid, why in zip(rep["failed_ids"], rep["failed_reasons"]):
            lines.append(f"    {side} {rid}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_process.encode.features",
                                 description="Encode a unified dataset's views into a feature cache.")
    ap.add_argument("--data", required=True, type=Path, help="unified dataset folder")
    ap.add_argument("--out", required=True, type=Path, help="feature cache folder (created or updated)")
    ap.add_argument("--clip", required=True, help="CLIP model: Hugging Face name or local folder")
    ap.add_argument("--text_encoder", default=None,
                    help="text encoder name or folder (default: the CLIP text tower); e.g. a BERT/MiniLM model")
    ap.add_argument("--max_len", type=int, default=32, help="sentence tokens kept (padded/truncated)")
    ap.add_argument("--region_grid", type=int, default=3, help="image regions: grid x grid pooled patch tokens")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_workers", type=int, default=None,
                    help="image decoding worker processes (0: in the main process; default: CPU cores - 1 on a GPU, "
                         "where decoding is the bottleneck, else min(2, CPU cores))")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--force", action="store_true", help="re-encode every view even when up to date")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for encoding (0: auto = CPU cores minus decoding workers, at least 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = FeatureSettings(clip=args.clip, text_encoder=args.text_encoder, max_len=args.max_len,
                               region_grid=args.region_grid)
    device = resolve_device(args.device)  # fail early on a malformed device string
    if args.num_workers is None:
        cores = os.cpu_count() or 1
        args.num_workers = max(1, cores - 1) if device.type == "cuda" else min(2, cores)
    torch.set_num_threads(args.threads if args.threads > 0 else cpu_threads(args.num_workers))
    summary = build_features(args.data, args.out, settings, batch_size=args.batch_size,
                             num_workers=args.num_workers, device=args.device, force=args.force)
    print(_report(summary, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
