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

Every JSON input of the toolkit is parsed by :func:`parse_json` (``json_pairs`` remembers repeated keys; nesting is
bounded by :data:`MAX_JSON_DEPTH`), and every check of a parsed value walks it without recursion, so no input, however
deep, ends in a ``RecursionError``. A reader keeps a record whose only fault is in a non-essential field (a description,
an alias, an image, a caption): :func:`keep_record` mends it and reports the mend.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, NoReturn, TypeVar

from data_process.core.durable_io import atomic_write_bytes, atomic_write_text
from data_process.core.safe_paths import check_regular_file

SPLITS = ("train", "dev", "test")
ENTITIES_FILE = "entities.jsonl"
MENTIONS_FILE = "mentions.jsonl"
INFO_FILE = "dataset.json"
INCOMPLETE_MARKER = ".incomplete"
DATASET_KINDS = ("mel", "kb")   # mentions linked to a KB; a KB alone (entities, no mentions)
MAX_JSON_DEPTH = 100            # arrays and objects inside one another; a record needs a handful (Wikidata ~12)
REPLACEMENT = "\ufffd"          # what a lone surrogate in a non-essential field becomes


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
class Where:
    """One record's place (file and record): ``where(field, problem)`` raises the :class:`DataError` naming them;
    ``where.error(field, problem)`` makes it without raising."""

    path: str | Path
    where: str

    def error(self, field_name: str | None, problem: str) -> DataError:
        return DataError(self.path, self.where, field_name, problem)

    def __call__(self, field_name: str | None, problem: str) -> NoReturn:
        raise self.error(field_name, problem)


@dataclass(frozen=True)
class Entity:
    """A knowledge-base entity.

    ``enrichment`` holds LLM-extracted information (``{"text": str, ..., "provenance": {...}}``)
    when the dataset is a "+" dataset; ``None`` otherwise. ``aliases`` are other names of the entity (a Wikidata
    KB's aliases); they are not part of :meth:`text` and are written only when there are some.
    """

    id: str
    name: str
    description: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    enrichment: dict[str, Any] | None = None
    aliases: tuple[str, ...] = ()

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
    """Facts about how a unified dataset was made (``dataset.json``). ``kind`` is ``"mel"`` (mentions linked to a
    KB) or ``"kb"`` (a KB alone: entities, no mentions; e.g. ``prepare --format wikidata``)."""

    name: str
    source_format: str
    split_rule: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    kind: str = "mel"


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
    aliases = obj.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        fail("aliases", "must be a list of non-empty strings")
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
        aliases=tuple(aliases),
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_in(text: str) -> str | None:
    found = _SURROGATE.search(text)
    return found.group() if found else None


def _first_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string of ``value`` (keys included), walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if (ch := _surrogate_in(item)) is not None:
                return ch
        elif isinstance(item, dict):
            stack.extend(x for k, v in reversed(item.items()) for x in (v, k))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return None


def _surrogate_problem(ch: str) -> str:
    return f"holds a lone surrogate {ch!r} (not Unicode text; cannot be written as UTF-8)"


def replace_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys included) replaced by U+FFFD; lists and objects are
    copied, walked without recursion."""
    if isinstance(value, str):
        return _SURROGATE.sub(REPLACEMENT, value)
    if not isinstance(value, (dict, list)):
        return value
    root = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        src, dst = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, item in items:
            if isinstance(item, str):
                new: Any = _SURROGATE.sub(REPLACEMENT, item)
            elif isinstance(item, (dict, list)):
                new = {} if isinstance(item, dict) else []
                stack.append((item, new))
            else:
                new = item
            if isinstance(dst, dict):
                dst[_SURROGATE.sub(REPLACEMENT, key) if isinstance(key, str) else key] = new
            else:
                dst.append(new)
    return root


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


# ---------------------------------------------------------------------------------------------
# Parsing: the one JSON parser of every input, with nesting bounded


class NestingError(ValueError):
    """JSON text nested deeper than :data:`MAX_JSON_DEPTH`. ``member`` is the top-level key (an object) or index
    (an array) holding the deep part, when the text could be parsed to find it; ``problem`` the reason."""

    def __init__(self, depth: int, member: str | int | None):
        self.depth = depth
        self.member = member
        self.problem = (f"nested {depth:,} levels deep; JSON input may nest arrays and objects at most "
                        f"{MAX_JSON_DEPTH} levels")
        super().__init__(self.problem)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in the JSON ``text`` (strings skipped; 0 for a scalar), without parsing."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def value_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed value (0 for a scalar), walked without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _deep_member(obj: Any) -> str | int | None:
    """The first top-level key or index of ``obj`` whose value nests deeper than the limit allows."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return next((key for key, value in items if value_depth(value) >= MAX_JSON_DEPTH), None)


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]')


def _deep_member_in_text(text: str) -> str | int | None:
    """:func:`_deep_member` read from the text itself (when it is too deep to parse): the top-level key (an object)
    or index (an array) inside which the nesting first passes the limit."""
    in_array = text.lstrip()[:1] == "["
    depth, index, key, last_string = 0, 0, None, None
    for token in _JSON_TOKEN.finditer(text):
        tok = token.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return index if in_array else key
        elif tok in "]}":
            depth -= 1
        elif depth == 1 and tok == ",":
            index += 1
        elif depth == 1 and tok == ":":
            key = last_string
        elif depth == 1:
            try:
                last_string = json.loads(tok)
            except ValueError:
                last_string = None
    return None


def parse_json(text: str) -> Any:
    """``json.loads`` of every JSON input: objects through :func:`json_pairs`, and nesting deeper than
    :data:`MAX_JSON_DEPTH` refused with :class:`NestingError` (Python's parser and every recursive walk would end in
    a ``RecursionError``). Invalid JSON raises ``json.JSONDecodeError`` as usual."""
    depth = json_depth(text) if text.count("[") + text.count("{") > MAX_JSON_DEPTH else 0
    try:
        obj = json.loads(text, object_pairs_hook=json_pairs)
    except RecursionError:
        raise NestingError(depth, _deep_member_in_text(text)) from None
    if depth > MAX_JSON_DEPTH:
        raise NestingError(depth, _deep_member(obj))
    return obj


# ---------------------------------------------------------------------------------------------
# What parsing lets through: repeated keys, lone surrogates; mending a non-essential field


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
    the record's top-level key (``None`` for the record itself, or when the key itself holds the surrogate). Walked
    without recursion, at any depth."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else [(None, obj)]
    for key, value in items:
        ch = _surrogate_in(key) if isinstance(key, str) else None
        name = None if ch else (str(key) if key is not None else None)
        ch = ch or _first_surrogate(value)
        if ch:
            return name, _surrogate_problem(ch)
    return None


Repair = Callable[[DataError, str], None]   # (the problem, what was done about it)
LEFT_OUT = "the field is left out, the record kept"
REPLACED = "the lone surrogate is replaced by U+FFFD, the record kept"
T = TypeVar("T")


def keep_record(obj: Any, parse: Callable[[Any], T], where: Where, *, essential: Collection[str] = (),
                repair: Repair | None = None) -> T:
    """``parse(obj)`` for a raw JSON record, after the checks parsing leaves to us (:func:`record_json_problem`).

    Without ``repair`` any problem fails the record (``where`` raises :class:`DataError`). With it, a problem in a
    non-essential field (a top-level key not in ``essential``: a description, an alias, an image, a caption) is
    mended and the record kept: a lone surrogate is replaced by U+FFFD (:func:`replace_surrogates`); a field given
    twice, a field name holding a lone surrogate, and a field ``parse`` refuses (its :class:`DataError` names it) are
    left out. Each mend goes to ``repair(error, what was done)`` (which may raise it: a strict reader). A problem in
    an essential field still fails the record. ``parse`` gets a mended copy; ``obj`` is left as it is."""
    if repair is None or not isinstance(obj, dict):
        bad = record_json_problem(obj)
        if bad is not None:
            where(*bad)
        return parse(obj)
    repeated = repeated_keys(obj)
    for key, copies in repeated.items():
        if key in essential:
            where(key, f"given {copies} times in the record (JSON keeps only the last)")
    kept: dict[str, Any] = {}
    for key, value in obj.items():
        if key in repeated:
            repair(where.error(key, f"given {repeated[key]} times in the record (JSON keeps only the last)"),
                   LEFT_OUT)
        elif _surrogate_in(key) is not None:
            repair(where.error(None, "a field name " + _surrogate_problem(_surrogate_in(key))), LEFT_OUT)
        elif key not in essential and (ch := _first_surrogate(value)) is not None:
            repair(where.error(key, _surrogate_problem(ch)), REPLACED)
            kept[key] = replace_surrogates(value)
        else:
            kept[key] = value
    bad = lone_surrogate({k: v for k, v in kept.items() if k in essential})
    if bad is not None:
        where(*bad)
    while True:
        try:
            return parse(kept)
        except DataError as err:
            if err.field is None or err.field in essential or err.field not in kept:
                raise
            del kept[err.field]
            repair(err, LEFT_OUT)


def record_to_dict(record: Entity | Mention) -> dict[str, Any]:
    """JSON-ready dict; tuples become lists, ``None`` optional fields (and empty ``aliases``) are dropped."""
    out = {}
    for key, value in asdict(record).items():
        if value is None or (key == "aliases" and not value):   # no aliases: the entity line is as it always was
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
                _report(DataError(path, f"line {lineno}", None, not_utf8(exc, raw, lineno, "of the line")), on_error)
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")   # a UTF-8 byte-order mark (some editors write one)
            if not line.strip():
                continue
            try:
                obj = parse_json(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                _report(DataError(path, f"line {lineno}", None,
                                  f"invalid JSON ({exc.msg} at column {exc.colno})"), on_error)
                continue
            except NestingError as exc:
                _report(DataError(path, f"line {lineno}", exc.member if isinstance(exc.member, str) else None,
                                  exc.problem), on_error)
                continue
            yield lineno, obj


def not_utf8(exc: UnicodeDecodeError, raw: bytes, lineno: int = 1, unit: str = "") -> str:
    """Why ``raw`` is not UTF-8 text, for an error line (a UTF-16 file is named as such)."""
    if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    return f"not UTF-8 text ({exc.reason} at byte {exc.start}{' ' + unit if unit else ''})"


def _report(err: DataError, on_error: OnError | None, kind: str = "malformed") -> None:
    if on_error is None:
        raise err
    on_error(err, kind)


ENTITY_ESSENTIAL = frozenset({"id", "name"})
MENTION_ESSENTIAL = frozenset({"id", "sentence", "mention", "gold_id", "split", "span", "candidates"})
ESSENTIAL_FIELDS = {"entity": ENTITY_ESSENTIAL, "mention": MENTION_ESSENTIAL}


def iter_records(path: str | Path, parse: Callable, on_error: OnError | None = None, *,
                 on_repair: Repair | None = None) -> Iterator:
    """Validated records of a JSON Lines file (``parse`` = :func:`entity_from_dict` or :func:`mention_from_dict`).

    The first bad line (JSON, UTF-8, a field, a duplicate id) raises :class:`DataError` naming file, line, id and
    field; with ``on_error`` every bad line is passed to it (kind ``"malformed"`` or ``"duplicate"``) and skipped.
    With ``on_repair`` a fault in a non-essential field (not in :data:`ESSENTIAL_FIELDS`: a description, aliases,
    images, a caption, an enrichment, an unknown field) is mended and the record kept (:func:`keep_record`)."""
    path = Path(path)
    seen: dict[str, int] = {}
    essential = ENTITY_ESSENTIAL if parse is entity_from_dict else MENTION_ESSENTIAL
    for lineno, obj in iter_json_lines(path, on_error):
        where = f"line {lineno}"
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            where = f"line {lineno} (id {obj['id']!r})"
        fail = Where(path, where)
        try:
            record = keep_record(obj, lambda o: parse(o, fail), fail, essential=essential, repair=on_repair)
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


def read_id_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, id)`` of a file of ids, one a line (blank lines and ``#`` comments skipped; not UTF-8: one
    error naming file and line): ``prepare --ids``, ``dim-mel index --remove``."""
    path = check_regular_file(Path(path))
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8").split("#", 1)[0].strip()
            except UnicodeDecodeError as exc:
                raise DataError(path, f"line {lineno}", None, f"not UTF-8 text ({exc.reason})") from None
            if text:
                yield lineno, text


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
        info = DatasetInfo(**parse_json(info_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:  # bad JSON, not UTF-8, nested too deep, missing or unknown fields
        raise DataError(info_path, "file", None, f"not a valid dataset info object ({exc})") from None
    if info.kind not in DATASET_KINDS:
        raise DataError(info_path, "file", "kind", f"must be one of {', '.join(DATASET_KINDS)}, got {info.kind!r}")
    return info


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


def jsonl_bytes(records: Iterable[Entity | Mention]) -> bytes:
    """The JSON Lines bytes of ``records`` as a dataset file holds them (a step writing a file as a stream writes
    each record's bytes in turn: the same file)."""
    return utf8_bytes("".join(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n" for r in records))


def save_dataset(root: str | Path, info: DatasetInfo, entities: Iterable[Entity], mentions: Iterable[Mention],
                 extra_files: dict[str, bytes | str] | None = None, *, complete: bool = True) -> Path:
    """Write a unified dataset folder as one set: the records, ``extra_files`` (``{name: content}``, e.g. a step's
    report) and ``dataset.json``, between the ``.incomplete`` marker's creation and removal (module docstring).

    ``complete=False`` leaves the marker: the step checks the folder and then adds its last files with
    :func:`complete_dataset` (``prepare`` validates the written files and adds the report)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {ENTITIES_FILE: jsonl_bytes(entities), MENTIONS_FILE: jsonl_bytes(mentions)}
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
