"""The feature step against hostile input and faults (issue 19): a damaged cache, unsafe or non-regular image paths,
aspect-ratio bombs, every expected failure as one ``error:`` line; and the length-sorted text batches (issue 20)."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_process.encode.feature_store as fs
import data_process.encode.features as features
from data_process.core.entry import run_main
from data_process.core.fingerprints import UNREADABLE, ImageHasher
from data_process.core.images import ImagePreprocess, decode_image
from data_process.core.records import load_dataset, save_dataset
from data_process.encode.encoders import TextEncoder
from data_process.encode.feature_store import CacheError, FeatureStore
from data_process.encode.features import build_features
from tests.test_features import _arrays, _settings, assets, kill_after_first_write, spy_resume  # noqa: F401


def _build(data, out, clip, **kw):
    return build_features(data, out, _settings(clip), batch_size=16, num_workers=0, device="cpu", progress=False,
                          **kw)


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    data, clip = assets
    out = tmp_path_factory.mktemp("built") / "f"
    _build(data, out, clip)
    return out


def _same_as_built(out: Path, built: Path) -> None:
    a, b = _arrays(out), _arrays(built)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# 1. cache integrity


def test_meta_records_size_and_hash_of_each_view_file(built):
    files = FeatureStore(built).meta()["views"]["mention.regions"]["files"]
    assert sorted(files) == ["mention.regions.mask.npy", "mention.regions.npy"]
    for name, info in files.items():
        assert info["size"] == (built / name).stat().st_size and len(info["sha256"]) == 64


def test_truncated_committed_view_is_an_error_on_open_and_reencoded_on_rerun(built, assets, tmp_path):
    data, clip = assets
    out = tmp_path / "f"
    shutil.copytree(built, out)
    path = out / "mention.sentence.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    with pytest.raises(CacheError, match=r"mention\.sentence\.npy: truncated"):
        FeatureStore(out).load("mention", "sentence")
    summary = _build(data, out, clip)
    assert summary["written"] == ["mention.sentence"]
    _same_as_built(out, built)


def test_flipped_bytes_are_caught_by_the_content_hash_and_nan_named_by_row(built, assets, tmp_path, monkeypatch):
    data, clip = assets
    out = tmp_path / "f"
    shutil.copytree(built, out)
    store = FeatureStore(out)
    arr = np.load(out / "entity.desc.npy", mmap_mode="r+")
    arr[5, 3] = np.float16("nan")  # same size, different bytes
    arr.flush()
    del arr
    assert "altered" in store.verify("entity.desc")
    eid = store.ids("entity")[5]
    for mmap in (False, True):  # a small view is checked on a memory-mapped open too
        with pytest.raises(CacheError, match=rf"entity\.desc\.npy, row 5 \(id {eid}\): NaN or infinite"):
            store.load("entity", "desc", mmap=mmap)
    monkeypatch.setattr(fs, "NAN_CHECK_BYTES", 0)  # a large one is not read on a memory-mapped open
    assert store.load("entity", "desc", mmap=True).data.shape[0] == len(store.ids("entity"))
    summary = _build(data, out, clip)
    assert summary["written"] == ["entity.desc"]
    _same_as_built(out, built)


def test_non_finite_features_are_refused_at_commit_naming_view_and_row(assets, tmp_path, monkeypatch):
    data, clip = assets
    real = TextEncoder.encode_pooled

    def poisoned(self, texts):
        out = real(self, texts)
        out[1, 0] = np.inf
        return out

    monkeypatch.setattr(TextEncoder, "encode_pooled", poisoned)
    with pytest.raises(CacheError, match=r"mention\.mention\.npy\.partial, row \d+ \(id [^)]+\): NaN or infinite "
                                         r"feature values in view mention\.mention"):
        _build(data, tmp_path / "f", clip)
    assert not (tmp_path / "f" / "mention.mention.npy").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad_progress_json"])
def test_a_damaged_partial_view_restarts_instead_of_resuming(built, assets, tmp_path, monkeypatch, damage):
    data, clip = assets
    out = tmp_path / "f"
    victim = "mention.sentence"
    real_write = kill_after_first_write(monkeypatch, victim)
    with pytest.raises(KeyboardInterrupt):
        _build(data, out, clip)
    partial = out / f"{victim}.npy.partial"
    if damage == "truncate":
        with open(partial, "r+b") as fh:
            fh.truncate(partial.stat().st_size // 2)
    elif damage == "flip":
        order = features.length_order([[m.sentence] for m in load_dataset(data).mentions])
        arr = np.load(partial, mmap_mode="r+")
        arr[order[0]] = 0  # a row marked done, zeroed: the size is right, the checksum is not
        arr.flush()
        del arr
    else:
        (out / f"{victim}.progress.json").write_text('{"rows_done": 16, "finger')
    starts = spy_resume(monkeypatch, real_write, victim)
    summary = _build(data, out, clip)
    assert starts[0] == 0 and victim in summary["written"]
    _same_as_built(out, built)


def test_an_intact_partial_view_still_resumes(built, assets, tmp_path, monkeypatch):
    data, clip = assets
    out = tmp_path / "f"
    real_write = kill_after_first_write(monkeypatch, "mention.profile")
    with pytest.raises(KeyboardInterrupt):
        _build(data, out, clip)
    starts = spy_resume(monkeypatch, real_write, "mention.profile")
    _build(data, out, clip)
    assert starts[0] == 16
    _same_as_built(out, built)


# ---------------------------------------------------------------------------------------------
# 2., 3. image paths: outside the dataset, FIFOs, NUL bytes


def _with_images(data: Path, dst: Path, names: list[str]) -> tuple[Path, list[str]]:
    """A copy of ``data`` whose first mentions with an image name ``names`` instead; their ids."""
    shutil.copytree(data, dst)
    ds = load_dataset(dst)
    ms, ids, k = [], [], 0
    for m in ds.mentions:
        if m.image and k < len(names):
            m = replace(m, image=names[k])
            ids.append(m.id)
            k += 1
        ms.append(m)
    save_dataset(dst, ds.info, ds.entities, ms)
    return dst, ids


@pytest.mark.timeout(120)
def test_images_outside_the_dataset_are_refused_and_reported(assets, tmp_path):
    data, clip = assets
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32), "red").save(outside)
    src, ids = _with_images(data, tmp_path / "data", [str(outside), "../outside.png", "images/link.png"])
    (src / "images" / "link.png").symlink_to(outside)
    summary = _build(src, tmp_path / "f", clip)
    rep = summary["images"]["mention"]
    assert rep["failed"] == 3 and rep["failed_ids"] == ids
    assert [r.split(":")[0] for r in rep["failed_reasons"]] == ["unsafe path"] * 3
    assert "absolute paths are not allowed" in rep["failed_reasons"][0]
    assert "a symlink that leads outside" in rep["failed_reasons"][2]
    store = FeatureStore(tmp_path / "f")
    rows = [store.ids("mention").index(i) for i in ids]
    assert not store.load("mention", "image").mask[rows].any()


@pytest.mark.timeout(60)
def test_a_fifo_or_nul_byte_image_is_unreadable_not_a_hang_or_crash(assets, tmp_path):
    data, clip = assets
    src, ids = _with_images(data, tmp_path / "data", ["images/pipe.png", "images/a\x00b.png"])
    os.mkfifo(src / "images" / "pipe.png")
    assert ImageHasher().hash_all([src / "images" / "pipe.png"]) == [UNREADABLE]
    assert decode_image(src / "images" / "pipe.png") == (None, "not a regular file: a FIFO")
    summary = _build(src, tmp_path / "f", clip)
    rep = summary["images"]["mention"]
    assert rep["failed_ids"] == ids
    assert rep["failed_reasons"][0] == "not a regular file: a FIFO"
    assert "NUL byte" in rep["failed_reasons"][1]


# ---------------------------------------------------------------------------------------------
# 4. aspect-ratio bombs


def _resize_then_crop(pp: ImagePreprocess, img: Image.Image) -> np.ndarray:
    """The plain CLIP preprocessing: the shortest edge resized to ``size``, then the centre crop."""
    w, h = img.size
    scale = pp.size / min(w, h)
    nw, nh = max(pp.crop_w, round(w * scale)), max(pp.crop_h, round(h * scale))
    img = img.resize((nw, nh), resample=Image.Resampling(pp.resample)) if (nw, nh) != (w, h) else img
    left, top = (nw - pp.crop_w) // 2, (nh - pp.crop_h) // 2
    return np.asarray(img.crop((left, top, left + pp.crop_w, top + pp.crop_h)))


def test_ordinary_aspect_ratios_give_the_same_pixels():
    pp = ImagePreprocess()
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (480, 640), (224, 224), (300, 224), (1000, 333), (37, 41), (1920, 1080), (224, 3000)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(pp.pixels(img), _resize_then_crop(pp, img), err_msg=f"{w}x{h}")


@pytest.mark.parametrize("size", [(16000, 1), (1, 16000), (40000, 3)])
def test_an_aspect_ratio_bomb_is_resized_through_the_crop_only(size, monkeypatch):
    pp = ImagePreprocess()
    resized = []
    real = Image.Image.resize

    def counting(self, out_size, *a, **kw):
        resized.append(out_size[0] * out_size[1])
        return real(self, out_size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", counting)
    out = pp(Image.new("RGB", size, "blue"))
    assert out.shape == (3, 224, 224)
    assert sum(resized) <= 224 * 224  # the plain path would resize to 3.6e9 / 224 ... pixels
    assert np.allclose(out, out[:, :1, :1])  # a uniform image stays uniform


# ---------------------------------------------------------------------------------------------
# 5. one error line for every expected failure


def _cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(features.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def _argv(data, out, clip, *extra):
    return ["--data", str(data), "--out", str(out), "--clip", str(clip), "--num_workers", "0", "--device", "cpu",
            "--max_len", "12", "--region_grid", "2", *extra]


def test_bad_record_missing_model_and_bad_flag_are_one_line(assets, tmp_path, capsys):
    data, clip = assets
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    lines = (bad / "mentions.jsonl").read_text().splitlines()
    lines[2] = '{"id": 5}'
    (bad / "mentions.jsonl").write_text("\n".join(lines) + "\n")
    assert _cli(_argv(bad, tmp_path / "f", clip), capsys).startswith(f"error: {bad / 'mentions.jsonl'}, line 3")
    assert _cli(_argv(data, tmp_path / "f", tmp_path / "nope"), capsys) == \
        f"error: {tmp_path / 'nope'}: --clip: model folder not found"
    assert _cli(_argv(data, tmp_path / "f", clip, "--batch_size", "0"), capsys) == \
        "error: --batch_size must be positive, got 0"
    assert _cli(_argv(data, tmp_path / "f", clip, "--device", "bogus"), capsys).startswith("error: --device bogus: ")


def test_corrupt_meta_json_is_one_line(built, assets, tmp_path, capsys):
    data, clip = assets
    out = tmp_path / "f"
    shutil.copytree(built, out)
    (out / "meta.json").write_text('{"views": ')
    assert _cli(_argv(data, out, clip), capsys).startswith(f"error: {out / 'meta.json'}: not valid JSON")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_one_line(assets, tmp_path, capsys, monkeypatch, code):
    data, clip = assets
    def failing(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs.os, "posix_fallocate", failing)
    line = _cli(_argv(data, tmp_path / "f", clip), capsys)
    assert line.startswith(f"error: {tmp_path / 'f'}/mention.mention.npy.partial: ")
    assert ("no space left on device" if code == errno.ENOSPC else "cannot write or read here") in line


# ---------------------------------------------------------------------------------------------
# 6. texts sorted by length across the view


def test_length_sorted_batches_write_the_chunk_order_rows_in_row_order(built, assets, tmp_path, monkeypatch):
    data, clip = assets
    ds = load_dataset(data)
    texts = [m.mention for m in ds.mentions]
    order = np.argsort([len(t) for t in texts], kind="stable")
    assert order.tolist() != list(range(len(texts)))  # the data really needs reordering
    batches: list[list[str]] = []
    real = TextEncoder.encode_pooled
    monkeypatch.setattr(TextEncoder, "encode_pooled", lambda self, b: batches.append(list(b)) or real(self, b))
    _build(data, tmp_path / "f", clip)
    first = [t for b in batches for t in b][: len(texts)]  # mention.mention is the first pooled view
    assert first == [texts[i] for i in order]  # batches of the whole view sorted by length
    assert max(len(b) for b in batches) == 16
    enc = TextEncoder(str(clip), device="cpu", max_len=12, batch_size=16)
    chunked = np.concatenate([enc.encode_pooled(texts[a:a + 16]) for a in range(0, len(texts), 16)])
    cached = np.asarray(FeatureStore(built).load("mention", "mention").data, dtype=np.float32)
    np.testing.assert_allclose(cached, chunked, atol=2e-2, rtol=1e-2)  # padding differs by batch: never bitwise
    sent = enc.encode([m.sentence for m in ds.mentions])
    cached = np.asarray(FeatureStore(built).load("mention", "sentence").data, dtype=np.float32)
    np.testing.assert_allclose(cached, sent.tokens, atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(FeatureStore(built).load("mention", "sentence").mask, sent.mask)
