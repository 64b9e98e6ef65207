"""Plot training curves and Hits@k curves of one or more run folders (PNG, matplotlib Agg backend).

    dim-mel plot runs/dim_s1                     # -> runs/dim_s1/plots/{curves,hits_at_k}.png
    dim-mel plot runs/dim_s1 runs/text_s1 --out plots/compare [--protocol full_kb] [--split test]

``curves.png``: train loss and dev MRR per epoch (from metrics.jsonl), one line per run, the best epoch marked.
``hits_at_k.png``: Hits@k for k = 1, 3, 5, 10, 20 (from results.json), one line per run.
With several runs ``--out`` is required. Images are FIGSIZE x DPI pixels (1200 x 450 and 800 x 500).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser
from data_process.core.durable_io import atomic_write_bytes
from nel_model.runs import HITS_KS, PROTOCOLS, Run, RunError, dev_mrr, expand_run_dirs, load_run

DPI = 100
CURVES_SIZE = (12.0, 4.5)  # inches -> 1200 x 450 px
HITS_SIZE = (8.0, 5.0)  # inches -> 800 x 500 px


def run_name(run: Run, runs: list[Run]) -> str:
    """Legend name: the label, plus the seed when several runs share the label, plus the dataset when mixed."""
    name = run.label
    if len({r.dataset for r in runs}) > 1:
        name = f"{name} [{run.dataset}]"
    if sum(r.label == run.label and r.dataset == run.dataset for r in runs) > 1:
        name = f"{name} (seed {run.seed})"
    return name


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_curves(runs: list[Run], path: Path, protocol: str = "full_kb") -> Path:
    """Train loss (left) and dev MRR in percent (right) per epoch; the best epoch is marked with a star."""
    fig, (ax_loss, ax_mrr) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI)
    for run in runs:
        name = run_name(run, runs)
        loss = [(r["epoch"], r["train_loss"]) for r in run.metrics
                if isinstance(r.get("epoch"), (int, float)) and isinstance(r.get("train_loss"), (int, float))]
        mrr = [(r["epoch"], 100.0 * v) for r in run.metrics
               if isinstance(r.get("epoch"), (int, float)) and (v := dev_mrr(r, protocol)) is not None]
        if loss:
            ax_loss.plot(*zip(*loss), marker="." if len(loss) < 50 else None, label=name)
        if mrr:
            (line,) = ax_mrr.plot(*zip(*mrr), marker="." if len(mrr) < 50 else None, label=name)
            best = run.results.get("best_epoch")
            at = [m for e, m in mrr if e == best]
            if at:
                ax_mrr.plot([best], at, marker="*", markersize=14, color=line.get_color(), linestyle="none")
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="train loss (mean over epoch)")
    ax_mrr.set(title="Dev MRR (★ = best epoch, kept checkpoint)", xlabel="epoch", ylabel="dev MRR (%)")
    for ax in (ax_loss, ax_mrr):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(_title(runs))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_hits(runs: list[Run], path: Path, protocol: str = "full_kb", split: str = "test") -> Path:
    """Hits@k (percent) against k, one line per run that has ``protocol``/``split`` results."""
    fig, ax = plt.subplots(figsize=HITS_SIZE, dpi=DPI)
    for run in runs:
        m = run.split_metrics(protocol, split)
        if m is None:
            continue
        pts = [(k, 100.0 * m[f"hits@{k}"]) for k in HITS_KS if f"hits@{k}" in m]
        if pts:
            mrr = f", MRR {100.0 * m['mrr']:.2f}" if "mrr" in m else ""
            ax.plot(*zip(*pts), marker="o", label=f"{run_name(run, runs)}{mrr}")
    ax.set_xscale("log")
    ax.set_xticks(list(HITS_KS), [str(k) for k in HITS_KS])
    ax.minorticks_off()
    ax.set(title=f"Hits@k — {protocol}, {split} split", xlabel="k", ylabel="Hits@k (%)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no '{protocol}' / '{split}' results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_figure(fig, path)


def _title(runs: list[Run]) -> str:
    if len(runs) == 1:
        r = runs[0]
        return f"{r.label} on {r.dataset} (seed {r.seed}) — {r.path}"
    return f"Training curves of {len(runs)} runs"


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, protocol: str = "full_kb",
              split: str = "test", warn=None) -> list[Path]:
    """Write curves.png and hits_at_k.png for the given run folders; returns the paths."""
    runs = [load_run(d) for d in expand_run_dirs(run_dirs, warn=warn)]
    if out is None:
        if len(runs) != 1:
            raise RunError(f"{len(runs)} runs given: --out is required with several runs")
        out = runs[0].path / "plots"
    out = Path(out)
    return [plot_curves(runs, out / "curves.png", protocol), plot_hits(runs, out / "hits_at_k.png", protocol, split)]


def main(argv: list[str] | None = None) -> int:
    p = ToolkitParser(prog="dim-mel plot", description="Plot training curves and Hits@k of run folders (PNG).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/plots for one run)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="full_kb")
    p.add_argument("--split", default="test", help="split for the Hits@k curve (default: test)")
    args = p.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out, args.protocol, args.split,
                          warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    run_main(main)
