"""Text and image encoders loaded by Hugging Face name or local path.

* :class:`TextEncoder`: the CLIP text tower (default) or any ``AutoModel`` text encoder (BERT, MiniLM, ...).
  Returns pooled features ``[B, Dt]``, token features ``[B, L, Dt]`` and the attention mask ``[B, L]``,
  always padded/truncated to ``max_len``. For CLIP, token features are the final-layer-normed hidden states
  through ``text_projection`` and pooled = the model's ``text_embeds``; for other models pooled = masked mean.
* :class:`ImageEncoder`: the CLIP vision tower. Global features ``[B, Di]`` (``image_embeds``) and region
  features ``[B, R, Di]``: patch tokens through ``post_layernorm`` + ``visual_projection``, average-pooled to a
  ``region_grid`` x ``region_grid`` grid (R = grid^2).

Float16 on GPU, float32 on CPU; ``torch.inference_mode``; outputs are float32 numpy arrays.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_process.core.devices import resolve_device
from data_process.core.fingerprints import file_sha256
from data_process.core.images import ImagePreprocess

log = logging.getLogger(__name__)


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def model_type(name_or_path: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).model_type


def load_clip(name_or_path: str, device: torch.device) -> Any:
    """Load a ``CLIPModel`` in eval mode on ``device`` (float16 on GPU)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(name_or_path)
    return model.to(device=device, dtype=_dtype_for(device)).eval()


@dataclass
class TextFeatures:
    pooled: np.ndarray  # [B, Dt] float32
    tokens: np.ndarray  # [B, L, Dt] float32
    mask: np.ndarray  # [B, L] bool


class TextEncoder:
    """Encode texts with a CLIP text tower or an ``AutoModel`` (mean pooling).

    ``name_or_path`` is recorded as the encoder id; pass ``clip_model`` to share an already loaded CLIP.
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "auto", max_len: int = 32,
                 batch_size: int = 64, clip_model: Any = None):
        from transformers import AutoTokenizer

        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        self.name = str(name_or_path)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.max_len = max_len
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.is_clip = clip_model is not None or model_type(self.name) == "clip"
        if self.is_clip:
            self.model = clip_model if clip_model is not None else load_clip(self.name, self.device)
            self.dim = int(self.model.config.projection_dim)
            limit = int(self.model.config.text_config.max_position_embeddings)
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(self.name).to(device=self.device, dtype=_dtype_for(self.device))
            self.model.eval()
            self.dim = int(self.model.config.hidden_size)
            limit = int(getattr(self.model.config, "max_position_embeddings", max_len) or max_len)
        if max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the text encoder's {limit} positions ({self.name})")

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> TextFeatures:
        # Pad to the batch's longest text, not max_len: real MEL texts are short, padding is wasted work.
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        att = enc["attention_mask"].to(self.device)
        if self.is_clip:
            out = self.model.text_model(input_ids=ids, attention_mask=att)
            proj = self.model.text_projection
            tokens = proj(out.last_hidden_state)  # last_hidden_state is already final-layer-normed
            pooled = proj(out.pooler_output)
        else:
            kwargs = {"input_ids": ids, "attention_mask": att}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"].to(self.device)
            tokens = self.model(**kwargs).last_hidden_state
            m = att.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        tokens = tokens * att.unsqueeze(-1).to(tokens.dtype)  # padding positions are exactly zero
        pad = self.max_len - tokens.shape[1]
        tokens = torch.nn.functional.pad(tokens.float(), (0, 0, 0, pad))
        att = torch.nn.functional.pad(att, (0, pad))
        return TextFeatures(pooled=pooled.float().cpu().numpy(), tokens=tokens.cpu().numpy(),
                            mask=att.bool().cpu().numpy())

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """Encode ``texts`` in batches of ``batch_size``."""
        texts = list(texts)
        if not texts:
            return TextFeatures(np.zeros((0, self.dim), np.float32), np.zeros((0, self.max_len, self.dim), np.float32),
                                np.zeros((0, self.max_len), bool))
        # Batches of similar length waste little padding; results come back in the input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        parts = [self._encode_batch([texts[j] for j in order[i:i + self.batch_size]])
                 for i in range(0, len(texts), self.batch_size)]
        back = np.argsort(order, kind="stable")
        return TextFeatures(pooled=np.concatenate([p.pooled for p in parts])[back],
                            tokens=np.concatenate([p.tokens for p in parts])[back],
                            mask=np.concatenate([p.mask for p in parts])[back])


class ImageEncoder:
    """Encode preprocessed images (``[B, 3, H, W]`` from :class:`ImagePreprocess`) with a CLIP vision tower."""

    def __init__(self, name_or_path: str, device: str | torch.device = "auto", region_grid: int = 3,
                 clip_model: Any = None):
        if region_grid < 1:
            raise ValueError(f"region_grid must be at least 1, got {region_grid}")
        self.name = str(name_or_path)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.region_grid = region_grid
        self.model = clip_model if clip_model is not None else load_clip(self.name, self.device)
        self.dim = int(self.model.config.projection_dim)
        self.preprocess = ImagePreprocess.from_pretrained(self.name)

    @property
    def n_regions(self) -> int:
        return self.region_grid * self.region_grid

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``pixels`` [B, 3, H, W] -> (global [B, Di], regions [B, R, Di]) float32 numpy arrays."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.n_regions, self.dim), np.float32)
        pixels = pixels.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        vm = self.model.vision_model
        out = vm(pixel_values=pixels)
        glob = self.model.visual_projection(out.pooler_output)
        patches = out.last_hidden_state[:, 1:, :]
        b, p, _ = patches.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{self.name}: {p} patch tokens do not form a square grid")
        patches = self.model.visual_projection(vm.post_layernorm(patches))  # [B, P, Di]
        grid = patches.transpose(1, 2).reshape(b, self.dim, side, side)
        pooled = F.adaptive_avg_pool2d(grid.float(), self.region_grid)  # [B, Di, g, g]
        regions = pooled.flatten(2).transpose(1, 2)  # [B, R, Di], row-major over the grid
        return glob.float().cpu().numpy(), regions.cpu().numpy()

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Encode PIL images in-process (for small jobs; the feature step decodes in DataLoader workers)."""
        globs, regs = [], []
        for i in range(0, len(images), batch_size):
            arr = np.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            g, r = self.encode(arr)
            globs.append(g)
            regs.append(r)
        if not globs:
            return self.encode(np.zeros((0, 3, self.preprocess.crop_h, self.preprocess.crop_w), np.float32))
        return np.concatenate(globs), np.concatenate(regs)


def load_encoders(clip: str, text_encoder: str | None = None, device: str = "auto", max_len: int = 32,
                  region_grid: int = 3, batch_size: int = 64) -> tuple[TextEncoder, ImageEncoder]:
    """Load the image encoder (CLIP) and the text encoder (the same CLIP unless ``text_encoder`` names another
    model); a shared CLIP is loaded once."""
    dev = resolve_device(device)
    clip_model = load_clip(clip, dev)
    image_enc = ImageEncoder(clip, dev, region_grid=region_grid, clip_model=clip_model)
    if text_encoder is None or str(text_encoder) == str(clip):
        text_enc = TextEncoder(clip, dev, max_len=max_len, batch_size=batch_size, clip_model=clip_model)
    else:
        text_enc = TextEncoder(str(text_encoder), dev, max_len=max_len, batch_size=batch_size)
    return text_enc, image_enc


def describe_model_files(name_or_path: str) -> Any:
    """A fingerprint-able description of an encoder: the name for hub models; for a local folder, the
    content of small files and (size, mtime) of large ones, so a rebuilt model invalidates cached features."""
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path)
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        rel = f.relative_to(path).as_posix()
        if st.st_size <= 16 * 2**20:
            files.append([rel, file_sha256(f)])
        else:
            files.append([rel, st.st_size, st.st_mtime_ns])
    return {"path": str(name_or_path), "files": files}
