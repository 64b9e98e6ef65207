"""Encoding with a trained model: every KB entity and a set of mentions, from a feature cache, in chunks; loading
a run's model; the settings a run is encoded and measured with. The model layer's one way to turn cached features
into embeddings (evaluation, training's hard negatives, the loaded run all call these). Always in float32, without
autocast, whatever the training's mixed precision: the embeddings that end-of-training evaluation ranks are the ones
``dim-mel evaluate`` and ``predict`` rank (:data:`ENCODE_DTYPE`, recorded in results.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nel_model.data import FeatureSource
from nel_model.config import dim_config_from_saved
from nel_model.nel import DIM
from nel_model.runs import checkpoint_path, load_checkpoint


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


def _module(model: torch.nn.Module) -> DIM:
    m = getattr(model, "module", model)
    return getattr(m, "_orig_mod", m)


@torch.no_grad()
def encode_entities(model: torch.nn.Module, source: FeatureSource, device: torch.device,
                    settings: EncodeSettings) -> torch.Tensor:
    """All KB entities, L2-normalised ``[E, D]`` float32 on ``device`` (in chunks)."""
    net = _module(model)
    was = net.training
    net.eval()
    E = source.data.num_entities
    parts = []
    for s in range(0, E, settings.entity_chunk):
        views = _to(source.entities(np.arange(s, min(E, s + settings.entity_chunk))), device)
        parts.append(net.encode_entities(views).float())
    net.train(was)
    return torch.cat(parts, 0)


@torch.no_grad()
def encode_mentions(model: torch.nn.Module, source: FeatureSource, rows: np.ndarray, device: torch.device,
                    settings: EncodeSettings) -> torch.Tensor:
    net = _module(model)
    was = net.training
    net.eval()
    parts = []
    for s in range(0, len(rows), settings.mention_chunk):
        views = _to(source.mentions(rows[s: s + settings.mention_chunk]), device)
        parts.append(net.encode_mentions(views).float())
    net.train(was)
    if not parts:
        return torch.zeros(0, net.cfg.output_size, device=device)
    return torch.cat(parts, 0)


def _to(views: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in views.items()}


def load_run_model(run: Path, checkpoint: str, device: torch.device) -> tuple[DIM, dict[str, Any]]:
    """The model of a run folder at ``checkpoint`` (best or last) on ``device``, and the checkpoint's record."""
    ckpt = load_checkpoint(checkpoint_path(run, checkpoint))
    model = DIM(dim_config_from_saved(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


