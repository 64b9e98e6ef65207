"""MIMIC (Luo et al., KDD 2023, "Multi-Grained Multimodal Interaction Network for Entity Linking") as a model of the
toolkit: a pairwise matcher over cached features of a frozen encoder. docs/MIMIC.md describes what the official code
(pengfei-luo/MIMIC) computes and where this module differs; docs/DIVERGENCES.md has one row per difference.

A (mention, entity) pair is scored by three interaction units, not by a dot product of two embeddings:

* **text** (TGLU): the global-to-global score ``t_m . t_e`` of the pooled texts, and a global-to-local score: every
  entity token attends over the mention's tokens, the attended vectors are averaged over the entity's tokens,
  layer-normalised and scored against a projection of the entity's pooled text; the unit is the mean of the two;
* **image** (VDLU): two dual-gated functions, entity -> mention and mention -> entity, each mixing one side's
  pooled image with the other side's pooled patch tokens through a gate; the unit is the mean of the two;
* **fusion** (CMFU): on each side the pooled text attends over the image tokens and is gated into one vector; the
  unit is the dot product of the two sides' vectors.

The overall score is the mean of the units switched on. Inputs are the feature cache's views (docs/CONTRACTS.md):

=====================  =======================================  ====================================
MIMIC's CLIP input     mention view                             entity view
=====================  =======================================  ====================================
pooled text            ``context`` [Dt] ("mention (sentence)")  ``desc`` [Dt]
text tokens            ``sentence`` [Lm, Dt] + mask             ``desc_tokens`` [Le, Dt] + mask
pooled image           ``image`` [Di] + mask                    ``image`` [Di] + mask
image tokens           ``image`` + ``regions`` [R, Di] + mask   ``image`` + ``regions`` [R, Di] + mask
=====================  =======================================  ====================================

(the image tokens are the regions, with the pooled image as their first row when ``global_image_token``: CLIP's
class token is the first of the patch tokens MIMIC reads).

For whole-KB scoring each side is encoded once (:meth:`MIMIC.encode_mentions`, :meth:`MIMIC.encode_entities`: every
tensor that depends on one side only, projected tokens included) and pairs are scored in chunks with
:meth:`MIMIC.pair_scores` / :meth:`MIMIC.unit_scores`; :func:`pair_bytes` bounds the memory of one such call, and
``candidates`` scores each mention against its own list (the re-ranker's role).

Missing inputs are handled by masks, as in DIM: a side without an image gives the image unit a score of exactly 0 for
its pairs and the fusion unit no image context; padded token positions take no part in any attention or mean; rows
without any real key never give NaN. ``mask_padding=False`` and ``missing_image="blank"`` switch to the official
code's behaviour (every position counts; a missing image is fed as its cached row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import nn

UNITS = ("text", "image", "fusion")
PAD_LOGIT = -1.0e4       # the attention logit of a padded position (its softmax weight is 0; finite in float16)
MISSING_IMAGE_CHOICES = ("mask", "blank")


@dataclass
class MIMICConfig:
    """Resolved settings of :class:`MIMIC`; the defaults are ``config/wikimel.yaml`` of the official code (its three
    unit hidden sizes ``TGLU_hidden_dim``, ``IDLU_hidden_dim`` and ``CMFU_hidden_dim`` are all ``hidden``)."""

    text_dim: int                  # Dt: pooled text and text-token features (the cache's text_dim)
    image_dim: int                 # Di: pooled image and region features (0: a cache without images)
    hidden: int = 96               # the units' hidden size
    dv: int = 96                   # image features are mapped to dv before the units (official "dv")
    dropout: float = 0.0           # on the normalised inputs; the official code has none (0 = the code)
    use_text_unit: bool = True     # TGLU
    use_image_unit: bool = True    # VDLU
    use_fusion_unit: bool = True   # CMFU
    text_len: int = 40             # token positions read from the token views (the official text_max_length)
    global_image_token: bool = True   # the pooled image is the first image token (CLIP's class token, as MIMIC)
    mask_padding: bool = True      # False: padded token positions take part, as in the official code
    missing_image: str = "mask"    # "blank": a missing image is fed as its cached row, as the code feeds a blank

    def __post_init__(self):
        if self.missing_image not in MISSING_IMAGE_CHOICES:
            raise ValueError(f"missing_image must be one of {', '.join(MISSING_IMAGE_CHOICES)}, "
                             f"got {self.missing_image!r}")
        for name in ("text_dim", "hidden", "dv", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.units:
            raise ValueError("MIMIC needs at least one unit (use_text_unit, use_image_unit, use_fusion_unit)")
        if self.image_dim < 1 and (self.use_image_unit or self.use_fusion_unit):
            raise ValueError("the image and fusion units read image features, and the feature cache has none "
                             "(image_dim 0): switch them off (use_image_unit, use_fusion_unit false)")

    @property
    def units(self) -> tuple[str, ...]:
        on = (self.use_text_unit, self.use_image_unit, self.use_fusion_unit)
        return tuple(u for u, o in zip(UNITS, on) if o)

    @property
    def uses_images(self) -> bool:
        return self.use_image_unit or self.use_fusion_unit

    def _views(self, pooled: str, tokens: str) -> tuple[str, ...]:
        v = []
        if self.use_text_unit or self.use_fusion_unit:
            v.append(pooled)
        if self.use_text_unit:
            v.append(tokens)
        if self.use_image_unit or (self.use_fusion_unit and self.global_image_token):
            v.append("image")
        if self.uses_images:
            v.append("regions")
        return tuple(v)

    def mention_views(self) -> tuple[str, ...]:
        """Batch keys read on the mention side (each with its ``_mask`` where the cache has one)."""
        return self._views("context", "sentence")

    def entity_views(self) -> tuple[str, ...]:
        """Batch keys read on the entity side; ``desc_tokens`` is ``entity.desc_tokens`` [E, L, Dt] + mask."""
        return self._views("desc", "desc_tokens")


S = TypeVar("S", bound="_Side")


@dataclass
class _Side:
    """Per-side tensors, row-aligned: ``rows(index)`` selects rows of every tensor (a slice, index tensor, or
    an index tensor [B, K] that gives each mention its own K entities); fields of switched-off units are None."""

    def rows(self: S, index) -> S:
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    @classmethod
    def cat(cls: type[S], parts: list[S]) -> S:
        """Rows of several sides in order (a KB encoded in blocks, kept as one side)."""
        first = parts[0]
        return cls(**{f.name: None if getattr(first, f.name) is None else
                      torch.cat([getattr(p, f.name) for p in parts]) for f in fields(first)})

    def __len__(self) -> int:
        return next(len(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None)


@dataclass
class MentionSide(_Side):
    text: torch.Tensor | None = None            # [B, Dt]  normalised pooled text (g2g score)
    keys: torch.Tensor | None = None            # [B, Lm, H+1]  TGLU keys of the mention tokens; the last column
                                                #   is 0, or PAD_LOGIT at padding (the key mask)
    key_keep: torch.Tensor | None = None        # [B, Lm]  1.0 for a key that takes part, 0.0 for padding
    values: torch.Tensor | None = None          # [B, Lm, H]  TGLU values
    has_tokens: torch.Tensor | None = None      # [B]
    e2m_key: torch.Tensor | None = None         # [B, H]  entity->mention dual: this image as key
    e2m_value: torch.Tensor | None = None       # [B, H]  ... and its pooled tokens as value
    m2e_query: torch.Tensor | None = None       # [B, H]  mention->entity dual: this image as query
    m2e_query_norm: torch.Tensor | None = None  # [B, H]  its layer-normalised form (scored against)
    has_image: torch.Tensor | None = None       # [B]
    fused: torch.Tensor | None = None           # [B, H]  CMFU vector


@dataclass
class EntitySide(_Side):
    text: torch.Tensor | None = None            # [E, Dt]  normalised pooled text (g2g score)
    queries: torch.Tensor | None = None         # [E, Le, H+1]  TGLU queries of the entity tokens, scaled by
                                                #   1/sqrt(H), and a column of ones (which adds the key mask)
    token_weight: torch.Tensor | None = None    # [E, Le]  weights of the mean over entity tokens (0 at padding)
    has_tokens: torch.Tensor | None = None      # [E]
    cls: torch.Tensor | None = None             # [E, H]  projected pooled text (g2l score)
    e2m_query: torch.Tensor | None = None       # [E, H]
    e2m_query_norm: torch.Tensor | None = None  # [E, H]
    m2e_key: torch.Tensor | None = None         # [E, H]
    m2e_value: torch.Tensor | None = None       # [E, H]
    has_image: torch.Tensor | None = None       # [E]
    fused: torch.Tensor | None = None           # [E, H]


def pair_bytes(b: int, e: int, mention_len: int, entity_len: int, hidden: int = 96, units=UNITS,
               dtype_bytes: int = 4, grad: bool = False, candidates: bool = False, text_dim: int = 512) -> int:
    """An upper bound on the memory of the tensors one :meth:`MIMIC.unit_scores` call allocates to score ``b``
    mentions against ``e`` entities (the encoded sides excluded), for evaluation to pick chunk sizes from a memory
    bound; with ``candidates``, ``b`` mentions against ``e`` candidates each.

    Per pair, in values of ``dtype_bytes``: the text unit holds the attention logits of every (entity token, mention
    token) pair, ``Le*Lm`` (once without gradients, where the softmax runs in place; twice with them) and then a
    few ``H``-vectors; the image unit about ``4*H`` while it runs (``24*H`` kept for the backward pass); each unit's
    score and the overall score one each. Without gradients the units run one after the other, so the largest of
    their peaks counts, with gradients their sum. ``candidates`` adds each mention's own copy of its candidates'
    rows (``Le*(H+2) + Dt + 6*H`` for all units). Checked against the tensors a call allocates in
    ``tests/test_mimic_model.py``."""
    lm, le, h = mention_len, entity_len, hidden
    peaks, gathered = [], 0
    if "text" in units:
        attention = (2 if grad else 1) * le * lm + 2 * lm
        peaks.append((attention + 4 * h if grad else max(attention, 4 * h)) + 4)
        gathered += le * (h + 2) + text_dim + h + 1
    if "image" in units:
        peaks.append((24 if grad else 4) * h + 8)
        gathered += 4 * h + 1
    if "fusion" in units:
        peaks.append(4)
        gathered += h + 1
    per_pair = 2 * (len(peaks) + 1) + (sum(peaks) if grad else max(peaks)) + (gathered if candidates else 0)
    return dtype_bytes * b * e * per_pair


def pair_flops(mention_len: int, entity_len: int, hidden: int = 96, text_dim: int = 512, units=UNITS) -> int:
    """Floating-point operations of scoring one (mention, entity) pair once both sides are encoded (multiply-adds
    count 2). Dominated by the text unit's token-token attention, ``2*Le*Lm*H`` for its logits."""
    f = 0
    if "text" in units:
        lm, le, h = mention_len, entity_len, hidden
        f += 2 * le * lm * h + 6 * le * lm + 2 * lm * h + 10 * h + 2 * text_dim
    if "image" in units:
        f += 2 * (2 * hidden * hidden + 26 * hidden)
    if "fusion" in units:
        f += 2 * hidden
    return f


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [N, T, D] where ``mask`` [N, T]; 0 for a row without any."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def _used(weights: torch.Tensor) -> int:
    """1 + the last token position to which any row of ``weights`` [..., L] gives weight (at least 1)."""
    used = (weights > 0).reshape(-1, weights.shape[-1]).any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def _keep_one(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` [N, T] with position 0 unmasked in rows without any real position, so a softmax stays finite (the
    caller zeroes such rows' output)."""
    safe = mask.clone()
    safe[:, 0] |= ~mask.any(1)
    return safe


def _softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``logits`` whose masked positions already hold about ``PAD_LOGIT`` and
    ``keep`` (float, broadcast) is 0; they get weight exactly 0 and never hold the maximum (a row keeps one real
    position, :func:`_keep_one`). In place when no gradient is being recorded: evaluation holds one copy of the
    logits instead of two, and clamps the shifted logits at -80 before ``exp`` (weights below e^-80 change nothing,
    and exp of the very negative numbers would take the CPU's slow path) with the masked ones zeroed after."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return logits.softmax(-1)          # exp(PAD_LOGIT - max) is exactly 0
    logits.sub_(logits.amax(-1, keepdim=True)).clamp_(min=-80.0).exp_().mul_(keep)
    return logits.div_(logits.sum(-1, keepdim=True))


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``logits`` where ``keep`` (bool, broadcast) is True."""
    return _softmax(logits.masked_fill(~keep, PAD_LOGIT), keep.to(logits.dtype))


def _bdot(m: torch.Tensor, e: torch.Tensor, aligned: bool) -> torch.Tensor:
    """Dot products of ``m`` [B, D] with ``e`` [E, D] (every pair: [B, E]) or [B, K, D] (its own rows: [B, K])."""
    if aligned:
        return torch.matmul(e, m.unsqueeze(-1)).squeeze(-1)
    return m @ e.T


class _Dual(nn.Module):
    """One dual-gated function of the image unit: a query image scored against a key image whose patch tokens are
    mixed with the query through a tanh gate."""

    def __init__(self, dv: int, hidden: int):
        super().__init__()
        self.cls_proj = nn.Linear(dv, hidden)
        self.tokens_proj = nn.Linear(dv, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)
        self.add_norm = nn.LayerNorm(hidden)
        self.out_norm = nn.LayerNorm(hidden)

    def query_side(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.cls_proj(image)
        return q, self.out_norm(q)

    def key_side(self, image: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor):
        # the mean of projected tokens is the projection of their mean (a linear map; rows without tokens are
        # masked out by the caller)
        return self.cls_proj(image), self.tokens_proj(_masked_mean(tokens, token_mask))

    def score(self, query: torch.Tensor, query_norm: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> torch.Tensor:
        """Broadcast pair scores: every argument [..., H] (one side [B, 1, H], the other [1, E, H] or [B, K, H])."""
        ctx = self.mix(self.add_norm(value + query))
        agg = self.out_norm(ctx * torch.tanh(self.gate(ctx)) + key)
        return (agg * query_norm).sum(-1)


class MIMIC(nn.Module):
    def __init__(self, cfg: MIMICConfig):
        super().__init__()
        self.cfg = cfg
        H, dt, dv = cfg.hidden, cfg.text_dim, cfg.dv
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.use_text_unit or cfg.use_fusion_unit:
            self.text_norm = nn.LayerNorm(dt)            # the pooled text of both sides
        if cfg.use_text_unit:
            self.tokens_norm = nn.LayerNorm(dt)          # the text tokens of both sides
            self.tglu_query = nn.Linear(dt, H)
            self.tglu_key = nn.Linear(dt, H)
            self.tglu_value = nn.Linear(dt, H)
            self.tglu_cls = nn.Linear(dt, H)
            self.tglu_norm = nn.LayerNorm(H)
        if cfg.uses_images:
            self.image_tokens_proj = nn.Linear(cfg.image_dim, dv)   # the official encoder's image_tokens_fc
            self.image_tokens_norm = nn.LayerNorm(dv)
        if cfg.use_image_unit:
            self.image_proj = nn.Linear(cfg.image_dim, dv)          # the official encoder's image_cls_fc
            self.image_norm = nn.LayerNorm(dv)
            self.dual_e2m = _Dual(dv, H)
            self.dual_m2e = _Dual(dv, H)
        if cfg.use_fusion_unit:
            self.fusion_text = nn.Linear(dt, H)
            self.fusion_image = nn.Linear(dv, H)
            self.fusion_gate = nn.Linear(H, 1)
            self.fusion_norm = nn.LayerNorm(H)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------------------------------------
    # one side at a time

    def _tokens(self, views: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A token view cut to ``text_len``, normalised, and its mask (all True without ``mask_padding``)."""
        x = views[key][:, : self.cfg.text_len].to(self._dtype())
        mask = views[key + "_mask"][:, : self.cfg.text_len].bool()
        if not self.cfg.mask_padding:
            mask = torch.ones_like(mask)
        return self.drop(self.tokens_norm(x)), mask

    def _image(self, views: dict[str, torch.Tensor]):
        """Normalised pooled image [N, dv] (image unit only), image tokens [N, T, dv], their mask and the rows that
        have an image."""
        cfg, dt = self.cfg, self._dtype()
        regions = views["regions"].to(dt)
        token_mask = views["regions_mask"].bool()
        if "image_mask" in views:
            has = views["image_mask"].bool().reshape(-1)
        else:
            has = token_mask.any(1)
        if cfg.global_image_token:
            regions = torch.cat([views["image"].to(dt).unsqueeze(1), regions], 1)
            token_mask = torch.cat([has.unsqueeze(1), token_mask], 1)
        if cfg.missing_image == "blank":     # the official code: every image and every token row counts
            has, token_mask = torch.ones_like(has), torch.ones_like(token_mask)
        tokens = self.drop(self.image_tokens_norm(self.image_tokens_proj(regions)))
        pooled = self.drop(self.image_norm(self.image_proj(views["image"].to(dt)))) if cfg.use_image_unit else None
        return pooled, tokens, token_mask, has

    def _fused(self, text: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
               has_image: torch.Tensor) -> torch.Tensor:
        """The fusion unit's vector of one side: the projected pooled text attends over the projected image tokens
        (unscaled dot products, as the code), and the gated text is added to what it attends to."""
        t = self.fusion_text(text)                                       # [N, H]
        p = self.fusion_image(tokens)                                    # [N, T, H]
        logits = torch.matmul(p, t.unsqueeze(-1)).squeeze(-1)           # [N, T]
        w = _masked_softmax(logits, _keep_one(token_mask))
        ctx = torch.matmul(w.unsqueeze(1), p).squeeze(1)                 # [N, H]
        ctx = torch.where((has_image & token_mask.any(1)).unsqueeze(1), ctx, torch.zeros_like(ctx))
        return self.fusion_norm(t * torch.tanh(self.fusion_gate(t)) + ctx)

    def _pooled_text(self, views: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
        if self.cfg.use_text_unit or self.cfg.use_fusion_unit:
            return self.drop(self.text_norm(views[key].to(self._dtype())))
        return None

    def _image_side(self, views: dict[str, torch.Tensor], text: torch.Tensor | None, query_of: _Dual,
                    key_of: _Dual):
        """One side's image tensors: whether it has an image, its (query, normalised query) for ``query_of``, its
        (key, value) for ``key_of`` (the image unit's two dual functions) and its fusion vector."""
        pooled, tokens, token_mask, has = self._image(views)
        query = key = (None, None)
        if self.cfg.use_image_unit:
            query, key = query_of.query_side(pooled), key_of.key_side(pooled, tokens, token_mask)
        fused = self._fused(text, tokens, token_mask, has) if self.cfg.use_fusion_unit else None
        return has, query, key, fused

    def encode_mentions(self, views: dict[str, torch.Tensor]) -> MentionSide:
        """Every tensor of the mention side that depends on the mention alone (``views``: the mention batch keys
        of :meth:`MIMICConfig.mention_views`)."""
        out = MentionSide()
        text = self._pooled_text(views, "context")
        if self.cfg.use_text_unit:
            tokens, mask = self._tokens(views, "sentence")
            out.text, out.has_tokens, out.values = text, mask.any(1), self.tglu_value(tokens)
            # the key mask rides in the attention product: an extra key column, 0 for a key that takes part and
            # PAD_LOGIT for padding (finite: a matrix product may multiply it by a zero it pads with), against a
            # query column of ones
            keep = _keep_one(mask)
            out.key_keep = keep.to(tokens.dtype)
            bias = torch.zeros_like(out.key_keep).masked_fill(~keep, PAD_LOGIT)
            out.keys = torch.cat([self.tglu_key(tokens), bias.unsqueeze(-1)], -1)
        if self.cfg.uses_images:     # the mention is the query of mention -> entity, the key of entity -> mention
            out.has_image, (out.m2e_query, out.m2e_query_norm), (out.e2m_key, out.e2m_value), out.fused = \
                self._image_side(views, text, getattr(self, "dual_m2e", None), getattr(self, "dual_e2m", None))
        return out

    def encode_entities(self, views: dict[str, torch.Tensor]) -> EntitySide:
        """Every tensor of the entity side that depends on the entity alone (``views``: the entity batch keys of
        :meth:`MIMICConfig.entity_views`). Whole-KB scoring encodes the KB once and scores chunks of it."""
        out = EntitySide()
        text = self._pooled_text(views, "desc")
        if self.cfg.use_text_unit:
            tokens, mask = self._tokens(views, "desc_tokens")
            w = mask.to(tokens.dtype)
            out.text, out.has_tokens, out.cls = text, mask.any(1), self.tglu_cls(text)
            queries = self.tglu_query(tokens) / math.sqrt(self.cfg.hidden)
            out.queries = torch.cat([queries, torch.ones_like(queries[..., :1])], -1)
            out.token_weight = w / w.sum(1, keepdim=True).clamp(min=1)
        if self.cfg.uses_images:     # the entity is the query of entity -> mention, the key of mention -> entity
            out.has_image, (out.e2m_query, out.e2m_query_norm), (out.m2e_key, out.m2e_value), out.fused = \
                self._image_side(views, text, getattr(self, "dual_e2m", None), getattr(self, "dual_m2e", None))
        return out

    # ---------------------------------------------------------------------------------------------
    # pairs

    def _text_unit(self, m: MentionSide, e: EntitySide, aligned: bool) -> torch.Tensor:
        g2g = _bdot(m.text, e.text, aligned)
        # token positions that no row of this block uses (padding past its longest mention / entity) take no part
        # in any softmax or mean: cutting them off gives the same scores with less work
        lm, le = _used(m.key_keep), _used(e.token_weight)
        keys, keep, values = m.keys[:, :lm], m.key_keep[:, :lm], m.values[:, :lm]
        queries, weight = e.queries[..., :le, :], e.token_weight[..., :le]
        b, h = keys.shape[0], keys.shape[2]
        if aligned:                                  # queries [B, K, Le, H+1]: each mention its own K entities
            k = queries.shape[1]
            logits = torch.matmul(queries.reshape(b, k * le, h), keys.transpose(1, 2)).view(b, k, le, lm)
            p = _softmax(logits, keep[:, None, None, :])
            pooled = torch.matmul(weight.unsqueeze(-2), p).squeeze(-2)                  # [B, K, Lm]
        else:                                        # queries [E, Le, H+1]: every pair, one matrix product
            k = queries.shape[0]
            logits = (queries.reshape(k * le, h) @ keys.reshape(b * lm, h).T).view(k, le, b, lm)
            p = _softmax(logits, keep)
            pooled = torch.matmul(weight.unsqueeze(1), p.view(k, le, b * lm))           # [E, 1, B*Lm]
            pooled = pooled.view(k, b, lm).transpose(0, 1)                              # [B, E, Lm]
        del logits, p
        # the mean over entity tokens of (attention @ values) is (mean of the attention) @ values: one [Lm, H]
        # product per pair instead of Le of them
        ctx = self.tglu_norm(torch.matmul(pooled, values))                             # [B, K, H]
        cls = e.cls if aligned else e.cls.unsqueeze(0)
        g2l = (ctx * cls).sum(-1)
        both = m.has_tokens.unsqueeze(1) & (e.has_tokens if aligned else e.has_tokens.unsqueeze(0))
        return (g2g + torch.where(both, g2l, torch.zeros_like(g2l))) / 2

    def _image_unit(self, m: MentionSide, e: EntitySide, aligned: bool) -> torch.Tensor:
        def lay(x):
            return x if aligned else x.unsqueeze(0)

        e2m = self.dual_e2m.score(lay(e.e2m_query), lay(e.e2m_query_norm), m.e2m_key.unsqueeze(1),
                                  m.e2m_value.unsqueeze(1))
        m2e = self.dual_m2e.score(m.m2e_query.unsqueeze(1), m.m2e_query_norm.unsqueeze(1), lay(e.m2e_key),
                                  lay(e.m2e_value))
        score = (e2m + m2e) / 2
        both = m.has_image.unsqueeze(1) & lay(e.has_image)
        return torch.where(both, score, torch.zeros_like(score))

    def unit_scores(self, m: MentionSide, e: EntitySide,
                    candidates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each switched-on unit's scores (``"text"``, ``"image"``, ``"fusion"``): [B, E] for every mention against
        every entity of ``e``, or [B, K] against its own ``candidates`` (rows of ``e``, [B, K]). Memory of one call:
        :func:`pair_bytes`; cost per pair: :func:`pair_flops`."""
        aligned = candidates is not None
        if aligned:
            if candidates.dim() != 2 or candidates.shape[0] != len(m):
                raise ValueError(f"candidates must be [B, K] for B = {len(m)} mentions, got {tuple(candidates.shape)}")
            e = e.rows(candidates)
        out = {}
        if self.cfg.use_text_unit:
            out["text"] = self._text_unit(m, e, aligned)
        if self.cfg.use_image_unit:
            out["image"] = self._image_unit(m, e, aligned)
        if self.cfg.use_fusion_unit:
            out["fusion"] = _bdot(m.fused, e.fused, aligned)
        return out

    @staticmethod
    def overall(units: dict[str, torch.Tensor]) -> torch.Tensor:
        """The overall score: the mean of the units' scores."""
        return torch.stack(list(units.values())).mean(0)

    def pair_scores(self, m: MentionSide, e: EntitySide, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Overall scores, higher is better: [B, E], or [B, K] with ``candidates`` (see :meth:`unit_scores`)."""
        return self.overall(self.unit_scores(m, e, candidates))

    def forward(self, mention_views: dict[str, torch.Tensor],
                entity_views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both sides and every pair in one call (DDP needs its forward to run): ``(overall [B, E], units)``, the
        in-batch scores the loss (:func:`nel_model.losses.mimic_loss_sum`) reads."""
        units = self.unit_scores(self.encode_mentions(mention_views), self.encode_entities(entity_views))
        return self.overall(units), units
