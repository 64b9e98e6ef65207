"""MIMIC-style preprocessed releases (WikiMEL, RichpediaMEL, WikiDiverse as used by most MEL papers since 2023).

Folder layout (see docs/DATA.md)::

    SRC/
      kb_entity.json            list of {"qid", "id", "entity_name" | "name", "desc" | "description"?,
                                          "attr"?, "image_list"?}
      qid2id.json               optional {qid: id} (one line); derived from kb_entity.json when missing
      <NAME>_train.json, <NAME>_dev.json (or _val/_valid), <NAME>_test.json
                                lists of {"id", "sentence", "mentions", "entities"?, "answer", "imgPath"?, "cands"?}
      kb_image/                 entity images named as in image_list
      mention_image/            mention images (RichpediaMEL: mention_images/)

Rules:

* Entity id = QID. Name = ``entity_name`` (URL-unquoted, as the reference loader does) or ``name``.
  Description = ``desc``/``description``; a string ``attr`` is appended to the description, an object
  ``attr``/``attributes`` (string → string) becomes ``attributes``. Images = ``image_list`` as
  ``images/kb/<file>``.
* ``qid2id.json``, when present, must agree with ``kb_entity.json`` (same id for every QID it names, no QID
  outside the KB); ``id`` values must be unique integers.
* Bad records (a KB entity, a mention record, a disagreeing ``qid2id`` entry) are dropped and listed, or raise with
  ``strict`` (``readers.common.RecordPolicy``); a record whose answer is not in the KB is such a record. A bad
  non-essential field (an entity's ``desc``/``attr``/``image_list``, a record's ``imgPath`` or ``entities``, any
  field not read) is mended (a lone surrogate replaced by U+FFFD; a mistyped or repeated field left out), listed
  as a warning, and the record kept (:data:`ENTITY_FIELDS`, :data:`RECORD_FIELDS` cannot be mended).
* Mentions: ``mentions`` / ``answer`` (/ ``entities``) are a string (one mention) or equal-length lists;
  the mention id is the record ``id`` (``"<id>-<i>"`` when a record holds several). Records that share an id
  (one record per mention of a sentence) get ``"<id>#<k>"``, k counting in train, dev, test order; the number of
  such ids is ``notes["repeated_record_ids"]``. ``answer == "nil"``
  (no ground truth) is skipped, as the reference loader does, and counted in ``notes["skipped_nil"]``.
  Any other answer and every ``cands`` entry must be a KB QID.
* Mention image: ``imgPath`` renamed with the loaders' convention ``split('/')[-1].split('.')[0] + '.jpg'``
  (the plain base name is used instead when only that file exists); empty ``imgPath`` → no image.
* A mention string that is not in the sentence but whose URL-unquoted form is, is unquoted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tqdm import tqdm

from data_process.ingest.readers.common import (
    Converted,
    RecordPolicy,
    ENTITY_IMAGE_DIR,
    MENTION_IMAGE_DIR,
    failer,
    find_span,
    guard_images,
    load_json,
    record_id,
    req_str,
    require,
    str_list,
    type_name,
)
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, SPLITS

KB_FILE = "kb_entity.json"
QID2ID_FILE = "qid2id.json"
MENTION_IMAGE_DIRS = ("mention_image", "mention_images")
KB_IMAGE_DIRS = ("kb_image", "kb_images")
SPLIT_SUFFIXES = {"train": ("train",), "dev": ("dev", "val", "valid"), "test": ("test",)}
NIL = "nil"


def mimic_image_name(img_path: str) -> str:
    """The loaders' renaming convention: ``img_path.split('/')[-1].split('.')[0] + '.jpg'``."""
    return img_path.split("/")[-1].split(".")[0] + ".jpg"


def find_split_files(src: Path) -> dict[str, Path]:
    """``{split: path}`` for ``<NAME>_train.json`` / ``_dev.json`` (``_val``, ``_valid``) / ``_test.json``."""
    files = sorted(p for p in src.iterdir() if p.suffix == ".json")   # a folder named so: load_json says so
    out: dict[str, Path] = {}
    for split, suffixes in SPLIT_SUFFIXES.items():
        pattern = re.compile(r".*_(%s)\.json$" % "|".join(suffixes), re.IGNORECASE)
        found = [p for p in files if pattern.match(p.name)]
        if len(found) != 1:
            wanted = " or ".join(f"<NAME>_{s}.json" for s in suffixes)
            raise FileNotFoundError(
                f"{src}: expected exactly one {split} file ({wanted}), found {len(found)}"
                + (f": {', '.join(p.name for p in found)}" if found else "")
            )
        out[split] = found[0]
    return out


def _first_dir(src: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (src / name).is_dir():
            return (src / name).resolve()
    return None


ENTITY_FIELDS = ("qid", "id", "entity_name", "name")   # the fields an entity cannot lose; others are mended
RECORD_FIELDS = ("id", "sentence", "mentions", "answer", "cands")   # likewise for a mention record


def _parse_entity(path: Path, index: int, obj: Any, qid2id: dict[str, int], seen_ids: dict[int, str],
                  policy: RecordPolicy) -> tuple[Entity, int]:
    where = f"entity {index}"
    if isinstance(obj, dict) and isinstance(obj.get("qid"), str):
        where += f" (qid {obj['qid']!r})"
    fail = failer(path, where)
    if not isinstance(obj, dict):
        fail(None, f"entity must be a JSON object, got {type_name(obj)}")
    return policy.keep(obj, lambda o: _entity_fields(o, fail, qid2id, seen_ids), fail, ENTITY_FIELDS)


def _entity_fields(obj: dict, fail, qid2id: dict[str, int], seen_ids: dict[int, str]) -> tuple[Entity, int]:
    qid = req_str(obj, "qid", fail)
    dense = require(obj, "id", fail)
    if isinstance(dense, bool) or not isinstance(dense, int):
        fail("id", f"must be an integer row index, got {type_name(dense)}")
    if qid in qid2id:
        fail("qid", f"duplicate qid, first seen at entity {list(qid2id).index(qid)}")
    if dense in seen_ids:
        fail("id", f"duplicate id {dense}, also used by qid {seen_ids[dense]!r}")
    if "entity_name" in obj and obj["entity_name"] is not None:
        name = unquote(req_str(obj, "entity_name", fail))
    elif "name" in obj and obj["name"] is not None:
        name = req_str(obj, "name", fail)
    else:
        fail("entity_name", "is missing (neither 'entity_name' nor 'name' is given)")
    desc_key = "desc" if "desc" in obj else "description"
    description = obj.get(desc_key)
    if description is None:
        description = ""
    elif not isinstance(description, str):
        fail(desc_key, f"must be a string, got {type_name(description)}")
    attributes: dict[str, str] = {}
    for attr_key in ("attr", "attributes"):
        attr = obj.get(attr_key)
        if attr is None:
            continue
        if isinstance(attr, str):
            if attr.strip():
                description = f"{description}. {attr}" if description else attr
        elif isinstance(attr, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in attr.items()):
            attributes.update(attr)
        else:
            fail(attr_key, f"must be a string or an object mapping strings to strings, got {type_name(attr)}")
    images = obj.get("image_list")
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        fail("image_list", "must be a list of non-empty image file names")
    entity = Entity(id=qid, name=name, description=description, attributes=attributes,
                    images=tuple(f"{ENTITY_IMAGE_DIR}/{p.split('/')[-1]}" for p in images))
    return entity, dense


def read_kb(src: Path, progress: bool = True, policy: RecordPolicy | None = None
            ) -> tuple[list[Entity], dict[str, int]]:
    """Read ``kb_entity.json``; return the entities (id = QID) and ``{qid: dense id}``."""
    policy = policy or RecordPolicy(strict=True)
    path = src / KB_FILE
    data = load_json(path, policy=policy)
    if not isinstance(data, list):
        raise DataError(path, "file", None, f"must be a JSON list of entities, got {type_name(data)}")
    entities: list[Entity] = []
    qid2id: dict[str, int] = {}
    seen_ids: dict[int, str] = {}
    for index, obj in enumerate(tqdm(data, desc="kb entities", disable=not progress, unit="entity")):
        parsed = policy.attempt(lambda: _parse_entity(path, index, obj, qid2id, seen_ids, policy))
        if parsed is None:
            continue
        entity, dense = parsed
        qid2id[entity.id] = dense
        seen_ids[dense] = entity.id
        entities.append(entity)
    return entities, qid2id


def check_qid2id(src: Path, kb_qid2id: dict[str, int], policy: RecordPolicy | None = None) -> bool:
    """Check ``qid2id.json`` against the KB when present (a disagreeing entry is listed, or raised when strict);
    return whether it was present. The KB's own ids are used either way."""
    policy = policy or RecordPolicy(strict=True)
    path = src / QID2ID_FILE
    if not path.exists():
        return False
    data = load_json(path, policy=policy)
    if not isinstance(data, dict):
        raise DataError(path, "file", None, f"must be a JSON object {{qid: id}}, got {type_name(data)}")
    for qid, dense in data.items():
        fail = failer(path, f"qid {qid!r}")
        if qid not in kb_qid2id:
            policy.attempt(lambda: fail(None, f"is not in {KB_FILE}"), count=False)
        elif dense != kb_qid2id[qid]:
            policy.attempt(lambda: fail(None, f"maps to {dense!r} but {KB_FILE} gives id {kb_qid2id[qid]}"),
                           count=False)
    return True


def load_split_file(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(path, "file", None, f"must be a JSON list of mention records, got {type_name(data)}")
    return data


def repeated_ids(records: list) -> set[str]:
    """Record ids (as strings) used by more than one record across the release."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for obj in records:
        rid = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            (repeated if str(rid) in seen else seen).add(str(rid))
    return repeated


def _parse_record(path: Path, index: int, obj: Any, split: str, kb: dict[str, int], mention_dir: Path | None,
                  stats: dict[str, int], repeated: set[str], occurrences: dict[str, int], policy: RecordPolicy
                  ) -> list[Mention]:
    where = f"record {index}"
    if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        where += f" (id {str(obj['id'])!r})"
    fail = failer(path, where)
    if not isinstance(obj, dict):
        fail(None, f"record must be a JSON object, got {type_name(obj)}")
    return policy.keep(obj, lambda o: _record_fields(o, fail, split, kb, mention_dir, stats, repeated, occurrences),
                       fail, RECORD_FIELDS)


def _record_fields(obj: dict, fail, split: str, kb: dict[str, int], mention_dir: Path | None, stats: dict[str, int],
                   repeated: set[str], occurrences: dict[str, int]) -> list[Mention]:
    rid = record_id(obj, "id", fail)
    sentence = require(obj, "sentence", fail)
    if not isinstance(sentence, str):
        fail("sentence", f"must be a string, got {type_name(sentence)}")
    mentions = str_list(require(obj, "mentions", fail), "mentions", fail)
    answers = str_list(require(obj, "answer", fail), "answer", fail)
    if len(answers) != len(mentions):
        fail("answer", f"has {len(answers)} item(s) but 'mentions' has {len(mentions)}")
    if obj.get("entities") is not None:
        names = str_list(obj["entities"], "entities", fail)
        if len(names) != len(mentions):
            fail("entities", f"has {len(names)} item(s) but 'mentions' has {len(mentions)}")
    cands = obj.get("cands")
    if cands is not None:
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            fail("cands", f"must be a list of QID strings, got {type_name(cands)}")
        for c in cands:
            if c not in kb:
                fail("cands", f"unknown QID {c!r} (not in {KB_FILE})")
    img = obj.get("imgPath")
    if img is not None and not isinstance(img, str):
        fail("imgPath", f"must be a string, got {type_name(img)}")
    for qid in answers:
        if qid.lower() != NIL and qid not in kb:
            fail("answer", f"unknown QID {qid!r} (not in {KB_FILE})")
    image = None
    if img:
        name = mimic_image_name(img)
        if mention_dir is not None and not (mention_dir / name).exists():
            plain = img.split("/")[-1]
            if plain and (mention_dir / plain).exists():
                name = plain
        image = f"{MENTION_IMAGE_DIR}/{name}"
    if rid in repeated:  # only a kept record takes an occurrence number
        k = occurrences.get(rid, 0)
        occurrences[rid] = k + 1
        rid = f"{rid}#{k}"
    out: list[Mention] = []
    for i, (mention, qid) in enumerate(zip(mentions, answers)):
        if qid.lower() == NIL:
            stats["skipped_nil"] += 1
            continue
        if mention not in sentence and unquote(mention) in sentence:
            mention = unquote(mention)
        out.append(
            Mention(
                id=rid if len(mentions) == 1 else f"{rid}-{i}",
                sentence=sentence,
                mention=mention,
                gold_id=qid,
                split=split,
                span=find_span(sentence, mention),
                image=image,
                candidates=tuple(cands) if cands is not None else None,
            )
        )
    return out


def read_mentions(
    path: Path,
    split: str,
    kb: dict[str, int],
    mention_dir: Path | None,
    stats: dict[str, int],
    progress: bool = True,
    *,
    data: list | None = None,
    repeated: set[str] | None = None,
    occurrences: dict[str, int] | None = None,
    policy: RecordPolicy | None = None,
) -> list[Mention]:
    """Mention records of one split file. Ids in ``repeated`` get ``#<k>`` (k = occurrence in release order)."""
    policy = policy or RecordPolicy(strict=True)
    data = load_split_file(path) if data is None else data
    repeated = repeated or set()
    occurrences = {} if occurrences is None else occurrences
    out: list[Mention] = []
    for index, obj in enumerate(tqdm(data, desc=f"{split} mentions", disable=not progress, unit="mention")):
        parsed = policy.attempt(lambda: _parse_record(path, index, obj, split, kb, mention_dir, stats, repeated,
                                                      occurrences, policy))
        out.extend(parsed or [])
    return out


def read_mimic(
    src: str | Path, *, dataset_name: str | None = None, source_format: str = "mimic", progress: bool = True,
    strict: bool = False,
) -> Converted:
    """Read a MIMIC-style release folder into unified records (see the module docstring)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: release folder not found (expected {KB_FILE}, <NAME>_train.json, ...)")
    split_files = find_split_files(src)
    policy = RecordPolicy(strict)
    entities, kb = read_kb(src, progress, policy)
    had_qid2id = check_qid2id(src, kb, policy)
    mention_dir = _first_dir(src, MENTION_IMAGE_DIRS)
    kb_dir = _first_dir(src, KB_IMAGE_DIRS)
    stats = {"skipped_nil": 0}
    raw = {split: load_split_file(split_files[split]) for split in SPLITS}
    repeated = repeated_ids([obj for split in SPLITS for obj in raw[split]])
    occurrences: dict[str, int] = {}
    mentions: list[Mention] = []
    for split in SPLITS:
        mentions.extend(read_mentions(split_files[split], split, kb, mention_dir, stats, progress, data=raw[split],
                                      repeated=repeated, occurrences=occurrences, policy=policy))
    prefix = split_files["train"].name.rsplit("_", 1)[0]
    info = DatasetInfo(
        name=dataset_name or prefix,
        source_format=source_format,
        split_rule="from the release: " + ", ".join(f"{s} = {split_files[s].name}" for s in SPLITS),
        notes={
            "source": str(src.resolve()),
            "kb_entities": len(entities),
            "qid2id": QID2ID_FILE if had_qid2id else f"derived from {KB_FILE} (file missing)",
            "skipped_nil": stats["skipped_nil"],
            "repeated_record_ids": len(repeated),
            "mention_ids": "record id; '<id>#<k>' when several records share an id (k-th in train, dev, test "
            "order); '-<i>' appended when a record lists several mentions",
            "mention_image_dir": str(mention_dir) if mention_dir else None,
            "kb_image_dir": str(kb_dir) if kb_dir else None,
            "mention_image_names": "imgPath.split('/')[-1].split('.')[0] + '.jpg'",
        },
    )
    links: dict[str, Path] = {}
    if mention_dir is not None:
        links[MENTION_IMAGE_DIR] = mention_dir
    if kb_dir is not None:
        links[ENTITY_IMAGE_DIR] = kb_dir
    return guard_images(Converted(info=info, entities=entities, mentions=mentions, image_links=links,
                                  dropped=policy.dropped, repaired=policy.repaired,
                                  records_read=policy.records))
