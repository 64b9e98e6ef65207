"""The shared core: the image fingerprint, image placement and the device resolver."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from data_process.core.devices import resolve_device
from data_process.core.fingerprints import MISSING, ImageHasher
from data_process.core.placement import place_images


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_image_hasher_hashes_content_and_sees_same_size_edits(tmp_path):
    img = _write(tmp_path / "a.jpg", b"AAAA")
    cache = tmp_path / "hashes.jsonl"
    with ImageHasher(cache) as h:
        assert h.sha256(img) == hashlib.sha256(b"AAAA").hexdigest()
        assert h.sha256(tmp_path / "gone.jpg") == MISSING
    assert len(cache.read_text().splitlines()) == 1
    # same size, new bytes, new mtime: a new hash (the old path + size fingerprint missed this)
    img.write_bytes(b"BBBB")
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with ImageHasher(cache) as h:
        assert h.sha256(img) == hashlib.sha256(b"BBBB").hexdigest()


def test_image_hasher_reuses_its_cache_without_reading_the_file(tmp_path, monkeypatch):
    img = _write(tmp_path / "a.jpg", b"AAAA")
    with ImageHasher(tmp_path / "hashes.jsonl") as h:
        first = h.sha256(img)
    import data_process.core.fingerprints as fp

    def no_read(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(fp, "file_sha256", no_read)
    with ImageHasher(tmp_path / "hashes.jsonl") as h:
        assert h.hash_all([img, None]) == [first, None]


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    _write(src / "images" / "a.jpg", b"a")
    _write(src / "images" / "b.jpg", b"b")
    _write(tmp_path / "outside.jpg", b"o")
    return src


def test_place_images_symlink_copy_rewrite(tmp_path):
    src = _source(tmp_path)
    rels = ["images/a.jpg", "../outside.jpg", "images/missing.jpg"]
    out = tmp_path / "linked"
    m = place_images(out, rels, "symlink", src_root=src)
    assert (out / "images").is_symlink() and (out / "images").resolve() == (src / "images").resolve()
    assert m["images/a.jpg"] == "images/a.jpg" and (out / m["../outside.jpg"]).read_bytes() == b"o"
    # again into the same folder: the link is kept
    assert place_images(out, rels, "symlink", src_root=src) == m

    out = tmp_path / "copied"
    m = place_images(out, rels, "copy", src_root=src)
    assert not (out / "images").is_symlink() and (out / "images" / "a.jpg").read_bytes() == b"a"
    assert not (out / "images" / "b.jpg").exists()  # only referenced files are copied
    assert m["images/missing.jpg"] == "images/missing.jpg"

    out = tmp_path / "rewritten"
    out.mkdir()
    m = place_images(out, rels, "rewrite", src_root=src)
    assert not (out / "images").exists() and (out / m["images/a.jpg"]).read_bytes() == b"a"


def test_place_images_never_replaces_an_existing_folder(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    _write(out / "images" / "mine.txt", b"keep me")
    with pytest.raises(FileExistsError, match="exists and is not a link to"):
        place_images(out, ["images/a.jpg"], "symlink", src_root=src)
    assert (out / "images" / "mine.txt").read_bytes() == b"keep me"


def test_place_images_release_links(tmp_path):
    release = _write(tmp_path / "release" / "mention_image" / "1.jpg", b"1").parent
    out = tmp_path / "out"
    m = place_images(out, ["images/mention/1.jpg"], "symlink", links={"images/mention": release})
    assert m == {"images/mention/1.jpg": "images/mention/1.jpg"}
    assert (out / "images" / "mention" / "1.jpg").read_bytes() == b"1"
    with pytest.raises(ValueError, match="images mode must be one of symlink, copy, rewrite"):
        place_images(out, [], "link", links={})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
