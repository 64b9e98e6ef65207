"""Published MEL results (``configs/published_results.csv``) and the rule that decides when one is comparable
with our runs.

A published number is set beside ours only when it was measured the same way: the same dataset (spellings
normalised by :func:`dataset_key`), the same protocol (``full_kb``, or ``candidates_<N>`` against our
``candidates`` protocol when our candidate lists have exactly N entries), the same KB size (full-KB numbers only;
the sizes :data:`SAME_KB` lists for one KB, as its sources count it differently, are one KB, with a note),
the same split, and the same kind of system: a two-stage one (retrieve, then re-rank: ``stages`` 2) only beside
two-stage runs of ours, a one-stage one only beside one-stage runs. :func:`why_not_comparable` gives the reason when
it is not. Published sources do not state their tie rule; tables say so. The file format is described in its
comment header and in docs/RESULTS.md.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from nel_model.runs import METRIC_KEYS, RunError

PUBLISHED_FILE = Path(__file__).resolve().parents[2] / "configs" / "published_results.csv"
COLUMNS = ("method", "venue", "dataset", "protocol", "kb_entities", "split", "metric", "value", "source")
STAGES_COLUMN = "stages"         # optional last column: 1 (one stage) or 2 (retrieve, then re-rank); 1 when absent
STAGES = {1: "one-stage", 2: "two-stage (retrieve, then re-rank)"}
_PROTOCOL = re.compile(r"^(full_kb|candidates_([1-9][0-9]*))$")
_COUNT = re.compile(r"^[0-9]+$")                      # ASCII digits only ("²".isdigit() is True, int("²") fails)
_PERCENT = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_ALIASES = {"richpedia": "richpediamel"}
# One KB that its sources count differently: {dataset_key: (sizes, who says which)}. Rows with any of the sizes
# are compared as one KB, and the table says so in a note (nothing is hidden, nothing silently equated).
SAME_KB = {
    "richpediamel": ((160933, 160935),
                     "RichpediaMEL's KB is 160,933 entities in MIMIC's, MMoE's and M3EL's configs (config/"
                     "richpediamel.yaml num_entity) and 160,935 in KGMEL's table; taken as one KB"),
}


def dataset_key(name: str) -> str:
    """``WikiMEL`` / ``WIKIMEL`` / ``wiki-mel`` -> ``wikimel``; ``Richpedia`` -> ``richpediamel``."""
    key = re.sub(r"[^0-9a-z]", "", name.casefold())
    return _ALIASES.get(key, key)


@dataclass(frozen=True)
class PublishedResult:
    """One row of the published-results file; ``value`` is a percentage."""

    method: str
    venue: str
    dataset: str
    protocol: str            # full_kb | candidates_<N>
    kb_entities: int | None
    split: str
    metric: str              # one of run_io.METRIC_KEYS
    value: float
    source: str
    line: int
    stages: int = 1          # 2: retrieve, then re-rank

    @property
    def name(self) -> str:
        return f"{self.method} ({self.venue})" if self.venue else self.method

    @property
    def family(self) -> str:
        """``full_kb`` or ``candidates`` (our protocol names)."""
        return "full_kb" if self.protocol == "full_kb" else "candidates"

    @property
    def list_length(self) -> int | None:
        m = _PROTOCOL.match(self.protocol)
        return int(m.group(2)) if m and m.group(2) else None


@dataclass(frozen=True)
class OurSetting:
    """How our runs of one dataset were measured: the distinct KB sizes and mean candidate-list lengths among
    them (``None`` = not recorded in an older ``results.json``), and their stages (1, or 2: retrieve, then
    re-rank)."""

    dataset: str
    kb_entities: tuple[int | None, ...]
    list_lengths: tuple[float | None, ...]
    stages: tuple[int, ...] = (1,)


def _text_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8 text (a UTF-8 byte-order mark is allowed); an error names the file and the line
    (and says so for a UTF-16 file)."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RunError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    lines = []
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise RunError(f"{path}, line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line); "
                           "save the file as UTF-8") from None
    return lines


def _csv_values(path: Path, lineno: int, line: str) -> list[str]:
    """One CSV line's values (each line is one record); an error names the file and the line."""
    try:
        return next(csv.reader([line]))
    except csv.Error as exc:             # a field over the csv module's limit, a NUL byte, ...
        raise RunError(f"{path}, line {lineno}: not a valid CSV line ({exc})") from None


def read_published(path: str | Path) -> list[PublishedResult]:
    """Read and validate a published-results CSV; lines starting with ``#`` are comments. Errors name the file,
    the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: published results file not found")
    numbered = [(i, ln) for i, ln in enumerate(_text_lines(path), 1)
                if ln.strip() and not ln.lstrip().startswith("#")]
    if not numbered:
        return []
    header = tuple(h.strip() for h in _csv_values(path, *numbered[0]))
    if header not in (COLUMNS, (*COLUMNS, STAGES_COLUMN)):
        raise RunError(f"{path}, line {numbered[0][0]}: the header must be {','.join(COLUMNS)} "
                       f"(and optionally ,{STAGES_COLUMN}) (got {','.join(header)})")
    out: list[PublishedResult] = []
    seen: dict[tuple, int] = {}
    for lineno, line in numbered[1:]:
        values = _csv_values(path, lineno, line)

        def fail(column: str, problem: str, _lineno=lineno) -> None:
            raise RunError(f"{path}, line {_lineno}, column '{column}': {problem}")

        if len(values) != len(header):
            raise RunError(f"{path}, line {lineno}: {len(values)} values for {len(header)} columns")
        rec = dict(zip(header, (v.strip() for v in values)))
        stages = rec.get(STAGES_COLUMN) or "1"
        if stages not in ("1", "2"):
            fail(STAGES_COLUMN, f"must be 1 (one stage) or 2 (retrieve, then re-rank), got {stages!r}")
        for col in ("method", "dataset", "split", "source"):
            if not rec[col]:
                fail(col, "must not be empty")
        if not _PROTOCOL.match(rec["protocol"]):
            fail("protocol", f"must be full_kb or candidates_<N>, got {rec['protocol']!r}")
        if rec["metric"] not in METRIC_KEYS:
            fail("metric", f"must be one of {', '.join(METRIC_KEYS)}, got {rec['metric']!r}")
        kb = None
        if rec["kb_entities"]:
            if not _COUNT.match(rec["kb_entities"]) or int(rec["kb_entities"]) == 0:
                fail("kb_entities", f"must be a positive integer or empty, got {rec['kb_entities']!r}")
            kb = int(rec["kb_entities"])
        value = float(rec["value"]) if _PERCENT.match(rec["value"]) else float("nan")
        if not 0.0 <= value <= 100.0:
            fail("value", f"must be a percentage in [0, 100], got {rec['value']!r}")
        row = PublishedResult(rec["method"], rec["venue"], rec["dataset"], rec["protocol"], kb, rec["split"],
                              rec["metric"], value, rec["source"], lineno, int(stages))
        key = (row.name, dataset_key(row.dataset), row.protocol, kb, row.split, row.metric)
        if key in seen:
            fail("metric", f"{row.name} {row.dataset} {row.protocol} {row.split} {row.metric} already given on "
                           f"line {seen[key]}")
        seen[key] = lineno
        out.append(row)
    return out


def same_kb(dataset: str, a: int | None, b: int | None) -> bool:
    """Whether KB sizes ``a`` and ``b`` of ``dataset`` are one KB: equal, or both sizes its sources give for it
    (:data:`SAME_KB`)."""
    if a is None or b is None:
        return False
    sizes = SAME_KB.get(dataset_key(dataset), ((),))[0]
    return a == b or (a in sizes and b in sizes)


def kb_note(row: PublishedResult, ours: dict[str, OurSetting]) -> str | None:
    """Why ``row`` stands beside runs of ours on a KB of another reported size (:data:`SAME_KB`), or ``None`` when
    the sizes are equal (or the row is not full-KB)."""
    setting = ours.get(dataset_key(row.dataset))
    if row.protocol != "full_kb" or setting is None or setting.kb_entities == (row.kb_entities,):
        return None
    return (f"{row.dataset} full_kb: published with {row.kb_entities:,} entities, our runs rank against "
            f"{_sizes(setting.kb_entities)}: {SAME_KB[dataset_key(row.dataset)][1]}")


def _sizes(values) -> str:
    return ", ".join("not recorded" if v is None else f"{v:,}" for v in values)


def why_not_comparable(row: PublishedResult, protocol: str, split: str, ours: dict[str, OurSetting]) -> str | None:
    """``None`` when ``row`` may stand beside our ``protocol`` / ``split`` numbers; otherwise the reason.
    ``ours`` maps :func:`dataset_key` of each of our datasets to how our runs of it were measured."""
    reason = _measured_otherwise(row, protocol, split, ours)
    if reason is not None:
        return reason
    setting = ours[dataset_key(row.dataset)]
    if row.stages not in setting.stages:
        return (f"a {STAGES[row.stages]} system; our {setting.dataset} runs here are "
                f"{' and '.join(STAGES[s] for s in setting.stages)}")
    return None


def _measured_otherwise(row: PublishedResult, protocol: str, split: str, ours: dict[str, OurSetting]) -> str | None:
    setting = ours.get(dataset_key(row.dataset))
    if setting is None:
        names = ", ".join(s.dataset for s in ours.values()) or "none"
        return f"no run of ours on {row.dataset} (our datasets: {names})"
    if row.split != split:
        return f"published on the {row.split} split; this table reports {split}"
    if row.family != protocol:
        return f"protocol {row.protocol}; this table reports {protocol}"
    if protocol == "full_kb":
        if row.kb_entities is None:
            return f"{row.dataset} full_kb without a published KB size"
        if all(same_kb(row.dataset, row.kb_entities, ours_kb) for ours_kb in setting.kb_entities):
            return None
        if setting.kb_entities != (row.kb_entities,):
            if None in setting.kb_entities:
                return (f"{row.dataset} full_kb with {row.kb_entities:,} entities; the KB size of our runs is not "
                        "recorded (older run folders)")
            return (f"{row.dataset} full_kb with {row.kb_entities:,} entities; our runs rank against "
                    f"{_sizes(setting.kb_entities)}")
        return None
    n = row.list_length
    if len(setting.list_lengths) != 1 or setting.list_lengths[0] is None or abs(setting.list_lengths[0] - n) > 1e-9:
        have = ", ".join("not recorded" if v is None else f"{v:g}" for v in setting.list_lengths)
        return f"{row.dataset} {row.protocol}: lists of {n} entities; our candidate lists have {have} on average"
    return None
