"""BLIP-2 image information: entity-relevant captions for mention images.

Two commands::

    python -m data_process.augment.caption --data DIR --out DIR_OUT [--model ...] [--prompt ...] [--plain-caption] ...
    python -m data_process.augment.caption import --data DIR --captions FILE.json|.jsonl --out DIR_OUT

The first captions every mention image with a :class:`~data_process.augment.captioners.Captioner` (BLIP-2 by
default) and writes a new unified dataset folder whose mentions carry
``caption = {"text": ..., "answer"?, "plain"?, "provenance": {...}}``. The second imports captions
someone already has (e.g. a paper's released data) into the same shape.

Every caption is cached in a :class:`~data_process.core.durable_io.JsonlCache` keyed by
(image bytes hash, captioner id, rendered prompt): a killed run resumes where it stopped, and a
re-run with the same settings calls the model for nothing. A missing or undecodable image is
recorded (cache for undecodable ones, report for both) and skipped; it never stops the run.

Images of the new folder (``data_process.core.placement``): by default each top-level folder that holds images
(usually ``images/``) is symlinked to the source's (``--images symlink``), so image paths stay byte-identical; with
``--images rewrite`` paths are rewritten relative to the new root instead (no links made); ``copy`` copies them.
Image content hashes are remembered by (path, size, mtime) in ``image_hashes.jsonl`` beside the caption cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, get_args, get_type_hints

from data_process.augment.cache_records import record_error
from data_process.augment.captioners import DEFAULT_MODEL, DTYPES, Captioner, GenerationSettings
from data_process.core.durable_io import JsonlCache
from data_process.core.entry import run_main
from data_process.core.fingerprints import MISSING, ImageHasher, stable_hash
from data_process.core.images import iter_decoded
from data_process.core.placement import PLACEMENT_MODES, place_record_images
from data_process.core.safe_paths import UnsafePath, regular_file_problem, resolve_in_dataset
from data_process.core.settings import Setting, ToolkitParser, add_bool, load_settings
from data_process.core.records import (DataError, Dataset, DatasetInfo, Mention, iter_json_lines, load_dataset,
                                  save_dataset)

DEFAULT_PROMPT = "Question: who or what in this image is {mention}? Answer:"
REPORT_FILE = "caption_report.json"
CACHE_FILE = "caption_cache.jsonl"
HASHES_FILE = "image_hashes.jsonl"  # beside the caption cache: content hashes by (path, size, mtime)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class CaptionConfig:
    """Settings of a captioning run (CLI flags / ``configs/caption.yaml`` keys)."""

    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT  # may contain {mention}; "" = no prompted caption
    plain_caption: bool = False  # also caption with no prompt
    num_beams: int = 1
    max_new_tokens: int = 30
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    dtype: str = "auto"
    cache: str | None = None  # default: DIR_OUT/caption_cache.jsonl
    images: str = "symlink"
    retry_failed: bool = False

    def __post_init__(self):
        if not self.prompt and not self.plain_caption:
            raise ValueError("nothing to do: the prompt is empty and --plain-caption is off")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.images not in PLACEMENT_MODES:
            raise ValueError(f"images must be one of {', '.join(PLACEMENT_MODES)}, got {self.images!r}")

    def tasks(self) -> list[tuple[str, str]]:
        """``[(name, prompt template)]``: ``("answer", prompt)`` and/or ``("plain", "")``."""
        out = []
        if self.prompt:
            out.append(("answer", self.prompt))
        if self.plain_caption:
            out.append(("plain", ""))
        return out


CHOICES = {"dtype": DTYPES, "images": PLACEMENT_MODES}


def config_schema() -> dict[str, Setting]:
    """The keys of a caption config: :class:`CaptionConfig`'s fields, with their types and choices."""
    hints = get_type_hints(CaptionConfig)
    schema = {}
    for f in fields(CaptionConfig):
        hint = hints[f.name]
        kinds = [t for t in get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
        choices = CHOICES.get(f.name)
        schema[f.name] = Setting(kinds[0], tuple(choices) if choices else None,
                                 nullable=type(None) in get_args(hint))
    return schema


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config of :class:`CaptionConfig` keys: an unknown key, a wrong type or a bad choice is a
    :class:`~data_process.core.settings.ConfigError` naming the file and the key."""
    return load_settings(path, config_schema())


def render_prompt(template: str, mention: Mention) -> str:
    return template.replace("{mention}", mention.mention)


def combine_texts(parts: Sequence[str]) -> str:
    """Plain caption and prompted answer as one text: ``"a man on a stage. Barack Obama"``."""
    parts = [p.strip() for p in parts if p and p.strip()]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts[:-1]) + " " + parts[-1]


# ---------------------------------------------------------------------------------------------
# Planning, captioning


@dataclass
class Job:
    """One model call: an image (by content hash) with one rendered prompt."""

    key: str
    image_sha256: str
    prompt: str


@dataclass
class CaptionStats:
    mentions: int = 0
    with_image: int = 0
    captioned: int = 0
    failed: int = 0
    no_image: int = 0
    empty_text: int = 0
    jobs: int = 0
    jobs_from_cache: int = 0
    jobs_run: int = 0
    jobs_failed: int = 0
    images_decoded: int = 0
    model_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)


def cached_caption(cache: JsonlCache, key: str) -> dict[str, Any] | None:
    """The cache record of ``key`` (None when absent); one of the wrong shape (``"text": 5``) is an error naming the
    cache file and line (:mod:`data_process.augment.cache_records`)."""
    rec = cache.get(key)
    if rec is None:
        return None
    if rec.get("status") not in ("ok", "failed"):
        raise record_error(cache, key, "status", f"must be ok or failed, got {rec.get('status')!r:.80}")
    for name, required in (("text" if rec["status"] == "ok" else "reason", True), ("created", False)):
        value = rec.get(name)
        if not isinstance(value, str) and (required or value is not None):
            raise record_error(cache, key, name, f"must be a string, got {value!r:.80}")
    return rec


def cache_key(image_sha256: str, captioner_id: str, prompt: str) -> str:
    return stable_hash({"image_sha256": image_sha256, "model": captioner_id, "prompt": prompt})


def _run_jobs(jobs_by_image: dict[str, list[Job]], paths: dict[str, Path], captioner: Captioner,
              cache: JsonlCache, cfg: CaptionConfig, stats: CaptionStats, progress: bool) -> None:
    from tqdm import tqdm

    shas = list(jobs_by_image)
    if not shas:
        return
    bar = tqdm(total=len(shas), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True)
    pending: list[tuple[Job, Any]] = []

    def flush(force: bool) -> None:
        while pending and (force or len(pending) >= cfg.batch_size):
            chunk = pending[: cfg.batch_size]
            del pending[: cfg.batch_size]
            t0 = time.perf_counter()
            texts = captioner.caption([img for _, img in chunk], [job.prompt for job, _ in chunk])
            stats.model_seconds += time.perf_counter() - t0
            if len(texts) != len(chunk):
                raise RuntimeError(f"captioner {captioner.id} returned {len(texts)} texts for {len(chunk)} images")
            # one fsync for the whole model batch: every answer is on disk before the next batch starts
            cache.put_many([(job.key, {"status": "ok", "text": text, "image_sha256": job.image_sha256,
                                       "model": captioner.id, "prompt": job.prompt, "created": _now()})
                            for (job, _), text in zip(chunk, texts)])
            stats.jobs_run += len(chunk)

    try:
        prepare = getattr(captioner, "prepare_image", None)  # optional backend hook, run in the workers
        for batch in iter_decoded([paths[s] for s in shas], cfg.batch_size, cfg.num_workers, prepare):
            failed = []
            for i, image, reason in batch:
                sha = shas[i]
                if image is None:
                    failed += [(job.key, {"status": "failed", "reason": reason, "image_sha256": sha,
                                          "model": captioner.id, "prompt": job.prompt, "created": _now()})
                               for job in jobs_by_image[sha]]
                    continue
                stats.images_decoded += 1
                pending.extend((job, image) for job in jobs_by_image[sha])
            cache.put_many(failed)
            stats.jobs_failed += len(failed)
            flush(force=False)
            bar.update(len(batch))
            bar.set_postfix(failed=stats.jobs_failed, refresh=False)
        flush(force=True)
    finally:
        bar.close()


def caption_dataset(data_dir: str | Path, out_dir: str | Path, captioner: Captioner, cfg: CaptionConfig,
                    *, progress: bool = True) -> CaptionStats:
    """Caption every mention image of ``data_dir`` and write the captioned dataset to ``out_dir``.

    Returns the run's statistics; ``out_dir/caption_report.json`` holds the same plus failures.
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    _check_out_dir(data_dir, out_dir)
    ds = load_dataset(data_dir)
    cache_path = Path(cfg.cache) if cfg.cache else out_dir / CACHE_FILE
    tasks = cfg.tasks()
    stats = CaptionStats(mentions=len(ds.mentions))

    # 1. Hash images, plan jobs; mentions whose image is missing fail here.
    from tqdm import tqdm

    sha_of_image: dict[str, str | None] = {}  # image name in the records -> content hash (None: failed)
    path_of_sha: dict[str, Path] = {}
    failed_image: dict[str, str] = {}  # image name -> why it is not captioned
    plan: dict[str, list[Job]] = {}  # mention id -> its jobs, in task order
    with JsonlCache(cache_path) as cache, ImageHasher(cache_path.parent / HASHES_FILE) as hasher:
        for m in tqdm(ds.mentions, desc="hashing images", unit="mention", disable=not progress, dynamic_ncols=True):
            if m.image is None:
                stats.no_image += 1
                continue
            stats.with_image += 1
            if m.image not in sha_of_image:
                sha, path, reason = _hash_image(ds.root, m.image, hasher)
                sha_of_image[m.image] = sha
                if sha is None:
                    failed_image[m.image] = reason
                else:
                    path_of_sha.setdefault(sha, path)
            sha = sha_of_image[m.image]
            if sha is None:
                continue
            plan[m.id] = [Job(cache_key(sha, captioner.id, render_prompt(t, m)), sha, render_prompt(t, m))
                          for _, t in tasks]

        # 2. Unique uncached jobs grouped by image.
        jobs_by_image: dict[str, list[Job]] = {}
        seen: set[str] = set()
        for m_jobs in plan.values():
            for job in m_jobs:
                if job.key in seen:
                    continue
                seen.add(job.key)
                stats.jobs += 1
                rec = cached_caption(cache, job.key)
                if rec is not None and (rec.get("status") == "ok" or not cfg.retry_failed):
                    stats.jobs_from_cache += 1
                    continue
                jobs_by_image.setdefault(job.image_sha256, []).append(job)

        # 3. Decode in workers, caption in batches, cache every answer as it comes.
        _run_jobs(jobs_by_image, path_of_sha, captioner, cache, cfg, stats, progress)

        # 4. Assemble mention captions from the cache.
        new_mentions = []
        template_of = dict(tasks)
        for m in ds.mentions:
            caption = None
            if m.image is not None:
                m_jobs = plan.get(m.id)
                if m_jobs is None:
                    reason = failed_image[m.image]
                    stats.failures.append({"mention_id": m.id, "image": m.image, "reason": reason})
                else:
                    caption, reason = _mention_caption(m_jobs, [n for n, _ in tasks], template_of, cache, captioner)
                    if caption is None:
                        stats.failures.append({"mention_id": m.id, "image": m.image, "reason": reason})
            if caption is not None:
                stats.captioned += 1
                stats.empty_text += not caption["text"]
            new_mentions.append(replace(m, caption=caption))
    stats.failed = len(stats.failures)

    summary = {
        "mode": "caption",
        "source": str(data_dir),
        "captioner": captioner.id,
        "model": getattr(captioner, "model_name", captioner.id),
        "prompt": cfg.prompt,
        "plain_caption": cfg.plain_caption,
        "images": cfg.images,
        "cache": str(cache_path),
        "created": _now(),
    }
    stats.elapsed_seconds = time.perf_counter() - started
    report = {**summary, **{k: v for k, v in asdict(stats).items() if k != "failures"},
              "device": str(getattr(captioner, "device", "")), "dtype": str(getattr(captioner, "dtype", "")),
              "images_per_second": (stats.images_decoded / stats.model_seconds) if stats.model_seconds else None,
              "failures": stats.failures}
    _write_output(ds, out_dir, new_mentions, cfg.images, summary, report)
    return stats


def _hash_image(root: Path, name: str, hasher: ImageHasher) -> tuple[str | None, Path | None, str | None]:
    """``(sha256, real path, None)`` for a mention image that is a regular file inside the dataset folder, else
    ``(None, None, reason)``: an absolute or ``../`` path, a symlink leading out, a NUL byte, a FIFO or a device
    (checked without opening it) is a failed image, never a read outside the folder or a hang."""
    try:
        path = resolve_in_dataset(root, name)
    except UnsafePath as exc:
        return None, None, f"unsafe path: {exc}"
    problem = regular_file_problem(path)
    if problem is not None:
        return None, None, problem
    try:
        sha = hasher.sha256(path)
    except OSError as exc:
        return None, None, f"unreadable: {exc}"
    return (None, None, "missing: file not found") if sha == MISSING else (sha, path, None)


def _mention_caption(jobs: list[Job], names: list[str], templates: dict[str, str], cache: JsonlCache,
                     captioner: Captioner) -> tuple[dict[str, Any] | None, str | None]:
    texts: dict[str, str] = {}
    reasons = []
    created = []
    for name, job in zip(names, jobs):
        rec = cached_caption(cache, job.key)
        if rec is None:
            reasons.append(f"{name}: not captioned")
        elif rec.get("status") != "ok":
            reasons.append(str(rec.get("reason", "failed")))
        else:
            texts[name] = rec["text"]
            created.append(rec.get("created"))
    if not texts:
        return None, "; ".join(dict.fromkeys(reasons)) or "failed"
    caption: dict[str, Any] = {"text": combine_texts([texts[n] for n in names if n in texts])}
    for n in names:
        if n in texts:
            caption[n] = texts[n]
    caption["provenance"] = {
        "model": getattr(captioner, "model_name", captioner.id),
        "captioner": captioner.id,
        "prompt": templates.get("answer"),
        "prompt_rendered": next((j.prompt for n, j in zip(names, jobs) if n == "answer"), None),
        "plain_caption": "plain" in templates,
        "image_sha256": jobs[0].image_sha256,
        "created": max(c for c in created if c) if any(created) else _now(),
    }
    return caption, None


# ---------------------------------------------------------------------------------------------
# Output folder


def _check_out_dir(data_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == data_dir.resolve():
        raise ValueError(f"--out {out_dir} is the --data folder; write the captioned dataset to a new folder")


def _write_output(ds: Dataset, out_dir: Path, mentions: list[Mention], images_mode: str,
                  summary: dict[str, Any], report: dict[str, Any]) -> None:
    """The captioned dataset and its report, published as one set (``save_dataset``): a run killed while writing
    leaves a folder ``load_dataset`` refuses, never one run's records beside another run's report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entities, mentions = place_record_images(out_dir, ds.entities, mentions, images_mode, src_root=ds.root)
    info = DatasetInfo(name=ds.info.name, source_format=ds.info.source_format, split_rule=ds.info.split_rule,
                       notes={**ds.info.notes, "captions": summary})
    save_dataset(out_dir, info, entities, mentions,
                 extra_files={REPORT_FILE: json.dumps(report, indent=2, ensure_ascii=False) + "\n"})


# ---------------------------------------------------------------------------------------------
# Import of existing captions


@dataclass(frozen=True)
class CaptionEntry:
    """One caption from a user file: ``kind`` is ``id``, ``image`` or ``key`` (JSON object: either)."""

    kind: str
    key: str
    text: str
    where: str


def read_caption_file(path: str | Path) -> list[CaptionEntry]:
    """Parse ``{key: text}`` JSON or ``{"id"|"image": ..., "caption"|"text": ...}`` JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions file not found")
    if path.suffix == ".jsonl":
        return _read_caption_jsonl(path)
    if path.suffix != ".json":
        raise DataError(path, "file", None, "captions file must end in .json (object) or .jsonl (lines)")

    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen:
                raise DataError(path, f"key {k!r}", "id", "duplicate key")
            seen.add(k)
        return dict(items)

    try:
        obj = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, "file", None, f"must be a JSON object {{id or image file name: caption}}, "
                                            f"got {type(obj).__name__}")
    out = []
    for key, text in obj.items():
        if not isinstance(text, str):
            raise DataError(path, f"key {key!r}", "caption", f"must be a string, got {type(text).__name__}")
        out.append(CaptionEntry("key", key, text, f"key {key!r}"))
    return out


def _read_caption_jsonl(path: Path) -> list[CaptionEntry]:
    out = []
    first_line: dict[tuple[str, str], int] = {}
    for lineno, obj in iter_json_lines(path):
        where = f"line {lineno}"
        if not isinstance(obj, dict):
            raise DataError(path, where, None, f"record must be a JSON object, got {type(obj).__name__}")
        for k in obj:
            if k not in ("id", "image", "caption", "text"):
                raise DataError(path, where, k, "is not a field of a caption record (id|image, caption|text)")
        keys = [k for k in ("id", "image") if k in obj]
        if len(keys) != 1:
            raise DataError(path, where, "id", "record must have exactly one of 'id' or 'image'")
        kind = keys[0]
        key = obj[kind]
        if not isinstance(key, str) or not key:
            raise DataError(path, where, kind, f"must be a non-empty string, got {key!r}")
        texts = [k for k in ("caption", "text") if k in obj]
        if len(texts) != 1:
            raise DataError(path, where, "caption", "record must have exactly one of 'caption' or 'text'")
        text = obj[texts[0]]
        if not isinstance(text, str):
            raise DataError(path, where, texts[0], f"must be a string, got {type(text).__name__}")
        if (kind, key) in first_line:
            raise DataError(path, where, kind, f"duplicate {kind} {key!r}, first seen on line {first_line[kind, key]}")
        first_line[kind, key] = lineno
        out.append(CaptionEntry(kind, key, text, where))
    return out


def import_captions(data_dir: str | Path, captions_file: str | Path, out_dir: str | Path, *,
                    source_model: str = "unknown", prompt: str | None = None, images: str = "symlink"
                    ) -> dict[str, Any]:
    """Attach captions from a user file to the mentions of ``data_dir``; write the dataset to ``out_dir``.

    Keys match a mention id, an image path relative to the dataset, or an image file name. A mention id
    wins over an image key for the same mention. Returns the report (also written to ``caption_report.json``).
    """
    data_dir, out_dir, captions_file = Path(data_dir), Path(out_dir), Path(captions_file)
    _check_out_dir(data_dir, out_dir)
    if images not in PLACEMENT_MODES:
        raise ValueError(f"images must be one of {', '.join(PLACEMENT_MODES)}, got {images!r}")
    ds = load_dataset(data_dir)
    entries = read_caption_file(captions_file)

    ids = {m.id for m in ds.mentions}
    by_image: dict[str, set[str]] = {}  # image key (relative path or file name) -> relative paths
    for m in ds.mentions:
        if m.image:
            by_image.setdefault(m.image, set()).add(m.image)
            by_image.setdefault(Path(m.image).name, set()).add(m.image)

    by_id: dict[str, CaptionEntry] = {}
    by_rel: dict[str, CaptionEntry] = {}
    for e in entries:
        kind = e.kind
        if kind == "key":
            kind = "id" if e.key in ids else "image"
        field_name = "id" if e.kind == "key" else kind
        if kind == "id":
            if e.key not in ids:
                raise DataError(captions_file, e.where, "id", f"unknown mention id {e.key!r}")
            by_id[e.key] = e
            continue
        rels = by_image.get(e.key)
        if not rels:
            what = "mention id or image file name" if e.kind == "key" else "image file name"
            raise DataError(captions_file, e.where, field_name, f"unknown {what} {e.key!r}")
        if len(rels) > 1:
            raise DataError(captions_file, e.where, field_name,
                            f"image file name {e.key!r} matches several images ({', '.join(sorted(rels))}); "
                            "use the path relative to the dataset folder")
        rel = next(iter(rels))
        if rel in by_rel:
            raise DataError(captions_file, e.where, field_name,
                            f"image {rel!r} already has a caption from {by_rel[rel].where}")
        by_rel[rel] = e

    created = _now()
    new_mentions = []
    counts = {"mentions": len(ds.mentions), "captioned": 0, "by_id": 0, "by_image": 0, "without_caption": 0,
              "entries": len(entries)}
    for m in ds.mentions:
        e = by_id.get(m.id)
        if e is not None:
            counts["by_id"] += 1
        elif m.image and m.image in by_rel:
            e = by_rel[m.image]
            counts["by_image"] += 1
        if e is None:
            counts["without_caption"] += 1
            new_mentions.append(replace(m, caption=None))
            continue
        counts["captioned"] += 1
        prov = {"model": source_model, "prompt": prompt, "created": created, "imported_from": str(captions_file),
                "record": e.where}
        new_mentions.append(replace(m, caption={"text": e.text.strip(), "provenance": prov}))
    summary = {"mode": "import", "source": str(data_dir), "captions_file": str(captions_file),
               "model": source_model, "prompt": prompt, "images": images, "created": created}
    report = {**summary, **counts}
    _write_output(ds, out_dir, new_mentions, images, summary, report)
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def _run_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel caption",
                                description="Caption mention images with BLIP-2 into a new unified dataset "
                                            "folder. 'python -m data_process.augment.caption import -h' imports "
                                            "existing captions instead.")
    d = CaptionConfig()
    p.add_argument("--config", help="YAML file of settings (keys as below with underscores); flags override it")
    p.add_argument("--data", required=True, help="unified dataset folder to read")
    p.add_argument("--out", required=True, help="new dataset folder to write (with caption_report.json)")
    p.add_argument("--model", help=f"hub name or local path of a BLIP-2 checkpoint (default {d.model})")
    p.add_argument("--prompt", help="prompt template, {mention} is replaced by the mention; '' for none "
                                    f"(default {d.prompt!r})")
    add_bool(p, "plain-caption", None, "also caption without a prompt")
    p.add_argument("--num-beams", type=int, help=f"beam size (default {d.num_beams}: greedy)")
    p.add_argument("--max-new-tokens", type=int, help=f"default {d.max_new_tokens}")
    p.add_argument("--batch-size", type=int, help=f"images per model call (default {d.batch_size})")
    p.add_argument("--num-workers", type=int, help=f"image decoding processes (default {d.num_workers})")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: auto = CPU cores minus decoding workers, at least 1)")
    p.add_argument("--dtype", choices=DTYPES, help="auto (default): bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--cache", help=f"caption cache (JSON Lines; default DIR_OUT/{CACHE_FILE})")
    p.add_argument("--images", choices=PLACEMENT_MODES, help="symlink (default) the source image folders into "
                   "DIR_OUT, copy the images, or rewrite image paths relative to DIR_OUT")
    add_bool(p, "retry-failed", None, "try again images the cache records as failed")
    add_bool(p, "quiet", False, "no progress bars")
    return p


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_process.augment.caption import",
                                description="Import existing captions: a JSON object {mention id or image file "
                                            "name: text} or JSON Lines {\"id\"|\"image\": ..., \"caption\"|\"text\": ...}.")
    p.add_argument("--data", required=True, help="unified dataset folder to read")
    p.add_argument("--captions", required=True, help="captions file (.json or .jsonl)")
    p.add_argument("--out", required=True, help="new dataset folder to write")
    p.add_argument("--source-model", default="unknown", help="model that made the captions (for provenance)")
    p.add_argument("--prompt", default=None, help="prompt used to make them, if known (for provenance)")
    p.add_argument("--images", choices=PLACEMENT_MODES, default="symlink")
    return p


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for f in fields(CaptionConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return CaptionConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """The command (bad input, a bad setting, a full or read-only disk raise; :func:`run_main` makes them one
    ``error:`` line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "import":
        a = _import_parser().parse_args(argv[1:])
        report = import_captions(a.data, a.captions, a.out, source_model=a.source_model, prompt=a.prompt,
                                 images=a.images)
        print(json.dumps({k: report[k] for k in ("mentions", "captioned", "by_id", "by_image", "without_caption")}))
        return 0
    if argv and argv[0] == "run":
        argv = argv[1:]
    a = _run_parser().parse_args(argv)
    cfg = config_from_args(a)
    import torch

    from data_process.augment.captioners import Blip2Captioner
    from data_process.core.devices import cpu_threads

    torch.set_num_threads(a.threads if a.threads > 0 else cpu_threads(cfg.num_workers))

    captioner = Blip2Captioner(cfg.model, device=cfg.device, dtype=cfg.dtype,
                               settings=GenerationSettings(cfg.num_beams, cfg.max_new_tokens))
    stats = caption_dataset(a.data, a.out, captioner, cfg, progress=not a.quiet)
    print(json.dumps({k: getattr(stats, k) for k in ("mentions", "captioned", "failed", "no_image", "jobs_run",
                                                     "jobs_from_cache", "jobs_failed")}))
    print(f"wrote {Path(a.out)} (report: {Path(a.out) / REPORT_FILE})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
