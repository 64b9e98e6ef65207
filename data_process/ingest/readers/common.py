"""Shared pieces of the release readers: the reader result, field checks, JSON loading, the image guard, spans and
seeded splits.

Every reader returns a :class:`Converted`: the unified records plus ``image_links``, a map from a folder
*inside the output dataset* (e.g. ``images/mention``) to the *source* folder whose files it stands for.
``data_process.ingest.prepare`` materialises those links (folder symlinks by default) so that record image paths,
which are relative to the dataset folder, resolve without copying gigabytes of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Collection, NoReturn, Sequence, TypeVar

from data_process.core.records import (DataError, DatasetInfo, Entity, Mention, NestingError, SPLITS, Where,
                                       keep_record, not_utf8, parse_json, record_json_problem, repeated_keys)
from data_process.core.placement import source_file
from data_process.core.safe_paths import UnsafePath, open_regular_file

MENTION_IMAGE_DIR = "images/mention"
ENTITY_IMAGE_DIR = "images/kb"


@dataclass(frozen=True)
class Dropped:
    """A record a reader left out: where it is and why (the parts of its :class:`DataError`)."""

    file: str
    record: str
    field: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return str(DataError(self.file, self.record, self.field, self.reason))


T = TypeVar("T")


class RecordPolicy:
    """Runs a reader's per-record checks: a failing record is dropped and listed, or (``strict``) raised; a bad
    non-essential field of a kept record (a description, an alias, an image name, a caption) is mended and listed
    in ``repaired`` (a warning), or (``strict``) raised."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.dropped: list[Dropped] = []
        self.repaired: list[Dropped] = []
        self.records = 0   # records read (samples, mention records, KB entities)

    def attempt(self, fn: Callable[[], T], *, count: bool = True) -> T | None:
        """``fn()``, or ``None`` when it raises :class:`DataError` (dropped, or re-raised when strict)."""
        self.records += count
        try:
            return fn()
        except DataError as err:
            if self.strict:
                raise
            self.drop(err)
            return None

    def drop(self, err: DataError) -> None:
        if self.strict:
            raise err
        self.dropped.append(Dropped(err.path, err.where, err.field, err.problem))

    def repair(self, err: DataError, done: str) -> None:
        """A non-essential field mended (``done`` says how; :func:`records.keep_record`); strict: ``err`` raised."""
        if self.strict:
            raise err
        self.repaired.append(Dropped(err.path, err.where, err.field, f"{err.problem}; {done}"))

    def keep(self, obj: Any, parse: Callable[[Any], T], where: Where, essential: Collection[str]) -> T:
        """``parse(obj)`` of a raw record whose fields outside ``essential`` are mended rather than fatal
        (:func:`records.keep_record`, mends listed in :attr:`repaired`)."""
        return keep_record(obj, parse, where, essential=essential, repair=self.repair)


@dataclass
class Converted:
    """What a reader produced: records ready for ``records.save_dataset`` plus image folder links, the records it
    dropped and how many it read, and ids a release lists (e.g. in its splits) without a record."""

    info: DatasetInfo
    entities: list[Entity]
    mentions: list[Mention]
    image_links: dict[str, Path] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    records_read: int = 0
    absent_ids: dict[str, list[str]] = field(default_factory=dict)
    refused_images: list[Dropped] = field(default_factory=list)   # image references left out (guard_images)
    repaired: list[Dropped] = field(default_factory=list)   # non-essential fields mended, records kept (warnings)
    skipped: dict[str, int] = field(default_factory=dict)    # what the release holds that is not converted, by kind


Fail = Callable[[str | None, str], NoReturn]


def failer(path: str | Path, where: str) -> Where:
    """A ``fail(field, problem)`` callable raising :class:`DataError` for one record (``.error`` makes it)."""
    return Where(path, where)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(obj: dict, key: str, fail: Fail) -> Any:
    if key not in obj or obj[key] is None:
        fail(key, "is missing")
    return obj[key]


def req_str(obj: dict, key: str, fail: Fail, *, nonempty: bool = True) -> str:
    value = require(obj, key, fail)
    if not isinstance(value, str):
        fail(key, f"must be a string, got {type_name(value)}")
    if nonempty and not value.strip():
        fail(key, "must not be empty")
    return value


def str_list(value: Any, key: str, fail: Fail) -> list[str]:
    """A MELBench-style field: a plain string (one item) or a list of non-empty strings."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        fail(key, f"must be a string or a list of strings, got {type_name(value)}")
    if not items:
        fail(key, "must not be an empty list")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            fail(key, f"item {i} must be a string, got {type_name(item)}")
        if not item.strip():
            fail(key, f"item {i} must not be empty")
    return list(items)


def record_id(obj: dict, key: str, fail: Fail) -> str:
    """An id given as a string or an integer (MIMIC releases use both); returned as a string."""
    value = require(obj, key, fail)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        fail(key, f"must be a string or an integer, got {type_name(value)}")
    text = str(value)
    if not text.strip():
        fail(key, "must not be empty")
    return text


def find_span(sentence: str, mention: str) -> tuple[int, int] | None:
    """``[start, end)`` of the first occurrence of ``mention`` in ``sentence``, or ``None``."""
    start = sentence.find(mention) if mention else -1
    return None if start < 0 else (start, start + len(mention))


def check_record(obj: Any, fail: Fail) -> None:
    """Fail on what JSON parsing lets through in a raw record: a field given twice (JSON keeps the last copy
    silently) or a string holding a lone surrogate (:func:`records.lone_surrogate`)."""
    bad = record_json_problem(obj)
    if bad is not None:
        fail(*bad)


def load_json(path: Path, text: str | None = None, policy: RecordPolicy | None = None, *,
              optional_values: bool = False) -> Any:
    """Parse a JSON file (or ``text`` read from it) with the one parser (``records.parse_json``: nesting bounded),
    naming the file in errors; only a regular file is read.

    A top-level object that repeats a key (JSON would keep the last copy silently) loses that key: every copy is
    dropped and listed in ``policy`` (one dropped record per copy), or, without a policy or when strict, it is a
    :class:`DataError`. With ``optional_values`` the file's values are a non-essential field of records kept
    elsewhere (GHMFC's descriptions, keyed by QID): a repeated key loses its value, listed as a mend (a warning),
    and no record is dropped."""
    raw = b""
    try:
        if text is None:
            with open_regular_file(path) as fh:
                raw = fh.read()
            text = raw.decode("utf-8")
        data = parse_json(text.removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        raise DataError(path, "file", None, not_utf8(exc, raw)) from None
    except json.JSONDecodeError as exc:
        raise DataError(path, "file", None, f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except NestingError as exc:
        where = ("file" if exc.member is None else f"key {exc.member!r}" if isinstance(exc.member, str)
                 else f"item {exc.member}")
        raise DataError(path, where, None, exc.problem) from None
    except UnsafePath as exc:
        raise DataError(path, "file", None, str(exc).removeprefix(f"{path}: ")) from None
    repeated = repeated_keys(data)
    if repeated:
        policy = policy or RecordPolicy(strict=True)
        for key, copies in repeated.items():
            if optional_values:
                policy.repair(DataError(path, f"key {key!r}", None, f"repeated key: {copies} copies in the file "
                                        "(JSON keeps only the last)"), "every copy left out, the record kept")
            else:
                err = DataError(path, f"key {key!r}", None, f"repeated key: {copies} copies in the file (JSON keeps "
                                "only the last); every copy dropped")
                for _ in range(copies):
                    policy.records += 1
                    policy.drop(err)
            del data[key]
        data = dict(data)
    return data


# ---------------------------------------------------------------------------------------------
# The image guard: an image a record names must lie, symlinks resolved, inside the image folder it is named in


def image_problem(rel: str, links: dict[str, Path], *, folder_links: bool = False) -> str | None:
    """Why the image path ``rel`` (as a record names it, relative to the dataset) must not be read, or ``None``.

    Any path must be relative and free of ``..``; under a linked folder (``images/mention`` -> the release's image
    folder) the file's real path must stay inside that folder (which may be a link; ``folder_links``: see
    :func:`data_process.core.placement.source_file`, for a unified source)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if "\x00" in rel or PurePosixPath(rel).is_absolute() or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
        return f"{rel}: absolute, or leaves the dataset folder (image paths are relative, without '..')"
    for folder in sorted(links, key=len, reverse=True):
        prefix = folder.rstrip("/") + "/"
        if rel.startswith(prefix):
            try:
                source_file(links[folder], rel[len(prefix):], folder_links=folder_links)
            except UnsafePath as exc:
                return str(exc)
            return None
    return None


def guard_images(conv: Converted, *, folder_links: bool = False) -> Converted:
    """``conv`` with every image reference :func:`image_problem` refuses taken out (the record is kept, without
    that image, as a record whose image is missing) and listed in ``refused_images`` (file = the image path)."""
    links = {k.rstrip("/"): Path(os.path.realpath(v)) for k, v in conv.image_links.items()}
    refused: list[Dropped] = []

    def kept(paths: Sequence[str], owner: str, field_name: str) -> tuple[str, ...]:
        out = []
        for rel in paths:
            problem = image_problem(rel, links, folder_links=folder_links)
            if problem is None:
                out.append(rel)
            else:
                refused.append(Dropped(rel, owner, field_name, f"image refused: {problem}"))
        return tuple(out)

    entities = []
    for e in conv.entities:
        images = kept(e.images, f"entity {e.id!r}", "images")
        entities.append(e if images == e.images else dataclasses.replace(e, images=images))
    mentions = []
    for m in conv.mentions:
        ok = not m.image or kept((m.image,), f"mention {m.id!r}", "image")
        mentions.append(m if ok else dataclasses.replace(m, image=None))
    if not refused:
        return conv
    return dataclasses.replace(conv, entities=entities, mentions=mentions,
                               refused_images=conv.refused_images + refused)


# ---------------------------------------------------------------------------------------------
# Seeded splits by sample


def parse_ratios(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"70,10,20"`` (or a sequence) → three non-negative ratios with a positive sum."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"splits must be three numbers like 70,10,20, got {text!r}") from None
    if len(values) != 3 or any(v < 0 or math.isnan(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"splits must be three non-negative numbers with a positive sum, got {text!r}")
    return values  # type: ignore[return-value]


def split_rule_text(seed: int, ratios: Sequence[float]) -> str:
    a, b, c = (f"{r:g}" for r in ratios)
    return (
        f"by sample, seed {seed}: samples ordered by sha256('{seed}:' + sample_id) hex digest; "
        f"first round(n*{a}/{sum(ratios):g}) samples train, next round(n*{b}/{sum(ratios):g}) dev, rest test "
        f"(ratios {a}/{b}/{c}); all mentions of a sample share its split"
    )


def hash_order(sample_ids: Sequence[str], seed: int) -> list[str]:
    """The distinct ids ordered by ``sha256('<seed>:' + id)`` hex digest (then by id): the order of every split
    rule; independent of input order and of Python's ``random``."""
    return sorted(set(sample_ids), key=lambda s: (hashlib.sha256(f"{seed}:{s}".encode("utf-8")).hexdigest(), s))


def dev_from_train_rule(seed: int, share: float) -> str:
    return (f"dev carved from train, seed {seed}: train samples ordered by sha256('{seed}:' + sample_id) hex "
            f"digest; the first round(n*{share:g}) are dev, the rest stay train; all mentions of a sample share its "
            "split")


def carve_dev(train_ids: Sequence[str], seed: int, share: float) -> set[str]:
    """The train sample ids that become dev (see :func:`dev_from_train_rule`); ``0 < share < 1``."""
    if not 0 < share < 1:
        raise ValueError(f"--dev-from-train must be a fraction between 0 and 1 (e.g. 0.1), got {share!r}")
    ids = hash_order(train_ids, seed)
    return set(ids[:math.floor(len(ids) * share + 0.5)])


def split_samples(sample_ids: Sequence[str], seed: int, ratios: Sequence[float]) -> dict[str, str]:
    """Assign each sample id to train/dev/test, deterministically for ``seed`` (see :func:`split_rule_text`).

    Independent of input order and of Python's ``random`` module: the order is a hash of seed and id.
    """
    ids = hash_order(sample_ids, seed)
    total = float(sum(ratios))
    n = len(ids)
    n_train = math.floor(n * ratios[0] / total + 0.5)
    n_dev = min(n - n_train, math.floor(n * ratios[1] / total + 0.5))
    out: dict[str, str] = {}
    for i, sid in enumerate(ids):
        out[sid] = SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_dev else SPLITS[2]
    return out
