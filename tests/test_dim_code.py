"""DIM as its public code computes (configs/dim_code.yaml): the in-batch N-pair loss, the raw-feature query with
its caption constant, the pooled context view, and the preset training on the demo data."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.config import parse_train_args as parse_args
from nel_model.losses import batch_loss_sum, npair_loss_sum
from nel_model.nel import DIM, DIMConfig

ROOT = Path(__file__).resolve().parent.parent


def dim_code_npair(anchor, positive, negative, l2=0.02):
    """The formula as DIM's code writes it: anchor and positive unsqueezed to [B,1,D], the negatives [B,D]; the
    subtraction broadcasts to [B,B,D], so every query meets every negative of the batch."""
    a, p = anchor.unsqueeze(1), positive.unsqueeze(1)
    x = torch.matmul(a, (negative - p).transpose(1, 2))                   # [B,1,B]
    loss = torch.log(1 + torch.exp(x).sum(2)).mean()
    return loss + l2 * ((anchor ** 2).sum(1) + (positive ** 2).sum(1)).mean()


def test_in_batch_npair_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # rows: golds of mention 0, 1; then one negative each
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [1.0, 1.0]])
    # mention 0: q.e+ = 1, negatives 0.5 (its own) and 1 (mention 1's); mention 1: q.e+ = 2, negatives 0 and 2
    m0 = math.log(1 + math.exp(0.5 - 1) + math.exp(1 - 1)) + 0.02 * (1 + 1)
    m1 = math.log(1 + math.exp(0 - 2) + math.exp(2 - 2)) + 0.02 * (4 + 1)
    got = npair_loss_sum(q, e, 0, 2, 2, 1, l2=0.02, in_batch=True)
    assert got.item() == pytest.approx(m0 + m1, rel=1e-6)
    assert (got / 2).item() == pytest.approx(dim_code_npair(q, e[:2], e[2:]).item(), rel=1e-6)
    # each mention's own negative only: a different number (the paper's reading)
    own = math.log(1 + math.exp(0.5 - 1)) + 0.04 + math.log(1 + math.exp(2 - 2)) + 0.1
    assert npair_loss_sum(q, e, 0, 2, 2, 1, l2=0.02).item() == pytest.approx(own, rel=1e-6)
    # a DDP process's slice of the same global batch sees all the batch's negatives too
    assert npair_loss_sum(q[1:], e, 1, 2, 2, 1, l2=0.02, in_batch=True).item() == pytest.approx(m1, rel=1e-6)
    assert batch_loss_sum("npair", q, e, torch.arange(4), 0, 2, 2, 1, 0.5, 0.05, 0.02,
                          npair_in_batch=True).item() == pytest.approx(m0 + m1, rel=1e-6)


def test_in_batch_npair_equals_the_broadcast_formula_on_a_random_batch():
    g = torch.Generator().manual_seed(0)
    q, pos, neg = (torch.randn(16, 8, generator=g) for _ in range(3))
    ours = npair_loss_sum(q, torch.cat([pos, neg]), 0, 16, 16, 1, l2=0.02, in_batch=True) / 16
    assert ours.item() == pytest.approx(dim_code_npair(q, pos, neg).item(), rel=1e-5)


def _raw_cfg(**kw) -> DIMConfig:
    base = dict(text_dim=8, image_dim=8, hidden_size=8, output_size=8, num_heads=2, num_layers=0, dropout=0.0,
                residual=False, query_input="raw", sentence_fusion="pooled", use_regions=False, image_fusion="add",
                profile_rows=(), profile_use=(), entity_tower="frozen", use_entity_profile=False,
                caption_constant=True)
    return DIMConfig(**{**base, **kw})


def test_raw_query_is_one_linear_map_of_the_raw_sum_plus_the_caption_constant():
    torch.manual_seed(0)
    model = DIM(_raw_cfg())
    g = torch.Generator().manual_seed(1)
    mv = {"mention": torch.randn(4, 8, generator=g), "context": torch.randn(4, 8, generator=g),
          "image": torch.randn(4, 8, generator=g), "image_mask": torch.tensor([True, False, True, True])}
    assert model.cfg.mention_views() == ("mention", "context", "image")
    const = model.caption_proj(torch.zeros(1, 8))          # LayerNorm(ReLU(b)): the same for every mention
    assert const.abs().sum() > 0
    raw = mv["mention"] + mv["context"] + mv["image"] * mv["image_mask"][:, None] + const
    assert torch.allclose(model.encode_mentions(mv, normalize=False), model.q_out(raw), atol=1e-6)
    without = DIM(_raw_cfg(caption_constant=False))
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("caption_proj")})
    assert torch.allclose(without.encode_mentions(mv, normalize=False), model.q_out(raw - const), atol=1e-6)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"caption_proj", "q_out"}


def test_raw_query_refuses_what_it_cannot_sum():
    with pytest.raises(ValueError, match="hidden size .* must equal the text feature size"):
        _raw_cfg(hidden_size=16)
    with pytest.raises(ValueError, match="--sentence-fusion add|pooled"):
        _raw_cfg(sentence_fusion="attention")
    with pytest.raises(ValueError, match="raw-feature query"):
        DIMConfig(text_dim=8, image_dim=8, caption_constant=True)


def test_context_residual_starts_at_the_context_scorer():
    """The default residual base is a learned mix of the mention and context features that starts at the context
    feature: the untrained model scores cosine(context, description)."""
    cfg = DIMConfig(text_dim=8, image_dim=0, hidden_size=8, output_size=8, num_heads=2, num_layers=0, dropout=0.0,
                    use_image=False, use_regions=False, profile_rows=(), profile_use=(), use_entity_image=False,
                    use_entity_profile=False, residual_base="mix")
    assert cfg.mention_views() == ("mention", "sentence", "context")
    model = DIM(cfg)
    g = torch.Generator().manual_seed(2)
    mv = {"mention": torch.randn(3, 8, generator=g), "context": torch.randn(3, 8, generator=g),
          "sentence": torch.randn(3, 5, 8, generator=g), "sentence_mask": torch.ones(3, 5, dtype=torch.bool)}
    assert torch.allclose(model.encode_mentions(mv), torch.nn.functional.normalize(mv["context"], dim=-1))


def test_context_view_text_is_the_mention_in_its_sentence():
    from data_process.core.records import Mention
    from data_process.encode.features import context_texts

    m = Mention(id="m1", mention="Paris", sentence="Paris Hilton arrives in Cannes.", gold_id="Q1", split="train")
    assert context_texts([m]) == ["Paris (Paris Hilton arrives in Cannes.)"]


def test_dim_code_preset_resolves_to_the_code(tmp_path):
    cfg = parse_args(["--config", str(ROOT / "configs" / "dim_code.yaml")])
    m = cfg.model
    assert (m.query_input, m.sentence_fusion, cfg.loss.npair_negatives, cfg.loss.loss, m.hidden_size,
            m.caption_constant, m.regions, m.entity_tower) == \
        ("raw", "pooled", "batch", "npair", 0, True, False, "frozen")


def conf_text_dim(feat: Path) -> int:
    return json.loads((feat / "meta.json").read_text())["text_dim"]


def test_dim_code_preset_trains_on_the_demo_data(tmp_path):
    _, feat = write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=40, mentions_per_split=(96, 32, 32),
                              seed=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(ROOT / "configs" / "dim_code.yaml"),
           "--features", str(feat), "--output_dir", str(run), "--epochs", "2", "--device", "cpu", "--threads", "1",
           "--no-image"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    conf = json.loads((run / "config.json").read_text())
    mc = conf["model_config"]
    assert (mc["query_input"], mc["sentence_fusion"], mc["hidden_size"], mc["caption_constant"]) == \
        ("raw", "pooled", conf_text_dim(feat), True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "train_loss" in r] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and r["train_s"] > 0 for r in lines if "train_loss" in r)
