"""``dim-mel predict``: link one mention with a trained run (and optionally a re-ranker), the one-mention form of
``dim-mel link``: the same linker (:class:`nel_model.inference.linker.Linker`), the same numbers, the same result.

    dim-mel predict --run runs/dim --sentence "Varkona flooded the valley." --mention "Varkona" \
        [--image photo.png] [--caption TEXT] [--enrichment TEXT] [--top-k 10] [--rerank RERANK_RUN] [--json]

prints the top-k KB entities as a table (rank, score, id, name, description), or with ``--json`` the
``LinkedMention`` object ``dim-mel link`` writes a line of (``docs/CONTRACTS.md``, "Linked mentions"). Scores are
the retriever's cosine similarities in [-1, 1] (a re-ranker's scores for the entities it re-ordered).

Captions and enrichment are not generated here: pass the text if you have it (e.g. from ``dim-mel caption``);
without it the profile rows are masked, exactly as for a dataset mention that has no caption or enrichment. A file
of mentions is ``dim-mel link``'s job (``--input FILE --out OUT``): one reader, one output schema, resumable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_process.core.entry import run_main
from data_process.core.images import decode_image
from data_process.core.safe_paths import regular_file_problem
from data_process.core.settings import ToolkitParser, add_bool
from nel_model.inference.linker import Linker
from nel_model.linking import LinkedMention, LinkError, Query

DESC_CHARS = 60  # description characters shown in the printed table


def format_entities(result: LinkedMention) -> str:
    """The printed table of a linked mention's entities."""
    rows = result.entities
    w_id = max([len("id")] + [len(e.entity_id) for e in rows])
    w_name = max([len("name")] + [len(e.name) for e in rows])
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{w_id}}  {'name':<{w_name}}  description"]
    for e in rows:
        desc = e.description if len(e.description) <= DESC_CHARS else e.description[: DESC_CHARS - 1] + "…"
        score = "nan" if e.score is None else f"{e.score:.4f}"
        lines.append(f"{e.rank:>4}  {score:>7}  {e.entity_id:<{w_id}}  {e.name:<{w_name}}  {desc}".rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel predict", description="Link one mention with a trained run (and a re-ranker): "
                      "its top-k KB entities. A JSON Lines file of mentions: dim-mel link.")
    p.add_argument("--run", required=True, help="run folder written by dim-mel train")
    p.add_argument("--sentence", help="the sentence containing the mention")
    p.add_argument("--mention", help="the mention text")
    p.add_argument("--image", help="optional image of the mention")
    p.add_argument("--caption", help="optional caption text of the image (profile row)")
    p.add_argument("--enrichment", help="optional LLM enrichment text (profile row)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rerank", type=Path, help="a re-ranker run folder trained on this run (dim-mel rerank)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="checkpoint that encodes the mention and the KB entities")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    add_bool(p, "json", False, "print the linked mention as JSON (a dim-mel link line) instead of a table")
    # the batch mode that was: one line saying where it went
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.input is not None or a.output is not None:
        raise LinkError("dim-mel predict links one mention (--sentence, --mention); for a JSON Lines file of "
                        f"mentions use: dim-mel link --run {a.run} --input FILE --out OUT")
    if a.sentence is None or a.mention is None:
        p.error("give --sentence and --mention")
    if a.top_k < 1:
        p.error("--top-k must be at least 1")
    if a.image is not None:
        problem = regular_file_problem(a.image)
        if problem is not None:
            raise LinkError(f"{a.image}: image not found" if problem.startswith("missing") else f"{a.image}: {problem}")
        img, why = decode_image(a.image)
        if img is None:
            raise LinkError(f"{a.image}: cannot read the image ({why})")
    query = Query(sentence=a.sentence, mention=a.mention, image=Path(a.image) if a.image else None,
                  caption=a.caption, enrichment=a.enrichment)
    result = Linker.from_run(a.run, a.rerank, a.device, a.checkpoint).link_many([query], a.top_k)[0]
    if a.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        print(f"mention {a.mention!r} in {a.sentence!r}" + (f" with image {a.image}" if a.image else ""))
        print(format_entities(result))
    return 0


if __name__ == "__main__":
    run_main(main)
