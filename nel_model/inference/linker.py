"""One linking API and one linking command: a trained run (the retriever) and optionally a re-ranker behind one call.

    from nel_model.inference.linker import Linker
    linker = Linker.from_run("runs/dim", reranker="runs/rerank")      # or a Reranker object, or None
    linker.link("Varkona flooded the valley.", "Varkona", image="photo.png", top_k=10)   # -> LinkedMention
    linker.link_many([Query(...), ...])

    dim-mel link --run RUN [--rerank RERANK_RUN | --llm MODEL --base-url URL ...] --input mentions.jsonl \
        --out linked.jsonl [--top-k 10] [--max-line-bytes N]

The retriever is a :class:`~nel_model.loaded_run.LoadedRun` (the run's checkpoint, loaded once; the feature
cache's encoders; the KB's embeddings, read from the run folder or encoded once), ranked with the evaluation's
own functions (the top lists of ``predictions/<split>.jsonl``, the pessimistic tie rule). Each mention is encoded
and scored on its own: its numbers never depend on the mentions linked beside it, so a resumed run gives the
entities and scores of an uninterrupted one. A re-ranker (the :class:`~nel_model.linking.Reranker` protocol)
re-orders the first ``reranker.top_k`` retrieved entities (all requested when it has no ``top_k``); it is given
the mentions' views and retriever embeddings already encoded (:class:`~nel_model.linking.MentionLists`). Every
returned entity says which stage produced its score; the entities after the re-ranked ones keep the retriever's
order and scores. ``--rerank RUN`` loads a re-ranker run folder through ``nel_model.rerank.registry`` over this
retriever (a feature re-ranker must have been trained on it).

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
from data_process.core.records import DataError, iter_json_lines, mention_from_dict, record_json_problem
from data_process.core.safe_paths import UnsafePath, check_output_file, regular_file_problem, resolve_in_dataset
from data_process.core.settings import ToolkitParser
from nel_model.encoding import Encoded, cat_encoded
from nel_model.evaluation.evaluate import open_run
from nel_model.evaluation.scoring import KBScorer, kb_scorer
from nel_model.linking import Candidate, LinkedEntity, LinkedMention, MentionLists, Query, Reranker
from nel_model.loaded_run import LoadedRun
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
    or not in the KB)."""

    views: dict[str, torch.Tensor]
    embedding: Encoded
    candidates: list[Candidate]
    gold_rank: int | None


class Linker:
    """A retriever run (a :class:`~nel_model.loaded_run.LoadedRun`) and an optional re-ranker."""

    def __init__(self, retriever: LoadedRun, reranker: Reranker | None = None):
        self.retriever = retriever
        self.reranker = reranker
        self.row_of = {eid: i for i, eid in enumerate(retriever.data.entity_ids)}
        self._scorer: KBScorer | None = None

    @classmethod
    def from_run(cls, run: str | Path, reranker: Reranker | str | Path | None = None, device: str = "cpu",
                 checkpoint: str = "best") -> "Linker":
        """The run at ``checkpoint``; ``reranker``: a re-ranker, or a re-ranker run folder to load over it."""
        retriever = open_run(run, device, checkpoint)
        if isinstance(reranker, (str, Path)):
            reranker = load_reranker(reranker, retriever)
        return cls(retriever, reranker)

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

    def retrieve(self, query: Query, k: int) -> Retrieved:
        """One mention's ``k`` best KB entities, encoded and scored on its own (float32, ties by KB row)."""
        r = self.retriever
        views, q = r.encode_query(query)
        scores, rows = self.scorer.top(q, k)
        cands = []
        for v, j in zip(scores[0].tolist(), rows[0].tolist()):
            eid = r.data.entity_ids[j]
            rec = r.entity(eid)
            cands.append(Candidate(eid, rec.name if rec else "", rec.description if rec else "", float(v)))
        gold = None
        if query.gold_id is not None and query.gold_id in self.row_of:
            counts = self.scorer.full_kb_counts(q, torch.tensor([self.row_of[query.gold_id]], device=r.device))
            gold = int(counts.ranks("pessimistic")[0])
        return Retrieved(views, q, cands, gold)

    # -- linking --------------------------------------------------------------------------------
    def link_many(self, mentions: Sequence[Query], top_k: int = 10) -> list[LinkedMention]:
        """One :class:`~nel_model.linking.LinkedMention` per mention (the module docstring)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        mentions = list(mentions)
        k_rr = None if self.reranker is None else (self.reranker.top_k or top_k)
        found = [self.retrieve(q, max(top_k, k_rr or 0)) for q in mentions]
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


def read_mentions(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[InputMention]:
    """The mentions of a unified-format JSON Lines file (``gold_id`` and ``split`` optional); each image named
    inside the file's folder (``resolve_in_dataset``) and decoded; the first bad line raises :class:`DataError`
    naming the file, line, id and field."""
    path = Path(path)
    root = path.resolve().parent
    seen: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path, max_line_bytes=max_line_bytes):
        where = f"line {lineno}" + (f" (id {obj['id']!r})" if isinstance(obj, dict) and isinstance(obj.get("id"), str)
                                    else "")

        def fail(field_name, problem, _where=where):
            raise DataError(path, _where, field_name, problem)

        bad = record_json_problem(obj)
        if bad is not None:
            fail(*bad)
        if not isinstance(obj, dict):
            fail(None, f"record must be a JSON object, got {type(obj).__name__}")
        gold = obj.get("gold_id")
        m = mention_from_dict({"split": "test", **obj, "gold_id": gold or "?"}, fail)
        if m.id in seen:
            fail("id", f"duplicate id, first seen on line {seen[m.id]}")
        seen[m.id] = lineno
        image, image_sha = None, None
        if m.image is not None:
            try:
                image = resolve_in_dataset(root, m.image)
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
        yield InputMention(q, lineno, stable_hash({"line": obj, "image_sha256": image_sha}))


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
    return {"input_sha256": None, "retriever_checkpoint_sha256": r.checkpoint_sha256,
            "kb": stable_hash(r.kb_fingerprint() or {"features": str(r.data.root.resolve()),
                                                     "entity_ids": stable_hash(r.data.entity_ids)}),
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
        linker = Linker.from_run(a.run, a.rerank, a.device, a.checkpoint)
        if a.model is not None:
            linker.reranker = reranker_from_args(a, a.out.with_name(a.out.name + ".llm_cache.jsonl"))
        n = link_file(linker, mentions, a.out, a.link_top_k, a.batch_size, progress=a.progress)
    print(f"linked {n['linked']} mentions ({n['skipped']} already in {a.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
