r"""Real data through ``dim-mel index``: WikiMEL's KB indexed with a trained run, its test mentions linked against it,
and the KB grown with synthetic distractors (issue 28, item 6).

::

    python bench/index_wikimel.py --run WORK/runs/ours_s1 --work /tmp/index_wikimel \
        [--distractors 25000 50000 100000] [--link-mentions 1000] [--out bench/results/index_wikimel_cpu]

``RUN`` is a run of ``bench/wikimel_ghmfc.py`` (MiniLM text, no images). Steps, each timed:

1. ``flat``: ``dim-mel index --run RUN`` (the run's own KB: the vectors its evaluation scores). The cached test
   mentions (the vectors ``dim-mel evaluate`` scores) are searched in it, top 100: Hits@k and MRR@100 beside
   ``results.json``'s whole-KB numbers (pessimistic ties; an index orders equal scores by KB row, the strict rule).
2. ``link``: ``Linker(index=flat)`` links the first ``--link-mentions`` raw test mentions (sentence and mention
   encoded again from text, as new mentions): Hits@1 beside step 1's on the same mentions, and mentions/s.
3. ``approximate``: ``dim-mel index --kind hnsw`` and ``--kind ivfpq``: the recall@1/10 each records (dev mentions)
   and the test Hits@k through it: what the approximation costs.
4. ``distractors``: a copy of the flat index grown with ``dim-mel index --add`` to each size of ``--distractors``
   synthetic entities (stated as such: a name of the first word of one real entity's name and the last word of
   another's; the description of a random real entity, so descriptions repeat: hard distractors). After each
   addition: Hits@k of the cached test mentions, and the seconds the addition took (MiniLM encoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json, atomic_write_text
from data_process.core.records import ENTITIES_FILE, load_dataset
from nel_model.evaluation.evaluate import open_run
from nel_model.index import KBIndexFolder
from nel_model.inference import kb_index
from nel_model.inference.linker import Linker
from nel_model.linking import Query
from nel_model.runs import cpu_model

KS = (1, 3, 5, 10, 20)
TOP = 100
SEED = 0


def hits(gold_pos: list[int | None], n: int | None = None) -> dict[str, float]:
    """Hits@k and MRR@100 (percent) from each mention's 1-based gold position in its list (None: not in it)."""
    pos = gold_pos[:n]
    out = {f"hits@{k}": 100 * sum(p is not None and p <= k for p in pos) / len(pos) for k in KS}
    out["mrr@100"] = 100 * sum(1 / p for p in pos if p is not None) / len(pos)
    out["n"] = len(pos)
    return out


def positions(index: KBIndexFolder, q: np.ndarray, golds: list[str]) -> tuple[list[int | None], float]:
    t = time.perf_counter()
    _, ids = index.search(q, TOP)
    secs = time.perf_counter() - t
    return [row.index(g) + 1 if g in row else None for row, g in zip(ids, golds)], secs


def build(run: Path, out: Path, *flags: str) -> float:
    t = time.perf_counter()
    if kb_index.main(["--run", str(run), "--out", str(out), "--no-progress", *flags]):
        raise RuntimeError(f"dim-mel index {' '.join(flags)} failed")
    return round(time.perf_counter() - t, 1)


def distractor_lines(dataset: Path, n: int, start: int) -> list[str]:
    """``n`` synthetic entities (module docstring, step 4), ids ``SYN{start}`` on, as unified entity lines."""
    ents = load_dataset(dataset).entities
    rng = np.random.default_rng(SEED + start)
    words = [e.name.split() for e in ents if e.name.split()]
    lines = []
    for i in range(n):
        a, b = words[rng.integers(len(words))], words[rng.integers(len(words))]
        desc = ents[rng.integers(len(ents))].description
        lines.append(json.dumps({"id": f"SYN{start + i}", "name": f"{a[0]} {b[-1]}", "description": desc}))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--distractors", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    ap.add_argument("--link-mentions", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "index_wikimel_cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    load = round(os.getloadavg()[0], 2)
    run = open_run(a.run, "cpu")
    rows = run.data.splits["test"]
    golds = [run.data.entity_ids[g] for g in run.data.gold[rows]]
    q = run.mention_embeddings(rows).numpy()
    recorded = json.loads((a.run / "results.json").read_text())["tie_rules"]["pessimistic"]["full_kb"]["test"]
    res: dict[str, Any] = {
        "command": "python bench/index_wikimel.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_avg_start": load,
                    "torch": torch.__version__, "python": platform.python_version(), "threads": a.threads},
        "run": str(a.run), "kb_entities": run.data.num_entities, "test_mentions": len(rows),
        "evaluate": {k: round(100 * v, 2) for k, v in recorded.items() if k not in ("n", "nan")}}

    def save() -> None:
        res["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out.with_suffix(".json"), res)
        atomic_write_text(a.out.with_suffix(".md"), report(res))

    flat = a.work / "flat"
    res["flat"] = {"build_s": build(a.run, flat, "--overwrite")}
    index = KBIndexFolder.open(flat, run.index_fingerprint())
    pos, secs = positions(index, q, golds)
    res["flat"].update(hits(pos), search_s=round(secs, 2))
    print("flat", res["flat"], flush=True)
    save()

    ds = load_dataset(run.data.dataset)
    by_id = {m.id: m for m in ds.mentions}
    ments = [by_id[run.data.mention_ids[r]] for r in rows[:a.link_mentions]]
    linker = Linker(run, index=index)
    queries = [Query(m.sentence, m.mention, id=m.id, gold_id=m.gold_id) for m in ments]
    linker.link_many(queries[:8], top_k=TOP)            # warm-up: encoders loaded
    t = time.perf_counter()
    linked = []
    for s in range(0, len(queries), 64):
        linked += linker.link_many(queries[s:s + 64], top_k=TOP)
    secs = time.perf_counter() - t
    res["link"] = {**hits([r.gold_rank for r in linked]), "same_mentions_cached": hits(pos, len(linked)),
                   "mentions_per_s": round(len(linked) / secs, 1), "seconds": round(secs, 1),
                   "top1_agrees_with_cached": round(sum(
                       r.entities[0].entity_id == row[0] for r, row in
                       zip(linked, index.search(q[:len(linked)], 1)[1])) / len(linked), 4)}
    print("link", res["link"], flush=True)
    save()

    res["approximate"] = {}
    for kind in ("hnsw", "ivfpq"):
        out = a.work / kind
        secs = build(a.run, out, "--kind", kind, "--overwrite")
        approx = KBIndexFolder.open(out, run.index_fingerprint())
        pos_a, search_s = positions(approx, q, golds)
        res["approximate"][kind] = {"build_s": secs, **hits(pos_a), "search_s": round(search_s, 2),
                                    "recall_dev": approx.manifest.get("recall"),
                                    "faiss": approx.info().get("faiss")}
        print(kind, res["approximate"][kind], flush=True)
        save()

    grow = a.work / "grown"
    shutil.rmtree(grow, ignore_errors=True)
    shutil.copytree(flat, grow)
    res["distractors"] = [{"added": 0, "kb_entities": len(index), **hits(pos)}]
    have = 0
    for target in sorted(a.distractors):
        part = a.work / f"distractors_{have}_{target}.jsonl"
        part.write_text("\n".join(distractor_lines(run.data.dataset, target - have, have)) + "\n")
        secs = build(a.run, grow, "--add", str(part))
        grown = KBIndexFolder.open(grow, run.index_fingerprint())
        pos_g, search_s = positions(grown, q, golds)
        res["distractors"].append({"added": target, "kb_entities": len(grown), "add_s": secs,
                                   "entities_per_s": round((target - have) / secs, 1), **hits(pos_g),
                                   "search_s": round(search_s, 2)})
        print("distractors", res["distractors"][-1], flush=True)
        have = target
        save()
    res["load_avg_end"] = round(os.getloadavg()[0], 2)
    save()
    print(report(res))
    return 0


def _row(name: str, h: dict[str, Any], extra: str = "") -> str:
    return (f"| {name} | {h['hits@1']:.2f} | {h['hits@3']:.2f} | {h['hits@5']:.2f} | {h['hits@10']:.2f} | "
            f"{h['hits@20']:.2f} | {h.get('mrr@100', h.get('mrr', 0)):.2f} | {extra} |")


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    ev = r["evaluate"]
    out = ["# WikiMEL through `dim-mel index` (CPU)", "",
           f"Command: `{r['command']}`  ",
           f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs (load average {m['load_avg_start']} at "
           f"the start{', ' + str(r['load_avg_end']) + ' at the end' if 'load_avg_end' in r else ''}), no GPU; "
           f"torch {m['torch']}, {m['threads']} thread(s); peak RSS {r.get('max_rss_gib')} GiB.  ",
           f"Run: `{r['run']}` (`bench/wikimel_ghmfc.py`'s default model, MiniLM text, no images); KB "
           f"{r['kb_entities']:,} entities; test split, {r['test_mentions']:,} mentions.  ",
           "Protocol: each mention's top 100 from the index; Hits@k = gold within the first k; MRR@100 counts golds "
           "within the list (a gold beyond 100 adds under 0.01 each to the whole-KB MRR). Scores float32. "
           "Ties: the index orders equal scores by KB row; `dim-mel evaluate`'s row uses pessimistic ties.", "",
           "| KB / path | H@1 | H@3 | H@5 | H@10 | H@20 | MRR | note |", "|---|---:|---:|---:|---:|---:|---:|---|",
           _row("`dim-mel evaluate` (results.json, whole KB)", {**ev, "mrr@100": ev["mrr"]}, "MRR: whole KB")]
    if "flat" in r:
        f = r["flat"]
        out.append(_row("flat index, cached test mentions", f, f"built in {f['build_s']} s; search "
                        f"{f['search_s']} s for all mentions"))
    for kind, h in r.get("approximate", {}).items():
        rec = h.get("recall_dev") or {}
        out.append(_row(f"{kind} index (`{(h.get('faiss') or {}).get('factory', kind)}`)", h,
                        f"recall@1 / @10 vs exact on {rec.get('queries', '?')} dev mentions: "
                        f"{rec.get('recall@1', '?')} / {rec.get('recall@10', '?')}; built in {h['build_s']} s"))
    if "link" in r:
        lk = r["link"]
        out += ["", f"## New mentions linked against the flat index (first {lk['n']} test mentions)", "",
                "| path | H@1 | H@3 | H@5 | H@10 | H@20 | MRR | note |", "|---|---:|---:|---:|---:|---:|---:|---|",
                _row("cached mention vectors", lk["same_mentions_cached"], ""),
                _row("`Linker(index=...)`, text encoded again", lk,
                     f"{lk['mentions_per_s']} mentions/s; top-1 agrees with the cached vectors' on "
                     f"{100 * lk['top1_agrees_with_cached']:.2f}%")]
    if r.get("distractors"):
        out += ["", "## The KB grown with synthetic distractors (`dim-mel index --add`, flat, exact)", "",
                "Distractors are **synthetic** (module docstring): a name from two real names' words, a real "
                "entity's description.", "",
                "| distractors added | KB entities | H@1 | H@10 | MRR@100 | add: s (entities/s) | search s |",
                "|---:|---:|---:|---:|---:|---|---:|"]
        for d in r["distractors"]:
            add = f"{d['add_s']} ({d['entities_per_s']})" if "add_s" in d else "–"
            out.append(f"| {d['added']:,} | {d['kb_entities']:,} | {d['hits@1']:.2f} | {d['hits@10']:.2f} | "
                       f"{d['mrr@100']:.2f} | {add} | {d.get('search_s', '–')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
