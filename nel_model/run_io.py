"""Read run folders written by ``nel_model.train`` (see docs/CONTRACTS.md, "Run folders").

Every reader fails with a :class:`RunError` whose message starts with the offending path, e.g.
``runs/x: not a run folder (no results.json)``.  Nothing here writes to a run folder.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ENV_FILE = "env.json"
PROTOCOLS = ("full_kb", "candidates")
METRIC_KEYS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")
HITS_KS = (1, 3, 5, 10, 20)


class RunError(ValueError):
    """A missing or malformed run folder / run file; the message names the path."""


@dataclass
class Run:
    """A loaded run folder. ``metrics`` is the list of per-epoch records of ``metrics.jsonl`` ([] if absent)."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        return str(self.results["dataset"])

    @property
    def label(self) -> str:
        return str(self.results["label"])

    @property
    def seed(self) -> Any:
        return self.results.get("seed")

    def split_metrics(self, protocol: str = "full_kb", split: str = "test") -> dict[str, float] | None:
        """``results["protocols"][protocol][split]`` or ``None`` when the run has no such entry."""
        entry = (self.results.get("protocols") or {}).get(protocol)
        if not isinstance(entry, dict):
            return None
        m = entry.get(split)
        return m if isinstance(m, dict) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _check_metrics(path: Path, where: str, m: Any) -> None:
    if not isinstance(m, dict):
        raise RunError(f"{path}: {where} must be an object of metrics, got {type(m).__name__}")
    for key in METRIC_KEYS:
        if key not in m:
            continue
        v = m[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0) or math.isnan(v):
            raise RunError(f"{path}: {where}.{key} must be a fraction in [0, 1], got {v!r}")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Load and validate ``RUN_DIR/results.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run folder not found")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run folder (no {RESULTS_FILE})")
    res = _read_json(path)
    if not isinstance(res, dict):
        raise RunError(f"{path}: must hold a JSON object")
    for key in ("dataset", "label"):
        if not isinstance(res.get(key), str) or not res[key]:
            raise RunError(f"{path}: field '{key}' is missing or not a non-empty string")
    protocols = res.get("protocols")
    if not isinstance(protocols, dict):
        raise RunError(f"{path}: field 'protocols' is missing or not an object")
    for proto, splits in protocols.items():
        if not isinstance(splits, dict):
            raise RunError(f"{path}: protocols.{proto} must be an object of splits")
        for split, m in splits.items():
            _check_metrics(path, f"protocols.{proto}.{split}", m)
    return res


def load_config(run_dir: str | Path, required: bool = True) -> dict[str, Any]:
    """Load ``RUN_DIR/config.json`` ({} when absent and not ``required``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        if required:
            raise RunError(f"{run_dir}: no {CONFIG_FILE} (not a complete run folder)")
        return {}
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: must hold a JSON object")
    return cfg


def load_metrics(run_dir: str | Path, required: bool = False) -> list[dict[str, Any]]:
    """Per-epoch records of ``RUN_DIR/metrics.jsonl``. A torn last line (run killed mid-write) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        if required:
            raise RunError(f"{run_dir}: no {METRICS_FILE}")
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n")]
    out = []
    nonempty = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    for j, (lineno, ln) in enumerate(nonempty):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as exc:
            if j == len(nonempty) - 1:
                print(f"warning: {path}, line {lineno}: torn last line ignored", file=sys.stderr)
                break
            raise RunError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise RunError(f"{path}, line {lineno}: must be a JSON object")
        out.append(rec)
    return out


def load_run(run_dir: str | Path) -> Run:
    """Load a finished run folder (results.json required; config/metrics/env optional)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    env_path = run_dir / ENV_FILE
    env = _read_json(env_path) if env_path.is_file() else {}
    return Run(path=run_dir, results=results, config=load_config(run_dir, required=False),
               metrics=load_metrics(run_dir), env=env if isinstance(env, dict) else {})


def expand_run_dirs(paths: Iterable[str | Path], warn=None) -> list[Path]:
    """Turn command-line paths into run folders.

    A path holding ``results.json`` is a run. A folder without one whose direct sub-folders are runs
    (e.g. ``runs/ablations``) expands to those sub-folders in sorted order; sub-folders without
    ``results.json`` (unfinished runs) are reported through ``warn`` and skipped. Anything else raises.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / RESULTS_FILE).is_file():
            out.append(p)
            continue
        if not p.is_dir():
            raise RunError(f"{p}: run folder not found")
        subs = sorted(d for d in p.iterdir() if d.is_dir())
        runs = [d for d in subs if (d / RESULTS_FILE).is_file()]
        if not runs:
            raise RunError(f"{p}: not a run folder (no {RESULTS_FILE})")
        for d in subs:
            if d not in runs and warn is not None and ((d / CONFIG_FILE).exists() or (d / METRICS_FILE).exists()):
                warn(f"{d}: skipped, no {RESULTS_FILE} (unfinished run?)")
        out.extend(runs)
    return out


def dev_mrr(record: dict[str, Any], protocol: str = "full_kb") -> float | None:
    """The dev MRR of one ``metrics.jsonl`` record.

    Accepts ``"dev": {"mrr": ...}`` and the per-protocol form ``"dev": {"full_kb": {"mrr": ...}}``.
    """
    dev = record.get("dev")
    if not isinstance(dev, dict):
        return None
    if isinstance(dev.get("mrr"), (int, float)):
        return float(dev["mrr"])
    sub = dev.get(protocol)
    if isinstance(sub, dict) and isinstance(sub.get("mrr"), (int, float)):
        return float(sub["mrr"])
    return None
