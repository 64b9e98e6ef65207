"""dim-mel retrieve: the first stage of a two-stage linker, from the run's own evaluation pass."""

from __future__ import annotations

import json

import pytest

from nel_model.inference import retrieve as R
from nel_model.runs import RETRIEVAL_DIR, RunError, load_predictions
from run_fixtures import trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("retrieve"), entities=40, splits=(96, 32, 32), seed=4, epochs=3)


def test_retrieved_lists_are_the_evaluation_pass_and_recall_is_counted_from_them(run, capsys):
    assert R.main(["--run", str(run), "--top-k", "15"]) == 0
    report = json.loads((run / RETRIEVAL_DIR / "report.json").read_text())
    assert report["top_k"] == 15 and report["kb_entities"] == 40 and set(report["splits"]) == {"train", "dev", "test"}
    for split, n in (("train", 96), ("dev", 32), ("test", 32)):
        lists = load_predictions(run, split, RETRIEVAL_DIR)
        assert len(lists.mentions) == n and all(len(m.top) == 15 for m in lists.mentions)
        scores = [[s for _, s in m.top] for m in lists.mentions]
        assert all(s == sorted(s, reverse=True) for s in scores)
        rec = report["splits"][split]
        for k in (1, 5, 10, 15):
            assert rec[f"recall@{k}"] == sum(m.gold in [e for e, _ in m.top[:k]] for m in lists.mentions) / n
        assert rec["recall@1"] <= rec["recall@5"] <= rec["recall@15"]
    # the first 10 of each test list are the run's own predictions (the same pass, the same arithmetic)
    preds = {m.mention_id: m for m in load_predictions(run, "test").mentions}
    for m in load_predictions(run, "test", RETRIEVAL_DIR).mentions:
        assert [e for e, _ in m.top[:10]] == [e for e, _ in preds[m.mention_id].top]
        assert m.full_kb == preds[m.mention_id].full_kb
    assert "recall@15" in capsys.readouterr().out


def test_retrieve_errors(run, tmp_path):
    with pytest.raises(ValueError, match="--top-k must be in 1..100, got 101"):
        R.retrieve(run, ("test",), 101)
    with pytest.raises(RunError, match="no retrieved lists for split 'dev'"):
        load_predictions(tmp_path, "dev", RETRIEVAL_DIR)


def test_faiss_lists_keep_the_exact_ranks_and_report_their_overlap(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    exact = R.retrieve(copy, ("test",), 10)
    exact_lists = {m.mention_id: m for m in load_predictions(copy, "test", RETRIEVAL_DIR).mentions}
    report = R.retrieve(copy, ("test",), 10, faiss="hnsw")
    assert report["lists"] == "faiss hnsw" and exact["lists"] == "exact"
    assert 0.5 <= report["overlap_with_exact_top_k"]["test"] <= 1.0
    approx = load_predictions(copy, "test", RETRIEVAL_DIR).mentions
    assert all(len(m.top) == 10 for m in approx)
    assert [m.full_kb for m in approx] == [exact_lists[m.mention_id].full_kb for m in approx]   # ranks stay exact
    rec = report["splits"]["test"]["recall@10"]
    assert rec == sum(m.gold in [e for e, _ in m.top] for m in approx) / len(approx)


@pytest.mark.parametrize("faiss", [None, "hnsw", "ivf"])
def test_a_k_larger_than_the_kb_is_an_error_naming_the_kb_size(run, faiss):
    """Issue 26 item 5: lists hold real, distinct entities only (faiss padded them with copies of the last entity
    at -3.4e38 and reported recall 100)."""
    with pytest.raises(ValueError, match=r"--top-k 50 is larger than the KB \(40 entities\)"):
        R.retrieve(run, ("test",), 50, faiss=faiss)
