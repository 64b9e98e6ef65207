"""Wall time and throughput of ``dim-mel link`` on the demo's runs, two checkouts interleaved (before, after, ...).

    python bench/bench_link.py --demo OUT --before /path/to/checkout_2625a34 --after . \
        [--sizes 20,200] [--repeats 2] [--out bench/results/link_cpu.md]
    python bench/bench_link.py --demo OUT --run RUN --data DATASET --rerank-run none --title T ... (another run)
    python bench/bench_link.py --demo OUT --before ... --after . --counts [--out bench/results/link_counts_cpu.md]

``OUT`` is a finished ``scripts/demo.sh`` output folder (``OUT=... SEED=0``: ``runs/full`` the retriever,
``runs/two_stage`` the feature re-ranker trained on it). Each measurement is one ``python -m
nel_model.inference.linker`` process (model loading, KB embeddings, encoders, linking, writing: what a user waits
for) on the first N test mentions of the demo's dataset (with their images, copied beside the input), into a fresh
output file, with and without ``--rerank``, ``--top-k 10``, one torch thread (``OMP_NUM_THREADS=1``). The two
checkouts run alternately, so a load change on a shared machine hits both; each pair is preceded by one untimed
call of each (the page cache; a checkout that saves the KB embeddings in the run folder saves them then). The
report names the CPU and the load average around every measurement, and how often the two checkouts' linked
entities agree (the same ids in the same order). **Throughput** (mentions/s): in one process per measurement,
the linker loaded and warmed up on 16 mentions first (untimed), then ``linker.link_file`` of the N mentions timed
(encoding, scoring, re-ranking, writing: what ``link`` does per mention once loaded), the two checkouts
alternating; beside it the **encoders alone** (the after checkout's encoders on the same mentions, batched as the
feature step batches them, no model or scoring: the limit ``link``'s throughput approaches). **Order**: per checkout, the same N mentions linked again in reverse order with ``--batch-size 7``
(other batches, other neighbours): how many mentions get the same entities and the same scores (6 decimals) as
in the forward run. ``--counts``: instead of timing, one ``link --rerank`` of the first
N mentions per checkout with ``torch.load`` and ``DIM.encode_entities`` counted (checkpoint files loaded, KB rows
encoded), the same instrumentation for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nel_model.runs import cpu_model


def write_input(data: Path, folder: Path, n: int, split: str = "test") -> Path:
    """The first ``n`` mentions of a unified dataset's ``split`` as a unified-format JSONL, images copied beside it."""
    rows = [json.loads(x) for x in (data / "mentions.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == split][:n]
    if len(test) < n:
        raise SystemExit(f"{data}: only {len(test)} {split} mentions, {n} asked")
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in test:
        rec = {k: r[k] for k in ("id", "sentence", "mention", "gold_id")}
        if r.get("image"):
            name = Path(r["image"]).name
            shutil.copy(data / r["image"], folder / "imgs" / name)
            rec["image"] = f"imgs/{name}"
        lines.append(json.dumps(rec))
    path = folder / "mentions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def link(code: Path, run: Path, inp: Path, out: Path, rerank: Path | None) -> float:
    """Seconds of one ``dim-mel link`` process of the checkout ``code``."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nel_model.inference.linker", "--run", str(run), "--input",
           str(inp), "--out", str(out), "--top-k", "10", "--no-progress", "--device", "cpu"]
    if rerank is not None:
        cmd += ["--rerank", str(rerank)]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{code}: dim-mel link failed:\n{proc.stderr[-3000:]}")
    return seconds


THROUGHPUT = """
import json, sys, time, torch
from pathlib import Path
from nel_model.inference.linker import Linker, link_file, read_mentions
torch.set_num_threads(1)
run, inp, out, rerank, batch, reverse = sys.argv[1:7]
linker = Linker.from_run(run, rerank or None)
mentions = list(read_mentions(inp))
warm = Path(out + ".warm")
warm.unlink(missing_ok=True)
link_file(linker, mentions[:16], warm, 10, 16, progress=False)
if reverse == "1":
    mentions = mentions[::-1]
t0 = time.perf_counter()
link_file(linker, mentions, Path(out), 10, int(batch), progress=False)
print("THROUGHPUT " + json.dumps({"mentions": len(mentions), "seconds": time.perf_counter() - t0}), file=sys.stderr)
"""


ENCODERS = """
import json, sys, time, torch
import nel_model.loaded_run as LR
from nel_model.inference.linker import Linker, read_mentions
torch.set_num_threads(1)
run, inp = sys.argv[1:3]
r = Linker.from_run(run).retriever
queries = [m.query for m in read_mentions(inp)]
LR.MENTION_SHAPES = None   # the feature step's batching: texts sorted by length, 64 a batch, padded to the longest
r.query_views(queries[:16])
t0 = time.perf_counter()
r.query_views(queries)
print("ENCODERS " + json.dumps({"mentions": len(queries), "seconds": time.perf_counter() - t0}), file=sys.stderr)
"""


def encoders_rate(code: Path, run: Path, inp: Path) -> float:
    """Mentions per second of the run's encoders alone on the N mentions, batched as the feature step batches
    them (the views a mention needs, no model, no scoring): the limit of ``link``'s throughput."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", ENCODERS, str(run), str(inp)], cwd=code, env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("ENCODERS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{code}: encoders' throughput failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("ENCODERS "):])
    return r["mentions"] / r["seconds"]


def throughput(code: Path, run: Path, inp: Path, out: Path, rerank: Path | None, reverse: bool = False,
               batch: int = 16) -> float:
    """Mentions per second of ``link_file`` in one process of the checkout ``code`` (loaded and warmed up first)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", THROUGHPUT, str(run), str(inp), str(out), str(rerank or ""), str(batch),
           "1" if reverse else "0"]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("THROUGHPUT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{code}: link throughput failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("THROUGHPUT "):])
    return r["mentions"] / r["seconds"]


def order_agreement(forward: Path, backward: Path) -> tuple[int, int]:
    """Mentions with the same entities, and with the same entities and scores, in two outputs (matched by id)."""
    a = {r["id"]: r["entities"] for r in map(json.loads, forward.read_text().splitlines())}
    b = {r["id"]: r["entities"] for r in map(json.loads, backward.read_text().splitlines())}
    ids = [i for i in a if i in b]
    same = sum([e["entity_id"] for e in a[i]] == [e["entity_id"] for e in b[i]] for i in ids)
    exact = sum([(e["entity_id"], e["score"]) for e in a[i]] == [(e["entity_id"], e["score"]) for e in b[i]]
                for i in ids)
    return same, exact


COUNTING = """
import collections, json, runpy, sys, torch
from nel_model.nel import DIM
loads, rows = collections.Counter(), [0]
real_load, real_encode = torch.load, DIM.encode_entities
def load(f, *a, **kw):
    if str(f).endswith(".pt"):
        loads[str(f)] += 1
    return real_load(f, *a, **kw)
def encode(self, views, normalize=True):
    rows[0] += len(next(iter(views.values())))
    return real_encode(self, views, normalize)
torch.load, DIM.encode_entities = load, encode
sys.argv = ["dim-mel link", *sys.argv[1:]]
try:
    runpy.run_module("nel_model.inference.linker", run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
print("COUNTS " + json.dumps({"loads": dict(loads), "kb_rows": rows[0]}), file=sys.stderr)
"""


def counted_link(code: Path, demo: Path, inp: Path, out: Path) -> dict:
    """Checkpoint files loaded and KB rows encoded by one ``dim-mel link --rerank`` of the checkout ``code``."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", COUNTING, "--run", str(demo / "runs" / "full"), "--rerank",
           str(demo / "runs" / "two_stage"), "--input", str(inp), "--out", str(out), "--top-k", "10", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("COUNTS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{code}: counted dim-mel link failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("COUNTS "):])


def counts_report(a, codes: dict[str, Path]) -> list[str]:
    n = int(a.sizes.split(",")[0])
    inp = write_input(a.demo / "data", a.work / f"in_{n}", n)
    kb = len(json.loads((a.demo / "runs" / "full" / "entity_ids.json").read_text()))
    lines = ["# `dim-mel link --rerank`: checkpoint loads and KB encodings, before and after", "",
             f"Measured by `python bench/bench_link.py --demo {a.demo} --before {a.before} --after {a.after} --counts "
             f"--sizes {n}`: one `link --rerank` of {n} demo test mentions per checkout, `torch.load` and "
             f"`DIM.encode_entities` counted in the process (the demo's KB: {kb} entities; `runs/full` as the demo "
             "and the untimed calls of the timing left it).", "",
             "| checkout | checkpoint files loaded (times each) | KB rows encoded |", "|---|---|---:|"]
    saved = a.demo / "runs" / "full" / "entity_embeddings.json"
    for name, code in [*codes.items(), ("after, the run's saved KB embeddings removed first", codes["after"])]:
        if name.startswith("after, "):
            saved.unlink(missing_ok=True)             # the run encodes its KB once and saves it again
        c = counted_link(code, a.demo, inp, a.work / "counted.jsonl")
        files = ", ".join(f"`{Path(f).parent.parent.name}/{Path(f).name}` x{k}" for f, k in sorted(c["loads"].items()))
        lines.append(f"| {name} | {files} | {c['kb_rows']} |")
    return lines


def ranked(path: Path) -> list[list[str]]:
    return [[e["entity_id"] for e in json.loads(x)["entities"]] for x in path.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="a finished scripts/demo.sh output folder")
    p.add_argument("--run", type=Path, help="the retriever run (default: DEMO/runs/full)")
    p.add_argument("--rerank-run", help="the re-ranker run (default: DEMO/runs/two_stage; 'none': no re-ranker rows)")
    p.add_argument("--data", type=Path, help="the dataset whose test mentions are linked (default: DEMO/data)")
    p.add_argument("--title", default="the demo's runs", help="what the report's title names")
    p.add_argument("--before", required=True, type=Path, help="checkout of the baseline (e.g. 9029ebd)")
    p.add_argument("--after", required=True, type=Path, help="checkout measured against it")
    p.add_argument("--sizes", default="20,200")
    p.add_argument("--repeats", type=int, default=2, help="timed (before, after) pairs per case")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_link"))
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/link_cpu.md (--counts: bench/results/link_counts_cpu.md)")
    p.add_argument("--counts", action="store_true", help="count checkpoint loads and KB encodings instead of timing")
    a = p.parse_args(argv)
    a.run = a.run or a.demo / "runs" / "full"
    a.rerank_run = (None if a.rerank_run == "none" else
                    Path(a.rerank_run) if a.rerank_run else a.demo / "runs" / "two_stage")
    a.data = a.data or a.demo / "data"
    codes = {"before": a.before.resolve(), "after": a.after.resolve()}
    if a.counts:
        out = a.out or Path("bench/results/link_counts_cpu.md")
        lines = counts_report(a, codes)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    a.out = a.out or Path("bench/results/link_cpu.md")
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        inp = write_input(a.data, a.work / f"in_{n}", n)
        for rerank in (False, True) if a.rerank_run is not None else (False,):
            rows.append(measure(a, codes, inp, n, rerank))
            print(json.dumps(rows[-1]), file=sys.stderr)
    env = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "before": str(codes["before"]), "after": str(codes["after"]), "run": str(a.run.resolve()),
           "rerank_run": None if a.rerank_run is None else str(a.rerank_run.resolve()), "data": str(a.data.resolve()),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    lines = report(a, env, rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def measure(a, codes: dict[str, Path], inp: Path, n: int, rerank: bool) -> dict:
    """One case (N mentions, with or without the re-ranker): wall times, throughputs, agreement, load."""
    outs = {name: a.work / f"out_{name}_{n}_{int(rerank)}.jsonl" for name in codes}
    rr = a.rerank_run if rerank else None
    for name, code in codes.items():                      # untimed: page cache, saved KB embeddings
        link(code, a.run, inp, outs[name], rr)
    times: dict[str, list[float]] = {name: [] for name in codes}
    rates: dict[str, list[float]] = {name: [] for name in codes}
    loads: list[float] = []
    for _ in range(a.repeats):
        for name, code in codes.items():                  # interleaved: before, after, before, after
            loads.append(os.getloadavg()[0])
            times[name].append(link(code, a.run, inp, outs[name], rr))
            rates[name].append(throughput(code, a.run, inp, outs[name].with_suffix(".tp.jsonl"), rr))
    same = sum(x == y for x, y in zip(ranked(outs["before"]), ranked(outs["after"])))
    order = {}
    for name, code in codes.items():
        back = outs[name].with_suffix(".reverse.jsonl")
        throughput(code, a.run, inp, back, rr, reverse=True, batch=7)
        order[name] = list(order_agreement(outs[name], back))
    return {"mentions": n, "rerank": rerank, "before_s": times["before"], "after_s": times["after"],
            "before_mentions_per_s": rates["before"], "after_mentions_per_s": rates["after"], "load_1min": loads,
            "same_entities": f"{same}/{n}", "reverse_order_same_entities_and_scores": order,
            "encoders_mentions_per_s": encoders_rate(codes["after"], a.run, inp)}


def report(a, env: dict, rows: list[dict]) -> list[str]:
    def wall(r: dict) -> list[str]:
        b, f = statistics.median(r["before_s"]), statistics.median(r["after_s"])
        return [str(r["mentions"]), rr_name(r), joined(r["before_s"], 2), joined(r["after_s"], 2), f"{b / f:.2f}x",
                joined(r["load_1min"], 2), r["same_entities"]]

    def rate(r: dict) -> list[str]:
        b, f = statistics.median(r["before_mentions_per_s"]), statistics.median(r["after_mentions_per_s"])
        order = r["reverse_order_same_entities_and_scores"]
        enc = r.get("encoders_mentions_per_s")
        return [str(r["mentions"]), rr_name(r), joined(r["before_mentions_per_s"], 1),
                joined(r["after_mentions_per_s"], 1), f"{f / b:.2f}x", "" if enc is None else f"{enc:.1f}",
                *(f"{order[c][0]}/{order[c][1]}/{r['mentions']}" for c in ("before", "after"))]

    lines = [f"# `dim-mel link` on {a.title}: before and after (CPU)", "",
             f"Measured by `{shlex.join(['python', *sys.argv])}` on {env['cpu']} ({env['cpus']} cores, shared), "
             f"{env['date']}; `--top-k 10`, one torch thread, float32 scores; the two checkouts alternate "
             "(before, after, before, after) after one untimed call of each.", "",
             "**Wall time**: one `python -m nel_model.inference.linker` process per measurement (loading, KB "
             "embeddings, encoders, linking, writing).", "",
             "| mentions | re-ranker | before (s) | after (s) | median before / after | load avg (1 min) during | "
             "same linked entities |", "|---:|---|---|---|---:|---|---:|"]
    lines += ["| " + " | ".join(wall(r)) + " |" for r in rows]
    lines += ["", "**Throughput** (mentions/s, the linker loaded and warmed up, then `link_file` of the N mentions "
              "timed in the process), beside the **encoders alone** (after's encoders on the same mentions, batched "
              "as the feature step batches them: texts sorted by length, 64 a batch, padded to the longest; no model, "
              "no scoring: the limit), and **order** (the N mentions linked again in reverse order, `--batch-size "
              "7`: mentions with the same entities / the same entities and scores as the forward run).", "",
              "| mentions | re-ranker | before (mentions/s) | after (mentions/s) | median after / before | "
              "encoders alone (mentions/s) | reverse order, before | reverse order, after |",
              "|---:|---|---|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(rate(r)) + " |" for r in rows]
    lines += ["", f"before: `{env['before']}`; after: `{env['after']}`; run: `{env['run']}`; re-ranker: "
              f"`{env['rerank_run']}`; mentions: the first N of `{env['data']}`'s test split."]
    return lines


def joined(xs: list[float], digits: int) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def rr_name(r: dict) -> str:
    return "feature (`--rerank`)" if r["rerank"] else "none"


if __name__ == "__main__":
    sys.exit(main())
