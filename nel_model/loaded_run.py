"""One loaded run: the object every command that opens a run folder works with (``dim-mel evaluate``, ``predict``,
``retrieve``, ``link``, the re-rankers' training and two-stage evaluation, the re-rankers inside the linker).

A :class:`LoadedRun` holds the run's configuration (``config.json``), its model at one checkpoint (loaded once,
with the checkpoint file's SHA-256), the evaluation settings it is measured with, the feature cache it was trained
on (:class:`~nel_model.data.MELData`, :class:`~nel_model.data.FeatureSource`), the feature cache's encoders
(loaded on first use: only new mentions and new entities need them) and the KB's entity embeddings (computed on
first use, once).

A pairwise run (MIMIC: ``nel_model.encoding.is_pairwise``) has no KB embedding matrix: its **encoded KB side**
(:attr:`LoadedRun.kb`, a :class:`~nel_model.mimic.EntitySide`: every tensor of the KB that depends on the entities
alone) takes the matrix's place, encoded once on first use and never saved (it is larger than the cached views it
comes from); the evaluation scores mentions against it pair by pair (``nel_model.evaluation.scoring``).
:attr:`LoadedRun.kb` is the one name for either side.

The KB's embeddings are read from the run folder (``entity_embeddings.npy``) when ``entity_embeddings.json``
records exactly what they would be computed from now (:func:`kb_fingerprint`: the checkpoint file's SHA-256, the
feature cache's entity views with their content hashes, the KB's ids, the encode dtype and chunk); training writes
that pair at its end. Otherwise they are encoded once, and (for the best checkpoint) saved when the run folder is
writable and its lock is free (``data_process.core.locks``). Read or encoded, they are the float32 embeddings the
run's evaluation ranks.

New mentions (:class:`~nel_model.linking.Query`) are encoded as the feature step encodes the cache's (the same
encoders and settings, rounded to the cache's float16), together but **in fixed shapes**: a text is padded to a
length of its own and encoded in a pass of as many texts as that length gives, an image in a pass of a fixed number
(:data:`MENTION_SHAPES`, ``data_process.encode.encoders.FixedShapes``), the model one mention a pass, and the
scores in passes of exactly :data:`MENTION_ROWS` mentions (``nel_model.inference.linker``; a pass's first row repeated
to fill the last), so every kernel runs on the same shapes whatever else is in the batch (and where a kernel's
result depends on a row's place in its batch, as the model's attention does with more than one thread, a mention is
alone), and a mention's views and embedding do not depend on the mentions encoded beside it: a resumed
``dim-mel link`` and the server's batches give the entities of an uninterrupted run (``tests/test_linker.py``
asserts the ranks, and the scores to float rounding). New KB entities (records) are encoded into the entity views,
then by the model in chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data_process.core.devices import resolve_device
from data_process.core.fingerprints import file_sha256, stable_hash
from data_process.core.locks import OutputLocked, output_lock
from data_process.core.records import ENTITIES_FILE, Entity, Mention, read_entities
from data_process.encode.encoders import FixedShapes
from data_process.encode.feature_store import PROFILE_ROWS
from nel_model.data import FeatureSource, MELData, load_mel_data
from nel_model.encoding import (ENCODE_DTYPE, Encoded, EvalSettings, cat_encoded, encode_entities,
                                encode_mention_batch, encode_mentions, is_pairwise, load_run_model)
from nel_model.linking import Query
from nel_model.mimic import MIMIC
from nel_model.nel import DIM
from nel_model.runs import (RETRIEVAL_DIR, RunError, checkpoint_path, load_config, load_predictions,
                            read_entity_embeddings, write_entity_embeddings)

log = logging.getLogger(__name__)

Views = dict[str, torch.Tensor]

MENTION_SHAPES = FixedShapes()      # new mentions: the encoders' fixed shapes (module docstring)
MENTION_ROWS = MENTION_SHAPES.rows  # new mentions: the rows of every scoring pass (the linker's)


def kb_fingerprint(checkpoint_sha256: str, data: MELData, entity_views: Sequence[str],
                   settings: EvalSettings) -> dict[str, Any] | None:
    """What a run's KB embeddings are computed from: the checkpoint (its file's SHA-256), the feature cache's
    entity views the model reads (their fingerprints and files' content hashes, ``meta.json``), the KB's ids, the
    encode dtype and the entity chunk. ``None`` when the cache does not record its files' hashes (a cache from
    before them): nothing vouches for a saved copy then, and the KB is encoded."""
    views = {}
    for v in entity_views:
        info = (data.meta.get("views") or {}).get(f"entity.{v}") or {}
        files = info.get("files")
        if not isinstance(files, dict) or not files:
            return None
        views[f"entity.{v}"] = {"fingerprint": info.get("fingerprint"),
                                "sha256": {name: f.get("sha256") for name, f in sorted(files.items())}}
    return {"checkpoint_sha256": checkpoint_sha256, "entity_views": views,
            "entity_ids_sha256": stable_hash(list(data.entity_ids)), "encode_dtype": ENCODE_DTYPE,
            "entity_chunk": int(settings.entity_chunk)}


def save_kb_embeddings(run_dir: str | Path, emb: torch.Tensor, checkpoint: str | Path, data: MELData,
                       entity_views: Sequence[str], settings: EvalSettings) -> None:
    """Write ``RUN/entity_embeddings.{npy,json}`` for the embeddings ``emb`` [E, D] the checkpoint file
    ``checkpoint`` gives over ``data`` (what training calls at its end; :class:`LoadedRun` reads them back)."""
    fp = kb_fingerprint(file_sha256(checkpoint), data, entity_views, settings)
    write_entity_embeddings(run_dir, emb.detach().float().cpu().numpy(), data.entity_ids,
                            {**(fp or {"unverifiable": True}), "checkpoint": Path(checkpoint).stem})


@dataclass
class RetrievedLists:
    """One split's retrieved lists (``RUN/retrieval/<split>.jsonl``), aligned with the feature cache: ``rows`` [N]
    mention rows, ``top`` [N,K] entity rows (best first, distinct), ``scores`` [N,K] the retriever's float32
    scores, ``gold`` [N] entity rows."""

    split: str
    rows: np.ndarray
    top: torch.Tensor
    scores: torch.Tensor
    gold: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.top.shape[1])

    def gold_position(self) -> torch.Tensor:
        """[N] the gold's index in its list, -1 when the list does not hold it."""
        hit = self.top == self.gold[:, None]
        return torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(self.gold, -1))


def _recorded_folder(conf: dict[str, Any], key: str, run: Path) -> Path | None:
    """The folder ``config.json`` records under ``<key>_resolved`` or ``<key>`` (a relative one: from the working
    directory, else from the run folder)."""
    for k in (f"{key}_resolved", key):
        v = conf.get(k)
        if v:
            p = Path(v)
            return p if p.is_absolute() or p.exists() or not (run / p).exists() else run / p
    return None


@dataclass
class LoadedRun:
    """A run folder ready to rank: module docstring. Open it with :meth:`open` (or
    ``nel_model.evaluation.evaluate.open_run``, which gives it the run's own evaluation settings)."""

    run: Path
    config: dict[str, Any]
    model: DIM | MIMIC
    checkpoint: str                 # best | last
    epoch: int | None               # the checkpoint's epoch
    checkpoint_sha256: str          # of RUN/checkpoints/<checkpoint>.pt: what the run's results come from
    data: MELData
    source: FeatureSource
    settings: EvalSettings
    device: torch.device
    _entity_emb: torch.Tensor | None = field(default=None, init=False, repr=False)
    _kb_side: Encoded | None = field(default=None, init=False, repr=False)
    _encoders: tuple[Any, Any, Any] | None = field(default=None, init=False, repr=False)
    _entities: dict[str, Entity] | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, run: str | Path, device: str | torch.device = "auto", checkpoint: str = "best",
             features: str | Path | None = None, dataset: str | Path | None = None,
             settings: Callable[[dict[str, Any], torch.device], EvalSettings] | None = None) -> "LoadedRun":
        """Load ``run`` at ``checkpoint``: ``features`` / ``dataset`` override the folders ``config.json``
        records; ``settings(config, device)`` gives the evaluation settings (default: :class:`EvalSettings`)."""
        run = Path(run)
        if not run.is_dir():
            raise RunError(f"{run}: run folder not found")
        conf = load_config(run)
        feat = Path(features) if features else _recorded_folder(conf, "features", run)
        if feat is None or not (feat / "meta.json").is_file():
            raise RunError(f"{feat if feat else run / 'config.json'}: feature folder with meta.json not found "
                           "(the run's encoders and KB features; pass --features)")
        ds = Path(dataset) if dataset else _recorded_folder(conf, "dataset", run)
        if ds is not None and not ds.is_dir():
            raise RunError(f"{ds}: dataset folder not found (the run's labels and entity names; pass --dataset)")
        dev = resolve_device(device)
        model, ckpt = load_run_model(run, checkpoint, dev)
        data = load_mel_data(feat, ds)
        source = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
        return cls(run, conf, model, checkpoint, ckpt.get("epoch"), file_sha256(checkpoint_path(run, checkpoint)),
                   data, source, settings(conf, dev) if settings is not None else EvalSettings(), dev)

    # -- the KB ---------------------------------------------------------------------------------
    def kb_fingerprint(self) -> dict[str, Any] | None:
        """What this run's KB embeddings are computed from (:func:`kb_fingerprint`)."""
        return kb_fingerprint(self.checkpoint_sha256, self.data, self.model.cfg.entity_views(), self.settings)

    def index_fingerprint(self) -> dict[str, Any]:
        """What the vectors of a KB index built with this run are a function of, besides the entity records: the
        checkpoint, the encoders (by name: a path differs between machines) and their lengths, the embedding size
        (``dim-mel index``). A pairwise run has no entity vectors: a :class:`RunError` naming the run."""
        if self.pairwise:
            raise RunError(f"{self.run}: a pairwise run (MIMIC) scores each (mention, entity) pair and has no entity "
                           "vectors to index; index with a bi-encoder run and re-rank with the pairwise one")
        meta = self.data.meta
        return {"checkpoint_sha256": self.checkpoint_sha256,
                "text_encoder": Path(str(meta.get("text_encoder", ""))).name,
                "image_encoder": Path(str(meta.get("image_encoder", ""))).name,
                "lengths": [meta.get("max_len"), meta.get("text_max_len"), meta.get("desc_max_len")],
                "dim": int(self.model.cfg.output_size)}

    @property
    def pairwise(self) -> bool:
        """Whether the run's model scores (mention, entity) pairs (MIMIC) instead of embeddings' dot products."""
        return is_pairwise(self.model)

    @property
    def kb(self) -> Encoded:
        """The encoded KB side the evaluation scores against: :attr:`entity_emb` for a bi-encoder; a pairwise
        model's :class:`~nel_model.mimic.EntitySide` of every KB entity, encoded here once."""
        if not self.pairwise:
            return self.entity_emb
        if self._kb_side is None:
            self._kb_side = encode_entities(self.model, self.source, self.device, self.settings)
        return self._kb_side

    @property
    def entity_emb(self) -> torch.Tensor:
        """Every KB entity ``[E, D]`` float32 on the device, as the run's evaluation encodes them: read from the
        run folder when its record matches (:meth:`kb_fingerprint`), else encoded here once (and saved). A
        pairwise run has none (:attr:`kb` is its encoded KB side): a :class:`RunError` naming the run."""
        if self.pairwise:
            raise RunError(f"{self.run}: a pairwise run (MIMIC) scores each (mention, entity) pair; it has no KB "
                           "embedding matrix (a KB index, the feature re-ranker's embedding features and faiss "
                           "need a bi-encoder run)")
        if self._entity_emb is None:
            fp = self.kb_fingerprint()
            saved = read_entity_embeddings(self.run, fp) if fp is not None else None
            if saved is not None and saved.shape[0] == self.data.num_entities:
                self._entity_emb = torch.from_numpy(saved).to(self.device)
            else:
                self._entity_emb = encode_entities(self.model, self.source, self.device, self.settings)
                if fp is not None and self.checkpoint == "best":     # the run's own; another is encoded each time
                    self._save_entity_embeddings(fp)
        return self._entity_emb

    def _save_entity_embeddings(self, fp: dict[str, Any]) -> None:
        """Save the KB embeddings for the next command, when the run folder's lock is free and it is writable
        (else the next command encodes them again: nothing is lost)."""
        try:
            with output_lock(self.run):
                write_entity_embeddings(self.run, self._entity_emb.cpu().numpy(), self.data.entity_ids,
                                        {**fp, "checkpoint": self.checkpoint})
        except (OutputLocked, OSError) as exc:
            log.info("%s: entity embeddings not saved (%s)", self.run, exc)

    def entity(self, entity_id: str) -> Entity | None:
        """The KB record of ``entity_id`` (name, description) from the run's dataset (read once)."""
        if self._entities is None:
            if self.data.dataset is None:
                raise RunError(f"{self.data.root}/meta.json: names no dataset folder (the KB's names; pass --dataset)")
            self._entities = {e.id: e for e in read_entities(Path(self.data.dataset) / ENTITIES_FILE)}
        return self._entities.get(entity_id)

    # -- the feature cache's mentions -----------------------------------------------------------
    def mention_embeddings(self, rows: np.ndarray) -> Encoded:
        """The cache's mentions ``rows``, encoded as the run's evaluation encodes them (float32, on the device; a
        pairwise run: its :class:`~nel_model.mimic.MentionSide`)."""
        return encode_mentions(self.model, self.source, rows, self.device, self.settings)

    def lists(self, split: str) -> RetrievedLists:
        """The split's retrieved lists (``RUN/retrieval/<split>.jsonl``, ``dim-mel retrieve``), checked against
        the feature cache: the same mentions in the same order, every entity in the KB, no entity twice."""
        preds = load_predictions(self.run, split, RETRIEVAL_DIR)
        rows = self.data.splits[split]
        ids = [self.data.mention_ids[r] for r in rows]
        if [p.mention_id for p in preds.mentions] != ids:
            raise RunError(f"{preds.path}: its mentions are not the feature cache's {split} mentions "
                           "(the cache changed since retrieval? rerun dim-mel retrieve)")
        row_of = {eid: i for i, eid in enumerate(self.data.entity_ids)}
        for lineno, p in enumerate(preds.mentions, 1):
            listed = [e for e, _ in p.top]
            if len(set(listed)) != len(listed):
                twice = next(e for e in listed if listed.count(e) > 1)
                raise RunError(f"{preds.path}, line {lineno} (mention {p.mention_id!r}), field 'top': entity "
                               f"{twice!r} is listed twice (lists of an older dim-mel retrieve --faiss with a K "
                               "larger than the KB?): rerun dim-mel retrieve")
        k = min((len(p.top) for p in preds.mentions), default=0)
        try:
            top = torch.tensor([[row_of[e] for e, _ in p.top[:k]] for p in preds.mentions], dtype=torch.long)
        except KeyError as exc:
            raise RunError(f"{preds.path}: entity {exc.args[0]!r} is not in the feature cache's KB") from None
        scores = torch.tensor([[float("nan") if s is None else s for _, s in p.top[:k]] for p in preds.mentions],
                              dtype=torch.float32)
        return RetrievedLists(split, rows, top.reshape(len(rows), k), scores.reshape(len(rows), k),
                              torch.from_numpy(self.data.gold[rows]).long(), preds.meta)

    # -- new mentions and new entities ----------------------------------------------------------
    def encoders(self) -> tuple[Any, Any, Any]:
        """``(text_encoder, image_encoder, feature settings)`` of the feature cache (loaded on first use)."""
        if self._encoders is None:
            from data_process.encode.features import load_encoders_from_meta

            meta_path = self.data.root / "meta.json"
            try:
                self._encoders = load_encoders_from_meta(self.data.meta, str(self.device))
            except KeyError as exc:
                raise RunError(f"{meta_path}: {exc.args[0]}") from None
            except OSError as exc:
                raise RunError(f"{meta_path}: cannot load the encoders it names ({self.data.meta.get('text_encoder')!r}"
                               f", {self.data.meta.get('image_encoder')!r}): {exc}") from None
        return self._encoders

    def _views(self, raw: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Views:
        """Feature-step output as the cache holds it (float16, bool masks), as tensors on the device."""
        views: Views = {}
        for name, (data, mask) in raw.items():
            views[name] = torch.from_numpy(np.asarray(data, dtype=np.float16)).to(self.device)
            if mask is not None:
                views[f"{name}_mask"] = torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device)
        return views

    def query_views(self, queries: Sequence[Query]) -> Views:
        """The contract-shaped mention views (docs/CONTRACTS.md) of new mentions, encoded like the feature cache's
        (same encoders and settings, rounded to the cache's float16) in fixed shapes (module docstring)."""
        from data_process.encode.features import encode_mention_views

        rows = self.data.meta.get("views", {}).get("mention.profile", {}).get("rows", list(PROFILE_ROWS))
        if tuple(rows) != tuple(PROFILE_ROWS):
            raise RunError(f"{self.data.root / 'meta.json'}: profile rows {rows} differ from the encoder's "
                           f"{list(PROFILE_ROWS)}")
        text_enc, image_enc, settings = self.encoders()

        def text(value: str | None) -> dict[str, Any] | None:
            return None if not value else {"text": value, "provenance": {"source": "linking input"}}

        mentions = [Mention(id=q.id or "query", sentence=q.sentence, mention=q.mention, gold_id=q.gold_id or "",
                            split="test", image=None if q.image is None else str(Path(q.image).resolve()),
                            caption=text(q.caption), enrichment=text(q.enrichment)) for q in queries]
        return self._views(encode_mention_views(mentions, None, text_enc, image_enc, settings, shapes=MENTION_SHAPES))

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[Query]) -> tuple[Views, Encoded]:
        """New mentions' views ``[N, ...]`` and embeddings ``[N, D]`` (float32; a pairwise run: its
        ``MentionSide``), each independent of the others (module docstring): the views in fixed shapes, the model one
        mention a pass (its attention over the sentence, CPU ``scaled_dot_product_attention`` with a query of length
        1, gives a row a result that depends on its position in the batch when torch runs more than one thread)."""
        views = self.query_views(queries)
        if not queries:
            return views, encode_mention_batch(self.model, views)
        return views, cat_encoded([encode_mention_batch(self.model, {k: v[i:i + 1] for k, v in views.items()})
                                   for i in range(len(queries))])

    def encode_query(self, query: Query) -> tuple[Views, Encoded]:
        """One new mention's views and its embedding ``[1, D]`` (float32; a pairwise run: its ``MentionSide``):
        :meth:`encode_queries` of one."""
        return self.encode_queries([query])

    def entity_views(self, entities: Sequence[Entity], image_root: str | Path) -> Views:
        """The entity views (desc, image, profile) of KB records, as the feature step writes them (images named
        inside ``image_root``; a missing one: zeros and mask False)."""
        from data_process.encode.features import encode_entity_views

        text_enc, image_enc, _ = self.encoders()
        return self._views(encode_entity_views(entities, image_root, text_enc, image_enc))

    @torch.no_grad()
    def encode_entity_records(self, entities: Sequence[Entity], image_root: str | Path) -> torch.Tensor:
        """Embeddings ``[len(entities), D]`` (float32, L2-normalised) of KB records the run was not trained on, in
        chunks of the run's entity chunk: what a KB index of a new KB holds."""
        self.entity_emb     # a pairwise run has no KB embeddings: the error names it
        wanted = self.model.cfg.entity_views()
        parts = [torch.zeros(0, self.model.cfg.output_size, device=self.device)]
        step = max(1, int(self.settings.entity_chunk))
        for s in range(0, len(entities), step):
            views = self.entity_views(entities[s:s + step], image_root)
            parts.append(self.model.eval().encode_entities(
                {k: v for k, v in views.items() if k.removesuffix("_mask") in wanted}).float())
        return torch.cat(parts)
