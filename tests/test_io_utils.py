"""Durable I/O primitives: atomic writes, the append-only cache's crash repair, YAML settings files."""

import os
import stat

import pytest

from data_process.core.durable_io import JsonlCache, atomic_write_text
from data_process.core.records import DataError
from data_process.core.settings import read_yaml_mapping


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_cache_moves_a_torn_last_line_aside_and_keeps_the_rest(tmp_path):
    path = tmp_path / "c.jsonl"
    with JsonlCache(path) as c:
        c.put("a", {"v": 1})
    with path.open("a") as fh:
        fh.write('{"key": "b", "v"')  # a crash mid-write
    with JsonlCache(path) as c:
        assert c.recovered_corrupt_tail and len(c) == 1 and c.get("a")["v"] == 1
        c.put("b", {"v": 2})
    assert (tmp_path / "c.jsonl.corrupt").read_text() == '{"key": "b", "v"\n'
    with JsonlCache(path) as c:
        assert not c.recovered_corrupt_tail and c.get("b") == {"key": "b", "v": 2}


def test_cache_refuses_to_repair_a_corrupt_line_before_the_end(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: corrupt cache record"):
        JsonlCache(path)


def test_read_yaml_mapping_errors_name_the_file(tmp_path):
    assert read_yaml_mapping(_write(tmp_path / "empty.yaml", "")) == {}
    assert read_yaml_mapping(_write(tmp_path / "ok.yaml", "lr: 0.1\n")) == {"lr": 0.1}
    with pytest.raises(FileNotFoundError, match=r"nope.yaml: config file not found"):
        read_yaml_mapping(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match=r"list.yaml: must be a mapping of settings, got list"):
        read_yaml_mapping(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match=r"bad.yaml: invalid YAML"):
        read_yaml_mapping(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_dataset_left_half_written_is_refused_and_a_whole_one_loads(tmp_path):
    from data_process.core.records import (INCOMPLETE_MARKER, DatasetInfo, Entity, Mention, load_dataset,
                                           save_dataset)
    ents = [Entity(id="Q1", name="A")]
    ments = [Mention(id="m1", sentence="A here", mention="A", gold_id="Q1", split="train")]
    root = save_dataset(tmp_path / "ds", DatasetInfo(name="toy", source_format="unified"), ents, ments,
                        extra_files={"report.json": "{}\n"})
    assert not (root / INCOMPLETE_MARKER).exists() and (root / "report.json").read_text() == "{}\n"
    assert [m.id for m in load_dataset(root).mentions] == ["m1"]
    (root / INCOMPLETE_MARKER).write_text("")          # what a kill between the first and last file leaves
    with pytest.raises(DataError, match=r"ds, folder: incomplete: the step writing it was interrupted"):
        load_dataset(root)


def test_a_placed_image_folder_link_is_trusted_and_nothing_else_leaves_the_dataset(tmp_path):
    """prepare, enrich and caption reach their source's images through folder links at the top of the new dataset
    (``images -> ../data/images``, or ``images/mention -> /release/images``): those are the images' own folders.
    A file link, or a link deeper down, that leaves its folder is refused, as are absolute and ``..`` paths."""
    from data_process.core.safe_paths import UnsafePath, resolve_in_dataset

    src = tmp_path / "data" / "images"
    (src / "mention").mkdir(parents=True)
    (src / "mention" / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (src / "mention" / "leak.png").symlink_to(tmp_path / "secret.png")
    cap = tmp_path / "data_cap"
    cap.mkdir()
    (cap / "images").symlink_to(src)                              # what caption's placement makes
    assert resolve_in_dataset(cap, "images/mention/a.png") == (src / "mention" / "a.png").resolve()
    pre = tmp_path / "prepared"
    (pre / "images").mkdir(parents=True)
    (pre / "images" / "mention").symlink_to(src / "mention")      # what prepare makes for a release folder
    assert resolve_in_dataset(pre, "images/mention/a.png") == (src / "mention" / "a.png").resolve()
    for root, name, why in ((cap, "images/mention/leak.png", "a symlink that leads outside"),
                            (pre, "images/mention/leak.png", "a symlink that leads outside"),
                            (cap, "../secret.png", "'..' leads outside"),
                            (cap, str(tmp_path / "secret.png"), "absolute paths are not allowed")):
        with pytest.raises(UnsafePath, match=why):
            resolve_in_dataset(root, name)
