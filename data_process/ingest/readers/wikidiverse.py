"""WikiDiverse original release (Wikinews image-caption pairs, Wikipedia KB).

Documented layout (the exact file names of the release are not certain; see docs/DATA.md)::

    SRC/
      train.json, valid.json (or dev.json / val.json), test.json
          each a JSON list of items
          [sentence, image_url, topic, [[mention, type, start, end, wikipedia_url], ...]]
      entity2desc.* (optional)   lines "<wikipedia url or title>@@@@<description>" (or a JSON object
                                 {url or title: description} when the file ends in .json)
      images/ or wikinews_images/ (optional)   downloaded Wikinews images named by the URL's base name

Rules: entity id = the Wikipedia title from the URL (URL-unquoted, underscores kept, e.g. ``Detroit_Lions``),
name = the title with spaces. KB = every entity of the description file plus every gold title (gold titles
without a description get name only; counted in ``notes["gold_without_description"]``). Mention ids are
``<split>-<item index>-<mention index>``. Given character offsets are used when ``sentence[start:end]`` is
the mention; otherwise the first occurrence is used (counted in ``notes["spans_repaired"]``) or ``None``.
Mentions whose URL is empty or ``nil`` are skipped (``notes["skipped_nil"]``). A malformed item (or one of its
mentions) drops the item, listed; ``strict`` raises instead. A bad non-essential field (an image URL, a topic, an
entity type, a description: a lone surrogate, a bad byte, a wrong type) is mended (U+FFFD) or left out and listed
as a warning; the item or entity stays. The 10-candidate variant's
candidate lists are not read (format unverified).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tqdm import tqdm

from data_process.ingest.readers.common import (
    Converted,
    RecordPolicy,
    MENTION_IMAGE_DIR,
    check_record,
    failer,
    find_span,
    guard_images,
    load_json,
    type_name,
)
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, SPLITS, not_utf8
from data_process.core.safe_paths import open_regular_file

SPLIT_FILES = {"train": ("train.json",), "dev": ("valid.json", "dev.json", "val.json"), "test": ("test.json",)}
IMAGE_DIRS = ("images", "wikinews_images", "wikinews_imgs")
DESC_SEP = "@@@@"


def title_from_url(url: str) -> str:
    """``https://en.wikipedia.org/wiki/Detroit_Lions`` → ``Detroit_Lions`` (a bare title is returned unquoted)."""
    tail = url.split("/wiki/", 1)[1] if "/wiki/" in url else url
    return unquote(tail).strip().replace(" ", "_")


def _split_files(src: Path) -> dict[str, Path]:
    out = {}
    for split, names in SPLIT_FILES.items():
        found = [src / n for n in names if (src / n).exists()]   # a folder so named: load_json says so
        if len(found) != 1:
            raise FileNotFoundError(
                f"{src}: expected exactly one {split} file ({' or '.join(names)}), found {len(found)}"
            )
        out[split] = found[0]
    return out


def read_descriptions(path: Path, policy: RecordPolicy | None = None) -> dict[str, str]:
    """``{title: description}`` from an ``entity2desc`` file (``@@@@`` lines, or a JSON object)."""
    policy = policy or RecordPolicy(strict=True)
    if path.suffix == ".json":
        data = load_json(path, policy=policy)
        if not isinstance(data, dict):
            raise DataError(path, "file", None, f"must be a JSON object {{entity: description}}, got {type_name(data)}")
        out = {}
        for key, desc in data.items():
            fail = failer(path, f"entity {key!r}")
            if policy.attempt(lambda: check_record({"entity": key}, fail) or True, count=False):
                # the description is the entity's non-essential field: mended or left out, never the entity
                out[title_from_url(key)] = policy.keep({"description": desc}, lambda d: _description(d, fail), fail,
                                                       ())
        return out
    out = {}
    with open_regular_file(path) as fh:  # decoded per line, so a bad byte is reported with its line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                key, sep, _desc = raw.partition(DESC_SEP.encode())
                try:   # a bad byte in the description only: mended (U+FFFD), the entity kept
                    if not sep:
                        raise exc
                    key.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(path, f"line {lineno}", None, not_utf8(exc, raw, lineno, "of the line")) from None
                policy.repair(DataError(path, f"line {lineno}", "description", not_utf8(exc, raw, lineno,
                                                                                       "of the line")),
                              "the bad bytes are replaced by U+FFFD, the entity kept")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip():
                continue
            if DESC_SEP not in line:
                raise DataError(path, f"line {lineno}", None, f"expected '<entity>{DESC_SEP}<description>'")
            key, desc = line.split(DESC_SEP, 1)
            if not key.strip():
                raise DataError(path, f"line {lineno}", None, "empty entity before '@@@@'")
            out[title_from_url(key.strip())] = desc.strip()
    return out


ITEM_FIELDS = ("sentence", "image_url", "topic")      # an item's fields before its mentions
MENTION_FIELDS = ("mention", "type", "start", "end", "url")


def _description(obj: dict, fail) -> str:
    desc = obj.get("description", "")
    if not isinstance(desc, str):
        fail("description", f"must be a string, got {type_name(desc)}")
    return desc


def _item_fields(item: dict, fail) -> tuple[str, str]:
    sentence, image_url = item["sentence"], item.get("image_url")
    if not isinstance(sentence, str):
        fail("sentence", f"must be a string, got {type_name(sentence)}")
    if image_url is not None and not isinstance(image_url, str):
        fail("image_url", f"must be a string, got {type_name(image_url)}")
    return sentence, image_url or ""


def _item_mentions(item: Any, fail, policy: RecordPolicy) -> tuple[str, str, list]:
    """``(sentence, image URL, mentions)`` of an item; a bad image URL or topic (not read) is mended, not fatal."""
    if not isinstance(item, list) or len(item) < 4:
        fail(None, f"item must be a list [sentence, image_url, topic, mentions], got {type_name(item)}"
             + (f" of length {len(item)}" if isinstance(item, list) else ""))
    sentence, image_url = policy.keep(dict(zip(ITEM_FIELDS, item[:3])), lambda d: _item_fields(d, fail), fail,
                                      ("sentence",))
    mentions = item[3]
    if not isinstance(mentions, list):
        fail("mentions", f"must be a list of [mention, type, start, end, url], got {type_name(mentions)}")
    return sentence, image_url, mentions


def _parse_item(path: Path, split: str, index: int, item: Any, stats: dict[str, int], policy: RecordPolicy
                ) -> list[tuple[Mention, str]]:
    fail = failer(path, f"item {index}")
    sentence, image_url, mentions = _item_mentions(item, fail, policy)
    image = f"{MENTION_IMAGE_DIR}/{unquote(image_url.split('/')[-1])}" if image_url else None
    out = []
    skipped = repaired = 0
    for j, m in enumerate(mentions):
        mfail = failer(path, f"item {index}, mention {j}")
        if not isinstance(m, list) or len(m) < 5:
            mfail(None, "must be a list [mention, type, start, end, url]")
        # the entity type is not read: a fault in it is mended; the other four are the mention
        text, _etype, start, end, url = policy.keep(dict(zip(MENTION_FIELDS, m[:5])),
                                                    lambda d: tuple(d.get(k) for k in MENTION_FIELDS), mfail,
                                                    ("mention", "start", "end", "url"))
        if not isinstance(text, str) or not text.strip():
            mfail("mention", f"must be a non-empty string, got {text!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            mfail("start/end", f"must be integers, got {start!r}, {end!r}")
        if url is not None and not isinstance(url, str):
            mfail("url", f"must be a string, got {type_name(url)}")
        if not url or url.strip().lower() == "nil":
            skipped += 1
            continue
        title = title_from_url(url)
        if not title:
            mfail("url", f"has no Wikipedia title: {url!r}")
        if 0 <= start < end <= len(sentence) and sentence[start:end] == text:
            span = (start, end)
        else:
            span = find_span(sentence, text)
            repaired += 1
        out.append((Mention(id=f"{split}-{index}-{j}", sentence=sentence, mention=text, gold_id=title, split=split,
                            span=span, image=image), title))
    stats["skipped_nil"] += skipped        # counted only for kept items
    stats["spans_repaired"] += repaired
    return out


def read_wikidiverse(src: str | Path, *, dataset_name: str | None = None, progress: bool = True,
                     strict: bool = False) -> Converted:
    """Read the WikiDiverse original release folder (see the module docstring)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: release folder not found (expected train.json, valid.json, test.json)")
    files = _split_files(src)
    desc_files = sorted(p for p in src.iterdir() if p.name.startswith("entity2desc"))
    if len(desc_files) > 1:
        raise FileNotFoundError(f"{src}: several entity2desc files ({', '.join(p.name for p in desc_files)})")
    policy = RecordPolicy(strict)
    descriptions = read_descriptions(desc_files[0], policy) if desc_files else {}
    image_dir = next(((src / d).resolve() for d in IMAGE_DIRS if (src / d).is_dir()), None)

    stats = {"skipped_nil": 0, "spans_repaired": 0}
    gold: dict[str, None] = {}
    mentions_out: list[Mention] = []
    for split in SPLITS:
        path = files[split]
        data = load_json(path, policy=policy)
        if not isinstance(data, list):
            raise DataError(path, "file", None, f"must be a JSON list of items, got {type_name(data)}")
        for index, item in enumerate(tqdm(data, desc=f"{split} items", disable=not progress, unit="item")):
            for mention, title in policy.attempt(lambda: _parse_item(path, split, index, item, stats, policy)) or []:
                gold[title] = None
                mentions_out.append(mention)
    kb_ids = list(descriptions) + [t for t in gold if t not in descriptions]
    entities = [Entity(id=t, name=t.replace("_", " "), description=descriptions.get(t, "")) for t in kb_ids]
    info = DatasetInfo(
        name=dataset_name or "WikiDiverse",
        source_format="wikidiverse",
        split_rule="from the release: " + ", ".join(f"{s} = {files[s].name}" for s in SPLITS),
        notes={
            "source": str(src.resolve()),
            "descriptions": desc_files[0].name if desc_files else None,
            "gold_without_description": sum(1 for t in gold if t not in descriptions),
            **stats,
            "image_dir": str(image_dir) if image_dir else None,
        },
    )
    return guard_images(Converted(
        info=info,
        entities=entities,
        mentions=mentions_out,
        image_links={MENTION_IMAGE_DIR: image_dir} if image_dir else {},
        dropped=policy.dropped, repaired=policy.repaired,
        records_read=policy.records,
    ))
