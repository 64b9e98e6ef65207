"""Vision-language encoders beyond CLIP: SigLIP / SigLIP 2 and any AutoModel with get_text_features /
get_image_features. Pooled features are the model's own, region grids come from SigLIP's own pooling head, text
limits come from the model's config, and a model without patch features refuses --regions grid clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_process.encode.encoders import ImageEncoder, TextEncoder, load_encoders
from data_process.encode.feature_store import FeatureStore
from data_process.encode.towers import RegionsUnavailable, grid_bins
from data_process.fixtures.tiny_models.clip import build_tokenizer, save_tiny_clip, tiny_clip_config
from data_process.fixtures.tiny_models.siglip import save_tiny_siglip

LONG = "Varkona is a river in Norvia about 980 km long " * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vl")
    return {"siglip": save_tiny_siglip(root / "siglip", image_size=32),
            "siglip2": save_tiny_siglip(root / "siglip2", image_size=32, version=2),
            "clip": save_tiny_clip(root / "clip", image_size=32),
            "generic": save_tiny_metaclip2(root / "metaclip2")}


def save_tiny_metaclip2(out: Path) -> Path:
    """A CLIP-style model that is not CLIPModel (MetaClip2Model): the generic get_*_features path."""
    from transformers import MetaClip2Config, MetaClip2Model
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from data_process.fixtures.synthetic import vocabulary_corpus

    tok = build_tokenizer(vocabulary_corpus())
    c = tiny_clip_config(len(tok), image_size=32)
    torch.manual_seed(0)
    MetaClip2Model(MetaClip2Config(text_config=c.text_config.to_dict(), vision_config=c.vision_config.to_dict(),
                                   projection_dim=64)).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
            Image.new("RGB", (24, 48), (0, 0, 255))]


def test_tiny_siglip_loads_with_auto_classes_and_is_deterministic(models, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

    for name, cls in (("siglip", "SiglipModel"), ("siglip2", "Siglip2Model")):
        path = str(models[name])
        assert type(AutoModel.from_pretrained(path)).__name__ == cls
        assert type(AutoProcessor.from_pretrained(path)).__name__ == cls.replace("Model", "Processor")
        AutoTokenizer.from_pretrained(path)
        AutoImageProcessor.from_pretrained(path)
    again = save_tiny_siglip(tmp_path / "again", image_size=32)
    assert (again / "model.safetensors").read_bytes() == (models["siglip"] / "model.safetensors").read_bytes()


def test_siglip_text_features_are_the_models_own_padded_to_its_length(models):
    enc = TextEncoder(str(models["siglip"]), "cpu", max_len=12)
    assert enc.towers.family == "siglip" and enc.dim == 64 and enc.limit == enc.text_max_len == 64
    texts = ["a river", LONG]
    feats = enc.encode(texts)
    assert feats.tokens.shape == (2, 12, 64) and feats.mask[1].all() and feats.mask[0].sum() < 12
    assert not feats.tokens[0][~feats.mask[0]].any()
    tok = enc.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        ref = enc.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    np.testing.assert_allclose(enc.encode_pooled(texts), ref.pooler_output.numpy(), atol=1e-5)
    # the sentence view keeps max_len; pooled views see the whole text up to the model's 64 positions
    assert np.abs(enc.encode_pooled([LONG]) - feats.pooled[1]).max() > 1e-3
    with pytest.raises(ValueError, match=r"--text_max_len 65 must be in \[2, 64\]"):
        TextEncoder(str(models["siglip"]), "cpu", text_max_len=65)


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_siglip_image_features_and_regions_from_its_pooling_head(models, name):
    enc = ImageEncoder(str(models[name]), "cpu", region_grid=2)
    proc = enc.preprocess.processor
    imgs = _images()
    glob, regions = enc.encode_images(imgs)
    assert glob.shape == (2, 64) and regions.shape == (2, 4, 64)
    with torch.inference_mode():
        ref = enc.model.get_image_features(**proc(images=imgs, return_tensors="pt")).pooler_output.numpy()
    np.testing.assert_allclose(glob, ref, atol=1e-5)
    # the head over one cell holding every patch is the pooled image feature itself
    one = ImageEncoder(str(models[name]), "cpu", region_grid=1, clip_model=enc.model)
    g1, r1 = one.encode_images(imgs)
    np.testing.assert_allclose(r1[:, 0], g1, atol=1e-5)
    assert np.abs(regions[0, 0] - regions[0, 3]).max() > 1e-3  # cells of a noisy image differ


def test_grid_bins_match_adaptive_pooling():
    assert grid_bins(4, 2) == [(0, 2), (2, 4)]
    assert grid_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    x = torch.arange(7.0).reshape(1, 1, 7)
    pooled = torch.nn.functional.adaptive_avg_pool1d(x, 3)[0, 0].tolist()
    assert pooled == [float(np.mean(range(a, b))) for a, b in grid_bins(7, 3)]


def test_generic_vision_language_model_pooled_features_and_no_grid(models):
    path = str(models["generic"])
    with pytest.raises(RegionsUnavailable, match="MetaClip2Model gives no patch features in its image embedding space"
                                                 ".*use --regions detector .* or --regions file"):
        load_encoders(path, device="cpu", region_grid=3)
    text_enc, image_enc = load_encoders(path, device="cpu", max_len=12, region_grid=None)
    assert text_enc.towers.family == "generic" and (text_enc.dim, image_enc.dim, text_enc.limit) == (64, 64, 77)
    feats = text_enc.encode(["a river in Norvia"])
    tok = text_enc.tokenizer(["a river in Norvia"], return_tensors="pt")
    with torch.inference_mode():
        out = text_enc.model.get_text_features(**tok)
        tokens = text_enc.model.text_projection(out.last_hidden_state)
    np.testing.assert_allclose(feats.pooled, out.pooler_output.numpy(), atol=1e-5)
    n = int(feats.mask[0].sum())
    np.testing.assert_allclose(feats.tokens[0, :n], tokens[0].numpy(), atol=1e-5)
    glob, regions = image_enc.encode_images(_images())
    assert glob.shape == (2, 64) and regions.shape == (2, 0, 64)


def test_clip_pooled_views_use_the_models_own_length_not_max_len(models):
    enc = TextEncoder(str(models["clip"]), "cpu", max_len=12)
    assert enc.text_max_len == 77
    short = enc.encode(["a river"])
    np.testing.assert_allclose(enc.encode_pooled(["a river"]), short.pooled, atol=1e-6)  # fits: the same numbers
    assert np.abs(enc.encode_pooled([LONG]) - enc.encode([LONG]).pooled).max() > 1e-3
    cut = TextEncoder(str(models["clip"]), "cpu", max_len=12, text_max_len=12, clip_model=enc.model)
    np.testing.assert_allclose(cut.encode_pooled([LONG]), enc.encode([LONG]).pooled, atol=1e-6)


def test_a_tiny_siglip_encodes_the_demo_end_to_end(models, tmp_path):
    from data_process.encode import features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from nel_model.train import main as train_main

    data = generate(tmp_path / "data", SyntheticConfig(entities=16, mentions=48, seed=2, image_size=32),
                    progress=False)
    out = tmp_path / "feat"
    assert features.main(["--data", str(data), "--out", str(out), "--clip", str(models["siglip"]), "--max_len", "12",
                          "--region_grid", "2", "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]) == 0
    store = FeatureStore(out)
    meta = store.meta()
    assert (meta["text_dim"], meta["image_dim"], meta["max_len"], meta["text_max_len"]) == (64, 64, 12, 64)
    assert meta["regions"] == {"mode": "grid", "grid": 2}
    assert len(store.views()) == 9 and store.load("mention", "regions").data.shape[1:] == (4, 64)
    assert np.abs(np.asarray(store.load("entity", "desc").data, np.float32)).sum(1).min() > 0
    res = train_main(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"),
                      "--features", str(out), "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                      "--device", "cpu", "--threads", "1"])
    assert res["protocols"]["full_kb"]["test"]["n"] > 0
