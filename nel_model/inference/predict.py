"""Link new mentions with a trained run: top-k KB entities with names, scores and ids.

    python -m nel_model.inference.predict --run runs/dim --sentence "Varkona flooded the valley." --mention "Varkona" \
        [--image photo.png] [--caption TEXT] [--enrichment TEXT] [--top_k 10]
    python -m nel_model.inference.predict --run runs/dim --input queries.jsonl --output predictions.jsonl

The mention is encoded with the *same encoders* as the run's feature cache (``meta.json``), then with the run's
checkpoint (``--checkpoint best|last``); the KB entities are encoded from the feature cache by the same checkpoint,
in float32, exactly as evaluation encodes them (``nel_model.encoding``), and ranked with evaluation's own functions
(``nel_model.evaluation``: the top lists of ``predictions/<split>.jsonl``, the pessimistic tie rule). Scores are
cosine similarities in [-1, 1].

Batch input: one JSON object per line, ``{"id"?, "sentence", "mention", "image"?, "caption"?, "enrichment"?,
"gold_id"?}``; a relative ``image`` path is resolved against the input file's folder. Output lines:
``{"id", "mention", "predictions": [{"rank", "entity_id", "name", "score", "description"}], "gold_rank"?}`` (``gold_rank``: the
gold entity's rank over the whole KB when the input gives ``gold_id``).

Captions/enrichment are not generated here: pass the text if you have it (e.g. from ``data_process.augment.caption``);
without it the profile rows are masked, exactly as for a dataset mention that has no caption/enrichment.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from data_process.core.durable_io import atomic_write_text
from nel_model.linking import Query
from nel_model.runs import RunError, load_config

CHUNK = 64
DESC_CHARS = 60  # description characters shown in the printed table


class PredictError(ValueError):
    """Bad predict input (missing run file, image, malformed query); the message names the path/line."""


@dataclass
class Hit:
    rank: int
    entity_id: str
    name: str
    score: float
    description: str = ""


def _resolve_data_path(conf: dict[str, Any], key: str, run_dir: Path) -> Path | None:
    for k in (f"{key}_resolved", key):
        v = conf.get(k)
        if v:
            p = Path(v)
            return p if p.is_absolute() or p.exists() else (run_dir / p if (run_dir / p).exists() else p)
    return None


class Predictor:
    """A trained run ready to link mentions. Encoders are loaded on the first :meth:`predict`."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", checkpoint: str = "best",
                 features: str | Path | None = None, dataset: str | Path | None = None):
        from data_process.core.records import load_dataset
        from data_process.encode.feature_store import FeatureStore
        from nel_model.evaluation.evaluate import open_run

        run = Path(run_dir)
        if not run.is_dir():
            raise PredictError(f"{run}: run folder not found")
        try:
            self.config = load_config(run)
        except RunError as exc:
            raise PredictError(str(exc)) from None
        self.run = run
        feat = Path(features) if features else _resolve_data_path(self.config, "features", run)
        if feat is None or not (feat / "meta.json").is_file():
            raise PredictError(f"{feat if feat else run / 'config.json'}: feature folder with meta.json not found "
                               "(needed for the encoders and the KB features; pass --features)")
        self.features = feat
        self.meta = FeatureStore(feat).meta()
        ds = Path(dataset) if dataset else (_resolve_data_path(self.config, "dataset", run)
                                            or (Path(self.meta["dataset"]) if self.meta.get("dataset") else None))
        if ds is None or not ds.is_dir():
            raise PredictError(f"{ds if ds else run / 'config.json'}: dataset folder not found "
                               "(needed for entity names; pass --dataset)")
        try:
            opened = open_run(run, device, checkpoint, feat, ds)
        except FileNotFoundError as exc:
            raise PredictError(str(exc)) from None
        self.model, self.device, self.settings = opened.model, opened.device, opened.settings
        self.entity_ids: list[str] = list(opened.data.entity_ids)
        self.entity_emb = opened.entity_embeddings()
        entities = load_dataset(ds, check_gold=False).entities
        self.names = {e.id: e.name for e in entities}
        self.descriptions = {e.id: e.description for e in entities}
        self._encoders = None

    # -- encoding ------------------------------------------------------------------------------
    def encoders(self):
        """``(text_encoder, image_encoder, settings)`` of the feature cache (loaded once)."""
        if self._encoders is None:
            from data_process.encode.features import load_encoders_from_meta

            try:
                self._encoders = load_encoders_from_meta(self.meta, str(self.device))
            except KeyError as exc:
                raise PredictError(f"{self.features / 'meta.json'}: {exc.args[0]}") from None
            except OSError as exc:
                raise PredictError(f"{self.features / 'meta.json'}: cannot load the encoders it names "
                                   f"({self.meta.get('text_encoder')!r}, {self.meta.get('image_encoder')!r}): {exc}"
                                   ) from None
        return self._encoders

    def mention_views(self, queries: list[Query]) -> dict[str, torch.Tensor]:
        """Contract-shaped mention views (docs/CONTRACTS.md) for ``queries``, encoded like the feature cache
        (same encoders and settings, rounded to the cache's float16)."""
        from data_process.encode.features import PROFILE_ROWS, encode_mention_views
        from data_process.core.records import Mention

        rows = self.meta.get("views", {}).get("mention.profile", {}).get("rows", list(PROFILE_ROWS))
        if tuple(rows) != tuple(PROFILE_ROWS):
            raise PredictError(f"{self.features / 'meta.json'}: profile rows {rows} differ from the encoder's "
                               f"{list(PROFILE_ROWS)}")
        text_enc, image_enc, settings = self.encoders()

        def prov(text):
            return None if not text else {"text": text, "provenance": {"source": "predict input"}}

        mentions = [Mention(id=q.id or f"q{i}", sentence=q.sentence, mention=q.mention, gold_id=q.gold_id or "",
                            split="test", image=None if q.image is None else str(Path(q.image).resolve()),
                            caption=prov(q.caption), enrichment=prov(q.enrichment))
                    for i, q in enumerate(queries)]
        raw = encode_mention_views(mentions, None, text_enc, image_enc, settings)
        views: dict[str, torch.Tensor] = {}
        for name, (data, mask) in raw.items():
            views[name] = torch.from_numpy(np.asarray(data, dtype=np.float16)).to(self.device)
            if mask is not None:
                views[f"{name}_mask"] = torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device)
        return views

    @torch.no_grad()
    def encode(self, queries: list[Query]) -> torch.Tensor:
        parts = [self.model.encode_mentions(self.mention_views(queries[i:i + CHUNK])).float()
                 for i in range(0, len(queries), CHUNK)]
        return torch.cat(parts) if parts else torch.zeros(0, self.entity_emb.shape[1], device=self.device)

    # -- ranking -------------------------------------------------------------------------------
    def predict(self, queries: list[Query], top_k: int = 10) -> list[dict[str, Any]]:
        """One result per query: ``{"id", "mention", "predictions": [Hit...], "gold_rank"?}`` (Hit as dicts)."""
        from data_process.core.images import decode_image

        for q in queries:
            if q.image is not None:
                if not Path(q.image).is_file():
                    raise PredictError(f"{q.image}: image not found")
                img, why = decode_image(q.image)
                if img is None:
                    raise PredictError(f"{q.image}: cannot read the image ({why})")
        from nel_model.evaluation.evaluate import top_entities
        from nel_model.evaluation.metrics import full_kb_counts

        k = max(1, min(top_k, len(self.entity_ids)))
        row_of = {eid: i for i, eid in enumerate(self.entity_ids)}
        out = []
        for s in range(0, len(queries), CHUNK):
            chunk = queries[s:s + CHUNK]
            q_emb = self.encode(chunk)
            scores, rows = top_entities(q_emb, self.entity_emb, k, self.settings.mention_chunk)
            ranked = [i for i, q in enumerate(chunk) if q.gold_id is not None and q.gold_id in row_of]
            ranks = {}
            if ranked:
                gold = torch.tensor([row_of[chunk[i].gold_id] for i in ranked])
                counts = full_kb_counts(q_emb[ranked], self.entity_emb, gold, self.settings.mention_chunk,
                                        self.settings.score_dtype)
                ranks = dict(zip(ranked, counts.ranks("pessimistic").tolist()))
            for i, q in enumerate(chunk):
                hits = [Hit(rank=r + 1, entity_id=self.entity_ids[j], name=self.names.get(self.entity_ids[j], ""),
                            score=round(float(v), 6), description=self.descriptions.get(self.entity_ids[j], ""))
                        for r, (v, j) in enumerate(zip(scores[i].tolist(), rows[i].tolist()))]
                rec: dict[str, Any] = {"id": q.id, "mention": q.mention, "predictions": [h.__dict__ for h in hits]}
                if q.gold_id is not None:      # the pessimistic full-KB rank; None: the id is not in the KB
                    rec["gold_rank"] = ranks.get(i)
                out.append(rec)
        return out


# ---------------------------------------------------------------------------------------------
# Input


def _opt_str(obj: dict, key: str, where: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise PredictError(f"{where}: field '{key}' must be a string")
    return v


def read_queries(path: str | Path) -> list[Query]:
    """Queries from a JSON Lines file; relative image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: input file not found")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PredictError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PredictError(f"{where}: must be a JSON object")
        for key in ("sentence", "mention"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise PredictError(f"{where}: field '{key}' is missing or empty")
        image = _opt_str(obj, "image", where)
        img = None
        if image:
            img = Path(image)
            if not img.is_absolute():
                img = path.parent / img
            if not img.is_file():
                raise PredictError(f"{where}: image {img} not found")
        qid = obj.get("id")
        out.append(Query(sentence=obj["sentence"], mention=obj["mention"], image=img,
                         caption=_opt_str(obj, "caption", where), enrichment=_opt_str(obj, "enrichment", where),
                         id=None if qid is None else str(qid), gold_id=_opt_str(obj, "gold_id", where)))
    if not out:
        raise PredictError(f"{path}: no queries")
    return out


def format_hits(result: dict[str, Any]) -> str:
    rows = result["predictions"]
    w_id = max([len("id")] + [len(h["entity_id"]) for h in rows])
    w_name = max([len("name")] + [len(h["name"]) for h in rows])
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{w_id}}  {'name':<{w_name}}  description"]
    for h in rows:
        desc = h.get("description", "")
        desc = desc if len(desc) <= DESC_CHARS else desc[: DESC_CHARS - 1] + "…"
        lines.append(f"{h['rank']:>4}  {h['score']:>7.4f}  {h['entity_id']:<{w_id}}  {h['name']:<{w_name}}  {desc}"
                     .rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel predict",
                                description="Link new mentions with a trained run (top-k KB entities).")
    p.add_argument("--run", required=True, help="run folder written by nel_model.train")
    p.add_argument("--sentence", help="the sentence containing the mention")
    p.add_argument("--mention", help="the mention text")
    p.add_argument("--image", help="optional image of the mention")
    p.add_argument("--caption", help="optional caption text of the image (profile row)")
    p.add_argument("--enrichment", help="optional LLM enrichment text (profile row)")
    p.add_argument("--input", help="batch mode: JSON Lines of queries")
    p.add_argument("--output", help="batch mode: JSON Lines of predictions (default: stdout)")
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="checkpoint that encodes the mentions and the KB entities")
    p.add_argument("--features", help="override the feature folder recorded in config.json")
    p.add_argument("--dataset", help="override the dataset folder recorded in config.json")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.input is None and (a.sentence is None or a.mention is None):
        p.error("give --sentence and --mention, or --input FILE.jsonl")
    if a.input is not None and (a.sentence is not None or a.mention is not None):
        p.error("--input cannot be combined with --sentence/--mention")
    if a.top_k < 1:
        p.error("--top_k must be at least 1")
    try:
        if a.input is not None:
            queries = read_queries(a.input)
        else:
            if a.image is not None and not Path(a.image).is_file():
                raise PredictError(f"{a.image}: image not found")
            queries = [Query(sentence=a.sentence, mention=a.mention, image=Path(a.image) if a.image else None,
                             caption=a.caption, enrichment=a.enrichment)]
        predictor = Predictor(a.run, device=a.device, checkpoint=a.checkpoint, features=a.features, dataset=a.dataset)
        results = predictor.predict(queries, a.top_k)
    except (PredictError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.input is not None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if a.output:
            atomic_write_text(a.output, text)
            print(f"wrote {len(results)} predictions to {a.output}", file=sys.stderr)
        else:
            print(text, end="")
    else:
        print(f"mention {a.mention!r} in {a.sentence!r}" + (f" with image {a.image}" if a.image else ""))
        print(format_hits(results[0]))
    return 0


if __name__ == "__main__":
    run_main(main)
