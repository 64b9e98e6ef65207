"""Region boxes from a JSON Lines file (``--regions file --boxes FILE``), for boxes made outside the toolkit
(PointRend, SAM, a detector run elsewhere, hand annotation).

Each line is a JSON object ``{KEY: [[x0, y0, x1, y1, score, label], ...], ...}`` (one or more keys a line; empty
lines are skipped). Coordinates are pixels of the original image (x to the right, y down, ``x1 > x0``,
``y1 > y0``); ``score`` is a number; ``label`` a string or a number (compared as a string with
``--region_labels``). A ``KEY`` is one of, tried in this order:

1. a mention id (``mentions.jsonl`` ``id``): boxes for that mention only;
2. a mention image path exactly as written in ``mentions.jsonl`` (relative to the dataset): every mention with
   that image;
3. an image file name (``123.jpg``): every mention whose image has that name (an error when the name belongs to
   several different image paths: use the path).

A mention takes the boxes of the most specific key that names it (id, then path, then file name); a mention no key
names has no boxes (its regions are masked). Errors (:class:`~data_process.core.records.DataError`, naming the
file, line, key, box and field): a line that is not a JSON object, a key that names no mention (or a mention
without an image), a key given twice, a box that is not 6 values, a coordinate or score that is not a finite
number, ``x1 <= x0`` or ``y1 <= y0``. Boxes reaching outside the image are clipped to it when cropping and counted;
a box left with no pixel inside the image is dropped and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from data_process.core.fingerprints import file_sha256
from data_process.core.records import DataError, Mention

BOX_FIELDS = ("x0", "y0", "x1", "y1", "score", "label")


@dataclass(frozen=True)
class Box:
    """A region box in pixels of the original image, with its score and label."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str

    def to_json(self) -> list[Any]:
        return [self.x0, self.y0, self.x1, self.y1, self.score, self.label]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> "Box":
        x0, y0, x1, y1, score, label = row
        return cls(float(x0), float(y0), float(x1), float(y1), float(score), str(label))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _label(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    num = _number(value)
    if num is None:
        return None
    return str(int(num)) if num.is_integer() else str(num)


def parse_box(row: Any, path: str | Path, where: str) -> Box:
    """One ``[x0, y0, x1, y1, score, label]`` row, checked; a :class:`DataError` naming ``where`` and the field."""
    if not isinstance(row, list) or len(row) != len(BOX_FIELDS):
        got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
        raise DataError(path, where, None, f"expected [x0, y0, x1, y1, score, label] (6 values), got {got}")
    values: list[Any] = []
    for name, value in zip(BOX_FIELDS, row):
        parsed = _label(value) if name == "label" else _number(value)
        if parsed is None:
            kind = "a string or a number" if name == "label" else "a finite number"
            raise DataError(path, where, name, f"expected {kind}, got {value!r}")
        values.append(parsed)
    box = Box(*values)
    if box.x1 <= box.x0:
        raise DataError(path, where, "x1", f"x1 ({box.x1:g}) must be greater than x0 ({box.x0:g})")
    if box.y1 <= box.y0:
        raise DataError(path, where, "y1", f"y1 ({box.y1:g}) must be greater than y0 ({box.y0:g})")
    return box


@dataclass
class BoxesFile:
    """Boxes read from a file, per mention row (rows without an entry are absent)."""

    path: Path
    sha256: str
    rows: dict[int, list[Box]] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=lambda: {"mention id": 0, "image path": 0, "file name": 0})

    def boxes_per_row(self, n: int) -> list[list[Box]]:
        return [self.rows.get(i, []) for i in range(n)]


def read_boxes_file(path: str | Path, mentions: Sequence[Mention]) -> BoxesFile:
    """Read and check a boxes file against a dataset's mentions (see the module docstring for keys and errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: boxes file not found (--boxes)")
    by_id = {m.id: i for i, m in enumerate(mentions)}
    by_path: dict[str, list[int]] = {}
    by_name: dict[str, set[str]] = {}
    for i, m in enumerate(mentions):
        if m.image is not None:
            by_path.setdefault(m.image, []).append(i)
            by_name.setdefault(PurePosixPath(m.image).name, set()).add(m.image)
    out = BoxesFile(path=path, sha256=file_sha256(path))
    seen: dict[str, int] = {}
    found: dict[str, dict[int, list[Box]]] = {"mention id": {}, "image path": {}, "file name": {}}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"line {n}", None, f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(path, f"line {n}", None, "expected an object {image key: [[x0, y0, x1, y1, score, "
                                                         f"label], ...]}}, got {type(obj).__name__}")
            for key, rows in obj.items():
                where = f"line {n}, key {key!r}"
                if key in seen:
                    raise DataError(path, where, None, f"key given twice (first on line {seen[key]})")
                seen[key] = n
                if key in by_id:
                    kind, targets = "mention id", [by_id[key]]
                    if mentions[by_id[key]].image is None:
                        raise DataError(path, where, None, "this mention has no image to crop")
                elif key in by_path:
                    kind, targets = "image path", by_path[key]
                elif key in by_name:
                    if len(by_name[key]) > 1:
                        shown = ", ".join(sorted(by_name[key])[:3])
                        raise DataError(path, where, None, f"file name of {len(by_name[key])} different mention "
                                                           f"images ({shown}, ...); key by the image path")
                    kind, targets = "file name", by_path[next(iter(by_name[key]))]
                else:
                    raise DataError(path, where, None, "names no mention id, mention image path or image file "
                                                       "name of the dataset")
                if not isinstance(rows, list):
                    raise DataError(path, where, None, f"expected a list of boxes, got {type(rows).__name__}")
                boxes = [parse_box(row, path, f"{where}, box {b + 1}") for b, row in enumerate(rows)]
                out.keys[kind] += 1
                for t in targets:
                    found[kind][t] = boxes
    for kind in ("file name", "image path", "mention id"):  # the most specific key is applied last and wins
        out.rows.update(found[kind])
    return out
