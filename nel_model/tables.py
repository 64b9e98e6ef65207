"""Gather run folders into the paper's results table (Markdown, CSV, LaTeX).

    dim-mel table runs/dim_s1 runs/dim_s2 runs/ablations [--protocol full_kb] [--split test]
        [--paper configs/paper_results.csv] [--metrics mrr hits@1 hits@3 hits@5] [--out results/table]

Rows are methods/ablations (``results.json`` "label"), columns are datasets x metrics. Runs that share
(dataset, label) are different seeds of one method: their cell is ``mean ± std`` with the *sample* standard
deviation (n-1 in the denominator); a single run shows the mean alone. Values are percentages with 2 decimals.
Rows and dataset columns keep the order in which they first appear among the given runs; paper rows (from the
user-filled ``--paper`` file) come first. A folder that holds run folders (e.g. ``runs/ablations``) stands
for all of them. See docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


from data_process.core.durable_io import atomic_write_text
from nel_model.run_io import METRIC_KEYS, PROTOCOLS, Run, RunError, expand_run_dirs, load_run

METRIC_NAMES = {"mrr": "MRR", "hits@1": "H@1", "hits@3": "H@3", "hits@5": "H@5", "hits@10": "H@10",
                "hits@20": "H@20"}
DECIMALS = 2
MISSING_MD = "–"
MISSING_TEX = "--"


@dataclass
class Cell:
    """One (row, dataset) block: per-metric mean and std in percent; ``n`` runs (None for paper rows)."""

    mean: dict[str, float | None]
    std: dict[str, float | None]
    n: int | None = None
    seeds: list = field(default_factory=list)


@dataclass
class Row:
    method: str
    source: str  # "ours" | "paper" | "skipped"
    cells: dict[str, Cell] = field(default_factory=dict)
    note: str = ""


@dataclass
class Table:
    datasets: list[str]
    metrics: list[str]
    rows: list[Row]
    protocol: str
    split: str


# ---------------------------------------------------------------------------------------------
# Building


def _fmt(v: float | None) -> str | None:
    return None if v is None else f"{v:.{DECIMALS}f}"


def collect(runs: list[Run], protocol: str, split: str, metrics: list[str], warn=None) -> tuple[list[str], list[Row]]:
    """Group runs by (label, dataset) and aggregate. Returns (datasets in first-seen order, rows)."""
    warn = warn or (lambda msg: None)
    datasets: list[str] = []
    groups: dict[str, dict[str, list[tuple[Run, dict]]]] = {}
    for run in runs:
        m = run.split_metrics(protocol, split)
        if m is None:
            warn(f"{run.path}: no '{protocol}' / '{split}' results; left out")
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
            row.cells[ds] = Cell(mean=mean, std=std, n=len(items), seeds=seeds)
        rows.append(row)
    return datasets, rows


def read_paper(path: str | Path, datasets: list[str], protocol: str, metrics: list[str]) -> list[Row]:
    """Paper rows from the user-filled CSV (see configs/paper_results.csv).

    Lines starting with ``#`` are comments. Columns: ``method, dataset, protocol`` and any of the metric
    columns (percentages as printed in the paper; empty = not reported). Only rows for ``datasets`` and
    for ``protocol`` (or an empty protocol) with at least one value are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: paper results file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not numbered:
        return []
    reader = csv.reader([ln for _, ln in numbered])
    header = [h.strip() for h in next(reader)]
    for need in ("method", "dataset"):
        if need not in header:
            raise RunError(f"{path}, line {numbered[0][0]}: header has no '{need}' column")
    unknown = [h for h in header if h not in ("method", "dataset", "protocol", "source", "note", *METRIC_KEYS)]
    if unknown:
        raise RunError(f"{path}, line {numbered[0][0]}: unknown column '{unknown[0]}' "
                       f"(metric columns: {', '.join(METRIC_KEYS)})")
    rows: dict[str, Row] = {}
    for (lineno, _), values in zip(numbered[1:], reader):
        rec = dict(zip(header, (v.strip() for v in values)))
        if len(values) != len(header):
            raise RunError(f"{path}, line {lineno}: {len(values)} values for {len(header)} columns")
        if not rec["method"] or not rec["dataset"]:
            raise RunError(f"{path}, line {lineno}: 'method' and 'dataset' must not be empty")
        if rec.get("protocol") and rec["protocol"] not in PROTOCOLS:
            raise RunError(f"{path}, line {lineno}, column 'protocol': must be one of {', '.join(PROTOCOLS)} "
                           f"or empty, got {rec['protocol']!r}")
        mean: dict[str, float | None] = {}
        for key in metrics:
            raw = rec.get(key, "").rstrip("%").strip()
            if raw == "":
                mean[key] = None
                continue
            try:
                mean[key] = float(raw)
            except ValueError:
                raise RunError(f"{path}, line {lineno}, column '{key}': not a number: {rec[key]!r}") from None
        if rec["dataset"] not in datasets or rec.get("protocol", "") not in ("", protocol):
            continue
        if all(v is None for v in mean.values()):
            continue
        name = rec["method"] if "(paper)" in rec["method"] else f"{rec['method']} (paper)"
        row = rows.setdefault(name, Row(method=name, source="paper"))
        row.cells[rec["dataset"]] = Cell(mean=mean, std={k: None for k in mean}, n=None)
    return list(rows.values())


def build_table(runs: list[Run], protocol: str = "full_kb", split: str = "test", metrics: list[str] | None = None,
                paper: str | Path | None = None, skipped: list[tuple[str, str]] = (), warn=None,
                order: list[str] | None = None) -> Table:
    """The whole table. ``skipped`` = [(label, reason)] rows shown as skipped (e.g. ablations the features lack).
    ``order``: method labels in the wanted row order (paper rows stay first; unlisted rows keep their place
    after the listed ones)."""
    metrics = list(metrics or METRIC_KEYS)
    datasets, rows = collect(runs, protocol, split, metrics, warn=warn)
    if paper is not None and split == "test":
        rows = read_paper(paper, datasets, protocol, metrics) + rows
    for label, reason in skipped:
        rows.append(Row(method=label, source="skipped", note=reason))
    if order:
        rank = {label: i for i, label in enumerate(order)}
        rows.sort(key=lambda r: (r.source != "paper", rank.get(r.method, len(rank))))
    return Table(datasets=datasets, metrics=metrics, rows=rows, protocol=protocol, split=split)


# ---------------------------------------------------------------------------------------------
# Rendering


def _n_text(row: Row, datasets: list[str]) -> str:
    if row.source == "paper":
        return "paper"
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


def caption(table: Table) -> str:
    return (f"Protocol: {table.protocol}, split: {table.split}. Percentages ({DECIMALS} decimals); "
            f"mean ± sample std over the n runs (seeds) of a method.")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: Table) -> str:
    head = ["Method", "n"] + [f"{_md_escape(d)} {METRIC_NAMES[k]}" for d in table.datasets for k in table.metrics]
    lines = [caption(table), "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    for row in table.rows:
        cells = [_cell_text(row.cells.get(d), k, " ± ", MISSING_MD) for d in table.datasets for k in table.metrics]
        lines.append("| " + " | ".join([_md_escape(row.method), _n_text(row, table.datasets)] + cells) + " |")
    notes = [f"- {row.method}: skipped ({row.note})" for row in table.rows if row.source == "skipped"]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """Wide CSV: method, source, then per dataset ``n`` and each metric's mean and std (percent), and a note."""
    head = ["method", "source"]
    for d in table.datasets:
        head.append(f"{d} n")
        for k in table.metrics:
            head += [f"{d} {METRIC_NAMES[k]}", f"{d} {METRIC_NAMES[k]} std"]
    head.append("note")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for row in table.rows:
        out = [row.method, row.source]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gather run folders into a results table (Markdown/CSV/LaTeX).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (with results.json), or folders holding run folders")
    p.add_argument("--protocol", choices=PROTOCOLS, default="full_kb",
                   help="full_kb: rank the whole KB; candidates: rank each mention's candidate list")
    p.add_argument("--split", default="test", help="split of results.json to report (default: test)")
    p.add_argument("--metrics", nargs="+", choices=METRIC_KEYS, default=list(METRIC_KEYS),
                   help="metric columns, in this order (default: all six)")
    p.add_argument("--paper", default=None, help="CSV of paper-reported numbers shown beside ours "
                                                 "(e.g. configs/paper_results.csv); test split only")
    p.add_argument("--out", default=None, metavar="PREFIX", help="also write PREFIX.md, PREFIX.csv, PREFIX.tex")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr)

    try:
        runs = [load_run(d) for d in expand_run_dirs(args.runs, warn=warn)]
        table = build_table(runs, args.protocol, args.split, args.metrics, paper=args.paper, warn=warn)
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
    sys.exit(main())
