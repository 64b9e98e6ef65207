"""Readers of the public MEL releases on small fixture files, including malformed ones with exact errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from data_process.ingest.readers import (
    mimic_image_name,
    read_melbench,
    read_mimic,
    read_wikidiverse,
    read_wikiperson,
    split_samples,
)
from data_process.core.records import DataError


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# MELBench

MELBENCH = {
    "1": {"id": "1", "sentence": "Powers with Noel Harrison in a film", "mentions": ["Noel Harrison", "Powers"],
          "entities": ["Noel Harrison", "Stefanie Powers"], "answer": ["Q532915", "Q256474"]},
    "2": {"id": "2", "sentence": "Robertson of the Bucks", "mentions": "Robertson", "entities": "Oscar Robertson",
          "answer": "Q17717"},
    "3": {"sentence": "Earl of Aberdeen in 1850", "mentions": ["Earl Aberdeen"], "entities": ["George Hamilton-Gordon"],
          "answer": ["Q190000"]},
    "4": {"id": "4", "sentence": "Oscar Robertson again", "mentions": ["Oscar Robertson"],
          "entities": ["The Big O"], "answer": ["Q17717"]},
}


def test_melbench_list_and_string_forms(tmp_path):
    path = write_json(tmp_path / "Mini-MEL.json", MELBENCH)
    conv = read_melbench(path, seed=0, progress=False)
    by_id = {m.id: m for m in conv.mentions}
    assert list(by_id) == ["1-0", "1-1", "2-0", "3-0", "4-0"]
    assert by_id["1-0"].span == (12, 25) and by_id["1-1"].span == (0, 6)
    assert by_id["2-0"].mention == "Robertson" and by_id["2-0"].gold_id == "Q17717" and by_id["2-0"].span == (0, 9)
    assert by_id["3-0"].span is None  # 'Earl Aberdeen' is not verbatim in the sentence
    assert by_id["1-0"].split == by_id["1-1"].split
    assert all(m.image is None for m in conv.mentions)
    # KB: distinct gold QIDs, name of the first occurrence, no description
    assert [(e.id, e.name, e.description) for e in conv.entities] == [
        ("Q532915", "Noel Harrison", ""), ("Q256474", "Stefanie Powers", ""), ("Q17717", "Oscar Robertson", ""),
        ("Q190000", "George Hamilton-Gordon", "")]
    assert conv.info.notes["qids_with_several_names"] == 1
    assert conv.info.name == "Mini-MEL" and conv.info.source_format == "melbench"
    assert conv.info.split_rule.startswith("by sample, seed 0:")


def test_melbench_from_zip_and_folder(tmp_path):
    path = write_json(tmp_path / "src" / "Mini-MEL.json", MELBENCH)
    with zipfile.ZipFile(tmp_path / "mini.zip", "w") as zf:
        zf.write(path, "Mini-MEL.json")
    a = read_melbench(tmp_path / "mini.zip", progress=False)
    b = read_melbench(tmp_path / "src", progress=False)
    assert a.mentions == b.mentions and a.entities == b.entities
    assert a.info.notes["source"].endswith("mini.zip:Mini-MEL.json")


def test_melbench_images_named_by_sample_id(tmp_path):
    path = write_json(tmp_path / "m.json", MELBENCH)
    write_image(tmp_path / "imgs" / "1.jpg")
    write_image(tmp_path / "imgs" / "2.png")
    conv = read_melbench(path, image_dir=tmp_path / "imgs", progress=False)
    images = {m.id: m.image for m in conv.mentions}
    assert images == {"1-0": "images/mention/1.jpg", "1-1": "images/mention/1.jpg", "2-0": "images/mention/2.png",
                      "3-0": "images/mention/3.jpg", "4-0": "images/mention/4.jpg"}
    assert conv.image_links == {"images/mention": (tmp_path / "imgs").resolve()}


def test_split_samples_is_seeded_and_order_free():
    ids = [str(i) for i in range(100)]
    a = split_samples(ids, 0, (70, 10, 20))
    assert a == split_samples(list(reversed(ids)), 0, (70, 10, 20))
    assert sorted(a.values()).count("train") == 70 and list(a.values()).count("dev") == 10
    assert a != split_samples(ids, 1, (70, 10, 20))


@pytest.mark.parametrize(
    "sample, expected",
    [
        ({"sentence": "a b", "mentions": ["a", "b"], "entities": ["A", "B"], "answer": ["Q1"]},
         ", field 'answer': has 1 item(s) but 'mentions' has 2"),
        ({"sentence": "a b", "mentions": ["a"], "entities": ["A", "B"], "answer": ["Q1"]},
         ", field 'entities': has 2 item(s) but 'mentions' has 1"),
        ({"mentions": ["a"], "entities": ["A"], "answer": ["Q1"]}, ", field 'sentence': is missing"),
        ({"sentence": "a", "entities": ["A"], "answer": ["Q1"]}, ", field 'mentions': is missing"),
        ({"sentence": 5, "mentions": ["a"], "entities": ["A"], "answer": ["Q1"]},
         ", field 'sentence': must be a string, got int"),
        ({"sentence": "a", "mentions": 7, "entities": ["A"], "answer": ["Q1"]},
         ", field 'mentions': must be a string or a list of strings, got int"),
        ({"sentence": "a", "mentions": ["a"], "entities": ["A", 3], "answer": ["Q1"]},
         ", field 'entities': item 1 must be a string, got int"),
        ({"sentence": "a", "mentions": [], "entities": [], "answer": []}, ", field 'mentions': must not be an empty list"),
        ({"sentence": "a", "mentions": [""], "entities": ["A"], "answer": ["Q1"]},
         ", field 'mentions': item 0 must not be empty"),
        ({"sentence": "a", "mentions": ["a"], "entities": ["A"], "answer": ["X1"]},
         ", field 'answer': item 0 must be a Wikidata QID like 'Q42', got 'X1'"),
        ({"id": "9", "sentence": "a", "mentions": ["a"], "entities": ["A"], "answer": ["Q1"]},
         ", field 'id': is '9' but the sample's key is 's1'"),
        ({"id": 1, "sentence": "a", "mentions": ["a"], "entities": ["A"], "answer": ["Q1"]},
         ", field 'id': must be a string, got int"),
        (["not", "a", "dict"], ": sample must be a JSON object, got list"),
    ],
)
def test_melbench_malformed(tmp_path, sample, expected):
    path = write_json(tmp_path / "bad.json", {"s1": sample})
    with pytest.raises(DataError) as err:
        read_melbench(path, progress=False, strict=True)
    assert str(err.value) == f"{path}, sample 's1'{expected}"


def test_melbench_malformed_files(tmp_path):
    path = write_json(tmp_path / "list.json", [MELBENCH["1"]])
    with pytest.raises(DataError) as err:
        read_melbench(path, progress=False)
    assert str(err.value) == f"{path}, file: must be a JSON object mapping sample ids to samples, got list"
    bad = tmp_path / "broken.json"
    bad.write_text('{"1": ', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_melbench(bad, progress=False)
    assert str(err.value) == f"{bad}, file: invalid JSON (Expecting value at line 1, column 7)"
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        read_melbench(tmp_path / "missing.json", progress=False)
    with pytest.raises(ValueError, match="splits must be three non-negative numbers"):
        read_melbench(path, splits="70,30", progress=False)


# ---------------------------------------------------------------------------------------------
# MIMIC-style


def make_mimic(root: Path, *, qid2id: bool = True, mention_dir: str = "mention_image", name: str = "WIKIMEL",
               train=None, kb=None) -> Path:
    kb = kb if kb is not None else [
        {"id": 0, "qid": "Q1", "type": "entity", "entity_name": "AT%26T", "desc": "US telecom", "attr": "founded: 1885",
         "image_list": ["Q1_a.jpg", "Q1_missing.jpg"]},
        {"id": 1, "qid": "Q2", "name": "Bell", "description": "inventor", "attributes": {"born": "1847"}},
        {"id": 2, "qid": "Q3", "entity_name": "Edison", "image_list": []},
    ]
    write_json(root / "kb_entity.json", kb)
    if qid2id:
        (root / "qid2id.json").write_text(json.dumps({e["qid"]: e["id"] for e in kb}), encoding="utf-8")
    train = train if train is not None else [
        {"id": "m1", "sentence": "AT&T hired Bell", "mentions": "Bell", "entities": "Bell", "answer": "Q2",
         "imgPath": "http://example.org/pics/m1.png", "cands": ["Q2", "Q3"]},
        {"id": 7, "sentence": "Edison and AT&T", "mentions": ["Edison", "AT%26T"], "entities": ["Edison", "AT&T"],
         "answer": ["Q3", "Q1"], "imgPath": ""},
        {"id": "m3", "sentence": "someone unknown", "mentions": "someone", "answer": "nil", "imgPath": "m3.jpg"},
    ]
    write_json(root / f"{name}_train.json", train)
    write_json(root / f"{name}_dev.json", [
        {"id": "d1", "sentence": "Bell speaks", "mentions": "Bell", "answer": "Q2", "imgPath": "d1.gif"}])
    write_json(root / f"{name}_test.json", [
        {"id": "t1", "sentence": "the wizard", "mentions": "Edison", "answer": "Q3", "imgPath": "t1.jpg"}])
    write_image(root / "kb_image" / "Q1_a.jpg")
    write_image(root / mention_dir / "m1.jpg")
    write_image(root / mention_dir / "d1.gif")  # only the original name exists: used as is
    return root


def test_mimic_reader(tmp_path):
    src = make_mimic(tmp_path / "WikiMEL")
    conv = read_mimic(src, progress=False)
    ents = {e.id: e for e in conv.entities}
    assert list(ents) == ["Q1", "Q2", "Q3"]
    assert ents["Q1"].name == "AT&T" and ents["Q1"].description == "US telecom. founded: 1885"
    assert ents["Q1"].images == ("images/kb/Q1_a.jpg", "images/kb/Q1_missing.jpg")
    assert ents["Q2"].name == "Bell" and ents["Q2"].attributes == {"born": "1847"}
    ms = {m.id: m for m in conv.mentions}
    assert list(ms) == ["m1", "7-0", "7-1", "d1", "t1"]
    assert ms["m1"].image == "images/mention/m1.jpg" and ms["m1"].candidates == ("Q2", "Q3")
    assert ms["m1"].span == (11, 15) and ms["m1"].split == "train"
    assert ms["7-1"].mention == "AT&T" and ms["7-1"].span == (11, 15)  # URL-unquoted to match the sentence
    assert ms["7-0"].image is None
    assert ms["d1"].image == "images/mention/d1.gif" and ms["d1"].split == "dev"
    assert ms["t1"].image == "images/mention/t1.jpg" and ms["t1"].span is None
    assert conv.info.name == "WIKIMEL" and conv.info.notes["skipped_nil"] == 1
    assert conv.info.notes["qid2id"] == "qid2id.json"
    assert conv.image_links == {"images/mention": (src / "mention_image").resolve(),
                                "images/kb": (src / "kb_image").resolve()}


def test_mimic_variants_without_qid2id_and_mention_images(tmp_path):
    src = make_mimic(tmp_path / "Richpedia", qid2id=False, mention_dir="mention_images", name="RichpediaMEL")
    conv = read_mimic(src, progress=False)
    assert conv.info.notes["qid2id"] == "derived from kb_entity.json (file missing)"
    assert conv.image_links["images/mention"] == (src / "mention_images").resolve()
    assert conv.info.name == "RichpediaMEL" and len(conv.mentions) == 5


def test_mimic_image_renaming_convention():
    assert mimic_image_name("http://commons/x/Some_Pic.PNG") == "Some_Pic.jpg"
    assert mimic_image_name("a.b.jpeg") == "a.jpg"


def test_wikiperson_uses_the_mimic_layout(tmp_path):
    src = make_mimic(tmp_path / "WikiPerson", name="WikiPerson")
    conv = read_wikiperson(src, progress=False)
    assert conv.info.source_format == "wikiperson" and conv.info.name == "WikiPerson" and len(conv.mentions) == 5


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"id": "x", "sentence": "s", "mentions": "s", "answer": "Q999", "imgPath": ""},
         "record 0 (id 'x'), field 'answer': unknown QID 'Q999' (not in kb_entity.json)"),
        ({"id": "x", "sentence": "s", "mentions": "s", "answer": "Q1", "cands": ["Q1", "Q404"]},
         "record 0 (id 'x'), field 'cands': unknown QID 'Q404' (not in kb_entity.json)"),
        ({"id": "x", "sentence": "s", "mentions": "s", "answer": "Q1", "cands": "Q1"},
         "record 0 (id 'x'), field 'cands': must be a list of QID strings, got str"),
        ({"id": "x", "sentence": "a b", "mentions": ["a", "b"], "answer": ["Q1"]},
         "record 0 (id 'x'), field 'answer': has 1 item(s) but 'mentions' has 2"),
        ({"id": "x", "sentence": "a b", "mentions": ["a"], "entities": ["A", "B"], "answer": ["Q1"]},
         "record 0 (id 'x'), field 'entities': has 2 item(s) but 'mentions' has 1"),
        ({"id": "x", "mentions": "s", "answer": "Q1"}, "record 0 (id 'x'), field 'sentence': is missing"),
        ({"sentence": "s", "mentions": "s", "answer": "Q1"}, "record 0, field 'id': is missing"),
        ({"id": "x", "sentence": "s", "mentions": "s", "answer": "Q1", "imgPath": 3},
         "record 0 (id 'x'), field 'imgPath': must be a string, got int"),
        ({"id": True, "sentence": "s", "mentions": "s", "answer": "Q1"},
         "record 0, field 'id': must be a string or an integer, got bool"),
        ("just text", "record 0: record must be a JSON object, got str"),
    ],
)
def test_mimic_malformed_mentions(tmp_path, record, expected):
    src = make_mimic(tmp_path / "bad", train=[record])
    with pytest.raises(DataError) as err:
        read_mimic(src, progress=False, strict=True)
    assert str(err.value) == f"{src / 'WIKIMEL_train.json'}, {expected}"


@pytest.mark.parametrize(
    "kb, expected",
    [
        ([{"id": 0, "qid": "Q1", "name": "A"}, {"id": 1, "qid": "Q1", "name": "B"}],
         "entity 1 (qid 'Q1'), field 'qid': duplicate qid, first seen at entity 0"),
        ([{"id": 0, "qid": "Q1", "name": "A"}, {"id": 0, "qid": "Q2", "name": "B"}],
         "entity 1 (qid 'Q2'), field 'id': duplicate id 0, also used by qid 'Q1'"),
        ([{"id": "0", "qid": "Q1", "name": "A"}], "entity 0 (qid 'Q1'), field 'id': must be an integer row index, got str"),
        ([{"id": 0, "qid": "Q1"}],
         "entity 0 (qid 'Q1'), field 'entity_name': is missing (neither 'entity_name' nor 'name' is given)"),
        ([{"id": 0, "name": "A"}], "entity 0, field 'qid': is missing"),
        ([{"id": 0, "qid": "Q1", "name": "A", "image_list": "a.jpg"}],
         "entity 0 (qid 'Q1'), field 'image_list': must be a list of non-empty image file names"),
        ([{"id": 0, "qid": "Q1", "name": "A", "attr": ["x"]}],
         "entity 0 (qid 'Q1'), field 'attr': must be a string or an object mapping strings to strings, got list"),
        ({"Q1": {}}, "file: must be a JSON list of entities, got dict"),
    ],
)
def test_mimic_malformed_kb(tmp_path, kb, expected):
    src = make_mimic(tmp_path / "bad", kb=kb, qid2id=False)
    with pytest.raises(DataError) as err:
        read_mimic(src, progress=False, strict=True)
    assert str(err.value) == f"{src / 'kb_entity.json'}, {expected}"


def test_mimic_qid2id_must_agree_with_the_kb(tmp_path):
    src = make_mimic(tmp_path / "bad")
    (src / "qid2id.json").write_text(json.dumps({"Q1": 0, "Q2": 5}), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_mimic(src, progress=False, strict=True)
    assert str(err.value) == f"{src / 'qid2id.json'}, qid 'Q2': maps to 5 but kb_entity.json gives id 1"
    (src / "qid2id.json").write_text(json.dumps({"Q77": 0}), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_mimic(src, progress=False, strict=True)
    assert str(err.value) == f"{src / 'qid2id.json'}, qid 'Q77': is not in kb_entity.json"


def test_mimic_missing_files(tmp_path):
    src = make_mimic(tmp_path / "bad")
    (src / "WIKIMEL_dev.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_mimic(src, progress=False)
    assert str(err.value) == (f"{src}: expected exactly one dev file "
                              "(<NAME>_dev.json or <NAME>_val.json or <NAME>_valid.json), found 0")
    with pytest.raises(FileNotFoundError, match="release folder not found"):
        read_mimic(tmp_path / "nowhere", progress=False)


# ---------------------------------------------------------------------------------------------
# WikiDiverse original


def make_wikidiverse(root: Path, train=None) -> Path:
    train = train if train is not None else [
        ["The Lions versus the Packers (2007).", "https://upload.wikimedia.org/x/06/Lions%20Play.jpg", "sports",
         [["Lions", "Organization", 4, 9, "https://en.wikipedia.org/wiki/Detroit_Lions"],
          ["Packers", "Organization", 0, 3, "https://en.wikipedia.org/wiki/Green_Bay_Packers"],
          ["2007", "Date", 30, 34, ""]]],
    ]
    write_json(root / "train.json", train)
    write_json(root / "valid.json", [["Obama in Paris", "", "politics",
                                      [["Obama", "Person", 0, 5, "https://en.wikipedia.org/wiki/Barack_Obama"]]]])
    write_json(root / "test.json", [["Caf\u00e9 owners", None, "news",
                                     [["Caf\u00e9", "Org", 0, 4, "https://en.wikipedia.org/wiki/Caf%C3%A9"]]]])
    (root / "entity2desc.txt").write_text(
        "https://en.wikipedia.org/wiki/Detroit_Lions@@@@American football team\n"
        "Barack_Obama@@@@44th US president\n"
        "Paris@@@@capital of France\n", encoding="utf-8")
    write_image(root / "images" / "Lions Play.jpg")
    return root


def test_wikidiverse_reader(tmp_path):
    src = make_wikidiverse(tmp_path / "wd")
    conv = read_wikidiverse(src, progress=False)
    ms = {m.id: m for m in conv.mentions}
    assert list(ms) == ["train-0-0", "train-0-1", "dev-0-0", "test-0-0"]
    assert ms["train-0-0"].gold_id == "Detroit_Lions" and ms["train-0-0"].span == (4, 9)
    assert ms["train-0-1"].span == (21, 28)  # wrong offsets repaired by search
    assert ms["train-0-0"].image == "images/mention/Lions Play.jpg"
    assert ms["dev-0-0"].image is None and ms["test-0-0"].gold_id == "Caf\u00e9"
    ents = {e.id: e for e in conv.entities}
    assert list(ents) == ["Detroit_Lions", "Barack_Obama", "Paris", "Green_Bay_Packers", "Caf\u00e9"]
    assert ents["Detroit_Lions"].name == "Detroit Lions" and ents["Detroit_Lions"].description == "American football team"
    assert ents["Green_Bay_Packers"].description == ""
    assert conv.info.notes["skipped_nil"] == 1 and conv.info.notes["spans_repaired"] == 1
    assert conv.info.notes["gold_without_description"] == 2


@pytest.mark.parametrize(
    "item, expected",
    [
        ("text", "item 0: item must be a list [sentence, image_url, topic, mentions], got str"),
        (["s", "", "t"], "item 0: item must be a list [sentence, image_url, topic, mentions], got list of length 3"),
        ([1, "", "t", []], "item 0, field 'sentence': must be a string, got int"),
        (["s", "", "t", {}], "item 0, field 'mentions': must be a list of [mention, type, start, end, url], got dict"),
        (["s", "", "t", [["s", "T", "0", 1, "u"]]], "item 0, mention 0, field 'start/end': must be integers, got '0', 1"),
        (["s", "", "t", [["s", "T", 0]]], "item 0, mention 0: must be a list [mention, type, start, end, url]"),
    ],
)
def test_wikidiverse_malformed(tmp_path, item, expected):
    src = make_wikidiverse(tmp_path / "wd", train=[item])
    with pytest.raises(DataError) as err:
        read_wikidiverse(src, progress=False, strict=True)
    assert str(err.value) == f"{src / 'train.json'}, {expected}"


def test_wikidiverse_bad_description_file(tmp_path):
    src = make_wikidiverse(tmp_path / "wd")
    (src / "entity2desc.txt").write_text("A@@@@a\nno separator here\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_wikidiverse(src, progress=False)
    assert str(err.value) == f"{src / 'entity2desc.txt'}, line 2: expected '<entity>@@@@<description>'"


def test_mimic_records_sharing_an_id_get_occurrence_suffixes(tmp_path):
    train = [{"id": "s5", "sentence": "Bell and Edison", "mentions": "Bell", "answer": "Q2"},
             {"id": "s5", "sentence": "Bell and Edison", "mentions": "Edison", "answer": "Q3"},
             {"id": "t1", "sentence": "Bell", "mentions": "Bell", "answer": "Q2"}]  # t1 also in the test file
    conv = read_mimic(make_mimic(tmp_path / "rep", train=train), progress=False)
    assert [m.id for m in conv.mentions] == ["s5#0", "s5#1", "t1#0", "d1", "t1#1"]
    assert conv.info.notes["repeated_record_ids"] == 2


def test_wikidiverse_description_file_not_utf8_names_file_and_line(tmp_path):
    src = make_wikidiverse(tmp_path / "wd")
    (src / "entity2desc.txt").write_bytes(b"A@@@@a\nB@@@@caf\xe9\n")
    # a bad byte in a description (non-essential) is mended and listed; the entity stays (issue 26, item 15)
    conv = read_wikidiverse(src, progress=False)
    assert {e.id: e.description for e in conv.entities}["B"] == "caf\ufffd"
    assert [str(r) for r in conv.repaired] == [
        f"{src / 'entity2desc.txt'}, line 2, field 'description': not UTF-8 text (invalid continuation byte at byte "
        "8 of the line); the bad bytes are replaced by U+FFFD, the entity kept"]
    with pytest.raises(DataError) as err:
        read_wikidiverse(src, progress=False, strict=True)
    assert str(err.value).startswith(f"{src / 'entity2desc.txt'}, line 2, field 'description': not UTF-8 text (")
    # in the entity's name it is fatal, naming file and line
    (src / "entity2desc.txt").write_bytes(b"A@@@@a\nB\xe9@@@@cafe\n")
    with pytest.raises(DataError) as err:
        read_wikidiverse(src, progress=False)
    assert str(err.value).startswith(f"{src / 'entity2desc.txt'}, line 2: not UTF-8 text (")
