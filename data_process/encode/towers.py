"""The towers of a vision-language model, per family: pooled text and image embeddings, text token features and
grid-region features, all in the model's own embedding space (what the feature cache stores).

=========  ==============================  ==================================  =====================================
family     models                          text tokens ``[B, T, Dt]``          grid regions ``[B, g*g, Di]``
=========  ==============================  ==================================  =====================================
clip       ``CLIPModel``                   ``text_projection`` of the final-   patch tokens through ``post_layernorm``
                                           layer-normed hidden states          + ``visual_projection``, averaged per
                                                                               grid cell
siglip     ``SiglipModel``,                the text ``head`` (SigLIP's          the model's own attention-pooling
           ``Siglip2Model``                projection) of the final-layer-     ``head`` run on each grid cell's patch
                                           normed hidden states                tokens (SigLIP's pooled image feature
                                                                               *is* that head over all patches; its
                                                                               patch tokens alone are not in the
                                                                               embedding space)
generic    any ``AutoModel`` with          ``text_projection`` of the hidden   not available: ``--regions grid``
           ``get_text_features`` and       states when the model has one,      fails with :class:`RegionsUnavailable`
           ``get_image_features``          else the hidden states when their   (use ``--regions detector|file``)
                                           width is the pooled width
=========  ==============================  ==================================  =====================================

Pooled features are always the model's ``get_text_features`` / ``get_image_features`` (for CLIP the same numbers
through the towers directly, as before). SigLIP was trained on texts padded to its full length
(``pad_to_positions``); :class:`~data_process.encode.encoders.TextEncoder` pads them so.

A grid cell covers patches ``[floor(i*n/g), ceil((i+1)*n/g))`` along each axis (``adaptive_avg_pool2d``'s bins),
row-major over the grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

CLIP_TYPES = ("clip",)
SIGLIP_TYPES = ("siglip", "siglip2")


class RegionsUnavailable(ValueError):
    """The model gives no patch features in its image embedding space, so grid regions cannot be made."""


def grid_bins(n: int, g: int) -> list[tuple[int, int]]:
    """``g`` bins over ``n`` positions, as ``adaptive_avg_pool`` makes them (they overlap when ``n % g``)."""
    return [((i * n) // g, -((-(i + 1) * n) // g)) for i in range(g)]


def _pooled(out: Any) -> torch.Tensor:
    """The pooled embedding from ``get_*_features`` (a tensor in older APIs, ``pooler_output`` in transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"{type(out).__name__}: no pooled features (pooler_output is None)")
    return pooled


class Towers:
    """What every family gives: ``text(ids, mask) -> (tokens, pooled)``, ``image(inputs) -> (pooled, state)`` and
    ``regions(state, grid)``; dimensions 0 are measured by the encoders on a probe batch."""

    family = "generic"
    pad_to_positions = False  # pad texts to text_positions (the model was trained so)
    supports_regions = False

    def __init__(self, model: Any, name: str):
        self.model, self.name = model, name
        self.text_dim = self.image_dim = 0
        tc = getattr(model.config, "text_config", None) or model.config
        self.text_positions = int(getattr(tc, "max_position_embeddings", 0) or 512)

    def regions(self, state: Any, grid: int) -> torch.Tensor:
        raise RegionsUnavailable(regions_unavailable_message(self.name, self.model))

    def _square(self, patches: int) -> int:
        """The side of a square patch grid."""
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"{self.name}: {patches} patch tokens do not form a square grid")
        return side


class ClipTowers(Towers):
    """``CLIPModel``: exactly the cache's original CLIP features."""

    family = "clip"
    supports_regions = True

    def __init__(self, model: Any, name: str):
        super().__init__(model, name)
        cfg = model.config
        self.text_dim = self.image_dim = int(cfg.projection_dim)

    def text(self, ids: torch.Tensor, att: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.text_model(input_ids=ids, attention_mask=att)
        proj = self.model.text_projection
        return proj(out.last_hidden_state), proj(out.pooler_output)  # last_hidden_state is final-layer-normed

    def image(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        vm = self.model.vision_model
        out = vm(pixel_values=inputs["pixel_values"])
        return self.model.visual_projection(out.pooler_output), out.last_hidden_state

    def regions(self, state: Any, grid: int) -> torch.Tensor:
        patches = state[:, 1:, :]
        b, p, _ = patches.shape
        side = self._square(p)
        patches = self.model.visual_projection(self.model.vision_model.post_layernorm(patches))  # [B, P, Di]
        cells = patches.transpose(1, 2).reshape(b, self.image_dim, side, side)
        pooled = F.adaptive_avg_pool2d(cells.float(), grid)  # [B, Di, g, g]
        return pooled.flatten(2).transpose(1, 2)  # [B, R, Di], row-major over the grid


class SiglipTowers(Towers):
    """``SiglipModel`` / ``Siglip2Model`` (SigLIP 2's NaFlex inputs carry ``spatial_shapes`` and a patch mask)."""

    family = "siglip"
    pad_to_positions = True

    def __init__(self, model: Any, name: str):
        super().__init__(model, name)
        cfg = model.config
        tc = cfg.text_config
        self.text_dim = int(getattr(tc, "projection_size", None) or tc.hidden_size)
        self.image_dim = int(cfg.vision_config.hidden_size)
        self.supports_regions = bool(getattr(cfg.vision_config, "vision_use_head", True))

    def text(self, ids: torch.Tensor, att: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.get_text_features(input_ids=ids, attention_mask=att)
        return self.model.text_model.head(out.last_hidden_state), out.pooler_output

    def image(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        out = self.model.get_image_features(**inputs)
        return _pooled(out), (out.last_hidden_state, inputs)

    def regions(self, state: Any, grid: int) -> torch.Tensor:
        hidden, inputs = state
        head = self.model.vision_model.head
        if "spatial_shapes" not in inputs:  # SigLIP: one square patch grid for every image
            side = self._square(hidden.shape[1])
            idx = torch.arange(side * side, device=hidden.device).reshape(side, side)
            cells = [idx[r0:r1, c0:c1].reshape(-1) for r0, r1 in grid_bins(side, grid)
                     for c0, c1 in grid_bins(side, grid)]
            return torch.stack([head(hidden[:, cell]) for cell in cells], 1).float()
        # SigLIP 2: image i has spatial_shapes[i] = (h, w) patches, the first h*w tokens, row-major.
        shapes = inputs["spatial_shapes"].tolist()
        valid = inputs["pixel_attention_mask"].bool()
        n = hidden.shape[1]
        out = []
        for gr in range(grid):
            for gc in range(grid):
                mask = torch.zeros_like(valid)
                for i, (h, w) in enumerate(shapes):
                    r0, r1 = grid_bins(h, grid)[gr]
                    c0, c1 = grid_bins(w, grid)[gc]
                    pos = (torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None, :]).reshape(-1)
                    mask[i, pos[pos < n].to(mask.device)] = True
                out.append(head(hidden, (mask & valid).long()))
        return torch.stack(out, 1).float()


class GenericTowers(Towers):
    """Any model with ``get_text_features`` / ``get_image_features`` (pooled features; no grid regions)."""

    def text(self, ids: torch.Tensor, att: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.get_text_features(input_ids=ids, attention_mask=att)
        pooled = _pooled(out)
        hidden = getattr(out, "last_hidden_state", None)
        proj = getattr(self.model, "text_projection", None)
        if hidden is not None and isinstance(proj, torch.nn.Linear) and proj.in_features == hidden.shape[-1] \
                and proj.out_features == pooled.shape[-1]:
            return proj(hidden), pooled
        if hidden is not None and hidden.shape[-1] == pooled.shape[-1]:
            return hidden, pooled
        raise ValueError(f"{self.name}: {type(self.model).__name__} gives no token features in its pooled text "
                         "space (needed for the sentence view); use a CLIP or SigLIP model, or --text_encoder")

    def image(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        return _pooled(self.model.get_image_features(**inputs)), None


def regions_unavailable_message(name: str, model: Any) -> str:
    return (f"{name}: {type(model).__name__} gives no patch features in its image embedding space, so --regions "
            "grid cannot pool regions from patches; use --regions detector (crops from an object detector) or "
            "--regions file (boxes from a JSON Lines file)")


def is_vision_language(model: Any) -> bool:
    return callable(getattr(model, "get_text_features", None)) and callable(getattr(model, "get_image_features", None))


def towers_for(model: Any, name: str) -> Towers:
    """The tower access for a loaded model (by ``config.model_type``; any other CLIP-style model is generic)."""
    kind = getattr(model.config, "model_type", "")
    if kind in CLIP_TYPES:
        return ClipTowers(model, name)
    if kind in SIGLIP_TYPES:
        return SiglipTowers(model, name)
    if is_vision_language(model):
        return GenericTowers(model, name)
    raise ValueError(f"{name}: {type(model).__name__} (model_type {kind!r}) has no get_text_features/"
                     "get_image_features: not a vision-language model (CLIP, SigLIP, ...)")
