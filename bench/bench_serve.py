"""Load on ``dim-mel serve``: N concurrent clients on 127.0.0.1, throughput, latency, errors, the server's memory.

    python bench/bench_serve.py --case demo --run OUT/runs/full --dataset OUT/data [--limit 200] [--rerank RUN] \
        [--clients 1,4,16] [--requests 320] [--mentions-per-request 1] [--threads 1] [--batch-wait-ms 5] \
        [--max-batch 64] [--out bench/results/serve_cpu]

The mentions: the first ``--limit`` of the unified dataset's ``--split`` (default test), written as ``link``'s input
(``bench_link.write_input``: id, sentence, mention, gold id, the image copied beside the file). The server is
started as a user starts it (``python -m nel_model.inference.serve --port 0``: a free port on the loopback address;
images named inside the input file's folder, ``--image-root``), and polled until ``/health`` is
200. Each level of N clients sends ``--requests`` requests in all (N threads, each with its own keep-alive HTTP
connection, one request after the other), each of ``--mentions-per-request`` mentions taken in turn from the input
(``top_k`` 10); a request's latency is from sending to the parsed answer. Reported per level: throughput (mentions
and requests per second, the level's wall time), latency p50/p95/p99, errors (any answer but 200, or a failed
connection), the mean batch the model worker linked (``/info`` stats), and the server's resident memory (VmRSS)
after each level beside its value once ready and after 16 untimed warm-up requests (sent before the levels).

Beside it, the throughput ``dim-mel link`` reaches on the same mentions once loaded (``bench_link.THROUGHPUT``:
``link_file`` of every input mention, in one process, one torch thread): the batch throughput the server should
approach under load. ``--case NAME`` names the measurement; the results file keeps the other cases it already holds
(``serve_cpu.json``), and the Markdown is written from it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_link import THROUGHPUT, write_input
from nel_model.inference.serve import BATCH_WAIT_MS, MAX_BATCH
from nel_model.runs import cpu_model

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A ``dim-mel serve`` process on a free loopback port."""

    def __init__(self, a, log: Path):
        cmd = [sys.executable, "-m", "nel_model.inference.serve", "--run", str(a.run), "--port", "0",
               "--image-root", str(a.input.resolve().parent), "--threads", str(a.threads), "--batch-wait-ms",
               str(a.batch_wait_ms), "--max-batch", str(a.max_batch), "--max-mentions", "1024"]
        if a.rerank is not None:
            cmd += ["--rerank", str(a.rerank)]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        self.log = log
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        self.port = self._port()
        while self.call("GET", "/health")[0] != 200:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0

    def _port(self) -> int:
        for _ in range(6000):
            for line in self.log.read_text().splitlines():
                if line.startswith("dim-mel serve: listening on http://127.0.0.1:"):
                    return int(line.split(":")[3].split()[0])
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise SystemExit("the server did not open its port")

    def call(self, method: str, path: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no VmRSS")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def client(port: int, bodies: list[bytes], latencies: list[float], errors: list[str]) -> None:
    """One client: its requests one after the other on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for body in bodies:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/link", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                errors.append(f"{resp.status}: {answer[:200]!r}")
            else:
                json.loads(answer)
                latencies.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.close()


def level(srv: Server, objs: list[dict], n_clients: int, requests: int, per_request: int) -> dict:
    """``requests`` requests from ``n_clients`` concurrent clients."""
    bodies = [json.dumps({"mentions": [objs[(i * per_request + j) % len(objs)] for j in range(per_request)],
                          "top_k": 10}).encode() for i in range(requests)]
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[str] = []
    _, before = srv.call("GET", "/info")
    load = [os.getloadavg()[0]]
    threads = [threading.Thread(target=client, args=(srv.port, bodies[c::n_clients], latencies[c], errors))
               for c in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    _, after = srv.call("GET", "/info")
    lat = sorted(x for part in latencies for x in part)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    batches = after["stats"]["batches"] - before["stats"]["batches"]
    return {"clients": n_clients, "requests": requests, "mentions_per_request": per_request, "seconds": wall,
            "mentions_per_s": requests * per_request / wall, "requests_per_s": requests / wall,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "errors": len(errors),
            "first_errors": errors[:3], "mean_batch": (after["stats"]["mentions"] - before["stats"]["mentions"])
            / max(1, batches), "rss_mib": srv.rss_mib(), "load_1min": load}


def link_throughput(a) -> float:
    """Mentions per second of ``link_file`` over the input, loaded once (``bench_link.THROUGHPUT``)."""
    out = a.work / "link_throughput.jsonl"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    proc = subprocess.run([sys.executable, "-c", THROUGHPUT, str(a.run), str(a.input), str(out),
                           str(a.rerank or ""), "16", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("THROUGHPUT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"link throughput failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("THROUGHPUT "):])
    return r["mentions"] / r["seconds"]


def markdown(results: dict) -> list[str]:
    lines = ["# `dim-mel serve` under load (CPU)", "",
             "Measured by `python bench/bench_serve.py` (its docstring: the protocol); each case's command line is "
             "given below its table. Traffic only to 127.0.0.1; top_k 10; float32 scores; errors must be 0; "
             "memory is the server process's VmRSS.", ""]
    for name, c in results.items():
        e = c["env"]
        lines += [f"## {name}", "", f"{c['description']}. {e['cpu']} ({e['cpus']} cores, shared), {e['date']}; "
                  f"server `--threads {c['settings']['threads']} --batch-wait-ms {c['settings']['batch_wait_ms']} "
                  f"--max-batch {c['settings']['max_batch']}`; ready {c['ready_s']:.1f} s after start; RSS once "
                  f"ready {c['rss_ready_mib']:.0f} MiB, after the warm-up requests {c['rss_start_mib']:.0f} MiB. "
                  f"`dim-mel link` on the same {c['input_mentions']} mentions, "
                  f"loaded once: **{c['link_mentions_per_s']:.1f} mentions/s** (one process, the same threads).", "",
                  "| clients | requests x mentions | mentions/s | requests/s | p50 (ms) | p95 (ms) | p99 (ms) | "
                  "errors | mean batch | RSS after (MiB) | load avg (1 min) before, after |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in c["levels"]:
            lines.append(f"| {r['clients']} | {r['requests']} x {r['mentions_per_request']} | "
                         f"{r['mentions_per_s']:.1f} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | "
                         f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['mean_batch']:.1f} | "
                         f"{r['rss_mib']:.0f} | {', '.join(f'{x:.2f}' for x in r['load_1min'])} |")
        lines += ["", f"Command: `{c['command']}`; server exit status after SIGTERM: {c['exit_status']}.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", required=True, help="the measurement's name (a section of the results)")
    p.add_argument("--description", default="", help="what the run and the mentions are")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--rerank", type=Path)
    p.add_argument("--dataset", required=True, type=Path, help="a unified dataset folder: its mentions are sent")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=200, help="the first N mentions of the split")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=320, help="requests per level")
    p.add_argument("--mentions-per-request", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS, help="the server's flag (its default)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="the server's flag (its default)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_serve"))
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_cpu"), help="writes OUT.json and OUT.md")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.input = write_input(a.dataset, a.work / f"input_{a.case}", a.limit, a.split)
    objs = [json.loads(x) for x in a.input.read_text().splitlines() if x.strip()]
    link_rate = link_throughput(a)
    print(f"link: {link_rate:.1f} mentions/s", file=sys.stderr)
    srv = Server(a, a.work / f"server_{a.case}.log")
    try:
        rss_ready = srv.rss_mib()
        level(srv, objs, 4, 16, a.mentions_per_request)                                  # warm-up, untimed
        rss_start = srv.rss_mib()
        levels = []
        for n in [int(x) for x in a.clients.split(",")]:
            levels.append(level(srv, objs, n, a.requests, a.mentions_per_request))
            print(json.dumps(levels[-1]), file=sys.stderr)
    finally:
        status = srv.stop()
    env = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    case = {"description": a.description or a.case, "env": env, "command": shlex.join(["python", *sys.argv]),
            "settings": {"threads": a.threads, "batch_wait_ms": a.batch_wait_ms, "max_batch": a.max_batch},
            "input_mentions": len(objs), "ready_s": srv.ready_s, "rss_ready_mib": rss_ready,
            "rss_start_mib": rss_start,
            "link_mentions_per_s": link_rate, "levels": levels, "exit_status": status}
    path = a.out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results[a.case] = case
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    lines = markdown(results)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["errors"] == 0 for r in levels) and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
