"""The MELBench reader on the real WikiMEL annotations (Wikidata-MEL.json from ../shared/data/Wikidata-MEL.zip).

Skipped, with a message, where the shared data is absent; MEL_SHARED_DATA overrides the folder.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from data_process.ingest.prepare import prepare
from data_process.ingest.readers import read_melbench
from data_process.ingest.readers.common import split_samples
from data_process.core.records import load_dataset

SHARED = Path(os.environ.get("MEL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
ZIP = SHARED / "Wikidata-MEL.zip"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ZIP.is_file(), reason=f"real WikiMEL annotations not found at {ZIP} "
                                 "(set MEL_SHARED_DATA to the folder holding Wikidata-MEL.zip)")]

N_SAMPLES, N_MENTIONS, N_ENTITIES, N_AMBIGUOUS = 22_136, 25_846, 17_391, 874


@pytest.fixture(scope="module")
def wikimel_json(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wikimel_src")
    with zipfile.ZipFile(ZIP) as zf:
        zf.extract("Wikidata-MEL.json", folder)
    return folder / "Wikidata-MEL.json"


@pytest.fixture(scope="module")
def converted_dir(wikimel_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wikimel_out") / "wikimel"
    prepare("melbench", wikimel_json, out, split_seed=0, echo=False, progress=False)
    return out


def test_counts_of_the_real_release(converted_dir):
    ds = load_dataset(converted_dir)
    assert ds.info.source_format == "melbench"
    assert ds.info.notes["samples"] == N_SAMPLES
    assert len(ds.mentions) == N_MENTIONS
    assert len(ds.entities) == N_ENTITIES
    assert all(e.id.startswith("Q") and e.name and e.description == "" for e in ds.entities)
    golds: dict[str, set[str]] = {}
    for m in ds.mentions:
        golds.setdefault(m.mention, set()).add(m.gold_id)
    assert sum(len(g) > 1 for g in golds.values()) == N_AMBIGUOUS
    report = json.loads((converted_dir / "validation.json").read_text())
    assert report["ok"] is True
    assert report["entities"] == N_ENTITIES and report["mentions"] == N_MENTIONS
    assert report["ambiguous_surface_forms"] == N_AMBIGUOUS
    assert report["errors"]["gold_not_in_kb"] == 0
    # 740 mentions are not verbatim in their sentence (e.g. 'Earl Aberdeen'): warnings, span left None.
    assert report["warnings"]["mention_not_in_sentence"] == 740
    assert report["mentions_with_span"] == N_MENTIONS - 740
    assert sum(m.span is None for m in ds.mentions) == 740
    for m in ds.mentions:
        if m.span is not None:
            assert m.sentence[m.span[0]:m.span[1]] == m.mention


def test_splits_are_by_sample_and_deterministic(converted_dir, wikimel_json):
    ds = load_dataset(converted_dir)
    by_sample: dict[str, set[str]] = {}
    for m in ds.mentions:
        by_sample.setdefault(m.id.rsplit("-", 1)[0], set()).add(m.split)
    assert len(by_sample) == N_SAMPLES
    assert all(len(s) == 1 for s in by_sample.values())
    sample_counts = Counter(next(iter(s)) for s in by_sample.values())
    assert sample_counts == {"train": 15_495, "dev": 2_214, "test": 4_427}
    assert Counter(m.split for m in ds.mentions) == {"train": 18_109, "dev": 2_598, "test": 5_139}
    assert "seed 0" in ds.info.split_rule and "sha256" in ds.info.split_rule
    again = read_melbench(wikimel_json, seed=0, progress=False)
    assert [(m.id, m.split) for m in again.mentions] == [(m.id, m.split) for m in ds.mentions]
    other = split_samples(list(by_sample), 1, (70, 10, 20))
    assert Counter(other.values()) == sample_counts
    assert other != {sid: next(iter(s)) for sid, s in by_sample.items()}
