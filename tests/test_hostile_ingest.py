"""Hostile input and faults at ingest (issue 19): project folders as --out, a kill -9 while prepare writes, image
symlinks out of a release, repeated JSON keys, lone surrogates, folders where files belong, read-only and full
disks, and (issue 20) GHMFC's dev split carved from train and --splits where a release fixes the splits."""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from data_process.core import durable_io, records
from data_process.core.placement import place_images
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, load_dataset, save_dataset
from data_process.core.safe_paths import UnsafePath
from data_process.ingest import prepare as prep
from data_process.ingest import validate as val
from data_process.ingest.readers import (read_ghmfc, read_melbench, read_mimic, read_unified, read_wikidiverse,
                                         read_wikiperson)
from tests.test_ghmfc import make_release, sample
from tests.test_prepare import first_line, run_cli
from tests.test_readers import MELBENCH, make_mimic, make_wikidiverse, write_image, write_json

ROOT = Path(__file__).resolve().parents[1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. --out holding a dataset.json beside other files (a project folder) is never replaced


def test_prepare_never_replaces_a_folder_holding_what_it_did_not_write(tmp_path, capsys):
    src = write_json(tmp_path / "m.json", MELBENCH)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "dataset.json").write_text('{"name": "mine", "source_format": "hand"}')
    (project / "notes.txt").write_text("keep me")
    (project / "src" / "model.py").write_text("print(1)")
    before = files_of(project)
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(src), "--out", str(project), "--quiet"]) == 2
    err = first_line(capsys.readouterr().err)
    assert err == (f"error: {project}: holds entries prepare did not write (notes.txt, src); refusing to replace "
                   "it (choose a new or empty --out, or one holding only a dataset prepare wrote)\n")
    assert files_of(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "project"]
    # a folder holding only what prepare writes is replaced (a rerun)
    out = tmp_path / "out"
    prep.prepare("melbench", src, out, echo=False, progress=False)
    prep.prepare("melbench", src, out, echo=False, progress=False, split_seed=5)
    assert "seed 5" in load_dataset(out).info.split_rule


# ---------------------------------------------------------------------------------------------
# 2. dataset files + report are one set: a kill -9 while writing leaves nothing that passes for a dataset

KILLER = """
import os, signal, sys
from data_process.core import durable_io, records
real = durable_io.atomic_write_bytes
def write(path, data):
    if os.path.basename(path) == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
durable_io.atomic_write_bytes = records.atomic_write_bytes = write
from data_process.core.entry import run_main
from data_process.ingest import prepare
run_main(prepare.main, sys.argv[2:])
"""


@pytest.mark.parametrize("previous", [False, True])
@pytest.mark.parametrize("kill_at", ["mentions.jsonl", "validation.json"])
def test_kill_9_while_writing_leaves_no_dataset_and_a_rerun_completes(tmp_path, kill_at, previous):
    src = write_json(tmp_path / "m.json", MELBENCH)
    out = tmp_path / "out"
    args = ["--format", "melbench", "--src", str(src), "--out", str(out), "--quiet"]
    if previous:
        prep.prepare("melbench", src, out, echo=False, progress=False, split_seed=1)
    before = files_of(out) if previous else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLER, kill_at, *args], env=env, capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert (files_of(out) == before) if previous else not out.exists()
    stages = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
    assert len(stages) == 1 and (stages[0] / records.INCOMPLETE_MARKER).is_file()
    with pytest.raises(DataError, match="incomplete: the step writing it was interrupted"):
        load_dataset(stages[0])
    with pytest.raises(DataError, match="incomplete: the step writing it was interrupted"):
        val.validate_dataset(stages[0], progress=False)
    assert run_cli(val.main, [str(stages[0]), "--quiet"]) == 2
    # the rerun completes: a whole dataset with its report
    assert run_cli(prep.main, args) == 0
    ds = load_dataset(out)
    assert len(ds.mentions) == 5 and "seed 0" in ds.info.split_rule
    assert json.loads((out / "validation.json").read_text())["ok"] is True
    assert not (out / records.INCOMPLETE_MARKER).exists()


# ---------------------------------------------------------------------------------------------
# 3. images: a symlink out of the release's image folder is refused by every reader, never copied


@pytest.fixture()
def secret(tmp_path) -> Path:
    """An image outside every release, unlike the fixtures' images (another size)."""
    path = tmp_path / "outside" / "secret.jpg"
    path.parent.mkdir()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path)
    return path


def link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def assert_refused(conv, owner: str, field: str = "image") -> None:
    hits = [r for r in conv.refused_images if r.record == owner]
    assert len(hits) == 1 and hits[0].field == field, conv.refused_images
    assert "a symlink that leads outside" in hits[0].reason or "leaves the dataset folder" in hits[0].reason


def test_melbench_and_ghmfc_refuse_image_symlinks_out_of_the_image_folder(tmp_path, secret):
    imgs = tmp_path / "imgs"
    write_image(imgs / "2.jpg")
    link(imgs / "1.jpg", secret)
    conv = read_melbench(write_json(tmp_path / "m.json", MELBENCH), image_dir=imgs, progress=False)
    by_id = {m.id: m for m in conv.mentions}
    assert by_id["1-0"].image is None and by_id["1-1"].image is None and by_id["2-0"].image == "images/mention/2.jpg"
    assert [r.record for r in conv.refused_images] == ["mention '1-0'", "mention '1-1'"]
    assert conv.refused_images[0].reason == f"image refused: 1.jpg: a symlink that leads outside {imgs.resolve()}"
    rel = make_release(tmp_path / "gh")
    link(rel / "images" / "10.jpg", secret)
    conv = read_ghmfc(rel, progress=False)
    assert {m.id: m.image for m in conv.mentions}["10-0"] is None
    assert_refused(conv, "mention '10-0'")


@pytest.mark.parametrize("reader", [read_mimic, read_wikiperson])
def test_mimic_layouts_refuse_image_symlinks_on_both_sides(tmp_path, secret, reader):
    src = make_mimic(tmp_path / "rel")
    link(src / "mention_image" / "m1.jpg", secret)
    link(src / "kb_image" / "Q1_a.jpg", secret)
    conv = reader(src, progress=False)
    assert {m.id: m.image for m in conv.mentions}["m1"] is None
    assert {e.id: e.images for e in conv.entities}["Q1"] == ("images/kb/Q1_missing.jpg",)
    assert_refused(conv, "mention 'm1'")
    assert_refused(conv, "entity 'Q1'", "images")


def test_wikidiverse_refuses_symlinks_and_dot_dot_names(tmp_path, secret):
    src = make_wikidiverse(tmp_path / "wd", train=[
        ["The Lions play", "https://upload.wikimedia.org/x/Lions%20Play.jpg", "sports",
         [["Lions", "Org", 4, 9, "https://en.wikipedia.org/wiki/Detroit_Lions"]]],
        ["Lions again", "https://x.org/..%2F..%2Foutside%2Fsecret.jpg", "sports",
         [["Lions", "Org", 0, 5, "https://en.wikipedia.org/wiki/Detroit_Lions"]]]])
    link(src / "images" / "Lions Play.jpg", secret)
    conv = read_wikidiverse(src, progress=False)
    images = {m.id: m.image for m in conv.mentions}
    assert images["train-0-0"] is None and images["train-1-0"] is None
    assert_refused(conv, "mention 'train-0-0'")
    assert_refused(conv, "mention 'train-1-0'")


def unified_with_images(root: Path, secret: Path) -> Path:
    (root / "images").mkdir(parents=True)
    write_image(root / "images" / "ok.jpg")
    link(root / "images" / "evil.jpg", secret)
    (root / "dataset.json").write_text(json.dumps({"name": "u", "source_format": "test"}))
    (root / "entities.jsonl").write_text(json.dumps({"id": "E1", "name": "One", "images": ["images/evil.jpg"]})
                                         + "\n")
    rows = [{"id": "ok", "image": "images/ok.jpg"}, {"id": "link", "image": "images/evil.jpg"},
            {"id": "abs", "image": str(secret)}, {"id": "up", "image": "../outside/secret.jpg"}]
    (root / "mentions.jsonl").write_text("".join(json.dumps({"sentence": "One", "mention": "One", "gold_id": "E1",
                                                             "split": "train", **r}) + "\n" for r in rows))
    return root


def test_unified_reader_refuses_symlinks_absolute_and_dot_dot_paths(tmp_path, secret):
    conv = read_unified(unified_with_images(tmp_path / "uni", secret), progress=False)
    assert {m.id: m.image for m in conv.mentions} == {"ok": "images/ok.jpg", "link": None, "abs": None, "up": None}
    assert conv.entities[0].images == ()
    for owner in ("mention 'link'", "mention 'abs'", "mention 'up'"):
        assert_refused(conv, owner)
    assert_refused(conv, "entity 'E1'", "images")


@pytest.mark.parametrize("fmt", ["mimic", "unified"])
def test_copy_mode_never_copies_a_file_from_outside_and_the_report_lists_it(tmp_path, secret, fmt):
    if fmt == "mimic":
        src = make_mimic(tmp_path / "rel")
        link(src / "mention_image" / "m1.jpg", secret)
    else:
        src = unified_with_images(tmp_path / "uni", secret)
    out, rep = prep.prepare(fmt, src, tmp_path / "out", images="copy", echo=False, progress=False)
    assert secret.read_bytes() not in [p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix == ".jpg"]
    assert all(not p.is_symlink() for p in out.rglob("*"))
    saved = json.loads((out / "validation.json").read_text())
    assert saved["warnings"]["refused_images"] == len(saved["refused_images"]) >= 1
    assert "a symlink that leads outside" in saved["refused_images"][0]["reason"]
    assert "refused images:" in (out / "validation.txt").read_text()


def test_placement_copy_and_rewrite_refuse_a_symlink_out_of_the_source_folder(tmp_path, secret):
    src = tmp_path / "src"
    link(src / "images" / "evil.jpg", secret)
    for mode in ("copy", "rewrite"):
        with pytest.raises(UnsafePath, match="a symlink that leads outside"):
            place_images(tmp_path / f"out-{mode}", ["images/evil.jpg"], mode, src_root=src)
    assert not (tmp_path / "out-copy" / "images" / "evil.jpg").exists()


# ---------------------------------------------------------------------------------------------
# 4. repeated keys in keyed JSON files: every copy dropped and listed, never a silent "dropped 0"


def test_repeated_sample_ids_are_dropped_listed_and_counted(tmp_path):
    body = ",".join(f'"{sid}": {json.dumps(s)}' for sid, s in MELBENCH.items())
    twin = json.dumps({**MELBENCH["2"], "sentence": "Robertson, other copy"})
    path = tmp_path / "m.json"
    path.write_text("{" + body + f', "2": {twin}' + "}", encoding="utf-8")
    conv = read_melbench(path, progress=False)
    assert sorted({m.id.split("-")[0] for m in conv.mentions}) == ["1", "3", "4"]
    assert [(d.record, d.reason) for d in conv.dropped] == [("key '2'", "repeated key: 2 copies in the file (JSON "
                                                             "keeps only the last); every copy dropped")] * 2
    assert conv.records_read == 5
    with pytest.raises(DataError, match="key '2': repeated key"):
        read_melbench(path, progress=False, strict=True)
    out, rep = prep.prepare("melbench", path, tmp_path / "out", echo=False, progress=False, max_invalid="2")
    assert len(rep.dropped) == 2 and "dropped records: 2 of 5 read" in (out / "validation.txt").read_text()


def test_repeated_keys_in_ghmfc_files(tmp_path):
    rel = make_release(tmp_path / "gh")
    text = (rel / "train.json").read_text()
    twin = json.dumps(sample("12", "Bob twice", ["Bob"], ["Q2"]))
    (rel / "train.json").write_text(text[:-1] + f', "12": {twin}' + "}")
    names = (rel / "qid2ne.json").read_text()
    (rel / "qid2ne.json").write_text(names[:-1] + ', "Q4": "Avon again"}')
    conv = read_ghmfc(rel, progress=False)
    assert [(Path(d.file).name, d.record) for d in conv.dropped] == [
        ("qid2ne.json", "key 'Q4'")] * 2 + [("train.json", "key '12'")] * 2 + [("test.json", "sample '30'")]
    assert "12-0" not in {m.id for m in conv.mentions} and "Q4" not in {e.id for e in conv.entities}


def test_a_field_given_twice_drops_its_record(tmp_path):
    src = make_mimic(tmp_path / "rel")
    text = (src / "WIKIMEL_test.json").read_text()
    (src / "WIKIMEL_test.json").write_text(text.replace('"answer": "Q3"', '"answer": "Q3", "answer": "Q2"'))
    conv = read_mimic(src, progress=False)
    assert [str(d) for d in conv.dropped] == [f"{src / 'WIKIMEL_test.json'}, record 0 (id 't1'), field 'answer': "
                                              "given 2 times in the record (JSON keeps only the last)"]
    root = tmp_path / "uni"
    save_dataset(root, DatasetInfo("u", "t"), [Entity("E1", "One")], [Mention("m1", "One", "One", "E1", "train")])
    with (root / "entities.jsonl").open("a") as fh:
        fh.write('{"id": "E2", "name": "Two", "name": "Deux"}\n')
    with pytest.raises(DataError, match="line 2 \\(id 'E2'\\), field 'name': given 2 times in the record"):
        load_dataset(root)


# ---------------------------------------------------------------------------------------------
# 5. a lone surrogate: the record is dropped naming file, record and field; the conversion goes on


LONE = "\ud83d"


def test_lone_surrogate_in_json_input_drops_the_record(tmp_path):
    path = tmp_path / "m.json"
    data = {**MELBENCH, "5": {"id": "5", "sentence": "bad \\ud83d here", "mentions": ["bad"], "entities": ["B"],
                              "answer": ["Q5"]}}
    path.write_text(json.dumps(data).replace("\\\\ud83d", "\\ud83d"), encoding="utf-8")
    assert json.loads(path.read_text())["5"]["sentence"] == f"bad {LONE} here"
    conv = read_melbench(path, progress=False)
    assert [str(d) for d in conv.dropped] == [
        f"{path}, sample '5', field 'sentence': holds a lone surrogate '\\ud83d' (not Unicode text; cannot be "
        "written as UTF-8)"]
    out, rep = prep.prepare("melbench", path, tmp_path / "out", echo=False, progress=False, max_invalid="1")
    assert rep.ok and len(load_dataset(out).mentions) == 5
    src = make_mimic(tmp_path / "mimic", train=[{"id": "x", "sentence": f"s{LONE}", "mentions": "s", "answer": "Q2"},
                                                {"id": "y", "sentence": "Bell", "mentions": "Bell", "answer": "Q2"}])
    mimic = read_mimic(src, progress=False)
    assert [(d.record, d.field) for d in mimic.dropped] == [("record 0 (id 'x')", "sentence")]


def test_lone_surrogate_in_jsonl_input_and_writing_never_crashes(tmp_path):
    root = tmp_path / "uni"
    save_dataset(root, DatasetInfo(name=f"n{LONE}", source_format="t"), [Entity("E1", "One"), Entity("E2", LONE)],
                 [Mention("m1", "One", "One", "E1", "train"), Mention("m2", f"x{LONE}", "x", "E1", "test")])
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value).startswith(f"{root / 'entities.jsonl'}, line 2 (id 'E2'), field 'name': holds a lone "
                                     "surrogate")
    conv = read_unified(root, progress=False)
    assert [(d.record, d.field) for d in conv.dropped] == [("line 2 (id 'E2')", "name"),
                                                           ("line 2 (id 'm2')", "sentence")]
    rep = val.validate_dataset(root, progress=False)
    assert rep.errors["malformed_records"] == 2
    val.write_report(rep, root)
    assert "lone surrogate" in (root / "validation.txt").read_text()


# ---------------------------------------------------------------------------------------------
# 6. an expected file that is a folder: a clear error, never a traceback


def test_expected_file_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    src = make_mimic(tmp_path / "rel")
    (src / "kb_entity.json").unlink()
    (src / "kb_entity.json").mkdir()
    with pytest.raises(DataError, match="kb_entity.json, file: not a regular file: a directory"):
        read_mimic(src, progress=False)
    assert run_cli(prep.main, ["--format", "mimic", "--src", str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert first_line(capsys.readouterr().err) == (f"error: {src / 'kb_entity.json'}, file: not a regular file: a "
                                                   "directory\n")
    rel = make_release(tmp_path / "gh")
    (rel / "qid2ne.json").unlink()
    (rel / "qid2ne.json").mkdir()
    with pytest.raises(DataError, match="qid2ne.json, file: not a regular file: a directory"):
        read_ghmfc(rel, progress=False)
    wd = make_wikidiverse(tmp_path / "wd")
    (wd / "test.json").unlink()
    (wd / "test.json").mkdir()
    with pytest.raises(DataError, match="test.json, file: not a regular file: a directory"):
        read_wikidiverse(wd, progress=False)
    uni = tmp_path / "uni"
    save_dataset(uni, DatasetInfo("u", "t"), [Entity("E1", "One")], [Mention("m1", "One", "One", "E1", "train")])
    (uni / "mentions.jsonl").unlink()
    (uni / "mentions.jsonl").mkdir()
    with pytest.raises(UnsafePath, match="mentions.jsonl: not a regular file: a directory"):
        read_unified(uni, progress=False)


# ---------------------------------------------------------------------------------------------
# 8. read-only and full disks: one error line naming the path, through the commands' entry point


def failing_write(code: int):
    def write(path, data):
        raise OSError(code, os.strerror(code), str(path))
    return write


def run_module(module: str, argv: list[str]) -> int:
    """``python -m MODULE ARGV`` in-process: the module runs as ``__main__`` (its entry point); the exit status."""
    sys.argv = [module, *argv]
    with pytest.raises(SystemExit) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # runpy: the module is already imported
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return exc.value.code


def test_read_only_and_full_disk_give_one_error_line(tmp_path, monkeypatch, capsys):
    src = write_json(tmp_path / "m.json", MELBENCH)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with monkeypatch.context() as m:
        m.setattr(records, "atomic_write_bytes", failing_write(errno.EROFS))
        assert run_module("data_process.ingest.prepare", ["--format", "melbench", "--src", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and first_line(err).startswith(f"error: {tmp_path}/.out.")
    assert first_line(err).endswith(": Read-only file system (cannot write or read here)\n")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    prep.prepare("melbench", src, out, echo=False, progress=False)
    with monkeypatch.context() as m:
        m.setattr(durable_io, "atomic_write_bytes", failing_write(errno.ENOSPC))
        assert run_module("data_process.ingest.validate", [str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert first_line(err) == (f"error: {out / 'validation.json'}: no space left on device (free some space and "
                               "rerun: finished work is kept)\n")
    rel = make_release(tmp_path / "gh")
    (rel / "search_top100.json").unlink()
    with monkeypatch.context() as m:
        m.setattr(durable_io, "atomic_write_bytes", failing_write(errno.EROFS))
        assert run_module("data_process.ingest.candidates", ["--src", str(rel), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and first_line(err) == (f"error: {rel / 'search_top100.json'}: Read-only file "
                                                          "system (cannot write or read here)\n")


# ---------------------------------------------------------------------------------------------
# 9. GHMFC without dev.json: --dev-from-train; --splits where the release fixes the splits is an error


def big_release(root: Path, n: int = 40) -> Path:
    make_release(root, with_dev=False)
    write_json(root / "train.json", {str(i): sample(str(i), f"Bob {i}", ["Bob"], ["Q2"]) for i in range(100, 100 + n)})
    return root


def test_ghmfc_dev_from_train_carves_a_seeded_dev_split(tmp_path):
    from data_process.ingest.readers.common import carve_dev

    rel = big_release(tmp_path / "gh")
    out, rep = prep.prepare("ghmfc", rel, tmp_path / "out", echo=False, progress=False, dev_from_train=0.25,
                            split_seed=3)
    assert rep.mentions_per_split == {"train": 30, "dev": 10, "test": 1}
    ds = load_dataset(out)
    dev = {m.id.split("-")[0] for m in ds.split("dev")}
    assert dev == carve_dev([str(i) for i in range(100, 140)], 3, 0.25)
    assert ds.info.split_rule == (
        "from the release: train = train.json, test = test.json; dev carved from train, seed 3: train samples "
        "ordered by sha256('3:' + sample_id) hex digest; the first round(n*0.25) are dev, the rest stay train; all "
        "mentions of a sample share its split")
    assert ds.info.notes["dev_split"] == "carved from train: 10 of 40 train samples (--dev-from-train 0.25)"
    again, _ = prep.prepare("ghmfc", rel, tmp_path / "again", echo=False, progress=False, dev_from_train=0.25,
                            split_seed=3)
    assert (again / "mentions.jsonl").read_bytes() == (out / "mentions.jsonl").read_bytes()
    other = {m.id.split("-")[0] for m in read_ghmfc(rel, progress=False, dev_from_train=0.25, seed=4).mentions
             if m.split == "dev"}
    assert len(other) == 10 and other != dev
    with pytest.raises(ValueError, match="has a dev split \\(1 samples\\); the flag is for releases without one"):
        read_ghmfc(make_release(tmp_path / "with_dev"), progress=False, dev_from_train=0.1)
    with pytest.raises(ValueError, match="--dev-from-train must be a fraction between 0 and 1"):
        read_ghmfc(rel, progress=False, dev_from_train=1.5)


@pytest.mark.parametrize("flag", [["--splits", "80,10,10"], ["--split-seed", "4"], ["--dev-from-train", "0.1"]])
def test_split_flags_on_a_format_whose_release_fixes_the_splits_are_errors(tmp_path, capsys, flag):
    src = make_mimic(tmp_path / "rel")
    assert run_cli(prep.main, ["--format", "mimic", "--src", str(src), "--out", str(tmp_path / "o"), "--quiet",
                               *flag]) == 2
    err = first_line(capsys.readouterr().err)
    assert err.startswith(f"error: {flag[0]} is only for --format ") and "mimic" in err
    assert not (tmp_path / "o").exists()
    rel = make_release(tmp_path / "gh")
    assert run_cli(prep.main, ["--format", "ghmfc", "--src", str(rel), "--out", str(tmp_path / "g"), "--quiet",
                               "--splits", "80,10,10"]) == 2
    assert first_line(capsys.readouterr().err) == (
        "error: --splits is only for --format melbench: a ghmfc release fixes its splits (--dev-from-train P makes "
        "a dev split of a GHMFC release without one)\n")


# ---------------------------------------------------------------------------------------------
# Issue 26, item 10: JSON nested deeper than any record needs is one error naming file, line and field, never a
# RecursionError, in every JSON reader (JSON Lines: unified, link; whole files: the releases) and every check


def deep(n: int) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_json_is_one_error_naming_file_line_and_field(tmp_path, capsys):
    from nel_model.inference.linker import read_mentions as link_input

    root = tmp_path / "uni"
    save_dataset(root, DatasetInfo("u", "t"), [Entity("E1", "One")], [Mention("m1", "One", "One", "E1", "train")])
    good = (root / "entities.jsonl").read_text()
    # a line nested 100,000 deep
    (root / "entities.jsonl").write_text(good + deep(100_000) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value) == (f"{root / 'entities.jsonl'}, line 2: nested 100,000 levels deep; JSON input may nest "
                              "arrays and objects at most 100 levels")
    # an extra field 900 deep: the field is named
    (root / "entities.jsonl").write_text(good + '{"id": "E2", "name": "Two", "x": ' + deep(900) + "}\n")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value) == (f"{root / 'entities.jsonl'}, line 2, field 'x': nested 901 levels deep; JSON input "
                              "may nest arrays and objects at most 100 levels")
    rep = val.validate_dataset(root, progress=False)
    assert rep.errors["malformed_records"] == 1 and rep.entities == 1
    conv = read_unified(root, progress=False)
    assert [(d.record, d.field) for d in conv.dropped] == [("line 2", "x")] and len(conv.entities) == 1
    assert run_cli(prep.main, ["--format", "unified", "--src", str(root), "--out", str(tmp_path / "o"), "--quiet",
                               "--strict"]) == 2
    assert first_line(capsys.readouterr().err) == (f"error: {root / 'entities.jsonl'}, line 2, field 'x': nested 901 "
                                                   "levels deep; JSON input may nest arrays and objects at most 100 "
                                                   "levels\n")
    # link's (and predict's) JSON Lines input
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q1", "sentence": "One", "mention": "One"}\n'
                       '{"id": "q2", "sentence": "One", "mention": "One", "caption": ' + deep(5000) + "}\n")
    with pytest.raises(DataError) as err:
        list(link_input(queries))
    assert str(err.value) == (f"{queries}, line 2, field 'caption': nested 5,001 levels deep; JSON input may nest "
                              "arrays and objects at most 100 levels")
    # dataset.json
    (root / "dataset.json").write_text(deep(100_000))
    with pytest.raises(DataError, match=r"dataset.json, file: not a valid dataset info object \(nested 100,000 "):
        load_dataset(root)
    assert val.validate_dataset(root, progress=False).errors["bad_dataset_info"] == 1


def test_deeply_nested_release_files_name_the_file_and_record(tmp_path):
    src = make_mimic(tmp_path / "rel")
    kb = json.loads((src / "kb_entity.json").read_text())
    (src / "kb_entity.json").write_text(json.dumps(kb)[:-1] + ', {"qid": "Q9", "id": 9, "x": ' + deep(900) + "}]")
    with pytest.raises(DataError) as err:
        read_mimic(src, progress=False)
    assert str(err.value) == (f"{src / 'kb_entity.json'}, item 3: nested 902 levels deep; JSON input may nest "
                              "arrays and objects at most 100 levels")
    (src / "kb_entity.json").write_text(deep(100_000))
    with pytest.raises(DataError, match=r"kb_entity.json, item 0: nested 100,000 levels deep"):
        read_mimic(src, progress=False)
    rel = make_release(tmp_path / "gh")
    (rel / "qid2abs.json").write_text('{"Q1": "a", "Q2": ' + deep(3000) + "}")
    with pytest.raises(DataError, match=r"qid2abs.json, key 'Q2': nested 3,001 levels deep"):
        read_ghmfc(rel, progress=False)


def test_the_record_checks_walk_any_depth_without_recursion():
    value: object = "x" + LONE
    for _ in range(20_000):
        value = [value]
    assert records.lone_surrogate({"a": 1, "b": value}) == ("b", "holds a lone surrogate '\\ud83d' (not Unicode "
                                                             "text; cannot be written as UTF-8)")
    assert records.record_json_problem([value])[0] == "0"
    fixed = records.replace_surrogates({"k": value})
    assert records.lone_surrogate(fixed) is None and records.value_depth(fixed) == 20_001


# ---------------------------------------------------------------------------------------------
# Issue 26, item 15: a bad non-essential field is mended and listed as a warning; the record stays (every reader)


def test_a_lone_surrogate_in_a_ghmfc_description_keeps_the_entity_and_its_mentions(tmp_path):
    rel = tmp_path / "gh"
    names = {f"Q{i}": f"Person {i}" for i in range(1, 61)}
    descs = {q: f"occupation {q}" for q in names}
    descs["Q7"] = f"Sex: male. Birth: 1900, Erie{LONE}."
    write_json(rel / "qid2ne.json", names)
    write_json(rel / "qid2abs.json", descs)
    gold = {i: "Q7" if i % 40 == 6 else f"Q{i % 50 + 10}" for i in range(200)}    # 5 samples name Q7
    samples = {str(i): sample(str(i), f"{names[q]} here", [names[q]], [q]) for i, q in gold.items()}
    write_json(rel / "train.json", {k: v for k, v in samples.items() if int(k) < 160})
    write_json(rel / "test.json", {k: v for k, v in samples.items() if int(k) >= 160})
    # before: the entity and its 5 mentions were dropped, 6 of 260 records, more than 1% of them: nothing written
    conv = read_ghmfc(rel, progress=False)
    assert conv.records_read == 260 and conv.dropped == []
    assert {e.id: e.description for e in conv.entities}["Q7"] == "Sex: male. Birth: 1900, Erie\ufffd."
    assert sum(m.gold_id == "Q7" for m in conv.mentions) == 5 and len(conv.mentions) == 200
    assert [str(r) for r in conv.repaired] == [
        f"{rel / 'qid2abs.json'}, qid 'Q7', field 'description': holds a lone surrogate '\\ud83d' (not Unicode text; "
        "cannot be written as UTF-8); the lone surrogate is replaced by U+FFFD, the record kept"]
    out, rep = prep.prepare("ghmfc", rel, tmp_path / "out", echo=False, progress=False)   # default --max-invalid 1%
    saved = json.loads((out / "validation.json").read_text())
    assert saved["ok"] and saved["dropped"] == [] and saved["warnings"]["repaired_fields"] == 1
    assert saved["repaired"] == [{"file": str(rel / "qid2abs.json"), "record": "qid 'Q7'", "field": "description",
                                  "reason": "holds a lone surrogate '\\ud83d' (not Unicode text; cannot be written "
                                            "as UTF-8); the lone surrogate is replaced by U+FFFD, the record kept"}]
    assert "repaired fields: 1 non-essential fields mended" in (out / "validation.txt").read_text()
    assert len(load_dataset(out).mentions) == 200
    # a description of the wrong type, or given twice: left out, the entity kept; --strict: the first is the error
    write_json(rel / "qid2abs.json", {**descs, "Q7": 5})
    conv = read_ghmfc(rel, progress=False)
    assert {e.id: e.description for e in conv.entities}["Q7"] == "" and conv.dropped == []
    assert [r.reason for r in conv.repaired] == ["must be a string, got int; the field is left out, the record kept"]
    (rel / "qid2abs.json").write_text(json.dumps(descs)[:-1] + ', "Q7": "again"}')
    conv = read_ghmfc(rel, progress=False)
    assert [(r.record, r.reason) for r in conv.repaired] == [
        ("key 'Q7'", "repeated key: 2 copies in the file (JSON keeps only the last); every copy left out, the record "
                     "kept")]
    assert {e.id: e.description for e in conv.entities}["Q7"] == "" and conv.dropped == []
    with pytest.raises(DataError, match="key 'Q7': repeated key: 2 copies"):
        read_ghmfc(rel, progress=False, strict=True)


def test_every_reader_keeps_a_record_whose_only_fault_is_a_non_essential_field(tmp_path):
    # MELBench: a field not read (an image path) holding a lone surrogate
    path = write_json(tmp_path / "m.json", {**MELBENCH, "2": {**MELBENCH["2"], "imgPath": f"x{LONE}.jpg"}})
    conv = read_melbench(path, progress=False)
    assert conv.dropped == [] and "2-0" in {m.id for m in conv.mentions}
    assert [(r.record, r.field) for r in conv.repaired] == [("sample '2'", "imgPath")]
    # MIMIC: an entity's description, a record's image path of the wrong type, a record's unread 'entities'
    src = make_mimic(tmp_path / "mimic", kb=[
        {"id": 0, "qid": "Q1", "name": "AT&T", "desc": f"US {LONE}telecom", "attr": 7},
        {"id": 1, "qid": "Q2", "name": "Bell"}, {"id": 2, "qid": "Q3", "name": "Edison"}],
        train=[{"id": "x", "sentence": "Bell", "mentions": "Bell", "answer": "Q2", "imgPath": 3,
                "entities": ["Bell", "extra"]}])
    conv = read_mimic(src, progress=False)
    assert conv.dropped == []
    assert {e.id: e.description for e in conv.entities}["Q1"] == "US \ufffdtelecom"
    assert {m.id: m.image for m in conv.mentions}["x"] is None
    assert [(r.record, r.field, r.reason.split(";")[0]) for r in conv.repaired] == [
        ("entity 0 (qid 'Q1')", "desc", "holds a lone surrogate '\\ud83d' (not Unicode text"),
        ("entity 0 (qid 'Q1')", "attr", "must be a string or an object mapping strings to strings, got int"),
        ("record 0 (id 'x')", "entities", "has 2 item(s) but 'mentions' has 1"),
        ("record 0 (id 'x')", "imgPath", "must be a string, got int")]
    with pytest.raises(DataError, match="field 'desc': holds a lone surrogate"):
        read_mimic(src, progress=False, strict=True)
    # WikiDiverse: an item's topic and a mention's entity type (neither read)
    wd = make_wikidiverse(tmp_path / "wd", train=[
        ["The Lions play", "", f"sports{LONE}", [["Lions", f"Org{LONE}", 4, 9,
                                                  "https://en.wikipedia.org/wiki/Detroit_Lions"]]]])
    conv = read_wikidiverse(wd, progress=False)
    assert conv.dropped == [] and "train-0-0" in {m.id for m in conv.mentions}
    assert [(r.record, r.field) for r in conv.repaired] == [("item 0", "topic"), ("item 0, mention 0", "type")]
    # unified: an entity's description and aliases, a mention's caption; strict loading still refuses them
    root = tmp_path / "uni"
    save_dataset(root, DatasetInfo("u", "t"), [Entity("E1", "One", f"the {LONE}first")],
                 [Mention("m1", "One", "One", "E1", "train", caption={"text": f"a {LONE}", "provenance": {}})])
    with (root / "entities.jsonl").open("a") as fh:
        fh.write('{"id": "E2", "name": "Two", "aliases": "Deux"}\n')
    conv = read_unified(root, progress=False)
    assert conv.dropped == [] and [e.id for e in conv.entities] == ["E1", "E2"] and len(conv.mentions) == 1
    assert conv.entities[0].description == "the \ufffdfirst" and conv.mentions[0].caption["text"] == "a \ufffd"
    assert [(r.record, r.field) for r in conv.repaired] == [("line 1 (id 'E1')", "description"),
                                                            ("line 2 (id 'E2')", "aliases"),
                                                            ("line 1 (id 'm1')", "caption")]
    with pytest.raises(DataError, match="line 1 \\(id 'E1'\\), field 'description': holds a lone surrogate"):
        load_dataset(root)
    out, rep = prep.prepare("unified", root, tmp_path / "out", echo=False, progress=False)
    assert rep.ok and rep.warnings["repaired_fields"] == 3
    assert load_dataset(out).entities[0].description == "the \ufffdfirst"


def test_a_json_lines_input_that_is_not_utf8_names_file_and_line(tmp_path):
    """Issue 26, item 12: ``predict --input`` / ``link`` input with a bad byte, or saved as UTF-16."""
    from nel_model.inference.linker import read_mentions as link_input

    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b'{"id": "q1", "sentence": "One", "mention": "One"}\n'
                        b'{"id": "q2", "sentence": "caf\xe9", "mention": "caf"}\n')
    with pytest.raises(DataError) as err:
        list(link_input(queries))
    assert str(err.value) == f"{queries}, line 2: not UTF-8 text (invalid continuation byte at byte 29 of the line)"
    queries.write_text('{"id": "q1", "sentence": "One", "mention": "One"}\n', encoding="utf-16")
    with pytest.raises(DataError) as err:
        list(link_input(queries))
    assert str(err.value) == (f"{queries}, line 1: UTF-16 text (it starts with a UTF-16 byte-order mark); save it "
                              "as UTF-8")
    queries.write_text('{"id": "q1", "sentence": "One", "mention": "One"}\n', encoding="utf-8-sig")
    assert [m.query.id for m in link_input(queries)] == ["q1"]
