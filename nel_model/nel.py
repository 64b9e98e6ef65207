"""The DIM model: the mention phrase attends over sentence tokens, image regions (+ global image) and profile rows.

Shapes follow docs/CONTRACTS.md. Missing views are handled by masks: a mention with no key for a view gets exactly
zero contribution from that view (the all-masked attention case is guarded, no NaN), which equals switching the
view off. With ``residual`` (default when the text dim equals the output size) the output layers are zero-initialised
and added to the raw features::

    q = mention + W_q(Dropout(h_mention))        e = desc + W_e(Dropout(h_entity))

so an untrained model scores exactly the zero-shot cosine(mention feature, description feature).

Every choice where this model differs from the DIM paper or its code is a field of :class:`DIMConfig`;
``configs/dim_paper.yaml`` sets them all to the paper's choices. The table is docs/DIVERGENCES.md. This file knows no
flag names: :func:`nel_model.config.dim_config` builds a :class:`DIMConfig` from the typed training configuration (the
defaults of which are this class's) and the views of a feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# The values of each switch where the model may differ from the DIM paper/code (docs/DIVERGENCES.md), ours first;
# the training flags of the same names offer exactly these.
SWITCH_CHOICES: dict[str, tuple[str, ...]] = {
    "sentence_fusion": ("attention", "add", "pooled"),
    "image_fusion": ("key", "add"),
    "profile_pool": ("attention", "max"),
    "entity_tower": ("trained", "frozen"),
    "init": ("default", "xavier"),
    "query_input": ("projected", "raw"),
    "residual_base": ("mention", "context", "mix"),
}


@dataclass
class DIMConfig:
    text_dim: int
    image_dim: int
    hidden_size: int = 512        # 0: the text feature size (resolved on construction)
    output_size: int = 0          # 0: the text feature size (resolved on construction: the residual start)
    ff_size: int = 2048
    num_heads: int = 8
    num_layers: int = 2
    dropout: float = 0.4
    residual: bool = True
    use_sentence: bool = True
    use_image: bool = True        # global mention image as an extra key of the image attention
    use_regions: bool = True
    profile_rows: tuple[str, ...] = ("enrichment", "caption")   # row names in cache order
    profile_use: tuple[bool, ...] = (True, True)                 # which rows are used
    use_entity_image: bool = True
    use_entity_profile: bool = True
    # divergences from the DIM paper/code (docs/DIVERGENCES.md); the defaults are ours
    sentence_fusion: str = "attention"   # "attention": the mention attends over tokens; "add": their mean is added;
                                         # "pooled": the pooled "mention (sentence)" feature is added (DIM's code)
    image_fusion: str = "key"            # the global image: an attention "key" beside the regions, or "add"ed
    profile_pool: str = "attention"      # profile rows: each an attention key, or "max"-pooled into one
    shared_attention: bool = False       # one attention module for every view (DIM's code) instead of one each
    entity_tower: str = "trained"        # "trained" (desc + image + enrichment), or "frozen" text features
    init: str = "default"                # "xavier": Xavier-uniform linear layers (DIM's code); torch's otherwise
    query_input: str = "projected"       # "raw": q = W(Dropout(sum of the RAW view features)) (DIM's code)
    caption_constant: bool = False       # with "raw": the projected caption is added to every query, proj(0) where
                                         # a mention has none (DIM's code: a learned constant)
    residual_base: str = "mix"           # what the residual adds to the query: the mention feature, the pooled
                                         # context feature, or a learned mix of both (starting at the context)

    def __post_init__(self):
        self.hidden_size = self.hidden_size or self.text_dim
        self.output_size = self.output_size or self.text_dim
        for name, allowed in SWITCH_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.query_input == "raw":
            self._check_raw_query()
        elif self.caption_constant:
            raise ValueError("caption_constant is a behaviour of the raw-feature query (query_input raw)")
        if self.entity_tower == "frozen" and self.output_size != self.text_dim:
            raise ValueError(f"a frozen entity tower scores mentions against the entities' text features: the "
                             f"output size ({self.output_size}) must equal the text feature size ({self.text_dim})")

    def _check_raw_query(self) -> None:
        """DIM's code sums the raw features: every summed view must be one vector of the hidden size."""
        if self.hidden_size != self.text_dim:
            raise ValueError(f"a raw-feature query sums the views' features: the hidden size ({self.hidden_size}) "
                             f"must equal the text feature size ({self.text_dim}) (--hidden-size 0)")
        if self.use_image and self.image_dim != self.text_dim:
            raise ValueError(f"a raw-feature query adds the image feature to the text features: the image size "
                             f"({self.image_dim}) must equal the text size ({self.text_dim}), or use --no-image")
        wrong = [what for what, bad in (
            ("--sentence-fusion add|pooled", self.use_sentence and self.sentence_fusion == "attention"),
            ("--no-regions", self.use_regions), ("--image-fusion add", self.use_image and self.image_fusion == "key"),
            ("--profile-pool max", self.use_profile and self.profile_pool == "attention")) if bad]
        if wrong:
            raise ValueError(f"a raw-feature query (query_input raw) has no attention: it needs {', '.join(wrong)}")

    @property
    def is_residual(self) -> bool:
        return self.residual and self.text_dim == self.output_size

    @property
    def use_profile(self) -> bool:
        return any(self.profile_use)

    @property
    def use_context(self) -> bool:
        """Whether the pooled ``context`` view is read (added to the query, or the residual's base)."""
        return (self.use_sentence and self.sentence_fusion == "pooled") or (
            self.is_residual and self.residual_base != "mention")

    def mention_views(self) -> tuple[str, ...]:
        v = ["mention"]
        if self.use_sentence and self.sentence_fusion != "pooled":
            v.append("sentence")
        if self.use_context:
            v.append("context")
        if self.use_image:
            v.append("image")
        if self.use_regions:
            v.append("regions")
        if self.use_profile:
            v.append("profile")
        return tuple(v)

    def entity_views(self) -> tuple[str, ...]:
        v = ["desc"]
        if self.use_entity_image and self.entity_tower == "trained":
            v.append("image")
        if self.use_entity_profile:
            v.append("profile")
        return tuple(v)

    @property
    def attended_views(self) -> tuple[str, ...]:
        """The views the mention attends over (each one attention output, refined together)."""
        v = []
        if self.query_input == "raw":
            return ()
        if self.use_sentence and self.sentence_fusion == "attention":
            v.append("sentence")
        if self.use_regions or (self.use_image and self.image_fusion == "key"):
            v.append("image")
        if self.use_profile:
            v.append("profile")
        return tuple(v)


class Projection(nn.Sequential):
    """Linear → ReLU → LayerNorm → Dropout."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__(nn.Linear(d_in, d_out), nn.ReLU(), nn.LayerNorm(d_out), nn.Dropout(dropout))


def masked_attention(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """``query`` [B,1,H] attends over ``keys`` [B,N,H] where ``mask`` [B,N] is True for real keys, with the
    weights of ``attn`` (an ``nn.MultiheadAttention``: its in/out projections, heads and attention dropout).

    The same function as ``attn(query, keys, keys, key_padding_mask=~mask)``, computed with one fused
    ``scaled_dot_product_attention`` instead of the module's generic path (a few kernels instead of dozens).
    Returns [B,H]; rows without any real key return exactly 0 (one key is unmasked internally to keep softmax
    finite, and the output of that row is multiplied by 0, so neither value nor gradient leaks)."""
    b, n, h = keys.shape
    heads = attn.num_heads
    has_any = mask.any(dim=1)
    safe = mask.clone()
    safe[:, 0] |= ~has_any
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(query, w[:h], bias[:h]).view(b, 1, heads, h // heads).transpose(1, 2)          # [B,h,1,d]
    k, v = F.linear(keys, w[h:], bias[h:]).view(b, n, 2, heads, h // heads).permute(2, 0, 3, 1, 4)  # [B,h,N,d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :],
                                         dropout_p=attn.dropout if attn.training else 0.0)
    out = attn.out_proj(out.transpose(1, 2).reshape(b, h))
    return torch.where(has_any.unsqueeze(1), out, torch.zeros_like(out))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``x`` [B,N,H] where ``mask`` [B,N]; 0 where no row is present."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the rows of ``x`` [B,N,D] where ``mask`` [B,N]; 0 where no row is present."""
    filled = torch.where(mask.unsqueeze(-1), x, torch.finfo(x.dtype).min)
    return torch.where(mask.any(1, keepdim=True), filled.max(1).values, torch.zeros_like(x[:, 0]))


class DIM(nn.Module):
    def __init__(self, cfg: DIMConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        raw = cfg.query_input == "raw"
        # a raw-feature query projects no text view; only its caption/profile feature goes through a projection
        needs_text_proj = not raw or cfg.entity_tower == "trained"
        self.text_proj = Projection(cfg.text_dim, H, cfg.dropout) if needs_text_proj else None
        self.caption_proj = Projection(cfg.text_dim, H, cfg.dropout) if raw and (
            cfg.use_profile or cfg.caption_constant) else None
        if cfg.is_residual and cfg.residual_base == "mix":
            # weights of the mention and context features in the residual base: the context scorer at the start
            self.base_mix = nn.Parameter(torch.tensor([0.0, 1.0]))
        uses_image = (not raw and (cfg.use_image or cfg.use_regions)) or (
            cfg.use_entity_image and cfg.entity_tower == "trained")
        self.image_proj = Projection(cfg.image_dim, H, cfg.dropout) if uses_image else None

        def mha():
            return nn.MultiheadAttention(H, cfg.num_heads, dropout=cfg.dropout, batch_first=True)

        attended = cfg.attended_views
        self.shared_attn = mha() if cfg.shared_attention and attended else None
        own = not cfg.shared_attention
        self.sentence_attn = mha() if own and "sentence" in attended else None
        self.image_attn = mha() if own and "image" in attended else None
        self.profile_attn = mha() if own and "profile" in attended else None
        self.refine = None
        if cfg.num_layers > 0 and attended:
            layer = nn.TransformerEncoderLayer(H, cfg.num_heads, cfg.ff_size, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.refine = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.q_dropout = nn.Dropout(cfg.dropout)
        self.q_out = nn.Linear(H, cfg.output_size)
        if cfg.entity_tower == "trained":
            self.e_dropout = nn.Dropout(cfg.dropout)
            self.e_out = nn.Linear(H, cfg.output_size)
        self.register_buffer("profile_row_use", torch.tensor(cfg.profile_use, dtype=torch.bool), persistent=False)
        if cfg.init == "xavier":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        if cfg.is_residual:
            for lin in (self.q_out, getattr(self, "e_out", None)):
                if lin is not None:
                    nn.init.zeros_(lin.weight)
                    nn.init.zeros_(lin.bias)

    def _attn(self, view: str) -> nn.MultiheadAttention:
        return self.shared_attn if self.shared_attn is not None else getattr(self, f"{view}_attn")

    def _dtype(self) -> torch.dtype:
        return self.q_out.weight.dtype

    def _residual_base(self, views: dict[str, torch.Tensor], mention: torch.Tensor) -> torch.Tensor:
        base = self.cfg.residual_base
        if base == "mention":
            return mention
        context = views["context"].to(mention.dtype)
        if base == "context":
            return context
        w = self.base_mix.to(mention.dtype)
        return w[0] * mention + w[1] * context

    def _raw_query(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """DIM's code: one linear map, after dropout, of the sum of the raw features (mention + context + image)
        and the projected caption (a learned constant ``LayerNorm(ReLU(b))`` where a mention has none)."""
        cfg, dt = self.cfg, self._dtype()
        h = views["mention"].to(dt)
        if cfg.use_sentence:
            if cfg.sentence_fusion == "pooled":
                h = h + views["context"].to(dt)
            else:
                h = h + masked_mean(views["sentence"].to(dt), views["sentence_mask"].bool())
        if cfg.use_image:
            h = h + torch.where(views["image_mask"].bool().reshape(-1, 1), views["image"].to(dt), 0.0)
        if self.caption_proj is not None:
            if cfg.use_profile:
                pmask = views["profile_mask"].bool() & self.profile_row_use.unsqueeze(0)
                cap, present = masked_max(views["profile"].to(dt), pmask), pmask.any(1, keepdim=True)
            else:                                 # no caption at all: DIM's code still adds proj(0)
                cap, present = torch.zeros_like(h), torch.zeros_like(h[:, :1], dtype=torch.bool)
            proj = self.caption_proj(cap)
            # the code: proj(caption or 0) for every mention; otherwise a mention without a profile gets none
            h = h + (proj if cfg.caption_constant else torch.where(present, proj, 0.0))
        return h

    def encode_mentions(self, views: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        cfg, dt = self.cfg, self._dtype()
        mention = views["mention"].to(dt)
        if cfg.query_input == "raw":
            out = self.q_out(self.q_dropout(self._raw_query(views)))
            if cfg.is_residual:
                out = self._residual_base(views, mention) + out
            return F.normalize(out.float(), dim=-1) if normalize else out
        # One projection call per modality: the mention, its sentence tokens and its profile rows go through the
        # text projection together, the regions and the whole image through the image projection (the projection
        # works token by token, so this is the same function with a third of the kernels).
        text, L = [mention.unsqueeze(1)], 0
        pooled_context = cfg.use_sentence and cfg.sentence_fusion == "pooled"
        if pooled_context:
            text.append(views["context"].to(dt).unsqueeze(1))
            L = 1
        elif cfg.use_sentence:
            text.append(views["sentence"].to(dt))
            L = text[-1].shape[1]
        if cfg.use_profile:
            rows = views["profile"].to(dt)
            pmask = views["profile_mask"].bool() & self.profile_row_use.unsqueeze(0)
            if cfg.profile_pool == "max":
                rows, pmask = masked_max(rows, pmask).unsqueeze(1), pmask.any(1, keepdim=True)
            text.append(rows)
        proj = self.text_proj(torch.cat(text, 1) if len(text) > 1 else text[0])       # [B,1+L+K,H]
        hm, query = proj[:, 0], proj[:, :1]
        h = hm
        tokens, present = [], []
        if pooled_context:
            h = h + proj[:, 1]
        elif cfg.use_sentence:
            keys, mask = proj[:, 1:1 + L], views["sentence_mask"].bool()
            if cfg.sentence_fusion == "attention":
                tokens.append(masked_attention(self._attn("sentence"), query, keys, mask))
                present.append(mask.any(1))
            else:
                h = h + masked_mean(keys, mask)
        if cfg.use_regions or cfg.use_image:
            parts, masks = [], []
            if cfg.use_regions:
                parts.append(views["regions"].to(dt))
                masks.append(views["regions_mask"].bool())
            if cfg.use_image:
                parts.append(views["image"].to(dt).unsqueeze(1))
                masks.append(views["image_mask"].bool().reshape(-1, 1))
            img = self.image_proj(torch.cat(parts, 1) if len(parts) > 1 else parts[0])   # [B,R(+1),H]
            if cfg.use_image and cfg.image_fusion == "add":
                h = h + torch.where(masks[-1], img[:, -1], 0.0)
                img, masks = img[:, :-1], masks[:-1]
            if masks:
                mask = torch.cat(masks, 1) if len(masks) > 1 else masks[0]
                tokens.append(masked_attention(self._attn("image"), query, img, mask))
                present.append(mask.any(1))
        if cfg.use_profile:
            tokens.append(masked_attention(self._attn("profile"), query, proj[:, 1 + L:], pmask))
            present.append(pmask.any(1))
        if tokens:
            toks = torch.stack(tokens, 1)                       # [B,V,H]
            pres = torch.stack(present, 1)                      # [B,V]
            if self.refine is not None:
                seq = torch.cat([query, toks], 1)
                pad = torch.cat([torch.zeros_like(pres[:, :1]), ~pres], 1)   # mention token is never padded
                toks = self.refine(seq, src_key_padding_mask=pad)[:, 1:]
            h = h + torch.where(pres.unsqueeze(-1), toks, 0.0).sum(1)
        out = self.q_out(self.q_dropout(h))
        if self.cfg.is_residual:
            out = self._residual_base(views, mention) + out
        return F.normalize(out.float(), dim=-1) if normalize else out

    def encode_entities(self, views: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        cfg, dt = self.cfg, self._dtype()
        desc = views["desc"].to(dt)
        if cfg.entity_tower == "frozen":
            # the entity's own text feature: its LLM description where the dataset has one, else its description
            out = desc
            if cfg.use_entity_profile:
                out = torch.where(views["profile_mask"].bool().reshape(-1, 1), views["profile"].to(dt), desc)
            return F.normalize(out.float(), dim=-1) if normalize else out.float()
        if cfg.use_entity_profile:          # description and enrichment in one projection call
            both = self.text_proj(torch.stack([desc, views["profile"].to(dt)], 1))
            m = views["profile_mask"].bool().reshape(-1, 1)
            h = both[:, 0] + torch.where(m, both[:, 1], 0.0)
        else:
            h = self.text_proj(desc)
        if cfg.use_entity_image:
            m = views["image_mask"].bool().reshape(-1, 1)
            h = h + torch.where(m, self.image_proj(views["image"].to(dt)), 0.0)
        out = self.e_out(self.e_dropout(h))
        if self.cfg.is_residual:
            out = desc + out
        return F.normalize(out.float(), dim=-1) if normalize else out

    def forward(self, mention_views: dict[str, torch.Tensor], entity_views: dict[str, torch.Tensor],
                normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides in one call (DDP needs its forward to run): ``(queries [B,D], entities [E,D])``, L2-normalised
        unless ``normalize`` is False (the N-pair loss works on raw dot products)."""
        return self.encode_mentions(mention_views, normalize), self.encode_entities(entity_views, normalize)
