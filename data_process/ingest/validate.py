"""Validation report for a unified dataset folder; run after every conversion and usable alone.

    python -m data_process.ingest.validate DIR [--images {verify,exists,none}] [--no-write]

Counts entities, mentions per split, and problems. Each problem is either an **error** or a counted
**warning**:

* errors (a conversion with any error fails and writes nothing; ``validate`` exits with status 1):
  malformed records or fields (``malformed_records``: bad JSON, missing/mistyped field, bad span, unknown
  split, ...), duplicate entity ids, duplicate mention ids, mentions whose gold entity is not in the KB,
  candidate ids not in the KB, image paths that are absolute or leave the dataset folder, an unreadable
  ``dataset.json``.
* warnings (counted, reported, the dataset is still written): missing mention/entity images, unreadable
  mention/entity images (PIL cannot open or verify them), empty sentences, mention strings not found in their
  sentence, empty splits (not for a KB-only dataset, ``dataset.json`` kind ``kb``), a missing ``dataset.json``,
  and (from a conversion) image references the reader refused (``refused_images``: a symlink out of the release's
  image folder, an absolute or ``..`` path) and non-essential fields the reader mended (``repaired_fields``: a
  description, an alias, an image name, a caption holding a lone surrogate or of the wrong type; the record kept).
  What the source holds but a reader does not convert (a Wikidata dump's properties, lexemes, ...) is counted
  under ``skipped``.

The report is written as ``DIR/validation.json`` and ``DIR/validation.txt`` (atomically) and printed. A folder
whose writing was interrupted (``.incomplete`` marker, ``records.check_published``) is refused, not reported on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from tqdm import tqdm

from data_process.core.settings import ToolkitParser, add_bool
from data_process.core.durable_io import atomic_write_bytes
from data_process.core.entry import run_main
from data_process.core.records import (
    DATASET_KINDS,
    ENTITIES_FILE,
    INFO_FILE,
    MENTIONS_FILE,
    SPLITS,
    DataError,
    DatasetInfo,
    Entity,
    Mention,
    check_published,
    entity_from_dict,
    iter_records,
    mention_from_dict,
    parse_json,
    utf8_bytes,
)

REPORT_JSON = "validation.json"
REPORT_TXT = "validation.txt"
MAX_EXAMPLES = 5
IMAGE_CHECKS = ("verify", "exists", "none")

ERROR_KINDS = (
    "malformed_records",
    "duplicate_entity_ids",
    "duplicate_mention_ids",
    "gold_not_in_kb",
    "candidates_not_in_kb",
    "image_paths_outside_dataset",
    "bad_dataset_info",
)
WARNING_KINDS = (
    "missing_mention_images",
    "unreadable_mention_images",
    "missing_entity_images",
    "unreadable_entity_images",
    "empty_sentences",
    "mention_not_in_sentence",
    "empty_splits",
    "missing_dataset_info",
    "refused_images",
    "repaired_fields",
)


@dataclass
class ValidationReport:
    """Counts and problems of one unified dataset. ``ok`` is ``True`` when there is no error."""

    dataset: str
    root: str
    entities: int = 0
    mentions: int = 0
    mentions_per_split: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    mentions_with_span: int = 0
    mentions_with_image: int = 0
    ambiguous_surface_forms: int = 0
    entities_with_images: int = 0
    image_check: str = "verify"
    images: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ERROR_KINDS})
    warnings: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WARNING_KINDS})
    examples: dict[str, list[str]] = field(default_factory=dict)
    # filled by a conversion (data_process.ingest.prepare): what the reader left out of the release
    records_read: int | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)       # {"file", "record", "field", "reason"}
    absent_ids: dict[str, list[str]] = field(default_factory=dict)     # ids a release lists without a record
    refused_images: list[dict[str, Any]] = field(default_factory=list)  # image references a reader left out
    repaired: list[dict[str, Any]] = field(default_factory=list)        # non-essential fields mended, records kept
    skipped: dict[str, int] = field(default_factory=dict)               # what the source holds, not converted
    kind: str = "mel"                                                   # dataset.json "kind": mel | kb

    @property
    def ok(self) -> bool:
        return not any(self.errors.values())

    def add(self, kind: str, example: str) -> None:
        table = self.errors if kind in self.errors else self.warnings
        table[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def error_summary(self) -> str:
        """One line per error kind with its first example (for exception messages)."""
        lines = []
        for kind, n in self.errors.items():
            if n:
                first = self.examples.get(kind, [""])[0]
                lines.append(f"{kind}: {n} (e.g. {first})")
        return "; ".join(lines)


def _load_records(path: Path, parse, report: ValidationReport, dup_kind: str, progress: bool) -> list:
    """Parse a JSON Lines file tolerantly: bad lines and duplicate ids are counted, good records kept."""

    def on_error(err: DataError, kind: str) -> None:
        report.add(dup_kind if kind == "duplicate" else "malformed_records", str(err))

    records = iter_records(path, parse, on_error)
    return list(tqdm(records, desc=f"validate {path.name}", disable=not progress, unit="record"))


IMAGE_CACHE_SIZE = 1 << 14   # image files' states remembered (a file met again is not opened again); then forgotten


def _image_state(path: Path, check: str, cache: dict[Path, str]) -> str:
    """``"ok"``, ``"missing"`` or ``"unreadable"``. The state of a file found is remembered in ``cache`` (emptied
    when it holds :data:`IMAGE_CACHE_SIZE` paths), a missing file's is not (a stat is cheap): memory stays bounded
    however many images a dataset names."""
    if path in cache:
        return cache[path]
    if not path.is_file():
        return "missing"
    if check == "verify":
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.verify()
            state = "ok"
        except Exception:  # noqa: BLE001 - any PIL failure means unreadable; counted, never hidden
            state = "unreadable"
    else:
        state = "ok"
    if len(cache) >= IMAGE_CACHE_SIZE:
        cache.clear()
    cache[path] = state
    return state


def _inside(rel: str) -> bool:
    p = PurePosixPath(rel.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (len(rel) > 1 and rel[1] == ":")


class RecordChecks:
    """The checks of one record at a time that :func:`validate_records` makes, counted into ``report``; memory is
    the report's counts and examples and a bounded cache of image states, so a step writing a KB as a stream
    (``prepare --format wikidata``) checks each entity as it writes it. Image paths resolve against ``root``."""

    def __init__(self, root: str | Path, report: ValidationReport, image_check: str):
        if image_check not in IMAGE_CHECKS:
            raise ValueError(f"image_check must be one of {', '.join(IMAGE_CHECKS)}, got {image_check!r}")
        self.root, self.rep, self.image_check = Path(root), report, image_check
        self.cache: dict[Path, str] = {}
        self.counts = {side: {"referenced": 0, "missing": 0, "unreadable": 0} for side in ("mention", "entity")}
        report.image_check = image_check
        report.images = self.counts

    def image(self, rel: str, side: str, owner: str) -> None:
        if not _inside(rel):
            self.rep.add("image_paths_outside_dataset", f"{side} {owner!r}: {rel!r}")
            return
        self.counts[side]["referenced"] += 1
        if self.image_check == "none":
            return
        state = _image_state(self.root / rel, self.image_check, self.cache)
        if state != "ok":
            self.counts[side][state] += 1
            self.rep.add(f"{state}_{side}_images", f"{side} {owner!r}: {rel}")

    def entity(self, e: Entity) -> None:
        self.rep.entities += 1
        if e.images:
            self.rep.entities_with_images += 1
        for rel in e.images:
            self.image(rel, "entity", e.id)


def validate_records(
    root: str | Path,
    name: str,
    entities: Iterable[Entity],
    mentions: Iterable[Mention],
    *,
    image_check: str = "verify",
    progress: bool = True,
    report: ValidationReport | None = None,
) -> ValidationReport:
    """Check already-parsed records; image paths resolve against ``root``."""
    rep = report or ValidationReport(dataset=name, root=str(root))
    checks = RecordChecks(root, rep, image_check)
    entities = list(entities)
    mentions = list(mentions)
    rep.entities = 0
    for e in tqdm(entities, desc="check entities", disable=not progress, unit="entity"):
        checks.entity(e)
    kb = {e.id for e in entities}
    rep.mentions = len(mentions)
    for m in tqdm(mentions, desc="check mentions", disable=not progress, unit="mention"):
        rep.mentions_per_split[m.split] = rep.mentions_per_split.get(m.split, 0) + 1
        if m.gold_id not in kb:
            rep.add("gold_not_in_kb", f"mention {m.id!r}: gold {m.gold_id!r}")
        missing = [c for c in (m.candidates or ()) if c not in kb]
        if missing:
            rep.add("candidates_not_in_kb", f"mention {m.id!r}: candidate {missing[0]!r}")
        if not m.sentence.strip():
            rep.add("empty_sentences", f"mention {m.id!r}")
        elif m.mention not in m.sentence:
            rep.add("mention_not_in_sentence", f"mention {m.id!r}: {m.mention!r}")
        if m.span is not None:
            rep.mentions_with_span += 1
        if m.image:
            rep.mentions_with_image += 1
            checks.image(m.image, "mention", m.id)
    golds: dict[str, set[str]] = {}
    for m in mentions:
        golds.setdefault(m.mention, set()).add(m.gold_id)
    rep.ambiguous_surface_forms = sum(1 for g in golds.values() if len(g) > 1)
    if rep.kind == "kb":        # a KB alone: no mentions is what it is
        if mentions:
            rep.add("bad_dataset_info", f"kind 'kb' (a KB-only dataset), but {len(mentions)} mentions")
    else:
        for split in SPLITS:
            if rep.mentions_per_split.get(split, 0) == 0:
                rep.add("empty_splits", split)
    return rep


def validate_dataset(root: str | Path, *, image_check: str = "verify", progress: bool = True,
                     allow_incomplete: bool = False) -> ValidationReport:
    """Validate a unified dataset folder, counting every problem instead of stopping at the first.

    A folder still marked incomplete is a :class:`DataError` (``allow_incomplete``: the step writing it checks its
    own staged files)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if not allow_incomplete:
        check_published(root)
    rep = ValidationReport(dataset=root.name, root=str(root))
    info_path = root / INFO_FILE
    if info_path.is_file():
        try:
            info = parse_json(info_path.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("name"), str):
                raise ValueError("not an object with a string 'name'")
            kind = DatasetInfo(**info).kind  # the fields records.load_dataset requires and accepts
            if kind not in DATASET_KINDS:
                raise ValueError(f"'kind' must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
            rep.dataset, rep.kind = info["name"], kind
        except (ValueError, TypeError) as exc:
            rep.add("bad_dataset_info", f"{info_path}: {exc}")
    else:
        rep.add("missing_dataset_info", str(info_path))
    entities = _load_records(root / ENTITIES_FILE, entity_from_dict, rep, "duplicate_entity_ids", progress)
    mentions = _load_records(root / MENTIONS_FILE, mention_from_dict, rep, "duplicate_mention_ids", progress)
    return validate_records(root, rep.dataset, entities, mentions, image_check=image_check, progress=progress, report=rep)


def format_report(rep: ValidationReport) -> str:
    """A short human-readable summary."""
    split_text = ", ".join(f"{s} {n}" for s, n in rep.mentions_per_split.items())
    lines = [
        f"dataset {rep.dataset} ({rep.root}): {'OK' if rep.ok else 'ERRORS'}"
        + (" (a KB-only dataset: entities, no mentions)" if rep.kind == "kb" else ""),
        f"  entities {rep.entities} ({rep.entities_with_images} with images)",
        f"  mentions {rep.mentions}: {split_text}; {rep.mentions_with_span} with span, "
        f"{rep.mentions_with_image} with image; {rep.ambiguous_surface_forms} surface forms name several entities",
    ]
    for side, c in rep.images.items():
        lines.append(
            f"  {side} images ({rep.image_check}): {c['referenced']} referenced, {c['missing']} missing, "
            f"{c['unreadable']} unreadable"
        )
    if rep.records_read is not None:
        lines.append(f"  dropped records: {len(rep.dropped)} of {rep.records_read} read (all listed in "
                     f"{REPORT_JSON})")
        for d in rep.dropped[:MAX_EXAMPLES]:
            lines.append(f"    dropped: {DataError(d['file'], d['record'], d['field'], d['reason'])}")
    if rep.refused_images:
        lines.append(f"  refused images: {len(rep.refused_images)} image references left out (all listed in "
                     f"{REPORT_JSON})")
    if rep.repaired:
        lines.append(f"  repaired fields: {len(rep.repaired)} non-essential fields mended, their records kept (all "
                     f"listed in {REPORT_JSON})")
        for d in rep.repaired[:MAX_EXAMPLES]:
            lines.append(f"    repaired: {DataError(d['file'], d['record'], d['field'], d['reason'])}")
    if rep.skipped:
        lines.append("  skipped (in the source, not converted): "
                     + ", ".join(f"{kind} {n:,}" for kind, n in rep.skipped.items()))
    for name, ids in rep.absent_ids.items():
        lines.append(f"  {name}: {len(ids)} ids without a record (listed in {REPORT_JSON})"
                     + (f", e.g. {', '.join(ids[:MAX_EXAMPLES])}" if ids else ""))
    for title, table in (("errors", rep.errors), ("warnings", rep.warnings)):
        nonzero = {k: v for k, v in table.items() if v}
        lines.append(f"  {title}: " + (", ".join(f"{k} {v}" for k, v in nonzero.items()) if nonzero else "none"))
        for kind in nonzero:
            for ex in rep.examples.get(kind, []):
                lines.append(f"    {kind}: {ex}")
    return utf8_bytes("\n".join(lines) + "\n").decode("utf-8")   # printable: a lone surrogate shows as \\udXXX


def report_files(rep: ValidationReport) -> dict[str, str]:
    """``{file name: text}`` of the report (``records.save_dataset``'s ``extra_files``)."""
    return {REPORT_JSON: json.dumps(rep.to_dict(), indent=2, ensure_ascii=False) + "\n", REPORT_TXT: format_report(rep)}


def write_report(rep: ValidationReport, folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    for name, text in report_files(rep).items():
        atomic_write_bytes(folder / name, utf8_bytes(text))
    return folder / REPORT_JSON, folder / REPORT_TXT


def main(argv: list[str] | None = None) -> int:
    ap = ToolkitParser(prog="dim-mel validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="unified dataset folder")
    ap.add_argument("--images", choices=IMAGE_CHECKS, default="verify",
                    help="verify: open and verify every image with PIL; exists: only check files exist")
    add_bool(ap, "write", True, "write validation.json/.txt (--no-write: print only)")
    add_bool(ap, "quiet", False, "no progress bars")
    args = ap.parse_args(argv)
    rep = validate_dataset(args.dir, image_check=args.images, progress=not args.quiet)
    if args.write:
        write_report(rep, args.dir)
    print(format_report(rep), end="")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    run_main(main)
