"""The linking vocabulary, shared by the retriever, the re-rankers, the linker and the server: what goes in (a
:class:`Query`), what a re-ranker sees (:class:`MentionLists` of :class:`Candidate`), what comes out (a
:class:`LinkedMention` of :class:`LinkedEntity`, each saying which :data:`Stage` scored it), and the
:class:`Reranker` protocol. Plain dataclasses, no I/O: the re-rankers (``nel_model.rerank``) and the linking
commands (``nel_model.inference``) both import this module; the re-rankers never import the linking commands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

Stage = Literal["retriever", "reranker"]


@dataclass
class Query:
    """One mention to link: its sentence and surface form, and optionally its image (a path already checked by
    the reader), a caption and an enrichment text (profile rows), an id and a gold entity id (then the result
    carries the gold's rank)."""

    sentence: str
    mention: str
    image: Path | None = None
    caption: str | None = None
    enrichment: str | None = None
    id: str | None = None
    gold_id: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A retrieved entity as a re-ranker sees it: id, name, description and the retriever's score."""

    entity_id: str
    name: str
    description: str
    score: float


@dataclass
class MentionLists:
    """What a re-ranker scores: each mention with its candidates, best first by the retriever; from the linker
    also the mentions' views (``{view: [N, ...]}``, the feature cache's shapes) and the retriever's embeddings
    ``[N, D]``, already encoded, so a re-ranker that reads them encodes nothing again."""

    mentions: list[Query]
    candidates: list[list[Candidate]]
    views: dict[str, torch.Tensor] | None = None
    embeddings: torch.Tensor | None = None


class LinkError(ValueError):
    """A re-ranker or a linking input that cannot be used; the message names the file and says why."""


class Reranker(Protocol):
    """A second stage: ``score`` returns ``[N, K]`` (higher is better, NaN lowest) for the first ``top_k`` entries
    of each list (all of them when ``top_k`` is None); ``info`` says what it is (recorded with every result)."""

    kind: str
    top_k: int | None

    def score(self, lists: MentionLists) -> torch.Tensor: ...

    def info(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LinkedEntity:
    """One entity of a linked mention's list: its 1-based rank, the score that put it there and the stage that
    computed that score."""

    rank: int
    entity_id: str
    name: str
    description: str
    score: float | None
    stage: Stage


@dataclass
class LinkedMention:
    """One linked mention: its entities, best first, and (when the query gave a gold id) the gold's rank: its
    place among the re-ranked entities, else the retriever's pessimistic whole-KB rank (``None``: not in the KB).
    ``provenance``: what a ``dim-mel link`` line was computed from (the input line, the retriever's checkpoint,
    the re-ranker, K), so a rerun can tell a line it may keep."""

    id: str | None
    mention: str
    entities: list[LinkedEntity] = field(default_factory=list)
    gold_rank: int | None = None
    has_gold: bool = False
    provenance: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object ``dim-mel link`` writes (``docs/CONTRACTS.md``, "Linked mentions")."""
        out: dict[str, Any] = {"id": self.id, "mention": self.mention,
                               "entities": [asdict(e) for e in self.entities]}
        if self.has_gold:
            out["gold_rank"] = self.gold_rank
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out
