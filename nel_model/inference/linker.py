"""One linking API: a trained run (the retriever) and optionally a re-ranker behind one call.

    from nel_model.inference.linker import Linker
    linker = Linker.from_run("runs/dim")                           # + reranker=LLMReranker(...) or a loaded one
    linker.link("Varkona flooded the valley.", "Varkona", image="photo.png", top_k=10)
    linker.link_many([Query(...), ...])

    dim-mel link --run RUN [--rerank RERANK_RUN | --llm MODEL --base-url URL ...] --input mentions.jsonl \
        --out linked.jsonl [--top-k 10]

Retrieval of a new mention is :class:`nel_model.inference.predict.Predictor`'s (the feature cache's encoders, the
run's checkpoint, evaluation's ranking functions): no second encoding path. A re-ranker re-orders the first
``reranker.top_k`` retrieved entities (all requested when it has no ``top_k``); every returned entity says which
stage produced its score (``"stage": "reranker"`` or ``"retriever"``); the entities after the re-ranked ones keep
the retriever's order and scores.

A re-ranker is any object with ``kind``, ``top_k`` (int or None), ``score(lists: MentionLists) -> [N, K]`` tensor
(higher is better, NaN lowest) and ``info() -> dict`` (:class:`Reranker`). ``--rerank RUN`` loads a re-ranker run
folder through :data:`RERANKERS`: the kind recorded in ``RUN/results.json`` (``two_stage.reranker.kind``) names the
module, whose ``load_reranker(run, device)`` returns the re-ranker.

Input: the unified mention format (``data_process.core.records`` Mention lines, ``docs/CONTRACTS.md``), where
``gold_id`` and ``split`` may be left out for new mentions; a relative ``image`` is resolved inside the input file's
folder (``core.safe_paths``). A bad line is an error naming the file, the line and the field. Output: one line per
mention, appended and flushed as soon as it is linked, ``{"id", "mention", "entities": [{"rank", "entity_id",
"name", "description", "score", "stage"}], "gold_rank"?}``; a rerun skips the mentions already written (a torn last
line, from a killed run, is moved to ``OUT.corrupt`` and that mention linked again).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from data_process.core.entry import run_main
from data_process.core.records import DataError, iter_json_lines, mention_from_dict, record_json_problem
from data_process.core.safe_paths import regular_file_problem, resolve_inside
from data_process.core.settings import ToolkitParser
from nel_model.inference.predict import Predictor
from nel_model.linking import Candidate, MentionLists, Query, Reranker
from nel_model.runs import RESULTS_FILE

# re-ranker kind -> module with ``load_reranker(run: Path, device: str) -> Reranker``; the feature re-ranker's
# module registers itself here.
RERANKERS: dict[str, str] = {"llm": "nel_model.rerank.llm", "feature": "nel_model.rerank.feature"}
BATCH = 16


class LinkError(ValueError):
    """A re-ranker that cannot be loaded; the message says why."""


def load_reranker(run: str | Path, device: str = "cpu") -> Reranker:
    """The re-ranker of a re-ranker run folder, through :data:`RERANKERS`."""
    run = Path(run)
    path = run / RESULTS_FILE
    if regular_file_problem(path) is not None:
        raise LinkError(f"{path}: not found (a re-ranker run folder has results.json)")
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["two_stage"]["reranker"]["kind"]
    except (ValueError, KeyError, TypeError):
        raise LinkError(f"{path}: names no re-ranker (two_stage.reranker.kind): not a re-ranker run") from None
    if kind not in RERANKERS:
        raise LinkError(f"{path}: re-ranker kind {kind!r} unknown (known: {', '.join(sorted(RERANKERS))})")
    try:
        module = importlib.import_module(RERANKERS[kind])
    except ModuleNotFoundError as exc:
        if exc.name and RERANKERS[kind].startswith(exc.name):
            raise LinkError(f"{path}: a {kind!r} re-ranker needs {RERANKERS[kind]}, which this installation does "
                            "not have") from None
        raise
    if not hasattr(module, "load_reranker"):
        raise LinkError(f"{RERANKERS[kind]} cannot load a re-ranker run (it has no load_reranker)")
    return module.load_reranker(run, device)


class Linker:
    """A retriever run (through :class:`Predictor`) and an optional re-ranker."""

    def __init__(self, predictor: Predictor, reranker: Reranker | None = None):
        self.predictor = predictor
        self.reranker = reranker

    @classmethod
    def from_run(cls, run: str | Path, reranker: Reranker | None = None, device: str = "cpu",
                 checkpoint: str = "best") -> "Linker":
        return cls(Predictor(run, device=device, checkpoint=checkpoint), reranker)

    def link(self, sentence: str, mention: str, image: str | Path | None = None, top_k: int = 10,
             caption: str | None = None, id: str | None = None, gold_id: str | None = None) -> dict[str, Any]:
        q = Query(sentence=sentence, mention=mention, image=None if image is None else Path(image), caption=caption,
                  id=id, gold_id=gold_id)
        return self.link_many([q], top_k)[0]

    def link_many(self, mentions: Sequence[Query], top_k: int = 10) -> list[dict[str, Any]]:
        """One result per mention: ``{"id", "mention", "entities": [...], "gold_rank"?}`` (the module docstring)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        k_rr = None if self.reranker is None else (self.reranker.top_k or top_k)
        retrieved = self.predictor.predict(list(mentions), max(top_k, k_rr or 0))
        if self.reranker is None:
            return [_result(r, [(h, h["score"], "retriever") for h in r["predictions"]], top_k)
                    for r in retrieved]
        lists = MentionLists(list(mentions), [[Candidate(h["entity_id"], h["name"], h.get("description", ""),
                                                         h["score"]) for h in r["predictions"][:k_rr]]
                                              for r in retrieved])
        scores = self.reranker.score(lists)
        out = []
        for q, r, row in zip(mentions, retrieved, scores):
            hits = r["predictions"]
            n = min(k_rr, len(hits))
            order = torch.sort(row[:n].float().nan_to_num(nan=-float("inf")), descending=True, stable=True).indices
            ranked = [(hits[j], _num(row[j]), "reranker") for j in order.tolist()]
            ranked += [(h, h["score"], "retriever") for h in hits[n:]]
            out.append(_result(r, ranked, top_k, n, q.gold_id))
        return out


def _num(v: torch.Tensor) -> float | None:
    x = float(v)
    return None if x != x else round(x, 6)


def _result(r: dict[str, Any], ranked: list[tuple[dict, Any, str]], top_k: int, reranked: int = 0,
            gold_id: str | None = None) -> dict[str, Any]:
    ents = [{"rank": i, "entity_id": h["entity_id"], "name": h["name"], "description": h.get("description", ""),
             "score": s, "stage": stage} for i, (h, s, stage) in enumerate(ranked[:top_k], 1)]
    rec: dict[str, Any] = {"id": r["id"], "mention": r["mention"], "entities": ents}
    if "gold_rank" in r:
        # the retriever's pessimistic full-KB rank, or the gold's place among the re-ranked first entities
        rec["gold_rank"] = next((i for i, (h, _, _) in enumerate(ranked[:reranked], 1) if h["entity_id"] == gold_id),
                                r["gold_rank"])
    return rec


# ---------------------------------------------------------------------------------------------
# Input and output


def read_mentions(path: str | Path) -> Iterator[Query]:
    """The mentions of a unified-format JSON Lines file (``gold_id`` and ``split`` optional), images resolved inside
    its folder; the first bad line raises :class:`DataError` naming the file, line and field."""
    path = Path(path)
    root = path.resolve().parent
    seen: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path):
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
        image = None
        if m.image is not None:
            try:
                image = resolve_inside(root, m.image, allow_absolute=True)
            except ValueError as exc:
                fail("image", str(exc))
            problem = regular_file_problem(image)
            if problem is not None:
                fail("image", f"{m.image}: {problem}")
        yield Query(sentence=m.sentence, mention=m.mention, image=image, caption=(m.caption or {}).get("text"),
                    enrichment=(m.enrichment or {}).get("text"), id=m.id, gold_id=gold if gold else None)


def written_ids(out: Path) -> set[str]:
    """Ids already in the output file; a torn last line (a killed run) is moved to ``OUT.corrupt`` first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    ids = set()
    for lineno, raw in enumerate(keep.splitlines(), 1):
        try:
            ids.add(json.loads(raw)["id"])
        except (ValueError, KeyError, TypeError):
            raise DataError(out, f"line {lineno}", "id", "not a linked-mention line: fix or delete the output "
                                                         "file, then rerun") from None
    if len(keep) < len(data):
        with out.with_name(out.name + ".corrupt").open("ab") as fh:
            fh.write(data[len(keep):] + b"\n")
        with out.open("r+b") as fh:
            fh.truncate(len(keep))
    return ids


def link_file(linker: Linker, inp: Path, out: Path, top_k: int, batch: int = BATCH, progress: bool = True
              ) -> dict[str, int]:
    """Link every mention of ``inp`` not yet in ``out``, appending one line per mention (flushed)."""
    done = written_ids(out)
    todo = [q for q in read_mentions(inp) if q.id not in done]      # the whole input is checked before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="link", unit="mention",
                                                     disable=not progress, file=sys.stderr) as bar:
        for s in range(0, len(todo), batch):
            for rec in linker.link_many(todo[s:s + batch], top_k):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
    p.add_argument("--batch-size", type=int, default=BATCH, help="mentions encoded (and re-ranked) together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    g = p.add_argument_group("LLM re-ranker (instead of --rerank)")
    # the LLM re-ranker's own flags, through the registry (the re-rankers import this module, not the reverse)
    importlib.import_module(RERANKERS["llm"]).add_llm_flags(g, model_flag="--llm", k_flag="--llm-top-k")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.rerank is not None and a.model is not None:
        p.error("give --rerank RUN or --llm MODEL, not both")
    if a.link_top_k < 1 or a.batch_size < 1:
        p.error("--top-k and --batch-size must be at least 1")
    reranker = None
    if a.rerank is not None:
        reranker = load_reranker(a.rerank, a.device)
    elif a.model is not None:
        llm = importlib.import_module(RERANKERS["llm"])
        reranker = llm.reranker_from_args(a, a.out.with_name(a.out.name + ".llm_cache.jsonl"))
    linker = Linker.from_run(a.run, reranker, a.device, a.checkpoint)
    n = link_file(linker, a.input, a.out, a.link_top_k, a.batch_size, progress=a.progress)
    print(f"linked {n['linked']} mentions ({n['skipped']} already in {a.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
