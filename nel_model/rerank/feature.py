"""A trained feature re-ranker: scores a mention against each of its K retrieved candidates jointly, from what the
bi-encoder cannot use (``docs/RERANK.md``, "Trained feature re-ranker").

For each (mention, candidate) pair it builds

* fixed cosines of the cached views: mention phrase vs description, sentence tokens vs description (max, mean),
  profile rows vs description and entity profile, image vs entity image, image regions vs entity image (max, mean);
  each with a "both present" indicator (a masked view gives 0 and indicator 0);
* learned token interactions: the description (projected) attends over the sentence tokens (and over the image
  regions), the attended vector times the projected description;
* the retriever's embeddings, element-wise (``q * e``, projected), and its score, its gap to the list's best score
  and the candidate's rank in the list;
* lexical features from the dataset's records (:class:`LexicalFeatures`): the mention string against the entity
  name (character trigrams, words, exact and containment), the sentence's words against the description's
  (IDF-weighted), and how many listed candidates share the name (namesakes).

Every scalar feature enters as itself and as its difference to the list's maximum. An MLP turns each pair into a
vector, a transformer layer lets the K candidates attend to one another (namesakes are told apart by comparing
them), and a zero-initialised linear head adds to ``score / temperature``: the untrained re-ranker ranks exactly
as the retriever does, and training can only move away from it where the train lists say so.

:class:`FeatureReranker` is the object a two-stage linker uses: ``FeatureReranker.load(run_dir)`` and
``score(retriever, lists) -> [N, K]``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_process.core.fingerprints import file_sha256
from data_process.core.records import ENTITIES_FILE, MENTIONS_FILE, read_entities, read_mentions
from nel_model.data import FeatureSource, to_device
from nel_model.evaluation.metrics import RankCounts
from nel_model.linking import MentionLists
from nel_model.loaded_run import LoadedRun, RetrievedLists
from nel_model.rerank.two_stage import check_retriever, two_stage_counts
from nel_model.runs import RunError, checkpoint_path, load_checkpoint, two_stage_of

LEXICAL_NAMES = ("name_trigram_jaccard", "name_word_jaccard", "name_exact", "name_in_mention", "mention_in_name",
                 "sentence_desc_idf_overlap", "sentence_name_overlap", "namesakes_in_list")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class RerankerConfig:
    """The re-ranker's shape and switches (checkpointed; ``load`` rebuilds the model from it)."""

    text_dim: int
    image_dim: int
    retr_dim: int
    views: tuple[str, ...]           # mention-side views used: sentence, profile, image, regions
    entity_views: tuple[str, ...]    # entity-side views used: image, profile (desc always)
    top_k: int
    hidden: int = 128
    proj: int = 64
    heads: int = 4
    layers: int = 1
    dropout: float = 0.1
    temperature: float = 0.05        # the retriever's score enters as score / temperature
    lexical: bool = True
    token_attention: bool = True
    retriever_embeddings: bool = True
    cross_candidates: bool = True


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1, eps=1e-6) @ F.normalize(b.float(), dim=-1, eps=1e-6).transpose(-1, -2)


def _masked_max_mean(sim: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sim`` [B,K,L] with ``mask`` [B,L] -> (max, mean, any) over L, each [B,K]; 0 where nothing is present."""
    m = mask[:, None, :].to(sim.dtype)
    n = m.sum(-1)
    mx = sim.masked_fill(m == 0, -2.0).amax(-1)
    has = (n > 0).to(sim.dtype).expand_as(mx)
    return mx * has, (sim * m).sum(-1) / n.clamp(min=1), has


class PairScorer(nn.Module):
    """The network: pair features -> MLP -> attention across the K candidates -> a score added to the
    retriever's. ``forward(batch) -> [B, K]`` (batch layout: :meth:`FeatureReranker.batch`)."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.proj
        self.n_scalar = len(self._scalar_names())
        width = 2 * self.n_scalar + 1 + cfg.top_k          # scalars, their gaps to the list max, log-rank, rank
        if cfg.token_attention:
            self.tok_q = nn.Linear(cfg.text_dim, p)
            self.tok_k = nn.Linear(cfg.text_dim, p)
            width += p
            if "regions" in cfg.views and "image" in cfg.entity_views:
                self.reg_q = nn.Linear(cfg.image_dim, p)
                self.reg_k = nn.Linear(cfg.image_dim, p)
                width += p
        if cfg.retriever_embeddings:
            self.retr = nn.Linear(cfg.retr_dim, p)
            width += p
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.hidden))
        self.cross = None
        if cfg.cross_candidates:
            layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 2 * cfg.hidden, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.cross = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Linear(cfg.hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _scalar_names(self) -> list[str]:
        c = self.cfg
        names = ["retriever_score", "mention_desc"]
        if "sentence" in c.views:
            names += ["sentence_desc_max", "sentence_desc_mean", "sentence_any"]
        if "profile" in c.views:
            names += ["mprofile_desc_max", "mprofile_any"]
        if "profile" in c.entity_views:
            names += ["mention_eprofile", "eprofile_any"]
            if "sentence" in c.views:
                names += ["sentence_eprofile_max"]
        if "image" in c.views and "image" in c.entity_views:
            names += ["image_eimage", "image_both"]
        if "regions" in c.views and "image" in c.entity_views:
            names += ["regions_eimage_max", "regions_eimage_mean", "regions_both"]
        if c.lexical:
            names += list(LEXICAL_NAMES)
        return names

    def _scalars(self, b: dict[str, Any]) -> torch.Tensor:
        c = self.cfg
        m, e = b["mention"], b["entity"]                    # mention views [B,...]; entity views [B,K,...]
        desc = e["desc"].float()
        cols = [b["scores"], (F.normalize(m["mention"].float(), dim=-1)[:, None, :]
                              * F.normalize(desc, dim=-1)).sum(-1)]
        if "sentence" in c.views:
            mx, mean, has = _masked_max_mean(_cos(desc, m["sentence"]), m["sentence_mask"])
            cols += [mx, mean, has]
        if "profile" in c.views:
            mx, _, has = _masked_max_mean(_cos(desc, m["profile"]), m["profile_mask"])
            cols += [mx, has]
        if "profile" in c.entity_views:
            ep_has = e["profile_mask"].float()
            ep = e["profile"].float()
            cols += [(F.normalize(m["mention"].float(), dim=-1)[:, None, :] * F.normalize(ep, dim=-1, eps=1e-6)
                      ).sum(-1) * ep_has, ep_has]
            if "sentence" in c.views:
                mx, _, _ = _masked_max_mean(_cos(ep, m["sentence"]), m["sentence_mask"])
                cols += [mx * ep_has]
        if "image" in c.views and "image" in c.entity_views:
            both = m["image_mask"].float()[:, None] * e["image_mask"].float()
            cols += [(F.normalize(m["image"].float(), dim=-1, eps=1e-6)[:, None, :]
                      * F.normalize(e["image"].float(), dim=-1, eps=1e-6)).sum(-1) * both, both]
        if "regions" in c.views and "image" in c.entity_views:
            ei = e["image_mask"].float()
            mx, mean, has = _masked_max_mean(_cos(e["image"], m["regions"]), m["regions_mask"])
            cols += [mx * ei, mean * ei, has * ei]
        out = torch.stack(cols, -1)
        if c.lexical:
            out = torch.cat([out, b["lexical"].float()], -1)
        return out

    @staticmethod
    def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each candidate's ``query`` [B,K,p] attends over ``keys``/``values`` [B,L,p] (``mask`` [B,L]): the
        attended vector times the query, [B,K,p] (0 where nothing is present)."""
        att = query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1])
        att = att.masked_fill(~mask[:, None, :].bool(), -1e4)
        pooled = att.softmax(-1) @ values
        return pooled * query * mask.any(-1).float()[:, None, None]

    def forward(self, b: dict[str, Any]) -> torch.Tensor:
        c = self.cfg
        s = self._scalars(b)                                              # [B,K,S]
        valid = b["valid"]                                                # [B,K] list entries present
        top = s.masked_fill(~valid[..., None], -1e4).amax(1, keepdim=True)
        K = s.shape[1]
        rank = torch.arange(K, device=s.device)
        parts = [s, s - top, torch.log1p(rank.float())[None, :, None].expand(s.shape[0], K, 1),
                 F.one_hot(rank.clamp(max=c.top_k - 1), c.top_k).float()[None].expand(s.shape[0], K, c.top_k)]
        m, e = b["mention"], b["entity"]
        if c.token_attention:
            if "sentence" in c.views:
                tok, tmask = m["sentence"].float(), m["sentence_mask"]
            else:
                tok, tmask = m["mention"].float()[:, None, :], torch.ones(s.shape[0], 1, dtype=torch.bool,
                                                                            device=s.device)
            parts.append(self._attend(self.tok_k(e["desc"].float()), self.tok_q(tok), self.tok_q(tok), tmask))
            if hasattr(self, "reg_q"):
                ek = self.reg_k(e["image"].float()) * e["image_mask"].float()[..., None]
                rq = self.reg_q(m["regions"].float())
                parts.append(self._attend(ek, rq, rq, m["regions_mask"]))
        if c.retriever_embeddings:
            parts.append(self.retr(b["query"][:, None, :] * b["keys"]))
        h = self.mlp(torch.cat(parts, -1))
        if self.cross is not None:
            h = self.cross(h, src_key_padding_mask=~valid)
        out = b["scores"] / c.temperature + self.head(h).squeeze(-1)
        return out.masked_fill(~valid, -1e4)


# ---------------------------------------------------------------------------------------------
# Lexical features from the dataset's records


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _trigrams(text: str) -> set[str]:
    t = f"  {text.lower().strip()} "
    return {t[i:i + 3] for i in range(len(t) - 2)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class LexicalFeatures:
    """The pair features of :data:`LEXICAL_NAMES` for a feature cache's mentions and KB entities, from the
    unified dataset's records (the mention string and sentence; the entity's name and description)."""

    def __init__(self, dataset: str | Path, mention_ids: list[str], entity_ids: list[str]):
        ds = Path(dataset)
        ents = {e.id: e for e in read_entities(ds / ENTITIES_FILE)}
        ments = {m.id: m for m in read_mentions(ds / MENTIONS_FILE)}
        missing = next((i for i in entity_ids if i not in ents), None)
        if missing is not None:
            raise ValueError(f"{ds / ENTITIES_FILE}: entity {missing!r} of the feature cache is missing")
        self.names = [ents[i].name for i in entity_ids]
        self.name_key = [n.lower().strip() for n in self.names]
        self.name_tri = [_trigrams(n) for n in self.names]
        self.name_words = [set(_words(n)) for n in self.names]
        desc_words = [set(_words(ents[i].description)) for i in entity_ids]
        df = Counter(w for ws in desc_words for w in ws)
        n = max(1, len(entity_ids))
        self.idf = {w: math.log((n + 1) / (c + 1)) for w, c in df.items()}
        self.desc_words = desc_words
        self.desc_mass = [sum(self.idf[w] for w in ws) or 1.0 for ws in desc_words]
        self.mentions = [ments.get(i) for i in mention_ids]

    def pairs(self, rows: np.ndarray, top: torch.Tensor) -> torch.Tensor:
        """[N, K, len(LEXICAL_NAMES)] float32 for mention ``rows`` [N] and their lists ``top`` [N, K]."""
        return self.pairs_of([self.mentions[int(r)] for r in rows], top)

    def pairs_of(self, mentions: list[Any], top: torch.Tensor) -> torch.Tensor:
        """The same for any mentions (objects with ``mention`` and ``sentence``; ``None``: no features)."""
        out = np.zeros((len(mentions), top.shape[1], len(LEXICAL_NAMES)), dtype=np.float32)
        top_np = top.numpy()
        for i, m in enumerate(mentions):
            if m is None:
                continue
            surface = m.mention.lower().strip()
            tri, words = _trigrams(m.mention), set(_words(m.mention))
            sent = set(_words(m.sentence))
            keys = [self.name_key[e] for e in top_np[i]]
            same = Counter(keys)
            for k, e in enumerate(top_np[i]):
                name = self.name_key[e]
                overlap = sum(self.idf.get(w, 0.0) for w in self.desc_words[e] & sent) / self.desc_mass[e]
                out[i, k] = (_jaccard(tri, self.name_tri[e]), _jaccard(words, self.name_words[e]),
                             float(name == surface), float(bool(name) and name in surface),
                             float(bool(surface) and surface in name), overlap,
                             len(self.name_words[e] & sent) / max(1, len(self.name_words[e])),
                             math.log(same[name]))
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# The re-ranker as a two-stage linker uses it


@dataclass
class SplitInputs:
    """One split's re-ranking inputs, computed once: the lists, the retriever's mention embeddings and the
    lexical pair features."""

    lists: RetrievedLists
    query: torch.Tensor
    lexical: torch.Tensor | None
    entity_emb: torch.Tensor


class FeatureReranker:
    """A trained :class:`PairScorer` with what it needs to build its inputs from its retriever (a
    :class:`~nel_model.loaded_run.LoadedRun`)."""

    def __init__(self, cfg: RerankerConfig, model: PairScorer | None = None):
        self.cfg = cfg
        self.model = model if model is not None else PairScorer(cfg)
        self._lexical: LexicalFeatures | None = None
        self._source: FeatureSource | None = None

    @classmethod
    def config_for(cls, retriever: LoadedRun, top_k: int, **switches: Any) -> RerankerConfig:
        data = retriever.data
        wanted = {v: switches.pop(v, True) for v in ("sentence", "profile", "image", "regions")}
        ewanted = {v: switches.pop(f"entity_{v}", True) for v in ("image", "profile")}
        views = tuple(v for v, on in wanted.items() if on and v in data.mention_views)
        eviews = tuple(v for v, on in ewanted.items() if on and v in data.entity_views)
        return RerankerConfig(text_dim=data.text_dim, image_dim=max(1, data.image_dim),
                              retr_dim=int(retriever.entity_emb.shape[1]), views=views, entity_views=eviews,
                              top_k=top_k, **switches)

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best") -> "FeatureReranker":
        """The re-ranker of a ``dim-mel rerank`` run folder (``checkpoints/best.pt`` or ``last.pt``)."""
        ckpt = load_checkpoint(checkpoint_path(run_dir, checkpoint))
        conf = dict(ckpt["model_config"])
        conf["views"], conf["entity_views"] = tuple(conf["views"]), tuple(conf["entity_views"])
        out = cls(RerankerConfig(**conf))
        out.model.load_state_dict(ckpt["model"])
        return out

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_config": asdict(self.cfg)}

    def inputs(self, retriever: LoadedRun, lists: RetrievedLists) -> SplitInputs:
        k = self.cfg.top_k
        if lists.top_k < k:
            raise ValueError(f"the re-ranker scores lists of {k} entities; the {lists.split} lists hold "
                             f"{lists.top_k} (run dim-mel retrieve --top-k {k})")
        if lists.top_k > k:
            lists = RetrievedLists(lists.split, lists.rows, lists.top[:, :k], lists.scores[:, :k], lists.gold,
                                   lists.meta)
        lex = self.lexical(retriever).pairs(lists.rows, lists.top) if self.cfg.lexical else None
        q = retriever.mention_embeddings(lists.rows).float().cpu()
        return SplitInputs(lists, q, lex, retriever.entity_emb.float().cpu())

    def batch(self, retriever: LoadedRun, inp: SplitInputs, idx: np.ndarray,
              device: torch.device | None = None) -> dict[str, Any]:
        """The model's batch for entries ``idx`` of a split: mention views [B,...], entity views [B,K,...] of the
        listed entities, retriever ``scores`` [B,K] (NaN -> -1, ``valid`` False), ``query`` [B,H], ``keys``
        [B,K,H], ``lexical`` [B,K,F]."""
        lists = inp.lists
        idx = np.asarray(idx, dtype=np.int64)
        source = self.source(retriever)
        b = self.assemble(source.mentions(lists.rows[idx]), source, lists.top[idx], lists.scores[idx],
                          inp.query[idx], inp.entity_emb, None if inp.lexical is None else inp.lexical[idx])
        return b if device is None else to_device(b, device)

    def lexical(self, retriever: LoadedRun) -> LexicalFeatures:
        """The lexical pair features of the retriever's dataset (built once)."""
        if self._lexical is None:
            if retriever.data.dataset is None:
                raise ValueError("the re-ranker's lexical features need the dataset's records")
            self._lexical = LexicalFeatures(retriever.data.dataset, retriever.data.mention_ids,
                                            retriever.data.entity_ids)
        return self._lexical

    def source(self, retriever: LoadedRun) -> FeatureSource:
        """The views the model reads, from the retriever's feature cache."""
        if self._source is None or self._source.data is not retriever.data:
            self._source = FeatureSource(retriever.data, ("mention", *self.cfg.views),
                                         ("desc", *self.cfg.entity_views))
        return self._source

    @staticmethod
    def assemble(mention: dict[str, torch.Tensor], source: FeatureSource, top: torch.Tensor, scores: torch.Tensor,
                 query: torch.Tensor, entity_emb: torch.Tensor, lexical: torch.Tensor | None) -> dict[str, Any]:
        """The model's batch from mention views (a cache's rows, or new mentions encoded by the linking API) and
        the listed entities ``top`` [B,K] with the retriever's ``scores``."""
        B, K = top.shape
        entity = {k: v.reshape(B, K, *v.shape[1:]) for k, v in source.entities(top.reshape(-1)).items()}
        b = {"mention": mention, "entity": entity, "scores": scores.nan_to_num(-1.0), "valid": torch.isfinite(scores),
             "query": query, "keys": entity_emb[top]}
        if lexical is not None:
            b["lexical"] = lexical
        return b

    @torch.no_grad()
    def score_inputs(self, retriever: LoadedRun, inp: SplitInputs, batch_size: int = 256) -> torch.Tensor:
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = []
        for s in range(0, len(inp.lists.rows), batch_size):
            idx = np.arange(s, min(s + batch_size, len(inp.lists.rows)))
            out.append(self.model(self.batch(retriever, inp, idx, dev)).float().cpu())
        scores = torch.cat(out) if out else torch.zeros(0, self.cfg.top_k)
        return scores.masked_fill(~torch.isfinite(inp.lists.scores), float("nan"))

    def score(self, retriever: LoadedRun, lists: RetrievedLists) -> torch.Tensor:
        """[N, K] re-ranker scores of ``lists`` (its first ``top_k`` entries; higher is better; NaN where the
        retriever's list had no score)."""
        return self.score_inputs(retriever, self.inputs(retriever, lists))

    def counts(self, retriever: LoadedRun, inp: SplitInputs, batch_size: int = 256) -> dict[str, RankCounts]:
        """``{protocol: RankCounts}`` of the two-stage ranking of one split: what training reports at its end
        and ``dim-mel evaluate`` recomputes."""
        return two_stage_counts(retriever, inp.lists, self.score_inputs(retriever, inp, batch_size))


# ---------------------------------------------------------------------------------------------
# Behind the linking API (``dim-mel link --rerank RUN``, ``nel_model.inference.linker``)


class BoundFeatureReranker:
    """A trained feature re-ranker scoring *new* mentions for the linker (the ``Reranker`` protocol of
    :mod:`nel_model.linking`): it is given the linker's loaded retriever, and the lists it scores carry the
    mentions' views and retriever embeddings, already encoded by the retriever's encoders and model; the listed
    entities' views come from the retriever's feature cache (an entity of a KB index that the cache lacks is not
    scored: NaN, like a list's padding). Each mention is scored on its own, so its scores do
    not depend on the mentions linked beside it."""

    kind = "feature"

    def __init__(self, reranker: FeatureReranker, retriever: LoadedRun, run: Path, fingerprint: str):
        self.reranker, self.retriever, self.run = reranker, retriever, run
        self.fingerprint = fingerprint          # the re-ranker checkpoint's SHA-256 (linked lines record it)
        self.row_of = {eid: i for i, eid in enumerate(retriever.data.entity_ids)}
        self.reranker.model.to(retriever.device).eval()

    @property
    def top_k(self) -> int:
        return self.reranker.cfg.top_k

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "run": str(self.run.resolve()), "top_k": self.top_k,
                "checkpoint_sha256": self.fingerprint}

    @torch.no_grad()
    def score(self, lists: MentionLists) -> torch.Tensor:
        """[N, K] scores of ``lists`` (NaN where a list is shorter than K)."""
        k, n, r = self.top_k, len(lists.mentions), self.retriever
        views, query = lists.views, lists.embeddings
        if views is None or query is None:           # lists not from the linker: encode the mentions here
            encoded = [r.encode_query(q) for q in lists.mentions]
            views = {key: torch.cat([v[key] for v, _ in encoded]) for key in (encoded[0][0] if encoded else {})}
            query = torch.cat([e for _, e in encoded]) if encoded else torch.zeros(0, 1)
        wanted = ("mention", *self.reranker.cfg.views)
        source, entity_emb = self.reranker.source(r), r.entity_emb.float().cpu()
        model = self.reranker.model.eval()
        dev = next(model.parameters()).device
        out = torch.full((n, k), float("nan"))
        for i, cands in enumerate(lists.candidates):       # one mention at a time (class docstring)
            top = torch.zeros(1, k, dtype=torch.long)
            scores = torch.full((1, k), float("nan"))
            for j, c in enumerate(cands[:k]):
                if c.entity_id in self.row_of:       # an index's entity outside the run's KB: unscored, as padding
                    top[0, j], scores[0, j] = self.row_of[c.entity_id], c.score
            mention = {key: v[i:i + 1].cpu() for key, v in views.items() if key.removesuffix("_mask") in wanted}
            lexical = (self.reranker.lexical(r).pairs_of([lists.mentions[i]], top) if self.reranker.cfg.lexical
                       else None)
            batch = FeatureReranker.assemble(mention, source, top, scores, query[i:i + 1].float().cpu(), entity_emb,
                                             lexical)
            out[i] = model(to_device(batch, dev)).float().cpu()[0].masked_fill(~torch.isfinite(scores[0]),
                                                                                float("nan"))
        return out


def load_reranker(run: str | Path, retriever: LoadedRun) -> BoundFeatureReranker:
    """The re-ranker of a ``dim-mel rerank`` run folder (its best checkpoint) for the linker, over ``retriever``:
    the run must have been trained on that retriever (:func:`~nel_model.rerank.two_stage.check_retriever`)."""
    run = Path(run)
    info = two_stage_of(run)
    if info is None:
        raise RunError(f"{run}: not a two-stage run (no two_stage in results.json)")
    check_retriever(run, info["retriever"], retriever)
    return BoundFeatureReranker(FeatureReranker.load(run), retriever, run, file_sha256(checkpoint_path(run, "best")))
