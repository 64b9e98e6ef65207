"""Smoke test of the real-data WikiMEL benchmark (bench/wikimel_ghmfc.py) on a small part of GHMFC's split: the first
60 ids of each split, a KB of their gold entities plus 500 others, one seed, one epoch.

Skipped, with a message, where the shared data is absent; MEL_SHARED_DATA overrides the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from data_process.core.records import load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEL_SHARED_DATA") or REPO.parent / "shared" / "data")
GHMFC, ANN = SHARED / "GHMFC-WikiMEL.zip", SHARED / "Wikidata-MEL.zip"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (GHMFC.is_file() and ANN.is_file()),
                                                   reason=f"real WikiMEL data not found at {SHARED} "
                                                          "(set MEL_SHARED_DATA)")]

COLS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")


def _bench():
    spec = importlib.util.spec_from_file_location("wikimel_ghmfc_bench", REPO / "bench" / "wikimel_ghmfc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_metrics(m: dict) -> bool:
    return all(0.0 <= m[c] <= 1.0 for c in COLS) and m["hits@1"] <= m["hits@3"] <= m["hits@5"] <= m["hits@10"] \
        <= m["hits@20"] and m["mrr"] >= m["hits@1"] and isinstance(m["n"], int) and m["n"] > 0


def test_benchmark_pieces_on_a_subset(tmp_path):
    bench = _bench()
    results = tmp_path / "results"
    out = bench.run_benchmark(GHMFC, ANN, tmp_path / "work", seeds=(1,), epochs=1, limit=60, results_dir=results,
                              command="pytest tests/test_wikimel_bench.py")
    data = json.loads((results / "wikimel_ghmfc.json").read_text())
    assert data["verdict"] == out["verdict"]
    md = (results / "wikimel_ghmfc.md").read_text()
    assert md.count("| zero-shot") == 6 and "DIM paper preset" in md
    ds = data["dataset"]
    splits = json.loads((tmp_path / "work" / "release" / "input_data" / "splits.json").read_text())
    assert sum(len(v) for v in splits.values()) == 180 and ds["dropped"] == 0
    # every kept split id is either converted or listed as absent
    samples = {m.id.rsplit("-", 1)[0] for m in load_dataset(ds["path"]).mentions}
    assert ds["absent_ids"] + len(samples) == 180
    zs = data["zero_shot"]
    for row in ("mention_vs_name", "context_vs_name_description", "mention_vs_name_description"):
        for proto in ("full_kb", "candidates"):
            assert _is_metrics(zs[row][proto]["pessimistic"]) and _is_metrics(zs[row][proto]["strict"])
            # strict ties count for the gold: never worse than pessimistic
            assert zs[row][proto]["strict"]["mrr"] >= zs[row][proto]["pessimistic"]["mrr"]
    assert zs["checks"]["untrained_dim_equals_mention_vs_name_description"] is True
    for key in ("ours", "paper"):
        run = data[key]["runs"][0]
        assert run["seed"] == 1 and run["epochs_run"] == 1
        assert _is_metrics(run["tie_rules"]["pessimistic"]["full_kb"]["test"])
    assert data["paper"]["runs"][0]["selection"] == "candidates:hits@1"
    assert 0 < data["candidate_recall"]["recall@100"] <= 1
