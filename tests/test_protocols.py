"""Evaluation rules (tie rules, candidate rules, exact low-precision ranks), the N-pair loss, TF-IDF negatives and
the paper-faithful model switches, on hand-computed cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.losses import npair_loss_sum
from nel_model.evaluation.metrics import (candidate_counts, candidate_recall, full_kb_counts, metrics_from_counts,
                               metrics_from_ranks)
from nel_model.nel import DIM, DIMConfig
from nel_model.training.tfidf_negatives import TfidfNegatives, tokenize

ROOT = Path(__file__).resolve().parents[1]


def _onehot_scores(scores: list[list[float]]):
    """Queries e_i against entities whose column i holds the scores: score(i, j) = scores[i][j]."""
    s = torch.tensor(scores)
    return torch.eye(len(s)), s.T.contiguous()


def test_tie_rules_full_kb_hand_case():
    nan = float("nan")
    q, ent = _onehot_scores([
        [0.9, 0.1, 0.5, 0.3],     # gold 0 best
        [0.2, 0.8, 0.8, 0.8],     # gold 1 ties with two others
        [0.4, 0.7, 0.4, 0.9],     # gold 2: two higher, one tie
        [0.1, 0.7, 0.2, 0.6],     # gold 3: one higher
    ])
    # entity 4 scores NaN for every query (0 * NaN = NaN); query 4 is NaN, so its gold (entity 0) scores NaN:
    # a miss under every rule (DIM's code would rank it 1), counted in "nan"
    ent = torch.cat([ent, torch.full((1, 4), nan)])
    q = torch.cat([q, torch.full((1, 4), nan)])
    gold = torch.tensor([0, 1, 2, 3, 0])
    c = full_kb_counts(q, ent, gold, chunk=2)
    assert c.higher.tolist() == [0, 0, 2, 1, 0] and c.equal.tolist() == [0, 2, 1, 0, 0]
    assert c.unordered.tolist() == [1, 1, 1, 1, 4] and c.nan_gold.tolist() == [False] * 4 + [True]
    assert c.ranks("pessimistic").tolist() == [2, 4, 5, 3, 0]     # NaN and ties count against the gold
    assert c.ranks("strict").tolist() == [1, 1, 3, 2, 0]          # DIM: 1 + strictly higher
    assert c.ranks("mean").tolist() == [2, 3, 4.5, 3, 0]
    strict = metrics_from_counts(c, "strict")
    assert strict["mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 2 + 0) / 5)
    assert strict["hits@1"] == pytest.approx(2 / 5) and strict["nan"] == 1
    # mean: gold 1 is rank 2, 3 or 4 with equal chance; gold 2 rank 4 or 5
    mean = metrics_from_counts(c, "mean")
    assert mean["mrr"] == pytest.approx((1 / 2 + (1 / 2 + 1 / 3 + 1 / 4) / 3 + (1 / 4 + 1 / 5) / 2 + 1 / 3 + 0) / 5)
    assert mean["hits@1"] == 0 and mean["hits@3"] == pytest.approx((1 + 2 / 3 + 1) / 5) and mean["nan"] == 1
    assert metrics_from_counts(c, "pessimistic") == {**metrics_from_ranks([2, 4, 5, 3, 0]), "nan": 1}


def test_mean_rule_equals_averaging_over_tie_orders():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (30, 12), generator=g).float() / 4         # many ties
    gold = torch.randint(0, 12, (30,), generator=g)
    q, ent = torch.eye(30), scores.T.contiguous()
    mean = metrics_from_counts(full_kb_counts(q, ent, gold), "mean")
    # brute force: average the metrics over every position the gold can take among its ties
    rr, h3 = [], []
    for i in range(30):
        s = scores[i]
        above, ties = int((s > s[gold[i]]).sum()), int((s == s[gold[i]]).sum()) - 1
        ranks = [above + 1 + t for t in range(ties + 1)]
        rr.append(np.mean([1 / r for r in ranks]))
        h3.append(np.mean([r <= 3 for r in ranks]))
    assert mean["mrr"] == pytest.approx(np.mean(rr)) and mean["hits@3"] == pytest.approx(np.mean(h3))


def test_candidate_rules_hand_case():
    q, ent = torch.eye(3), torch.tensor([[0.9, 0.1, 0.3],
                                         [0.5, 0.7, 0.3],
                                         [0.6, 0.2, 0.4],
                                         [0.1, 0.9, 0.0],
                                         [0.0, 0.0, 0.3]])
    cands = torch.tensor([[2, 0, 1, -1],      # gold 0 (0.9) in the list, beats 0.6 and 0.5 -> 1
                          [0, 4, 2, -1],      # gold 1 (0.7) NOT in the list; 0.1, 0.0, 0.2 below -> dim 1, in_list 0
                          [0, 1, 4, 3]])      # gold 2 (0.4) not listed; 0.3 (x3) below, 0.0 below -> dim 1
    gold = torch.tensor([0, 1, 2])
    assert candidate_counts(q, ent, cands, gold, "dim").ranks("strict").tolist() == [1, 1, 1]
    assert candidate_counts(q, ent, cands, gold, "in_list").ranks("strict").tolist() == [1, 0, 0]
    # a listed entity that ties with an unlisted gold: pessimistic 2, strict 1
    tie = candidate_counts(q[2:], ent, torch.tensor([[0, 3]]), torch.tensor([4]), "dim")
    assert (tie.ranks("pessimistic").item(), tie.ranks("strict").item()) == (2, 1)
    # a mention without any list is a miss under both rules (not a free rank 1)
    none = torch.tensor([[-1, -1, -1, -1]])
    assert candidate_counts(q[:1], ent, none, gold[:1], "dim").ranks("strict").tolist() == [0]
    assert candidate_counts(q[:1], ent, none, gold[:1], "in_list").ranks("strict").tolist() == [0]
    rec = candidate_recall(cands, gold, ks=(1, 2))
    assert rec["recall@1"] == 0 and rec["recall@2"] == pytest.approx(1 / 3) and rec["recall@all"] == pytest.approx(1 / 3)
    assert rec["mean_list_length"] == pytest.approx((3 + 3 + 4) / 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scoring_gives_exact_float32_ranks_on_near_ties(dtype):
    g = torch.Generator().manual_seed(0)
    d, n, e = 64, 40, 300
    ent = torch.nn.functional.normalize(torch.randn(e, d, generator=g), dim=1)
    gold = torch.randint(0, e, (n,), generator=g)
    q = torch.nn.functional.normalize(ent[gold] + 0.3 * torch.randn(n, d, generator=g), dim=1)
    # near-ties: for every query, entities whose score differs from the gold's by 1e-4 .. 1e-5, far below what
    # float16/bfloat16 can resolve (their rounding of a score near 1 is ~5e-4 / ~4e-3)
    for i in range(n):
        for j, delta in enumerate((1e-4, -1e-4, 3e-5, -3e-5, 1e-5)):
            k = (int(gold[i]) + 1 + 7 * j + i) % e
            if k == int(gold[i]):
                continue
            v = ent[gold[i]] + 1e-3 * torch.randn(d, generator=g)
            v = v - (q[i] @ v - q[i] @ ent[gold[i]] - delta) * q[i]        # now q.v = q.e_gold + delta
            ent[k] = v
    # no score lies within float32 rounding (~1e-6 here) of its gold's, so float32 ranks are the same whatever the
    # kernel (matrix product or product-sum, any chunk, any CPU) and can be compared exactly
    s64 = q.double() @ ent.double().T
    gap = (s64 - s64.gather(1, gold[:, None])).abs()
    gap[torch.arange(n), gold] = float("inf")
    assert gap.min() > 5e-6
    ref = full_kb_counts(q.double(), ent.double(), gold, dtype=torch.float64)
    ref32 = full_kb_counts(q, ent, gold, chunk=7)
    low_only = (q.to(dtype) @ ent.to(dtype).T).float()
    naive = (low_only >= low_only.gather(1, gold[:, None])).sum(1)
    fast = full_kb_counts(q, ent, gold, chunk=7, dtype=dtype)
    for rule in ("pessimistic", "strict", "mean"):
        assert torch.equal(fast.ranks(rule), ref32.ranks(rule)), rule
        assert torch.equal(ref32.ranks(rule), ref.ranks(rule)), rule
    assert not torch.equal(naive, ref.ranks("pessimistic"))   # the test has ties low precision alone gets wrong


def test_npair_loss_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # rows: golds of mention 0, 1; then 2 negatives each
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    got = npair_loss_sum(q, e, 0, 2, 2, 2, l2=0.02)
    m0 = math.log(1 + math.exp(0.5 - 1.0) + math.exp(0.0 - 1.0)) + 0.02 * (1 + 1)
    m1 = math.log(1 + math.exp(2.0 - 2.0) + math.exp(-2.0 - 2.0)) + 0.02 * (4 + 1)
    assert got.item() == pytest.approx(m0 + m1, rel=1e-6)
    # local slice of the same global batch (DDP): mention 1 alone
    assert npair_loss_sum(q[1:], e, 1, 2, 2, 2, l2=0.02).item() == pytest.approx(m1, rel=1e-6)


def test_tfidf_negatives_share_a_salient_word():
    texts = ["Sex: male. Occupation: footballer, striker.", "Sex: male. Occupation: footballer, goalkeeper.",
             "Occupation: painter.", "Occupation: painter, sculptor.", "river in Peru", "river in Chile", ""]
    assert tokenize(texts[0]) == ["male", "footballer", "striker"]
    t = TfidfNegatives.build(texts)
    assert t.num_entities == 7
    rng = np.random.default_rng(0)
    gold = np.array([0, 2, 4, 6] * 250)
    negs = t.sample(rng, gold, 3)
    assert negs.shape == (1000, 3) and not (negs == gold[:, None]).any()
    # the footballer draws the other footballer, the painter the sculptor, the river the other river
    partner = {0: 1, 2: 3, 4: 5}
    for g, p in partner.items():
        share = (negs[gold == g] == p).mean()
        assert share > 0.8, (g, share)
    assert (negs[gold == 6] == 0).mean() < 0.4     # no words: uniform over the 6 others
    again = t.sample(np.random.default_rng(0), gold, 3)
    assert np.array_equal(negs, again)


def _cfg(**kw) -> DIMConfig:
    base = dict(text_dim=16, image_dim=12, hidden_size=16, output_size=16, ff_size=32, num_heads=2, num_layers=1,
                dropout=0.0, residual_base="mention")
    return DIMConfig(**{**base, **kw})


def _views(b=5, e=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mv = {"mention": torch.randn(b, 16, generator=g), "sentence": torch.randn(b, 6, 16, generator=g),
          "sentence_mask": torch.rand(b, 6, generator=g) < 0.8, "image": torch.randn(b, 12, generator=g),
          "image_mask": torch.tensor([True, False, True, True, False]), "regions": torch.randn(b, 4, 12, generator=g),
          "regions_mask": torch.rand(b, 4, generator=g) < 0.7, "profile": torch.randn(b, 2, 16, generator=g),
          "profile_mask": torch.tensor([[True, True], [True, False], [False, False], [False, True], [True, True]])}
    mv["sentence_mask"][:, 0] = True
    ev = {"desc": torch.randn(e, 16, generator=g), "image": torch.randn(e, 12, generator=g),
          "image_mask": torch.ones(e, dtype=torch.bool), "profile": torch.randn(e, 16, generator=g),
          "profile_mask": torch.tensor([True, False] * 3 + [True])}
    return mv, ev


@pytest.mark.parametrize("kw", [dict(sentence_fusion="add"), dict(image_fusion="add"), dict(profile_pool="max"),
                                dict(shared_attention=True), dict(entity_tower="frozen"),
                                dict(init="xavier", residual=False)])
def test_model_switches_run_and_train(kw):
    torch.manual_seed(0)
    model = DIM(_cfg(**kw))
    mv, ev = _views()
    q, e = model(mv, ev)
    assert q.shape == (5, 16) and e.shape == (7, 16)
    assert torch.allclose(q.norm(dim=1), torch.ones(5)) and torch.isfinite(q).all()
    loss = -(q @ e.T).diagonal()[:5].sum() - (q ** 2).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), "unused parameters break DDP"


def test_frozen_entity_tower_is_the_enriched_description_feature():
    model = DIM(_cfg(entity_tower="frozen"))
    mv, ev = _views()
    e = model.encode_entities(ev, normalize=False)
    expect = torch.where(ev["profile_mask"][:, None], ev["profile"], ev["desc"])
    assert torch.allclose(e, expect)
    assert not any("e_out" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="output size .* must equal the text feature size"):
        _cfg(entity_tower="frozen", output_size=8)


def test_profile_max_pool_uses_the_elementwise_max_of_present_rows():
    model = DIM(_cfg(profile_pool="max", use_sentence=False, use_image=False, use_regions=False, num_layers=0))
    mv, _ = _views()
    mv2 = {k: v.clone() for k, v in mv.items()}
    # mention 0 has both rows: swapping them leaves the max (and the output) unchanged
    mv2["profile"][0] = mv["profile"][0].flip(0)
    assert torch.allclose(model.encode_mentions(mv), model.encode_mentions(mv2))
    # mention 1 has row 0 only: changing its absent row 1 changes nothing
    mv2["profile"][1, 1] += 5
    assert torch.allclose(model.encode_mentions(mv)[1], model.encode_mentions(mv2)[1])


def test_default_model_is_unchanged_by_the_new_switches():
    """The defaults are today's model: same parameters in the same order (old checkpoints keep loading)."""
    names = [n for n, _ in DIM(_cfg()).named_parameters()]
    assert names[:2] == ["text_proj.0.weight", "text_proj.0.bias"] and "e_out.weight" in names
    assert not any(n.startswith("shared_attn") for n in names)
    assert {n.split(".")[0] for n in names} == {"text_proj", "image_proj", "sentence_attn", "image_attn",
                                                "profile_attn", "refine", "q_out", "e_out"}


@pytest.mark.slow
def test_paper_preset_trains_end_to_end_and_records_its_protocol(tmp_path):
    ds, feat = write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=40, mentions_per_split=(96, 32, 32),
                               seed=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(ROOT / "configs" / "dim_paper.yaml"),
           "--features", str(feat), "--output_dir", str(run), "--epochs", "2", "--hidden_size", "32", "--ff_size",
           "64", "--num_heads", "4", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((run / "results.json").read_text())
    assert (res["tie_rule"], res["candidate_rule"], res["selection"], res["score_dtype"]) == \
        ("strict", "dim", "candidates:hits@1", "float32")
    assert set(res["tie_rules"]) == {"pessimistic", "strict", "mean"}
    assert res["protocols"] == res["tie_rules"]["strict"]
    assert res["candidate_recall"]["test"]["recall@all"] == 1.0 and res["kb_entities"] == 40
    conf = json.loads((run / "config.json").read_text())
    assert conf["model_config"]["entity_tower"] == "frozen" and conf["config"]["loss"]["loss"] == "npair"
    assert conf["config"]["loss"]["negatives"] == "tfidf"
