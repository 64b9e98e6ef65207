"""Precomputed features from a release (--import): DIM's HDF5 layout and plain arrays land in the feature cache
in the dataset's row order, train, are skipped on a rerun, and bad files give errors naming the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_process.core.records import DataError, load_dataset
from data_process.encode import features
from data_process.encode.feature_store import FeatureStore
from data_process.encode.features import build_features
from data_process.encode.precomputed import ImportSpec
from data_process.fixtures.synthetic import SyntheticConfig, generate
from data_process.fixtures.tiny_models.clip import save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
DIM = 64  # the tiny CLIP's text and image dimension


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    data = generate(root / "data", SyntheticConfig(entities=16, mentions=48, seed=4, image_size=32), progress=False)
    return {"data": data, "clip": save_tiny_clip(root / "clip", image_size=32), "root": root}


def _dim_release(folder: Path, ids: list[str], dim: int = DIM, seed: int = 0, name: str = "gt_feats_brief.h5"):
    """DIM's layout: gt_feats_<type>.h5 with a `features` dataset, rows in qids_ordered.json order (here a
    shuffled order, not the dataset's)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    feats = rng.standard_normal((len(ids), dim)).astype(np.float32)
    with h5py.File(folder / name, "w") as f:
        f.create_dataset("features", data=feats)
    (folder / "qids_ordered.json").write_text(json.dumps(order))
    return folder / name, folder / "qids_ordered.json", order, feats


def _train(features_dir: Path, out: Path) -> dict:
    from nel_model.train import main as train_main

    return train_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), "--features", str(features_dir),
                       "--output_dir", str(out), "--epochs", "1", "--device", "cpu", "--threads", "1"])


def test_dim_hdf5_entity_features_import_train_and_rerun(assets, tmp_path):
    data, clip = assets["data"], assets["clip"]
    ds = load_dataset(data)
    e_ids = [e.id for e in ds.entities]
    h5, qids, order, feats = _dim_release(tmp_path / "release", e_ids)
    out = tmp_path / "feat"
    args = ["--data", str(data), "--out", str(out), "--clip", str(clip), "--max_len", "12", "--num_workers", "0",
            "--device", "cpu", "--import", f"entity.desc={h5}", "--import_ids", str(qids)]
    assert features.main(args) == 0
    store = FeatureStore(out)
    desc = np.asarray(store.load("entity", "desc").data, np.float32)
    want = feats[[order.index(e) for e in e_ids]]
    np.testing.assert_allclose(desc, want, rtol=1e-3, atol=1e-3)  # the dataset's row order, float16
    meta = store.meta()
    src = meta["views"]["entity.desc"]["imported"]
    assert (src["file"], src["ids"], src["key"], src["rows_in_file"], src["missing"]) == (str(h5), str(qids),
                                                                                         "features", 16, 0)
    assert len(store.views()) == 9 and meta["text_dim"] == DIM
    res = _train(out, tmp_path / "run")
    assert res["protocols"]["full_kb"]["test"]["n"] > 0
    again = build_features(data, out, features.FeatureSettings(clip=str(clip), max_len=12), num_workers=0,
                           device="cpu", progress=False, imports=[ImportSpec.parse(f"entity.desc={h5}", qids)])
    assert again["written"] == [] and again["imported"] == [] and "entity.desc" in again["skipped"]


def test_import_only_cache_from_release_files_trains(assets, tmp_path):
    """No encoder at all: the mention phrase from a mention-side .h5 (by mention id), entity descriptions from
    DIM's gt_feats file and entity images from a .npz by entity id (entities without an image row: masked)."""
    ds = load_dataset(assets["data"])
    m_ids, e_ids = [m.id for m in ds.mentions], [e.id for e in ds.entities]
    h5, qids, _, _ = _dim_release(tmp_path / "release", e_ids, seed=1)
    with h5py.File(tmp_path / "mention_feats.h5", "w") as f:
        f.create_dataset("features", data=np.random.default_rng(2).standard_normal((len(m_ids), DIM)))
        f.create_dataset("ids", data=np.array(m_ids, dtype="S"))
    with_img = [e.id for e in ds.entities][:-3]
    np.savez(tmp_path / "entity_images.npz", features=np.ones((len(with_img), 32), np.float32),
             ids=np.array(with_img))
    out = tmp_path / "feat"
    assert features.main(["--data", str(assets["data"]), "--out", str(out),
                          "--import", f"entity.desc={h5},ids={qids}",
                          "--import", f"mention.mention={tmp_path / 'mention_feats.h5'}",
                          "--import", f"entity.image={tmp_path / 'entity_images.npz'}"]) == 0
    store = FeatureStore(out)
    meta = store.meta()
    assert store.views() == ["entity.desc", "entity.image", "mention.mention"]
    assert (meta["text_dim"], meta["image_dim"]) == (DIM, 32) and "text_encoder" not in meta
    img = store.load("entity", "image")
    assert img.mask.tolist() == [e in with_img for e in e_ids] and not np.asarray(img.data[~img.mask]).any()
    assert meta["views"]["entity.image"]["imported"]["missing"] == 3
    assert meta["views"]["entity.image"]["imported"]["missing_first"] == e_ids[-3:]
    assert _train(out, tmp_path / "run")["protocols"]["full_kb"]["test"]["n"] > 0


def test_wrong_dimension_and_unknown_id_are_clear_errors(assets, tmp_path):
    data, clip = assets["data"], assets["clip"]
    e_ids = [e.id for e in load_dataset(data).entities]
    settings = features.FeatureSettings(clip=str(clip), max_len=12)
    h5, qids, _, _ = _dim_release(tmp_path / "small", e_ids, dim=32)
    out = tmp_path / "feat"
    with pytest.raises(DataError) as err:
        build_features(data, out, settings, num_workers=0, device="cpu", progress=False,
                       imports=[ImportSpec.parse(f"entity.desc={h5},ids={qids}")])
    assert str(err.value) == (f"{h5}, top level, field 'features': features of dimension 32, but the cache's text "
                              f"views have dimension 64 (the text encoder {clip})")
    assert not (out / "entity.desc.npy").exists() and not list(out.glob("*.npy"))  # checked before any writing
    h5, qids, order, _ = _dim_release(tmp_path / "unknown", e_ids)
    order[3] = "Q999"
    qids.write_text(json.dumps(order))
    with pytest.raises(DataError, match=rf"{qids}, row 3: id 'Q999' is not an entity id of the dataset "
                                        rf"\(features: {h5}\)"):
        build_features(data, out, settings, num_workers=0, device="cpu", progress=False,
                       imports=[ImportSpec.parse(f"entity.desc={h5},ids={qids}")])
    # an import-only run into an encoded cache checks against meta.json's dimension
    build_features(data, out, settings, num_workers=0, device="cpu", progress=False)
    h5, qids, _, _ = _dim_release(tmp_path / "small2", e_ids, dim=32, name="gt_feats_image.h5")
    with pytest.raises(DataError, match=r"dimension 32, but the cache's image views have dimension 64 \(meta.json "
                                        r"image_dim, views mention.image, mention.regions\)"):
        build_features(data, out, None, progress=False, imports=[ImportSpec.parse(f"entity.image={h5},ids={qids}")])


@pytest.mark.parametrize("case,message", [
    ("missing", r"no row for 2 of 16 entity records \(first: 'E00014', 'E00015'\); entity.desc has no mask"),
    ("repeat", r"qids.json, row 5: id 'E00000' repeats row 0"),
    ("count", r"qids.json, top level: 15 ids for 16 feature rows of .*feats.npy"),
    ("nan", r"feats.npy, row 7, field 'features': values that are not finite"),
    ("huge", r"feats.npy, row 2, field 'features': values that are not finite \(NaN, inf, or beyond float16"),
    ("shape", r"feats.npy, top level, field 'features': entity.desc needs an array \[N, D\], got shape \[16, 2, 64\]"),
])
def test_bad_release_files(assets, tmp_path, case, message):
    e_ids = [e.id for e in load_dataset(assets["data"]).entities]
    arr = np.random.default_rng(0).standard_normal((16, DIM)).astype(np.float32)
    ids = list(e_ids)
    if case == "missing":
        arr, ids = arr[:14], ids[:14]
    elif case == "repeat":
        ids[5] = ids[0]
    elif case == "count":
        ids = ids[:15]
    elif case == "nan":
        arr[7, 3] = np.nan
    elif case == "huge":
        arr[2, 0] = 1e6
    elif case == "shape":
        arr = np.zeros((16, 2, DIM), np.float32)
    np.save(tmp_path / "feats.npy", arr)
    (tmp_path / "qids.json").write_text(json.dumps(ids))
    with pytest.raises(DataError, match=message):
        build_features(assets["data"], tmp_path / "feat", None, progress=False,
                       imports=[ImportSpec.parse(f"entity.desc={tmp_path / 'feats.npy'},ids={tmp_path / 'qids.json'}")])


def test_pt_and_image_keyed_mention_features(assets, tmp_path):
    """A .pt dict {features, ids} for the mention image keyed by image names as GHMFC's img_list.json has them
    (another folder and extension: matched by file stem), and a bare .pt tensor with an id list."""
    ds = load_dataset(assets["data"])
    with_img = [m for m in ds.mentions if m.image]
    names = [f"mention_image/{Path(m.image).stem}.jpg" for m in with_img]
    feats = torch.arange(len(names) * 8, dtype=torch.float32).reshape(len(names), 8) + 1
    torch.save({"features": feats, "ids": names}, tmp_path / "img.pt")
    torch.save(torch.ones(len(ds.entities), 8), tmp_path / "desc.pt")
    (tmp_path / "qids.json").write_text(json.dumps([e.id for e in ds.entities]))
    out = tmp_path / "feat"
    summary = build_features(assets["data"], out, None, progress=False, imports=[
        ImportSpec.parse(f"mention.image={tmp_path / 'img.pt'},by=image"),
        ImportSpec.parse(f"entity.desc={tmp_path / 'desc.pt'}", tmp_path / "qids.json")])
    assert sorted(summary["imported"]) == ["entity.desc", "mention.image"]
    img = FeatureStore(out).load("mention", "image")
    rows = [i for i, m in enumerate(ds.mentions) if m.image]
    np.testing.assert_array_equal(np.asarray(img.data[rows], np.float32), feats.numpy())
    assert img.mask.tolist() == [m.image is not None for m in ds.mentions]
    (tmp_path / "bad.json").write_text(json.dumps(["nothing.jpg"]))
    torch.save(torch.ones(1, 8), tmp_path / "one.pt")
    bad = ImportSpec.parse(f"mention.image={tmp_path / 'one.pt'},by=image,ids={tmp_path / 'bad.json'}")
    with pytest.raises(DataError, match=r"bad.json, row 0: image 'nothing.jpg' is no mention's image"):
        build_features(assets["data"], out, None, progress=False, imports=[bad])


@pytest.mark.parametrize("text,message", [
    ("entity.desc", "expected SIDE.VIEW=FILE"),
    ("entity.nope=x.h5", "unknown view 'entity.nope'"),
    ("entity.desc=x.h5,idz=q.json", "unknown option 'idz=q.json'"),
    ("entity.desc=x.h5,by=image", "by=image is for mention views"),
    ("entity.desc=x.csv", "x.csv: unknown feature file type"),
])
def test_import_flag_syntax(text, message):
    with pytest.raises(ValueError, match=message):
        ImportSpec.parse(text)
    spec = ImportSpec.parse("mention.image=a/b.h5,key=img,by=image", "ids.json")
    assert (spec.side, spec.path, spec.ids, spec.key, spec.by) == ("mention", Path("a/b.h5"), Path("ids.json"),
                                                                   "img", "image")


def test_cli_needs_an_encoder_or_an_import(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        features.main(["--data", str(assets["data"]), "--out", str(tmp_path / "f")])
    assert "--clip is required (unless every view to write comes from --import)" in capsys.readouterr().err
