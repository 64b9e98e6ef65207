"""Ranking metrics against hand-computed cases (including the pessimistic tie rule)."""


import pytest
import torch

from nel_model.training.hard_negatives import top_wrong
from nel_model.evaluation.metrics import candidate_ranks, full_kb_ranks, metrics_from_ranks


def test_metrics_from_ranks_hand_case():
    m = metrics_from_ranks([1, 2, 4, 25, 0])      # 0 = gold not ranked (miss)
    assert m["n"] == 5
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 25 + 0) / 5)
    assert m["hits@1"] == pytest.approx(1 / 5)
    assert m["hits@3"] == pytest.approx(2 / 5)
    assert m["hits@5"] == pytest.approx(3 / 5)
    assert m["hits@10"] == pytest.approx(3 / 5)
    assert m["hits@20"] == pytest.approx(3 / 5)
    assert metrics_from_ranks([])["n"] == 0


def test_full_kb_ranks_hand_cases_and_ties():
    # entities as rows; query i is one-hot e_i so score(i, j) = ent[j, i]
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.3],    # gold 0 best -> rank 1
        [0.2, 0.8, 0.8, 0.1],    # gold 1 ties with entity 2 -> pessimistic rank 2
        [0.4, 0.4, 0.4, 0.4],    # all equal -> worst rank 4
        [0.1, 0.7, 0.3, 0.6],    # gold 3: one higher (0.7) -> rank 2
    ])
    q = torch.eye(4)
    ent = scores.T.contiguous()
    gold = torch.tensor([0, 1, 2, 3])
    for chunk in (1, 3, 512):
        assert full_kb_ranks(q, ent, gold, chunk=chunk).tolist() == [1, 2, 4, 2]


def test_full_kb_rank_nan_gold_is_a_miss_and_a_nan_other_is_worst():
    q = torch.eye(2)
    ent = torch.tensor([[float("nan"), 0.5], [0.2, 0.1], [0.1, float("nan")]])   # E=3, scores(i,j)=ent[j,i]
    # query 0: gold 0 has NaN score -> a miss (0); query 1: gold 1 scores 0.1, entity 0 0.5 higher, entity 2 NaN
    assert full_kb_ranks(q, ent, torch.tensor([0, 1])).tolist() == [0, 3]


def test_full_kb_ranks_match_bruteforce_random():
    # integer-valued features: every score is exact whatever the chunking or the matrix kernel, ties included
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-3, 4, (37, 8), generator=g).float()
    e = torch.randint(-3, 4, (50, 8), generator=g).float()
    gold = torch.randint(0, 50, (37,), generator=g)
    s = q.double() @ e.double().T
    expect = [int((s[i] >= s[i, gold[i]]).sum()) for i in range(37)]
    assert expect != [int((s[i] > s[i, gold[i]]).sum()) + 1 for i in range(37)]      # the case has ties
    for chunk in (5, 512):
        assert full_kb_ranks(q, e, gold, chunk=chunk).tolist() == expect


def test_candidate_ranks_padding_missing_gold_and_duplicates():
    q = torch.eye(3)
    # 5 entities; score(i, j) = ent[j, i]
    ent = torch.tensor([[0.9, 0.1, 0.3],
                        [0.5, 0.7, 0.3],
                        [0.6, 0.2, 0.3],
                        [0.1, 0.9, 0.0],
                        [0.0, 0.0, 0.3]])
    cands = torch.tensor([[2, 0, 1, -1],      # gold 0 (0.9) beats 0.6, 0.5 -> 1
                          [1, 1, 0, 4],       # gold 1 duplicated; 0.7 > 0.1, 0.0 -> 1
                          [0, 1, 2, 4]])      # gold 3 not a candidate -> 0
    gold = torch.tensor([0, 1, 3])
    assert candidate_ranks(q, ent, cands, gold).tolist() == [1, 1, 0]
    # ties among candidates count against the gold
    assert candidate_ranks(q[2:], ent, torch.tensor([[0, 1, 2, 4]]), torch.tensor([2])).tolist() == [4]
    m = metrics_from_ranks(candidate_ranks(q, ent, cands, gold))
    assert m["mrr"] == pytest.approx(2 / 3) and m["hits@1"] == pytest.approx(2 / 3)


def test_top_wrong_excludes_gold_and_is_sorted():
    q = torch.eye(2)
    ent = torch.tensor([[0.9, 0.0], [0.8, 0.5], [0.1, 0.9], [0.7, 0.2]])
    top = top_wrong(q, ent, torch.tensor([0, 2]), k=2, chunk=1)
    assert top.tolist() == [[1, 3], [1, 3]]
    assert top_wrong(q, ent, torch.tensor([0, 2]), k=10).shape == (2, 3)


def test_top_k_comes_from_the_same_pass_and_matches_a_separate_top_k():
    """The same chunking gives the same floats; another chunking (another matrix-product shape, whose kernel may
    round differently on another CPU) gives scores within float32 rounding, and the same entities wherever the
    gap between neighbours is wider than that rounding."""
    from nel_model.evaluation.evaluate import top_entities
    from nel_model.evaluation.metrics import full_kb_counts

    g = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    gold = torch.randint(0, 40, (23,), generator=g)
    c = full_kb_counts(q, e, gold, chunk=5, top_k=6)
    same_scores, same_rows = top_entities(q, e, 6, chunk=5)
    assert torch.equal(c.top_rows, same_rows) and torch.equal(c.top_scores, same_scores)
    low = full_kb_counts(q, e, gold, chunk=5, dtype=torch.bfloat16, top_k=6)
    assert torch.equal(low.top_rows, same_rows) and torch.equal(low.top_scores, same_scores)
    assert torch.equal(low.ranks(), c.ranks())
    tol = 1e-5                                               # far above float32 rounding of unit-vector products
    scores, rows = top_entities(q, e, 6, chunk=9)
    assert torch.allclose(scores, c.top_scores, rtol=0, atol=tol)
    exact = (q.double() @ e.double().T).sort(1, descending=True).values[:, :7]
    clear = (exact[:, :-1] - exact[:, 1:]) > tol             # position j is clearly apart from position j + 1
    sure = torch.ones_like(clear[:, :6])                     # position j is sure if apart from both neighbours
    sure[:, 1:] = clear[:, :5] & clear[:, 1:6]
    sure[:, 0] = clear[:, 0]
    assert sure.float().mean() > 0.9                         # the comparison has substance
    assert torch.equal(rows[sure], c.top_rows[sure])
    assert full_kb_counts(q, e, gold).top_rows is None


def test_top_k_orders_exactly_equal_scores_by_kb_row():
    from nel_model.evaluation.metrics import full_kb_counts

    # integer-valued features: exact scores whatever the kernel, so the twins 3 and 7 (and 9) tie exactly
    g = torch.Generator().manual_seed(4)
    e = torch.randint(-2, 3, (12, 4), generator=g).float()
    e[7] = e[3]
    e[9] = e[3]
    q = e[3:4] + torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])   # query 0 is entity 3 itself
    c = full_kb_counts(q, e, torch.tensor([3, 3]), chunk=1, top_k=12)
    for i in range(2):
        s = (q[i].double() @ e.double().T).tolist()
        assert c.top_rows[i].tolist() == sorted(range(12), key=lambda j: (-s[j], j))


@pytest.mark.slow
def test_the_compiled_count_epilogue_equals_the_eager_one():
    """On CUDA the count epilogue is compiled into one fused pass; the compiled function (here on the CPU backend)
    must count exactly what the eager one does, NaN and ties included."""
    from nel_model.evaluation.metrics import count_epilogue

    compiled = torch.compile(count_epilogue, dynamic=True)
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 5, (7, 33), generator=g).float() / 4
    scores[2, 4] = float("nan")
    gold = scores[:, :1].clone()
    gold[5] = float("nan")
    want = count_epilogue(scores, gold)
    assert want[2].tolist() == [True, True, False, True, True, False, True]
    for got, exp in zip(compiled(scores, gold), want):
        assert torch.equal(got, exp)
