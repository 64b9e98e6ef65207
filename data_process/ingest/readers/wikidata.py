"""Wikidata JSON dumps as a KB source (``prepare --format wikidata``): a KB-only unified dataset (entities, no
mentions; ``dataset.json`` kind ``kb``).

The dump's published layout (``latest-all.json.gz`` / ``.json.bz2`` at dumps.wikimedia.org, or an uncompressed
``.json``; gzip and bzip2 are recognised by their first bytes)::

    [
    {"type":"item","id":"Q31","labels":{"en":{"language":"en","value":"Belgium"},...},"descriptions":{...},
     "aliases":{"en":[{"language":"en","value":"Kingdom of Belgium"},...]},"claims":{"P31":[{"mainsnak":{
     "snaktype":"value","property":"P31","datavalue":{"value":{"entity-type":"item","id":"Q3624078"},...}},
     "rank":"normal",...}],"P18":[...]},"sitelinks":{"enwiki":{"site":"enwiki","title":"Belgium"},...}},
    ...
    {"type":"item","id":"Q99",...}
    ]

It is read as a stream, one line at a time, and each entity kept goes to a ``keep`` callback as it is read
(:func:`stream_wikidata`; ``prepare`` writes it to the staged ``entities.jsonl`` at once; :func:`read_wikidata`
collects a list, for small dumps and the Python API). What the reader itself holds while the dump streams by does
not grow with the dump, nor with the KB kept beyond a bit an item number:

* the ids kept so far, to refuse a repeated one: :class:`QidSet`, one bit per item number in blocks of 4,096
  numbers (512 bytes) made as first used: at most ``612 * min(kept, max Q-number / 4096 + 1)`` bytes (a block and
  its dict entry), so about 21 MB however much of today's Wikidata is kept (its Q-numbers are dense, below 1.4e8);
  only ids scattered one per 4,096 numbers cost more than a set of id strings would (612 against ~120 bytes each);
* where each kept item was read, for the message naming a repeated id's first read, appended to a temporary file
  (``scratch``: the output's staging folder) and looked up once at the end for all repeats (strict: at the first);
* the counts, the ``--ids`` list and the ids of it met in the dump (``O(--ids)``), and the lists of dropped records and
  mended fields (``O(bad records)``, all listed in ``validation.json``).

A repeated item id (an item kept earlier in the dump) is a dropped record (``duplicate item, first read at line N
(id ...)``); an id whose first item was skipped (filtered out, without a label, dropped) is not a repeat.

Rules:

* Items only (``Q`` ids): properties, lexemes and other entity types are skipped and counted (``skipped`` in
  ``validation.json``), as are items without a usable label and items the filters leave out. A line whose type and
  id lead it (as the dumps write them) is skipped without being parsed when its type or id is not wanted.
* Labels, descriptions and aliases in ``language`` with fallbacks (:func:`language_chain`): the language, the
  languages it falls back to (a regional or script variant to its base language: ``de-ch`` -> ``de``; a few known
  pairs: ``pt`` <-> ``pt-br``, the ``zh`` variants), then ``mul`` (Wikidata's default value for all languages,
  introduced in 2024 for labels and aliases of names, titles, ...), then ``en`` (the last resort, as Wikidata's own
  fallback does). The name is the first label found along that chain; the description the first description
  (``mul`` has none); the aliases those of every chain language up to the one that gave the name, and ``mul``'s, in
  chain order, without repeats or the name.
* ``P18`` (image) values of statements not deprecated become ``images/commons/<file name, spaces as underscores>``:
  nothing is downloaded; a later step fetches ``https://commons.wikimedia.org/wiki/Special:FilePath/<file name>`` into
  that path. Until then validation counts them as missing entity images (a warning) and features treat them as
  absent.
* Filters (all given must hold): ``ids`` (a file of Q-ids, one a line; ``#`` comments), ``instance_of`` (an item
  with a ``P31`` value among them, deprecated statements ignored), ``min_sitelinks``.
* A line that is not a valid entity (invalid JSON in the middle of the dump, a missing id, labels of the wrong shape)
  is a dropped record (``--max-invalid``); a bad description, alias or image value is mended and listed. A dump cut
  mid-line or without its closing ``]`` (a broken download), a compressed stream that ends early, or text that is
  not the layout is one error naming the file and the line: nothing is written.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import re
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator

from tqdm import tqdm

from data_process.core.records import (DataError, DatasetInfo, Entity, NestingError, Where, parse_json,
                                       read_id_lines)
from data_process.core.safe_paths import check_regular_file
from data_process.ingest.readers.common import Converted, RecordPolicy, failer, type_name

ENTITY_IMAGE_DIR = "images/commons"
COMMONS_FILE_URL = "https://commons.wikimedia.org/wiki/Special:FilePath/"
MUL, LAST_RESORT = "mul", "en"
# Known fallbacks that are not just "drop the last subtag" (after MediaWiki's language fallbacks)
LANGUAGE_FALLBACKS = {
    "pt": ("pt-br",),
    "pt-br": ("pt",),
    "zh": ("zh-hans", "zh-hant", "zh-cn", "zh-tw", "zh-hk"),
    "zh-hans": ("zh-cn", "zh-sg", "zh-my", "zh"),
    "zh-hant": ("zh-tw", "zh-hk", "zh-mo", "zh"),
    "zh-cn": ("zh-hans", "zh-sg", "zh-my", "zh"),
    "zh-sg": ("zh-hans", "zh-cn", "zh-my", "zh"),
    "zh-my": ("zh-sg", "zh-hans", "zh-cn", "zh"),
    "zh-tw": ("zh-hant", "zh-hk", "zh-mo", "zh"),
    "zh-hk": ("zh-hant", "zh-mo", "zh-tw", "zh"),
    "zh-mo": ("zh-hk", "zh-hant", "zh-tw", "zh"),
}
QID = re.compile(r"^Q[1-9][0-9]*$")
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{1,8})*$")
# how a dump line starts: {"type":"item","id":"Q31",...  (read without parsing the line)
_LEAD = re.compile(rb'^\{"type":"([a-z]+)","id":"([A-Z][0-9]+)"')
SKIPPED_KINDS = {"property": "properties", "lexeme": "lexemes"}


def language_chain(language: str) -> tuple[str, ...]:
    """The languages a label is looked up in, in order (module docstring): ``de-ch`` -> ``(de-ch, de, mul, en)``."""
    code = language.strip().lower().replace("_", "-")
    if not LANGUAGE_CODE.match(code):
        raise ValueError(f"--language must be a Wikimedia language code like en, de-ch or zh-hant, got {language!r}")
    chain = [code]
    for step in chain:                                   # grows while it is walked: fallbacks of fallbacks
        parts = step.split("-")
        for nxt in (*LANGUAGE_FALLBACKS.get(step, ()), *(("-".join(parts[:-1]),) if len(parts) > 1 else ())):
            if nxt not in chain:
                chain.append(nxt)
    return tuple(dict.fromkeys([*chain, MUL, LAST_RESORT]))


def read_ids(path: str | Path) -> set[str]:
    """The Q-ids of an ``--ids`` file: one a line, blank lines and ``#`` comments skipped."""
    ids: set[str] = set()
    for lineno, text in read_id_lines(path):
        if not QID.match(text):
            raise DataError(Path(path), f"line {lineno}", None, f"{text!r} is not a Wikidata item id like Q42")
        ids.add(text)
    return ids


def parse_instance_of(spec: str | None) -> frozenset[str] | None:
    """``"Q5,Q515"`` -> the classes ``--instance-of`` keeps."""
    if spec is None:
        return None
    classes = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in classes if not QID.match(c)]
    if not classes or bad:
        raise ValueError(f"--instance-of must be Wikidata item ids like Q5,Q515, got {spec!r}")
    return frozenset(classes)


@contextmanager
def open_dump(path: Path) -> Iterator[BinaryIO]:
    """The dump's bytes, decompressed when it is gzip or bzip2 (recognised by the first bytes)."""
    check_regular_file(path)
    with path.open("rb") as probe:
        magic = probe.read(3)
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic == b"BZh" else open
    with opener(path, "rb") as fh:
        yield fh


def _text(value: Any) -> str | None:
    """The ``value`` of a ``{"language", "value"}`` term, stripped, when it is a non-empty string."""
    text = value.get("value") if isinstance(value, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def _terms(obj: dict, key: str, fail: Where) -> dict:
    terms = obj.get(key)
    if terms is None:
        return {}
    if not isinstance(terms, dict):
        fail(key, f"must be an object {{language: ...}}, got {type_name(terms)}")
    return terms


def _statement_values(claims: dict, prop: str) -> Iterator[Any]:
    """The values of ``prop``'s statements that are not deprecated and have a value."""
    statements = claims.get(prop) if isinstance(claims, dict) else None
    for st in statements if isinstance(statements, list) else ():
        if not isinstance(st, dict) or st.get("rank") == "deprecated":
            continue
        snak = st.get("mainsnak")
        value = snak.get("datavalue") if isinstance(snak, dict) else None
        if isinstance(value, dict) and "value" in value:
            yield value["value"]


def _item_classes(claims: dict) -> set[str]:
    return {v["id"] for v in _statement_values(claims, "P31") if isinstance(v, dict) and isinstance(v.get("id"), str)}


class QidSet:
    """A set of item ids (``Q`` and a number) as bits of their numbers, in blocks of :attr:`BLOCK` numbers made as
    first used: ``612 * min(ids, max number / 4096 + 1)`` bytes, a block and its dict entry (module docstring)."""

    BLOCK_BITS = 12
    BLOCK = 1 << BLOCK_BITS

    def __init__(self) -> None:
        self._blocks: dict[int, bytearray] = {}

    def _slot(self, qid: str) -> tuple[int, int, int]:
        number = int(qid[1:])
        return number >> self.BLOCK_BITS, (number & (self.BLOCK - 1)) >> 3, 1 << (number & 7)

    def add(self, qid: str) -> None:
        block, byte, bit = self._slot(qid)
        bits = self._blocks.get(block)
        if bits is None:
            bits = self._blocks[block] = bytearray(self.BLOCK // 8)
        bits[byte] |= bit

    def __contains__(self, qid: object) -> bool:
        if not isinstance(qid, str) or not QID.match(qid):
            return False
        block, byte, bit = self._slot(qid)
        bits = self._blocks.get(block)
        return bits is not None and bool(bits[byte] & bit)


class _FirstReads:
    """Where each kept item was read (``line N (id 'Q..')``), appended to a temporary file, looked up by a scan."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh

    def add(self, qid: str, where: str) -> None:
        self.fh.write(f"{qid}\t{where}\n".encode("utf-8", "backslashreplace"))

    def find(self, qids: set[str]) -> dict[str, str]:
        """``{qid: where it was first kept}`` for ``qids`` (one pass over the file)."""
        found: dict[str, str] = {}
        self.fh.flush()
        self.fh.seek(0)
        for raw in self.fh:
            qid, where = raw.decode("utf-8").rstrip("\n").split("\t", 1)
            if qid in qids and qid not in found:
                found[qid] = where
        self.fh.seek(0, 2)
        return found


DUPLICATE = "duplicate item, first read at {}"


class _Kb:
    """What the reader keeps and counts while the dump streams by (bounded: the module docstring)."""

    def __init__(self, chain: tuple[str, ...], ids: set[str] | None, classes: frozenset[str] | None,
                 min_sitelinks: int | None, policy: RecordPolicy, keep: Callable[[Entity], None],
                 first_reads: _FirstReads):
        self.chain, self.ids, self.classes, self.min_sitelinks = chain, ids, classes, min_sitelinks
        self.policy, self.keep, self.first_reads = policy, keep, first_reads
        self.kept = 0
        self.kept_ids = QidSet()
        self.repeats: list[tuple[int, str]] = []   # (index in policy.dropped, qid): a repeat, its first read unnamed
        self.listed: set[str] = set()       # the --ids met in the dump, kept or not
        self.skipped = {"properties": 0, "lexemes": 0, "other_entity_types": 0, "items_without_label": 0,
                        "items_filtered_out": 0}
        self.images = 0

    def wanted(self, kind: str, qid: str | None) -> bool:
        """Count and refuse a line by its type (and id, with ``--ids``) before it is parsed."""
        if kind != "item":
            self.skipped[SKIPPED_KINDS.get(kind, "other_entity_types")] += 1
            return False
        if self.ids is not None and qid is not None:
            if qid not in self.ids:
                self.skipped["items_filtered_out"] += 1
                return False
            self.listed.add(qid)
        return True

    def add(self, obj: Any, fail: Where) -> None:
        """One parsed entity line: kept, skipped and counted, or a :class:`DataError` (a dropped record)."""
        if not isinstance(obj, dict):
            fail(None, f"an entity must be a JSON object, got {type_name(obj)}")
        kind, qid = obj.get("type"), obj.get("id")
        if not isinstance(kind, str):
            fail("type", f"must be a string, got {type_name(kind)}")
        if not isinstance(qid, str):
            fail("id", f"must be a string, got {type_name(qid)}")
        if not self.wanted(kind, qid):
            return
        if not QID.match(qid):
            fail("id", f"an item's id must be like Q42, got {qid!r}")
        if qid in self.kept_ids:
            if self.policy.strict:
                fail("id", DUPLICATE.format(self.first_reads.find({qid})[qid]))
            self.repeats.append((len(self.policy.dropped), qid))   # named by name_repeats() at the end
            fail("id", DUPLICATE.format("?"))
        claims = obj.get("claims") or {}
        sitelinks = obj.get("sitelinks") or {}
        for key, value in (("claims", claims), ("sitelinks", sitelinks)):
            if not isinstance(value, dict):
                fail(key, f"must be an object, got {type_name(value)}")
        if ((self.min_sitelinks is not None and len(sitelinks) < self.min_sitelinks)
                or (self.classes is not None and not self.classes & _item_classes(claims))):
            self.skipped["items_filtered_out"] += 1
            return
        labels = _terms(obj, "labels", fail)
        named = next(((lang, text) for lang in self.chain if (text := _text(labels.get(lang))) is not None), None)
        if named is None:
            self.skipped["items_without_label"] += 1
            return
        record = {"id": qid, "name": named[1], "description": self._chosen(obj.get("descriptions")),
                  "aliases": self._chosen(obj.get("aliases")), "images": claims.get("P18")}
        entity = self.policy.keep(record, lambda r: self._entity(r, named[0], fail), fail, ("id", "name"))
        self.kept_ids.add(qid)
        self.first_reads.add(qid, fail.where)
        self.kept += 1
        self.images += len(entity.images)
        self.keep(entity)

    def name_repeats(self) -> None:
        """Complete the dropped records of repeated ids with where each id was first read (one scan)."""
        if not self.repeats:
            return
        first = self.first_reads.find({qid for _, qid in self.repeats})
        for index, qid in self.repeats:
            self.policy.dropped[index] = dataclasses.replace(self.policy.dropped[index],
                                                             reason=DUPLICATE.format(first[qid]))
        self.repeats = []

    def _chosen(self, terms: Any) -> Any:
        """The chain's languages of a ``{language: ...}`` map (the others are never read, nor checked)."""
        return {lang: terms[lang] for lang in self.chain if lang in terms} if isinstance(terms, dict) else terms

    def _entity(self, record: dict, name_language: str, fail: Where) -> Entity:
        """The entity of one item's fields; a bad description, aliases or image value fails its field only."""
        descriptions = record.get("description") or {}
        if not isinstance(descriptions, dict):
            fail("description", f"'descriptions' must be an object {{language: ...}}, got {type_name(descriptions)}")
        description = next((text for lang in self.chain if lang != MUL
                            and (text := _text(descriptions.get(lang))) is not None), "")
        aliases: dict[str, None] = {}
        terms = record.get("aliases") or {}
        if not isinstance(terms, dict):
            fail("aliases", f"must be an object {{language: [...]}}, got {type_name(terms)}")
        upto = self.chain[: self.chain.index(name_language) + 1]
        for lang in (*upto, *((MUL,) if MUL not in upto else ())):
            values = terms.get(lang) or []
            if not isinstance(values, list):
                fail("aliases", f"{lang!r} must be a list of terms, got {type_name(values)}")
            for value in values:
                text = _text(value)
                if text is not None and text != record["name"]:
                    aliases[text] = None
        images: dict[str, None] = {}
        for value in _statement_values({"P18": record.get("images")}, "P18"):
            if not isinstance(value, str) or not value.strip() or any(c in value for c in "/\\\x00"):
                fail("images", f"P18 must be a Commons file name, got {value!r}")
            images[f"{ENTITY_IMAGE_DIR}/{value.strip().replace(' ', '_')}"] = None
        return Entity(id=record["id"], name=record["name"], description=description, aliases=tuple(aliases),
                      images=tuple(images))


def _lines(path: Path, progress: bool) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of the dump; a compressed stream that ends early or is corrupt: a DataError."""
    lineno = 0
    try:
        with open_dump(path) as fh:
            for lineno, raw in enumerate(tqdm(fh, desc="wikidata dump", unit=" lines", disable=not progress), 1):
                yield lineno, raw
    except (EOFError, OSError, zlib.error) as exc:      # gzip/bz2: cut or corrupt
        if isinstance(exc, OSError) and exc.errno is not None:   # the disk, not the dump
            raise
        raise DataError(path, f"line {lineno + 1}", None, f"the compressed dump is cut or corrupt ({exc}): a broken "
                        "download? Nothing written") from None


def read_wikidata(src: str | Path, **options: Any) -> Converted:
    """A Wikidata JSON dump as a KB-only dataset with its entities in a list (:func:`stream_wikidata`'s options):
    for a dump whose KB fits in memory; ``prepare`` streams the entities to disk instead."""
    entities: list[Entity] = []
    converted = stream_wikidata(src, entities.append, **options)
    return dataclasses.replace(converted, entities=entities)


def stream_wikidata(src: str | Path, keep: Callable[[Entity], None], *, scratch: str | Path | None = None,
                    dataset_name: str | None = None, progress: bool = True, strict: bool = False,
                    language: str = "en", ids: str | Path | None = None, instance_of: str | None = None,
                    min_sitelinks: int | None = None) -> Converted:
    """Stream a Wikidata JSON dump into a KB-only dataset (see the module docstring): each kept entity, in dump
    order, goes to ``keep`` as it is read; the result holds no entities (``notes["kb_entities"]`` counts them).
    ``scratch``: the folder of the reader's temporary file (where kept items were read; default: the system's)."""
    path = Path(src)
    chain = language_chain(language)
    wanted_ids = read_ids(ids) if ids is not None else None
    classes = parse_instance_of(instance_of)
    if min_sitelinks is not None and min_sitelinks < 0:
        raise ValueError(f"--min-sitelinks must be 0 or more, got {min_sitelinks}")
    with tempfile.TemporaryFile(prefix=".wikidata-first-reads.", dir=scratch) as log:
        return _stream(path, keep, _FirstReads(log), chain=chain, wanted_ids=wanted_ids, classes=classes,
                       min_sitelinks=min_sitelinks, strict=strict, ids=ids, language=language,
                       dataset_name=dataset_name, progress=progress)


def _stream(path: Path, keep: Callable[[Entity], None], first_reads: _FirstReads, *, chain: tuple[str, ...],
            wanted_ids: set[str] | None, classes: frozenset[str] | None, min_sitelinks: int | None, strict: bool,
            ids: str | Path | None, language: str, dataset_name: str | None, progress: bool) -> Converted:
    policy = RecordPolicy(strict)
    kb = _Kb(chain, wanted_ids, classes, min_sitelinks, policy, keep, first_reads)
    opened = closed = False
    comma_after: int | None = None          # the last entity line, when it ended without a comma
    pending: DataError | None = None        # an invalid line: dropped if more follow, the cut end of the dump if not
    for lineno, raw in _lines(path, progress):
        line = raw.strip()
        if not line:
            continue
        where = f"line {lineno}"
        if closed:
            raise DataError(path, where, None, "text after the closing ']' line: not a Wikidata JSON dump")
        if not opened:
            if line != b"[":
                raise DataError(path, where, None, "a Wikidata JSON dump starts with a '[' line (one entity a line "
                                                   "follows, then a ']' line)")
            opened = True
            continue
        if pending is not None:
            policy.drop(pending)
            pending = None
        if line == b"]":
            closed = True
            continue
        if comma_after is not None:
            raise DataError(path, f"line {comma_after}", None, "no ',' after this entity, yet more lines follow: not "
                                                              "the dump layout (one entity a line, each followed by ',')")
        body = line[:-1] if line.endswith(b",") else line
        comma_after = None if line.endswith(b",") else lineno
        policy.records += 1
        lead = _LEAD.match(body)
        if lead is not None and not kb.wanted(lead.group(1).decode(), lead.group(2).decode()):
            continue
        fail = failer(path, where if lead is None else f"{where} (id {lead.group(2).decode()!r})")
        try:
            obj = parse_json(body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            policy.drop(fail.error(None, f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"))
            continue
        except json.JSONDecodeError as exc:
            pending = fail.error(None, f"invalid JSON ({exc.msg} at column {exc.colno})")
            comma_after = None                  # whether a broken line ends the dump is judged by what follows
            continue
        except NestingError as exc:
            policy.drop(fail.error(exc.member if isinstance(exc.member, str) else None, exc.problem))
            continue
        if lead is None and isinstance(obj, dict) and isinstance(obj.get("id"), str):
            fail = failer(path, f"{where} (id {obj['id']!r})")
        policy.attempt(lambda: kb.add(obj, fail), count=False)
    if not closed:
        if pending is not None:
            raise DataError(path, pending.where, None, f"the dump is cut here, mid-entity ({pending.problem}), with "
                            "no closing ']' line: a broken download? Nothing written")
        raise DataError(path, "end of file", None, "the dump ends without its closing ']' line"
                        + ("" if opened else " (it is empty)") + ": a broken download? Nothing written")
    kb.name_repeats()
    absent = sorted(wanted_ids - kb.listed, key=lambda q: int(q[1:])) if wanted_ids is not None else None
    notes: dict[str, Any] = {
        "source": str(path.resolve()),
        "kind": "a KB alone: entities from a Wikidata JSON dump, no mentions",
        "language": language, "language_chain": list(chain),
        "name": "the first label along language_chain; description: the first description along it (mul has none); "
                "aliases: those of the chain's languages up to the name's, and mul's",
        "filters": {"ids": str(ids) if ids is not None else None, "ids_listed": len(wanted_ids or ()),
                    "instance_of": sorted(classes) if classes else None, "min_sitelinks": min_sitelinks},
        "kb_entities": kb.kept, "entity_lines": policy.records,
        "skipped": dict(kb.skipped),
        "images": f"P18 file names as {ENTITY_IMAGE_DIR}/<file name, spaces as underscores>, not downloaded "
                  f"({kb.images} in all): fetch {COMMONS_FILE_URL}<file name> into that path",
    }
    name = dataset_name or re.sub(r"(\.json)?(\.gz|\.bz2)?$", "", path.name)
    info = DatasetInfo(name=name, source_format="wikidata", kind="kb",
                       split_rule="none: a KB-only dataset (entities, no mentions)", notes=notes)
    return Converted(info=info, entities=[], mentions=[], dropped=policy.dropped, repaired=policy.repaired,
                     records_read=policy.records, skipped={k: v for k, v in kb.skipped.items() if v},
                     absent_ids={"--ids without an item in the dump": absent} if absent else {})
