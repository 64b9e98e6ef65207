"""``python -m nel_model.evaluate`` (``dim-mel evaluate``): evaluate a saved run again, one-stage or two-stage.

A one-stage run (``dim-mel train``) goes to :mod:`nel_model.evaluation.evaluate`; a two-stage run (``dim-mel
rerank``, ``dim-mel rerank-llm``: a retriever's lists re-ordered by a re-ranker) to :mod:`nel_model.rerank.evaluate`.
Both take the same flags and print the same table, with the numbers ``results.json`` records.
"""

from __future__ import annotations

from typing import Any

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from nel_model.evaluation import evaluate as one_stage
from nel_model.rerank.evaluate import evaluate_two_stage
from nel_model.runs import two_stage_of


def build_parser() -> ToolkitParser:
    p = one_stage.build_parser()
    p.add_argument("--retriever", default=None,
                   help="a two-stage run: its retriever run folder, when not where the run records it")
    return p


def evaluate(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``--run`` and return ``{protocol: {split: metrics}}`` (printed as a table, or ``--json``)."""
    p = build_parser()
    a = p.parse_args(argv)
    info = two_stage_of(a.run)
    if info is None:
        if a.retriever:
            p.error(f"--retriever is for a two-stage run; {a.run} is a one-stage run")
        return one_stage.evaluate(a)
    return evaluate_two_stage(a, info)


def main(argv: list[str] | None = None) -> int:
    evaluate(argv)
    return 0


if __name__ == "__main__":
    run_main(main)
