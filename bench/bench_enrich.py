"""Throughput and per-request overhead of the enrichment client against the local fake server.

The fake OpenAI-compatible server (tests/fake_openai_server.py) runs in a separate process and answers
instantly, so the numbers measure our side: the ``openai`` client, HTTP on loopback, answer validation and
the fsync'ed cache write per answer.

    python bench/bench_enrich.py [--requests 200] [--concurrency 1 4 16 64] [--out bench/results]

Two modes per concurrency: ``client`` (LLMClient.complete only) and ``pipeline`` (run_items: request +
JsonlCache.put with fsync + parse). Writes enrich_bench.json and enrich_bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from data_process.augment.enrich import make_item, run_items
from data_process.augment.llm_client import LLMClient, LLMConfig
from data_process.augment.llm_prompts import PromptTemplate
from data_process.core.durable_io import JsonlCache, atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "fake_openai_server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"fake server did not start (printed {url!r})")
    return proc, url


def items_for(n: int, tag: str):
    tpl = PromptTemplate.load(REPO_ROOT / "configs" / "prompts" / "mention_v1.txt")
    return [make_item("mention", f"{tag}-{i}", "bench-model", tpl,
                      {"sentence": f"Run {tag}: Person {i} scored twice for the club on Sunday.",
                       "mention": f"Person {i}"}) for i in range(n)]


async def bench_client(cfg: LLMConfig, n: int, concurrency: int) -> dict:
    items = items_for(n, f"client-c{concurrency}")
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with LLMClient(cfg) as client:
        await client.complete(items[0].messages)  # warm the connection pool

        async def one(it):
            async with sem:
                t = time.perf_counter()
                await client.complete(it.messages)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(it) for it in items))
        wall = time.perf_counter() - t0
    return _row("client", concurrency, n, wall, lat)


async def bench_pipeline(cfg: LLMConfig, n: int, concurrency: int, tmp: Path) -> dict:
    items = items_for(n, f"pipe-c{concurrency}")
    with JsonlCache(tmp / f"cache-c{concurrency}.jsonl") as cache:
        async with LLMClient(cfg) as client:
            await client.complete(items_for(1, "warm")[0].messages)
            t0 = time.perf_counter()
            stats = await run_items(items, client, cache, model=cfg.model, concurrency=concurrency,
                                    answer_retries=0, retry_failed=False, progress=False)
            wall = time.perf_counter() - t0
    assert stats.done == n, stats
    return _row("pipeline", concurrency, n, wall, None)


def _row(mode: str, c: int, n: int, wall: float, lat: list[float] | None) -> dict:
    row = {"mode": mode, "concurrency": c, "requests": n, "wall_s": round(wall, 3),
           "requests_per_s": round(n / wall, 1), "wall_ms_per_request": round(1000 * wall / n, 2)}
    if lat:
        lat = sorted(lat)
        row["latency_ms_p50"] = round(1000 * statistics.median(lat), 2)
        row["latency_ms_p95"] = round(1000 * lat[int(0.95 * (len(lat) - 1))], 2)
    return row


def machine_info() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "openai": openai.__version__, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "processor": platform.processor() or platform.machine()}


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Enrichment client benchmark", "",
             f"Fake OpenAI-compatible server in a separate process on 127.0.0.1, instant answers; "
             f"{result['requests']} requests per row. Machine: {m['cpu_count']} CPUs, {m['platform']}, "
             f"Python {m['python']}, openai {m['openai']}, load average at start {m['loadavg_at_start']} "
             "(the machine is shared; numbers are indicative).", "",
             "`client`: LLMClient.complete only. `pipeline`: run_items = request + fsync'ed cache write + "
             "validation. `ms/request` = wall time / requests (the per-request overhead at concurrency 1).", "",
             "| mode | concurrency | requests/s | ms/request | p50 latency ms | p95 latency ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests_per_s']} | {r['wall_ms_per_request']} | "
                     f"{r.get('latency_ms_p50', '')} | {r.get('latency_ms_p95', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args()
    proc, url = start_server()
    rows = []
    try:
        cfg = LLMConfig(model="bench-model", base_url=url, api_key="sk-bench", timeout_s=30, max_retries=2)
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.concurrency:
                for row in (asyncio.run(bench_client(cfg, args.requests, c)),
                            asyncio.run(bench_pipeline(cfg, args.requests, c, Path(tmp)))):
                    rows.append(row)
                    print(row, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    result = {"benchmark": "enrich", "requests": args.requests, "machine": machine_info(), "rows": rows,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(args.out / "enrich_bench.json", result)
    atomic_write_text(args.out / "enrich_bench.md", to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
