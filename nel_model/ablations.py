"""Run the standard DIM ablations with the same seeds, then write the ablation table.

    dim-mel ablations --config configs/synthetic.yaml --features FEAT_DIR --out runs/ablations \
        --seeds 1 2 3 [--only text_only full] [--dry_run] [-- --epochs 20 ...extra train flags]

Each (ablation, seed) is one ``python -m nel_model.train`` run in ``OUT/<ablation>_s<seed>`` with ``--label`` set to
the ablation's label; its output goes to ``OUT/logs/<ablation>_s<seed>.log``. Finished runs (results.json present)
are reused, interrupted ones are resumed (``--resume``), so re-running the command continues where it stopped.
An ablation whose views the feature cache lacks (no image, no caption row, no enrichment) is *not run*: it appears
as a skipped row with the reason. The table is written to ``OUT/ablations.{md,csv,tex}`` (see ``nel_model.reporting.tables``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_process.core.entry import run_main
from data_process.core.settings import ToolkitParser, add_bool
from data_process.encode.feature_store import PROFILE_ROWS, FeatureStore
from nel_model.reporting import tables as mt
from nel_model.runs import CHECKPOINTS_DIR, PROTOCOLS, RESULTS_FILE, RunError, load_run


@dataclass(frozen=True)
class Ablation:
    key: str
    label: str
    flags: tuple[str, ...]
    needs: tuple[str, ...]  # "image", "caption", "enrichment"


# Text = mention phrase + sentence tokens (mention side) and name/description/attributes (entity side).
ABLATIONS = (
    Ablation("text_only", "text only",
             ("--no_image", "--no_caption", "--no_enrichment", "--no_entity_image", "--no_entity_profile"), ()),
    Ablation("text_image", "text + image", ("--no_caption", "--no_enrichment", "--no_entity_profile"), ("image",)),
    Ablation("text_image_caption", "text + image + caption", ("--no_enrichment", "--no_entity_profile"),
             ("image", "caption")),
    Ablation("text_image_enrichment", "text + image + enrichment", ("--no_caption",), ("image", "enrichment")),
    Ablation("full", "full (DIM)", (), ("image", "caption", "enrichment")),
)
BY_KEY = {a.key: a for a in ABLATIONS}


def _any_mask(store: FeatureStore, side: str, view: str, column: int | None = None) -> bool:
    if not store.has(side, view):
        return False
    mask = store.load(side, view).mask
    if mask is None:
        return True
    return bool((mask[:, column] if column is not None else mask).any())


def available_views(features: str | Path) -> dict[str, str | None]:
    """For "image", "caption", "enrichment": None when the cache has it, else why not."""
    store = FeatureStore(features)
    if not store.meta_path.is_file():
        raise RunError(f"{features}: not a feature folder (no meta.json)")
    out: dict[str, str | None] = {}
    out["image"] = None if (_any_mask(store, "mention", "image") or _any_mask(store, "mention", "regions")) \
        else "the feature cache has no mention images"
    rows = store.meta().get("views", {}).get("mention.profile", {}).get("rows", list(PROFILE_ROWS))
    for name in ("caption", "enrichment"):
        has = store.has("mention", "profile") and name in rows and _any_mask(store, "mention", "profile",
                                                                             rows.index(name))
        if name == "enrichment" and not has:
            has = _any_mask(store, "entity", "profile")
        out[name] = None if has else f"the feature cache has no {name} text (mention.profile row '{name}' empty)"
    return out


def train_command(ab: Ablation, seed: int, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", args.train_module]
    if args.config:
        cmd += ["--config", str(args.config)]
    cmd += ["--features", str(args.features), "--output_dir", str(run_dir), "--seed", str(seed),
            "--label", ab.label, *ab.flags]
    forced = getattr(args, "force", False) and (run_dir / RESULTS_FILE).is_file()  # re-train, do not resume
    if (run_dir / CHECKPOINTS_DIR / "last.pt").is_file() and not forced:
        cmd.append("--resume")
    elif run_dir.exists() and any(run_dir.iterdir()):
        cmd.append("--overwrite")
    return cmd + list(extra)


def run_ablations(args: argparse.Namespace, extra: list[str], log=print) -> int:
    out = Path(args.out)
    views = available_views(args.features)
    chosen = [BY_KEY[k] for k in args.only] if args.only else list(ABLATIONS)
    skipped: list[tuple[str, str]] = []
    run_dirs: list[Path] = []
    failures: dict[str, list[str]] = {}
    for ab in chosen:
        missing = [views[n] for n in ab.needs if views[n] is not None]
        if missing:
            skipped.append((ab.label, "; ".join(missing)))
            log(f"skip {ab.key}: {'; '.join(missing)}")
            continue
        for seed in args.seeds:
            run_dir = out / f"{ab.key}_s{seed}"
            if (run_dir / RESULTS_FILE).is_file() and not args.force:
                log(f"reuse {run_dir} (results.json present)")
                run_dirs.append(run_dir)
                continue
            cmd = train_command(ab, seed, run_dir, args, extra)
            log("$ " + shlex.join(cmd))
            if args.dry_run:
                continue
            log_path = out / "logs" / f"{ab.key}_s{seed}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("w", encoding="utf-8") as fh:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0 or not (run_dir / RESULTS_FILE).is_file():
                failures.setdefault(ab.label, []).append(f"seed {seed} exit code {rc}, see {log_path}")
                log(f"FAILED {ab.key} seed {seed}: exit code {rc}, see {log_path}")
                continue
            run_dirs.append(run_dir)
    if args.dry_run:
        return 0
    runs = [load_run(d) for d in run_dirs]
    for label, why in failures.items():
        skipped.append((f"{label} [failed]", "training failed: " + "; ".join(why)))
    table = mt.build_table(runs, args.protocol, args.split, paper=args.paper, skipped=skipped,
                           warn=lambda m: log(f"warning: {m}"),
                           order=[x for ab in ABLATIONS for x in (ab.label, f"{ab.label} [failed]")])
    if runs:
        print(mt.render_markdown(table), end="")
    for path in mt.write_outputs(table, out / "ablations"):
        log(f"wrote {path}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel ablations",
                      description="Run the standard ablations (same seeds) and write the ablation table. "
                                            "Flags after '--' go to nel_model.train unchanged.")
    p.add_argument("--config", help="train config YAML (e.g. configs/synthetic.yaml)")
    p.add_argument("--features", required=True, help="feature folder (data_process.encode.features)")
    p.add_argument("--out", required=True, help="folder for the run folders, logs and the table")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--only", nargs="+", choices=list(BY_KEY), help="run only these ablations")
    p.add_argument("--protocol", choices=PROTOCOLS, default="full_kb")
    p.add_argument("--split", default="test")
    mt.add_paper_argument(p)
    add_bool(p, "force", False, "re-train runs that already have results.json")
    add_bool(p, "dry_run", False, "print the train commands, run nothing")
    p.add_argument("--train_module", default="nel_model.train", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    try:
        return run_ablations(args, extra, log=lambda m: print(m, file=sys.stderr))
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_main(main)
