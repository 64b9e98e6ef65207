"""MELBench raw annotations (WikiMEL = Wikidata-MEL, RichpediaMEL, ...): one JSON object per file.

``{"<sample id>": {"id", "sentence", "mentions", "entities", "answer"}}``. ``mentions`` / ``entities`` /
``answer`` are either all lists of equal length or plain strings (a plain string counts as a one-item list).
A sample with k mentions gives k mention records with ids ``"<sample id>-<i>"`` (i = 0..k-1).

* KB: the distinct gold QIDs; entity id = QID, name = the ``entities`` string of its first occurrence
  (file order), no description (the release has none). QIDs named differently elsewhere are counted in
  ``DatasetInfo.notes["qids_with_several_names"]``.
* Splits: none in the release; built by sample with :func:`common.split_samples` (seeded, recorded in
  ``dataset.json``), so all mentions of one sentence stay in one split.
* Spans: first occurrence of the mention string in the sentence; ``None`` where it does not occur.
* Images (optional ``image_dir``): files named by sample id (``<id>.jpg``/``.jpeg``/``.png``/...), linked as
  ``images/mention/<file>``; a sample without a file still references ``images/mention/<id>.jpg`` so the
  validation report counts it as missing.

A non-object file is an error. A sample with a missing or mistyped field, unequal list lengths, an answer that is
not a Wikidata QID (``Q<digits>``) or an ``id`` that differs from its key is dropped and listed (``strict``: raises
:class:`DataError`); a fault in any other field of a sample (not read: a lone surrogate, a field given twice) is
listed as mended and the sample kept. The split is computed over every sample id (dropped ones included), so dropping a sample never
moves another sample to another split.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from data_process.ingest.readers.common import (
    Converted,
    Fail,
    MENTION_IMAGE_DIR,
    RecordPolicy,
    check_record,
    failer,
    find_span,
    guard_images,
    load_json,
    parse_ratios,
    split_rule_text,
    split_samples,
    str_list,
    type_name,
)
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, keep_record

QID_RE = re.compile(r"^Q[1-9][0-9]*$")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".JPG", ".JPEG", ".PNG")
FIELDS = ("sentence", "mentions", "entities", "answer")
SAMPLE_FIELDS = ("id", *FIELDS)   # the fields a sample cannot lose; a fault in any other is mended


def read_annotation_file(src: str | Path, policy: RecordPolicy | None = None) -> tuple[str, Any]:
    """Load the annotation JSON from a ``.json`` file, a ``.zip`` holding one ``.json``, or a folder holding one.

    Returns ``(display path for errors, parsed JSON)``; repeated sample ids are dropped into ``policy``
    (:func:`common.load_json`).
    """
    src = Path(src)
    if src.is_dir():
        found = sorted(p for p in src.iterdir() if p.suffix.lower() == ".json" and p.is_file())
        if len(found) != 1:
            raise FileNotFoundError(
                f"{src}: expected exactly one MELBench annotation .json file in the folder, found {len(found)}"
                + (f" ({', '.join(p.name for p in found)}); pass the file itself" if found else "")
            )
        src = found[0]
    if not src.exists():
        raise FileNotFoundError(f"{src}: file not found")
    if src.suffix.lower() == ".zip":
        with zipfile.ZipFile(src) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith(".json") and not n.startswith("__MACOSX")]
            if len(members) != 1:
                raise FileNotFoundError(f"{src}: expected exactly one .json member in the zip, found {len(members)}")
            display = f"{src}:{members[0]}"
            try:
                text = zf.read(members[0]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(display, "file", None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return display, load_json(Path(display), text, policy)
    return str(src), load_json(src, policy=policy)


def image_by_sample_id(image_dir: Path | None, listing: set[str], sample_id: str) -> str | None:
    """The mention image of a sample named by its id (``<id>.jpg``, ``.png``, ...; ``listing``: the file names in
    ``image_dir``). A sample without a file still references ``<id>.jpg``, so validation counts it as missing;
    ``None`` without an image folder."""
    if image_dir is None:
        return None
    for ext in IMAGE_EXTS:
        if sample_id + ext in listing:
            return f"{MENTION_IMAGE_DIR}/{sample_id}{ext}"
    return f"{MENTION_IMAGE_DIR}/{sample_id}.jpg"


def parse_sample(path: str, sid: str, sample: Any, policy: RecordPolicy | None = None,
                 extra: Callable[[dict, Fail], None] | None = None) -> tuple[list[tuple[str, str, str, str]], dict]:
    """``([(sentence, mention, entity name, qid)], the sample as kept)`` of one MELBench sample; :class:`DataError`
    when it is malformed. With ``policy`` a fault in a field other than :data:`SAMPLE_FIELDS` (an image path, any
    extra field; ``extra`` checks those a reader uses) is mended and listed instead (``RecordPolicy.keep``)."""
    fail = failer(path, f"sample {sid!r}")
    check_record({"sample id": sid}, fail)
    if not isinstance(sample, dict):
        fail(None, f"sample must be a JSON object, got {type_name(sample)}")

    def parse(sample: dict) -> tuple[list[tuple[str, str, str, str]], dict]:
        if "id" in sample and sample["id"] is not None:
            if not isinstance(sample["id"], str):
                fail("id", f"must be a string, got {type_name(sample['id'])}")
            if sample["id"] != sid:
                fail("id", f"is {sample['id']!r} but the sample's key is {sid!r}")
        for key in FIELDS:
            if key not in sample or sample[key] is None:
                fail(key, "is missing")
        sentence = sample["sentence"]
        if not isinstance(sentence, str):
            fail("sentence", f"must be a string, got {type_name(sentence)}")
        mentions = str_list(sample["mentions"], "mentions", fail)
        entities = str_list(sample["entities"], "entities", fail)
        answers = str_list(sample["answer"], "answer", fail)
        for key, items in (("entities", entities), ("answer", answers)):
            if len(items) != len(mentions):
                fail(key, f"has {len(items)} item(s) but 'mentions' has {len(mentions)}")
        for i, qid in enumerate(answers):
            if not QID_RE.match(qid):
                fail("answer", f"item {i} must be a Wikidata QID like 'Q42', got {qid!r}")
        if extra is not None:
            extra(sample, fail)
        return [(sentence, mention, name, qid) for mention, name, qid in zip(mentions, entities, answers)], sample

    if policy is None:
        return keep_record(sample, parse, fail)
    return policy.keep(sample, parse, fail, SAMPLE_FIELDS)


def read_melbench(
    src: str | Path,
    *,
    dataset_name: str | None = None,
    seed: int = 0,
    splits: str | Sequence[float] = (70, 10, 20),
    image_dir: str | Path | None = None,
    progress: bool = True,
    strict: bool = False,
) -> Converted:
    """Read MELBench raw annotations into unified records (see the module docstring for the rules)."""
    ratios = parse_ratios(splits)
    policy = RecordPolicy(strict)
    path, data = read_annotation_file(src, policy)
    if not isinstance(data, dict):
        raise DataError(path, "file", None, f"must be a JSON object mapping sample ids to samples, got {type_name(data)}")
    img_dir = Path(image_dir).resolve() if image_dir is not None else None
    if img_dir is not None and not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image folder not found")
    listing = {p.name for p in img_dir.iterdir()} if img_dir is not None else set()

    names: dict[str, str] = {}
    renamed: set[str] = set()
    rows: list[tuple[str, int, str, str, str]] = []  # sample id, index, sentence, mention, qid
    kept: list[str] = []
    for sid, sample in tqdm(data.items(), desc="melbench samples", disable=not progress, unit="sample"):
        parsed = policy.attempt(lambda: parse_sample(path, sid, sample, policy))
        if parsed is None:
            continue
        kept.append(sid)
        for i, (sentence, mention, name, qid) in enumerate(parsed[0]):
            if qid not in names:
                names[qid] = name
            elif names[qid] != name:
                renamed.add(qid)
            rows.append((sid, i, sentence, mention, qid))

    assignment = split_samples(list(data.keys()), seed, ratios)
    mentions_out = [
        Mention(
            id=f"{sid}-{i}",
            sentence=sentence,
            mention=mention,
            gold_id=qid,
            split=assignment[sid],
            span=find_span(sentence, mention),
            image=image_by_sample_id(img_dir, listing, sid),
        )
        for sid, i, sentence, mention, qid in rows
    ]
    entities_out = [Entity(id=qid, name=name) for qid, name in names.items()]
    info = DatasetInfo(
        name=dataset_name or Path(path.split(":")[-1] if ".zip:" in path else path).stem,
        source_format="melbench",
        split_rule=split_rule_text(seed, ratios),
        notes={
            "source": path,
            "samples": len(data),
            "samples_dropped": len(policy.dropped),   # repeated sample ids included (every copy)
            "mention_ids": "<sample id>-<index of the mention in the sample>",
            "entity_text": "name only (MELBench has no descriptions); name = first 'entities' string for the QID",
            "qids_with_several_names": len(renamed),
            "spans": "first occurrence of the mention string in the sentence, null where absent",
            "images": str(img_dir) if img_dir else None,
        },
    )
    links = {MENTION_IMAGE_DIR: img_dir} if img_dir is not None else {}
    return guard_images(Converted(info=info, entities=entities_out, mentions=mentions_out, image_links=links,
                                  dropped=policy.dropped, repaired=policy.repaired,
                                  records_read=policy.records))
