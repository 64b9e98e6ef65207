"""Convert a public MEL release to the unified format, validate it, and publish it atomically.

    python -m data_process.ingest.prepare --format {melbench,mimic,ghmfc,wikidiverse,wikiperson,unified,wikidata} \\
        --src DIR_OR_FILE --out DIR [--dataset-name NAME] [--split-seed 0] [--splits 0.7,0.1,0.2] \\
        [--image-dir DIR] [--images {symlink,copy,rewrite,none}] [--image-check {verify,exists,none}] \\
        [--strict] [--max-invalid 1%] [--annotations FILE] [--entity-text {brief,long}] [--dev-from-train P] \\
        [--language en] [--ids FILE] [--instance-of Q5,Q515] [--min-sitelinks N]

Steps: the format's reader builds the records (``data_process.ingest.readers``), dropping bad records and listing
them (``--strict``: the first bad record is an error; more dropped records than ``--max-invalid``, default 1% of the
records read, fail the conversion); they are written with ``records.save_dataset`` into a temporary folder beside
``--out``; image folders are attached; the folder is validated (``data_process.ingest.validate``). With any validation error (or any reader error) the temporary folder is
removed and ``--out`` is left as it was (absent, or the previous dataset). Otherwise ``validation.json`` and
``validation.txt`` (which list every dropped record: file, record, field, reason; ids the release lists
without a record; image references refused) join the set and the folder replaces ``--out`` by rename. The staged
folder carries the ``.incomplete`` marker from its first file to its report (``records.save_dataset``), so a run
killed mid-way leaves nothing that ``load_dataset`` or ``validate`` accepts.

``--out`` is replaced only when it is absent, empty, or holds nothing but what ``prepare`` writes
(:data:`OWN_ENTRIES`: the dataset files, the report, ``images``); a folder holding anything else (a project folder
with a ``dataset.json`` beside other files) is refused, and nothing in it is touched.

Images (``--images``, see ``data_process.core.placement``): ``symlink`` (default) makes folder symlinks inside the
dataset (``images/mention``, ``images/kb``) pointing to the *absolute* source image folders, so record paths stay
relative to the dataset folder and nothing is copied; moving the source breaks the links (validation then reports
missing images). ``copy`` copies only the referenced image files; ``rewrite`` points the paths at the source files.
``none`` drops image references (text-only dataset).

A Wikidata dump (``--format wikidata``) is not held in memory: the staging folder is made first, the reader
(``readers.wikidata.stream_wikidata``) hands each kept entity over as it reads it, and it is written to the staged
``entities.jsonl`` at once and checked as validation checks it (``validate.RecordChecks``: counts, image paths);
the reader refuses repeated ids and writes only records that parse back, so the published folder and its report
are those :func:`publish` makes of the same entities held in a list. Its records need no image placement (no
linked image folders: P18 names are not downloaded). Memory stays flat in the size of the dump (the reader's
bounds: its module docstring); any error removes the staging folder, and ``--out`` is left as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from data_process.core.settings import ToolkitParser, add_bool
from data_process.core.entry import run_main
from data_process.core.placement import PLACEMENT_MODES, place_record_images
from data_process.core.records import (ENTITIES_FILE, INCOMPLETE_MARKER, INFO_FILE, MENTIONS_FILE, Entity,
                                       complete_dataset, jsonl_bytes, save_dataset)
from data_process.ingest.readers import READERS
from data_process.ingest.readers.common import Converted, parse_ratios
from data_process.ingest.readers.wikidata import stream_wikidata
from data_process.ingest.validate import (IMAGE_CHECKS, REPORT_JSON, REPORT_TXT, RecordChecks, ValidationReport,
                                          format_report, report_files, validate_dataset, write_report)

IMAGE_MODES = (*PLACEMENT_MODES, "none")
DEFAULT_MAX_INVALID = "1%"
FORMATS = tuple(READERS)
DEFAULT_SPLITS = "0.7,0.1,0.2"
# what prepare writes into --out: a folder holding anything else is never replaced
OWN_ENTRIES = frozenset({INFO_FILE, ENTITIES_FILE, MENTIONS_FILE, REPORT_JSON, REPORT_TXT, "images",
                         INCOMPLETE_MARKER})


class ConversionError(ValueError):
    """Validation found errors; nothing was written. ``report`` holds the full report."""

    def __init__(self, out: Path, report: ValidationReport):
        self.report = report
        super().__init__(f"{out}: conversion failed validation, nothing written: {report.error_summary()}")


def _no_images(e: Entity) -> Entity:
    return dataclasses.replace(e, images=()) if e.images else e


def _strip_images(converted: Converted) -> Converted:
    return dataclasses.replace(
        converted,
        entities=[_no_images(e) for e in converted.entities],
        mentions=[dataclasses.replace(m, image=None) if m.image else m for m in converted.mentions],
        image_links={},
    )


class TooManyInvalidRecords(ValueError):
    """More records failed than ``--max-invalid`` allows; nothing was written."""


def parse_max_invalid(spec: str | int | float, records: int) -> int:
    """``"1%"`` -> 1% of ``records`` (rounded down); ``"25"`` or 25 -> 25 records."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(records * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(f"--max-invalid must be a count (e.g. 25) or a share of the records (e.g. 1%), got "
                         f"{spec!r}") from None


def check_invalid(converted: Converted, max_invalid: str | int | float) -> None:
    """Refuse a conversion whose reader dropped more records than ``max_invalid`` allows."""
    allowed = parse_max_invalid(max_invalid, converted.records_read)
    n = len(converted.dropped)
    if n > allowed:
        shown = "; ".join(str(d) for d in converted.dropped[:3])
        raise TooManyInvalidRecords(
            f"{n} of {converted.records_read} records are invalid, more than --max-invalid {max_invalid} allows "
            f"({allowed}); nothing written. First: {shown}. Fix the release, raise --max-invalid, or use --strict "
            "to stop at the first bad record")


def _check_replaceable(out: Path) -> None:
    """Refuse an ``--out`` that holds anything prepare did not write (:data:`OWN_ENTRIES`)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out}: exists and is not a dataset folder; refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out}: holds entries prepare did not write ({shown}); refusing to replace it "
                              "(choose a new or empty --out, or one holding only a dataset prepare wrote)")


def _open_permissions(stage: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give the published dataset the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)
    for folder, dirs, files in os.walk(stage):  # does not follow symlinks
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage`` with renames; the previous ``out`` survives any failure before the swap."""
    if not out.exists():
        os.replace(stage, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    backup.rmdir()
    os.replace(out, backup)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def publish(
    converted: Converted,
    out: str | Path,
    *,
    images: str = "symlink",
    check_images: bool | str = True,
    echo: bool = True,
    progress: bool = False,
    max_invalid: str | int | float = DEFAULT_MAX_INVALID,
) -> tuple[Path, ValidationReport]:
    """Write ``converted`` to ``out`` atomically after validating it; return ``(out, report)``.

    ``check_images``: ``True``/"verify" (PIL verify), "exists", or ``False``/"none". The report lists the records
    the reader dropped and the ids without a record. Raises :class:`TooManyInvalidRecords` when more records were
    dropped than ``max_invalid`` allows, :class:`ConversionError` when the report has errors (nothing written).
    """
    check_invalid(converted, max_invalid)
    image_check = _image_options(images, check_images)
    out = Path(out)
    _check_replaceable(out)
    if images == "none":
        converted = _strip_images(converted)
    with _staging(out) as stage:
        if images != "none":
            entities, mentions = place_record_images(stage, converted.entities, converted.mentions, images,
                                                     links=converted.image_links)
            converted = dataclasses.replace(converted, entities=entities, mentions=mentions)
        save_dataset(stage, converted.info, converted.entities, converted.mentions, complete=False)
        report = validate_dataset(stage, image_check=image_check, progress=progress, allow_incomplete=True)
        _publish_stage(stage, out, converted, report, echo)
    if echo:
        print(format_report(report), end="")
    return out, report


def _image_options(images: str, check_images: bool | str) -> str:
    """Check ``--images`` and ``--image-check``; the image check's name."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    image_check = {True: "verify", False: "none"}.get(check_images, check_images)  # type: ignore[arg-type]
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {', '.join(IMAGE_CHECKS)}, got {check_images!r}")
    return image_check


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A new temporary folder beside ``out``, removed when the block fails (a publish renames it to ``out``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish_stage(stage: Path, out: Path, converted: Converted, report: ValidationReport, echo: bool) -> None:
    """Add what the reader left out to the staged folder's ``report``; publish the folder as ``out`` when the
    report has no error, else :class:`ConversionError`."""
    report.root = str(out)
    report.records_read = converted.records_read
    report.dropped = [d.to_json() for d in converted.dropped]
    report.absent_ids = converted.absent_ids
    for refused in converted.refused_images:
        report.add("refused_images", str(refused))
    report.refused_images = [r.to_json() for r in converted.refused_images]
    for mended in converted.repaired:
        report.add("repaired_fields", str(mended))
    report.repaired = [r.to_json() for r in converted.repaired]
    report.skipped = dict(converted.skipped)
    if not report.ok:
        if echo:
            print(format_report(report), end="")
        raise ConversionError(out, report)
    complete_dataset(stage, report_files(report))
    _open_permissions(stage)
    _swap_in(stage, out)


class _StagedKb:
    """Entities written to a staged folder's ``entities.jsonl`` one at a time and checked as validation checks them
    (module docstring). Used as ``with``: the entities file is synced and closed at the end of the block;
    :meth:`finish` then adds the other dataset files and returns the report."""

    def __init__(self, stage: Path, image_check: str, strip_images: bool):
        self.stage, self.strip_images = stage, strip_images
        self.report = ValidationReport(dataset=stage.name, root=str(stage))
        self.checks = RecordChecks(stage, self.report, image_check)
        self.partial = stage / f".{ENTITIES_FILE}.partial"
        self.fh: IO[bytes] = self.partial.open("xb")

    def __enter__(self) -> "_StagedKb":
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        with self.fh:
            if kind is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())

    def add(self, entity: Entity) -> None:
        if self.strip_images:
            entity = _no_images(entity)
        self.fh.write(jsonl_bytes((entity,)))
        self.checks.entity(entity)

    def finish(self, converted: Converted) -> ValidationReport:
        """The other dataset files (``save_dataset``'s, with no records) and the entities file in place: the set
        ``save_dataset`` writes of the same entities; the report as ``validate_dataset`` makes of it."""
        save_dataset(self.stage, converted.info, [], [], complete=False)
        os.replace(self.partial, self.stage / ENTITIES_FILE)
        self.report.dataset, self.report.kind = converted.info.name, converted.info.kind
        return self.report


def _prepare_wikidata(src: str | Path, out: Path, *, images: str, check_images: bool | str, echo: bool,
                      progress: bool, max_invalid: str | int | float, **reader: Any) -> tuple[Path, ValidationReport]:
    """``prepare --format wikidata``: the dump's entities streamed into the staged folder (module docstring)."""
    image_check = _image_options(images, check_images)
    _check_replaceable(out)
    with _staging(out) as stage:
        with _StagedKb(stage, image_check, images == "none") as kb:
            converted = stream_wikidata(src, kb.add, scratch=stage, progress=progress, **reader)
            check_invalid(converted, max_invalid)
        report = kb.finish(converted)
        _publish_stage(stage, out, converted, report, echo)
    if echo:
        print(format_report(report), end="")
    return out, report


def split_fractions(text: str) -> tuple[float, float, float]:
    """``--splits``: the train, dev and test fractions (``"0.7,0.1,0.2"``, summing to 1; every share the toolkit
    takes is a fraction, as ``--dev-from-train``), as the reader's ratios. An older percentage-style value
    (``70,10,20``) is an error saying what to write."""
    values = parse_ratios(text)
    total = sum(values)
    if abs(total - 1) > 1e-6:
        if any(v > 1 for v in values):
            shares = ",".join(f"{v / total:.6g}" for v in values)
            raise ValueError(f"--splits {text}: the shares are fractions summing to 1: write --splits {shares}")
        raise ValueError(f"--splits {text}: the fractions must sum to 1, not {total:g}")
    # the ratios in percent, as the readers have always received them: the same split and split rule as before
    return tuple(round(100 * v, 9) for v in values)  # type: ignore[return-value]


def prepare(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    dataset_name: str | None = None,
    split_seed: int | None = None,
    splits: str | None = None,
    image_dir: str | Path | None = None,
    images: str = "symlink",
    check_images: bool | str = True,
    echo: bool = True,
    progress: bool = True,
    strict: bool = False,
    max_invalid: str | int | float = DEFAULT_MAX_INVALID,
    annotations: str | Path | None = None,
    entity_text: str = "brief",
    dev_from_train: float | None = None,
    language: str | None = None,
    ids: str | Path | None = None,
    instance_of: str | None = None,
    min_sitelinks: int | None = None,
) -> tuple[Path, ValidationReport]:
    """Read ``src`` in format ``fmt`` and publish it to ``out`` (see the module docstring).

    ``splits`` and ``split_seed`` (``None``: not given) are for a format that makes its splits: ``--splits`` for
    MELBench, ``--split-seed`` for MELBench and for GHMFC with ``dev_from_train``; giving one to a format whose
    release fixes the splits is an error."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if splits is not None and fmt != "melbench":
        raise ValueError(f"--splits is only for --format melbench: a {fmt} release fixes its splits"
                         + (" (--dev-from-train P makes a dev split of a GHMFC release without one)"
                            if fmt == "ghmfc" else ""))
    if dev_from_train is not None and fmt != "ghmfc":
        raise ValueError(f"--dev-from-train is only for --format ghmfc, not {fmt}")
    if split_seed is not None and fmt != "melbench" and dev_from_train is None:
        raise ValueError(f"--split-seed is only for --format melbench (and ghmfc with --dev-from-train): a {fmt} "
                         "release fixes its splits")
    if image_dir is not None and fmt not in ("melbench", "ghmfc"):
        raise ValueError("--image-dir is only for --format melbench and ghmfc (other releases carry their image "
                         "folders)")
    if (annotations is not None or entity_text != "brief") and fmt != "ghmfc":
        raise ValueError("--annotations and --entity-text are only for --format ghmfc")
    wikidata = {"language": language, "ids": ids, "instance_of": instance_of, "min_sitelinks": min_sitelinks}
    given = [f"--{k.replace('_', '-')}" for k, v in wikidata.items() if v is not None]
    if given and fmt != "wikidata":
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --format wikidata")
    if fmt == "unified" and Path(src).resolve() == Path(out).resolve():   # in place: only the report is written
        report = validate_dataset(src, image_check={True: "verify", False: "none"}.get(check_images, check_images),
                                  progress=progress)
        if echo:
            print(format_report(report), end="")
        if not report.ok:
            raise ConversionError(Path(out), report)
        write_report(report, out)
        return Path(out), report
    _check_replaceable(Path(out))
    common = {"dataset_name": dataset_name, "progress": progress, "strict": strict}
    seed = split_seed or 0
    if fmt == "melbench":
        converted = READERS[fmt](src, seed=seed, splits=split_fractions(splits or DEFAULT_SPLITS), image_dir=image_dir,
                                 **common)
    elif fmt == "ghmfc":
        converted = READERS[fmt](src, annotations=annotations, image_dir=image_dir, entity_text=entity_text,
                                 dev_from_train=dev_from_train, seed=seed, **common)
    elif fmt == "wikidata":
        return _prepare_wikidata(src, Path(out), images=images, check_images=check_images, echo=echo,
                                 max_invalid=max_invalid, **common, **{k: v for k, v in wikidata.items()
                                                                        if v is not None})
    else:
        converted = READERS[fmt](src, **common)
    return publish(converted, out, images=images, check_images=check_images, echo=echo, progress=progress,
                   max_invalid=max_invalid)


def main(argv: list[str] | None = None) -> int:
    ap = ToolkitParser(prog="dim-mel prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", required=True, choices=FORMATS, help="source release format")
    ap.add_argument("--src", required=True, type=Path, help="release folder or annotation file (.json/.zip)")
    ap.add_argument("--out", required=True, type=Path, help="unified dataset folder to write")
    ap.add_argument("--dataset-name", default=None, help="name recorded in dataset.json")
    ap.add_argument("--split-seed", type=int, default=None,
                    help="seed of the by-sample split (MELBench; GHMFC with --dev-from-train); default 0")
    ap.add_argument("--splits", default=None,
                    help="train,dev,test fractions of the by-sample split, summing to 1 (MELBench only; default "
                         f"{DEFAULT_SPLITS})")
    ap.add_argument("--dev-from-train", type=float, default=None, metavar="P",
                    help="GHMFC release without dev.json: make the dev split of a fraction P (0 < P < 1) of the "
                         "train samples, by a seeded hash of the sample ids (recorded in dataset.json)")
    ap.add_argument("--image-dir", type=Path, default=None,
                    help="MELBench, GHMFC: folder of mention images (named by sample id, or imgPath)")
    ap.add_argument("--annotations", type=Path, default=None,
                    help="GHMFC with splits.json: the MELBench annotation file (.json or .zip)")
    ap.add_argument("--entity-text", choices=("brief", "long"), default="brief",
                    help="GHMFC: entity descriptions from qid2abs.json (brief, DIM's default) or qid2abs_long.json")
    ap.add_argument("--language", default=None,
                    help="Wikidata: the language of names, descriptions and aliases, with its fallbacks, then mul "
                         "and en (default en)")
    ap.add_argument("--ids", type=Path, default=None,
                    help="Wikidata: keep only the items of this file (one Q-id a line)")
    ap.add_argument("--instance-of", default=None, metavar="Q5,Q515",
                    help="Wikidata: keep only items that are an instance (P31) of one of these classes")
    ap.add_argument("--min-sitelinks", type=int, default=None, metavar="N",
                    help="Wikidata: keep only items with at least N sitelinks")
    add_bool(ap, "strict", False, "stop at the first bad record (default: drop bad records, list them, go on)")
    ap.add_argument("--max-invalid", default=DEFAULT_MAX_INVALID,
                    help="fail when more records than this are dropped: a count (25) or a share of the records "
                         f"read (default {DEFAULT_MAX_INVALID.replace('%', '%%')})")
    ap.add_argument("--images", choices=IMAGE_MODES, default="symlink",
                    help="symlink (default), copy or rewrite the release's image folders, or none (text only)")
    ap.add_argument("--image-check", choices=IMAGE_CHECKS, default="verify",
                    help="verify images with PIL (default), only check they exist, or skip")
    add_bool(ap, "quiet", False, "no progress bars")
    args = ap.parse_args(argv)
    prepare(args.format, args.src, args.out, dataset_name=args.dataset_name, split_seed=args.split_seed,
            splits=args.splits, image_dir=args.image_dir, images=args.images, check_images=args.image_check,
            progress=not args.quiet, strict=args.strict, max_invalid=args.max_invalid,
            annotations=args.annotations, entity_text=args.entity_text, dev_from_train=args.dev_from_train,
            language=args.language, ids=args.ids, instance_of=args.instance_of, min_sitelinks=args.min_sitelinks)
    return 0


if __name__ == "__main__":
    run_main(main)
