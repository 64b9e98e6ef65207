"""The GHMFC/DIM release reader, and the drop-and-report policy every reader follows, on fixture releases; the real
GHMFC WikiMEL copy from ../shared/data when present."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from data_process.core.records import DataError, load_dataset
from data_process.ingest import prepare as prep
from data_process.ingest.readers import read_ghmfc, read_melbench, read_mimic
from tests.test_prepare import first_line, run_cli
from tests.test_readers import MELBENCH, make_mimic, write_image, write_json

SHARED = Path(os.environ.get("MEL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

KB = {"Q1": "Alice Smith", "Q2": "Bob Jones", "Q3": "Alice Cooper", "Q4": "River Avon"}
ABS = {"Q1": "Sex: female. Occupation: painter.", "Q2": "Sex: male. Occupation: footballer.",
       "Q3": "Sex: female. Occupation: singer.", "Q4": "river in England"}


def sample(sid, sentence, mentions, answers, **extra):
    return {"id": sid, "sentence": sentence, "mentions": mentions, "entities": [KB.get(a, "?") for a in answers],
            "answer": answers, **extra}


def make_release(root: Path, *, with_dev=True, nested=False) -> Path:
    base = root / "input_data" if nested else root
    write_json(base / "qid2ne.json", KB)
    write_json(base / "ne2qid.json", {v: k for k, v in KB.items()})
    write_json(base / "qid2abs.json", ABS)
    write_json(base / "qid2abs_long.json", {k: v + " More." for k, v in ABS.items()})
    write_json(base / "qids_ordered.json", ["Q4", "Q3", "Q2", "Q1"])
    write_json(root / "train.json", {
        "10": sample("10", "Alice painted", ["Alice"], ["Q1"], imgPath="10.jpg"),
        "11": sample("11", "Alice sang and Bob played", ["Alice", "Bob"], ["Q3", "Q2"]),
        "12": sample("12", "Bob again", ["Bob"], ["Q2"]),
    })
    if with_dev:
        write_json(root / "dev.json", {"20": sample("20", "Alice on stage", ["Alice"], ["Q3"])})
    write_json(root / "test.json", {"30": sample("30", "the Avon", ["Avon"], ["Q4"])})
    write_json(base / "search_top100.json", {"Alice": ["Q1", "Q3", "Q99"], "Bob": ["Q2", "Q1"]})
    write_json(base / "neg.json", {"keys_ordered": list(KB), "neg_iid": [[0]], "tfidf_neg": [[0]]})
    write_image(root / "images" / "10.jpg")
    write_image(root / "images" / "12.png")
    return root


def test_ghmfc_split_files_kb_candidates_and_images(tmp_path):
    conv = read_ghmfc(make_release(tmp_path / "rel"), progress=False)
    assert [e.id for e in conv.entities] == ["Q4", "Q3", "Q2", "Q1"]          # qids_ordered.json order
    assert conv.entities[0].description == "river in England" and conv.entities[0].name == "River Avon"
    by_id = {m.id: m for m in conv.mentions}
    assert sorted(by_id) == ["10-0", "11-0", "11-1", "12-0", "20-0", "30-0"]
    assert [by_id[i].split for i in ("10-0", "20-0", "30-0")] == ["train", "dev", "test"]
    assert by_id["11-1"].mention == "Bob" and by_id["11-1"].gold_id == "Q2" and by_id["11-1"].span == (15, 18)
    # candidate lists by mention string; Q99 is not in the KB and is removed; "Avon" has no list
    assert by_id["10-0"].candidates == ("Q1", "Q3") and by_id["12-0"].candidates == ("Q2", "Q1")
    assert by_id["30-0"].candidates is None
    notes = conv.info.notes
    assert notes["candidates"]["qids_not_in_kb_removed"] == 1 and notes["candidates"]["mentions_without_list"] == 1
    assert notes["neg.json"].startswith("present, not imported") and notes["ne2qid_disagreements"] == 0
    # images: imgPath, else <sample id>.<ext> in images/
    assert by_id["10-0"].image == "images/mention/10.jpg" and by_id["12-0"].image == "images/mention/12.png"
    assert by_id["20-0"].image == "images/mention/20.jpg"                    # referenced, missing: validation counts it
    assert conv.dropped == [] and conv.records_read == 4 + 5
    long = read_ghmfc(tmp_path / "rel", entity_text="long", progress=False)
    assert long.entities[0].description == "river in England More."


def test_ghmfc_splits_json_with_melbench_annotations(tmp_path):
    root = tmp_path / "rel"
    base = root / "input_data"
    write_json(base / "qid2ne.json", {"Q532915": "Noel Harrison", "Q256474": "Stefanie Powers",
                                      "Q17717": "Oscar Robertson", "Q190000": "George Hamilton-Gordon"})
    write_json(base / "splits.json", {"train": ["1", "2", "77"], "dev": ["3"], "test": ["4", "88", "99"]})
    ann = write_json(tmp_path / "ann" / "Wikidata-MEL.json", MELBENCH)
    with pytest.raises(FileNotFoundError, match="splits.json needs the MELBench annotations"):
        read_ghmfc(root, progress=False)
    conv = read_ghmfc(root, annotations=ann, progress=False)
    assert {m.id: m.split for m in conv.mentions} == {"1-0": "train", "1-1": "train", "2-0": "train",
                                                      "3-0": "dev", "4-0": "test"}
    assert conv.absent_ids["splits.json train ids without an annotation"] == ["77"]
    assert conv.absent_ids["splits.json test ids without an annotation"] == ["88", "99"]
    assert conv.info.notes["split_ids_without_annotation"] == {"train": 1, "dev": 0, "test": 2}
    assert conv.info.notes["entity_text"] == "none (qid2abs.json missing)"
    # the annotation file beside splits.json is found without --annotations
    zipped = base / "Wikidata-MEL.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(ann, "Wikidata-MEL.json")
    assert len(read_ghmfc(root, progress=False).mentions) == 5


def test_ghmfc_bad_records_are_dropped_and_listed_or_refused_with_strict(tmp_path):
    root = make_release(tmp_path / "rel", with_dev=False)
    train = json.loads((root / "train.json").read_text())
    train["13"] = sample("13", "Zed", ["Zed"], ["Q77"])                          # gold not in the KB
    train["14"] = {"id": "14", "sentence": "x", "mentions": ["x", "y"], "entities": ["X"], "answer": ["Q1"]}
    (root / "train.json").write_text(json.dumps(train))
    test = json.loads((root / "test.json").read_text())
    test["12"] = sample("12", "Bob again", ["Bob"], ["Q2"])                      # also in train
    (root / "test.json").write_text(json.dumps(test))
    conv = read_ghmfc(root, progress=False)
    assert [(d.record, d.field) for d in conv.dropped] == [("sample '13'", "answer"), ("sample '14'", "entities"),
                                                          ("sample '12'", "split")]
    assert conv.dropped[0].reason == "item 0: gold 'Q77' is not in the KB (qid2ne.json)"
    assert conv.dropped[2].reason == "also in train (kept there)"
    assert sorted(m.id for m in conv.mentions) == ["10-0", "11-0", "11-1", "12-0", "30-0"]
    assert conv.info.notes["dev_split"] == "dev.json absent: the dev split is empty"
    with pytest.raises(DataError) as err:
        read_ghmfc(root, progress=False, strict=True)
    assert str(err.value) == (f"{root / 'train.json'}, sample '13', field 'answer': item 0: gold 'Q77' is not in "
                              "the KB (qid2ne.json)")


def test_conversion_lists_dropped_records_and_respects_max_invalid(tmp_path, capsys):
    # a MELBench release of 40 samples, 2 of them bad: 5% invalid
    data = {str(i): {"id": str(i), "sentence": f"Alice {i}", "mentions": ["Alice"], "entities": ["Alice"],
                     "answer": [f"Q{i + 1}"]} for i in range(40)}
    data["7"]["answer"] = ["X"]
    data["9"]["mentions"] = ["Alice", "Bob"]
    src = write_json(tmp_path / "m.json", data)
    # default --max-invalid 1% of 40 records = 0: refused, nothing written
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(src), "--out", str(tmp_path / "a"),
                               "--quiet"]) == 2
    assert "2 of 40 records are invalid, more than --max-invalid 1% allows (0)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # --strict: the first bad record is the error
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(src), "--out", str(tmp_path / "a"), "--quiet",
                               "--strict"]) == 2
    assert first_line(capsys.readouterr().err) == (f"error: {src}, sample '7', field 'answer': item 0 must be a Wikidata QID "
                                       "like 'Q42', got 'X'\n")
    # allowed: converted, and both dropped samples are listed in the report
    for allow in ("5%", "2"):
        out = tmp_path / f"ok{allow[0]}"
        assert prep.main(["--format", "melbench", "--src", str(src), "--out", str(out), "--quiet",
                          "--max-invalid", allow]) == 0
        rep = json.loads((out / "validation.json").read_text())
        assert rep["records_read"] == 40 and [(d["record"], d["field"]) for d in rep["dropped"]] == [
            ("sample '7'", "answer"), ("sample '9'", "entities")]
        assert rep["dropped"][1] == {"file": str(src), "record": "sample '9'", "field": "entities",
                                     "reason": "has 1 item(s) but 'mentions' has 2"}
        assert len(load_dataset(out).mentions) == 38
        assert "dropped records: 2 of 40 read" in (out / "validation.txt").read_text()
    assert run_cli(prep.main, ["--format", "melbench", "--src", str(src), "--out", str(tmp_path / "b"), "--quiet",
                               "--max-invalid", "lots"]) == 2
    assert "--max-invalid must be a count (e.g. 25) or a share" in capsys.readouterr().err


def test_every_reader_drops_instead_of_stopping(tmp_path):
    mel = read_melbench(write_json(tmp_path / "m.json", {**MELBENCH, "bad": {"sentence": 3}}), progress=False)
    assert len(mel.dropped) == 1 and mel.records_read == len(MELBENCH) + 1
    src = make_mimic(tmp_path / "mimic", train=[{"id": "x", "sentence": "s", "mentions": "s", "answer": "Q999"}])
    mimic = read_mimic(src, progress=False)
    assert [(d.record, d.field) for d in mimic.dropped] == [("record 0 (id 'x')", "answer")]
    assert "unknown QID 'Q999'" in mimic.dropped[0].reason


def test_unified_reader_drops_gold_missing_from_the_kb(tmp_path):
    src = tmp_path / "uni"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({"name": "u", "source_format": "test"}))
    (src / "entities.jsonl").write_text(json.dumps({"id": "E1", "name": "One"}) + "\n{broken\n")
    rows = [{"id": f"m{i}", "sentence": "One", "mention": "One", "gold_id": "E1", "split": "train"} for i in range(8)]
    rows.append({"id": "m9", "sentence": "Two", "mention": "Two", "gold_id": "E2", "split": "test"})
    (src / "mentions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, rep = prep.prepare("unified", src, tmp_path / "out", echo=False, progress=False, max_invalid="25%",
                            check_images=False)
    assert rep.ok and rep.mentions == 8 and rep.records_read == 11
    assert [(d["record"], d["field"]) for d in rep.dropped] == [("line 2", None), ("id 'm9'", "gold_id")]


GHMFC_ZIP, ANN_ZIP = SHARED / "GHMFC-WikiMEL.zip", SHARED / "Wikidata-MEL.zip"


@pytest.mark.skipif(not (GHMFC_ZIP.is_file() and ANN_ZIP.is_file()),
                    reason=f"the real GHMFC WikiMEL copy is not at {SHARED} (set MEL_SHARED_DATA)")
@pytest.mark.slow
def test_real_ghmfc_wikimel_converts(tmp_path):
    src = tmp_path / "ghmfc"
    with zipfile.ZipFile(GHMFC_ZIP) as zf:
        zf.extractall(src)
    out, rep = prep.prepare("ghmfc", src, tmp_path / "wikimel", dataset_name="WikiMEL", annotations=ANN_ZIP,
                            echo=False, progress=False)
    splits = json.loads((src / "input_data" / "splits.json").read_text())
    assert rep.ok and rep.entities == 18_880 and rep.dropped == [] and rep.errors["gold_not_in_kb"] == 0
    absent = {k.split()[1]: len(v) for k, v in rep.absent_ids.items() if k.startswith("splits.json")}
    # every listed id is either converted or listed as absent
    ds = load_dataset(out)
    samples = {s: {m.id.rsplit("-", 1)[0] for m in ds.mentions if m.split == s} for s in ("train", "dev", "test")}
    assert {s: len(samples[s]) + absent[s] for s in samples} == {s: len(v) for s, v in splits.items()}
    assert absent == {"train": 1580, "dev": 230, "test": 471}
    assert rep.mentions_per_split == {"train": 18_088, "dev": 2_627, "test": 5_131}
    assert {m.gold_id for m in ds.mentions} <= {e.id for e in ds.entities}
    assert all(e.description for e in ds.entities)


def test_candidate_retriever_nearest_names_and_release_file(tmp_path):
    from data_process.ingest.candidates import main as candidates_main
    from data_process.ingest.candidates import nearest_names

    names = ["Bob", "Alicia", "Alice", "Al", "bobby"]
    # normalised edit distance: alice -> Alice 0, Alicia 2/6, Al 3/5; bob -> Bob 0, bobby 2/5, then three at 1.0
    # (Alicia, Alice, Al), ties in KB order
    assert nearest_names(["alice", "bob"], names, 3).tolist() == [[2, 1, 3], [0, 4, 1]]
    assert nearest_names(["bob"], names, 5).tolist() == [[0, 4, 1, 2, 3]]
    root = make_release(tmp_path / "rel")
    (root / "search_top100.json").unlink()
    assert candidates_main(["--src", str(root), "--k", "2"]) == 0
    lists = json.loads((root / "search_top100.json").read_text())
    assert lists == {"Alice": ["Q1", "Q3"], "Avon": ["Q4", "Q2"], "Bob": ["Q2", "Q4"]}
    assert run_cli(candidates_main, ["--src", str(root)]) == 2                     # never overwritten silently
    conv = read_ghmfc(root, progress=False)
    assert {m.id: m.candidates for m in conv.mentions}["30-0"] == ("Q4", "Q2")
