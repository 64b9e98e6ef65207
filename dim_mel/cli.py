"""``dim-mel COMMAND [flags]``: every step of the toolkit behind one command.

Each command runs its module exactly as ``python -m MODULE [flags]`` would (same flags, output, exit status), so
``dim-mel COMMAND --help`` shows that module's own help. The modules are imported only when their command runs.
"""

from __future__ import annotations

import runpy
import sys

# command -> (module, one-line summary), in the order data flows
COMMANDS: dict[str, tuple[str, str]] = {
    # ingest: a public release -> a unified dataset
    "prepare": ("data_process.ingest.prepare", "convert a public MEL release to the unified format"),
    "validate": ("data_process.ingest.validate", "validation report of a unified dataset folder"),
    # augment: a unified dataset -> an enriched or captioned one
    "enrich": ("data_process.augment.enrich", "LLM entity enrichment: write the '+' dataset"),
    "caption": ("data_process.augment.caption", "BLIP-2 captions of mention images (or import captions)"),
    # encode: a unified dataset -> a feature cache
    "features": ("data_process.encode.features", "encode a unified dataset into a feature cache"),
    # model: train, evaluate, link
    "train": ("nel_model.train", "train and evaluate a model on a feature cache (DIM; --model mimic: MIMIC)"),
    "evaluate": ("nel_model.evaluate", "re-evaluate a saved run (one-stage or two-stage)"),
    "predict": ("nel_model.inference.predict", "link one mention with a trained run (dim-mel link: a JSONL file)"),
    "retrieve": ("nel_model.inference.retrieve", "every mention's top-K KB entities: the lists a re-ranker uses"),
    "rerank": ("nel_model.rerank.train_feature", "train the feature re-ranker on a retriever's lists (two-stage run)"),
    "rerank-llm": ("nel_model.rerank.llm", "re-rank a retriever's top-k lists with a chat model (LLM / VLM) and evaluate"),
    "rerank-pairwise": ("nel_model.rerank.pairwise", "re-rank a retriever's top-k lists with a trained pairwise run "
                        "(MIMIC)"),
    "index": ("nel_model.inference.kb_index", "encode a KB with a trained run into an index folder (link --index); "
              "add or remove entities"),
    "link": ("nel_model.inference.linker", "link a JSONL of mentions with a run (and a re-ranker), resumable"),
    "serve": ("nel_model.inference.serve", "serve a run over HTTP: POST /link links mentions as dim-mel link does"),
    # results: tables, plots, analysis of run folders
    "table": ("nel_model.reporting.tables", "results table of run folders (Markdown, CSV, LaTeX)"),
    "plot": ("nel_model.reporting.plots", "training curves and Hits@k plots of run folders"),
    "analyze": ("nel_model.reporting.analyze", "error analysis of a run's predictions (and a second run beside it)"),
    "ablations": ("nel_model.ablations", "run the standard ablations and write their table"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dim-mel COMMAND [flags]   (dim-mel COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}  [python -m {module}]" for name, (module, summary) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dim-mel: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    sys.argv = [f"dim-mel {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0
