"""The re-rankers a linker can load from a run folder: the kind a re-ranker run records (``results.json``,
``two_stage.reranker.kind``) -> the function that loads it over the linker's retriever.

Real imports (no module names in strings), so ``tests/test_architecture.py`` sees every edge. A new re-ranker:
a module in ``nel_model/rerank/`` with ``load_reranker(run: Path, retriever: LoadedRun) -> Reranker`` and one line
in :data:`LOADERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from data_process.core.safe_paths import regular_file_problem
from nel_model.linking import LinkError, Reranker
from nel_model.loaded_run import LoadedRun
from nel_model.rerank import feature, llm, pairwise
from nel_model.runs import RESULTS_FILE

LOADERS: dict[str, Callable[[Path, LoadedRun], Reranker]] = {
    "feature": feature.load_reranker,      # dim-mel rerank: a trained feature re-ranker (its retriever is checked)
    "llm": llm.load_reranker,              # dim-mel rerank-llm: a chat model, answering from its run's cache first
    "pairwise": pairwise.load_reranker,    # dim-mel rerank-pairwise: a trained pairwise run (MIMIC) over any retriever
}


def reranker_kind(run: str | Path) -> str:
    """The kind of re-ranker a run folder holds (``results.json``: ``two_stage.reranker.kind``)."""
    path = Path(run) / RESULTS_FILE
    if regular_file_problem(path) is not None:
        raise LinkError(f"{path}: not found (a re-ranker run folder has results.json)")
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["two_stage"]["reranker"]["kind"]
    except (ValueError, KeyError, TypeError):
        raise LinkError(f"{path}: names no re-ranker (two_stage.reranker.kind): not a re-ranker run") from None
    if kind not in LOADERS:
        raise LinkError(f"{path}: re-ranker kind {kind!r} unknown (known: {', '.join(sorted(LOADERS))})")
    return kind


def load_reranker(run: str | Path, retriever: LoadedRun) -> Reranker:
    """The re-ranker of a re-ranker run folder, over the linker's loaded ``retriever`` (through :data:`LOADERS`)."""
    return LOADERS[reranker_kind(run)](Path(run), retriever)
