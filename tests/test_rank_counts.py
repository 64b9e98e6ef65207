"""Rank counts that mean the same wherever they are computed: exact duplicates tie, a repeated candidate counts once,
a NaN gold score is a counted miss, and the compiled counting falls back to the eager one."""

from __future__ import annotations

import pytest
import torch

from nel_model.evaluation import metrics
from nel_model.evaluation.metrics import (TIE_RULES, RankCounts, candidate_counts, count_epilogue, full_kb_counts,
                                          metrics_from_counts)

NAN = float("nan")


def test_an_exact_twin_of_the_gold_ties_with_it_wherever_it_stands_in_the_list():
    """Random float features: the gold's score and its twin's (an identical embedding at another KB row, at a random
    place in the list) come from the same arithmetic, so they are the same float for every mention."""
    g = torch.Generator().manual_seed(0)
    n, d, kb, c = 2000, 384, 3000, 8
    ent = torch.randn(kb + n, d, generator=g)
    gold = torch.randperm(kb, generator=g)[:n]
    twin = kb + torch.arange(n)
    ent[twin] = ent[gold]
    q = torch.randn(n, d, generator=g)
    others = torch.randperm(kb, generator=g)
    others = others[~torch.isin(others, gold)][:c]
    cands = others.repeat(n, 1)
    cands.scatter_(1, torch.randint(0, c, (n, 1), generator=g), twin[:, None])
    listed = torch.arange(n) % 2 == 0                        # half the lists hold the gold too
    slot = (cands == twin[:, None]).long().argmax(1)
    cands[listed, (slot[listed] + 1) % c] = gold[listed]
    for rule in ("dim", "in_list"):
        counts = candidate_counts(q, ent, cands, gold, rule)
        assert counts.equal.tolist() == [1] * n, rule
    assert torch.equal(candidate_counts(q, ent, cands, gold, "in_list").found, listed)


def test_a_repeated_candidate_counts_once():
    q = torch.eye(2)
    ent = torch.tensor([[0.9, 0.1], [0.5, 0.7], [0.95, 0.2], [0.5, 0.3], [0.9, 0.0]])   # score(i, j) = ent[j, i]
    cands = torch.tensor([[2, 2, 1, 2, 0, 4, 4, -1, -1],     # gold 0 (0.9): entity 2 above, 1 below, 4 tied: each once
                          [0, 3, 0, 3, 1, 1, -1, -1, -1]])   # gold 1 (0.7): entities 0 and 3 below, each once
    c = candidate_counts(q, ent, cands, torch.tensor([0, 1]), "in_list")
    assert (c.higher.tolist(), c.equal.tolist(), c.unordered.tolist()) == ([1, 0], [1, 0], [0, 0])
    assert c.ranks("pessimistic").tolist() == [3, 1] and c.ranks("strict").tolist() == [2, 1]


def test_a_nan_gold_score_is_a_counted_miss_under_every_rule_and_protocol():
    # score(i, j) = ent[j, i] (a NaN in a row makes its score NaN for both queries): query 1's gold, entity 1,
    # scores NaN; query 0's gold scores above entity 2 (and entity 1's NaN is "unordered")
    q = torch.eye(2)
    ent = torch.tensor([[0.9, 0.2], [0.1, NAN], [0.3, 0.4]])
    gold = torch.tensor([0, 1])
    full = {"float32": full_kb_counts(q, ent, gold), "chunk 1": full_kb_counts(q, ent, gold, chunk=1),
            "bfloat16": full_kb_counts(q, ent, gold, dtype=torch.bfloat16)}
    cands = torch.tensor([[0, 2, 1], [0, 2, 1]])             # both golds listed
    cand = {rule: candidate_counts(q, ent, cands, gold, rule) for rule in ("dim", "in_list")}
    for name, counts in {**full, **cand}.items():
        assert counts.nan_gold.tolist() == [False, True], name
        for rule in TIE_RULES:
            ranks = counts.ranks(rule).tolist()
            m = metrics_from_counts(counts, rule)
            assert ranks == [{"strict": 1, "pessimistic": 2, "mean": 2}[rule], 0] and m["nan"] == 1, (name, rule)
            assert m["mrr"] == pytest.approx(1 / ranks[0] / 2) and m["hits@20"] == 0.5, (name, rule)


def test_a_nan_among_the_other_entities_counts_against_the_gold_only_under_pessimistic():
    q = torch.eye(2)
    ent = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.3, 0.4], [NAN, NAN]])    # entity 3 scores NaN for both
    gold = torch.tensor([0, 1])
    full = full_kb_counts(q, ent, gold)
    low = full_kb_counts(q, ent, gold, dtype=torch.float16)
    cand = candidate_counts(q, ent, torch.tensor([[3, 1, 0], [2, 3, 1]]), gold)
    for counts in (full, low, cand):
        assert counts.unordered.tolist() == [1, 1] and counts.nan_gold.tolist() == [False, False]
        assert counts.ranks("pessimistic").tolist() == [2, 2] and counts.ranks("strict").tolist() == [1, 1]
        assert counts.ranks("mean").tolist() == [2, 2]
        assert metrics_from_counts(counts, "strict")["nan"] == 0


def test_nan_gold_defaults_to_false_and_travels_with_the_counts():
    z = torch.tensor([0, 1, 2])
    plain = RankCounts(z, z, z, torch.ones(3, dtype=torch.bool))
    assert plain.nan_gold.tolist() == [False] * 3
    flagged = RankCounts(z, z, z, torch.ones(3, dtype=torch.bool), nan_gold=torch.tensor([True, False, True]))
    both = RankCounts.cat([plain, flagged])
    assert both.nan_gold.tolist() == [False] * 3 + [True, False, True]
    assert both.map(lambda t: t[3:]).nan_gold.tolist() == [True, False, True]
    assert both.to("cpu").nan_gold.tolist() == both.nan_gold.tolist()
    assert RankCounts.cat([]).nan_gold.tolist() == [] and metrics_from_counts(RankCounts.cat([]))["nan"] == 0
    assert metrics_from_counts(both, "mean")["nan"] == 2 and both.ranks("mean").tolist() == [1.0, 3.5, 6.0, 0, 3.5, 0]


def _raise_on_call(fn, **kwargs):
    def compiled(*args):
        raise RuntimeError("no backend")
    return compiled


def test_a_compiled_epilogue_that_fails_at_its_first_call_falls_back_to_eager(monkeypatch):
    """torch.compile compiles lazily: a missing backend shows at the first call, which the fallback must cover."""
    monkeypatch.setattr(metrics, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", _raise_on_call)
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 5, (7, 33), generator=g).float() / 4
    scores[2, 4] = NAN
    gold = scores[:, :1].clone()
    epilogue = metrics._epilogue(torch.device("cuda"))        # the choice only; nothing runs on a GPU
    with pytest.warns(RuntimeWarning, match="eager"):
        got = epilogue(scores, gold)
    for a, b in zip(got, count_epilogue(scores, gold)):
        assert torch.equal(a, b)


def test_full_kb_counts_through_a_failing_compiled_epilogue_equal_the_eager_counts(monkeypatch, recwarn):
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-3, 4, (30, 6), generator=g).float()     # integer features: exact scores, many ties
    ent = torch.randint(-3, 4, (50, 6), generator=g).float()
    gold = torch.randint(0, 50, (30,), generator=g)
    eager = full_kb_counts(q, ent, gold, chunk=8)
    monkeypatch.setattr(metrics, "_COMPILED", {})
    monkeypatch.setattr(metrics, "compiles_epilogue", lambda device_type: True)
    monkeypatch.setattr(torch, "compile", _raise_on_call)
    for _ in range(2):
        got = full_kb_counts(q, ent, gold, chunk=8)
        for f in ("higher", "equal", "unordered", "found", "nan_gold"):
            assert torch.equal(getattr(got, f), getattr(eager, f)), f
    assert len([w for w in recwarn if issubclass(w.category, RuntimeWarning)]) == 1      # one warning, then eager
