"""GHMFC / DIM release layout (public repository seukgcode/MEL-GHMFC; what DIM's own code reads).

Folder layout (``SRC`` or ``SRC/input_data``; see docs/DATA.md)::

    qid2ne.json            {qid: name}                         the KB: every QID here (WikiMEL: 18,880)
    qid2abs.json           {qid: short attribute description}  DIM's --gt_type brief (``--entity-text brief``)
    qid2abs_long.json      {qid: long description}             optional (``--entity-text long``)
    qids_ordered.json      [qid, ...]                          optional: the KB's row order
    ne2qid.json            {name: qid}                         optional: checked against qid2ne
    train.json, dev.json (optional), test.json                 {sample id: {"id", "sentence", "mentions",
                                                                "entities", "answer", "imgPath"?}}
      or splits.json + MELBench annotations                    {"train": [ids], "dev": [...], "test": [...]} with
                                                                the samples in a MELBench file (``annotations``,
                                                                or the one other ``*.json``/``*.zip`` beside them)
    search_top100.json     {mention string: [100 QIDs]}        optional: per-mention candidate lists
    neg.json | neg_list.json, img_list.json                    optional: noted, not imported
    images/ (or mention_images/, ``--image-dir``)             mention images named by imgPath or by sample id

Rules:

* Entity id = QID, name = ``qid2ne``, description = the chosen ``qid2abs`` file's text (empty when absent).
* Mentions: as MELBench (``<sample id>-<i>``, first-occurrence spans); the split comes from the split file or from
  ``splits.json``. Ids listed in ``splits.json`` without an annotation are counted and listed (``absent_ids``);
  annotated samples in no split are listed too.
* Candidates: a mention's list is ``search_top100[mention string]``; QIDs not in the KB are removed from the lists
  and counted; a mention whose string has no list gets none (counted; a miss under the candidate protocol).
* Bad records (a malformed sample, a gold QID missing from the KB, a bad KB entry, a sample listed in two splits)
  are dropped and listed, or raise with ``strict``. A bad description (a lone surrogate: replaced by U+FFFD; not a
  string, or its QID repeated in the file: left out) or ``imgPath`` is mended and listed as a warning: the entity,
  and every mention of it, stays.
* A release without ``dev.json`` (or without dev ids in ``splits.json``) has an empty dev split; ``dev_from_train``
  (``prepare --dev-from-train P``) makes one of a fraction P of the train samples by the seeded hash rule of
  :func:`common.carve_dev` (recorded in ``split_rule``); a release with a dev split refuses it.
* ``neg.json`` (TF-IDF negative tables) is checked and noted, not imported: training's ``--negatives tfidf`` builds
  the same kind of table from the KB's descriptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_process.core.records import SPLITS, DataError, DatasetInfo, Entity, Mention
from data_process.ingest.readers.common import (
    MENTION_IMAGE_DIR,
    Converted,
    RecordPolicy,
    carve_dev,
    check_record,
    dev_from_train_rule,
    failer,
    find_span,
    guard_images,
    load_json,
    type_name,
)
from data_process.ingest.readers.melbench import QID_RE, image_by_sample_id, parse_sample, read_annotation_file

KB_NAMES = "qid2ne.json"
ENTITY_TEXT_FILES = {"brief": "qid2abs.json", "long": "qid2abs_long.json"}
SPLIT_NAMES = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
KNOWN_FILES = {KB_NAMES, "ne2qid.json", "qids_ordered.json", "splits.json", "search_top100.json", "neg.json",
               "neg_list.json", "img_list.json", *ENTITY_TEXT_FILES.values(), *SPLIT_NAMES.values()}
IMAGE_DIRS = ("images", "mention_images", "mention_image", "imgs")
EXAMPLES = 20


def _find(src: Path, name: str) -> Path | None:
    for folder in (src, src / "input_data"):
        if (folder / name).exists():         # a folder so named: load_json says so
            return folder / name
    return None


def _json_object(path: Path, what: str, policy: RecordPolicy | None = None, *, optional_values: bool = False
                 ) -> dict:
    data = load_json(path, policy=policy, optional_values=optional_values)
    if not isinstance(data, dict):
        raise DataError(path, "file", None, f"must be a JSON object {what}, got {type_name(data)}")
    return data


def _read_kb(src: Path, entity_text: str, policy: RecordPolicy, notes: dict[str, Any]) -> list[Entity]:
    names_path = _find(src, KB_NAMES)
    if names_path is None:
        raise FileNotFoundError(f"{src}: no {KB_NAMES} (nor input_data/{KB_NAMES}): not a GHMFC/DIM release")
    names = _json_object(names_path, "{qid: name}", policy)
    text_name = ENTITY_TEXT_FILES[entity_text]
    text_path = _find(src, text_name)
    if text_path is None and entity_text == "long":
        raise FileNotFoundError(f"{src}: --entity-text long needs {text_name}, which the release lacks")
    texts = _json_object(text_path, "{qid: description}", policy, optional_values=True) if text_path else {}
    notes["entity_text"] = f"{text_name} ({entity_text})" if text_path else f"none ({text_name} missing)"
    order_path = _find(src, "qids_ordered.json")
    order = list(names)
    if order_path is not None:
        listed = load_json(order_path)
        if not isinstance(listed, list) or not all(isinstance(q, str) for q in listed):
            raise DataError(order_path, "file", None, "must be a JSON list of QIDs")
        unknown = [q for q in listed if q not in names]
        listed_set = set(listed)
        order = [q for q in dict.fromkeys(listed) if q in names] + [q for q in names if q not in listed_set]
        notes["qids_ordered"] = {"listed": len(listed), "not_in_qid2ne": len(unknown),
                                 "examples": unknown[:EXAMPLES]}
    entities = []
    for qid in order:
        def parse(qid=qid) -> Entity:
            fail = failer(names_path, f"qid {qid!r}")
            if not QID_RE.match(qid):
                fail(None, "is not a Wikidata QID like 'Q42'")
            name = names[qid]
            check_record({"qid": qid, "name": name}, fail)
            if not isinstance(name, str) or not name.strip():
                fail("name", f"must be a non-empty string, got {name!r}")
            where = failer(text_path, f"qid {qid!r}")
            text = policy.keep({"description": texts[qid]} if qid in texts else {},
                               lambda obj: _description(obj, where), where, essential=())
            return Entity(id=qid, name=name, description=text)

        entity = policy.attempt(parse)
        if entity is not None:
            entities.append(entity)
    notes["entities_without_description"] = sum(1 for e in entities if not e.description)
    n2q_path = _find(src, "ne2qid.json")
    if n2q_path is not None:
        n2q = _json_object(n2q_path, "{name: qid}", RecordPolicy())   # only counted: repeated names not listed
        notes["ne2qid_disagreements"] = sum(1 for name, qid in n2q.items() if names.get(qid) != name)
    return entities


def _description(obj: dict, fail) -> str:
    """An entity's description, a non-essential field: a bad one is left out (``RecordPolicy.keep``)."""
    text = obj.get("description", "")
    if not isinstance(text, str):
        fail("description", f"must be a string, got {type_name(text)}")
    return text


def _image_path(sample: dict, fail) -> None:
    """``imgPath``, a non-essential field of a sample: a string when given."""
    img = sample.get("imgPath")
    if img is not None and not isinstance(img, str):
        fail("imgPath", f"must be a string, got {type_name(img)}")


def _assign(out: dict[str, tuple[str, Any]], seen_in: dict[str, str], split: str, sid: str, listed_in: Path,
            item: tuple[str, Any]) -> None:
    """Put sample ``sid`` (``item`` = (file, sample)) in ``split``; a sample already in another split is kept there
    and this listing becomes a dropped record (a :class:`DataError` naming ``listed_in``)."""
    if sid in seen_in:
        out[f"{sid}\0{split}"] = (split, DataError(listed_in, f"sample {sid!r}", "split",
                                                   f"also in {seen_in[sid]} (kept there)"))
        return
    seen_in[sid] = split
    out[sid] = (split, item)


def _samples(src: Path, annotations: str | Path | None, notes: dict[str, Any], policy: RecordPolicy
             ) -> tuple[str, dict[str, tuple[str, Any]], dict[str, list[str]]]:
    """``(source description, {sample id: (split, sample)}, absent ids)``, from split files or ``splits.json``."""
    split_paths = {s: _find(src, name) for s, name in SPLIT_NAMES.items()}
    absent: dict[str, list[str]] = {}
    if split_paths["train"] is not None and split_paths["test"] is not None:
        out: dict[str, tuple[str, Any]] = {}
        seen_in: dict[str, str] = {}
        for split in SPLITS:
            path = split_paths[split]
            if path is None:
                notes["dev_split"] = "dev.json absent: the dev split is empty"
                continue
            for sid, sample in _json_object(path, "mapping sample ids to samples", policy).items():
                _assign(out, seen_in, split, sid, path, (str(path), sample))
        rule = "from the release: " + ", ".join(f"{s} = {p.name}" for s, p in split_paths.items() if p)
        return rule, out, absent
    splits_path = _find(src, "splits.json")
    if splits_path is None:
        raise FileNotFoundError(f"{src}: neither train.json + test.json nor splits.json (with MELBench "
                                "annotations): not a GHMFC/DIM release")
    splits = _json_object(splits_path, '{"train": [ids], "dev": [ids], "test": [ids]}')   # repeated: an error
    for key in splits:
        if key not in SPLITS:
            raise DataError(splits_path, f"key {key!r}", None, f"is not a split ({', '.join(SPLITS)})")
    ann_src = annotations if annotations is not None else _annotation_file(src)
    ann_display, data = read_annotation_file(ann_src, policy)
    if not isinstance(data, dict):
        raise DataError(ann_display, "file", None, f"must be a JSON object mapping sample ids to samples, got "
                                                   f"{type_name(data)}")
    out = {}
    seen_in = {}
    for split in SPLITS:
        ids = splits.get(split, [])
        if not isinstance(ids, list):
            raise DataError(splits_path, f"split {split!r}", None, f"must be a list of sample ids, got "
                                                                   f"{type_name(ids)}")
        missing = []
        for sid in map(str, ids):
            if sid not in data:
                missing.append(sid)
                continue
            _assign(out, seen_in, split, sid, splits_path, (ann_display, data[sid]))
        absent[f"splits.json {split} ids without an annotation"] = missing
    absent["annotated samples in no split"] = [sid for sid in data if sid not in seen_in]
    notes["annotations"] = ann_display
    notes["split_ids"] = {s: len(splits.get(s, [])) for s in SPLITS}
    notes["split_ids_without_annotation"] = {s: len(absent[f"splits.json {s} ids without an annotation"])
                                             for s in SPLITS}
    rule = f"from the release: {splits_path.name} (sample ids; samples from {Path(ann_display).name})"
    return rule, out, absent


def _annotation_file(src: Path) -> Path:
    found = [p for folder in (src, src / "input_data") if folder.is_dir() for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in (".json", ".zip") and p.name not in KNOWN_FILES]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{src}: splits.json needs the MELBench annotations: pass --annotations FILE (a .json or .zip), or put "
            f"exactly one annotation file beside splits.json (found {len(found)}"
            + (f": {', '.join(p.name for p in found)})" if found else ")"))
    return found[0]


def _image_of(sample: Any, sid: str, image_dir: Path | None, listing: set[str]) -> str | None:
    img = sample.get("imgPath") if isinstance(sample, dict) else None
    if isinstance(img, str) and img.strip():
        return f"{MENTION_IMAGE_DIR}/{img.strip().split('/')[-1]}"
    return image_by_sample_id(image_dir, listing, sid)


def _candidates(src: Path, kb: set[str], notes: dict[str, Any]) -> dict[str, tuple[str, ...]] | None:
    path = _find(src, "search_top100.json")
    if path is None:
        return None
    raw = _json_object(path, "{mention string: [QIDs]}")
    out: dict[str, tuple[str, ...]] = {}
    unknown: list[str] = []
    for key, qids in raw.items():
        if not isinstance(qids, list) or not all(isinstance(q, str) for q in qids):
            raise DataError(path, f"key {key!r}", None, f"must be a list of QIDs, got {type_name(qids)}")
        kept = tuple(dict.fromkeys(q for q in qids if q in kb))
        unknown.extend(q for q in qids if q not in kb)
        out[key] = kept
    notes["candidates"] = {"file": path.name, "lists": len(out), "qids_not_in_kb_removed": len(unknown),
                           "examples": sorted(set(unknown))[:EXAMPLES]}
    return out


def _carve_dev(samples: dict[str, tuple[str, Any]], seed: int, share: float, src: Path, notes: dict[str, Any]
               ) -> str:
    """Move a seeded fraction ``share`` of the train samples to dev (the release has none); returns the rule."""
    listed = [sid for sid, (split, item) in samples.items() if split == "dev" and not isinstance(item, DataError)]
    if listed:
        raise ValueError(f"--dev-from-train: {src} has a dev split ({len(listed)} samples); the flag is for releases "
                         "without one")
    train = [sid for sid, (split, item) in samples.items() if split == "train" and not isinstance(item, DataError)]
    dev = carve_dev(train, seed, share)
    for sid in dev:
        samples[sid] = ("dev", samples[sid][1])
    notes["dev_split"] = f"carved from train: {len(dev)} of {len(train)} train samples (--dev-from-train {share:g})"
    return dev_from_train_rule(seed, share)


def read_ghmfc(src: str | Path, *, dataset_name: str | None = None, annotations: str | Path | None = None,
               image_dir: str | Path | None = None, entity_text: str = "brief", progress: bool = True,
               strict: bool = False, dev_from_train: float | None = None, seed: int = 0) -> Converted:
    """Read a GHMFC/DIM release folder into unified records (see the module docstring)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: release folder not found (expected {KB_NAMES} and splits)")
    if entity_text not in ENTITY_TEXT_FILES:
        raise ValueError(f"entity text must be one of {', '.join(ENTITY_TEXT_FILES)}, got {entity_text!r}")
    policy = RecordPolicy(strict)
    notes: dict[str, Any] = {"source": str(src.resolve())}
    entities = _read_kb(src, entity_text, policy, notes)
    kb = {e.id for e in entities}
    rule, samples, absent = _samples(src, annotations, notes, policy)
    if dev_from_train is not None:
        rule = f"{rule}; {_carve_dev(samples, seed, dev_from_train, src, notes)}"
    cands = _candidates(src, kb, notes)
    if image_dir is not None:
        img_dir = Path(image_dir).resolve()
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: image folder not found")
    else:
        img_dir = next(((src / d).resolve() for d in IMAGE_DIRS if (src / d).is_dir()), None)
    listing = {p.name for p in img_dir.iterdir()} if img_dir is not None else set()

    mentions: list[Mention] = []
    no_list = 0
    for sid, (split, item) in tqdm(samples.items(), desc="ghmfc samples", unit="sample", disable=not progress):
        if isinstance(item, DataError):           # a sample listed in a second split
            policy.records += 1
            policy.drop(item)
            continue
        path, sample = item

        def parse(path=path, sid=sid, sample=sample) -> tuple[list[tuple[str, str, str, str]], dict]:
            rows, kept = parse_sample(path, sid, sample, policy, extra=_image_path)
            for i, (_s, _m, _n, qid) in enumerate(rows):
                if qid not in kb:
                    failer(path, f"sample {sid!r}")("answer", f"item {i}: gold {qid!r} is not in the KB "
                                                              f"({KB_NAMES})")
            return rows, kept

        parsed = policy.attempt(parse)
        if parsed is None:
            continue
        rows, sample = parsed
        image = _image_of(sample, sid, img_dir, listing)
        for i, (sentence, mention, _name, qid) in enumerate(rows):
            cand = None
            if cands is not None:
                cand = cands.get(mention)
                no_list += cand is None
            mentions.append(Mention(id=f"{sid}-{i}", sentence=sentence, mention=mention, gold_id=qid, split=split,
                                    span=find_span(sentence, mention), image=image, candidates=cand))
    if cands is not None:
        notes["candidates"]["mentions_without_list"] = no_list
    for name in ("neg.json", "neg_list.json", "img_list.json"):
        if _find(src, name) is not None:
            notes[name] = "present, not imported" + (" (training: --negatives tfidf builds the same kind of table "
                                                     "from the descriptions)" if name.startswith("neg") else "")
    notes.update({"kb_entities": len(entities), "mention_ids": "<sample id>-<index of the mention in the sample>",
                  "spans": "first occurrence of the mention string in the sentence, null where absent",
                  "mention_image_dir": str(img_dir) if img_dir else None})
    info = DatasetInfo(name=dataset_name or src.resolve().name, source_format="ghmfc", split_rule=rule, notes=notes)
    links = {MENTION_IMAGE_DIR: img_dir} if img_dir is not None else {}
    return guard_images(Converted(info=info, entities=entities, mentions=mentions, image_links=links,
                                  dropped=policy.dropped, repaired=policy.repaired, records_read=policy.records,
                                  absent_ids=absent))
