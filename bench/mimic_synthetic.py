r"""MIMIC with and without its image units on the synthetic demo data (images carry the signal), beside our default.

::

    python bench/mimic_synthetic.py --work outputs/mimic_synthetic [--seeds 0 1 2] [--epochs 30] [--threads 1]

1. ``data``: the demo's dataset and encoder, as ``scripts/demo.sh`` makes them (``python -m
   data_process.fixtures.synthetic --seed 0``: 240 entities in families sharing one name, 1,800 mentions whose
   image is a noisy variant of the gold's picture; ``python -m data_process.fixtures.tiny_models``: a tiny random
   CLIP), without the demo's captions (a tiny random BLIP-2's; MIMIC reads none). The feature cache holds the nine
   default views and MIMIC's ``entity.desc_tokens`` and ``entity.regions`` (sentence and entity tokens: 32, the
   demo's length; regions: the 3x3 patch grid).
2. ``train``, for each seed: our default (``configs/synthetic.yaml``, the demo's model) and its text-only ablation
   (the demo's), and MIMIC (``configs/mimic.yaml``) with all three units, with its text unit only (``--no-use-image-
   unit --no-use-fusion-unit``), untrained (``--epochs 0``) and at the official learning rate. Every trained run
   has the same number of epochs (the demo's 30); MIMIC's rows but the official one at lr 1e-3 (the official 1e-5
   fine-tunes CLIP with the matcher; on frozen features, 10 steps an epoch, it barely moves: the official row shows
   it), batch 128, dev selection over the whole KB (the official one).
3. ``report``: test split, whole KB (240 entities, pessimistic ties) and the 10 candidates (DIM's rule, strict),
   mean ± sample std over the seeds: ``bench/results/mimic_synthetic.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nel_model.runs import cpu_model
# bench/ is the script's folder: on sys.path
from mimic_wikimel import train_run
from wikimel_ghmfc import aggregate, run_metrics, tables

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("mention.mention", "mention.sentence", "mention.context", "mention.image", "mention.regions",
         "mention.profile", "entity.desc", "entity.desc_tokens", "entity.image", "entity.profile", "entity.regions")
MIMIC = ["--lr", "1e-3"]
RUNS = {   # key: (row, config, flags)
    "ours": ("ours (default: text + image)", "synthetic.yaml", []),
    "ours_text": ("ours, text only (--no-image --no-caption --no-entity-image)", "synthetic.yaml",
                  ["--no-image", "--no-caption", "--no-entity-image"]),
    "mimic": ("MIMIC, all units (text, image, fusion)", "mimic.yaml", MIMIC),
    "mimic_text": ("MIMIC, text unit only (--no-use-image-unit --no-use-fusion-unit)", "mimic.yaml",
                   [*MIMIC, "--no-use-image-unit", "--no-use-fusion-unit"]),
    "mimic_official_lr": ("MIMIC, all units, official lr 1e-5", "mimic.yaml", []),
    "mimic_untrained": ("MIMIC, all units, untrained (--epochs 0)", "mimic.yaml", ["--epochs", "0"]),
}


def build(work: Path, threads: int) -> Path:
    """The demo's dataset and tiny CLIP, and the feature cache (module docstring, step 1)."""
    from data_process.encode import features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    data, clip = work / "data", work / "models" / "clip"
    if not (data / "dataset.json").is_file():
        generate(data, SyntheticConfig(seed=0), progress=False)
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip, seed=0, image_size=64)
    feats = work / "features"
    rc = features.main(["--data", str(data), "--out", str(feats), "--clip", str(clip), "--max_len", "32",
                        "--desc_max_len", "32", "--num_workers", "0", "--threads", str(threads), "--device", "cpu",
                        "--views", ",".join(VIEWS)])
    if rc:
        raise RuntimeError(f"feature step failed with exit status {rc}")
    return feats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every trained run (the demo's 30)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results_dir", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.time()
    feats = build(a.work, a.threads)
    runs = {key: [train_run(feats, a.work / "runs" / f"{key}_s{s}", RUNS[key][1], RUNS[key][2], s, a.epochs,
                            a.threads) for s in a.seeds] for key in RUNS}
    agg = {key: aggregate([run_metrics(r) for r in rs]) for key, rs in runs.items()}
    full_md, cand_md = tables([(RUNS[k][0] + f", {len(a.seeds)} seeds", agg[k]) for k in RUNS])
    result = {
        "command": "python bench/mimic_synthetic.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_start": load_start,
                    "python": platform.python_version(), "torch": torch.__version__, "threads": a.threads},
        "seeds": a.seeds, "epochs": a.epochs, "views": list(VIEWS), "rows": {k: v[0] for k, v in RUNS.items()},
        "runs": {k: [{f: r.get(f) for f in ("seed", "best_epoch", "epochs_run", "command", "time_s", "epoch_seconds")}
                     for r in rs] for k, rs in runs.items()},
        "aggregate": agg, "table_full_md": full_md, "table_candidates_md": cand_md,
        "reused_runs": sum(bool(r.get("reused")) for rs in runs.values() for r in rs),
        "time_s": round(time.time() - t0, 1),
    }
    write_report(result, a.results_dir)
    print(full_md + "\n" + cand_md)
    return 0


def write_report(result: dict[str, Any], results_dir: Path) -> None:
    from data_process.core.durable_io import atomic_write_json, atomic_write_text

    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results_dir / "mimic_synthetic.json", result)
    m = result["machine"]
    md = ["# MIMIC on the synthetic demo data (images carry the signal), with and without its image units", "",
          f"Command: `{result['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average {m['load_avg_start']} at the start), no GPU; "
          f"torch {m['torch']}, {m['threads']} thread(s).  ",
          "Data: the demo's synthetic dataset (seed 0: 240 entities, 1,800 mentions; a mention's image is a noisy "
          "variant of its gold entity's picture, its sentence names the family the gold shares with its namesakes) "
          "and tiny random CLIP (`bench/mimic_synthetic.py`, step 1), no captions.  ",
          f"Budget: {result['epochs']} epochs for every trained run (the demo's); MIMIC at lr 1e-3 but the official-lr "
          "row, batch 128, dev selection over the whole KB.  ",
          "Runs: `" + "`, `".join(f"{k}_s<seed>" for k in result["rows"]) + "` (a run folder with results.json is "
          "reused).  ",
          "Protocol: test split; whole KB (240 entities), pessimistic ties (and strict); the 10 candidates with DIM's "
          "rule, strict ties. Scores in float32. Mean ± sample std over seeds "
          + ", ".join(map(str, result["seeds"])) + ".", "",
          "## Whole KB (percent)", "", result["table_full_md"], "",
          "## Candidates (percent; Top-k = Hits@k)", "", result["table_candidates_md"], "",
          "## Time", "", "| run | training s/epoch (mean over epochs and seeds) | best epochs |", "|---|---|---|"]
    for key, row in result["rows"].items():
        secs = [r["epoch_seconds"]["train_s"] for r in result["runs"][key] if r.get("epoch_seconds")]
        md.append(f"| {row} | {sum(secs) / len(secs):.2f} | " if secs else f"| {row} | – | ")
        md[-1] += ", ".join(str(r["best_epoch"]) for r in result["runs"][key]) + " |"
    md += ["", f"This invocation: {result['time_s']} s (runs with a results.json reused: "
           f"{result['reused_runs']} of {sum(len(v) for v in result['runs'].values())})."]
    atomic_write_text(results_dir / "mimic_synthetic.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
