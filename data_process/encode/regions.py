"""The mention image's regions view (``mention.regions`` ``[R, Di]`` + mask ``[R]``): how regions are made.

* ``grid`` (default): the image encoder's patch tokens pooled to a ``region_grid`` x ``region_grid`` grid
  (:mod:`data_process.encode.towers`); R = grid², mask = image present.
* ``detector``: instance crops from an object detector (:mod:`data_process.encode.detector`), as DIM's image view
  is; ``file``: crops of boxes from a JSON Lines file (:mod:`data_process.encode.boxes_file`). R = ``max_regions``
  (K): the K highest-scoring boxes (of ``labels``, when given; above ``score``, when given), each crop encoded by
  the image encoder exactly as a whole image is; rows past the image's boxes are zero with mask False (never a
  random tensor). The whole image stays its own view (``mention.image``).

Crops are cut from the image decoded once, in the decoding workers (:class:`PrepareCrops`), with the encoder's own
preprocessing; the main process encodes whole images and crops in batches (:func:`encode_crop_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from data_process.encode.boxes_file import Box
from data_process.encode.encoders import ImageEncoder, stack_inputs

MODES = ("grid", "detector", "file")
DEFAULT_DETECTOR_SCORE = 0.5


@dataclass(frozen=True)
class RegionSettings:
    """How ``mention.regions`` is made (see the module docstring)."""

    mode: str = "grid"
    detector: str | None = None
    boxes: str | None = None
    max_regions: int = 9
    score: float | None = None  # None: DEFAULT_DETECTOR_SCORE for a detector, no threshold for a boxes file
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--regions must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "detector" and not self.detector:
            raise ValueError("--regions detector needs --detector NAME_OR_PATH (a transformers object detector)")
        if self.mode == "file" and not self.boxes:
            raise ValueError("--regions file needs --boxes FILE (JSON Lines: {image key: [[x0, y0, x1, y1, score, "
                             "label], ...]})")
        if self.mode != "grid" and self.max_regions < 1:
            raise ValueError(f"--max_regions must be at least 1, got {self.max_regions}")

    @property
    def crops(self) -> bool:
        return self.mode != "grid"

    @property
    def threshold(self) -> float | None:
        if self.score is not None:
            return float(self.score)
        return DEFAULT_DETECTOR_SCORE if self.mode == "detector" else None

    def provenance(self, region_grid: int, boxes_sha256: str | None = None) -> dict[str, Any]:
        """How the regions were made, for ``meta.json`` (``meta["regions"]`` and the view's entry)."""
        if self.mode == "grid":
            return {"mode": "grid", "grid": region_grid}
        out: dict[str, Any] = {"mode": self.mode, "max_regions": self.max_regions, "score": self.threshold,
                               "labels": list(self.labels)}
        if self.mode == "detector":
            out["detector"] = self.detector
        else:
            out.update(boxes=self.boxes, boxes_sha256=boxes_sha256)
        return out


def select_boxes(boxes: Sequence[Box], labels: Sequence[str] = (), score: float | None = None) -> list[Box]:
    """Boxes of ``labels`` (all when empty) scoring at least ``score``, highest score first (stable)."""
    wanted = set(labels)
    kept = [b for b in boxes if (not wanted or b.label in wanted) and (score is None or b.score >= score)]
    return sorted(kept, key=lambda b: -b.score)


def clip_box(box: Box, width: int, height: int) -> tuple[tuple[int, int, int, int] | None, bool]:
    """Integer pixel box inside a ``width`` x ``height`` image (``None`` when nothing of it is inside) and whether
    it had to be clipped."""
    clipped = box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height
    x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    x1, y1 = min(width, math.ceil(box.x1)), min(height, math.ceil(box.y1))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None, clipped
    return (x0, y0, x1, y1), clipped


@dataclass
class CropInputs:
    """A decoded image ready to encode: the whole image and up to K crops, preprocessed; boxes clipped / dropped."""

    image: Any
    crops: list[Any]
    clipped: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class PrepareCrops:
    """Runs in a decoding worker: the whole image and the first ``max_regions`` usable boxes' crops, each through
    ``preprocess`` (the image encoder's). Boxes come in score order (:func:`select_boxes`)."""

    preprocess: Any
    max_regions: int

    def __call__(self, img: Any, boxes: Sequence[Box]) -> CropInputs:
        w, h = img.size
        out = CropInputs(image=self.preprocess(img), crops=[])
        for box in boxes:
            if len(out.crops) == self.max_regions:
                break
            pixels, clipped = clip_box(box, w, h)
            if pixels is None:
                out.dropped += 1
                continue
            out.clipped += int(clipped)
            out.crops.append(self.preprocess(img.crop(pixels)))
        return out


@dataclass
class CropStats:
    """Box counts of one run, for ``meta.json``."""

    boxes_kept: int = 0
    clipped: int = 0
    dropped: int = 0
    images_without_boxes: int = 0

    def add(self, item: CropInputs) -> None:
        self.boxes_kept += len(item.crops)
        self.clipped += item.clipped
        self.dropped += item.dropped
        self.images_without_boxes += int(not item.crops)

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class CropBatch:
    glob: np.ndarray  # [b, Di]
    regions: np.ndarray  # [b, K, Di]
    regions_mask: np.ndarray  # [b, K]
    present: np.ndarray  # [b]
    reasons: list[str | None] = field(default_factory=list)


def encode_crop_batch(items: Sequence[tuple[int, CropInputs | None, str | None]], image_enc: ImageEncoder,
                      max_regions: int, crop_batch: int, stats: CropStats | None = None,
                      whole_images: bool = True) -> CropBatch:
    """Encode the whole images (unless ``whole_images`` is False: zeros) and their crops (``crop_batch`` crops a
    forward pass); zeros and mask False where an image or a crop is absent."""
    b, dim = len(items), image_enc.dim
    out = CropBatch(glob=np.zeros((b, dim), np.float32), regions=np.zeros((b, max_regions, dim), np.float32),
                    regions_mask=np.zeros((b, max_regions), bool),
                    present=np.array([x is not None for _, x, _ in items], dtype=bool),
                    reasons=[reason for _, _, reason in items])
    if whole_images and out.present.any():
        out.glob[out.present] = image_enc.encode_global(stack_inputs([x.image for _, x, _ in items if x is not None]))
    flat = [(j, r, crop) for j, (_, x, _) in enumerate(items) if x is not None for r, crop in enumerate(x.crops)]
    for s in range(0, len(flat), crop_batch):
        chunk = flat[s:s + crop_batch]
        rows, slots = np.array([j for j, _, _ in chunk]), np.array([r for _, r, _ in chunk])
        out.regions[rows, slots] = image_enc.encode_global(stack_inputs([c for _, _, c in chunk]))
        out.regions_mask[rows, slots] = True
    if stats is not None:
        for _, x, _ in items:
            if x is not None:
                stats.add(x)
    return out
