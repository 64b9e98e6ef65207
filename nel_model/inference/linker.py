"""One linking API and one linking command: a trained run (the retriever) and optionally a re-ranker behind one call.

    from nel_model.inference.linker import Linker
    linker = Linker.from_run("runs/dim", reranker="runs/rerank")      # or a Reranker object, or None
    linker.link("Varkona flooded the valley.", "Varkona", image="photo.png", top_k=10)   # -> LinkedMention
    linker.link_many([Query(...), ...])

    dim-mel link --run RUN [--rerank RERANK_RUN | --llm MODEL --base-url URL ...] --input mentions.jsonl \
        --out linked.jsonl [--top-k 10] [--max-line-bytes N]

The retriever is a :class:`~nel_model.loaded_run.LoadedRun` (the run's checkpoint, loaded once; the feature
cache's encoders; the KB's embeddings, read from the run folder or encoded once), ranked with the evaluation's
own functions (the top lists of ``predictions/<split>.jsonl``, the pessimistic tie rule). Mentions are encoded and
scored together in fixed shapes (``nel_model.loaded_run``: texts padded to lengths of their own, passes of a fixed
number of rows; scores ``MENTION_ROWS`` mentions a pass): a mention's entities do not depend on the mentions linked
beside it, so a resumed run (or the server's batches) gives the entities of an uninterrupted one, and the scores
to float rounding. A re-ranker (the :class:`~nel_model.linking.Reranker` protocol) re-orders the first
``reranker.top_k`` retrieved entities (all requested when it has no ``top_k``); it is given the mentions' views and
retriever embeddings already encoded (:class:`~nel_model.linking.MentionLists`). Every returned entity says which
stage produced its score; the entities after the re-ranked ones keep the retriever's order and scores.
``--rerank RUN`` loads a re-ranker run folder through ``nel_model.rerank.registry`` over this retriever (a feature
re-ranker must have been trained on it). ``--index INDEX`` links against a KB index folder built with this run (``dim-mel index``,
``nel_model.index``) instead of the run's own KB.

Input: the unified mention format (``data_process.core.records`` Mention lines, ``docs/CONTRACTS.md``), where
``gold_id`` and ``split`` may be left out; an ``image`` is a name inside the input file's folder (or inside a
folder link the toolkit placed there: ``core.safe_paths.resolve_in_dataset``, the rule of ``features`` and
``caption``) and must decode; a line longer than ``--max-line-bytes`` is refused. The whole input is checked
before any work; a bad line is an error naming the file, the line, the id and the field. Output: one
``LinkedMention.as_dict()`` line per mention, appended and flushed as soon as it is linked, with its
``provenance`` (the input line's hash, the retriever's checkpoint and KB, the re-ranker, K); one writer per
output (``OUT.lock``). A rerun skips the mentions already written with the same provenance, refuses a line
computed from anything else (or a mention not in the input), and moves a torn last line (a killed run) to
``OUT.corrupt`` and links that mention again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from data_process.core.entry import run_main
from data_process.core.fingerprints import file_sha256, stable_hash
from data_process.core.images import decode_image
from data_process.core.locks import output_lock
from data_process.core.records import DataError, Where, iter_json_lines, mention_from_dict, record_json_problem
from data_process.core.safe_paths import UnsafePath, check_output_file, regular_file_problem, resolve_in_dataset
from data_process.core.settings import ToolkitParser
from data_process.encode.encoders import fill_rows
from nel_model.encoding import Encoded, cat_encoded, take_rows
from nel_model.evaluation.evaluate import open_run
from nel_model.evaluation.scoring import KBScorer, kb_scorer
from nel_model.index import KBIndexFolder
from nel_model.index.texts import read_entity_texts
from nel_model.linking import Candidate, LinkedEntity, LinkedMention, LinkError, MentionLists, Query, Reranker
from nel_model.loaded_run import MENTION_ROWS, LoadedRun
from nel_model.rerank.llm import add_llm_flags, reranker_from_args
from nel_model.rerank.registry import load_reranker

BATCH = 16                          # mentions handed to a re-ranker together (an LLM answers them in parallel)
MAX_LINE_BYTES = 1 << 20            # an input line longer than this is refused (--max-line-bytes)
SCORE_DECIMALS = 6
# what identifies a re-ranker without a checkpoint of its own (an LLM): the keys of its info() that decide answers
RERANKER_IDENTITY = ("kind", "run", "model", "base_url", "k", "top_k", "prompt", "prompt_version",
                     "scoring_requested", "top_logprobs", "max_tokens", "temperature", "vision")


@dataclass
class Retrieved:
    """One mention retrieved: its views and embedding ``[1, D]`` (a pairwise retriever: its encoded mention side;
    for a re-ranker), its candidates (best first) and the gold's pessimistic whole-KB rank (``None``: no gold id,
    or not in the KB; linking against a KB index: the gold's place in the list, ``None`` beyond it)."""

    views: dict[str, torch.Tensor]
    embedding: Encoded
    candidates: list[Candidate]
    gold_rank: int | None


class Linker:
    """A retriever run (a :class:`~nel_model.loaded_run.LoadedRun`) and an optional re-ranker."""

    def __init__(self, retriever: LoadedRun, reranker: Reranker | None = None, index: KBIndexFolder | None = None):
        self.retriever = retriever
        self.reranker = reranker
        self.index = index
        self.row_of = {eid: i for i, eid in enumerate(retriever.data.entity_ids)}
        self._scorer: KBScorer | None = None
        self._texts: dict[str, tuple[str, str]] | None = None

    @classmethod
    def from_run(cls, run: str | Path, reranker: Reranker | str | Path | None = None, device: str = "cpu",
                 checkpoint: str = "best", index: str | Path | None = None) -> "Linker":
        """The run at ``checkpoint``; ``reranker``: a re-ranker, or a re-ranker run folder to load over it;
        ``index``: the KB to link against (a ``dim-mel index`` folder built with this run; default: the run's own
        KB, scored as its evaluation scores it)."""
        retriever = open_run(run, device, checkpoint)
        kb = None if index is None else KBIndexFolder.open(index, retriever.index_fingerprint())
        if isinstance(reranker, (str, Path)):
            reranker = load_reranker(reranker, retriever)
        return cls(retriever, reranker, kb)

    def link(self, sentence: str, mention: str, image: str | Path | None = None, top_k: int = 10,
             caption: str | None = None, enrichment: str | None = None, id: str | None = None,
             gold_id: str | None = None) -> LinkedMention:
        q = Query(sentence=sentence, mention=mention, image=None if image is None else Path(image), caption=caption,
                  enrichment=enrichment, id=id, gold_id=gold_id)
        return self.link_many([q], top_k)[0]

    # -- retrieval ------------------------------------------------------------------------------
    @property
    def scorer(self) -> KBScorer:
        """The retriever's KB scorer (its embeddings, or a pairwise run's encoded KB side; made on first use)."""
        if self._scorer is None:
            self._scorer = kb_scorer(self.retriever.model, self.retriever.kb, self.retriever.settings)
        return self._scorer

    def retrieve_many(self, queries: Sequence[Query], k: int) -> list[Retrieved]:
        """Each mention's ``k`` best KB entities (float32, ties by KB row), encoded and scored in fixed shapes
        (``MENTION_ROWS`` queries a score pass, the first repeated to fill the last)."""
        views, q = self.retriever.encode_queries(queries)
        found = []
        for s in range(0, len(queries), MENTION_ROWS):
            part = queries[s:s + MENTION_ROWS]
            fill = torch.tensor(fill_rows(list(range(s, s + len(part))), MENTION_ROWS))
            chunk = take_rows(q, fill)
            if self.index is None:
                scores, rows = self.scorer.top(chunk, k)
                cands = [self._candidates(scores[i], rows[i]) for i in range(len(part))]
                golds = self._gold_ranks(part, chunk)
            else:
                cands = self._index_candidates(chunk, k)[:len(part)]
                golds = [next((j for j, c in enumerate(cs, 1) if c.entity_id == x.gold_id), None)
                         for x, cs in zip(part, cands)]
            found += [Retrieved({key: v[s + i:s + i + 1] for key, v in views.items()},
                                take_rows(q, slice(s + i, s + i + 1)), cands[i], golds[i]) for i in range(len(part))]
        return found

    def _index_candidates(self, chunk: torch.Tensor, k: int) -> list[list[Candidate]]:
        """Each row's ``k`` best entities of the index (scores as the index computes them: float32 dot products of
        its stored vectors, exact for every kind's returned entities; ties in the index's KB order)."""
        if self._texts is None:
            self._texts = read_entity_texts(self.index.root)
        scores, ids = self.index.search(chunk.float().cpu().numpy(), k)
        return [[Candidate(eid, *self._texts.get(eid, ("", "")), float(v)) for v, eid in zip(sc.tolist(), row)]
                for sc, row in zip(scores, ids)]

    def retrieve(self, query: Query, k: int) -> Retrieved:
        """One mention's ``k`` best KB entities: :meth:`retrieve_many` of one."""
        return self.retrieve_many([query], k)[0]

    def _candidates(self, scores: torch.Tensor, rows: torch.Tensor) -> list[Candidate]:
        r, cands = self.retriever, []
        for v, j in zip(scores.tolist(), rows.tolist()):
            eid = r.data.entity_ids[j]
            rec = r.entity(eid)
            cands.append(Candidate(eid, rec.name if rec else "", rec.description if rec else "", float(v)))
        return cands

    def _gold_ranks(self, part: Sequence[Query], chunk: Encoded) -> list[int | None]:
        """The pessimistic whole-KB rank of each query's gold (``None``: no gold id, or not in the KB), over the
        fixed-shape ``chunk`` of their encoded mentions."""
        rows = [self.row_of.get(q.gold_id) if q.gold_id is not None else None for q in part]
        if all(x is None for x in rows):
            return [None] * len(part)
        gold = torch.tensor(fill_rows([x or 0 for x in rows], MENTION_ROWS), device=self.retriever.device)
        ranks = self.scorer.full_kb_counts(chunk, gold).ranks("pessimistic")
        return [None if x is None else int(ranks[i]) for i, x in enumerate(rows)]

    # -- linking --------------------------------------------------------------------------------
    def link_many(self, mentions: Sequence[Query], top_k: int = 10) -> list[LinkedMention]:
        """One :class:`~nel_model.linking.LinkedMention` per mention (the module docstring)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        mentions = list(mentions)
        k_rr = None if self.reranker is None else (self.reranker.top_k or top_k)
        found = self.retrieve_many(mentions, max(top_k, k_rr or 0))
        if self.reranker is None:
            return [_linked(q, [(c, _num(c.score), "retriever") for c in f.candidates], top_k, f.gold_rank)
                    for q, f in zip(mentions, found)]
        views = ({key: torch.cat([f.views[key] for f in found]) for key in found[0].views} if found else {})
        lists = MentionLists(mentions, [f.candidates[:k_rr] for f in found], views=views,
                             embeddings=cat_encoded([f.embedding for f in found]) if found else None)
        scores = self.reranker.score(lists)
        out = []
        for q, f, row in zip(mentions, found, scores):
            n = min(k_rr, len(f.candidates))
            order = torch.sort(row[:n].float().nan_to_num(nan=-float("inf")), descending=True, stable=True).indices
            ranked = [(f.candidates[j], _num(float(row[j])), "reranker") for j in order.tolist()]
            ranked += [(c, _num(c.score), "retriever") for c in f.candidates[n:]]
            # the gold's place among the re-ranked entities, else the retriever's pessimistic whole-KB rank
            gold = next((i for i, (c, _, _) in enumerate(ranked[:n], 1) if c.entity_id == q.gold_id), f.gold_rank)
            out.append(_linked(q, ranked, top_k, gold))
        return out


def index_identity(index: KBIndexFolder) -> dict[str, Any]:
    """What an index's answers are a function of: its shards (vectors and ids), its removed entities, its kind and
    the faiss parameters (not its build history)."""
    m = index.manifest
    return {"index_shards": [[x["vectors_sha256"], x["ids_sha256"]] for x in m["shards"]],
            "removed": m.get("removed"), "kind": m["kind"],
            "faiss": None if not m.get("faiss") else m["faiss"].get("params")}


def _num(x: float) -> float | None:
    return None if x != x else round(x, SCORE_DECIMALS)


def _linked(q: Query, ranked: list[tuple[Candidate, float | None, str]], top_k: int,
            gold_rank: int | None) -> LinkedMention:
    ents = [LinkedEntity(rank=i, entity_id=c.entity_id, name=c.name, description=c.description, score=s, stage=stage)
            for i, (c, s, stage) in enumerate(ranked[:top_k], 1)]
    return LinkedMention(id=q.id, mention=q.mention, entities=ents, gold_rank=gold_rank,
                         has_gold=q.gold_id is not None)


# ---------------------------------------------------------------------------------------------
# Input and output


@dataclass
class InputMention:
    """A mention read from a linking input: its query, its line, and a hash of what it consists of (the line's
    content and its image's bytes)."""

    query: Query
    line: int
    sha256: str


def check_mention(obj: Any, fail: Where, image_root: Path) -> tuple[Query, str]:
    """One mention object of a linking input, checked as every linking input is (``dim-mel link``'s lines, the
    server's requests): the unified mention format (``gold_id`` and ``split`` optional), its image named inside
    ``image_root`` (``resolve_in_dataset``) and decoded. Returns the query and a hash of what it consists of (the
    object and its image's bytes); a fault raises ``fail``'s :class:`DataError` naming the field."""
    bad = record_json_problem(obj)
    if bad is not None:
        fail(*bad)
    if not isinstance(obj, dict):
        fail(None, f"record must be a JSON object, got {type(obj).__name__}")
    gold = obj.get("gold_id")
    m = mention_from_dict({"split": "test", **obj, "gold_id": gold or "?"}, fail)
    image, image_sha = None, None
    if m.image is not None:
        try:
            image = resolve_in_dataset(image_root, m.image)
        except UnsafePath as exc:
            fail("image", str(exc))
        problem = regular_file_problem(image)
        if problem is not None:
            fail("image", f"{m.image}: {problem}")
        decoded, why = decode_image(image)
        if decoded is None:
            fail("image", f"{m.image}: cannot read the image ({why})")
        image_sha = file_sha256(image)
    q = Query(sentence=m.sentence, mention=m.mention, image=image, caption=(m.caption or {}).get("text"),
              enrichment=(m.enrichment or {}).get("text"), id=m.id, gold_id=gold if gold else None)
    return q, stable_hash({"line": obj, "image_sha256": image_sha})


def read_mentions(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[InputMention]:
    """The mentions of a unified-format JSON Lines file, each checked by :func:`check_mention` (images named
    inside the file's folder); the first bad line raises :class:`DataError` naming the file, line, id and field."""
    path = Path(path)
    root = path.resolve().parent
    seen: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path, max_line_bytes=max_line_bytes):
        fail = Where(path, f"line {lineno}" + (f" (id {obj['id']!r})" if isinstance(obj, dict)
                                               and isinstance(obj.get("id"), str) else ""))
        query, sha = check_mention(obj, fail, root)
        if query.id in seen:
            fail("id", f"duplicate id, first seen on line {seen[query.id]}")
        seen[query.id] = lineno
        yield InputMention(query, lineno, sha)


def reranker_fingerprint(reranker: Reranker | None) -> str | None:
    """What identifies a re-ranker's answers: its checkpoint's hash when it has one, else the settings of its
    ``info()`` that decide them (:data:`RERANKER_IDENTITY`)."""
    if reranker is None:
        return None
    fp = getattr(reranker, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    info = reranker.info()
    return stable_hash({k: info.get(k) for k in RERANKER_IDENTITY if k in info})


def provenance(linker: Linker, top_k: int) -> dict[str, Any]:
    """What every line of a ``dim-mel link`` run is computed from, but its input line (``input_sha256``, added
    per line): the retriever's checkpoint and KB, the re-ranker and K (docs/CONTRACTS.md, "Linked mentions")."""
    r = linker.retriever
    kb = (r.kb_fingerprint() or {"features": str(r.data.root.resolve()), "entity_ids": stable_hash(r.data.entity_ids)}
          if linker.index is None else index_identity(linker.index))
    return {"input_sha256": None, "retriever_checkpoint_sha256": r.checkpoint_sha256, "kb": stable_hash(kb),
            "reranker": reranker_fingerprint(linker.reranker), "top_k": top_k}


def written_lines(out: Path) -> dict[str, tuple[int, Any]]:
    """``{id: (line number, provenance)}`` of the lines already in ``out``; a torn last line (a killed run) is
    moved to ``OUT.corrupt`` first."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    lines: dict[str, tuple[int, Any]] = {}
    for lineno, raw in enumerate(keep.splitlines(), 1):
        try:
            rec = json.loads(raw)
            lines.setdefault(rec["id"], (lineno, rec.get("provenance")))
        except (ValueError, KeyError, TypeError):
            raise DataError(out, f"line {lineno}", "id", "not a linked-mention line: fix or delete the output "
                                                         "file, then rerun") from None
    if len(keep) < len(data):
        with out.with_name(out.name + ".corrupt").open("ab") as fh:
            fh.write(data[len(keep):] + b"\n")
        with out.open("r+b") as fh:
            fh.truncate(len(keep))
    return lines


def link_file(linker: Linker, mentions: Sequence[InputMention], out: Path, top_k: int, batch: int = BATCH,
              progress: bool = True) -> dict[str, int]:
    """Link every mention not yet in ``out`` with the same provenance, appending one line per mention (flushed);
    a line of ``out`` computed from anything else, or of a mention not in the input, is an error (give another
    ``--out``, or delete it to link again). The caller holds ``out``'s lock."""
    check_output_file(out)
    want = {m.query.id: m for m in mentions}
    base = provenance(linker, top_k)
    done = written_lines(out)
    for mid, (lineno, prov) in done.items():
        where = f"line {lineno} (id {mid!r})"
        if mid not in want:
            raise DataError(out, where, "id", "not a mention of this input: the output holds another input's "
                            "links; give another --out, or delete it to link again")
        expected = {**base, "input_sha256": want[mid].sha256}
        differ = [k for k, v in expected.items() if not isinstance(prov, dict) or prov.get(k) != v]
        if differ:
            what = (f"linked from another {', '.join(differ)} than this run's (input line {want[mid].line})"
                    if isinstance(prov, dict) else "records no provenance (an older dim-mel link)")
            raise DataError(out, where, "provenance", f"{what}; give another --out, or delete it to link again")
    todo = [m for m in mentions if m.query.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="link", unit="mention",
                                                     disable=not progress, file=sys.stderr) as bar:
        for s in range(0, len(todo), batch):
            part = todo[s:s + batch]
            for m, rec in zip(part, linker.link_many([m.query for m in part], top_k)):
                rec.provenance = {**base, "input_sha256": m.sha256}
                fh.write(json.dumps(rec.as_dict(), ensure_ascii=False) + "\n")
                fh.flush()
                bar.update(1)
    return {"linked": len(todo), "skipped": len(done)}


def build_parser():
    p = ToolkitParser(prog="dim-mel link", description="Link the mentions of a JSONL file with a run (and a "
                      "re-ranker): one output line per mention, appended as it is linked; a rerun resumes.")
    p.add_argument("--run", required=True, help="retriever run folder (dim-mel train)")
    p.add_argument("--input", required=True, type=Path, help="mentions in the unified format (JSON Lines)")
    p.add_argument("--out", required=True, type=Path, help="output JSON Lines (appended; a rerun skips written ids)")
    p.add_argument("--top-k", dest="link_top_k", type=int, default=10, help="entities per mention")
    p.add_argument("--rerank", type=Path, help="a re-ranker run folder (e.g. the feature re-ranker's)")
    p.add_argument("--index", type=Path, help="a KB index folder built with this run (dim-mel index; default: the "
                   "run's own KB)")
    p.add_argument("--batch-size", type=int, default=BATCH, help="mentions handed to the re-ranker together")
    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help=f"refuse an input line longer than this (default {MAX_LINE_BYTES}: 1 MiB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    g = p.add_argument_group("LLM re-ranker (instead of --rerank)")
    add_llm_flags(g, model_flag="--llm", k_flag="--llm-top-k")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.rerank is not None and a.model is not None:
        p.error("give --rerank RUN or --llm MODEL, not both")
    if a.link_top_k < 1 or a.batch_size < 1 or a.max_line_bytes < 1:
        p.error("--top-k, --batch-size and --max-line-bytes must be at least 1")
    check_output_file(a.out)
    with output_lock(a.out):
        mentions = list(read_mentions(a.input, a.max_line_bytes))      # the whole input, before any work
        linker = Linker.from_run(a.run, a.rerank, a.device, a.checkpoint, index=a.index)
        if a.model is not None:
            linker.reranker = reranker_from_args(a, a.out.with_name(a.out.name + ".llm_cache.jsonl"))
        n = link_file(linker, mentions, a.out, a.link_top_k, a.batch_size, progress=a.progress)
    print(f"linked {n['linked']} mentions ({n['skipped']} already in {a.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
