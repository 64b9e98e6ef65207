r"""Why HNSW's recall falls at 10M real-shaped entities: the same local density on a small KB (a diagnostic).

::

    python bench/index_density.py --work /tmp/index_scale [--reals 400] [--per-real 530] [--out bench/results/index_density_cpu]

``bench/bench_index_scale.py``'s real-shaped KB of N entities gives each of the 18,880 real WikiMEL entities about
N / 18,880 noisy siblings (530 at 10M, 53 at 1M). Here ``--reals`` real entities (the golds of the first test
mentions, then others) each get ``--per-real`` siblings by the same generator, so a query's neighbourhood is as
crowded as at 10M while the KB stays small enough to build in minutes. Measured: recall@1/10 against exact search
of ``hnsw`` with 8-bit scalar-quantised vectors (the default) and with full float32 vectors, at pools of 50 (the
default) and 500 re-scored exactly, with a denser graph (M 64, efConstruction 400), and of ``ivfpq`` at its
defaults. Reads the real vectors ``bench_index_scale.py``
cached in ``WORK/real.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json, atomic_write_text
from nel_model.index import HNSWParams, matrix_index
from nel_model.runs import cpu_model

NOISE_SCALE = 0.8          # bench_index_scale.py's
K = 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--reals", type=int, default=400)
    ap.add_argument("--per-real", type=int, default=530)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "index_density_cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    real = np.load(a.work / "real.npz", allow_pickle=False)
    ents, queries, gold = real["entities"], real["queries"], real["gold"]
    picked = list(dict.fromkeys(gold[:a.queries].tolist()))
    rng = np.random.default_rng(0)
    others = [i for i in rng.permutation(len(ents)).tolist() if i not in set(picked)]
    picked = (picked + others)[:a.reals]
    q = queries[np.isin(gold, picked)][:a.queries]
    w, v = np.linalg.eigh(np.cov(ents.T))
    noise = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)
    base = np.repeat(ents[picked], a.per_real, axis=0)
    x = base + NOISE_SCALE * (rng.standard_normal(base.shape, dtype=np.float32) @ noise)
    x = np.concatenate([ents[picked], x]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = {"command": "python bench/index_density.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "cpu": cpu_model(), "load_avg_start": round(os.getloadavg()[0], 2), "entities": len(x),
           "reals": len(picked), "per_real": a.per_real, "queries": len(q), "cases": []}
    cases = [("hnsw", HNSWParams(), [50, 500]), ("hnsw", HNSWParams(storage="flat"), [50, 500]),
             ("hnsw", HNSWParams(m=64, ef_construction=400), [50]), ("ivfpq", None, [None])]
    for kind, params, pools in cases:
        t0 = time.perf_counter()
        with matrix_index(x, kind, params=params) as index:
            build = round(time.perf_counter() - t0, 1)
            for pool in pools:
                over = {} if pool is None else {"pool": pool, "ef_search": max(1024, pool)}
                rec = index.measure_recall(q, ks=(1, K), **over)
                row = {"kind": kind, "factory": index.manifest["faiss"]["factory"], "build_s": build,
                       "params": {k: v for k, v in index.manifest["faiss"]["params"].items()
                                  if k in ("m", "ef_construction", "storage", "nlist", "nprobe")},
                       "search": rec["search"], "recall@1": rec["recall@1"], f"recall@{K}": rec[f"recall@{K}"],
                       "approx_ms_per_query": round(1000 * rec["approx_s"] / len(q), 2)}
                res["cases"].append(row)
                print(row, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out.with_suffix(".json"), res)
    lines = ["# HNSW and IVF-PQ recall at 10M-like density on a small KB (CPU, diagnostic)", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['cpu']}, 2 shared cores (load average {res['load_avg_start']}); 1 thread for searches.  ",
             f"KB: {res['reals']} real WikiMEL entity vectors (MiniLM), each with {res['per_real']} noisy siblings "
             f"(`bench_index_scale.py`'s real-shaped generator): {res['entities']:,} entities, as crowded around each "
             f"real entity as the 10,000,000-entity KB; {res['queries']} real test mentions whose gold is among them.",
             "", "| kind | faiss | build | search | recall@1 | recall@10 | ms / query | build s |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in res["cases"]:
        lines.append(f"| {r['kind']} | `{r['factory']}` | {json.dumps(r['params'])} | {json.dumps(r['search'])} | {r['recall@1']:.4f} | "
                     f"{r[f'recall@{K}']:.4f} | {r['approx_ms_per_query']} | {r['build_s']} |")
    atomic_write_text(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
