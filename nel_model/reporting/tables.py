"""Gather run folders into the paper's results table (Markdown, CSV, LaTeX).

    dim-mel table runs/dim_s1 runs/dim_s2 runs/ablations [--protocol full_kb] [--split test] [--tie_rule RULE]
        [--paper [configs/published_results.csv]] [--metrics mrr hits@1 hits@3 hits@5] [--out results/table]

Rows are methods/ablations (``results.json`` "label"), columns are datasets x metrics. Runs that share
(dataset, label) are different seeds of one method: their cell is ``mean ± std`` with the *sample* standard
deviation (n-1 in the denominator); a single run shows the mean alone. Values are percentages with 2 decimals.
Rows and dataset columns keep the order in which they first appear among the given runs; published rows (``--paper``,
see ``nel_model.reporting.published``) come first, and only where they were measured like ours; the others are listed below
the table with the reason. Every output names the protocol, split, tie rule and score dtype of our rows. A folder
that holds run folders (e.g. ``runs/ablations``) stands for all of them. See docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from data_process.core.durable_io import atomic_write_text
from nel_model.evaluation.metrics import TIE_RULES
from nel_model.reporting.published import (PUBLISHED_FILE, OurSetting, dataset_key, kb_note, read_published,
                                           why_not_comparable)
from nel_model.runs import METRIC_KEYS, PROTOCOLS, Run, RunError, expand_run_dirs, load_run, two_stage_summary

METRIC_NAMES = {"mrr": "MRR", "hits@1": "H@1", "hits@3": "H@3", "hits@5": "H@5", "hits@10": "H@10",
                "hits@20": "H@20"}
DECIMALS = 2
MISSING_MD = "–"
MISSING_TEX = "--"
NOT_RECORDED = "not recorded"
NOT_REPORTED = "not reported"


@dataclass
class Cell:
    """One (row, dataset) block: per-metric mean and std in percent; ``n`` runs (None for published rows), and
    the distinct tie rules and score dtypes of those runs (``None`` = not recorded)."""

    mean: dict[str, float | None]
    std: dict[str, float | None]
    n: int | None = None
    seeds: list = field(default_factory=list)
    tie_rules: tuple[str, ...] = ()
    score_dtypes: tuple[str | None, ...] = ()
    two_stage: tuple[str, ...] = ()          # how the two-stage runs among them were made (two_stage_summary)


@dataclass
class Row:
    method: str
    source: str  # "ours" | "published" | "skipped"
    cells: dict[str, Cell] = field(default_factory=dict)
    note: str = ""
    stages: tuple[int, ...] = ()             # 1: one stage, 2: retrieve, then re-rank (published rows: as given)

    @property
    def two_stage(self) -> str:
        """How the row's two-stage runs were made (ours), ``published`` for a published two-stage system."""
        if self.source == "published":
            return "a published two-stage system" if 2 in self.stages else ""
        return " / ".join(_distinct(t for cell in self.cells.values() for t in cell.two_stage))

    def measured(self, attr: str) -> str:
        """The row's tie rules / score dtypes (``attr`` = "tie_rules" | "score_dtypes") as text."""
        if self.source == "published":
            return NOT_REPORTED
        return _join(v for cell in self.cells.values() for v in getattr(cell, attr))


@dataclass
class Table:
    datasets: list[str]
    metrics: list[str]
    rows: list[Row]
    protocol: str
    split: str
    settings: dict[str, OurSetting] = field(default_factory=dict)   # by dataset name
    not_comparable: list[str] = field(default_factory=list)        # published rows left out, with the reason
    kb_notes: list[str] = field(default_factory=list)              # published rows on a KB its sources count otherwise
    published_from: str | None = None                              # the --paper file


# ---------------------------------------------------------------------------------------------
# Building


def _fmt(v: float | None) -> str | None:
    return None if v is None else f"{v:.{DECIMALS}f}"


def _distinct(values) -> tuple:
    return tuple(dict.fromkeys(values))


def _join(values) -> str:
    return " / ".join(NOT_RECORDED if v is None else str(v) for v in _distinct(values)) or MISSING_MD


def collect(runs: list[Run], protocol: str, split: str, metrics: list[str], warn=None,
            tie_rule: str | None = None) -> tuple[list[str], list[Row]]:
    """Group runs by (label, dataset) and aggregate. Returns (datasets in first-seen order, rows).
    ``tie_rule``: report every run under this rule (default: each run's own, ``results.json`` "tie_rule")."""
    warn = warn or (lambda msg: None)
    datasets: list[str] = []
    groups: dict[str, dict[str, list[tuple[Run, dict]]]] = {}
    for run in runs:
        m = run.split_metrics(protocol, split, tie_rule)
        if m is None:
            under = f" under tie rule '{tie_rule}'" if tie_rule else ""
            warn(f"{run.path}: no '{protocol}' / '{split}' results{under}; left out")
            continue
        if run.dataset not in datasets:
            datasets.append(run.dataset)
        groups.setdefault(run.label, {}).setdefault(run.dataset, []).append((run, m))
    rows = []
    for label, by_ds in groups.items():
        row = Row(method=label, source="ours")
        for ds, items in by_ds.items():
            seeds = [r.seed for r, _ in items]
            dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
            if dup:
                warn(f"label {label!r}, dataset {ds!r}: seed(s) {', '.join(dup)} appear in several runs "
                     f"({', '.join(str(r.path) for r, _ in items)})")
            rules = _distinct(tie_rule or r.tie_rule for r, _ in items)
            if len(rules) > 1:
                warn(f"label {label!r}, dataset {ds!r}: runs measured under different tie rules "
                     f"({', '.join(rules)}) are averaged; pass --tie_rule to report them under one")
            mean, std = {}, {}
            for key in metrics:
                vals = [100.0 * float(m[key]) for _, m in items if key in m]
                if len(vals) < len(items):
                    if vals:
                        warn(f"label {label!r}, dataset {ds!r}: '{key}' missing in some runs")
                    mean[key], std[key] = None, None
                    continue
                mean[key] = statistics.fmean(vals)
                std[key] = statistics.stdev(vals) if len(vals) > 1 else None
            row.cells[ds] = Cell(mean=mean, std=std, n=len(items), seeds=seeds, tie_rules=rules,
                                 score_dtypes=_distinct(r.score_dtype for r, _ in items),
                                 two_stage=_distinct(two_stage_summary(r.two_stage, r.results.get("sample"))
                                                     for r, _ in items if r.two_stage is not None))
        row.stages = _distinct(r.stages for items in by_ds.values() for r, _ in items)
        rows.append(row)
    return datasets, rows


def our_settings(runs: list[Run], datasets: list[str], split: str) -> dict[str, OurSetting]:
    """How our runs of each dataset column were measured (KB sizes, mean candidate-list lengths of ``split``,
    stages)."""
    return {ds: OurSetting(ds, _distinct(r.kb_entities for r in runs if r.dataset == ds),
                           _distinct(r.candidate_list_length(split) for r in runs if r.dataset == ds),
                           tuple(sorted({r.stages for r in runs if r.dataset == ds})))
            for ds in datasets}


def published_rows(path: str | Path, datasets: list[str], settings: dict[str, OurSetting], protocol: str,
                   split: str, metrics: list[str]) -> tuple[list[Row], list[str], list[str]]:
    """Rows of the published-results file that are comparable with our runs (one row per method, its values
    under our dataset column names), one line per left-out (dataset, protocol, KB size, split) giving the
    methods and the reason, and one line per KB its sources count differently (``published.kb_note``) giving the
    methods set beside ours on it."""
    by_key = {dataset_key(ds): settings[ds] for ds in datasets}
    rows: dict[str, Row] = {}
    left_out: dict[tuple[str, str], list[str]] = {}
    on_other_count: dict[str, list[str]] = {}
    for res in read_published(path):
        reason = why_not_comparable(res, protocol, split, by_key)
        if reason is not None:
            kb = f" ({res.kb_entities:,} entities)" if res.kb_entities else ""
            names = left_out.setdefault((f"{res.dataset} {res.protocol}{kb}, {res.split}", reason), [])
            if res.name not in names:
                names.append(res.name)
            continue
        if res.metric not in metrics:
            continue
        note = kb_note(res, by_key)
        if note is not None and res.name not in on_other_count.setdefault(note, []):
            on_other_count[note].append(res.name)
        ds = by_key[dataset_key(res.dataset)].dataset
        row = rows.setdefault(res.name, Row(method=res.name, source="published", stages=(res.stages,)))
        cell = row.cells.setdefault(ds, Cell(mean={k: None for k in metrics}, std={k: None for k in metrics}))
        cell.mean[res.metric] = res.value
        if res.source not in row.note:
            row.note = f"{row.note}; {res.source}" if row.note else res.source
    notes = [f"{what}: {', '.join(names)}. Not comparable: {reason}" for (what, reason), names in left_out.items()]
    return list(rows.values()), notes, [f"{', '.join(names)}: {note}" for note, names in on_other_count.items()]


def build_table(runs: list[Run], protocol: str = "full_kb", split: str = "test", metrics: list[str] | None = None,
                paper: str | Path | None = None, skipped: list[tuple[str, str]] = (), warn=None,
                order: list[str] | None = None, tie_rule: str | None = None) -> Table:
    """The whole table. ``paper``: a published-results CSV (``nel_model.reporting.published``). ``skipped`` = [(label,
    reason)] rows shown as skipped (e.g. ablations the features lack). ``order``: method labels in the wanted row
    order (published rows stay first; unlisted rows keep their place after the listed ones). ``tie_rule``: report
    our runs under this rule (default: each run's own)."""
    metrics = list(metrics or METRIC_KEYS)
    datasets, rows = collect(runs, protocol, split, metrics, warn=warn, tie_rule=tie_rule)
    settings = our_settings(runs, datasets, split)
    not_comparable: list[str] = []
    kb_notes: list[str] = []
    if paper is not None:
        published, not_comparable, kb_notes = published_rows(paper, datasets, settings, protocol, split, metrics)
        rows = published + rows
    for label, reason in skipped:
        rows.append(Row(method=label, source="skipped", note=reason))
    if order:
        rank = {label: i for i, label in enumerate(order)}
        rows.sort(key=lambda r: (r.source != "published", rank.get(r.method, len(rank))))
    return Table(datasets=datasets, metrics=metrics, rows=rows, protocol=protocol, split=split, settings=settings,
                 not_comparable=not_comparable, kb_notes=kb_notes,
                 published_from=None if paper is None else str(paper))


# ---------------------------------------------------------------------------------------------
# Rendering


def _n_text(row: Row, datasets: list[str]) -> str:
    if row.source == "published":
        return "published"
    if row.source == "skipped":
        return "skipped"
    ns = [str(row.cells[d].n) if d in row.cells else "0" for d in datasets]
    return ns[0] if len(set(ns)) == 1 else "/".join(ns)


def _cell_text(cell: Cell | None, key: str, pm: str, missing: str) -> str:
    if cell is None or cell.mean.get(key) is None:
        return missing
    text = _fmt(cell.mean[key])
    if cell.std.get(key) is not None:
        text += f"{pm}{_fmt(cell.std[key])}"
    return text


def _ours(table: Table) -> list[Row]:
    return [r for r in table.rows if r.source == "ours"]


def caption(table: Table) -> str:
    """Protocol, split, tie rule, score dtype and KB size (or candidate-list length) of our rows."""
    ours = _ours(table)
    if table.protocol == "full_kb":
        sizes = "; KB entities: " + ", ".join(f"{d} {_join(f'{v:,}' if v else None for v in s.kb_entities)}"
                                               for d, s in table.settings.items())
    else:
        sizes = "; mean candidate-list length: " + ", ".join(
            f"{d} {_join(f'{v:g}' if v is not None else None for v in s.list_lengths)}"
            for d, s in table.settings.items())
    return (f"Protocol: {table.protocol}, split: {table.split}, tie rule: "
            f"{_join(r.measured('tie_rules') for r in ours)}, scores: {_join(r.measured('score_dtypes') for r in ours)}"
            f"{sizes if table.settings else ''}. Percentages ({DECIMALS} decimals); mean ± sample std over the n runs "
            "(seeds) of a method.")


def notes(table: Table) -> list[str]:
    """Lines printed below the table: per-row tie rules / dtypes when our rows differ, published-row caveats,
    published results left out and why, skipped rows."""
    out = []
    ours = _ours(table)
    for attr, what in (("tie_rules", "tie rule"), ("score_dtypes", "scores")):
        if len({r.measured(attr) for r in ours}) > 1:
            out += [f"- {r.method}: {what} {r.measured(attr)}" for r in ours]
    if any(r.source == "published" for r in table.rows):
        out.append(f"- Published rows (from {table.published_from}): as reported by their sources, which do not "
                   "state a tie rule; shown only where dataset, protocol, KB size / candidate-list length and "
                   "split match ours.")
        out += [f"- {line}" for line in table.kb_notes]
    two_stage = [r for r in table.rows if r.source != "skipped" and r.two_stage]
    if two_stage:
        out.append("- Two-stage rows (retrieve, then re-rank; a published two-stage system stands only beside "
                   "two-stage runs of ours, a one-stage one beside one-stage runs):")
        out += [f"  - {r.method}: {r.two_stage}" for r in two_stage]
    if table.not_comparable:
        out.append(f"- Published results not comparable with these runs (from {table.published_from}):")
        out += [f"  - {line}" for line in table.not_comparable]
    out += [f"- {row.method}: skipped ({row.note})" for row in table.rows if row.source == "skipped"]
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: Table) -> str:
    head = ["Method", "n"] + [f"{_md_escape(d)} {METRIC_NAMES[k]}" for d in table.datasets for k in table.metrics]
    lines = [caption(table), "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    for row in table.rows:
        cells = [_cell_text(row.cells.get(d), k, " ± ", MISSING_MD) for d in table.datasets for k in table.metrics]
        lines.append("| " + " | ".join([_md_escape(row.method), _n_text(row, table.datasets)] + cells) + " |")
    below = notes(table)
    if below:
        lines += ["", *below]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """Wide CSV: method, source, how the row was measured (protocol, split, tie rule, score dtype, stages and
    how a two-stage row was made), then per dataset ``n`` and each metric's mean and std (percent), and a note
    (published rows: their source)."""
    head = ["method", "source", "protocol", "split", "tie rule", "score dtype", "stages", "two stage"]
    for d in table.datasets:
        head.append(f"{d} n")
        for k in table.metrics:
            head += [f"{d} {METRIC_NAMES[k]}", f"{d} {METRIC_NAMES[k]} std"]
    head.append("note")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for row in table.rows:
        measured = [row.measured("tie_rules"), row.measured("score_dtypes")] if row.source != "skipped" else ["", ""]
        out = [row.method, row.source, table.protocol, table.split, *measured,
               "/".join(map(str, row.stages)), row.two_stage]
        for d in table.datasets:
            cell = row.cells.get(d)
            out.append("" if cell is None or cell.n is None else str(cell.n))
            for k in table.metrics:
                out.append("" if cell is None else _fmt(cell.mean.get(k)) or "")
                out.append("" if cell is None else _fmt(cell.std.get(k)) or "")
        out.append(row.note)
        w.writerow(out)
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def render_latex(table: Table) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    nm = len(table.metrics)
    lines = [f"% {caption(table)}", "% Requires \\usepackage{booktabs}.",
             "\\begin{tabular}{l" + "c" * (nm * len(table.datasets)) + "}", "\\toprule"]
    lines.append(" & " + " & ".join(f"\\multicolumn{{{nm}}}{{c}}{{{tex_escape(d)}}}" for d in table.datasets)
                 + " \\\\")
    lines.append(" ".join(f"\\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}" for i in range(len(table.datasets))))
    lines.append("Method & " + " & ".join(METRIC_NAMES[k] for _ in table.datasets
                                          for k in table.metrics) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        cells = [_cell_text(row.cells.get(d), k, " $\\pm$ ", MISSING_TEX) for d in table.datasets for k in table.metrics]
        lines.append(" & ".join([tex_escape(row.method)] + cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% {line}" for line in notes(table)]
    return "\n".join(lines) + "\n"


def write_outputs(table: Table, prefix: str | Path) -> list[Path]:
    """Write PREFIX.md, PREFIX.csv, PREFIX.tex atomically; returns the paths."""
    prefix = Path(prefix)
    paths = []
    for ext, text in ((".md", render_markdown(table)), (".csv", render_csv(table)), (".tex", render_latex(table))):
        path = prefix.with_name(prefix.name + ext)
        atomic_write_text(path, text)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# CLI


def add_paper_argument(p: argparse.ArgumentParser) -> None:
    """``--paper [CSV]``: published results beside ours (the shipped file when no CSV is given)."""
    p.add_argument("--paper", nargs="?", const=str(PUBLISHED_FILE), default=None, metavar="CSV",
                   help="show published results beside ours where they are comparable, and list the others with the "
                        f"reason (default file: {PUBLISHED_FILE.parent.name}/{PUBLISHED_FILE.name}; format: "
                        "docs/RESULTS.md)")


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel table", description="Gather run folders into a results table (Markdown/CSV/LaTeX).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (with results.json), or folders holding run folders")
    p.add_argument("--protocol", choices=PROTOCOLS, default="full_kb",
                   help="full_kb: rank the whole KB; candidates: rank each mention's candidate list")
    p.add_argument("--split", default="test", help="split of results.json to report (default: test)")
    p.add_argument("--metrics", nargs="+", choices=METRIC_KEYS, default=list(METRIC_KEYS),
                   help="metric columns, in this order (default: all six)")
    p.add_argument("--tie_rule", choices=TIE_RULES, default=None,
                   help="report every run under this tie rule (results.json 'tie_rules'; default: each run's own)")
    add_paper_argument(p)
    p.add_argument("--out", default=None, metavar="PREFIX", help="also write PREFIX.md, PREFIX.csv, PREFIX.tex")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr)

    try:
        runs = [load_run(d) for d in expand_run_dirs(args.runs, warn=warn)]
        table = build_table(runs, args.protocol, args.split, args.metrics, paper=args.paper, warn=warn,
                            tie_rule=args.tie_rule)
        if not table.datasets:
            raise RunError(f"no run has '{args.protocol}' / '{args.split}' results")
        print(render_markdown(table), end="")
        if args.out:
            for path in write_outputs(table, args.out):
                print(f"wrote {path}", file=sys.stderr)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
