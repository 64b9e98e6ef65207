"""prepare (convert + validate + atomic publish) and validate, end to end on small fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_process.ingest import prepare as prep
from data_process.ingest import validate as val
from data_process.core.entry import run_main
from data_process.core.records import DataError, load_dataset
from data_process.ingest.readers import READERS
from tests.test_readers import MELBENCH, make_mimic, make_wikidiverse, write_image, write_json


def run_cli(main, argv: list[str]) -> int:
    """A command's exit status, run as ``python -m`` runs it (``core.entry.run_main``)."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    return exc.value.code


def first_line(text: str) -> str:
    return text.splitlines()[0] + "\n"


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_cli_melbench_with_images(tmp_path, capsys):
    src = write_json(tmp_path / "Mini-MEL.json", MELBENCH)
    write_image(tmp_path / "imgs" / "1.jpg")
    write_image(tmp_path / "imgs" / "2.png")
    (tmp_path / "imgs" / "3.jpg").write_bytes(b"not an image")
    out = tmp_path / "out" / "mini"
    rc = prep.main(["--format", "melbench", "--src", str(src), "--out", str(out), "--image-dir", str(tmp_path / "imgs"),
                    "--split-seed", "3", "--splits", "0.6,0.2,0.2", "--dataset-name", "mini", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"dataset mini ({out}): OK\n")
    assert siblings(out.parent) == ["mini"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "entities.jsonl", "images", "mentions.jsonl",
                                                     "validation.json", "validation.txt"]
    link = out / "images" / "mention"
    assert link.is_symlink() and Path(os.readlink(link)) == (tmp_path / "imgs").resolve()
    ds = load_dataset(out)
    assert ds.info.name == "mini" and "seed 3" in ds.info.split_rule and "60/20/20" in ds.info.split_rule
    assert ds.image_path("images/mention/1.jpg").is_file()
    rep = json.loads((out / "validation.json").read_text())
    assert rep["ok"] is True and rep["entities"] == 4 and rep["mentions"] == 5
    assert rep["images"]["mention"] == {"referenced": 5, "missing": 1, "unreadable": 1}
    assert rep["warnings"]["missing_mention_images"] == 1 and rep["warnings"]["unreadable_mention_images"] == 1
    assert rep["warnings"]["mention_not_in_sentence"] == 1
    assert rep["examples"]["missing_mention_images"] == ["mention '4-0': images/mention/4.jpg"]
    assert (out / "validation.txt").read_text() == printed


@pytest.mark.parametrize("given, message", [
    ("70,10,20", "--splits 70,10,20: the shares are fractions summing to 1: write --splits 0.7,0.1,0.2"),
    ("7,1,2", "--splits 7,1,2: the shares are fractions summing to 1: write --splits 0.7,0.1,0.2"),
    ("0.5,0.1,0.1", "--splits 0.5,0.1,0.1: the fractions must sum to 1, not 0.7"),
])
def test_split_shares_are_fractions_and_an_old_percentage_says_what_to_write(tmp_path, capsys, given, message):
    src = write_json(tmp_path / "Mini-MEL.json", MELBENCH)
    with pytest.raises(SystemExit) as ex:
        run_main(prep.main, ["--format", "melbench", "--src", str(src), "--out", str(tmp_path / "out"), "--splits",
                             given, "--images", "none", "--quiet"])
    assert ex.value.code == 2 and capsys.readouterr().err.splitlines()[0] == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_the_default_fractions_split_as_the_percentages_did(tmp_path):
    """Fractions reach the reader as the ratios it always had: the same split and split rule as 70,10,20."""
    from data_process.ingest.readers.common import split_samples

    ids = [f"s{i}" for i in range(1000)]
    assert prep.split_fractions(prep.DEFAULT_SPLITS) == (70.0, 10.0, 20.0)
    for n in (7, 25, 333, 1000):
        assert split_samples(ids[:n], 0, prep.split_fractions("0.7,0.1,0.2")) == split_samples(ids[:n], 0, (70, 10, 20))


def test_mimic_link_and_copy_modes(tmp_path):
    src = make_mimic(tmp_path / "WikiMEL")
    linked, rep = prep.prepare("mimic", src, tmp_path / "linked", echo=False, progress=False)
    assert (linked / "images" / "kb").is_symlink() and (linked / "images" / "mention").is_symlink()
    assert rep.images == {"mention": {"referenced": 3, "missing": 1, "unreadable": 0},
                          "entity": {"referenced": 2, "missing": 1, "unreadable": 0}}
    assert rep.examples["missing_entity_images"] == ["entity 'Q1': images/kb/Q1_missing.jpg"]
    copied, rep2 = prep.prepare("mimic", src, tmp_path / "copied", images="copy", echo=False, progress=False)
    assert not (copied / "images" / "kb").is_symlink()
    assert sorted(p.name for p in (copied / "images" / "mention").iterdir()) == ["d1.gif", "m1.jpg"]
    assert rep2.images == rep.images
    ds = load_dataset(copied)
    assert [m.candidates for m in ds.mentions][0] == ("Q2", "Q3")
    none, rep3 = prep.prepare("mimic", src, tmp_path / "none", images="none", echo=False, progress=False)
    assert not (none / "images").exists() and rep3.mentions_with_image == 0 and rep3.entities_with_images == 0


def test_wikidiverse_and_wikiperson_convert(tmp_path):
    out, rep = prep.prepare("wikidiverse", make_wikidiverse(tmp_path / "wd"), tmp_path / "wd_out", echo=False,
                            progress=False)
    assert rep.ok and rep.mentions == 4 and rep.entities == 5 and rep.images["mention"]["missing"] == 0
    out, rep = prep.prepare("wikiperson", make_mimic(tmp_path / "wp", name="WikiPerson"), tmp_path / "wp_out",
                            echo=False, progress=False)
    assert rep.ok and load_dataset(out).info.source_format == "wikiperson"


def test_failed_conversion_writes_nothing_and_keeps_previous(tmp_path, capsys):
    src = write_json(tmp_path / "good.json", MELBENCH)
    out = tmp_path / "out"
    assert prep.main(["--format", "melbench", "--src", str(src), "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_json(tmp_path / "bad.json", {"s1": {"sentence": "a", "mentions": ["a"], "entities": ["A"],
                                                    "answer": ["Q1", "Q2"]}})
    capsys.readouterr()
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(bad), "--out", str(out), "--quiet",
                               "--strict"]) == 2
    err = first_line(capsys.readouterr().err)
    assert err == f"error: {bad}, sample 's1', field 'answer': has 2 item(s) but 'mentions' has 1\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # without --strict the bad sample is dropped: 1 of 1 records is more than the default 1%
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(bad), "--out", str(tmp_path / "new"),
                               "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: 1 of 1 records are invalid, more than --max-invalid 1% "
                                              "allows (0); nothing written. First: ")
    assert not (tmp_path / "new").exists()
    assert siblings(tmp_path) == ["bad.json", "good.json", "out"]


def test_validation_errors_fail_the_conversion(tmp_path):
    src = tmp_path / "uni"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({"name": "u", "source_format": "test"}))
    (src / "entities.jsonl").write_text(json.dumps({"id": "E1", "name": "One"}) + "\n")
    (src / "mentions.jsonl").write_text(
        json.dumps({"id": "m1", "sentence": "One", "mention": "One", "gold_id": "E1", "split": "train"}) + "\n"
        + json.dumps({"id": "m2", "sentence": "Two", "mention": "Two", "gold_id": "E2", "split": "test"}) + "\n")
    with pytest.raises(prep.ConversionError) as err:
        prep.prepare("unified", src, tmp_path / "out", echo=False, progress=False, strict=True)
    assert str(err.value) == (f"{tmp_path / 'out'}: conversion failed validation, nothing written: "
                              "gold_not_in_kb: 1 (e.g. mention 'm2': gold 'E2')")
    assert err.value.report.errors["gold_not_in_kb"] == 1
    assert siblings(tmp_path) == ["uni"]


def test_unified_reader_drops_what_load_dataset_rejects(tmp_path):
    """A mention naming an entity outside the KB: load_dataset stops at it, the unified reader drops and lists it,
    both with the error naming the file, the mention and the field (gold first, then candidates)."""
    src = tmp_path / "uni"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({"name": "u", "source_format": "test"}))
    (src / "entities.jsonl").write_text(json.dumps({"id": "E1", "name": "One"}) + "\n")
    rows = [{"id": "m1", "sentence": "One", "mention": "One", "gold_id": "E1", "split": "train"},
            {"id": "m2", "sentence": "One", "mention": "One", "gold_id": "E1", "split": "test",
             "candidates": ["E1", "E7"]},
            {"id": "m3", "sentence": "Two", "mention": "Two", "gold_id": "E2", "split": "dev", "candidates": ["E8"]}]
    (src / "mentions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mentions = src / "mentions.jsonl"
    with pytest.raises(DataError) as err:
        load_dataset(src)
    assert str(err.value) == f"{mentions}, id 'm2', field 'candidates': entity 'E7' is not in entities.jsonl"
    conv = READERS["unified"](src, progress=False)
    assert [m.id for m in conv.mentions] == ["m1"]
    assert [str(d) for d in conv.dropped] == [
        f"{mentions}, id 'm2', field 'candidates': entity 'E7' is not in entities.jsonl",
        f"{mentions}, id 'm3', field 'gold_id': entity 'E2' is not in entities.jsonl"]


def test_unified_reconversion_and_in_place_validation(tmp_path):
    first, _ = prep.prepare("mimic", make_mimic(tmp_path / "src"), tmp_path / "first", echo=False, progress=False)
    second, rep = prep.prepare("unified", first, tmp_path / "second", echo=False, progress=False)
    assert load_dataset(second).mentions == load_dataset(first).mentions
    assert rep.images["mention"]["missing"] == 1 and (second / "images").is_symlink()
    (first / "validation.json").unlink()
    _, rep2 = prep.prepare("unified", first, first, echo=False, progress=False)
    assert rep2.ok and (first / "validation.json").is_file()


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    src = write_json(tmp_path / "m.json", MELBENCH)
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds entries prepare did not write \(notes.txt\); refusing to replace it"):
        prep.prepare("melbench", src, other, echo=False, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_validate_cli_counts_every_problem(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "probe", "source_format": "test"}))
    (root / "entities.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"id": "E1", "name": "One", "images": ["images/e1.jpg"]},
        {"id": "E1", "name": "Dup"},
        {"id": "E2", "name": ""},
    ]) + "\n")
    write_image(root / "images" / "e1.jpg")
    (root / "mentions.jsonl").write_text("\n".join([
        json.dumps({"id": "m1", "sentence": "", "mention": "One", "gold_id": "E1", "split": "train"}),
        json.dumps({"id": "m1", "sentence": "One", "mention": "One", "gold_id": "E1", "split": "train"}),
        json.dumps({"id": "m2", "sentence": "a One", "mention": "Uno", "gold_id": "E9", "split": "dev",
                    "image": "../outside.jpg", "candidates": ["E1", "E7"]}),
        "{broken",
    ]) + "\n")
    rc = val.main([str(root), "--quiet"])
    assert rc == 1
    rep = json.loads((root / "validation.json").read_text())
    assert rep["ok"] is False and rep["dataset"] == "probe"
    assert rep["entities"] == 1 and rep["mentions"] == 2
    assert {k: v for k, v in rep["errors"].items() if v} == {
        "malformed_records": 2, "duplicate_entity_ids": 1, "duplicate_mention_ids": 1, "gold_not_in_kb": 1,
        "candidates_not_in_kb": 1, "image_paths_outside_dataset": 1}
    assert {k: v for k, v in rep["warnings"].items() if v} == {
        "empty_sentences": 1, "mention_not_in_sentence": 1, "empty_splits": 1}
    assert rep["examples"]["malformed_records"] == [
        f"{root / 'entities.jsonl'}, line 3 (id 'E2'), field 'name': must not be empty",
        f"{root / 'mentions.jsonl'}, line 4: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert rep["examples"]["duplicate_mention_ids"] == [
        f"{root / 'mentions.jsonl'}, line 2 (id 'm1'), field 'id': duplicate id, first seen on line 1"]
    assert "dataset probe" in capsys.readouterr().out
    assert run_cli(val.main, [str(tmp_path / "absent")]) == 2


def test_report_rule_lists_are_disjoint():
    assert not set(val.ERROR_KINDS) & set(val.WARNING_KINDS)
    with pytest.raises(ValueError, match="image_check must be one of verify, exists, none"):
        val.validate_records(".", "x", [], [], image_check="maybe")
    assert issubclass(prep.ConversionError, ValueError) and not issubclass(prep.ConversionError, DataError)


def _tiny_unified(root: Path, info: dict) -> Path:
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(info))
    (root / "entities.jsonl").write_text(json.dumps({"id": "E1", "name": "One"}) + "\n")
    (root / "mentions.jsonl").write_text(json.dumps({"id": "m1", "sentence": "One", "mention": "One",
                                                     "gold_id": "E1", "split": "train"}) + "\n")
    return root


def test_non_utf8_line_is_a_malformed_record_naming_file_and_line(tmp_path):
    root = _tiny_unified(tmp_path / "ds", {"name": "probe", "source_format": "test"})
    with (root / "entities.jsonl").open("ab") as fh:
        fh.write(b'{"id": "E2", "name": "Caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value).startswith(f"{root / 'entities.jsonl'}, line 2: not UTF-8 text (")
    rep = val.validate_dataset(root, progress=False)
    assert rep.errors["malformed_records"] == 1 and rep.entities == 1
    assert rep.examples["malformed_records"][0].startswith(f"{root / 'entities.jsonl'}, line 2: not UTF-8 text (")


@pytest.mark.parametrize("info", [{"name": "probe"}, {"name": "probe", "source_format": "t", "extra": 1}])
def test_validate_rejects_dataset_info_that_load_dataset_rejects(tmp_path, info):
    root = _tiny_unified(tmp_path / "ds", info)
    with pytest.raises(DataError, match="not a valid dataset info object"):
        load_dataset(root)
    rep = val.validate_dataset(root, progress=False)
    assert not rep.ok and rep.errors["bad_dataset_info"] == 1
    assert rep.examples["bad_dataset_info"][0].startswith(f"{root / 'dataset.json'}: ")
