"""Region boxes from a transformers object detector (``--regions detector --detector NAME_OR_PATH``), cached.

Any ``AutoModelForObjectDetection`` with its image processor (DETR, Conditional / Deformable DETR, RT-DETR, YOLOS,
...) or an open-vocabulary OWL-ViT / OWLv2 (``AutoModelForZeroShotObjectDetection``; its text queries are
``--region_labels``). Kept: boxes scoring above the threshold, of the ``labels`` when given (closed-set detectors:
names from the model's ``id2label``, checked), clipped to the image, highest score first. No extra NMS: DETR-style
detectors predict a set; OWL models may return overlapping boxes.

Each image is preprocessed by the detector's processor in a decoding worker (:class:`DetectorPreprocess`); a batch
is padded bottom/right with a ``pixel_mask`` (what the processors do for a batch) and detected on the device.

Detections are cached in an append-only :class:`~data_process.core.durable_io.JsonlCache` (``detections.jsonl`` in
the feature folder), keyed by ``stable_hash(image sha256, detector files, threshold, labels)``: a rerun, another
``--max_regions``, or the same image under another mention costs no detection. A killed run keeps every finished
batch.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from data_process.core.devices import resolve_device
from data_process.core.durable_io import JsonlCache
from data_process.core.fingerprints import MISSING, UNREADABLE, stable_hash
from data_process.core.images import iter_decoded
from data_process.encode.boxes_file import Box
from data_process.encode.encoders import describe_model_files
from data_process.encode.regions import select_boxes

log = logging.getLogger(__name__)

TEXT_QUERY_TYPES = ("owlv2", "owlvit")  # open-vocabulary: --region_labels are the text queries
DETECTIONS_FILE = "detections.jsonl"


@dataclass
class DetectorInputs:
    """One image preprocessed for the detector: its arrays and the original ``(width, height)``."""

    arrays: dict[str, np.ndarray]
    size: tuple[int, int]


@dataclass(frozen=True)
class DetectorPreprocess:
    """The detector's image processor on one decoded image (picklable; runs in a decoding worker)."""

    processor: Any

    def __call__(self, img: Any) -> DetectorInputs:
        out = self.processor(images=img, return_tensors="np")
        return DetectorInputs(arrays={"pixel_values": np.asarray(out["pixel_values"][0], dtype=np.float32)},
                              size=img.size)


def pad_batch(items: Sequence[DetectorInputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` [B, 3, H, W] padded bottom/right with zeros to the largest image, and ``pixel_mask``
    [B, H, W] (1 on real pixels)."""
    h = max(it.arrays["pixel_values"].shape[1] for it in items)
    w = max(it.arrays["pixel_values"].shape[2] for it in items)
    pixels = np.zeros((len(items), 3, h, w), np.float32)
    mask = np.zeros((len(items), h, w), np.int64)
    for i, it in enumerate(items):
        px = it.arrays["pixel_values"]
        pixels[i, :, : px.shape[1], : px.shape[2]] = px
        mask[i, : px.shape[1], : px.shape[2]] = 1
    return torch.from_numpy(pixels), torch.from_numpy(mask)


class Detector:
    """A loaded detector: ``detect(items)`` -> boxes per image (clipped, filtered, highest score first)."""

    def __init__(self, name_or_path: str, device: str | torch.device = "auto", score: float = 0.5,
                 labels: Sequence[str] = ()):
        from transformers import (AutoConfig, AutoImageProcessor, AutoModelForObjectDetection,
                                  AutoModelForZeroShotObjectDetection, AutoProcessor)

        self.name = str(name_or_path)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.score = float(score)
        self.labels = tuple(labels)
        kind = AutoConfig.from_pretrained(self.name).model_type
        self.text_queries = kind in TEXT_QUERY_TYPES
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.text_queries:
            if not self.labels:
                raise ValueError(f"{self.name}: an open-vocabulary detector ({kind}) needs --region_labels, its "
                                 "text queries (e.g. person,car)")
            processor = AutoProcessor.from_pretrained(self.name)
            self.image_processor = processor.image_processor
            model = AutoModelForZeroShotObjectDetection.from_pretrained(self.name)
            # OWL pads its queries to the text tower's length (16), as its processor does
            queries = processor.tokenizer(list(self.labels), padding="max_length", truncation=True,
                                          max_length=model.config.text_config.max_position_embeddings,
                                          return_tensors="pt")
            self.queries = {k: v.to(self.device) for k, v in queries.items() if k in ("input_ids", "attention_mask")}
        else:
            self.image_processor = AutoImageProcessor.from_pretrained(self.name)
            model = AutoModelForObjectDetection.from_pretrained(self.name)
            names = {str(v) for v in model.config.id2label.values()}
            unknown = [label for label in self.labels if label not in names]
            if unknown:
                shown = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
                raise ValueError(f"--region_labels {','.join(unknown)}: not a class of {self.name} (its id2label: "
                                 f"{shown})")
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.takes_mask = "pixel_mask" in inspect.signature(self.model.forward).parameters
        self.preprocess = DetectorPreprocess(self.image_processor)

    def label_name(self, index: int) -> str:
        return self.labels[index] if self.text_queries else str(self.model.config.id2label[index])

    @torch.inference_mode()
    def detect(self, items: Sequence[DetectorInputs]) -> list[list[Box]]:
        if not items:
            return []
        pixels, mask = pad_batch(items)
        inputs: dict[str, torch.Tensor] = {"pixel_values": pixels.to(self.device, next(self.model.parameters()).dtype)}
        if self.takes_mask:
            inputs["pixel_mask"] = mask.to(self.device)
        if self.text_queries:
            inputs.update({k: v.repeat(len(items), 1) for k, v in self.queries.items()})
            # OWL pads each image to a square (bottom/right) before resizing: boxes are relative to that square.
            targets = [(max(w, h), max(w, h)) for w, h in (it.size for it in items)]
        else:
            targets = [(h, w) for w, h in (it.size for it in items)]
        outputs = self.model(**inputs)
        for key in ("logits", "pred_boxes"):
            if getattr(outputs, key, None) is not None:
                setattr(outputs, key, getattr(outputs, key).float())
        results = self.image_processor.post_process_object_detection(outputs, threshold=self.score,
                                                                     target_sizes=targets)
        out = []
        for it, res in zip(items, results):
            w, h = it.size
            boxes = []
            for (x0, y0, x1, y1), s, lab in zip(res["boxes"].tolist(), res["scores"].tolist(),
                                                 res["labels"].tolist()):
                label = self.label_name(int(lab))
                if self.labels and label not in self.labels:
                    continue
                x0, y0 = round(max(0.0, x0), 2), round(max(0.0, y0), 2)
                x1, y1 = round(min(float(w), x1), 2), round(min(float(h), y1), 2)
                if x1 - x0 >= 1 and y1 - y0 >= 1:  # at least a pixel inside the image
                    boxes.append(Box(x0, y0, x1, y1, round(float(s), 5), label))
            out.append(select_boxes(boxes))
        return out


@dataclass(frozen=True)
class DetectionSettings:
    """What decides an image's detections besides its bytes (the cache key)."""

    detector: str
    score: float
    labels: tuple[str, ...]

    def key(self, image_sha256: str, detector_id: Any) -> str:
        return stable_hash({"image": image_sha256, "detector": detector_id, "score": self.score,
                            "labels": list(self.labels)})


def detect_all(paths: Sequence[Path | None], shas: Sequence[str | None], settings: DetectionSettings,
               cache_path: Path, device: str | torch.device = "auto", batch_size: int = 8, num_workers: int = 0,
               progress: bool = True, detector: Detector | None = None) -> tuple[list[list[Box]], dict[str, int]]:
    """Boxes for every row: from the detections cache, detecting (and caching) only images not in it (with
    ``detector``, else one loaded from ``settings`` only then). Rows without a usable image get no boxes. Returns
    the boxes and counts ``{"detected", "cached", "unreadable"}``."""
    detector_id = describe_model_files(settings.detector)
    keys = [None if sha in (None, MISSING, UNREADABLE) else settings.key(sha, detector_id) for sha in shas]
    counts = {"detected": 0, "cached": 0, "unreadable": 0}
    with JsonlCache(cache_path) as cache:
        todo: dict[str, Path] = {}
        for key, path in zip(keys, paths):
            if key is not None and key not in cache and key not in todo:
                todo[key] = path
        counts["cached"] = len({k for k in keys if k is not None}) - len(todo)
        if todo:
            log.info("detecting regions in %d images with %s (%d cached)", len(todo), settings.detector,
                     counts["cached"])
            if detector is None:
                detector = Detector(settings.detector, device, score=settings.score, labels=settings.labels)
            todo_keys = list(todo)
            batches = iter_decoded([todo[k] for k in todo_keys], batch_size, num_workers, detector.preprocess)
            for batch in tqdm(batches, total=(len(todo_keys) + batch_size - 1) // batch_size, desc="detections",
                              unit="batch", leave=False, disable=not progress):
                ok = [(i, x) for i, x, _ in batch if x is not None]
                counts["unreadable"] += len(batch) - len(ok)
                found = detector.detect([x for _, x in ok])
                cache.put_many([(todo_keys[i], {"boxes": [b.to_json() for b in boxes], "size": list(x.size),
                                                "detector": settings.detector})
                                for (i, x), boxes in zip(ok, found)])
                counts["detected"] += len(ok)
        out = []
        for key in keys:
            rec = cache.get(key) if key is not None else None
            out.append([Box.from_json(b) for b in rec["boxes"]] if rec is not None else [])
    return out, counts
