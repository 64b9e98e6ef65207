"""Smoke test of the real-data WikiMEL benchmark (bench/wikimel_text.py) on the first 300 samples, 2 epochs.

Skipped, with a message, where the shared data is absent; MEL_SHARED_DATA overrides the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEL_SHARED_DATA") or REPO.parent / "shared" / "data")
ZIP = SHARED / "Wikidata-MEL.zip"

pytestmark = pytest.mark.skipif(not ZIP.is_file(), reason=f"real WikiMEL annotations not found at {ZIP} "
                                "(set MEL_SHARED_DATA to the folder holding Wikidata-MEL.zip)")

COLS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")


def _bench():
    spec = importlib.util.spec_from_file_location("wikimel_text_bench", REPO / "bench" / "wikimel_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_metrics(m: dict) -> bool:
    return all(0.0 <= m[c] <= 1.0 for c in COLS) and m["hits@1"] <= m["hits@3"] <= m["hits@5"] <= m["hits@10"] \
        <= m["hits@20"] and m["mrr"] >= m["hits@1"] and isinstance(m["n"], int) and m["n"] > 0


def test_benchmark_pieces_on_a_subset(tmp_path):
    bench = _bench()
    results = tmp_path / "results"
    out = bench.run_benchmark(ZIP, tmp_path / "work", seed=0, epochs=2, limit=300, results_dir=results,
                              command="pytest tests/test_wikimel_bench.py")
    data = json.loads((results / "wikimel_text.json").read_text())
    assert data["table"] == json.loads(json.dumps(out["table"]))
    assert (results / "wikimel_text.md").read_text().count("| zero-shot") == 2
    for key in ("command", "machine", "dataset", "zero_shot", "trained", "table", "timings_s", "verdict"):
        assert key in data
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    for step in ("task", "features", "zero_shot", "train", "total"):
        assert data["timings_s"][step] >= 0
    ds = data["dataset"]
    assert ds["name"] == "wikimel-text" and ds["entities"] > 0
    assert sum(ds["splits"].values()) == ds["mentions"] > 300 * 0.9
    zs = data["zero_shot"]
    assert zs["num_entities"] == ds["entities"]
    assert _is_metrics(zs["mention"]["test"]) and _is_metrics(zs["mention_in_context"]["test"])
    assert zs["mention"]["test"]["n"] == ds["splits"]["test"]
    # the untrained DIM (zero-initialised residual) is exactly the mention-phrase zero-shot
    assert zs["checks"]["untrained_dim_equals_mention_zero_shot_test"] is True
    full = data["trained"]["protocols"]["full_kb"]
    assert _is_metrics(full["dev"]) and _is_metrics(full["test"])
    assert data["trained"]["epochs_run"] <= 2
    assert [r["model"] for r in data["table"]][2].startswith("DIM")
    assert all(_is_metrics(r) for r in data["table"])
