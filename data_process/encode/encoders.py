"""Text and image encoders loaded by Hugging Face name or local path.

* :class:`TextEncoder`: the text tower of a vision-language model (CLIP, SigLIP / SigLIP 2, or any ``AutoModel``
  with ``get_text_features``/``get_image_features``; see :mod:`data_process.encode.towers`) or any ``AutoModel``
  text encoder (BERT, MiniLM, ...; pooled = masked mean). :meth:`TextEncoder.encode` gives token features
  ``[B, L, Dt]`` and their mask ``[B, L]`` padded/truncated to ``max_len`` (the sentence view, DIM's 32), and
  pooled features; :meth:`TextEncoder.encode_pooled` gives pooled features ``[B, Dt]`` of texts truncated at
  ``text_max_len`` (every other text view; default: the model's own limit from its config, 77 for CLIP).
* :class:`ImageEncoder`: the vision tower. Global features ``[B, Di]`` (the model's image embedding) and, with
  ``region_grid``, region features ``[B, grid^2, Di]`` pooled from patch tokens (per family, see ``towers``).
  Preprocessing: CLIP's in numpy (:class:`~data_process.core.images.ImagePreprocess`), any other model's own
  image processor (:class:`ProcessorPreprocess`); both are picklable and run in the decoding workers.

Float16 on GPU, float32 on CPU; ``torch.inference_mode``; outputs are float32 numpy arrays.

**Fixed shapes** (``shapes=``, :class:`FixedShapes`: what new mentions are encoded with, ``nel_model.loaded_run``):
a text is padded to a length that depends on its own tokens only (:func:`fixed_token_length`) and encoded in a
pass of exactly as many texts as that length gives (:meth:`FixedShapes.text_rows`: a token budget), an image in a
pass of exactly ``image_rows`` images (a pass's first input repeated to fill it), so the shapes every kernel sees,
and with them its numbers, depend on the input alone and not on what is encoded beside it. Without ``shapes`` (the
feature step) texts are batched by length and padded to the batch's longest, as before.
"""

from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_process.core.devices import resolve_device
from data_process.core.fingerprints import file_sha256
from data_process.core.images import ImagePreprocess
from data_process.encode.towers import RegionsUnavailable, is_vision_language, regions_unavailable_message, towers_for

log = logging.getLogger(__name__)

FIXED_MIN_TOKENS = 8  # fixed shapes: a text is padded to the next power of two of its tokens, at least this


def fixed_token_length(n_tokens: int, limit: int) -> int:
    """The length a text of ``n_tokens`` tokens (truncated at ``limit``) is padded to in fixed-shape encoding: the
    next power of two, at least :data:`FIXED_MIN_TOKENS`, at most ``limit``."""
    return min(limit, max(FIXED_MIN_TOKENS, 1 << max(0, n_tokens - 1).bit_length()))


@dataclass(frozen=True)
class FixedShapes:
    """The shapes of fixed-shape encoding (module docstring). A text padded to ``length`` tokens is encoded
    ``text_rows(length)`` texts a pass: as many as ``tokens`` allows, at least 1, at most ``rows`` (short texts
    share a pass, a long one takes few filler rows); an image, ``image_rows`` images a pass."""

    rows: int = 8           # the most texts a pass (short texts)
    tokens: int = 64        # a pass's token budget (rows x padded length): a 64-token text alone
    image_rows: int = 2     # images a pass

    def text_rows(self, length: int) -> int:
        return max(1, min(self.rows, self.tokens // length))


def fill_rows(part: Sequence[Any], rows: int) -> list[Any]:
    """``part`` (at most ``rows`` inputs) with its first input repeated to make exactly ``rows``."""
    return list(part) + [part[0]] * (rows - len(part))


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_vision_language_model(name_or_path: str, device: torch.device) -> Any:
    """Load a vision-language model (``AutoModel``: ``CLIPModel``, ``SiglipModel``, ...) in eval mode on ``device``
    (float16 on GPU); an error when it has no ``get_text_features``/``get_image_features``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(name_or_path)
    if not is_vision_language(model):
        raise ValueError(f"{name_or_path}: {type(model).__name__} has no get_text_features/get_image_features: not "
                         "a vision-language model (CLIP, SigLIP, ...); pass it as --text_encoder instead")
    return model.to(device=device, dtype=_dtype_for(device)).eval()


@dataclass(frozen=True)
class ProcessorPreprocess:
    """A model's own image processor on one PIL image: ``pixel_values`` ``[3, H, W]`` (float32), or a dict of
    arrays when the processor returns more (SigLIP 2: patches, patch mask, spatial shape). Picklable."""

    processor: Any

    def __call__(self, img: Any) -> np.ndarray | dict[str, np.ndarray]:
        out = self.processor(images=img if img.mode == "RGB" else img.convert("RGB"), return_tensors="np")
        arrays = {k: np.asarray(v)[0] for k, v in out.items()}
        arrays["pixel_values"] = arrays["pixel_values"].astype(np.float32, copy=False)
        return arrays["pixel_values"] if len(arrays) == 1 else arrays


def stack_inputs(items: Sequence[Any]) -> Any:
    """Stack preprocessed images into a batch (arrays or uint8 tensors, or dicts of arrays key by key)."""
    if isinstance(items[0], dict):
        return {k: np.stack([it[k] for it in items]) for k in items[0]}
    if isinstance(items[0], torch.Tensor):
        return torch.stack(list(items))
    return np.stack(items)


@dataclass
class TextFeatures:
    pooled: np.ndarray  # [B, Dt] float32
    tokens: np.ndarray  # [B, L, Dt] float32
    mask: np.ndarray  # [B, L] bool


class TextEncoder:
    """Encode texts with a vision-language model's text tower or an ``AutoModel`` (mean pooling).

    ``name_or_path`` is recorded as the encoder id; pass ``clip_model`` to share an already loaded vision-language
    model (CLIP, SigLIP, ...). ``max_len``: the token view's length; ``text_max_len``: the truncation of pooled
    texts (``None``: the model's own limit).
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "auto", max_len: int = 32,
                 batch_size: int = 64, clip_model: Any = None, text_max_len: int | None = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        self.name = str(name_or_path)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.max_len = max_len
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.towers = None
        if clip_model is not None:
            self.model = clip_model
        else:
            cfg = AutoConfig.from_pretrained(self.name)
            if hasattr(cfg, "text_config") and hasattr(cfg, "vision_config"):
                self.model = load_vision_language_model(self.name, self.device)
            else:
                self.model = AutoModel.from_pretrained(self.name).to(device=self.device,
                                                                    dtype=_dtype_for(self.device)).eval()
        if is_vision_language(self.model):
            self.towers = towers_for(self.model, self.name)
            limit = self.towers.text_positions
            self.dim = self.towers.text_dim
        else:
            self.dim = int(self.model.config.hidden_size)
            limit = int(getattr(self.model.config, "max_position_embeddings", max_len) or max_len)
        self.is_clip = self.towers is not None  # a vision-language text tower (not mean pooling)
        self.limit = limit
        if max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the text encoder's {limit} positions ({self.name})")
        self.text_max_len = limit if text_max_len is None else int(text_max_len)
        if not 2 <= self.text_max_len <= limit:
            raise ValueError(f"--text_max_len {self.text_max_len} must be in [2, {limit}] (the text encoder's "
                             f"positions, {self.name})")
        if not self.dim:
            self.dim = int(self._forward(["a"], 2)[1].shape[-1])

    @torch.inference_mode()
    def _forward(self, texts: list[str], limit: int,
                 pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token features [B, T, Dt] (zero at padding), pooled [B, Dt] and the real-token mask [B, T] of ``texts``
        truncated at ``limit`` tokens; ``pad_to``: padded to this length (fixed shapes; every text's tokens fit)."""
        # Pad to the batch's longest text, not the limit: real MEL texts are short, padding is wasted work
        # (SigLIP, trained on texts padded to its full length, is padded so).
        if pad_to is None:
            enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=pad_to,
                                 return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        att = enc["attention_mask"].to(self.device)
        if self.towers is not None:
            if self.towers.pad_to_positions and ids.shape[1] < self.towers.text_positions:
                extra = self.towers.text_positions - ids.shape[1]
                pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
                att = torch.nn.functional.pad(att, (0, extra))
            pass_mask = self.towers.family != "siglip" or "attention_mask" in self.tokenizer.model_input_names
            tokens, pooled = self.towers.text(ids, att if pass_mask else None)
        else:
            kwargs = {"input_ids": ids, "attention_mask": att}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"].to(self.device)
            tokens = self.model(**kwargs).last_hidden_state
            m = att.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        tokens = tokens * att.unsqueeze(-1).to(tokens.dtype)  # padding positions are exactly zero
        return tokens, pooled, att

    def _encode_batch(self, texts: list[str], max_len: int, pad_to: int | None = None,
                      n: int | None = None) -> TextFeatures:
        """Token features at ``max_len`` of ``texts`` (the first ``n`` of them; ``pad_to``: fixed shapes)."""
        tokens, pooled, att = self._forward(texts, max_len, pad_to)
        tokens, att, pooled = tokens[:n, :max_len], att[:n, :max_len], pooled[:n]
        pad = max_len - tokens.shape[1]
        tokens = torch.nn.functional.pad(tokens.float(), (0, 0, 0, pad))
        att = torch.nn.functional.pad(att, (0, pad))
        return TextFeatures(pooled=pooled.float().cpu().numpy(), tokens=tokens.cpu().numpy(),
                            mask=att.bool().cpu().numpy())

    def _batches(self, texts: list[str]):
        """Batches of similar length (little padding), and the order that puts results back in input order."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [[texts[j] for j in order[i:i + self.batch_size]] for i in range(0, len(texts), self.batch_size)]
        return batches, np.argsort(order, kind="stable")

    def _plan(self, texts: list[str], limit: int, shapes: FixedShapes | None
              ) -> tuple[list[tuple[list[str], int | None, int]], np.ndarray]:
        """The batches ``(texts, padded length or None, real texts)`` and the order back to input order: by
        length (:meth:`_batches`), or with ``shapes`` in fixed shapes (module docstring): texts grouped by their
        padded length (:func:`fixed_token_length`), ``shapes.text_rows(length)`` a batch, the first text repeated
        to fill the last."""
        if shapes is None:
            batches, back = self._batches(texts)
            return [(b, None, len(b)) for b in batches], back
        ids = self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        pad = [fixed_token_length(len(x), limit) for x in ids]
        order = np.argsort(pad, kind="stable")
        plan = []
        for length in sorted(set(pad)):
            group, rows = [texts[j] for j in order if pad[j] == length], shapes.text_rows(length)
            plan += [(fill_rows(group[s:s + rows], rows), length, len(group[s:s + rows]))
                     for s in range(0, len(group), rows)]
        return plan, np.argsort(order, kind="stable")

    def encode(self, texts: Sequence[str], max_len: int | None = None,
               shapes: FixedShapes | None = None) -> TextFeatures:
        """Token features at ``max_len`` (default: the encoder's, the sentence view's; ``entity.desc_tokens`` gives
        its own) and pooled features of the same truncation, in batches (``shapes``: in fixed shapes, module
        docstring)."""
        texts = list(texts)
        max_len = self.max_len if max_len is None else int(max_len)
        if not 2 <= max_len <= self.limit:
            raise ValueError(f"a token length of {max_len} is outside [2, {self.limit}] (the text encoder's "
                             f"positions, {self.name})")
        if not texts:
            return TextFeatures(np.zeros((0, self.dim), np.float32), np.zeros((0, max_len, self.dim), np.float32),
                                np.zeros((0, max_len), bool))
        plan, back = self._plan(texts, max_len, shapes)
        parts = [self._encode_batch(b, max_len, pad, n) for b, pad, n in plan]
        return TextFeatures(pooled=np.concatenate([p.pooled for p in parts])[back],
                            tokens=np.concatenate([p.tokens for p in parts])[back],
                            mask=np.concatenate([p.mask for p in parts])[back])

    def encode_pooled(self, texts: Sequence[str], shapes: FixedShapes | None = None) -> np.ndarray:
        """Pooled features ``[B, Dt]`` of ``texts`` truncated at ``text_max_len`` tokens (``shapes``: in fixed
        shapes, module docstring)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        plan, back = self._plan(texts, self.text_max_len, shapes)
        return np.concatenate([self._forward(b, self.text_max_len, pad)[1][:n].float().cpu().numpy()
                               for b, pad, n in plan])[back]


class ImageEncoder:
    """Encode preprocessed images (from :attr:`preprocess`) with a vision-language model's vision tower.

    ``region_grid``: regions pooled from patch tokens (``None``: global features only, for detector or file
    regions). A model without patch features in its embedding space and a ``region_grid`` is an error
    (:class:`~data_process.encode.towers.RegionsUnavailable`).
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "auto", region_grid: int | None = 3,
                 clip_model: Any = None, jpeg_draft: bool = False):
        if region_grid is not None and region_grid < 1:
            raise ValueError(f"region_grid must be at least 1, got {region_grid}")
        self.name = str(name_or_path)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.region_grid = region_grid
        self.model = clip_model if clip_model is not None else load_vision_language_model(self.name, self.device)
        self.towers = towers_for(self.model, self.name)
        if region_grid is not None and not self.towers.supports_regions:
            raise RegionsUnavailable(regions_unavailable_message(self.name, self.model))
        if self.towers.family == "clip":
            # uint8 pixels from the decoding workers, normalised on the device (_inputs): same numbers, 1/4 bytes
            self.preprocess: Any = dataclasses.replace(ImagePreprocess.from_pretrained(self.name), uint8_output=True,
                                                       jpeg_draft=jpeg_draft)
        else:
            from transformers import AutoImageProcessor

            self.preprocess = ProcessorPreprocess(AutoImageProcessor.from_pretrained(self.name))
        self.dim = self.towers.image_dim
        if not self.dim:
            from PIL import Image

            self.dim = int(self.encode_global(stack_inputs([self.preprocess(Image.new("RGB", (32, 32)))])).shape[-1])

    @property
    def n_regions(self) -> int:
        return 0 if self.region_grid is None else self.region_grid * self.region_grid

    def _inputs(self, pixels: Any) -> dict[str, torch.Tensor]:
        if isinstance(pixels, dict):
            batch = {k: torch.as_tensor(v) for k, v in pixels.items()}
        else:
            pixels = torch.as_tensor(pixels)
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
            if pixels.dtype == torch.uint8:                   # ImagePreprocess(uint8_output=True)
                pixels = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
            batch = {"pixel_values": pixels}
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(device=self.device, dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in batch.items()}

    @staticmethod
    def _size(pixels: Any) -> int:
        return len(next(iter(pixels.values()))) if isinstance(pixels, dict) else len(pixels)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor | np.ndarray | dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``pixels`` [B, 3, H, W] (or the processor's dict of batched arrays) -> (global [B, Di], regions
        [B, R, Di]) float32 numpy arrays (R = 0 without a ``region_grid``)."""
        inputs = self._inputs(pixels)
        b = self._size(pixels)
        if b == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.n_regions, self.dim), np.float32)
        glob, state = self.towers.image(inputs)
        if self.region_grid is None:
            regions = torch.zeros(b, 0, self.dim)
        else:
            regions = self.towers.regions(state, self.region_grid)
        return glob.float().cpu().numpy(), regions.float().cpu().numpy()

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor | np.ndarray | dict[str, Any]) -> np.ndarray:
        """Global features only, ``[B, Di]`` (whole images, or region crops)."""
        if self._size(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.towers.image(self._inputs(pixels))[0].float().cpu().numpy()

    def encode_fixed(self, items: Sequence[Any], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of preprocessed images in batches of exactly ``rows`` (the batch's first image repeated to
        fill the last): an image's features do not depend on the images encoded beside it."""
        globs = [np.zeros((0, self.dim), np.float32)]
        regs = [np.zeros((0, self.n_regions, self.dim), np.float32)]
        for s in range(0, len(items), rows):
            part = items[s:s + rows]
            g, r = self.encode(stack_inputs(fill_rows(part, rows)))
            globs.append(g[:len(part)]), regs.append(r[:len(part)])
        return np.concatenate(globs), np.concatenate(regs)

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Encode PIL images in-process (for small jobs; the feature step decodes in DataLoader workers)."""
        globs, regs = [], []
        for i in range(0, len(images), batch_size):
            g, r = self.encode(stack_inputs([self.preprocess(im) for im in images[i:i + batch_size]]))
            globs.append(g)
            regs.append(r)
        if not globs:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.n_regions, self.dim), np.float32)
        return np.concatenate(globs), np.concatenate(regs)


def load_encoders(clip: str, text_encoder: str | None = None, device: str = "auto", max_len: int = 32,
                  region_grid: int | None = 3, batch_size: int = 64, text_max_len: int | None = None,
                  jpeg_draft: bool = False) -> tuple[TextEncoder, ImageEncoder]:
    """Load the image encoder (a vision-language model: CLIP, SigLIP, ...) and the text encoder (the same model
    unless ``text_encoder`` names another); a shared model is loaded once."""
    dev = resolve_device(device)
    model = load_vision_language_model(clip, dev)
    image_enc = ImageEncoder(clip, dev, region_grid=region_grid, clip_model=model, jpeg_draft=jpeg_draft)
    if text_encoder is None or str(text_encoder) == str(clip):
        text_enc = TextEncoder(clip, dev, max_len=max_len, batch_size=batch_size, clip_model=model,
                               text_max_len=text_max_len)
    else:
        text_enc = TextEncoder(str(text_encoder), dev, max_len=max_len, batch_size=batch_size,
                               text_max_len=text_max_len)
    return text_enc, image_enc


def text_positions(name_or_path: str) -> int:
    """A text encoder's own length limit from its config (``text_config.max_position_embeddings`` of a
    vision-language model, else ``max_position_embeddings``), without loading weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path)
    tc = getattr(cfg, "text_config", None) or cfg
    limit = getattr(tc, "max_position_embeddings", None)
    if not limit:
        raise ValueError(f"{name_or_path}: its config names no max_position_embeddings; pass --text_max_len")
    return int(limit)


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
