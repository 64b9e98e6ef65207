"""Two-stage evaluation: a retriever's lists re-ordered by re-ranker scores, counted by the evaluation's own code."""

from __future__ import annotations

import json

import pytest
import torch

from nel_model.evaluation.metrics import metrics_from_counts
from nel_model.inference.retrieve import retrieve
from nel_model.evaluation.evaluate import open_run
from nel_model.rerank.two_stage import final_scores, two_stage_counts, write_two_stage_run
from nel_model.runs import load_predictions, load_run
from run_fixtures import trained_run

K = 8


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    run = trained_run(tmp_path_factory.mktemp("two_stage"), entities=40, splits=(64, 32, 48), seed=6, epochs=2)
    retrieve(run, ("train", "dev", "test"), K)
    return open_run(run, "cpu")


def test_final_scores_put_the_list_first_in_the_rerankers_order_and_keep_its_ties():
    retr = torch.tensor([[0.9, 0.1, 0.5, -0.2, 0.3]])
    top = torch.tensor([[0, 2, 4]])
    out = final_scores(retr, top, torch.tensor([[0.1, 7.0, 0.1]]))
    order = out[0].argsort(descending=True, stable=True).tolist()
    assert order[:3] == [2, 0, 4] and out[0, 0] == out[0, 4]       # re-ranked list first, its tie kept
    assert order[3:] == [1, 3] and out[0, 1] == 0.1                  # the rest in the retriever's order
    nan = final_scores(retr, top, torch.tensor([[float("nan"), 1.0, 0.0]]))
    assert nan[0].argsort(descending=True).tolist()[:3] == [2, 4, 0]    # a NaN re-ranker score is the lowest


def test_the_identity_reranker_is_the_retriever_and_the_oracle_reaches_recall_at_k(retriever):
    lists = retriever.lists("test")
    assert lists.top_k == K and len(lists.rows) == 48
    same = two_stage_counts(retriever, lists, lists.scores)
    written = load_predictions(retriever.run, "test")
    assert same["full_kb"].ranks("pessimistic").tolist() == [p.full_kb.rank for p in written.mentions]
    assert same["candidates"].ranks("pessimistic").tolist() == [p.candidates.rank for p in written.mentions]
    pos = lists.gold_position()
    oracle = torch.where(torch.arange(K)[None, :] == pos[:, None], 1.0, 0.0)
    best = metrics_from_counts(two_stage_counts(retriever, lists, oracle)["full_kb"])
    recall = float((pos >= 0).double().mean())
    assert 0 < recall < 1 and best["hits@1"] == pytest.approx(recall)
    worst = metrics_from_counts(two_stage_counts(retriever, lists, -oracle)["full_kb"])
    assert worst["mrr"] < metrics_from_counts(same["full_kb"])["mrr"] < best["mrr"]
    with pytest.raises(ValueError, match="re-ranker scores of shape"):
        two_stage_counts(retriever, lists, oracle[:, :3])


def test_a_two_stage_run_folder_reads_like_any_run(retriever, tmp_path):
    counts = {}
    for split in ("dev", "test"):
        lists = retriever.lists(split)
        for proto, c in two_stage_counts(retriever, lists, lists.scores.flip(1)).items():
            counts.setdefault(proto, {})[split] = c
    res = write_two_stage_run(tmp_path / "ts", retriever, counts, K, {"kind": "reverse"}, "reversed", seed=0)
    run = load_run(tmp_path / "ts")
    assert run.label == "reversed" and run.results["two_stage"]["top_k"] == K
    assert run.results["two_stage"]["reranker"] == {"kind": "reverse"} and res["kb_entities"] == 40
    preds = load_predictions(tmp_path / "ts", "test")
    lists = retriever.lists("test")
    ids = retriever.data.entity_ids
    assert [[e for e, _ in p.top[:K]] for p in preds.mentions] == \
        [[ids[r] for r in row.flip(0).tolist()] for row in lists.top]
    assert json.loads((tmp_path / "ts" / "results.json").read_text())["protocols"]["full_kb"]["test"]["n"] == 48
