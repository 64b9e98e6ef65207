"""Unified MEL records: typed dataclasses, JSON Lines reading with validation, atomic writing.

A unified dataset is one folder::

    DATASET/
      dataset.json      # DatasetInfo: name, source format, how splits were made, ...
      entities.jsonl    # one Entity per line
      mentions.jsonl    # one Mention per line
      images/...        # optional; image paths in records are relative to DATASET/

The files are published as one set (:func:`save_dataset`): an ``.incomplete`` marker is written (and fsync'ed)
before the first file and removed after the last, ``dataset.json`` included. :func:`load_dataset` refuses a folder
whose marker is still there, so a step killed while writing never leaves a mix of two runs' files that passes for a
dataset (hand edits of a finished folder stay allowed).

Every later step (enrichment, captions, features, training) reads only this format.
Loading validates every record; a bad record raises :class:`DataError` naming the file,
the line (and record id when known) and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from data_process.core.durable_io import atomic_write_bytes, atomic_write_text
from data_process.core.safe_paths import check_regular_file

SPLITS = ("train", "dev", "test")
ENTITIES_FILE = "entities.jsonl"
MENTIONS_FILE = "mentions.jsonl"
INFO_FILE = "dataset.json"
INCOMPLETE_MARKER = ".incomplete"


class DataError(ValueError):
    """A bad input record. The message names the file, the line/record and the field."""

    def __init__(self, path: str | Path, where: str, field_name: str | None, problem: str):
        self.path = str(path)
        self.where = where
        self.field = field_name
        self.problem = problem
        loc = f"{self.path}, {where}"
        if field_name:
            loc += f", field '{field_name}'"
        super().__init__(f"{loc}: {problem}")


@dataclass(frozen=True)
class Entity:
    """A knowledge-base entity.

    ``enrichment`` holds LLM-extracted information (``{"text": str, ..., "provenance": {...}}``)
    when the dataset is a "+" dataset; ``None`` otherwise.
    """

    id: str
    name: str
    description: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    enrichment: dict[str, Any] | None = None

    def text(self) -> str:
        """The entity's text as encoded for its description view: name, description, attributes."""
        parts = [self.name]
        if self.description:
            parts.append(self.description)
        if self.attributes:
            parts.append("; ".join(f"{k}: {v}" for k, v in sorted(self.attributes.items())))
        return ". ".join(parts)


@dataclass(frozen=True)
class Mention:
    """A mention in a sentence with an optional image, linked to a gold entity.

    ``span`` is the character span ``[start, end)`` of the mention in ``sentence`` when known.
    ``candidates`` is a per-mention candidate list (entity ids) for the candidate protocol.
    ``caption`` (BLIP-2 text) and ``enrichment`` (LLM text) carry ``{"text": ..., "provenance": {...}}``.
    """

    id: str
    sentence: str
    mention: str
    gold_id: str
    split: str
    span: tuple[int, int] | None = None
    image: str | None = None
    candidates: tuple[str, ...] | None = None
    caption: dict[str, Any] | None = None
    enrichment: dict[str, Any] | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about how a unified dataset was made (``dataset.json``)."""

    name: str
    source_format: str
    split_rule: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


R = TypeVar("R", Entity, Mention)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_str(obj: dict, key: str, fail, *, required: bool = True, nonempty: bool = False):
    if key not in obj or obj[key] is None:
        if required:
            fail(key, "is missing")
        return None
    value = obj[key]
    if not isinstance(value, str):
        fail(key, f"must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        fail(key, "must not be empty")
    return value


def _check_provenanced(obj: dict, key: str, fail):
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        fail(key, f"must be an object, got {type(value).__name__}")
    if not isinstance(value.get("text"), str):
        fail(key, "must have a string 'text'")
    if not isinstance(value.get("provenance"), dict):
        fail(key, "must have an object 'provenance'")
    return value


def entity_from_dict(obj: Any, fail) -> Entity:
    if not isinstance(obj, dict):
        fail(None, f"record must be a JSON object, got {type(obj).__name__}")
    _check_str(obj, "id", fail, nonempty=True)
    _check_str(obj, "name", fail, nonempty=True)
    _check_str(obj, "description", fail, required=False)
    attrs = obj.get("attributes") or {}
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
        fail("attributes", "must be an object mapping strings to strings")
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        fail("images", "must be a list of non-empty strings (paths relative to the dataset folder)")
    known = {f.name for f in fields(Entity)}
    unknown = sorted(set(obj) - known)
    if unknown:
        fail(unknown[0], "is not a field of an entity record")
    return Entity(
        id=obj["id"],
        name=obj["name"],
        description=obj.get("description") or "",
        attributes=dict(attrs),
        images=tuple(images),
        enrichment=_check_provenanced(obj, "enrichment", fail),
    )


def mention_from_dict(obj: Any, fail) -> Mention:
    if not isinstance(obj, dict):
        fail(None, f"record must be a JSON object, got {type(obj).__name__}")
    _check_str(obj, "id", fail, nonempty=True)
    sentence = _check_str(obj, "sentence", fail)
    mention = _check_str(obj, "mention", fail, nonempty=True)
    _check_str(obj, "gold_id", fail, nonempty=True)
    split = _check_str(obj, "split", fail)
    if split not in SPLITS:
        fail("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    span = obj.get("span")
    if span is not None:
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in span)
            or not 0 <= span[0] < span[1] <= len(sentence)
        ):
            fail("span", f"must be [start, end) with 0 <= start < end <= {len(sentence)}, got {span!r}")
        if sentence[span[0] : span[1]] != mention:
            fail("span", f"sentence[{span[0]}:{span[1]}] is {sentence[span[0]:span[1]]!r}, not the mention {mention!r}")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        fail("image", "must be a non-empty string or null")
    cands = obj.get("candidates")
    if cands is not None and (not isinstance(cands, list) or not all(isinstance(c, str) for c in cands)):
        fail("candidates", "must be a list of entity ids or null")
    known = {f.name for f in fields(Mention)}
    unknown = sorted(set(obj) - known)
    if unknown:
        fail(unknown[0], "is not a field of a mention record")
    return Mention(
        id=obj["id"],
        sentence=sentence,
        mention=mention,
        gold_id=obj["gold_id"],
        split=split,
        span=tuple(span) if span is not None else None,
        image=image,
        candidates=tuple(cands) if cands is not None else None,
        caption=_check_provenanced(obj, "caption", fail),
        enrichment=_check_provenanced(obj, "enrichment", fail),
    )


def _surrogate_in(text: str) -> str | None:
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            return ch
    return None


class _RepeatedKeys(dict):
    """A parsed JSON object whose text gave some keys more than once: ``repeated`` = {key: number of copies}."""

    repeated: dict[str, int]


def json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` of every JSON input: a plain dict, which remembers keys its text repeated
    (:func:`repeated_keys`) instead of silently keeping the last copy only."""
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key, value in pairs:
        if key in out:
            counts[key] = counts.get(key, 1) + 1
        out[key] = value
    if not counts:
        return out
    obj = _RepeatedKeys(out)
    obj.repeated = counts
    return obj


def repeated_keys(obj: Any) -> dict[str, int]:
    """``{key: copies}`` for the keys a JSON object parsed with :func:`json_pairs` gave more than once."""
    return dict(obj.repeated) if isinstance(obj, _RepeatedKeys) else {}


def record_json_problem(obj: Any) -> tuple[str | None, str] | None:
    """``(field, problem)`` for a raw JSON record that parsing let through: a field given twice, or a lone
    surrogate (:func:`lone_surrogate`); ``None`` when it has neither."""
    repeated = repeated_keys(obj)
    if repeated:
        key, copies = next(iter(repeated.items()))
        return key, f"given {copies} times in the record (JSON keeps only the last)"
    return lone_surrogate(obj)


def lone_surrogate(obj: Any) -> tuple[str | None, str] | None:
    """``(field, problem)`` for the first string in a raw JSON record (keys included) that holds a lone surrogate
    (``"\\ud83d"``: legal JSON, but no Unicode text; it cannot be written as UTF-8), else ``None``. The field is
    the record's top-level key (``None`` for the record itself)."""

    def find(value: Any) -> str | None:
        if isinstance(value, str):
            return _surrogate_in(value)
        if isinstance(value, dict):
            return next((c for k, v in value.items() for c in (find(k), find(v)) if c), None)
        if isinstance(value, (list, tuple)):
            return next((c for v in value if (c := find(v))), None)
        return None

    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else [(None, obj)]
    for key, value in items:
        ch = find(key) if isinstance(key, str) else None
        name = None if ch else (str(key) if key is not None else None)
        ch = ch or find(value)
        if ch:
            return name, f"holds a lone surrogate {ch!r} (not Unicode text; cannot be written as UTF-8)"
    return None


def record_to_dict(record: Entity | Mention) -> dict[str, Any]:
    """JSON-ready dict; tuples become lists, ``None`` optional fields are dropped."""
    out = {}
    for key, value in asdict(record).items():
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# JSON Lines I/O


OnError = Callable[[DataError, str], None]   # (error, kind) with kind "malformed" or "duplicate"


def _numbered_lines(fh: Any, max_line_bytes: int | None) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, raw line)``; ``None`` for a line longer than ``max_line_bytes`` (never held whole)."""
    lineno = 0
    while True:
        raw = fh.readline() if max_line_bytes is None else fh.readline(max_line_bytes + 2)  # + "\r\n"
        if not raw:
            return
        lineno += 1
        if max_line_bytes is not None and len(raw.rstrip(b"\r\n")) > max_line_bytes:
            while not raw.endswith(b"\n") and raw:        # skip the rest of the line, a block at a time
                raw = fh.readline(1 << 20)
            yield lineno, None
            continue
        yield lineno, raw


def iter_json_lines(path: str | Path, on_error: OnError | None = None,
                    max_line_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line.

    Invalid JSON, a non-UTF-8 line or (with ``max_line_bytes``) a longer line raises :class:`DataError`, or, with
    ``on_error``, is passed to it and skipped."""
    path = check_regular_file(Path(path))   # a missing file, a folder, a FIFO: a clear error, never a hang
    with path.open("rb") as fh:  # decoded per line, so a bad byte is reported with its file and line
        for lineno, raw in _numbered_lines(fh, max_line_bytes):
            if raw is None:
                _report(DataError(path, f"line {lineno}", None, f"longer than {max_line_bytes} bytes, the limit on a "
                                  "line (--max-line-bytes)"), on_error)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _report(DataError(path, f"line {lineno}", None,
                                  f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"), on_error)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"), object_pairs_hook=json_pairs)
            except json.JSONDecodeError as exc:
                _report(DataError(path, f"line {lineno}", None,
                                  f"invalid JSON ({exc.msg} at column {exc.colno})"), on_error)
                continue
            yield lineno, obj


def _report(err: DataError, on_error: OnError | None, kind: str = "malformed") -> None:
    if on_error is None:
        raise err
    on_error(err, kind)


def iter_records(path: str | Path, parse: Callable, on_error: OnError | None = None) -> Iterator:
    """Validated records of a JSON Lines file (``parse`` = :func:`entity_from_dict` or :func:`mention_from_dict`).

    The first bad line (JSON, UTF-8, a field, a duplicate id) raises :class:`DataError` naming file, line, id and
    field; with ``on_error`` every bad line is passed to it (kind ``"malformed"`` or ``"duplicate"``) and skipped."""
    path = Path(path)
    seen: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path, on_error):
        where = f"line {lineno}"
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            where = f"line {lineno} (id {obj['id']!r})"

        def fail(field_name, problem, _where=where):
            raise DataError(path, _where, field_name, problem)

        try:
            bad = record_json_problem(obj)
            if bad is not None:
                fail(*bad)
            record = parse(obj, fail)
        except DataError as err:
            _report(err, on_error)
            continue
        if record.id in seen:
            _report(DataError(path, where, "id", f"duplicate id, first seen on line {seen[record.id]}"), on_error,
                    "duplicate")
            continue
        seen[record.id] = lineno
        yield record


def read_entities(path: str | Path) -> list[Entity]:
    return list(iter_records(path, entity_from_dict))


def read_mentions(path: str | Path) -> list[Mention]:
    return list(iter_records(path, mention_from_dict))


@dataclass
class Dataset:
    """A loaded unified dataset. ``root`` resolves relative image paths."""

    root: Path
    info: DatasetInfo
    entities: list[Entity]
    mentions: list[Mention]

    def image_path(self, rel: str | None) -> Path | None:
        return None if rel is None else self.root / rel

    def split(self, name: str) -> list[Mention]:
        return [m for m in self.mentions if m.split == name]


def read_info(root: str | Path) -> DatasetInfo:
    """A dataset folder's ``dataset.json`` (a default one naming the folder when the file is absent)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    info_path = root / INFO_FILE
    if not info_path.exists():
        return DatasetInfo(name=root.name, source_format="unknown")
    check_regular_file(info_path)
    try:
        raw = json.loads(info_path.read_text(encoding="utf-8"))
        return DatasetInfo(**raw)
    except (ValueError, TypeError) as exc:  # bad JSON, not UTF-8, missing or unknown fields
        raise DataError(info_path, "file", None, f"not a valid dataset info object ({exc})") from None


def check_published(root: str | Path) -> None:
    """A :class:`DataError` when the folder's set of files was not published whole (the ``.incomplete`` marker of
    an interrupted write is still there)."""
    if (Path(root) / INCOMPLETE_MARKER).exists():
        raise DataError(root, "folder", None, "incomplete: the step writing it was interrupted (the "
                        f"{INCOMPLETE_MARKER} marker is still there); rerun that step")


def load_dataset(root: str | Path, *, check_gold: bool = True) -> Dataset:
    """Load and validate a unified dataset folder (published whole: :func:`check_published`).

    With ``check_gold``, every mention's gold entity (and candidates) must be in the KB.
    """
    root = Path(root)
    info = read_info(root)
    check_published(root)
    entities = read_entities(root / ENTITIES_FILE)
    mentions = read_mentions(root / MENTIONS_FILE)
    if check_gold:
        ids = {e.id for e in entities}
        for m in mentions:
            err = missing_entity(m, ids, root / MENTIONS_FILE)
            if err is not None:
                raise err
    return Dataset(root=root, info=info, entities=entities, mentions=mentions)


def missing_entity(m: Mention, kb: set[str], path: str | Path) -> DataError | None:
    """The first entity ``m`` names (its gold, then its candidates) that is not in ``kb``, as the error naming the
    file ``path``, the mention and the field; ``None`` when the KB has them all."""
    for field_name, eid in (("gold_id", m.gold_id), *(("candidates", c) for c in m.candidates or ())):
        if eid not in kb:
            return DataError(path, f"id {m.id!r}", field_name, f"entity {eid!r} is not in {ENTITIES_FILE}")
    return None


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (no Unicode text) is written as its ``\\udXXX`` escape instead of
    failing, which in JSON is the same value (loading refuses it, naming the record)."""
    return text.encode("utf-8", "backslashreplace")


def _jsonl_bytes(records: Iterable[Entity | Mention]) -> bytes:
    return utf8_bytes("".join(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n" for r in records))


def save_dataset(root: str | Path, info: DatasetInfo, entities: Iterable[Entity], mentions: Iterable[Mention],
                 extra_files: dict[str, bytes | str] | None = None, *, complete: bool = True) -> Path:
    """Write a unified dataset folder as one set: the records, ``extra_files`` (``{name: content}``, e.g. a step's
    report) and ``dataset.json``, between the ``.incomplete`` marker's creation and removal (module docstring).

    ``complete=False`` leaves the marker: the step checks the folder and then adds its last files with
    :func:`complete_dataset` (``prepare`` validates the written files and adds the report)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {ENTITIES_FILE: _jsonl_bytes(entities), MENTIONS_FILE: _jsonl_bytes(mentions)}
    files[INFO_FILE] = utf8_bytes(json.dumps(asdict(info), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(root / INCOMPLETE_MARKER, "a step is writing this dataset; it is not complete\n")
    for name, data in files.items():
        atomic_write_bytes(root / name, data)
    if complete:
        complete_dataset(root, extra_files)
    return root


def complete_dataset(root: str | Path, extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write ``extra_files`` into a folder :func:`save_dataset` left incomplete, then remove the marker."""
    root = Path(root)
    for name, content in (extra_files or {}).items():
        atomic_write_bytes(root / name, utf8_bytes(content) if isinstance(content, str) else content)
    (root / INCOMPLETE_MARKER).unlink()
    return root
