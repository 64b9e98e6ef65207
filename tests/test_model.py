"""DIM model: shapes, masking of missing views, zero-init residual start, ablation flags."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nel_model.config import dim_config, parse_train_args
from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.data import load_mel_data
from nel_model.nel import DIM, DIMConfig

B, L, R, K, E, DT, DI = 5, 6, 4, 2, 7, 16, 12


def mention_views(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "mention": torch.randn(b, DT, generator=g).half(),
        "sentence": torch.randn(b, L, DT, generator=g).half(),
        "sentence_mask": torch.arange(L)[None, :] < torch.randint(1, L + 1, (b, 1), generator=g),
        "image": torch.randn(b, DI, generator=g).half(),
        "image_mask": torch.ones(b, dtype=torch.bool),
        "regions": torch.randn(b, R, DI, generator=g).half(),
        "regions_mask": torch.ones(b, R, dtype=torch.bool),
        "profile": torch.randn(b, K, DT, generator=g).half(),
        "profile_mask": torch.ones(b, K, dtype=torch.bool),
    }


def entity_views(seed=1, e=E):
    g = torch.Generator().manual_seed(seed)
    return {"desc": torch.randn(e, DT, generator=g).half(), "image": torch.randn(e, DI, generator=g).half(),
            "image_mask": torch.rand(e, generator=g) > 0.3, "profile": torch.randn(e, DT, generator=g).half(),
            "profile_mask": torch.rand(e, generator=g) > 0.3}


def make(**kw):
    torch.manual_seed(0)
    cfg = DIMConfig(text_dim=DT, image_dim=DI, hidden_size=16, output_size=DT, ff_size=32, num_heads=2,
                    num_layers=1, dropout=0.1, **{"residual_base": "mention", **kw})
    return DIM(cfg).eval()


def perturb_outputs(model):
    """Give the zero-initialised output layers non-zero weights so that every view matters."""
    with torch.no_grad():
        for lin in (model.q_out, model.e_out):
            lin.weight.normal_(0, 0.3)
            lin.bias.normal_(0, 0.1)
    return model


def test_shapes_and_normalisation():
    m = perturb_outputs(make())
    q = m.encode_mentions(mention_views())
    e = m.encode_entities(entity_views())
    assert q.shape == (B, DT) and e.shape == (E, DT)
    assert torch.allclose(q.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(e.norm(dim=-1), torch.ones(E), atol=1e-5)


def test_untrained_model_scores_zero_shot_cosine():
    m = make()
    mv, ev = mention_views(), entity_views()
    for mode in ("eval", "train"):        # dropout before a zero layer changes nothing either
        getattr(m, mode)()
        scores = m.encode_mentions(mv) @ m.encode_entities(ev).T
        zero_shot = F.normalize(mv["mention"].float(), dim=-1) @ F.normalize(ev["desc"].float(), dim=-1).T
        assert torch.allclose(scores, zero_shot, atol=1e-5)


def test_non_residual_when_dims_differ():
    cfg = DIMConfig(text_dim=DT, image_dim=DI, hidden_size=16, output_size=8, ff_size=32, num_heads=2, num_layers=1)
    m = DIM(cfg).eval()
    assert not cfg.is_residual
    assert m.encode_mentions(mention_views()).shape == (B, 8)
    assert m.encode_entities(entity_views()).shape == (E, 8)


@pytest.mark.parametrize("view,flag", [
    ("sentence", {"use_sentence": False}),
    ("image+regions", {"use_image": False, "use_regions": False}),
    ("profile", {"profile_use": (False, False)}),
])
def test_all_masked_view_equals_view_switched_off_and_has_no_nan(view, flag):
    full = perturb_outputs(make())
    off = DIM(replace(full.cfg, **flag)).eval()
    off.load_state_dict({k: v for k, v in full.state_dict().items() if k in off.state_dict()})
    mv = mention_views()
    masked = dict(mv)
    for key in view.split("+"):
        masked[f"{key}_mask"] = torch.zeros_like(mv[f"{key}_mask"])
        masked[key] = torch.full_like(mv[key], 0)
    q_masked = full.encode_mentions(masked)
    assert torch.isfinite(q_masked).all()
    assert torch.allclose(q_masked, off.encode_mentions(mv), atol=1e-5)
    assert not torch.allclose(q_masked, full.encode_mentions(mv), atol=1e-3)   # the view does matter when present


def test_all_masked_view_has_finite_gradients():
    m = perturb_outputs(make()).train()
    mv = mention_views()
    for key in ("sentence", "regions", "profile"):
        mv[f"{key}_mask"] = torch.zeros_like(mv[f"{key}_mask"])
    mv["image_mask"] = torch.zeros_like(mv["image_mask"])
    loss = m.encode_mentions(mv).sum() + m.encode_entities(entity_views()).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_masked_entity_image_is_ignored():
    m = perturb_outputs(make())
    ev = entity_views()
    ev2 = dict(ev)
    ev2["image"] = torch.where(ev["image_mask"][:, None], ev["image"], torch.randn_like(ev["image"].float()).half())
    assert torch.allclose(m.encode_entities(ev), m.encode_entities(ev2), atol=1e-6)


def test_profile_row_flag_masks_only_that_row():
    full = perturb_outputs(make())
    no_cap = DIM(replace(full.cfg, profile_use=(True, False))).eval()
    no_cap.load_state_dict(full.state_dict())
    mv = mention_views()
    changed = dict(mv)
    changed["profile"] = mv["profile"].clone()
    changed["profile"][:, 1] = torch.randn(B, DT).half()      # caption row
    assert torch.allclose(no_cap.encode_mentions(mv), no_cap.encode_mentions(changed), atol=1e-6)
    assert not torch.allclose(full.encode_mentions(mv), full.encode_mentions(changed), atol=1e-4)


def config_from_args(argv, data):
    return dim_config(parse_train_args(argv).model, data)


def test_the_model_config_from_the_typed_config_and_the_cache(tmp_path):
    _, feat = write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=8, mentions_per_split=(8, 4, 4))
    data = load_mel_data(feat)
    base = ["--features", str(feat), "--hidden_size", "16", "--num_heads", "2"]
    cfg = config_from_args(base, data)
    # the default residual base (a mix of mention and context features) reads the pooled context view
    assert cfg.mention_views() == ("mention", "sentence", "context", "image", "regions", "profile")
    assert cfg.entity_views() == ("desc", "image", "profile") and cfg.is_residual and cfg.residual_base == "mix"
    cfg = config_from_args(base + ["--no_image", "--no_caption", "--no_entity_image"], data)
    assert cfg.mention_views() == ("mention", "sentence", "context", "profile")
    assert cfg.profile_use == (True, False) and cfg.entity_views() == ("desc", "profile")
    cfg = config_from_args(base + ["--no_regions", "--no_enrichment", "--no_caption", "--no_sentence"], data)
    assert cfg.mention_views() == ("mention", "image") and cfg.residual_base == "mention"   # no sentence, no context
    m = DIM(cfg)
    assert m.profile_attn is None and m.sentence_attn is None


def test_masked_attention_is_the_multihead_attention_module():
    """The lean attention path computes what nn.MultiheadAttention computes (same weights), rows without a key -> 0."""
    from nel_model.nel import masked_attention

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True).eval()
    q, k = torch.randn(5, 1, 16), torch.randn(5, 7, 16)
    mask = torch.rand(5, 7) < 0.6
    mask[0] = True
    mask[3] = False                                       # no key at all
    ours = masked_attention(attn, q, k, mask)
    ref, _ = attn(q, k, k, key_padding_mask=~mask, need_weights=False)
    keep = mask.any(1)
    assert torch.allclose(ours[keep], ref[keep][:, 0], atol=1e-5)
    assert torch.equal(ours[3], torch.zeros(16))
    attn.train()                                          # attention dropout is active in training
    torch.manual_seed(1)
    a = masked_attention(attn, q, k, mask)
    torch.manual_seed(2)
    assert not torch.allclose(a[keep], masked_attention(attn, q, k, mask)[keep])
