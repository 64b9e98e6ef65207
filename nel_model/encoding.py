"""Encoding with a trained model: every KB entity and a set of mentions, from a feature cache, in chunks; loading
a run's model; the settings a run is encoded and measured with. The model layer's one way to turn cached features
into embeddings (evaluation, training's hard negatives, the loaded run all call these). Always in float32, without
autocast, whatever the training's mixed precision: the embeddings that end-of-training evaluation ranks are the ones
``dim-mel evaluate`` and ``predict`` rank (:data:`ENCODE_DTYPE`, recorded in results.json).

Two kinds of model: a bi-encoder (DIM) encodes each side into one embedding ``[N, D]``; a pairwise model (MIMIC,
:func:`is_pairwise`) encodes each side into a :class:`~nel_model.mimic.MentionSide` /
:class:`~nel_model.mimic.EntitySide` (every tensor that depends on one side), which its ``pair_scores`` combines.
:func:`encode_entities` and :func:`encode_mentions` return whichever the model gives, in chunks joined by
:func:`cat_encoded`; :func:`take_rows` selects rows of either."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nel_model.data import FeatureSource
from nel_model.config import dim_config_from_saved, mimic_config_from_saved
from nel_model.mimic import MIMIC, MentionSide, EntitySide
from nel_model.nel import DIM
from nel_model.runs import checkpoint_path, load_checkpoint

Encoded = torch.Tensor | MentionSide | EntitySide     # one side, encoded: embeddings, or a pairwise model's side


ENCODE_DTYPE = "float32"


@dataclass
class EncodeSettings:
    mention_chunk: int = 512
    entity_chunk: int = 8192


@dataclass
class EvalSettings(EncodeSettings):
    """How a run is encoded and measured (``nel_model.evaluation.evaluate.settings_from_config`` reads them from a
    run's configuration)."""

    score_dtype: torch.dtype = torch.float32  # low precision is exact too: near-ties are re-checked in float32
    tie_rule: str = "pessimistic"             # nel_model.evaluation.metrics.TIE_RULES
    candidate_rule: str = "dim"               # nel_model.evaluation.metrics.CANDIDATE_RULES
    pair_memory_mb: int = 1024                # a pairwise model: the bound on one scoring call (mimic.pair_bytes)


def _module(model: torch.nn.Module) -> DIM | MIMIC:
    m = getattr(model, "module", model)
    return getattr(m, "_orig_mod", m)


def is_pairwise(model: torch.nn.Module) -> bool:
    """Whether ``model`` scores (mention, entity) pairs by interactions (MIMIC) rather than by a dot product of one
    embedding per side (DIM)."""
    return isinstance(_module(model), MIMIC)


def cat_encoded(parts: list[Encoded]) -> Encoded:
    """Rows of several encoded blocks of one side, in order."""
    return torch.cat(parts, 0) if isinstance(parts[0], torch.Tensor) else type(parts[0]).cat(parts)


def take_rows(x: Encoded, index) -> Encoded:
    """Rows ``index`` (a slice or an index tensor) of an encoded side."""
    return x[index] if isinstance(x, torch.Tensor) else x.rows(index)


def _float(x: Encoded) -> Encoded:
    return x.float() if isinstance(x, torch.Tensor) else x      # a pairwise side is in the model's float32


@torch.no_grad()
def encode_entities(model: torch.nn.Module, source: FeatureSource, device: torch.device,
                    settings: EncodeSettings) -> Encoded:
    """All KB entities, L2-normalised ``[E, D]`` float32 on ``device`` (in chunks); a pairwise model's
    :class:`~nel_model.mimic.EntitySide` of the whole KB."""
    net = _module(model)
    was = net.training
    net.eval()
    E = source.data.num_entities
    parts = []
    for s in range(0, E, settings.entity_chunk):
        views = _to(source.entities(np.arange(s, min(E, s + settings.entity_chunk))), device)
        parts.append(_float(net.encode_entities(views)))
    net.train(was)
    return cat_encoded(parts)


@torch.no_grad()
def encode_mentions(model: torch.nn.Module, source: FeatureSource, rows: np.ndarray, device: torch.device,
                    settings: EncodeSettings) -> Encoded:
    """The mentions ``rows`` (``[N, D]`` float32, or a pairwise model's :class:`~nel_model.mimic.MentionSide`)."""
    net = _module(model)
    was = net.training
    net.eval()
    parts = []
    for s in range(0, len(rows), settings.mention_chunk):
        views = _to(source.mentions(rows[s: s + settings.mention_chunk]), device)
        parts.append(_float(net.encode_mentions(views)))
    if not parts and is_pairwise(net):            # no rows: the model's own empty side
        parts.append(net.encode_mentions(_to(source.mentions(rows[:0]), device)))
    net.train(was)
    if not parts:
        return torch.zeros(0, net.cfg.output_size, device=device)
    return cat_encoded(parts)


@torch.no_grad()
def encode_mention_batch(model: torch.nn.Module, views: dict[str, torch.Tensor]) -> Encoded:
    """One batch of mention views (already on the model's device), encoded as :func:`encode_mentions` does."""
    return _float(_module(model).eval().encode_mentions(views))


def _to(views: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in views.items()}


def model_from_saved(saved: dict[str, Any]) -> DIM | MIMIC:
    """The (untrained) model a checkpoint's ``model_config`` describes: MIMIC's records ``"model": "mimic"``."""
    if saved.get("model") == "mimic":
        return MIMIC(mimic_config_from_saved(saved))
    return DIM(dim_config_from_saved(saved))


def load_run_model(run: Path, checkpoint: str, device: torch.device) -> tuple[DIM | MIMIC, dict[str, Any]]:
    """The model of a run folder at ``checkpoint`` (best or last) on ``device``, and the checkpoint's record."""
    ckpt = load_checkpoint(checkpoint_path(run, checkpoint))
    model = model_from_saved(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


