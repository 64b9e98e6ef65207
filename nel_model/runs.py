"""The run folder, written by training and read by evaluation, inference and reporting (docs/CONTRACTS.md, "Run
folders"): its file names, its readers and its writers, in one place.

Readers fail with a :class:`RunError` whose message starts with the offending path, e.g.
``runs/x: not a run folder (no results.json)``.

Writers: checkpoints are serialised to memory and written with :func:`atomic_write_bytes`, so a kill during a save
leaves the previous checkpoint intact. ``metrics.jsonl`` is append-only (fsync per line); on resume it is cut back to
the epochs covered by the checkpoint (an epoch logged just before a crash is recomputed identically); a corrupt line
before the last one is an error, never a silent cut.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from data_process.core.records import DataError, iter_json_lines
from data_process.core.safe_paths import open_regular_file

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ENV_FILE = "env.json"
CHECKPOINTS_DIR = "checkpoints"   # RUN/checkpoints/best.pt and last.pt
ENTITY_EMBEDDINGS_FILE = "entity_embeddings.npy"   # a checkpoint's entity embeddings (float32), KB row order
ENTITY_IDS_FILE = "entity_ids.json"                # the KB ids of those rows
ENTITY_EMBEDDINGS_META = "entity_embeddings.json"  # what they were computed from (their fingerprint)
PREDICTIONS_DIR = "predictions"   # RUN/predictions/<split>.jsonl and <split>.meta.json
RETRIEVAL_DIR = "retrieval"       # RUN/retrieval/<split>.jsonl: the same lines with the top K (dim-mel retrieve)
PROTOCOLS = ("full_kb", "candidates")
METRIC_KEYS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")
HITS_KS = (1, 3, 5, 10, 20)
TIE_RULES = ("pessimistic", "strict", "mean")   # how ties count (nel_model.evaluation.metrics)
CANDIDATE_RULES = ("dim", "in_list")             # how a gold missing from its candidate list counts
DEFAULT_TIE_RULE = "pessimistic"  # what results.json files without a "tie_rule" field were measured with


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

    @property
    def tie_rule(self) -> str:
        """The tie rule of ``results["protocols"]`` (older run folders: pessimistic, the only rule they had)."""
        return str(self.results.get("tie_rule") or DEFAULT_TIE_RULE)

    @property
    def score_dtype(self) -> str | None:
        """The scoring dtype of the evaluation (``None``: not recorded, an older run folder)."""
        v = self.results.get("score_dtype")
        return str(v) if v else None

    @property
    def kb_entities(self) -> int | None:
        """How many KB entities the full-KB protocol ranked against (``None``: not recorded)."""
        v = self.results.get("kb_entities")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    def candidate_list_length(self, split: str) -> float | None:
        """Mean candidate-list length of ``split`` (``results["candidate_recall"]``; ``None``: not recorded)."""
        v = ((self.results.get("candidate_recall") or {}).get(split) or {}).get("mean_list_length")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def two_stage(self) -> dict[str, Any] | None:
        """``results["two_stage"]`` (retriever, top_k, re-ranker) of a two-stage run; ``None`` for one stage."""
        v = self.results.get("two_stage")
        return v if isinstance(v, dict) else None

    @property
    def stages(self) -> int:
        """1 for a one-stage ranking (a bi-encoder over the KB), 2 for retrieve, then re-rank."""
        return 2 if self.two_stage is not None else 1

    def split_metrics(self, protocol: str = "full_kb", split: str = "test",
                      tie_rule: str | None = None) -> dict[str, float] | None:
        """``results["protocols"][protocol][split]``, or with ``tie_rule`` other than the run's own,
        ``results["tie_rules"][tie_rule][protocol][split]``; ``None`` when the run has no such entry."""
        block = self.results.get("protocols")
        if tie_rule is not None and tie_rule != self.tie_rule:
            block = (self.results.get("tie_rules") or {}).get(tie_rule)
        entry = (block or {}).get(protocol)
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
    blocks = {"protocols": protocols}
    tie_rules = res.get("tie_rules")
    if tie_rules is not None:
        if not isinstance(tie_rules, dict) or not all(isinstance(v, dict) for v in tie_rules.values()):
            raise RunError(f"{path}: field 'tie_rules' must map tie rules to objects of protocols")
        blocks.update({f"tie_rules.{rule}": v for rule, v in tie_rules.items()})
    for where, block in blocks.items():
        for proto, splits in block.items():
            if not isinstance(splits, dict):
                raise RunError(f"{path}: {where}.{proto} must be an object of splits")
            for split, m in splits.items():
                _check_metrics(path, f"{where}.{proto}.{split}", m)
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


def two_stage_of(run_dir: str | Path) -> dict[str, Any] | None:
    """How a two-stage run folder was made (``retriever``: run, label, checkpoint; ``top_k``; ``reranker``: its
    ``kind`` and settings): ``results.json``'s ``two_stage``, or for a feature re-ranker still training (no
    results.json yet) the same from its ``config.json``. ``None`` for a one-stage run."""
    run_dir = Path(run_dir)
    if (run_dir / RESULTS_FILE).is_file():
        info = load_results(run_dir).get("two_stage")
        if info is None:
            return None
        if not (isinstance(info, dict) and isinstance(info.get("retriever"), dict)
                and isinstance(info.get("reranker"), dict) and isinstance(info["reranker"].get("kind"), str)):
            raise RunError(f"{run_dir / RESULTS_FILE}: field 'two_stage' must hold 'retriever' and 'reranker' "
                           "objects, the re-ranker with its 'kind'")
        return info
    conf = load_config(run_dir, required=False)
    if isinstance(conf.get("reranker"), dict) and "retriever_resolved" in conf:
        settings = conf["config"]["data"] if isinstance(conf.get("config"), dict) else conf   # format 2, or flat
        return {"retriever": {"run": conf["retriever_resolved"], "label": None,
                              "checkpoint": settings.get("retriever_checkpoint", "best")},
                "top_k": conf["reranker"].get("top_k"), "reranker": {"kind": "feature"}}
    return None


def two_stage_summary(info: dict[str, Any], sample: dict[str, Any] | None = None) -> str:
    """One line of how a two-stage run was made (``info``: :func:`two_stage_of`; ``sample``: results.json's
    ``sample`` of an LLM run on a subset), e.g. ``retriever ours (best checkpoint), lists of 20 entities, re-ranker
    llm smollm2 (top 5)``."""
    r, rr = info.get("retriever") or {}, info.get("reranker") or {}
    name = r.get("label") or Path(str(r.get("run", "?"))).name
    what = str(rr.get("kind", "?")) + (f" {rr['model']}" if rr.get("model") else "") + \
        (f" (top {rr['k']})" if rr.get("k") else "")
    on = ""
    if sample and sample.get("limit") is not None:
        n = sample.get("n")
        on = ", on a sample of " + (" + ".join(f"{v} {k}" for k, v in n.items()) if isinstance(n, dict) else str(n)) \
            + " mentions" + (f" (seed {sample['seed']})" if sample.get("seed") is not None else "")
    return (f"retriever {name} ({r.get('checkpoint', 'best')} checkpoint), lists of {info.get('top_k')} entities, "
            f"re-ranker {what}{on}")


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


# ---------------------------------------------------------------------------------------------
# Per-mention predictions (RUN/predictions/<split>.jsonl, written by nel_model.evaluation.evaluate.write_predictions)

RANK_FIELDS = ("rank", "higher", "equal", "unordered")


@dataclass(frozen=True)
class RankEntry:
    """How one mention's gold entity ranked under one protocol: the pessimistic ``rank`` (0 = not ranked: gold
    outside its candidate list under the ``in_list`` rule) and the counts every tie rule is computed from
    (``nel_model.evaluation.metrics.RankCounts``)."""

    rank: int
    higher: int
    equal: int
    unordered: int
    nan_gold: bool = False     # the gold's score was NaN: a miss under every tie rule

    @property
    def found(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class MentionPrediction:
    """One line of a predictions file: the full-KB ranking, its top entities ``(entity id, float32 score)``, best
    first, and the candidate-list ranking when the dataset has candidate lists."""

    mention_id: str
    gold: str
    full_kb: RankEntry
    top: tuple[tuple[str, float | None], ...]
    candidates: RankEntry | None = None

    def ranking(self, protocol: str) -> RankEntry | None:
        return self.full_kb if protocol == "full_kb" else self.candidates


@dataclass
class Predictions:
    path: Path
    split: str
    meta: dict[str, Any]
    mentions: list[MentionPrediction]


def predictions_path(run_dir: str | Path, split: str, folder: str = PREDICTIONS_DIR) -> Path:
    return Path(run_dir) / folder / f"{split}.jsonl"


def _rank_entry(obj: Any, fail, prefix: str = "") -> RankEntry:
    if not isinstance(obj, dict):
        fail(prefix.rstrip(".") or None, "must be an object")
    vals = []
    for key in RANK_FIELDS:
        v = obj.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            fail(prefix + key, f"must be a non-negative integer, got {v!r}")
        vals.append(v)
    nan_gold = obj.get("nan_gold", False)
    if not isinstance(nan_gold, bool):
        fail(prefix + "nan_gold", f"must be true or false, got {nan_gold!r}")
    return RankEntry(*vals, nan_gold=nan_gold)


def _mention_prediction(obj: Any, fail) -> MentionPrediction:
    if not isinstance(obj, dict):
        fail(None, f"must be a JSON object, got {type(obj).__name__}")
    for key in ("mention_id", "gold"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            fail(key, f"must be a non-empty string, got {obj.get(key)!r}")
    top = obj.get("top")
    if not isinstance(top, list) or not all(
            isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)
            and (t[1] is None or (isinstance(t[1], (int, float)) and not isinstance(t[1], bool))) for t in top):
        fail("top", "must be a list of [entity id, score] pairs")
    cands = obj.get("candidates")
    return MentionPrediction(
        mention_id=obj["mention_id"], gold=obj["gold"], full_kb=_rank_entry(obj, fail),
        top=tuple((t[0], None if t[1] is None else float(t[1])) for t in top),
        candidates=None if cands is None else _rank_entry(cands, fail, "candidates."))


def load_predictions(run_dir: str | Path, split: str = "test", folder: str = PREDICTIONS_DIR) -> Predictions:
    """Read and validate ``RUN/predictions/<split>.jsonl`` (and its ``.meta.json`` when present); with
    ``folder=RETRIEVAL_DIR`` the retrieved lists of ``dim-mel retrieve`` (the same format, K entities a line)."""
    path = predictions_path(run_dir, split, folder)
    if folder != PREDICTIONS_DIR and not path.is_file():
        raise RunError(f"{path}: no retrieved lists for split '{split}' (write them with: dim-mel retrieve --run "
                       f"{run_dir} --split {split})")
    if not path.is_file():
        raise RunError(f"{path}: no predictions for split '{split}' (written by nel_model.train at the end of "
                       f"training; for an older run: dim-mel evaluate --run {run_dir} --split {split} "
                       "--predictions)")
    mentions: list[MentionPrediction] = []
    seen: dict[str, int] = {}
    try:
        for lineno, obj in iter_json_lines(path):
            where = f"line {lineno}"
            if isinstance(obj, dict) and isinstance(obj.get("mention_id"), str):
                where += f" (mention {obj['mention_id']!r})"

            def fail(field_name, problem, _where=where):
                raise RunError(f"{path}, {_where}" + (f", field '{field_name}'" if field_name else "")
                               + f": {problem}")

            rec = _mention_prediction(obj, fail)
            if rec.mention_id in seen:
                fail("mention_id", f"duplicate, first seen on line {seen[rec.mention_id]}")
            seen[rec.mention_id] = lineno
            mentions.append(rec)
    except DataError as exc:
        raise RunError(str(exc)) from None
    meta_path = path.with_name(f"{split}.meta.json")
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path}: must hold a JSON object")
    if "n" in meta and meta["n"] != len(mentions):
        raise RunError(f"{meta_path}: field 'n' says {meta['n']} mentions but {path} has {len(mentions)} lines")
    return Predictions(path=path, split=split, meta=meta, mentions=mentions)


# ---------------------------------------------------------------------------------------------
# Writing: environment records, checkpoints, metrics.jsonl

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names=("torch", "numpy", "transformers", "faiss-cpu", "tqdm", "pyyaml")) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), for run records and benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device, seed: int, world_size: int) -> dict[str, Any]:
    dev = {"type": device.type, "name": "cpu", "cpu": cpu_model()}
    if device.type == "cuda":
        dev["name"] = torch.cuda.get_device_name(device)
        dev["cuda"] = torch.version.cuda
    return {"git": git_commit(), "versions": package_versions(), "device": dev, "world_size": world_size,
            "seed": seed, "command": [sys.executable, *sys.argv], "host": socket.gethostname(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_threads": torch.get_num_threads()}


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    """``RUN/checkpoints/<name>.pt`` (``name``: best or last)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{name}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file; a truncated or corrupt one is a :class:`RunError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (did training finish an epoch?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load / pickle raise many types for a damaged file
        raise RunError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); truncated or "
                       "corrupt: train again, or --resume from the other checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise RunError(f"{path}: not a checkpoint of this toolkit (no model state and configuration)")
    return ckpt


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_metrics(run_dir: str | Path, last_epoch: int) -> None:
    """Keep only the ``metrics.jsonl`` lines of epochs ``<= last_epoch`` (atomic rewrite). A corrupt line before
    the last is a :class:`RunError` (not a crash artefact: cutting there would delete the later epochs)."""
    kept = [r for r in load_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------------------------
# The KB's entity embeddings (RUN/entity_embeddings.npy + .json: docs/CONTRACTS.md, "Run folders")


def write_entity_embeddings(run_dir: str | Path, emb: np.ndarray, entity_ids: list[str],
                            fingerprint: dict[str, Any]) -> None:
    """Save a checkpoint's entity embeddings ``emb`` [E, D] (float32, KB row order), their ids and what they were
    computed from (``fingerprint``: ``nel_model.loaded_run.kb_fingerprint``), each file atomically; the record
    is written last and names the array's SHA-256, so a reader never takes a half-replaced pair."""
    run_dir = Path(run_dir)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(entity_ids):
        raise ValueError(f"entity embeddings of shape {emb.shape} for {len(entity_ids)} entity ids")
    buf = io.BytesIO()
    np.save(buf, emb)
    blob = buf.getvalue()
    atomic_write_bytes(run_dir / ENTITY_EMBEDDINGS_FILE, blob)
    atomic_write_json(run_dir / ENTITY_IDS_FILE, list(entity_ids))
    atomic_write_json(run_dir / ENTITY_EMBEDDINGS_META, {**fingerprint, "dtype": "float32", "shape": list(emb.shape),
                                                         "sha256": hashlib.sha256(blob).hexdigest()})


def read_entity_embeddings(run_dir: str | Path, fingerprint: dict[str, Any]) -> np.ndarray | None:
    """The saved entity embeddings [E, D] float32 when ``entity_embeddings.json`` records exactly ``fingerprint``
    and the array is the one it names (SHA-256, shape); ``None`` otherwise (absent, from another checkpoint or
    feature cache, from before the record, damaged): the caller encodes the KB."""
    run_dir = Path(run_dir)
    meta_path, path = run_dir / ENTITY_EMBEDDINGS_META, run_dir / ENTITY_EMBEDDINGS_FILE
    try:
        with open_regular_file(meta_path) as fh:        # never blocks on a FIFO put in a run folder
            meta = json.loads(fh.read().decode("utf-8"))
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in fingerprint.items()):
            return None
        with open_regular_file(path) as fh:
            blob = fh.read()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            return None
        emb = np.load(io.BytesIO(blob), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if emb.dtype != np.float32 or list(emb.shape) != meta.get("shape"):
        return None
    return emb
