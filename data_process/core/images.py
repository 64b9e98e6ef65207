"""Image decoding (the one decoder and the one worker-process loader) and CLIP-style preprocessing, with PIL and
numpy only (no torchvision).

:func:`decode_image` never raises for a bad image: it returns the reason instead (``"no image"``,
``"missing: file not found"`` or ``"unreadable: <error>: <message>"``), so the caption and feature steps count and
report missing or unreadable images rather than stopping (or, worse, substituting a random tensor).
:func:`iter_decoded` runs it in DataLoader worker processes; :class:`ImagePreprocess` is a small picklable
dataclass, so it runs there too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from data_process.core.safe_paths import open_regular_file, regular_file_problem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_RESIZE_AREA = 16  # ImagePreprocess resizes a whole image up to this many crops' area (aspect ratios to 16:1)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shortest edge to ``size``, center-crop ``crop_h`` x ``crop_w``, scale to [0, 1], normalise.

    ``uint8_output``: return the cropped pixels as a uint8 tensor ``[3, crop_h, crop_w]`` and leave the scaling and
    normalisation to :meth:`normalize` on the device: a quarter of the bytes cross from the decoding workers (in
    shared memory), the same float32 numbers come out. ``jpeg_draft``: a large JPEG is decoded straight at a
    reduced scale (libjpeg's 1/2, 1/4, 1/8, never below the resize target) before the resize, several times less
    decoding work; its pixels differ slightly from a full decode, so the feature step records the choice."""

    size: int = 224
    crop_h: int = 224
    crop_w: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    uint8_output: bool = False
    jpeg_draft: bool = False

    def _target(self, w: int, h: int) -> tuple[int, int]:
        scale = self.size / min(w, h)
        return max(self.crop_w, round(w * scale)), max(self.crop_h, round(h * scale))

    def draft_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The smallest decode size :func:`decode_image` may ask a JPEG for: the resize target."""
        return self._target(*size)

    def crop_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The part of a ``w`` x ``h`` source that the centre crop of the resized image shows, in source pixels."""
        nw, nh = self._target(w, h)
        left, top = (nw - self.crop_w) // 2, (nh - self.crop_h) // 2
        sx, sy = w / nw, h / nh
        return left * sx, top * sy, (left + self.crop_w) * sx, (top + self.crop_h) * sy

    def pixels(self, img: Image.Image) -> np.ndarray:
        """PIL image -> resized, center-cropped uint8 array [crop_h, crop_w, 3].

        The resized image is at most :data:`MAX_RESIZE_AREA` crops large: beyond that (an aspect ratio past 16:1,
        e.g. a 16000 x 1 "aspect-ratio bomb" whose long side would be resized to 3.6 million pixels) only the
        centre span the crop shows is resized (PIL's ``box``), so the work per image is bounded by the crop.
        Ordinary aspect ratios take the plain resize-then-crop path, pixel for pixel as before."""
        if img.mode != "RGB":  # decode_image already gives RGB: no second full copy of the image
            img = img.convert("RGB")
        w, h = img.size
        nw, nh = self._target(w, h)
        if nw * nh > MAX_RESIZE_AREA * self.crop_w * self.crop_h:
            box = self.crop_box(w, h)
            img = img.resize((self.crop_w, self.crop_h), resample=Image.Resampling(self.resample), box=box)
            return np.asarray(img, dtype=np.uint8)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=Image.Resampling(self.resample))
        left, top = (nw - self.crop_w) // 2, (nh - self.crop_h) // 2
        return np.asarray(img.crop((left, top, left + self.crop_w, top + self.crop_h)), dtype=np.uint8)

    def __call__(self, img: Image.Image) -> Any:
        """PIL image -> float32 array [3, crop_h, crop_w] (``uint8_output``: a uint8 tensor of the pixels)."""
        arr = self.pixels(img)
        if self.uint8_output:
            import torch  # noqa: PLC0415 - only the feature step's workers get here

            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        arr = arr.astype(np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, pixels: Any) -> Any:
        """uint8 pixels ``[B, 3, H, W]`` (a torch tensor, on any device) -> the float32 values ``__call__`` gives."""
        import torch  # noqa: PLC0415

        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ImagePreprocess":
        """Read size, crop, mean and std from a CLIP image processor (Hugging Face name or local folder)."""
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
        except ImportError:  # other transformers versions
            from transformers import CLIPImageProcessor as Proc
        proc = Proc.from_pretrained(name_or_path)

        def get(obj, key):
            return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

        size = proc.size
        short = get(size, "shortest_edge") or get(size, "height")
        crop = proc.crop_size if getattr(proc, "do_center_crop", True) and proc.crop_size else size
        crop_h = get(crop, "height") or short
        crop_w = get(crop, "width") or short
        if not short or not crop_h or not crop_w:
            raise ValueError(f"{name_or_path}: image processor has no usable size/crop_size ({size!r}, {crop!r})")
        resample = proc.resample if isinstance(proc.resample, int) else int(Image.Resampling.BICUBIC)
        return cls(size=int(short), crop_h=int(crop_h), crop_w=int(crop_w),
                   mean=tuple(float(v) for v in proc.image_mean), std=tuple(float(v) for v in proc.image_std),
                   resample=int(resample))


def decode_image(path: str | Path | None, prepare: Callable[[Image.Image], Any] | None = None
                 ) -> tuple[Any, str | None]:
    """Open, fully decode and convert an image to RGB, then ``prepare`` it (a resize, or CLIP preprocessing).

    Returns ``(image, None)`` or ``(None, reason)``; never raises for a bad file (PIL raises many types, and a
    decompression bomb is not even an ``OSError``): a bad image is data, not a crash."""
    if path is None:
        return None, "no image"
    problem = regular_file_problem(path)  # never opens a FIFO or a device (a read would block forever)
    if problem is not None:
        return None, problem
    try:
        with open_regular_file(path) as fh, Image.open(fh) as img:
            if getattr(prepare, "jpeg_draft", False) and img.format == "JPEG":
                img.draft("RGB", prepare.draft_size(img.size))
            img.load()
            rgb = img.convert("RGB")
        return (prepare(rgb) if prepare is not None else rgb), None
    except FileNotFoundError:
        return None, "missing: file not found"
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its type and message
        return None, f"unreadable: {type(exc).__name__}: {exc}"


class _DecodeFiles:
    """Map-style dataset over image paths; items are ``(index, image | None, reason | None)``."""

    def __init__(self, paths: Sequence[str | Path | None], prepare: Callable | None,
                 extras: Sequence[Any] | None = None):
        self.paths = list(paths)
        self.prepare = prepare
        self.extras = None if extras is None else list(extras)
        if self.extras is not None and len(self.extras) != len(self.paths):
            raise ValueError(f"{len(self.extras)} extras for {len(self.paths)} image paths")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        prepare = self.prepare
        if self.extras is not None and prepare is not None:
            extra, base = self.extras[i], self.prepare
            prepare = lambda img: base(img, extra)  # noqa: E731 - built in the worker, never pickled
        image, reason = decode_image(self.paths[i], prepare)
        return i, image, reason


def _as_list(items):
    return items


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with_parent(parent_pid: int, _worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker is killed when the process that started it dies (``kill -9``).

    DataLoader's own watchdog is not enough: a worker whose results are large (PIL images for the captioner go
    through the result pipe by value; the feature step's tensors go through shared memory) blocks writing to that
    pipe, whose read end its sibling workers keep open, and then waits forever at exit for that write. Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; the parent may already be gone when this runs, so that is checked after."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def iter_decoded(paths: Sequence[str | Path | None], batch_size: int, num_workers: int,
                 prepare: Callable | None = None, extras: Sequence[Any] | None = None
                 ) -> Iterator[list[tuple[int, Any, str | None]]]:
    """Batches (lists) of ``(index into paths, image | None, reason | None)``, decoded in ``num_workers`` processes
    (0: in this process), in order. A worker dies with the process that started it (:func:`_exit_with_parent`).

    ``prepare`` (picklable) runs in the worker after decoding: a backend's exact resize or CLIP preprocessing there
    shrinks what crosses the process boundary and leaves the main process free for the model. With ``extras`` (one
    picklable value per path, e.g. the boxes to crop), it is called as ``prepare(image, extras[i])``."""
    from torch.utils.data import DataLoader  # noqa: PLC0415 - only the decoding steps need torch here

    loader = DataLoader(_DecodeFiles(paths, prepare, extras), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list, shuffle=False, prefetch_factor=4 if num_workers > 0 else None,
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()) if num_workers else None)
    yield from loader
