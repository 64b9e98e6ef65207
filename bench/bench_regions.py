"""Throughput of detector regions (``--regions detector``): detection, then crop encoding, through the feature
step's own code path.

    python bench/bench_regions.py --out bench/results/regions_cpu                  # CPU, a few minutes
    python bench/bench_regions.py --device cuda --images 512 --out bench/results/regions_h100
    python bench/bench_regions.py --small --out /tmp/regions_small                  # smoke test (seconds)

Models are full-size architectures built from their default configs with random weights (speed does not depend on
the weights): a DETR with transformers' own ResNet-50 backbone (``DetrConfig(use_timm_backbone=False)``, 100
queries, its image processor's 800-1333 px resize) and a CLIP ViT-B/32 image tower (default ``CLIPConfig``).
``--small`` swaps in the tiny test models. Images: synthetic 500x375 JPEGs (smooth random content + noise).
With random weights the scores are meaningless, so ``--region_score 0`` keeps K boxes per image: the worst case
for crop encoding (K crops + the whole image per image).

Stages, each timed on its own (``torch.cuda.synchronize()`` before every clock read):

* ``decode``: ``iter_decoded`` with the detector's preprocessing in the workers, nothing else (the CPU ceiling);
* ``detect``: ``data_process.encode.detector.detect_all`` into a fresh detections cache (decode + preprocess in
  workers, padded batches on the device, post-processing, cache appends);
* ``detect_cached``: the same call again (every image in ``detections.jsonl``: what a rerun costs);
* ``crops``: ``iter_decoded`` + ``PrepareCrops`` (crop + CLIP preprocessing in the workers) +
  ``encode_crop_batch`` (whole image + K crops through the image tower, fp16 on GPU);
* ``total``: detect + crops, images/s of the whole region view.

Writes ``OUT.json`` (every number, device, settings) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_process.core.devices import cpu_threads, resolve_device
from data_process.core.fingerprints import ImageHasher
from data_process.core.images import iter_decoded
from data_process.encode.detector import DetectionSettings, Detector, detect_all
from data_process.encode.encoders import ImageEncoder
from data_process.encode.regions import CropStats, PrepareCrops, encode_crop_batch, select_boxes
from nel_model.runs import cpu_model


def write_jpegs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``n`` distinct JPEGs: smooth random colour fields + noise, quality 90."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def build_models(folder: Path, small: bool) -> tuple[Path, Path, str, str]:
    """Save a detector and a CLIP (model + processor) to ``folder``; returns their paths and descriptions."""
    if small:
        from data_process.fixtures.tiny_models.clip import save_tiny_clip
        from data_process.fixtures.tiny_models.detector import save_tiny_detector

        return (save_tiny_detector(folder / "detector"), save_tiny_clip(folder / "clip", image_size=32),
                "tiny DETR (test fixture)", "tiny CLIP (test fixture)")
    from transformers import CLIPConfig, CLIPModel, DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    det_dir, clip_dir = folder / "detector", folder / "clip"
    backbone = ResNetConfig(out_features=["stage4"])  # ResNet-50 layout
    torch.manual_seed(0)
    DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                      backbone_config=backbone)).save_pretrained(det_dir)
    DetrImageProcessorPil().save_pretrained(det_dir)
    CLIPModel(CLIPConfig()).save_pretrained(clip_dir)
    CLIPImageProcessorPil().save_pretrained(clip_dir)
    return det_dir, clip_dir, "DETR, ResNet-50 backbone (default DetrConfig, random weights)", \
        "CLIP ViT-B/32 image tower (default CLIPConfig, random weights)"


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    workers = args.workers if args.workers is not None else (
        max(1, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 1)
    threads = args.threads or (torch.get_num_threads() if device.type == "cuda" else cpu_threads(workers))
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_regions_", dir=args.tmp))
    paths = write_jpegs(tmp / "images", args.images)
    det_dir, clip_dir, det_name, clip_name = build_models(tmp / "models", args.small)
    detector = Detector(str(det_dir), device, score=args.region_score)
    from transformers import CLIPModel

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    clip = CLIPModel.from_pretrained(str(clip_dir)).to(device=device, dtype=dtype).eval()
    encoder = ImageEncoder(str(clip_dir), device, region_grid=None, clip_model=clip)
    with ImageHasher(tmp / "image_hashes.jsonl") as hasher:
        shas = hasher.hash_all(paths)
    settings = DetectionSettings(str(det_dir), args.region_score, ())
    n, k = len(paths), args.max_regions

    # warm-up (one batch through each model), outside the clocks
    warm = next(iter(iter_decoded(paths[: args.detector_batch_size], args.detector_batch_size, 0,
                                  detector.preprocess)))
    detector.detect([x for _, x, _ in warm])
    encode_crop_batch([(0, PrepareCrops(encoder.preprocess, k)(_first_image(paths[0]), []), None)], encoder, k,
                      args.batch_size)

    def decode_only():
        for _ in iter_decoded(paths, args.detector_batch_size, workers, detector.preprocess):
            pass

    def detect():
        return detect_all(paths, shas, settings, cache, device, args.detector_batch_size, workers, progress=False,
                          detector=detector)

    t_decode, _ = timed(decode_only, device)
    cache = tmp / "detections.jsonl"
    t_detect, (boxes, counts) = timed(detect, device)
    t_cached, (boxes2, counts2) = timed(detect, device)
    assert boxes2 == boxes and counts2["cached"] == n
    stats = CropStats()
    kept = [select_boxes(b) for b in boxes]

    def crops():
        for items in iter_decoded(paths, args.batch_size, workers, PrepareCrops(encoder.preprocess, k), extras=kept):
            encode_crop_batch(items, encoder, k, args.batch_size, stats)

    t_crops, _ = timed(crops, device)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}",
           "cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "torch_threads": threads, "workers": workers, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {"env": env, "settings": {"images": n, "image_size": [500, 375], "max_regions": k,
                                     "region_score": args.region_score, "batch_size": args.batch_size,
                                     "detector_batch_size": args.detector_batch_size, "dtype": str(dtype),
                                     "detector": det_name, "image_encoder": clip_name},
            "stages": {"decode": {"s": t_decode, "images_per_s": n / t_decode},
                       "detect": {"s": t_detect, "images_per_s": n / t_detect, **counts},
                       "detect_cached": {"s": t_cached, "images_per_s": n / t_cached, **counts2},
                       "crops": {"s": t_crops, "images_per_s": n / t_crops,
                                 "crops_per_s": stats.boxes_kept / t_crops, **stats.to_json()},
                       "total": {"s": t_detect + t_crops, "images_per_s": n / (t_detect + t_crops)}}}


def _first_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def markdown(res: dict[str, Any]) -> str:
    env, st, s = res["env"], res["settings"], res["stages"]
    lines = [f"Device: **{env['device']}** ({env['cpu_cores']} CPU cores); torch {env['torch']}, {env['torch_threads']} "
             f"torch threads, {env['workers']} decoding workers; {env['time']}.",
             "",
             f"{st['images']} JPEGs of 500x375; detector: {st['detector']}; image encoder: {st['image_encoder']}; "
             f"K = {st['max_regions']} crops per image (score threshold {st['region_score']}), {st['dtype']}.",
             "",
             "| stage | what | seconds | images/s | notes |",
             "|---|---|---:|---:|---|",
             f"| decode | decode + detector preprocessing in workers (ceiling) | {s['decode']['s']:.2f} | "
             f"{s['decode']['images_per_s']:.2f} | |",
             f"| detect | `detect_all`, fresh cache | {s['detect']['s']:.2f} | {s['detect']['images_per_s']:.2f} | "
             f"{s['detect']['detected']} images detected |",
             f"| detect_cached | `detect_all` again (rerun) | {s['detect_cached']['s']:.3f} | "
             f"{s['detect_cached']['images_per_s']:.0f} | {s['detect_cached']['cached']} images from "
             "`detections.jsonl`, no model |",
             f"| crops | crop + encode whole image and K crops | {s['crops']['s']:.2f} | "
             f"{s['crops']['images_per_s']:.2f} | {s['crops']['boxes_kept']} crops, "
             f"{s['crops']['crops_per_s']:.1f} crops/s |",
             f"| total | detect + crops | {s['total']['s']:.2f} | {s['total']['images_per_s']:.2f} | first run; a "
             "rerun only pays the crops |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Detector + crop-encoding throughput of --regions detector.")
    ap.add_argument("--out", type=Path, default=Path("bench/results/regions_cpu"), help="writes OUT.json, OUT.md")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=None, help="default: 16 on CPU, 512 on GPU, 4 with --small")
    ap.add_argument("--max_regions", type=int, default=9)
    ap.add_argument("--region_score", type=float, default=0.0)
    ap.add_argument("--batch_size", type=int, default=64, help="images (and crops) per image-encoder pass")
    ap.add_argument("--detector_batch_size", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: cores - 1 on GPU, 1 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the feature step's default)")
    ap.add_argument("--small", action="store_true", help="tiny test models (smoke test)")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    args = ap.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    if args.images is None:
        args.images = 4 if args.small else (512 if cuda else 16)
    if args.detector_batch_size is None:
        args.detector_batch_size = 8 if cuda else 2
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
