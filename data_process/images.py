"""Image decoding and CLIP-style preprocessing with PIL + numpy only (no torchvision).

:class:`ImagePreprocess` is a small picklable dataclass, so it runs inside DataLoader worker processes.
:func:`try_load` never raises for a bad image: it returns the reason instead, so a caller can count and
report missing or unreadable images rather than stopping (or, worse, substituting a random tensor).
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shortest edge to ``size``, center-crop ``crop_h`` x ``crop_w``, scale to [0, 1], normalise."""

    size: int = 224
    crop_h: int = 224
    crop_w: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """PIL image -> float32 array [3, crop_h, crop_w]."""
        img = img.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.crop_w, round(w * scale)), max(self.crop_h, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=Image.Resampling(self.resample))
        left, top = (nw - self.crop_w) // 2, (nh - self.crop_h) // 2
        img = img.crop((left, top, left + self.crop_w, top + self.crop_h))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

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


def try_load(path: str | Path | None) -> tuple[Image.Image | None, str | None]:
    """Open and fully decode an image. Returns ``(image, None)`` or ``(None, reason)``; never raises."""
    if path is None:
        return None, "no image"
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB"), None
    except FileNotFoundError:
        return None, "file not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # DecompressionBombError (an image over 2x PIL's MAX_IMAGE_PIXELS) is not an OSError
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def cpu_threads(num_workers: int) -> int:
    """Torch threads that leave one core per image-decoding worker (oversubscribed cores slow CPU
    inference down several times)."""
    import torch  # noqa: PLC0415 - only the encoding processes need torch here

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - num_workers))
