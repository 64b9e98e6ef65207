r"""Real-data benchmark of two-stage linking (issue 21): the retriever alone against retriever + feature re-ranker
(K = 10 and 20) on WikiMEL as GHMFC uses it (``bench/wikimel_ghmfc.py`` builds the dataset, features and
retriever runs).

::

    python bench/wikimel_two_stage.py --shared /work/runs/wikimel_shared --work /work/runs/featrerank \
        [--seeds 1 2 3] [--top-k 10 20] [--ablations] [--threads 1]

``SHARED`` holds ``features/`` and the retriever runs ``runs/ours_s<seed>`` (our default text model,
``configs/wikimel_ghmfc.yaml --no-image``) with their ``retrieval/`` lists at K = 20 (``dim-mel retrieve``); it is
only read. Each re-ranker run (``dim-mel rerank --config configs/rerank.yaml``, the re-ranker seeded like its
retriever) goes to ``WORK/rerank_k<K>_s<seed>``; a run with a ``results.json`` is reused. ``--ablations``: seed 1,
K = 20, one re-ranker switch off at a time. Report: test split, whole KB (pessimistic and strict ties) and the
candidate protocol, mean ± sample std over the seeds; the oracle (recall@K of the lists: the ceiling of any
re-ranker); the cost in mentions per second on this CPU. Results in ``bench/results/wikimel_two_stage.{json,md}``.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data_process.core.durable_io import atomic_write_json, atomic_write_text
from data_process.core.settings import ToolkitParser, add_bool
from nel_model.runs import cpu_model
from wikimel_ghmfc import aggregate, run_metrics, run_step, tables     # bench/ is the script's folder: on sys.path

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = {"no lexical features": ["--no-lexical"], "no attention across candidates": ["--no-cross-candidates"],
             "no token attention": ["--no-token-attention"], "no retriever embeddings": ["--no-retriever-embeddings"]}


def rerank_run(retriever: Path, out: Path, k: int, seed: int, threads: int, extra: list[str]) -> dict[str, Any]:
    if (out / "results.json").is_file():
        res = json.loads((out / "results.json").read_text())
        print(f"  {out.name}: reused", flush=True)
        return res
    cmd = [sys.executable, "-m", "nel_model.rerank.train_feature", "--config", str(REPO / "configs/rerank.yaml"),
           "--retriever", str(retriever), "--output-dir", str(out), "--top-k", str(k), "--seed", str(seed),
           "--threads", str(threads), "--device", "cpu", "--overwrite", "--label", out.name, *extra]
    res = run_step(cmd, out, "dim-mel rerank")
    atomic_write_json(out / "results.json", res)
    m = res["tie_rules"]["pessimistic"]["full_kb"]["test"]
    print(f"  {out.name}: test H@1 {100 * m['hits@1']:.2f} MRR {100 * m['mrr']:.2f} (best epoch "
          f"{res['best_epoch']}, {res['time_s']} s)", flush=True)
    return res


def oracle_metrics(res: dict[str, Any]) -> float:
    return res["oracle_recall_at_k"]["test"]


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _pm(v: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    s = f"{scale * v['mean']:.{digits}f}"
    return s + (f" ± {scale * v['std']:.{digits}f}" if v.get("std") is not None else "")


def main(argv: list[str] | None = None) -> int:
    p = ToolkitParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, required=True, help="dataset, features and retriever runs (read only)")
    p.add_argument("--work", type=Path, required=True, help="folder of the re-ranker runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--top_k", type=int, nargs="+", default=[10, 20])
    add_bool(p, "ablations", False, "seed 1, the largest K: one re-ranker switch off at a time")
    p.add_argument("--zero_shot", type=Path, default=None,
                   help="an untrained retriever run (train --epochs 0) with retrieval/ lists: its rows too, the "
                        "re-ranker at the largest K trained on its lists (no train/test shift of the lists)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results_dir", type=Path, default=REPO / "bench" / "results")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    retr: dict[int, dict[str, Any]] = {}
    runs: dict[int, dict[int, dict[str, Any]]] = {k: {} for k in a.top_k}
    for seed in a.seeds:
        rdir = a.shared / "runs" / f"ours_s{seed}"
        retr[seed] = json.loads((rdir / "results.json").read_text())
        for k in a.top_k:
            runs[k][seed] = rerank_run(rdir, a.work / f"rerank_k{k}_s{seed}", k, seed, a.threads, [])
    ablations: dict[str, dict[str, Any]] = {}
    if a.ablations:
        k, seed = max(a.top_k), a.seeds[0]
        for name, flags in ABLATIONS.items():
            slug = flags[0].lstrip("-")
            ablations[name] = rerank_run(a.shared / "runs" / f"ours_s{seed}", a.work / f"rerank_k{k}_s{seed}_{slug}",
                                         k, seed, a.threads, flags)
    rows = [("retriever alone (ours, default, trained)", aggregate([run_metrics(retr[s]) for s in a.seeds]))]
    for k in a.top_k:
        rows.append((f"+ feature re-ranker, K = {k}", aggregate([run_metrics(runs[k][s]) for s in a.seeds])))
    if a.zero_shot:
        k = max(a.top_k)
        zs = [rerank_run(a.zero_shot, a.work / f"zero_shot_rerank_k{k}_s{s}", k, s, a.threads, []) for s in a.seeds]
        rows.append(("zero-shot retriever alone (untrained DIM)",
                     run_metrics(json.loads((a.zero_shot / "results.json").read_text()))))
        rows.append((f"zero-shot retriever + feature re-ranker, K = {k}", aggregate([run_metrics(r) for r in zs])))
    oracle = {k: mean_std([oracle_metrics(runs[k][s]) for s in a.seeds]) for k in a.top_k}
    speed = {k: {key: mean_std([runs[k][s]["rerank_speed"][key] for s in a.seeds])
                 for key in ("rerank_mentions_per_s", "retrieval_mentions_per_s")} for k in a.top_k}
    train_time = {k: mean_std([runs[k][s].get("time_s", 0.0) for s in a.seeds]) for k in a.top_k}
    best_epochs = {k: [runs[k][s]["best_epoch"] for s in a.seeds] for k in a.top_k}
    gain = {k: {m: mean_std([runs[k][s]["tie_rules"]["pessimistic"]["full_kb"]["test"][m]
                             - retr[s]["tie_rules"]["pessimistic"]["full_kb"]["test"][m] for s in a.seeds])
                for m in ("hits@1", "mrr")} for k in a.top_k}
    result = {"command": "python bench/wikimel_two_stage.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": a.threads,
                          "torch": torch.__version__, "load_avg_start": os.getloadavg()[0]},
              "seeds": a.seeds, "top_k": a.top_k, "rows": dict(rows), "oracle_recall_at_k": oracle,
              "speed": speed, "rerank_train_time_s": train_time, "best_epochs": best_epochs, "gain": gain,
              "ablations": {n: run_metrics(r) for n, r in ablations.items()},
              "ablation_reference": run_metrics(runs[max(a.top_k)][a.seeds[0]]),
              "zero_shot": str(a.zero_shot) if a.zero_shot else None,
              "reranker_config": runs[a.top_k[0]][a.seeds[0]]["two_stage"]["reranker"]["config"],
              "wall_s": round(time.time() - t0, 1)}
    write_report(result, ablations, a.results_dir)
    return 0


def write_report(result: dict[str, Any], ablations: dict[str, dict[str, Any]], results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results_dir / "wikimel_two_stage.json", result)
    full, cand = tables(list(result["rows"].items()))
    m, seeds = result["machine"], ", ".join(map(str, result["seeds"]))
    md = ["# Two-stage linking on WikiMEL (GHMFC split): retriever + feature re-ranker", "",
          f"Command: `{result['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs; load average at start "
          f"{m['load_avg_start']:.2f}), no GPU; torch {m['torch']}, {m['threads']} thread(s).  ",
          "Data, features and retriever: `bench/wikimel_ghmfc.py` (GHMFC's official split of WikiMEL, KB of all 18,880 "
          "entities, MiniLM 384-d text features, no images); the retriever is our default text model "
          "(`configs/wikimel_ghmfc.yaml --no-image`), one run per seed, its lists from `dim-mel retrieve --top-k 20` "
          "(K = 10: the first 10). Re-ranker: `dim-mel rerank --config configs/rerank.yaml --top-k K --seed S` "
          "(docs/RERANK.md), trained on the train split's lists, selected on dev MRR (whole KB).  ",
          "Protocol: test split; whole KB with pessimistic ties (and strict); the 100 candidates with DIM's rule. "
          f"Rows: mean ± sample std over seeds {seeds}."
          + (" Zero-shot rows: the untrained DIM as the retriever (`python -m nel_model.train --config "
             "configs/wikimel_ghmfc.yaml --no-image --epochs 0`, then `dim-mel retrieve --top-k 20`; no training, "
             "so its train lists are as hard as its test lists), the re-ranker trained on its lists with each seed."
             if result.get("zero_shot") else ""), "",
          "## Whole KB (percent)", "", full, "",
          "## 100 candidates (percent; Top-k = Hits@k)", "", cand, "",
          "## Gain over the retriever and the ceiling (test, whole KB, pessimistic; percentage points)", "",
          "| K | Δ H@1 | Δ MRR | oracle recall@K (ceiling of H@1) | best epochs |", "|---|---|---|---|---|"]
    for k in result["top_k"]:
        g = result["gain"][k]
        o = result["oracle_recall_at_k"][k]
        md.append(f"| {k} | {_pm(g['hits@1'])} | {_pm(g['mrr'])} | {_pm(o)} | {result['best_epochs'][k]} |")
    md += ["", "## Cost (this CPU, test split, mentions per second)", "",
           "| K | retrieval (encode the mentions, whole-KB scores, top K) | re-ranking (the lists' inputs: mention "
           "embeddings, view and lexical features; the model) | re-ranker training (s, whole run) |", "|---|---|---|---|"]
    for k in result["top_k"]:
        s = result["speed"][k]
        md.append(f"| {k} | {_pm(s['retrieval_mentions_per_s'], 1, 0)} | {_pm(s['rerank_mentions_per_s'], 1, 0)} | "
                  f"{_pm(result['rerank_train_time_s'][k], 1, 0)} |")
    if ablations:
        md += ["", f"## Ablations (seed {result['seeds'][0]}, K = {max(result['top_k'])}; test, whole KB, "
               "pessimistic)", "", "| re-ranker | H@1 | MRR |", "|---|---|---|"]
        ref = result["ablation_reference"]["full_kb"]["pessimistic"]
        md.append(f"| all on | {100 * ref['hits@1']:.2f} | {100 * ref['mrr']:.2f} |")
        for name, res in ablations.items():
            t = res["tie_rules"]["pessimistic"]["full_kb"]["test"]
            md.append(f"| {name} | {100 * t['hits@1']:.2f} | {100 * t['mrr']:.2f} |")
    atomic_write_text(results_dir / "wikimel_two_stage.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
