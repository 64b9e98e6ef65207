"""Image regions from a boxes file or an object detector: box checks and key rules, crops encoded like whole images,
masks for missing regions, detections cached, provenance in meta.json, and the signal a region view carries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_process.core.records import DataError, Mention, load_dataset
from data_process.encode import detector as detector_mod
from data_process.encode import features
from data_process.encode.boxes_file import Box, read_boxes_file
from data_process.encode.encoders import ImageEncoder
from data_process.encode.feature_store import FeatureStore
from data_process.encode.features import FeatureSettings, build_features, encode_mention_views, load_encoders_from_meta
from data_process.encode.regions import PrepareCrops, RegionSettings, clip_box, select_boxes
from data_process.fixtures.synthetic import SyntheticConfig, generate
from data_process.fixtures.tiny_models.clip import save_tiny_clip
from data_process.fixtures.tiny_models.detector import save_tiny_detector

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    data = generate(root / "data", SyntheticConfig(entities=16, mentions=40, seed=1, image_size=32), progress=False)
    return {"data": data, "clip": save_tiny_clip(root / "clip", image_size=32),
            "detector": save_tiny_detector(root / "detector")}


def _mention(mid: str, image: str | None) -> Mention:
    return Mention(id=mid, sentence=f"{mid} here", mention=mid, gold_id="E0", split="train", image=image)


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------
# The boxes file


def test_boxes_file_keys_most_specific_wins(tmp_path):
    ms = [_mention("m1", "images/a/1.jpg"), _mention("m2", "images/a/1.jpg"), _mention("m3", "images/b/2.jpg"),
          _mention("m4", None), _mention("m5", "images/b/5.png")]
    path = _write(tmp_path / "boxes.jsonl",
                  json.dumps({"images/a/1.jpg": [[0, 0, 10, 10, 0.9, "person"]]}),
                  "",
                  json.dumps({"m2": [[1, 1, 5, 5, 0.5, 3]], "2.jpg": [[2, 2, 8, 8, 0.7, 1.0]]}),
                  json.dumps({"5.png": []}))
    got = read_boxes_file(path, ms)
    assert got.rows[0] == [Box(0, 0, 10, 10, 0.9, "person")]  # by image path
    assert got.rows[1] == [Box(1, 1, 5, 5, 0.5, "3")]  # its own id beats the shared image path
    assert got.rows[2] == [Box(2, 2, 8, 8, 0.7, "1")]  # by file name; numeric labels become strings
    assert got.rows[4] == [] and 3 not in got.rows
    assert got.keys == {"mention id": 1, "image path": 1, "file name": 2}
    assert got.boxes_per_row(5)[3] == []


@pytest.mark.parametrize("line,where,message", [
    ("not json", "line 1", "not valid JSON"),
    ("[1, 2]", "line 1", "expected an object"),
    ('{"nobody.jpg": []}', "line 1, key 'nobody.jpg'", "names no mention id, mention image path or image file name"),
    ('{"m4": []}', "line 1, key 'm4'", "this mention has no image to crop"),
    ('{"x.jpg": []}', "line 1, key 'x.jpg'", "file name of 2 different mention images"),
    ('{"m1": {"x0": 1}}', "line 1, key 'm1'", "expected a list of boxes, got dict"),
    ('{"m1": [[0, 0, 4, 4, 1, "a"], [0, 0, 4, 4, 1]]}', "line 1, key 'm1', box 2", "(6 values), got 5 values"),
    ('{"m1": [[0, 0, 4, 4, 1, "a"], [0, 0, "4", 4, 1, "a"]]}', "line 1, key 'm1', box 2, field 'x1'",
     "expected a finite number, got '4'"),
    ('{"m1": [[0, 0, 4, 4, NaN, "a"]]}', "line 1, key 'm1', box 1, field 'score'", "expected a finite number"),
    ('{"m1": [[0, 0, 4, 4, true, "a"]]}', "line 1, key 'm1', box 1, field 'score'", "got True"),
    ('{"m1": [[5, 0, 4, 4, 1, "a"]]}', "line 1, key 'm1', box 1, field 'x1'", "x1 (4) must be greater than x0 (5)"),
    ('{"m1": [[0, 4, 4, 4, 1, "a"]]}', "line 1, key 'm1', box 1, field 'y1'", "y1 (4) must be greater than y0 (4)"),
    ('{"m1": [[0, 0, 4, 4, 1, null]]}', "line 1, key 'm1', box 1, field 'label'", "a string or a number"),
])
def test_boxes_file_errors_name_file_line_key_box_and_field(tmp_path, line, where, message):
    ms = [_mention("m1", "images/a/x.jpg"), _mention("m2", "images/b/x.jpg"), _mention("m4", None)]
    path = _write(tmp_path / "boxes.jsonl", line)
    with pytest.raises(DataError) as err:
        read_boxes_file(path, ms)
    assert str(err.value).startswith(f"{path}, {where}")
    assert message in str(err.value)


def test_boxes_file_duplicate_key_and_missing_file(tmp_path):
    ms = [_mention("m1", "images/1.jpg")]
    path = _write(tmp_path / "b.jsonl", '{"m1": []}', '{"1.jpg": []}', '{"m1": []}')
    with pytest.raises(DataError, match=r"b.jsonl, line 3, key 'm1': key given twice \(first on line 1\)"):
        read_boxes_file(path, ms)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: boxes file not found"):
        read_boxes_file(tmp_path / "nope.jsonl", ms)


def test_clip_select_and_crop():
    assert clip_box(Box(-3.5, 2.2, 9.1, 50, 1, "a"), 10, 20) == ((0, 2, 10, 20), True)
    assert clip_box(Box(1, 1, 4, 4, 1, "a"), 10, 20) == ((1, 1, 4, 4), False)
    assert clip_box(Box(12, 1, 14, 4, 1, "a"), 10, 20) == (None, True)  # wholly outside: dropped
    boxes = [Box(0, 0, 1, 1, 0.2, "car"), Box(0, 0, 2, 2, 0.9, "person"), Box(0, 0, 3, 3, 0.9, "car")]
    assert select_boxes(boxes) == [boxes[1], boxes[2], boxes[0]]  # by score, ties in file order
    assert select_boxes(boxes, labels=["car"], score=0.5) == [boxes[2]]
    img = Image.new("RGB", (10, 20))
    prep = PrepareCrops(preprocess=lambda im: im.size, max_regions=2)
    out = prep(img, [Box(20, 0, 30, 5, 1, "a"), Box(-1, 0, 4, 5, 1, "a"), Box(2, 2, 4, 4, 1, "a"),
                     Box(1, 1, 3, 3, 1, "a")])
    assert out.image == (10, 20) and out.crops == [(4, 5), (2, 2)]  # K=2 usable boxes, in order
    assert (out.clipped, out.dropped) == (1, 1)


def test_region_settings_need_their_source():
    with pytest.raises(ValueError, match="--regions detector needs --detector"):
        RegionSettings(mode="detector")
    with pytest.raises(ValueError, match="--regions file needs --boxes FILE"):
        RegionSettings(mode="file")
    with pytest.raises(ValueError, match="--regions must be one of grid, detector, file"):
        RegionSettings(mode="sam")
    assert RegionSettings(mode="detector", detector="d").threshold == 0.5
    assert RegionSettings(mode="file", boxes="b").threshold is None


# ---------------------------------------------------------------------------------------------
# --regions file


def _boxes_for(data: Path, tmp_path: Path) -> Path:
    """Boxes for each mention image (32 px): a central crop, a corner crop, and one reaching outside the image;
    every fifth image by file name, the rest by image path, one by mention id with no boxes."""
    ds = load_dataset(data)
    lines = []
    with_image = [m for m in ds.mentions if m.image]
    for i, m in enumerate(with_image):
        key = Path(m.image).name if i % 5 == 0 else m.image
        boxes = [[4, 4, 28, 28, 0.9, "thing"], [0, 0, 16, 16, 0.5, "corner"], [20, 20, 40, 40, 0.7, "thing"]]
        lines.append(json.dumps({key: boxes}))
    lines.append(json.dumps({with_image[-1].id: []}))
    return _write(tmp_path / "boxes.jsonl", *lines)


def test_file_regions_crops_masks_provenance_and_rerun(assets, tmp_path):
    data, clip = assets["data"], assets["clip"]
    boxes = _boxes_for(data, tmp_path)
    out = tmp_path / "f"
    args = ["--data", str(data), "--out", str(out), "--clip", str(clip), "--max_len", "12", "--batch_size", "16",
            "--num_workers", "0", "--device", "cpu", "--regions", "file", "--boxes", str(boxes), "--max_regions",
            "4"]
    assert features.main(args) == 0
    store = FeatureStore(out)
    ds = load_dataset(data)
    meta = store.meta()
    from data_process.core.fingerprints import file_sha256

    assert meta["regions"] == {"mode": "file", "max_regions": 4, "score": None, "labels": [], "boxes": str(boxes),
                               "boxes_sha256": file_sha256(boxes)}
    view = meta["views"]["mention.regions"]
    assert view["regions"] == meta["regions"] and view["boxes_file_keys"]["mention id"] == 1
    has_img = np.array([m.image is not None for m in ds.mentions])
    n_img = int(has_img.sum())
    assert view["boxes"] == {"boxes_kept": 3 * (n_img - 1), "clipped": n_img - 1, "dropped": 0,
                             "images_without_boxes": 1, "rows_counted": len(ds.mentions),
                             "regions_per_image": [int((~has_img).sum()) + 1, 0, 0, n_img - 1, 0]}
    reg = store.load("mention", "regions")
    assert reg.data.shape == (len(ds.mentions), 4, 64) and reg.mask.shape == (len(ds.mentions), 4)
    assert not reg.mask[:, 3].any() and not np.asarray(reg.data[:, 3]).any()  # K=4 > 3 boxes: zero rows, mask False
    assert not np.asarray(reg.data[~reg.mask]).any()
    assert (store.load("mention", "image").mask == has_img).all()  # the whole image stays a view
    # a crop is encoded exactly as the cropped picture would be
    enc = ImageEncoder(str(clip), "cpu", region_grid=None)
    m = next(i for i, mm in enumerate(ds.mentions) if mm.image and mm.id != ds.mentions[-1].id)
    with Image.open(ds.image_path(ds.mentions[m].image)) as im:
        rgb = im.convert("RGB")
    direct = enc.encode_images([rgb.crop((4, 4, 28, 28)), rgb.crop((20, 20, 32, 32)), rgb.crop((0, 0, 16, 16))])[0]
    np.testing.assert_allclose(np.asarray(reg.data[m, :3], np.float32), direct, atol=2e-2)  # score order
    # rerun: nothing to do; another K: only the regions view
    again = build_features(data, out, FeatureSettings(clip=str(clip), max_len=12, regions=RegionSettings(
        mode="file", boxes=str(boxes), max_regions=4)), num_workers=0, device="cpu", progress=False)
    assert again["written"] == []
    fewer = build_features(data, out, FeatureSettings(clip=str(clip), max_len=12, regions=RegionSettings(
        mode="file", boxes=str(boxes), max_regions=2, labels=("thing",))), num_workers=0, device="cpu",
        progress=False)
    assert fewer["written"] == ["mention.regions"]
    reg2 = store.load("mention", "regions")
    assert reg2.data.shape[1] == 2 and int(reg2.mask.sum()) == 2 * (n_img - 1)
    np.testing.assert_array_equal(reg2.data[m, :2], reg.data[m, :2])  # the two "thing" boxes are the top two
    # predict-side encoding of new mentions: a boxes file has no boxes for them (masked regions)
    text_enc, image_enc, settings = load_encoders_from_meta(store.meta(), device="cpu")
    assert settings.regions.mode == "file" and settings.regions.max_regions == 2 and image_enc.region_grid is None
    views = encode_mention_views(ds.mentions[:3], data, text_enc, image_enc, settings)
    assert views["regions"][0].shape == (3, 2, 64) and not views["regions"][1].any()
    np.testing.assert_allclose(views["image"][0], np.asarray(store.load("mention", "image").data[:3], np.float32),
                               atol=2e-2)


def test_regions_of_a_boxes_file_carry_the_signal(tmp_path):
    """Mention phrase + regions (crops from a boxes file) beats the mention phrase alone: the phrase names only the
    family; the crops show which member. The boxes hold the middle of each mention picture, where the synthetic
    entity is drawn (a shifted, scaled copy of the gold entity's picture), and its top-left quarter."""
    from nel_model.train import main as train_main

    size = 32
    data = generate(tmp_path / "data", SyntheticConfig(entities=80, mentions=600, seed=5, image_size=size),
                    progress=False)
    clip = save_tiny_clip(tmp_path / "clip", image_size=32)
    lines = [json.dumps({m.image: [[0.15 * size, 0.15 * size, 0.85 * size, 0.85 * size, 0.9, "entity"],
                                   [0, 0, size / 2, size / 2, 0.5, "corner"]]})
             for m in load_dataset(data).mentions if m.image]
    boxes = _write(tmp_path / "boxes.jsonl", *lines)
    build_features(data, tmp_path / "feat", FeatureSettings(clip=str(clip), max_len=16, regions=RegionSettings(
        mode="file", boxes=str(boxes), max_regions=2)), num_workers=0, device="cpu", progress=False)
    only = ["--no_sentence", "--no_caption", "--no_enrichment", "--no_global_image", "--no_entity_image",
            "--no_entity_profile"]

    def train(name: str, *flags: str) -> dict:
        res = train_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), "--features", str(tmp_path / "feat"),
                          "--output_dir", str(tmp_path / name), "--seed", "3", "--device", "cpu", "--threads", "1",
                          "--epochs", "30", *only, *flags])
        return res["protocols"]["full_kb"]["test"]

    with_regions, without = train("regions"), train("phrase", "--no_regions")
    assert with_regions["n"] == without["n"] > 80
    assert with_regions["mrr"] > without["mrr"] + 0.1, (with_regions, without)  # measured: 0.692 vs 0.516
    assert with_regions["hits@1"] > without["hits@1"] + 0.15  # measured: 0.495 vs 0.234


# ---------------------------------------------------------------------------------------------
# --regions detector


def test_detector_regions_are_cached_and_the_demo_trains(assets, tmp_path, monkeypatch):
    from nel_model.train import main as train_main

    data, clip, det = assets["data"], assets["clip"], assets["detector"]
    out = tmp_path / "f"
    args = ["--data", str(data), "--out", str(out), "--clip", str(clip), "--max_len", "12", "--batch_size", "16",
            "--num_workers", "0", "--device", "cpu", "--regions", "detector", "--detector", str(det),
            "--max_regions", "3", "--region_score", "0.2", "--detector_batch_size", "4"]
    assert features.main(args) == 0
    store = FeatureStore(out)
    ds = load_dataset(data)
    meta = store.meta()
    assert meta["regions"] == {"mode": "detector", "max_regions": 3, "score": 0.2, "labels": [],
                               "detector": str(det)}
    n_img = sum(m.image is not None for m in ds.mentions)
    view = meta["views"]["mention.regions"]
    assert view["detections"] == {"detected": n_img, "cached": 0, "unreadable": 0}
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    assert len(lines) == n_img and all(rec["detector"] == str(det) for rec in lines)
    for rec in lines:
        w, h = rec["size"]
        scores = [b[4] for b in rec["boxes"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0.2 for s in scores)
        assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in rec["boxes"])
    reg = store.load("mention", "regions")
    assert reg.data.shape == (len(ds.mentions), 3, 64)
    kept = np.array([min(3, len(b["boxes"])) for b in lines])
    assert sorted(reg.mask.sum(1)[[m.image is not None for m in ds.mentions]]) == sorted(kept)
    assert not np.asarray(reg.data[~reg.mask]).any()

    def no_detector(*a, **k):
        raise AssertionError("every detection is cached: the detector must not be loaded")

    monkeypatch.setattr(detector_mod, "Detector", no_detector)
    summary = build_features(data, out, FeatureSettings(clip=str(clip), max_len=12, regions=RegionSettings(
        mode="detector", detector=str(det), max_regions=2, score=0.2)), num_workers=0, device="cpu", progress=False)
    assert summary["written"] == ["mention.regions"] and summary["regions"]["detections"]["cached"] == n_img
    assert len((out / "detections.jsonl").read_text().splitlines()) == n_img  # nothing appended
    res = train_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), "--features", str(out), "--output_dir",
                      str(tmp_path / "run"), "--epochs", "1", "--device", "cpu", "--threads", "1"])
    assert res["protocols"]["full_kb"]["test"]["n"] > 0


def test_detector_labels_are_checked_and_filter(assets, tmp_path):
    from data_process.encode.detector import Detector

    with pytest.raises(ValueError, match=r"--region_labels cat: not a class of .*id2label: car, dog, person"):
        Detector(str(assets["detector"]), "cpu", labels=("person", "cat"))
    det = Detector(str(assets["detector"]), "cpu", score=0.0, labels=("car",))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    everything = Detector(str(assets["detector"]), "cpu", score=0.0).detect([det.preprocess(img)])[0]
    cars = det.detect([det.preprocess(img)])[0]
    assert len(everything) == 12 and cars == [b for b in everything if b.label == "car"]


def test_other_detector_families_yolos_and_owlv2(tmp_path):
    """YOLOS (no pixel mask) and OWLv2 (open vocabulary: the labels are its text queries) through the same path."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor, YolosConfig, YolosForObjectDetection
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.yolos.image_processing_pil_yolos import YolosImageProcessorPil

    from data_process.encode.detector import Detector
    from data_process.fixtures.synthetic import vocabulary_corpus
    from data_process.fixtures.tiny_models.clip import build_tokenizer

    torch.manual_seed(0)
    yolos = tmp_path / "yolos"
    YolosForObjectDetection(YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=[64, 64], patch_size=16,
                                        num_detection_tokens=5, id2label={0: "person", 1: "car"},
                                        label2id={"person": 0, "car": 1})).save_pretrained(yolos)
    YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(yolos)
    owl = tmp_path / "owlv2"
    tok = build_tokenizer(vocabulary_corpus())
    cfg = Owlv2Config(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=16, pad_token_id=0,
                                       bos_token_id=2, eos_token_id=3),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=64, patch_size=16), projection_dim=32)
    owl_model = Owlv2ForObjectDetection(cfg)
    with torch.no_grad():  # random box offsets saturate; without them OWL's boxes are its patch-grid priors
        owl_model.box_head.dense2.weight.zero_()
        owl_model.box_head.dense2.bias.zero_()
    owl_model.save_pretrained(owl)
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
                   tokenizer=tok).save_pretrained(owl)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (80, 40, 3), dtype=np.uint8))]
    with pytest.raises(ValueError, match="an open-vocabulary detector \\(owlv2\\) needs --region_labels"):
        Detector(str(owl), "cpu")
    for path, labels in ((yolos, ()), (owl, ("person", "river"))):
        det = Detector(str(path), "cpu", score=0.0, labels=labels)
        assert det.takes_mask is False
        found = det.detect([det.preprocess(im) for im in imgs])
        assert len(found) == 2 and sum(map(len, found)) > 0
        for im, boxes in zip(imgs, found):
            w, h = im.size
            assert all(0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h for b in boxes)
            assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
            assert {b.label for b in boxes} <= set(labels or ("person", "car"))


def test_detector_regions_for_new_mentions_match_the_cache(assets, tmp_path):
    data, clip, det = assets["data"], assets["clip"], assets["detector"]
    out = tmp_path / "f"
    settings = FeatureSettings(clip=str(clip), max_len=12, regions=RegionSettings(
        mode="detector", detector=str(det), max_regions=3, score=0.2))
    build_features(data, out, settings, num_workers=0, device="cpu", progress=False)
    store = FeatureStore(out)
    text_enc, image_enc, loaded = load_encoders_from_meta(store.meta(), device="cpu")
    assert loaded.regions == settings.regions and loaded.text_max_len == 77
    ds = load_dataset(data)
    picks = ds.mentions[:4]
    views = encode_mention_views(picks, data, text_enc, image_enc, loaded)
    np.testing.assert_allclose(views["regions"][0], np.asarray(store.load("mention", "regions").data[:4], np.float32),
                               atol=2e-2)
    np.testing.assert_array_equal(views["regions"][1], store.load("mention", "regions").mask[:4])
    with pytest.raises(ValueError, match="do not match the encoders"):
        encode_mention_views(picks, data, text_enc, image_enc, replace(loaded, regions=RegionSettings()))


def test_killed_crop_regions_resume_to_identical_arrays(assets, tmp_path, monkeypatch):
    from data_process.encode.feature_store import ViewWriter

    data, clip = assets["data"], assets["clip"]
    boxes = _boxes_for(data, tmp_path)
    settings = FeatureSettings(clip=str(clip), max_len=12, regions=RegionSettings(mode="file", boxes=str(boxes),
                                                                                  max_regions=3))
    clean = tmp_path / "clean"
    build_features(data, clean, settings, batch_size=16, num_workers=0, device="cpu", progress=False)
    real_write = ViewWriter.write
    calls = {"n": 0}

    def dying_write(self, start, rows, mask=None):
        if self.name == "mention.regions":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
        return real_write(self, start, rows, mask)

    out = tmp_path / "killed"
    monkeypatch.setattr(ViewWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_features(data, out, settings, batch_size=16, num_workers=0, device="cpu", progress=False)
    monkeypatch.setattr(ViewWriter, "write", real_write)
    summary = build_features(data, out, settings, batch_size=16, num_workers=0, device="cpu", progress=False)
    assert sorted(summary["written"]) == ["entity.image", "mention.image", "mention.regions"]  # text views kept
    for name in ("mention.regions.npy", "mention.regions.mask.npy", "mention.image.npy", "mention.image.mask.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(clean / name), err_msg=name)
    meta, ref = FeatureStore(out).meta(), FeatureStore(clean).meta()
    assert meta["views"]["mention.regions"]["boxes"]["rows_counted"] == len(load_dataset(data).mentions) - 16
    assert meta["views"]["mention.regions"]["images"] == ref["views"]["mention.regions"]["images"]
    assert (meta["views"]["mention.regions"]["boxes"]["regions_per_image"]
            == ref["views"]["mention.regions"]["boxes"]["regions_per_image"])
