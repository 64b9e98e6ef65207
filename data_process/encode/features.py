r"""Feature step: encode every view of a unified dataset into a feature cache (:mod:`data_process.encode.feature_store`).

::

    python -m data_process.encode.features --data DATASET --out FEATURES --clip openai/clip-vit-base-patch32 \
        [--text_encoder NAME_OR_PATH] [--max_len 32] [--text_max_len N] [--batch_size 64] [--num_workers 2] \
        [--regions grid|detector|file] [--region_grid 3] [--detector NAME_OR_PATH] [--boxes FILE] \
        [--max_regions 9] [--region_score S] [--region_labels person,car] [--detector_batch_size 8] \
        [--import SIDE.VIEW=FILE[,ids=IDS.json][,key=NAME][,by=id|image] ...] [--import_ids IDS.json] \
        [--views SIDE.VIEW,... | --config TRAIN_CONFIG.yaml] [--desc_max_len 40] [--device auto] [--threads 0] \
        [--force]

``--clip`` is any vision-language model (CLIP, SigLIP / SigLIP 2, any ``AutoModel`` with ``get_text_features`` and
``get_image_features``; :mod:`data_process.encode.towers`). ``--max_len`` is the sentence view's length (DIM's
32); every other text view is truncated at ``--text_max_len`` (default: the text encoder's own limit, 77 for
CLIP). ``--regions`` decides ``mention.regions`` (:mod:`data_process.encode.regions`): the patch grid, crops of
an object detector's boxes (:mod:`data_process.encode.detector`, detections cached in ``detections.jsonl``), or
crops of boxes from a JSON Lines file (:mod:`data_process.encode.boxes_file`); ``meta.json`` records which
(``meta["regions"]``), and it is part of the view's fingerprint. ``--import`` reads views from a release's files
instead of encoding them (:mod:`data_process.encode.precomputed`; without ``--clip`` only those are written).

Each view's fingerprint is ``stable_hash(encoder id, settings, the exact inputs)`` (an image input is its path and
content hash, ``data_process.core.fingerprints``); a re-run skips views whose fingerprint matches ``meta.json`` (no model is even loaded when nothing changed) and re-encodes only the changed
ones (e.g. ``mention.profile`` after captions were added); a view whose files are truncated or altered since (size
and content hash in ``meta.json``) is encoded again. A killed run resumes inside the view it was writing. Text
views are batched over the whole view sorted by length (:func:`length_order`; rows are written in row order).

Images are decoded in DataLoader worker processes. An image name that leads outside the dataset folder (absolute,
``../``, a symlink out) is refused, a FIFO or device is never opened. A missing or unreadable image never stops the
run: it is counted, reported at the end and in ``meta.json`` (``meta["views"][view]["images"]``: counts and first
ids, with the reason), and gets a zero feature with mask False.

``--views`` names the views to encode (default: the nine the default model reads); ``--config FILE`` takes
them from a training config's ``views`` key (``configs/dim_paper.yaml`` lists the views DIM's paper model reads,
without ``mention.context``; ``dim-mel train`` warns when a config's model reads a view its list leaves out). This
step reads the plain list and imports nothing of the model (the architecture rule). Two views are written only
when a list names them (:data:`ASKED_VIEWS`, what MIMIC reads, ``configs/mimic.yaml``): ``entity.desc_tokens``,
the entity text's token features encoded like ``mention.sentence`` but cut at ``--desc_max_len`` (40, MIMIC's text
length), and ``entity.regions``, the entity image's regions made like ``mention.regions`` (the patch grid, or a
detector's crops; a boxes file names mention images only).

For new mentions and new KB entities outside the cache (``nel_model.loaded_run``) use
:func:`load_encoders_from_meta`, :func:`encode_mention_views` and :func:`encode_entity_views`.
"""

from __future__ import annotations

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
from data_process.core.settings import Setting, ToolkitParser, add_bool, load_settings
from data_process.core.entry import run_main
from data_process.core.records import Entity, Mention, load_dataset
from data_process.core.safe_paths import UnsafePath, resolve_in_dataset
from data_process.encode.boxes_file import Box, read_boxes_file
from data_process.encode.detector import DETECTIONS_FILE, DetectionSettings, Detector, detect_all
from data_process.encode.encoders import (FixedShapes, ImageEncoder, TextEncoder, describe_model_files,
                                          load_encoders, stack_inputs, text_positions)
from data_process.encode.feature_store import PROFILE_ROWS, FeatureStore
from data_process.encode.precomputed import VIEWS, ImportSpec, check_dims, prepare_import, write_import
from data_process.encode.regions import (MODES, CropStats, PrepareCrops, RegionSettings, encode_crop_batch,
                                         select_boxes)

log = logging.getLogger(__name__)

FIRST_IDS = 10  # how many problem ids meta.json lists per view
HASHES_FILE = "image_hashes.jsonl"  # image content hashes by (path, size, mtime), reused by later runs
VIEWS_KEY = "views"  # the key of a training config that lists the views its model reads (dim-mel features --config)
# views written only when asked (--views, a config's views: list): MIMIC's entity-side text tokens and image regions
ASKED_VIEWS = ("entity.desc_tokens", "entity.regions")
ALL_VIEWS = (*VIEWS, *ASKED_VIEWS)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that decides the features (besides the inputs)."""

    clip: str  # the image encoder: any vision-language model (CLIP, SigLIP, ...)
    text_encoder: str | None = None  # None: the vision-language model's text tower
    max_len: int = 32  # the sentence view's tokens
    region_grid: int = 3  # --regions grid
    text_max_len: int | None = None  # every other text view; None: the text encoder's own limit
    desc_max_len: int = 40  # entity.desc_tokens' tokens (MIMIC's text_max_length)
    regions: RegionSettings = field(default_factory=RegionSettings)
    jpeg_draft: bool = True  # whole images: decode large JPEGs at a reduced scale (core.images.ImagePreprocess)

    @property
    def text_name(self) -> str:
        return self.text_encoder or self.clip

    @property
    def grid(self) -> int | None:
        """The image encoder's region grid: ``None`` when regions are crops."""
        return None if self.regions.crops else self.region_grid


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


def dataset_image_paths(root: Path, rels: Sequence[str | None]) -> tuple[list[Path | None], dict[int, str]]:
    """Real paths of a dataset's images (``core.safe_paths.resolve_in_dataset``) and, by row, why a name is refused:
    an absolute or ``../`` path, a symlink leading out of the dataset folder, a NUL byte. A refused image is not
    read (its path is ``None``) and is reported as unreadable, with the reason."""
    paths: list[Path | None] = []
    refused: dict[int, str] = {}
    for i, rel in enumerate(rels):
        try:
            paths.append(None if rel is None else resolve_in_dataset(root, rel))
        except UnsafePath as exc:
            paths.append(None)
            refused[i] = f"unsafe path: {exc}"
    return paths, refused


def _image_inputs(rels: Sequence[str | None], shas: Sequence[str | None]) -> list[Any]:
    """Fingerprint inputs of images: path and content hash (``data_process.core.fingerprints``), so an image edited
    in place is re-encoded."""
    return [None if rel is None else [rel, sha] for rel, sha in zip(rels, shas)]


# ---------------------------------------------------------------------------------------------
# Images: decoded and preprocessed in worker processes (``data_process.core.images.iter_decoded``)


def _encode_image_batch(items, image_enc: ImageEncoder,
                        rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """``items`` of ``(index, preprocessed array | None, reason)`` -> global [b, Di], regions [b, R, Di],
    present [b] (zeros where absent), reasons; ``rows``: in fixed shapes, ``rows`` images a pass
    (``ImageEncoder.encode_fixed``)."""
    b = len(items)
    glob = np.zeros((b, image_enc.dim), np.float32)
    regs = np.zeros((b, image_enc.n_regions, image_enc.dim), np.float32)
    present = np.array([arr is not None for _, arr, _ in items], dtype=bool)
    if present.any():
        arrays = [arr for _, arr, _ in items if arr is not None]
        g, r = image_enc.encode(stack_inputs(arrays)) if rows is None else image_enc.encode_fixed(arrays, rows)
        glob[present], regs[present] = g, r
    return glob, regs, present, [reason for _, _, reason in items]


# ---------------------------------------------------------------------------------------------
# Text helpers


def context_texts(mentions: Sequence[Mention]) -> list[str]:
    """The texts of the ``mention.context`` view: the mention in its sentence, ``"mention (sentence)"``, encoded
    as one pooled feature (DIM's context input is one pooled feature of "mention [SEP] sentence", not tokens).

    Why this form and not DIM's literal "[SEP]": the string "[SEP]" is a separator only to a BERT-style tokenizer,
    and a mean-pooled sentence encoder (MiniLM, CLIP's text tower) was never trained with one in mid-text;
    parentheses are plain text to every tokenizer, and "mention (sentence)" is the text of the benchmark's strongest
    zero-shot scorer of mention in context. Cut to the pooled texts' length (``--text_max_len``), like the other
    pooled views, so the mention at its head always survives the cut."""
    return [f"{m.mention} ({m.sentence})" for m in mentions]


def _pooled_or_zero(texts: Sequence[str | None], text_enc: TextEncoder,
                    shapes: FixedShapes | None = None) -> tuple[np.ndarray, np.ndarray]:
    present = np.array([t is not None for t in texts], dtype=bool)
    out = np.zeros((len(texts), text_enc.dim), np.float32)
    if present.any():
        present_texts = [t for t in texts if t is not None]
        out[present] = (text_enc.encode_pooled(present_texts) if shapes is None else
                        text_enc.encode_pooled(present_texts, shapes=shapes))
    return out, present


# ---------------------------------------------------------------------------------------------
# Reusable: encode new mentions and entities in memory (nel_model.loaded_run)


def _mention_crop_items(paths: Sequence[Path | None], image_enc: ImageEncoder, regions: RegionSettings,
                        detector: Detector | None, batch_size: int) -> list[tuple[int, Any, str | None]]:
    """Decoded mention images with their crops: a detector's boxes (detected here), or none for a boxes file (new
    mentions are not in it: their regions are masked)."""
    decoded = [decode_image(p) for p in paths]
    boxes: list[list[Box]] = [[] for _ in paths]
    if regions.mode == "detector":
        det = detector or Detector(regions.detector, image_enc.device, score=regions.threshold, labels=regions.labels)
        ok = [i for i, (img, _) in enumerate(decoded) if img is not None]
        for s in range(0, len(ok), batch_size):
            idx = ok[s:s + batch_size]
            for i, found in zip(idx, det.detect([det.preprocess(decoded[i][0]) for i in idx])):
                boxes[i] = found
    elif any(img is not None for img, _ in decoded):
        log.warning("regions from a boxes file (%s): these mentions are not in it, their regions are masked",
                    regions.boxes)
    prepare = PrepareCrops(image_enc.preprocess, regions.max_regions)
    return [(i, None if img is None else prepare(img, select_boxes(boxes[i], regions.labels, regions.threshold)),
             why) for i, (img, why) in enumerate(decoded)]


def encode_mention_views(mentions: Sequence[Mention], image_root: str | Path | None, text_enc: TextEncoder,
                         image_enc: ImageEncoder, settings: FeatureSettings | None = None,
                         batch_size: int = 64, detector: Detector | None = None,
                         shapes: FixedShapes | None = None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Encode every mention view in memory: ``{view: (data float32, mask bool or None)}`` with the same
    shapes as the cache rows (views ``mention``, ``sentence``, ``context``, ``image``, ``regions``, ``profile``).

    Image paths are relative to ``image_root`` (absolute paths are used as they are); a missing image gives
    zeros and mask False. ``settings``, when given, must match the encoders (checked); with detector regions the
    detector (``detector``, else loaded from ``settings``) runs on each image. ``shapes``: in fixed shapes
    (``data_process.encode.encoders``), so a mention's views do not depend on the mentions encoded beside it;
    crop regions (a detector pads a batch to its largest image) then take one mention's image at a time.
    """
    regions = settings.regions if settings is not None else RegionSettings()
    if settings is not None:
        if settings.max_len != text_enc.max_len or settings.grid != image_enc.region_grid or (
                settings.text_max_len is not None and settings.text_max_len != text_enc.text_max_len):
            raise ValueError(f"settings (max_len {settings.max_len}, region_grid {settings.grid}, text_max_len "
                             f"{settings.text_max_len}) do not match the encoders (max_len {text_enc.max_len}, "
                             f"region_grid {image_enc.region_grid}, text_max_len {text_enc.text_max_len})")
    root = Path(image_root) if image_root is not None else Path(".")
    mentions = list(mentions)
    fixed = {} if shapes is None else {"shapes": shapes}
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    out["mention"] = (text_enc.encode_pooled([m.mention for m in mentions], **fixed), None)
    out["context"] = (text_enc.encode_pooled(context_texts(mentions), **fixed), None)
    sent = text_enc.encode([m.sentence for m in mentions], **fixed)
    out["sentence"] = (sent.tokens, sent.mask)
    paths = [None if m.image is None else root / m.image for m in mentions]
    globs, regs, rmasks, pres = [], [], [], []
    if regions.crops:
        step = batch_size if shapes is None else 1
        items = _mention_crop_items(paths, image_enc, regions, detector, step)
        for i in range(0, len(items), step):
            cb = encode_crop_batch(items[i:i + step], image_enc, regions.max_regions, batch_size)
            globs.append(cb.glob), regs.append(cb.regions), rmasks.append(cb.regions_mask), pres.append(cb.present)
    else:
        items = [(i, *decode_image(p, image_enc.preprocess)) for i, p in enumerate(paths)]
        for i in range(0, len(items), batch_size):
            g, r, p, _ = _encode_image_batch(items[i:i + batch_size], image_enc,
                                             None if shapes is None else shapes.image_rows)
            globs.append(g), regs.append(r), pres.append(p)
            rmasks.append(np.repeat(p[:, None], image_enc.n_regions, axis=1))
    n_regions = regions.max_regions if regions.crops else image_enc.n_regions
    present = np.concatenate(pres) if pres else np.zeros(0, bool)
    out["image"] = (np.concatenate(globs) if globs else np.zeros((0, image_enc.dim), np.float32), present)
    out["regions"] = (np.concatenate(regs) if regs else np.zeros((0, n_regions, image_enc.dim), np.float32),
                      np.concatenate(rmasks) if rmasks else np.zeros((0, n_regions), bool))
    profile = [profile_texts(m) for m in mentions]
    flat, mask = _pooled_or_zero([t for r in profile for t in r], text_enc, shapes)
    k = len(PROFILE_ROWS)
    out["profile"] = (flat.reshape(len(mentions), k, text_enc.dim), mask.reshape(len(mentions), k))
    return out


def encode_entity_views(entities: Sequence[Entity], image_root: str | Path, text_enc: TextEncoder,
                        image_enc: ImageEncoder, batch_size: int = 64
                        ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Encode every entity view in memory, as the feature step writes them: ``{view: (data float32, mask bool or
    None)}`` for ``desc`` (name, description, attributes), ``image`` (the first image, a name inside
    ``image_root`` by the dataset rule; a missing, refused or unreadable one gives zeros and mask False) and
    ``profile`` (the enrichment text; zeros and mask False without one)."""
    entities = list(entities)
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "desc": (text_enc.encode_pooled([e.text() for e in entities]), None)}
    paths, _refused = dataset_image_paths(Path(image_root), [e.images[0] if e.images else None for e in entities])
    items = [(i, *decode_image(p, image_enc.preprocess)) for i, p in enumerate(paths)]
    globs, present = [np.zeros((0, image_enc.dim), np.float32)], [np.zeros(0, bool)]
    for s in range(0, len(items), batch_size):
        g, _, p, _ = _encode_image_batch(items[s:s + batch_size], image_enc)
        globs.append(g), present.append(p)
    out["image"] = (np.concatenate(globs), np.concatenate(present))
    out["profile"] = _pooled_or_zero([entity_profile_text(e) for e in entities], text_enc)
    return out


def region_settings_from_meta(meta: dict[str, Any]) -> RegionSettings:
    """The :class:`RegionSettings` a cache's ``meta.json`` records (caches from before ``meta["regions"]``: grid)."""
    spec = meta.get("regions") or {"mode": "grid"}
    if spec.get("mode", "grid") == "grid":
        return RegionSettings()
    return RegionSettings(mode=spec["mode"], detector=spec.get("detector"), boxes=spec.get("boxes"),
                          max_regions=int(spec["max_regions"]), score=spec.get("score"),
                          labels=tuple(spec.get("labels") or ()))


def load_encoders_from_meta(meta: dict[str, Any], device: str = "auto",
                            batch_size: int = 64) -> tuple[TextEncoder, ImageEncoder, FeatureSettings]:
    """Load the encoders a feature cache was built with (from its ``meta.json`` dict)."""
    for key in ("text_encoder", "image_encoder", "max_len", "region_grid"):
        if key not in meta:
            raise KeyError(f"feature meta.json has no {key!r}; rebuild the cache with python -m data_process.encode.features")
    clip = meta["image_encoder"]
    text = meta["text_encoder"] if meta["text_encoder"] != clip else None
    # caches from before --text_max_len truncated every text view at max_len
    settings = FeatureSettings(clip=clip, text_encoder=text, max_len=int(meta["max_len"]),
                               region_grid=int(meta["region_grid"]),
                               text_max_len=int(meta.get("text_max_len") or meta["max_len"]),
                               desc_max_len=int(meta.get("desc_max_len") or FeatureSettings.desc_max_len),
                               regions=region_settings_from_meta(meta), jpeg_draft=bool(meta.get("jpeg_draft")))
    text_enc, image_enc = load_encoders(clip, text, device=device, max_len=settings.max_len,
                                        region_grid=settings.grid, batch_size=batch_size,
                                        text_max_len=settings.text_max_len, jpeg_draft=settings.jpeg_draft)
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


@dataclass
class _CropPlan:
    """Crop regions of one run: the worker step, the boxes of each row (score order), K and the counts."""

    prepare: PrepareCrops
    boxes: list[list[Box]]
    max_regions: int
    stats: CropStats = field(default_factory=CropStats)


def _region_fingerprint(settings: FeatureSettings, image_id: Any, boxes_sha256: str | None) -> dict[str, Any]:
    """The settings part of ``mention.regions``' fingerprint (grid caches keep their original fingerprint)."""
    r = settings.regions
    if r.mode == "grid":
        return {"encoder": image_id, "region_grid": settings.region_grid, **_decode_setting(settings)}
    source = {"detector": describe_model_files(r.detector)} if r.mode == "detector" else {"boxes": boxes_sha256}
    return {"encoder": image_id, "regions": {"mode": r.mode, "max_regions": r.max_regions, "score": r.threshold,
                                             "labels": list(r.labels), **source}}


def _decode_setting(settings: FeatureSettings) -> dict[str, Any]:
    """How whole images are decoded, for the image views' fingerprints (absent = full decode, as older caches)."""
    return {"jpeg_draft": True} if settings.jpeg_draft else {}


def _fingerprints(ds, settings: FeatureSettings, m_images: list[Any], e_images: list[Any], text_limit: int,
                  boxes_sha256: str | None) -> dict[str, str]:
    """Each view's fingerprint: the encoder, its settings and the exact inputs (:data:`ASKED_VIEWS` included: a
    view is written only when asked, its fingerprint is known either way)."""
    text_id = describe_model_files(settings.text_name)
    image_id = describe_model_files(settings.clip)
    ms, es = ds.mentions, ds.entities
    sentence = {"encoder": text_id, "max_len": settings.max_len}
    pooled = {"encoder": text_id, "text_max_len": text_limit}
    inputs = {
        "mention.mention": (pooled, [m.mention for m in ms]),
        "mention.sentence": (sentence, [m.sentence for m in ms]),
        "mention.context": (pooled, context_texts(ms)),
        "mention.image": ({"encoder": image_id, **_decode_setting(settings)}, m_images),
        "mention.regions": (_region_fingerprint(settings, image_id, boxes_sha256), m_images),
        "mention.profile": ({**pooled, "rows": list(PROFILE_ROWS)}, [profile_texts(m) for m in ms]),
        "entity.desc": (pooled, [e.text() for e in es]),
        "entity.image": ({"encoder": image_id, **_decode_setting(settings)}, e_images),
        "entity.profile": (pooled, [entity_profile_text(e) for e in es]),
        "entity.desc_tokens": ({"encoder": text_id, "max_len": settings.desc_max_len}, [e.text() for e in es]),
        "entity.regions": (_region_fingerprint(settings, image_id, boxes_sha256), e_images),
    }
    return {name: stable_hash({"view": name, "settings": s, "inputs": stable_hash(x)})
            for name, (s, x) in inputs.items()}


def length_order(texts: Sequence[Sequence[str | None]]) -> np.ndarray:
    """Rows by the total length of their texts (stable): batches of similar length pad little, and one long
    noisy text pads only its own batch."""
    return np.argsort([sum(len(t) for t in row if t) for row in texts], kind="stable")


def _write_text_view(store: FeatureStore, job: _Job, texts: Sequence[Sequence[str | None]], batch_size: int,
                     encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]) -> None:
    """Encode a text view in batches of rows sorted by length (:func:`length_order`), each written at its own row;
    resumable by positions in that order. ``texts[i]``: the texts of row ``i``; ``encode(rows)``: their features."""
    n = len(texts)
    order = length_order(texts)
    w = store.writer(job.side, job.view, n, job.row_shape, job.mask_shape, job.fingerprint, order=order)
    if w.start_row:
        log.info("%s: resuming at row %d of %d", job.name, w.start_row, n)
    for start in tqdm(range(w.start_row, n, batch_size), desc=job.name, unit="batch", leave=False):
        end = min(n, start + batch_size)
        data, mask = encode(order[start:end])
        w.write(start, data, mask)
    w.commit(job.info)


def _done_presence(store: FeatureStore, side: str, writers: dict, start: int, grid: bool) -> np.ndarray | None:
    """Which of the first ``start`` rows (written by an earlier run) had a usable image, from a mask that says so."""
    if "image" in writers:
        return np.asarray(writers["image"].mask[:start])
    if grid:  # grid regions are masked exactly where the image is absent
        return np.asarray(writers["regions"].mask[:start])[:, 0]
    if store.has(side, "image"):
        return np.asarray(store.load(side, "image").mask[:start])
    return None


def _write_image_views(store: FeatureStore, side: str, ids: list[str], paths: list[Path | None],
                       jobs: list[_Job], image_enc: ImageEncoder, batch_size: int, num_workers: int,
                       crops: _CropPlan | None = None, refused: dict[int, str] | None = None) -> ImageReport:
    """Write the image views of one side (``image`` and, for mentions, ``regions``: the patch grid, or with
    ``crops`` the crops of boxes) in one decoding pass. ``refused``: rows whose image name was refused (their path
    is ``None``) and why."""
    refused = refused or {}
    n = len(paths)
    writers = {j.view: store.writer(side, j.view, n, j.row_shape, j.mask_shape, j.fingerprint) for j in jobs}
    # Resume from the earliest unfinished row; rows are deterministic, so rewriting a few is harmless.
    start = (min(w.start_row for w in writers.values()) // batch_size) * batch_size
    report = ImageReport()
    if start:
        log.info("%s images: resuming at row %d of %d", side, start, n)
        # rows finished by the earlier run: their masks say which images were unusable
        done = _done_presence(store, side, writers, start, grid=crops is None)
        for j in np.flatnonzero(~done) if done is not None else ():
            report.add(ids[j], refused.get(j, "no image") if paths[j] is None
                       else "missing or unreadable (earlier run)")
    if crops is None:
        batches = iter_decoded(paths[start:], batch_size, num_workers, image_enc.preprocess)
    else:
        batches = iter_decoded(paths[start:], batch_size, num_workers, crops.prepare, extras=crops.boxes[start:])
    i = start
    for items in tqdm(batches, total=(n - start + batch_size - 1) // batch_size, desc=f"{side} images",
                      unit="batch", leave=False):
        if crops is None:
            glob, regs, present, reasons = _encode_image_batch(items, image_enc)
            rmask = np.repeat(present[:, None], image_enc.n_regions, axis=1)
        else:
            cb = encode_crop_batch(items, image_enc, crops.max_regions, batch_size, crops.stats,
                                   whole_images="image" in writers)
            glob, regs, rmask, present, reasons = cb.glob, cb.regions, cb.regions_mask, cb.present, cb.reasons
        for j, reason in enumerate(reasons):
            report.add(ids[i + j], refused.get(i + j, reason))
        end = i + len(items)
        if "image" in writers and end > writers["image"].start_row:
            writers["image"].write(i, glob, present)
        if "regions" in writers and end > writers["regions"].start_row:
            writers["regions"].write(i, regs, rmask)
        i = end
    images_info = report.to_json()
    for j in jobs:
        info = {**j.info, "images": images_info}
        if j.view == "regions" and crops is not None:
            per_image = np.asarray(writers["regions"].mask).sum(1)
            info["boxes"] = {**crops.stats.to_json(), "rows_counted": n - start,
                             "regions_per_image": np.bincount(per_image, minlength=crops.max_regions + 1).tolist()}
        writers[j.view].commit(info)
    return report


def build_features(data: str | Path, out: str | Path, settings: FeatureSettings | None, batch_size: int = 64,
                   num_workers: int = 2, device: str = "auto", force: bool = False,
                   progress: bool = True, detector_batch_size: int = 8,
                   imports: Sequence[ImportSpec] = (), views: Sequence[str] | None = None) -> dict[str, Any]:
    """Write (or update) the feature cache ``out`` for the dataset ``data``; returns a summary
    ``{"written": [...], "skipped": [...], "imported": [...], "left_out": [...], "images": {side: report}}``
    (+ ``"regions"``: box counts, with crops).

    ``imports`` are views read from a release's files instead of encoding (:mod:`data_process.encode.precomputed`);
    with ``settings=None`` (no encoder) only they are written. ``views`` (``SIDE.VIEW`` names; ``None``: every view)
    are the views to encode: the others are left out (those a model does not read; :func:`views_of_config`)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    unknown = [v for v in views or () if v not in ALL_VIEWS]
    if unknown:
        raise ValueError(f"--views: unknown view {unknown[0]!r} (views: {', '.join(ALL_VIEWS)})")
    if settings is not None and settings.regions.mode == "file" and "entity.regions" in (views or ()):
        raise ValueError("--views entity.regions: --regions file names boxes of mention images; encode the entity "
                         "regions with --regions grid or detector")
    if settings is None and not imports:
        raise ValueError("nothing to write: name the encoders (--clip) or views to import (--import)")
    names = [spec.view for spec in imports]
    if len(set(names)) != len(names):
        raise ValueError(f"--import names a view twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    ds = load_dataset(data)
    store = FeatureStore(out)
    ms, es = ds.mentions, ds.entities
    m_ids, e_ids = [m.id for m in ms], [e.id for e in es]
    store.set_ids("mention", m_ids)
    store.set_ids("entity", e_ids)
    regions = settings.regions if settings is not None else RegionSettings()
    boxes_file = read_boxes_file(regions.boxes, ms) if regions.mode == "file" else None  # checked before any work
    boxes_sha = boxes_file.sha256 if boxes_file is not None else None
    e_images = [e.images[0] if e.images else None for e in es]  # an entity's image view: its first image
    m_paths, m_refused = dataset_image_paths(ds.root, [m.image for m in ms])
    e_paths, e_refused = dataset_image_paths(ds.root, e_images)
    with ImageHasher(store.root / HASHES_FILE) as hasher:
        m_shas, e_shas = hasher.hash_all(m_paths), hasher.hash_all(e_paths)
        max_len = settings.max_len if settings is not None else store.meta().get("max_len")
        prepared = [prepare_import(spec, ms if spec.side == "mention" else es,
                                   m_ids if spec.side == "mention" else e_ids, max_len, hasher) for spec in imports]
    fresh = [imp for imp in prepared if force or not store.has(imp.spec.side, imp.spec.view.split(".")[1],
                                                                 fingerprint=imp.fingerprint, verify=True)]
    summary: dict[str, Any] = {"written": [], "skipped": [imp.spec.view for imp in prepared if imp not in fresh],
                               "imported": [imp.spec.view for imp in fresh], "left_out": [], "images": {}}
    base_meta: dict[str, Any] = {"dataset": str(data)}
    todo: list[str] = []
    if settings is not None:
        text_limit = settings.text_max_len or text_positions(settings.text_name)
        fps = _fingerprints(ds, settings, _image_inputs([m.image for m in ms], m_shas),
                            _image_inputs(e_images, e_shas), text_limit, boxes_sha)
        fps = {name: fp for name, fp in fps.items() if name not in names}
        if views is not None:
            # (a view written only when asked is never "left out": the default leaves it out too)
            summary["left_out"] = [name for name in fps if name not in views and name not in ASKED_VIEWS]
            fps = {name: fp for name, fp in fps.items() if name in views}
        else:                                   # the default: every view but those written only when asked
            fps = {name: fp for name, fp in fps.items() if name not in ASKED_VIEWS}
        todo = [name for name, fp in fps.items()
                if force or not store.has(*name.split("."), fingerprint=fp, verify=True)]
        summary["written"] = todo
        summary["skipped"] = [name for name in fps if name not in todo] + summary["skipped"]
        base_meta.update(text_encoder=settings.text_name, image_encoder=settings.clip, max_len=settings.max_len,
                         text_max_len=text_limit, desc_max_len=settings.desc_max_len,
                         region_grid=settings.region_grid, jpeg_draft=settings.jpeg_draft,
                         regions=regions.provenance(settings.region_grid, boxes_sha))
    elif any(imp.spec.view == "mention.sentence" for imp in prepared):
        base_meta["max_len"] = next(imp.row_shape[0] for imp in prepared if imp.spec.view == "mention.sentence")
    for name in summary["skipped"]:
        log.info("%s: up to date, skipped", name)
    if not todo and not fresh:
        store.update_meta(**base_meta)
        return summary

    encoders = None
    if todo:
        encoders = _load_encoders(settings, device=device, max_len=settings.max_len, region_grid=settings.grid,
                                  batch_size=batch_size, text_max_len=text_limit, jpeg_draft=settings.jpeg_draft)
        if "entity.desc_tokens" in todo and not 2 <= settings.desc_max_len <= encoders[0].limit:
            raise ValueError(f"--desc_max_len {settings.desc_max_len} must be in [2, {encoders[0].limit}] (the text "
                             f"encoder's positions, {settings.text_name})")
        known = {"text": (encoders[0].dim, f"the text encoder {settings.text_name}"),
                 "image": (encoders[1].dim, f"the image encoder {settings.clip}")}
    else:
        known = _cache_dims(store.meta(), exclude=set(names))
    dims = check_dims(prepared, known)  # before anything is written
    store.update_meta(**base_meta, **{f"{space}_dim": d for space, d in dims.items()})
    for imp in fresh:
        log.info("%s: importing %s", imp.spec.view, imp.spec.path)
        write_import(store, imp)
    if encoders is not None:
        _encode_views(ds, store, settings, todo, fps, encoders, (m_paths, m_refused), m_shas, (e_paths, e_refused),
                      e_shas, boxes_file, batch_size, num_workers, device, progress, detector_batch_size, summary)
    return summary


def _cache_dims(meta: dict[str, Any], exclude: set[str]) -> dict[str, tuple[int, str]]:
    """The text / image dimensions the cache's views (other than ``exclude``) already have, from ``meta.json``."""
    known = {}
    for space in ("text", "image"):
        others = [v for v in meta.get("views", {}) if v in VIEWS and VIEWS[v][0] == space and v not in exclude]
        if others and meta.get(f"{space}_dim"):
            known[space] = (int(meta[f"{space}_dim"]), f"meta.json {space}_dim, views {', '.join(sorted(others))}")
    return known


def _crop_plan(store: FeatureStore, regions: RegionSettings, image_enc: ImageEncoder, paths: list[Path | None],
               shas: list[str | None], boxes_file, device: str, detector_batch_size: int, num_workers: int,
               progress: bool) -> tuple[_CropPlan, dict[str, Any]]:
    """The crops of one side's regions view (``--regions detector``: the detector's boxes, detections cached by
    image content; ``file``: the boxes file's, mentions only) and what ``meta.json`` records of them."""
    R = regions.max_regions
    if boxes_file is not None:
        boxes = boxes_file.boxes_per_row(len(paths))
        info: dict[str, Any] = {"boxes_file_keys": boxes_file.keys}
    else:
        boxes, counts = detect_all(paths, shas, DetectionSettings(regions.detector, regions.threshold, regions.labels),
                                   store.root / DETECTIONS_FILE, device, detector_batch_size, num_workers, progress)
        info = {"detections": counts}
    return _CropPlan(PrepareCrops(image_enc.preprocess, R),
                     [select_boxes(b, regions.labels, regions.threshold) for b in boxes], R), info


def _encode_views(ds, store: FeatureStore, settings: FeatureSettings, todo: list[str], fps: dict[str, str],
                  encoders: tuple[TextEncoder, ImageEncoder], m_images: tuple[list[Path | None], dict[int, str]],
                  m_shas: list[str | None], e_images: tuple[list[Path | None], dict[int, str]],
                  e_shas: list[str | None], boxes_file, batch_size: int, num_workers: int, device: str,
                  progress: bool, detector_batch_size: int, summary: dict[str, Any]) -> None:
    """Encode the views ``todo`` with the loaded encoders (text views, then image views one side at a time).
    ``m_images`` / ``e_images``: the image paths of each side and the rows whose name was refused (why)."""
    text_enc, image_enc = encoders
    (m_paths, m_refused), (e_paths, e_refused) = m_images, e_images
    regions = settings.regions
    ms, es = ds.mentions, ds.entities
    m_ids, e_ids = [m.id for m in ms], [e.id for e in es]
    provenance = store.meta()["regions"]
    dt, di, L, K = text_enc.dim, image_enc.dim, settings.max_len, len(PROFILE_ROWS)
    Ld = settings.desc_max_len
    R = regions.max_regions if regions.crops else image_enc.n_regions
    shapes = {
        "mention.mention": ((dt,), None), "mention.sentence": ((L, dt), (L,)), "mention.context": ((dt,), None),
        "mention.image": ((di,), ()), "mention.regions": ((R, di), (R,)),
        "mention.profile": ((K, dt), (K,)), "entity.desc": ((dt,), None),
        "entity.image": ((di,), ()), "entity.profile": ((dt,), ()),
        "entity.desc_tokens": ((Ld, dt), (Ld,)), "entity.regions": ((R, di), (R,)),
    }
    jobs = {name: _Job(*name.split("."), *shapes[name], fingerprint=fps[name]) for name in todo}
    if "mention.profile" in jobs:
        jobs["mention.profile"].info["rows"] = list(PROFILE_ROWS)
    if "entity.desc_tokens" in jobs:
        jobs["entity.desc_tokens"].info["max_len"] = Ld
    for name in ("mention.regions", "entity.regions"):
        if name in jobs:
            jobs[name].info["regions"] = provenance

    def pooled(texts: list[str]) -> Callable[[np.ndarray], tuple[np.ndarray, None]]:
        return lambda rows: (text_enc.encode_pooled([texts[i] for i in rows]), None)

    def tokens(texts: list[str], length: int | None = None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        def encode(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            f = text_enc.encode([texts[i] for i in rows], length)
            return f.tokens, f.mask
        return encode

    def m_profile(rows: np.ndarray):
        flat, mask = _pooled_or_zero([t for i in rows for t in m_profiles[i]], text_enc)
        return flat.reshape(len(rows), K, dt), mask.reshape(len(rows), K)

    def e_profile(rows: np.ndarray):
        return _pooled_or_zero([e_profiles[i] for i in rows], text_enc)

    mentions, sentences, contexts = [m.mention for m in ms], [m.sentence for m in ms], context_texts(ms)
    descs = [e.text() for e in es]
    m_profiles = [profile_texts(m) for m in ms]
    e_profiles = [entity_profile_text(e) for e in es]
    text_views = {  # view: (the texts of each row, their encoder)
        "mention.mention": ([[t] for t in mentions], pooled(mentions)),
        "mention.sentence": ([[t] for t in sentences], tokens(sentences)),
        "mention.context": ([[t] for t in contexts], pooled(contexts)),
        "mention.profile": (m_profiles, m_profile),
        "entity.desc": ([[t] for t in descs], pooled(descs)),
        "entity.profile": ([[t] for t in e_profiles], e_profile),
        "entity.desc_tokens": ([[t] for t in descs], tokens(descs, Ld)),
    }
    sides = {"mention": (m_ids, m_paths, m_shas, m_refused, boxes_file),
             "entity": (e_ids, e_paths, e_shas, e_refused, None)}
    with tqdm(total=len(todo), desc="views", unit="view", disable=not progress) as bar:
        for name, (texts, fn) in text_views.items():
            if name in jobs:
                _write_text_view(store, jobs[name], texts, batch_size, fn)
                bar.update(1)
        for side, (ids, paths, shas, refused, boxes) in sides.items():
            side_jobs = [jobs[n] for n in (f"{side}.image", f"{side}.regions") if n in jobs]
            if not side_jobs:
                continue
            crops = None
            if regions.crops and f"{side}.regions" in jobs:
                crops, found = _crop_plan(store, regions, image_enc, paths, shas, boxes, device,
                                          detector_batch_size, num_workers, progress)
                jobs[f"{side}.regions"].info.update(found)
                summary.setdefault("regions", {}).update(found if side == "mention" else {"entity": found})
            rep = _write_image_views(store, side, ids, paths, side_jobs, image_enc, batch_size, num_workers,
                                     crops, refused)
            summary["images"][side] = rep.to_json()
            if crops is not None and side == "mention":
                summary["regions"]["boxes"] = store.meta()["views"]["mention.regions"]["boxes"]
            bar.update(len(side_jobs))


def _report(summary: dict[str, Any], out: Path) -> str:
    lines = [f"feature cache {out}: wrote {len(summary['written'])} views, imported "
             f"{len(summary.get('imported', []))}, skipped {len(summary['skipped'])} up-to-date views"
             + (f", left out {', '.join(summary['left_out'])} (not in --views)" if summary.get("left_out") else "")]
    for side, rep in summary["images"].items():
        lines.append(f"  {side} images: {rep['no_image']} records without an image, {rep['failed']} missing or "
                     "unreadable (zero feature, mask False)")
        for rid, why in zip(rep["failed_ids"], rep["failed_reasons"]):
            lines.append(f"    {side} {rid}: {why}")
    regions = summary.get("regions", {})
    if "detections" in regions:
        c = regions["detections"]
        lines.append(f"  detections: {c['detected']} images detected, {c['cached']} from the cache")
    if "boxes" in regions:
        b = regions["boxes"]
        lines.append(f"  region boxes: {b['boxes_kept']} crops kept, {b['clipped']} boxes clipped to the image, "
                     f"{b['dropped']} outside it dropped, {b['images_without_boxes']} images without boxes "
                     "(regions masked)")
    return "\n".join(lines)


def check_model_arg(flag: str, name: str | None) -> None:
    """A model named by a local path must be a folder that exists (a ``ValueError`` naming it, before a hub lookup
    that retries over the network); a name like ``org/model`` whose first part is no local folder is a hub name."""
    if name is None:
        return
    path = Path(name).expanduser()
    local = name.startswith((os.sep, ".", "~")) or path.exists() or (len(path.parts) > 1 and
                                                                     Path(path.parts[0]).is_dir())
    if local and not path.is_dir():
        raise ValueError(f"{name}: {flag}: model folder not found" if not path.exists()
                         else f"{name}: {flag}: not a model folder (a model is a folder with config.json)")


def _load_encoders(settings: FeatureSettings, **kwargs) -> tuple[TextEncoder, ImageEncoder]:
    """:func:`load_encoders`, with a model that cannot be loaded as one ``ValueError`` naming it."""
    try:
        return load_encoders(settings.clip, settings.text_encoder, **kwargs)
    except (OSError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{settings.clip}: cannot load the encoders (--clip {settings.clip}, --text_encoder "
                         f"{settings.text_encoder}): {first}") from None


def _labels(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def views_of_config(path: str | Path) -> tuple[str, ...] | None:
    """The ``views`` list of a training config file (``base:`` chains followed; its other keys are the training
    command's), or ``None`` when it names none (every view)."""
    views = load_settings(path, {VIEWS_KEY: Setting(list)}, ignore_unknown=True).get(VIEWS_KEY)
    if views is None:
        return None
    if not all(isinstance(v, str) for v in views):
        raise ValueError(f"{path}: {VIEWS_KEY}: expected a list of SIDE.VIEW names, got {views!r}")
    return tuple(views)


def main(argv: list[str] | None = None) -> int:
    ap = ToolkitParser(prog="dim-mel features",
                                 description="Encode a unified dataset's views into a feature cache.")
    ap.add_argument("--data", required=True, type=Path, help="unified dataset folder")
    ap.add_argument("--out", required=True, type=Path, help="feature cache folder (created or updated)")
    ap.add_argument("--views", type=_labels, default=None,
                    help="the views to encode, SIDE.VIEW comma-separated (default: every view, what the default "
                         f"model reads): {', '.join(VIEWS)}")
    ap.add_argument("--config", type=Path, default=None,
                    help="a training config (configs/*.yaml): encode the views its 'views' key names (those its "
                         "model reads; no key: every view); --views overrides it")
    ap.add_argument("--clip", default=None,
                    help="vision-language model (CLIP, SigLIP, SigLIP 2, any AutoModel with get_text_features and "
                         "get_image_features): Hugging Face name or local folder (required unless only --import)")
    ap.add_argument("--text_encoder", default=None,
                    help="text encoder name or folder (default: the --clip model's text tower); e.g. a BERT/MiniLM "
                         "model")
    ap.add_argument("--max_len", type=int, default=32, help="sentence tokens kept (padded/truncated; DIM: 32)")
    ap.add_argument("--desc_max_len", type=int, default=40,
                    help="entity description tokens kept in entity.desc_tokens (a view written only when --views or "
                         "--config asks for it; MIMIC's text length: 40)")
    ap.add_argument("--text_max_len", type=int, default=None,
                    help="tokens kept of every other text (mention, description, profile rows; default: the text "
                         "encoder's own limit from its config, 77 for CLIP)")
    g = ap.add_argument_group("image regions (mention.regions)")
    g.add_argument("--regions", choices=MODES, default="grid",
                   help="grid: pooled patch tokens; detector: crops of an object detector's boxes; file: crops of "
                        "boxes from --boxes")
    g.add_argument("--region_grid", type=int, default=3, help="--regions grid: grid x grid pooled patch tokens")
    g.add_argument("--detector", default=None,
                   help="--regions detector: transformers object detector, name or folder (DETR, RT-DETR, YOLOS, "
                        "OWLv2, ...)")
    g.add_argument("--boxes", default=None,
                   help="--regions file: JSON Lines {image key: [[x0, y0, x1, y1, score, label], ...]} (docs/DATA.md)")
    g.add_argument("--max_regions", type=int, default=9, help="K: crops kept per image (the highest scores)")
    g.add_argument("--region_score", type=float, default=None,
                   help="keep boxes scoring at least this (default: 0.5 for a detector, all boxes of a file)")
    g.add_argument("--region_labels", type=_labels, default=(),
                   help="comma-separated classes to keep, e.g. person,car (the detector's id2label names; an OWLv2 "
                        "detector's text queries; a boxes file's labels)")
    g.add_argument("--detector_batch_size", type=int, default=8, help="images per detector forward pass")
    g = ap.add_argument_group("precomputed features from a release (docs/DATA.md)")
    g.add_argument("--import", dest="imports", action="append", default=[], metavar="SIDE.VIEW=FILE[,ids=IDS][,...]",
                   help="read a view from a release's file instead of encoding it (repeatable): .h5/.hdf5, .npy, "
                        ".npz, .pt; options ids=IDS.json (the id of each row), key=NAME (array name, default "
                        "features), by=id|image (mention views: ids are mention ids or image names); e.g. "
                        "entity.desc=gt_feats_brief.h5,ids=qids_ordered.json")
    g.add_argument("--import_ids", default=None, help="id list (JSON) for every --import that names no ids=")
    add_bool(ap, "jpeg_draft", True, "decode large JPEGs at a reduced scale before the resize (several times faster; pixels "
                         "differ slightly from a full decode): true (default) or false")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_workers", type=int, default=None,
                    help="image decoding worker processes (0: in the main process; default: CPU cores - 1 on a GPU, "
                         "where decoding is the bottleneck, else min(2, CPU cores))")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add_bool(ap, "force", False, "re-encode every view even when up to date")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for encoding (0: auto = CPU cores minus decoding workers, at least 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        regions = RegionSettings(mode=args.regions, detector=args.detector, boxes=args.boxes,
                                 max_regions=args.max_regions, score=args.region_score, labels=args.region_labels)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        imports = [ImportSpec.parse(text, args.import_ids) for text in args.imports]
    except ValueError as exc:
        ap.error(str(exc))
    if args.clip is None and not imports:
        ap.error("--clip is required (unless every view to write comes from --import)")
    settings = None if args.clip is None else FeatureSettings(
        clip=args.clip, text_encoder=args.text_encoder, max_len=args.max_len, region_grid=args.region_grid,
        text_max_len=args.text_max_len, desc_max_len=args.desc_max_len, regions=regions, jpeg_draft=args.jpeg_draft)
    for flag, name in (("--clip", args.clip), ("--text_encoder", args.text_encoder),
                       ("--detector", args.detector)):
        check_model_arg(flag, name)
    try:
        device = resolve_device(args.device)  # fail early on a malformed device string
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device}: {str(exc).splitlines()[0]}") from None
    if args.num_workers is None:
        cores = os.cpu_count() or 1
        args.num_workers = max(1, cores - 1) if device.type == "cuda" else min(2, cores)
    torch.set_num_threads(args.threads if args.threads > 0 else cpu_threads(args.num_workers))
    views = args.views if args.views is not None else (views_of_config(args.config) if args.config else None)
    summary = build_features(args.data, args.out, settings, batch_size=args.batch_size,
                             num_workers=args.num_workers, device=args.device, force=args.force,
                             detector_batch_size=args.detector_batch_size, imports=imports, views=views)
    print(_report(summary, args.out))
    return 0


if __name__ == "__main__":
    run_main(main)
