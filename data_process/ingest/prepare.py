"""Convert a public MEL release to the unified format, validate it, and publish it atomically.

    python -m data_process.ingest.prepare --format {melbench,mimic,ghmfc,wikidiverse,wikiperson,unified} \\
        --src DIR_OR_FILE --out DIR [--dataset-name NAME] [--split-seed 0] [--splits 70,10,20] \\
        [--image-dir DIR] [--images {symlink,copy,rewrite,none}] [--image-check {verify,exists,none}] \\
        [--strict] [--max-invalid 1%] [--annotations FILE] [--entity-text {brief,long}]

Steps: the format's reader builds the records (``data_process.ingest.readers``), dropping bad records and listing
them (``--strict``: the first bad record is an error; more dropped records than ``--max-invalid``, default 1% of the
records read, fail the conversion); they are written with ``records.save_dataset`` into a temporary folder beside
``--out``; image folders are attached; the folder is validated (``data_process.ingest.validate``). With any validation error (or any reader error) the temporary folder is
removed and ``--out`` is left as it was (absent, or the previous dataset). Otherwise ``validation.json`` and
``validation.txt`` (which list every dropped record: file, record, field, reason; and ids the release lists
without a record) are added and the folder replaces ``--out`` by rename.

Images (``--images``, see ``data_process.core.placement``): ``symlink`` (default) makes folder symlinks inside the
dataset (``images/mention``, ``images/kb``) pointing to the *absolute* source image folders, so record paths stay
relative to the dataset folder and nothing is copied; moving the source breaks the links (validation then reports
missing images). ``copy`` copies only the referenced image files; ``rewrite`` points the paths at the source files.
``none`` drops image references (text-only dataset).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from data_process.core.placement import PLACEMENT_MODES, place_record_images
from data_process.ingest.readers import READERS
from data_process.ingest.readers.common import Converted, parse_ratios
from data_process.core.records import ENTITIES_FILE, INFO_FILE, MENTIONS_FILE, DataError, save_dataset
from data_process.ingest.validate import IMAGE_CHECKS, ValidationReport, format_report, validate_dataset, write_report

IMAGE_MODES = (*PLACEMENT_MODES, "none")
DEFAULT_MAX_INVALID = "1%"
FORMATS = tuple(READERS)


class ConversionError(ValueError):
    """Validation found errors; nothing was written. ``report`` holds the full report."""

    def __init__(self, out: Path, report: ValidationReport):
        self.report = report
        super().__init__(f"{out}: conversion failed validation, nothing written: {report.error_summary()}")


def _strip_images(converted: Converted) -> Converted:
    return dataclasses.replace(
        converted,
        entities=[dataclasses.replace(e, images=()) if e.images else e for e in converted.entities],
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
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out}: exists and is not a dataset folder; refusing to replace it")
    names = {p.name for p in out.iterdir()}
    if names and not names & {INFO_FILE, ENTITIES_FILE, MENTIONS_FILE}:
        raise FileExistsError(f"{out}: exists, is not empty and holds no unified dataset; refusing to replace it")


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
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    image_check = {True: "verify", False: "none"}.get(check_images, check_images)  # type: ignore[arg-type]
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {', '.join(IMAGE_CHECKS)}, got {check_images!r}")
    out = Path(out)
    _check_replaceable(out)
    if images == "none":
        converted = _strip_images(converted)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if images != "none":
            entities, mentions = place_record_images(stage, converted.entities, converted.mentions, images,
                                                     links=converted.image_links)
            converted = dataclasses.replace(converted, entities=entities, mentions=mentions)
        save_dataset(stage, converted.info, converted.entities, converted.mentions)
        report = validate_dataset(stage, image_check=image_check, progress=progress)
        report.root = str(out)
        report.records_read = converted.records_read
        report.dropped = [d.to_json() for d in converted.dropped]
        report.absent_ids = converted.absent_ids
        if not report.ok:
            if echo:
                print(format_report(report), end="")
            raise ConversionError(out, report)
        write_report(report, stage)
        _open_permissions(stage)
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if echo:
        print(format_report(report), end="")
    return out, report


def prepare(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    dataset_name: str | None = None,
    split_seed: int = 0,
    splits: str = "70,10,20",
    image_dir: str | Path | None = None,
    images: str = "symlink",
    check_images: bool | str = True,
    echo: bool = True,
    progress: bool = True,
    strict: bool = False,
    max_invalid: str | int | float = DEFAULT_MAX_INVALID,
    annotations: str | Path | None = None,
    entity_text: str = "brief",
) -> tuple[Path, ValidationReport]:
    """Read ``src`` in format ``fmt`` and publish it to ``out`` (see the module docstring)."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if image_dir is not None and fmt not in ("melbench", "ghmfc"):
        raise ValueError("--image-dir is only for --format melbench and ghmfc (other releases carry their image "
                         "folders)")
    if (annotations is not None or entity_text != "brief") and fmt != "ghmfc":
        raise ValueError("--annotations and --entity-text are only for --format ghmfc")
    _check_replaceable(Path(out))
    if fmt == "unified" and Path(src).resolve() == Path(out).resolve():
        report = validate_dataset(src, image_check={True: "verify", False: "none"}.get(check_images, check_images),
                                  progress=progress)
        if echo:
            print(format_report(report), end="")
        if not report.ok:
            raise ConversionError(Path(out), report)
        write_report(report, out)
        return Path(out), report
    common = {"dataset_name": dataset_name, "progress": progress, "strict": strict}
    if fmt == "melbench":
        converted = READERS[fmt](src, seed=split_seed, splits=parse_ratios(splits), image_dir=image_dir, **common)
    elif fmt == "ghmfc":
        converted = READERS[fmt](src, annotations=annotations, image_dir=image_dir, entity_text=entity_text,
                                 **common)
    else:
        converted = READERS[fmt](src, **common)
    return publish(converted, out, images=images, check_images=check_images, echo=echo, progress=progress,
                   max_invalid=max_invalid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_process.ingest.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", required=True, choices=FORMATS, help="source release format")
    ap.add_argument("--src", required=True, type=Path, help="release folder or annotation file (.json/.zip)")
    ap.add_argument("--out", required=True, type=Path, help="unified dataset folder to write")
    ap.add_argument("--dataset-name", default=None, help="name recorded in dataset.json")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the by-sample split (MELBench)")
    ap.add_argument("--splits", default="70,10,20", help="train,dev,test ratios of the by-sample split (MELBench)")
    ap.add_argument("--image-dir", type=Path, default=None,
                    help="MELBench, GHMFC: folder of mention images (named by sample id, or imgPath)")
    ap.add_argument("--annotations", type=Path, default=None,
                    help="GHMFC with splits.json: the MELBench annotation file (.json or .zip)")
    ap.add_argument("--entity-text", choices=("brief", "long"), default="brief",
                    help="GHMFC: entity descriptions from qid2abs.json (brief, DIM's default) or qid2abs_long.json")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad record (default: drop bad records, list them, go on)")
    ap.add_argument("--max-invalid", default=DEFAULT_MAX_INVALID,
                    help="fail when more records than this are dropped: a count (25) or a share of the records "
                         f"read (default {DEFAULT_MAX_INVALID})")
    ap.add_argument("--images", choices=IMAGE_MODES, default="symlink",
                    help="symlink (default), copy or rewrite the release's image folders, or none (text only)")
    ap.add_argument("--image-check", choices=IMAGE_CHECKS, default="verify",
                    help="verify images with PIL (default), only check they exist, or skip")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        parse_ratios(args.splits)
        prepare(args.format, args.src, args.out, dataset_name=args.dataset_name, split_seed=args.split_seed,
                splits=args.splits, image_dir=args.image_dir, images=args.images, check_images=args.image_check,
                progress=not args.quiet, strict=args.strict, max_invalid=args.max_invalid,
                annotations=args.annotations, entity_text=args.entity_text)
    except (DataError, ConversionError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
