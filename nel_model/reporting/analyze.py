"""Error analysis of a trained run from its per-mention predictions (``RUN/predictions/<split>.jsonl``).

    python -m nel_model.reporting.analyze --run RUN [--compare RUN2] [--split test] [--protocol full_kb]
        [--tie_rule RULE] [--dataset DIR] [--top_confusions 15] [--out PREFIX]

Metrics (MRR, Hits@k; ``nel_model.evaluation.metrics`` under the chosen tie rule) broken down by

* **name sharing**: how many KB entities have the mention's surface string as their ``name`` (both compared after
  whitespace normalisation and Unicode case folding: ``" ".join(s.split()).casefold()``): 0, 1, 2–5, 6+, and 2+;
* **what the mention has** in the unified dataset: an image, a caption, an enrichment (each yes / no);
* **gold frequency in train**: whether the gold entity is the gold of any train mention (seen / unseen);

and the hardest confusions: (gold, predicted) pairs, most frequent first, where the predicted entity is the
best-scoring entity other than the gold of a mention whose rank (under the tie rule) is not 1. With ``--compare``
the same breakdowns show both runs side by side and how many mentions each ranks better. Writes PREFIX.md,
PREFIX.json and PREFIX.png (MRR per bucket, one bar per run); PREFIX defaults to ``RUN/analysis`` (``RUN/analysis_vs_
<RUN2 folder name>`` with ``--compare``). The mention attributes come from the run's unified dataset
(``config.json`` "dataset_resolved", or ``--dataset``). See docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from data_process.core.durable_io import atomic_write_json, atomic_write_text
from data_process.core.records import DataError, Dataset, Mention, load_dataset
from nel_model.evaluation.metrics import TIE_RULES, RankCounts, metrics_from_counts
from nel_model.reporting.plots import DPI, run_name, save_figure
from nel_model.runs import PROTOCOLS, Predictions, Run, RunError, load_predictions, load_run

SHOWN_METRICS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10")
METRIC_NAMES = {"mrr": "MRR", "hits@1": "H@1", "hits@3": "H@3", "hits@5": "H@5", "hits@10": "H@10"}
NAME_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2–5", 2, 5), ("6+", 6, math.inf), ("2+", 2, math.inf))
BREAKDOWNS = {  # key -> (heading, plot panel title)
    "name_shared": ("By how many KB entities share the mention's name", "KB entities sharing the mention's name"),
    "mention_has": ("By what the mention has", "What the mention has"),
    "gold_in_train": ("By whether the gold entity is the gold of a train mention", "Gold entity in train"),
}
PLOT_SIZE = (13.0, 4.5)  # inches -> 1300 x 450 px


def normalise_name(text: str) -> str:
    """The form in which mention strings and entity names are compared."""
    return " ".join(text.split()).casefold()


@dataclass
class MentionFacts:
    """What the dataset says about one mention, for the breakdowns."""

    name_shared: int
    image: bool
    caption: bool
    enrichment: bool
    gold_train_count: int


def _has_text(block: dict[str, Any] | None) -> bool:
    return bool(block and str(block.get("text", "")).strip())


def mention_facts(ds: Dataset) -> dict[str, MentionFacts]:
    """Facts per mention id of the whole dataset."""
    names = Counter(normalise_name(e.name) for e in ds.entities)
    train = Counter(m.gold_id for m in ds.mentions if m.split == "train")

    def facts(m: Mention) -> MentionFacts:
        return MentionFacts(names[normalise_name(m.mention)], m.image is not None, _has_text(m.caption),
                            _has_text(m.enrichment), train[m.gold_id])

    return {m.id: facts(m) for m in ds.mentions}


def bucket_members(facts: list[MentionFacts]) -> dict[str, dict[str, list[int]]]:
    """``{breakdown: {bucket label: [positions]}}`` (positions into ``facts``), buckets in display order."""
    out: dict[str, dict[str, list[int]]] = {
        "name_shared": {label: [i for i, f in enumerate(facts) if lo <= f.name_shared <= hi]
                        for label, lo, hi in NAME_BUCKETS},
        "mention_has": {},
        "gold_in_train": {"unseen": [i for i, f in enumerate(facts) if f.gold_train_count == 0],
                          "seen": [i for i, f in enumerate(facts) if f.gold_train_count > 0]},
    }
    for attr in ("image", "caption", "enrichment"):
        for value, word in ((True, "yes"), (False, "no")):
            out["mention_has"][f"{attr}: {word}"] = [i for i, f in enumerate(facts) if getattr(f, attr) is value]
    return out


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class RunPredictions:
    """One run's predictions for a split, in the order of the first run's mentions."""

    run: Run
    predictions: Predictions
    counts: RankCounts             # of ``protocol``, one row per mention
    name: str = ""


def dataset_dir(run: Run, override: str | Path | None = None) -> Path:
    """The unified dataset a run was trained on: ``--dataset``, else config.json "dataset_resolved" / "dataset"
    (a relative path is tried as given, then against the feature folder)."""
    cfg = run.config
    given = override or cfg.get("dataset_resolved") or cfg.get("dataset")
    if not given:
        raise RunError(f"{run.path / 'config.json'}: names no dataset (fields 'dataset_resolved', 'dataset'); "
                       "pass --dataset DIR")
    path = Path(given)
    if not path.is_dir() and not path.is_absolute() and cfg.get("features"):
        path = Path(cfg["features"]) / path
    if not path.is_dir():
        where = "--dataset" if override else f"{run.path / 'config.json'}, field 'dataset_resolved'"
        raise RunError(f"{where}: dataset folder {given} not found (pass --dataset DIR)")
    return path


def counts_of(preds: Predictions, protocol: str, order: list[str] | None = None) -> RankCounts:
    """The rank counts of ``protocol`` per mention, in ``order`` of mention ids (default: the file's order)."""
    by_id = {p.mention_id: p for p in preds.mentions}
    entries = []
    for mid in order or list(by_id):
        entry = by_id[mid].ranking(protocol)
        if entry is None:
            raise RunError(f"{preds.path}: mention {mid!r} has no '{protocol}' ranks (the dataset has no candidate "
                           "lists?)")
        entries.append(entry)
    higher, equal, unordered, found, nan_gold = list(zip(*[(e.higher, e.equal, e.unordered, e.found, e.nan_gold)
                                                            for e in entries])) or [()] * 5
    return RankCounts(*(torch.tensor(c, dtype=torch.long) for c in (higher, equal, unordered)),
                      torch.tensor(found, dtype=torch.bool), nan_gold=torch.tensor(nan_gold, dtype=torch.bool))


def load_runs(run_dirs: list[str | Path], split: str, protocol: str) -> list[RunPredictions]:
    """Load the runs' predictions; every run must cover the same mentions as the first."""
    out: list[RunPredictions] = []
    for d in run_dirs:
        run = load_run(d)
        preds = load_predictions(run.path, split)
        ids = [p.mention_id for p in preds.mentions]
        if out:
            first = out[0].predictions
            ref = [p.mention_id for p in first.mentions]
            if set(ids) != set(ref):
                extra = sorted(set(ids) ^ set(ref))
                raise RunError(f"{preds.path}: covers other mentions than {first.path} ({len(ids)} vs {len(ref)} "
                               f"mentions; e.g. {extra[0]!r} is in only one of them)")
            ids = ref
        out.append(RunPredictions(run, preds, counts_of(preds, protocol, ids)))
    for rp in out:
        rp.name = run_name(rp.run, [x.run for x in out])
    return out


# ---------------------------------------------------------------------------------------------
# Analysis


def _metrics(counts: RankCounts, idx: list[int], rule: str) -> dict[str, float]:
    sel = torch.tensor(idx, dtype=torch.long)
    return metrics_from_counts(counts.map(lambda t: t[sel]), rule)


def _ranks(counts: RankCounts, rule: str) -> np.ndarray:
    """Ranks under ``rule`` as floats; a gold that was not ranked is infinitely far."""
    r = counts.ranks(rule).double().numpy()
    return np.where(r > 0, r, np.inf)


def confusions(rp: RunPredictions, rule: str, names: dict[str, str], surface: dict[str, str],
               limit: int) -> tuple[int, list[dict[str, Any]]]:
    """(number of errors, the ``limit`` most frequent (gold, predicted) pairs with counts, names and up to three
    of their mention strings). An error is a mention whose full-KB rank under ``rule`` is not 1; its predicted
    entity is the best-scoring entity of its top list other than the gold."""
    by_id = {p.mention_id: p for p in rp.predictions.mentions}
    ranks = _ranks(counts_of(rp.predictions, "full_kb"), rule)
    pairs: Counter = Counter()
    examples: dict[tuple[str, str], list[str]] = {}
    errors = 0
    for p, rank in zip(by_id.values(), ranks):
        if rank == 1:
            continue
        errors += 1
        pred = next((e for e, _ in p.top if e != p.gold), None)
        if pred is None:
            continue
        pairs[(p.gold, pred)] += 1
        ex = examples.setdefault((p.gold, pred), [])
        if surface.get(p.mention_id) not in ex and len(ex) < 3:
            ex.append(surface.get(p.mention_id, p.mention_id))
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return errors, [{"gold": g, "gold_name": names.get(g, "?"), "predicted": e, "predicted_name": names.get(e, "?"),
                     "count": n, "mentions": examples[(g, e)]} for (g, e), n in top]


@dataclass
class Analysis:
    runs: list[RunPredictions]
    split: str
    protocol: str
    tie_rule: str
    n: int
    breakdowns: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    confusions: list[dict[str, Any]] = field(default_factory=list)   # one entry per run: {"errors", "pairs"}


def analyse(runs: list[RunPredictions], ds: Dataset, split: str, protocol: str, rule: str,
            top_confusions: int = 15) -> Analysis:
    """Breakdowns of every run over the same buckets (built from the first run's mentions)."""
    first = runs[0].predictions
    facts_by_id = mention_facts(ds)
    missing = [p.mention_id for p in first.mentions if p.mention_id not in facts_by_id]
    if missing:
        raise RunError(f"{first.path}: mention {missing[0]!r} is not in {ds.root}/mentions.jsonl (predictions of "
                       "another dataset? pass --dataset DIR)")
    facts = [facts_by_id[p.mention_id] for p in first.mentions]
    ranks = [_ranks(rp.counts, rule) for rp in runs]
    result = Analysis(runs=runs, split=split, protocol=protocol, tie_rule=rule, n=len(facts))
    for key, buckets in bucket_members(facts).items():
        rows = []
        for label, idx in buckets.items():
            row: dict[str, Any] = {"bucket": label, "n": len(idx),
                                   "metrics": [_metrics(rp.counts, idx, rule) for rp in runs]}
            if len(runs) == 2:
                a, b = ranks[0][idx], ranks[1][idx]
                row["better"] = [int((a < b).sum()), int((b < a).sum())]
            rows.append(row)
        result.breakdowns[key] = rows
    if protocol == "full_kb":
        names = {e.id: e.name for e in ds.entities}
        surface = {m.id: m.mention for m in ds.mentions}
        for rp in runs:
            errors, pairs = confusions(rp, rule, names, surface, top_confusions)
            result.confusions.append({"errors": errors, "pairs": pairs})
    return result


# ---------------------------------------------------------------------------------------------
# Rendering


def _pct(m: dict[str, float], key: str, n: int) -> str:
    return "–" if n == 0 else f"{100.0 * m[key]:.2f}"


def describe(a: Analysis) -> str:
    """What the numbers are: split, protocol, KB size or list length, tie rule, score dtype, checkpoint."""
    meta = a.runs[0].predictions.meta
    kb = meta.get("kb_entities")
    proto = (f"full_kb (gold ranked against all {kb:,} KB entities)" if a.protocol == "full_kb" and kb
             else "full_kb (gold ranked against the whole KB)" if a.protocol == "full_kb"
             else f"candidates (gold ranked within its candidate list, rule {meta.get('candidate_rule', '?')})")
    dtype = meta.get("rank_score_dtype", "not recorded") + (" (ranks exact in float32)"
                                                            if meta.get("exact_float32_ranks") else "")
    runs = "; ".join(
        f"{'AB'[i] + ': ' if len(a.runs) > 1 else ''}{rp.name} ({rp.run.path}, checkpoint "
        f"{rp.predictions.meta.get('checkpoint', {}).get('name', '?')}, epoch "
        f"{rp.predictions.meta.get('checkpoint', {}).get('epoch', '?')})" for i, rp in enumerate(a.runs))
    return (f"Runs: {runs}.\n\nSplit {a.split}, {a.n} mentions; protocol {proto}; tie rule {a.tie_rule}; scores "
            f"{dtype}. Metrics in percent.")


def render_markdown(a: Analysis) -> str:
    title = " vs ".join(rp.name for rp in a.runs)
    lines = [f"# Error analysis: {title}", "", describe(a)]
    two = len(a.runs) == 2
    for key, (heading, _) in BREAKDOWNS.items():
        lines += ["", f"## {heading}", ""]
        if key == "name_shared":
            lines += ["Entities whose `name` equals the mention string after whitespace normalisation and case "
                      "folding; 2+ = 2–5 and 6+ together.", ""]
        if key == "gold_in_train":
            lines += ["seen: the gold entity is the gold of at least one train mention; unseen: of none.", ""]
        if two:
            a_name, b_name = (rp.name for rp in a.runs)
            head = ["bucket", "n", "MRR A", "MRR B", "Δ MRR (A−B)", "H@1 A", "H@1 B", "A ranks better",
                    "B ranks better"]
            lines += [f"A = {a_name}, B = {b_name}; \"ranks better\" counts mentions whose gold one run ranks "
                      "higher than the other.", ""]
        else:
            head = ["bucket", "n"] + [METRIC_NAMES[k] for k in SHOWN_METRICS]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        for row in a.breakdowns[key]:
            n, ms = row["n"], row["metrics"]
            if two:
                delta = "–" if n == 0 else f"{100.0 * (ms[0]['mrr'] - ms[1]['mrr']):+.2f}"
                cells = [_pct(ms[0], "mrr", n), _pct(ms[1], "mrr", n), delta, _pct(ms[0], "hits@1", n),
                         _pct(ms[1], "hits@1", n), str(row["better"][0]), str(row["better"][1])]
            else:
                cells = [_pct(ms[0], k, n) for k in SHOWN_METRICS]
            lines.append("| " + " | ".join([row["bucket"], str(n)] + cells) + " |")
    for rp, conf in zip(a.runs, a.confusions):
        lines += ["", f"## Hardest confusions: {rp.name}", "",
                  f"{conf['errors']} of {a.n} mentions are not ranked first (full_kb, tie rule {a.tie_rule}); the "
                  "predicted entity is the best-scoring entity other than the gold. Most frequent pairs first.", ""]
        if conf["pairs"]:
            lines += ["| count | gold | predicted instead | mentions |", "|---:|:---|:---|:---|"]
            for c in conf["pairs"]:
                lines.append(f"| {c['count']} | {c['gold_name']} ({c['gold']}) | {c['predicted_name']} "
                             f"({c['predicted']}) | {', '.join(c['mentions'])} |".replace("\n", " "))
    if a.protocol != "full_kb":
        lines += ["", "Confusions are listed for the full_kb protocol only (the predictions hold full-KB top lists)."]
    return "\n".join(lines) + "\n"


def to_json(a: Analysis) -> dict[str, Any]:
    return {"runs": [{"path": str(rp.run.path), "name": rp.name, "label": rp.run.label, "dataset": rp.run.dataset,
                      "predictions": str(rp.predictions.path), "meta": rp.predictions.meta} for rp in a.runs],
            "split": a.split, "protocol": a.protocol, "tie_rule": a.tie_rule, "n": a.n,
            "breakdowns": a.breakdowns, "confusions": a.confusions}


def plot(a: Analysis, path: Path) -> Path:
    """MRR (%) per bucket, one panel per breakdown, one bar per run."""
    fig, axes = plt.subplots(1, len(BREAKDOWNS), figsize=PLOT_SIZE, dpi=DPI,
                             gridspec_kw={"width_ratios": [max(3, len(a.breakdowns[k])) for k in BREAKDOWNS]})
    width = 0.8 / len(a.runs)
    for ax, (key, (_, title)) in zip(axes, BREAKDOWNS.items()):
        rows = a.breakdowns[key]
        x = np.arange(len(rows))
        for j, rp in enumerate(a.runs):
            vals = [100.0 * r["metrics"][j]["mrr"] if r["n"] else np.nan for r in rows]
            ax.bar(x + (j - (len(a.runs) - 1) / 2) * width, vals, width, label=rp.name)
        ax.set_xticks(x, [f"{r['bucket'].replace(': ', chr(10))}\nn={r['n']}" for r in rows], fontsize="small")
        ax.set(title=title, ylim=(0, 100))
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel(f"MRR (%), {a.protocol}, tie rule {a.tie_rule}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize="small")
    fig.suptitle(f"Error analysis, {a.split} split: MRR per bucket", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel analyze",
                      description="Error analysis of a run's per-mention predictions (Markdown, JSON, PNG).")
    p.add_argument("--run", required=True, help="run folder (with predictions/<split>.jsonl)")
    p.add_argument("--compare", default=None, metavar="RUN2", help="a second run: both side by side, A vs B")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--protocol", choices=PROTOCOLS, default="full_kb")
    p.add_argument("--tie_rule", choices=TIE_RULES, default=None, help="default: the first run's tie rule")
    p.add_argument("--dataset", default=None, help="unified dataset folder (default: the run's config.json)")
    p.add_argument("--top_confusions", type=int, default=15, help="confusion pairs listed per run")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.md, PREFIX.json, PREFIX.png (default: RUN/analysis[_vs_RUN2NAME])")
    return p


def run(args: argparse.Namespace) -> tuple[Analysis, Path]:
    """The analysis the flags ask for, and the output prefix."""
    runs = load_runs([args.run] + ([args.compare] if args.compare else []), args.split, args.protocol)
    rule = args.tie_rule or runs[0].run.tie_rule
    try:
        ds = load_dataset(dataset_dir(runs[0].run, args.dataset))
    except (DataError, FileNotFoundError) as exc:
        raise RunError(str(exc)) from None
    prefix = Path(args.out) if args.out else runs[0].run.path / (
        "analysis" + (f"_vs_{runs[1].run.path.name}" if args.compare else ""))
    return analyse(runs, ds, args.split, args.protocol, rule, args.top_confusions), prefix


def write_outputs(result: Analysis, markdown: str, prefix: Path) -> list[Path]:
    """PREFIX.md, PREFIX.json (each atomically) and PREFIX.png."""
    paths = [prefix.with_name(prefix.name + ext) for ext in (".md", ".json", ".png")]
    atomic_write_text(paths[0], markdown)
    atomic_write_json(paths[1], to_json(result))
    plot(result, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, prefix = run(args)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = render_markdown(result)
    print(markdown, end="")
    for path in write_outputs(result, markdown, prefix):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
