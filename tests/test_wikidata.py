"""prepare --format wikidata (issue 28, part 1): Wikidata JSON dumps built here in the published layout (a '[' line,
one entity a line followed by ',', a ']' line; plain, gzip, bzip2) with the real JSON shape of entities."""

from __future__ import annotations

import bz2
import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from data_process.core.records import DataError, Entity, load_dataset
from data_process.ingest import prepare as prep
from data_process.ingest import validate as val
from data_process.ingest.readers.wikidata import language_chain, read_wikidata
from tests.test_prepare import first_line, run_cli


def term(lang: str, value: str) -> dict:
    return {"language": lang, "value": value}


def statement(qid: str, prop: str, datavalue: dict, datatype: str, rank: str = "normal") -> dict:
    return {"mainsnak": {"snaktype": "value", "property": prop, "hash": "0f1e", "datavalue": datavalue,
                         "datatype": datatype},
            "type": "statement", "id": f"{qid}$6a1b-{prop}", "rank": rank}


def item(qid: str, labels: dict[str, str], descriptions: dict[str, str] | None = None,
         aliases: dict[str, list[str]] | None = None, p31: tuple[str, ...] = (), p18: tuple[str, ...] = (),
         sites: tuple[str, ...] = (), deprecated_p31: tuple[str, ...] = ()) -> dict:
    """An item as the dumps write it (keys in the dumps' order: type and id first)."""
    claims: dict[str, list] = {}
    for cls, rank in [(c, "normal") for c in p31] + [(c, "deprecated") for c in deprecated_p31]:
        claims.setdefault("P31", []).append(statement(qid, "P31", {
            "value": {"entity-type": "item", "numeric-id": int(cls[1:]), "id": cls}, "type": "wikibase-entityid"},
            "wikibase-item", rank))
    for name in p18:
        claims.setdefault("P18", []).append(statement(qid, "P18", {"value": name, "type": "string"}, "commonsMedia"))
    claims["P569"] = [{"mainsnak": {"snaktype": "somevalue", "property": "P569", "datatype": "time"},
                       "type": "statement", "rank": "normal",
                       "references": [{"snaks": {"P248": [{"snaktype": "value", "property": "P248", "datavalue": {
                           "value": {"entity-type": "item", "numeric-id": 36578, "id": "Q36578"},
                           "type": "wikibase-entityid"}}]}}]}]
    return {"type": "item", "id": qid,
            "labels": {k: term(k, v) for k, v in labels.items()},
            "descriptions": {k: term(k, v) for k, v in (descriptions or {}).items()},
            "aliases": {k: [term(k, v) for v in vs] for k, vs in (aliases or {}).items()},
            "claims": claims,
            "sitelinks": {f"{s}wiki": {"site": f"{s}wiki", "title": labels.get(s, qid), "badges": []} for s in sites},
            "pageid": int(qid[1:]) + 100, "ns": 0, "title": qid, "lastrevid": 2000000000,
            "modified": "2025-01-01T00:00:00Z"}


def prop(pid: str) -> dict:
    return {"type": "property", "datatype": "wikibase-item", "id": pid, "labels": {"en": term("en", "instance of")},
            "descriptions": {}, "aliases": {}, "claims": {}, "pageid": 3918489, "ns": 120, "title": f"Property:{pid}"}


def lexeme(lid: str) -> dict:
    return {"type": "lexeme", "id": lid, "lemmas": {"en": term("en", "cat")}, "lexicalCategory": "Q1084",
            "language": "Q1860", "claims": {}, "forms": [], "senses": [], "ns": 146, "title": f"Lexeme:{lid}"}


ADAMS = item("Q42", {"en": "Douglas Adams", "mul": "Douglas Adams", "fr": "Douglas Adams"},
             {"en": "English writer and humorist (1952-2001)", "fr": "écrivain anglais"},
             {"en": ["Douglas Noël Adams", "Douglas Noel Adams"], "mul": ["DNA", "Douglas Adams"],
              "fr": ["D. Adams"]},
             p31=("Q5",), p18=("Douglas adams portrait cropped.jpg",), sites=("en", "de", "fr"))
BERLIN = item("Q64", {"en": "Berlin", "de": "Berlin"}, {"en": "capital and largest city of Germany",
                                                        "de": "Hauptstadt Deutschlands"},
              {"de": ["Bärlin"]}, p31=("Q515", "Q1549591"), p18=("Berlin Skyline.jpg", "Berlin Skyline.jpg"),
              sites=("en", "de"))
MUNICH = item("Q1726", {"de": "München", "mul": "Munich", "en": "Munich"},
              {"en": "capital of Bavaria", "de": "Landeshauptstadt von Bayern", "de-ch": "Hauptstadt Bayerns"},
              {"en": ["Muenchen"], "de": ["Minga"], "mul": ["MUC"]}, p31=("Q515",), sites=("en", "de", "it"))
ONLY_MUL = item("Q80", {"mul": "Tim Berners-Lee"}, {"en": "English computer scientist"},
                {"mul": ["TimBL"]}, p31=("Q5",), deprecated_p31=("Q515",), sites=("en",))
NO_LABEL = item("Q12345", {"fr": "seulement en français"}, p31=("Q5",), sites=("fr",))
ENTITIES = [ADAMS, prop("P31"), BERLIN, lexeme("L7"), MUNICH, ONLY_MUL, NO_LABEL]


def dump_text(entities: list[dict]) -> str:
    return "[\n" + ",\n".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in entities) + "\n]\n"


def write_dump(path: Path, entities: list[dict] | None = None, text: str | None = None) -> Path:
    data = (text if text is not None else dump_text(ENTITIES if entities is None else entities)).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else bz2.compress(data) if path.suffix == ".bz2"
                     else data)
    return path


# the English KB of ENTITIES, written by hand from the items above
EXPECTED_EN = [
    Entity("Q42", "Douglas Adams", "English writer and humorist (1952-2001)",
           aliases=("Douglas Noël Adams", "Douglas Noel Adams", "DNA"),
           images=("images/commons/Douglas_adams_portrait_cropped.jpg",)),
    Entity("Q64", "Berlin", "capital and largest city of Germany", images=("images/commons/Berlin_Skyline.jpg",)),
    Entity("Q1726", "Munich", "capital of Bavaria", aliases=("Muenchen", "MUC")),
    Entity("Q80", "Tim Berners-Lee", "English computer scientist", aliases=("TimBL",)),
]


def test_gz_bz2_and_plain_dumps_give_the_same_kb(tmp_path):
    kbs = []
    for name in ("latest-all.json", "latest-all.json.gz", "latest-all.json.bz2"):
        src = write_dump(tmp_path / "dumps" / name)
        out, rep = prep.prepare("wikidata", src, tmp_path / name.replace(".", "_"), echo=False, progress=False)
        assert rep.ok
        ds = load_dataset(out)
        assert ds.entities == EXPECTED_EN and ds.mentions == []
        assert ds.info.name == "latest-all" and ds.info.kind == "kb" and ds.info.source_format == "wikidata"
        kbs.append((out / "entities.jsonl").read_bytes())
    assert kbs[0] == kbs[1] == kbs[2]


def test_skipped_kinds_are_counted_and_a_kb_only_dataset_validates(tmp_path, capsys):
    src = write_dump(tmp_path / "dump.json.gz")
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(tmp_path / "kb"),
                               "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"dataset dump ({tmp_path / 'kb'}): OK (a KB-only dataset: entities, no mentions)\n")
    assert "  skipped (in the source, not converted): properties 1, lexemes 1, items_without_label 1\n" in printed
    report = json.loads((tmp_path / "kb" / "validation.json").read_text())
    assert report["skipped"] == {"properties": 1, "lexemes": 1, "items_without_label": 1}
    assert report["kind"] == "kb" and report["ok"] and report["entities"] == 4 and report["mentions"] == 0
    assert report["warnings"]["empty_splits"] == 0            # no mentions is what a KB is
    assert report["warnings"]["missing_entity_images"] == 2   # P18 names recorded, nothing downloaded
    assert report["records_read"] == 7 and report["dropped"] == []
    info = json.loads((tmp_path / "kb" / "dataset.json").read_text())
    assert info["kind"] == "kb" and info["split_rule"] == "none: a KB-only dataset (entities, no mentions)"
    assert info["notes"]["language_chain"] == ["en", "mul"]
    assert info["notes"]["skipped"] == {"properties": 1, "lexemes": 1, "other_entity_types": 0,
                                        "items_without_label": 1, "items_filtered_out": 0}
    rep = val.validate_dataset(tmp_path / "kb", progress=False)
    assert rep.ok and rep.kind == "kb" and rep.warnings["empty_splits"] == 0
    # a KB-only dataset that holds mentions contradicts itself
    (tmp_path / "kb" / "mentions.jsonl").write_text(json.dumps(
        {"id": "m", "sentence": "Berlin", "mention": "Berlin", "gold_id": "Q64", "split": "test"}) + "\n")
    assert val.validate_dataset(tmp_path / "kb", progress=False).errors["bad_dataset_info"] == 1


@pytest.mark.parametrize("kind", ["mid-line", "no closing bracket", "gz bytes cut", "bz2 bytes cut"])
def test_a_truncated_dump_is_one_error_and_publishes_nothing(tmp_path, capsys, kind):
    text = dump_text(ENTITIES)
    out = tmp_path / "kb"
    prep.prepare("wikidata", write_dump(tmp_path / "whole.json"), out, echo=False, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lines = text.splitlines(keepends=True)
    if kind == "mid-line":          # a download cut inside line 6 (MUNICH)
        src = write_dump(tmp_path / "cut.json", text="".join(lines[:5]) + lines[5][:40])
        expected = (f"error: {src}, line 6 (id 'Q1726'): the dump is cut here, mid-entity (invalid JSON "
                    f"(Unterminated string starting at at column 39)), with no closing ']' line: a broken "
                    "download? Nothing written\n")
    elif kind == "no closing bracket":
        src = write_dump(tmp_path / "cut.json", text="".join(lines[:-1]))
        expected = (f"error: {src}, end of file: the dump ends without its closing ']' line: a broken download? "
                    "Nothing written\n")
    else:
        whole = write_dump(tmp_path / f"whole.json.{kind[:3].strip()}")
        src = tmp_path / f"cut.json.{kind[:3].strip()}"
        src.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) * 2 // 3])
        expected = None
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2       # the error line, and the --debug hint
    if expected is not None:
        assert first_line(err) == expected
    else:
        assert first_line(err).startswith(f"error: {src}, line ") and "the compressed dump is cut or corrupt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_filters_ids_instance_of_and_sitelinks(tmp_path, capsys):
    src = write_dump(tmp_path / "dump.json.bz2")
    ids = tmp_path / "ids.txt"
    ids.write_text("# my KB\nQ42\nQ64   # a city\n\nQ80\nQ999\n")
    conv = read_wikidata(src, ids=ids, progress=False)
    assert [e.id for e in conv.entities] == ["Q42", "Q64", "Q80"]
    assert conv.absent_ids == {"--ids without an item in the dump": ["Q999"]}
    assert conv.skipped == {"properties": 1, "lexemes": 1, "items_filtered_out": 2}   # Q1726, Q12345 not listed
    # P31: deprecated statements do not count (Q80's Q515)
    assert [e.id for e in read_wikidata(src, instance_of="Q515", progress=False).entities] == ["Q64", "Q1726"]
    assert [e.id for e in read_wikidata(src, instance_of="Q5,Q1549591", progress=False).entities] == [
        "Q42", "Q64", "Q80"]
    assert [e.id for e in read_wikidata(src, min_sitelinks=3, progress=False).entities] == ["Q42", "Q1726"]
    both = read_wikidata(src, instance_of="Q515", min_sitelinks=3, ids=ids, progress=False)
    assert both.entities == [] and both.skipped["items_filtered_out"] == 5
    out = tmp_path / "kb"
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(out), "--quiet",
                               "--ids", str(ids), "--min-sitelinks", "2"]) == 0
    capsys.readouterr()
    assert [e.id for e in load_dataset(out).entities] == ["Q42", "Q64"]
    assert json.loads((out / "validation.json").read_text())["absent_ids"] == {
        "--ids without an item in the dump": ["Q999"]}
    # bad filters: one line each
    ids.write_text("Q42\nBerlin\n")
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(tmp_path / "x"), "--quiet",
                               "--ids", str(ids)]) == 2
    assert first_line(capsys.readouterr().err) == f"error: {ids}, line 2: 'Berlin' is not a Wikidata item id like Q42\n"
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(tmp_path / "x"), "--quiet",
                               "--instance-of", "human"]) == 2
    assert first_line(capsys.readouterr().err) == ("error: --instance-of must be Wikidata item ids like Q5,Q515, got "
                                                   "'human'\n")
    mimic = tmp_path / "mimic"
    mimic.mkdir()
    assert run_cli(prep.main, ["--format", "mimic", "--src", str(mimic), "--out", str(tmp_path / "x"), "--quiet",
                               "--language", "de", "--min-sitelinks", "2"]) == 2
    assert first_line(capsys.readouterr().err) == ("error: --language, --min-sitelinks are only for --format "
                                                   "wikidata\n")


def test_language_chain_and_fallbacks(tmp_path):
    assert language_chain("en") == ("en", "mul")
    assert language_chain("de-ch") == ("de-ch", "de", "mul", "en")
    assert language_chain("DE_AT") == ("de-at", "de", "mul", "en")
    assert language_chain("pt") == ("pt", "pt-br", "mul", "en")
    assert language_chain("zh-hk") == ("zh-hk", "zh-hant", "zh-mo", "zh-tw", "zh", "zh-hans", "zh-cn", "zh-sg",
                                       "zh-my", "mul", "en")
    with pytest.raises(ValueError, match="--language must be a Wikimedia language code"):
        language_chain("Deutsch!")
    src = write_dump(tmp_path / "dump.json")
    kb = {e.id: e for e in read_wikidata(src, language="de-ch", progress=False).entities}
    # de-ch -> de: label and aliases of de, the de-ch description where there is one
    assert kb["Q1726"] == Entity("Q1726", "München", "Hauptstadt Bayerns", aliases=("Minga", "MUC"))
    assert kb["Q64"] == Entity("Q64", "Berlin", "Hauptstadt Deutschlands", aliases=("Bärlin",),
                               images=("images/commons/Berlin_Skyline.jpg",))
    # no de label: the mul default label (2024) before en; the description falls back to en (mul has none)
    assert kb["Q42"] == Entity("Q42", "Douglas Adams", "English writer and humorist (1952-2001)", aliases=("DNA",),
                               images=("images/commons/Douglas_adams_portrait_cropped.jpg",))
    assert kb["Q80"].name == "Tim Berners-Lee" and kb["Q80"].aliases == ("TimBL",)
    fr = {e.id: e for e in read_wikidata(src, language="fr", progress=False).entities}
    assert fr["Q42"] == Entity("Q42", "Douglas Adams", "écrivain anglais", aliases=("D. Adams", "DNA"),
                               images=("images/commons/Douglas_adams_portrait_cropped.jpg",))
    assert fr["Q12345"].name == "seulement en français" and fr["Q1726"].name == "Munich"   # mul, before en


def test_bad_lines_are_dropped_bad_fields_mended_and_the_layout_checked(tmp_path, capsys):
    broken = dict(BERLIN, labels=["Berlin"])
    odd = dict(MUNICH, descriptions={"en": {"language": "en", "value": 7}}, aliases={"en": "Muenchen"},
               claims={**MUNICH["claims"], "P18": [statement("Q1726", "P18", {"value": "a/b.jpg", "type": "string"},
                                                             "commonsMedia")]})
    reordered = {"id": "Q80", **ONLY_MUL}         # a line whose type does not lead it: parsed, then judged
    text = dump_text([ADAMS, broken, odd, reordered])
    lines = text.splitlines(keepends=True)
    lines.insert(2, '{"type":"item","id":"Q7","labels":{"en":\n')         # invalid JSON in the middle
    src = write_dump(tmp_path / "dump.json", text="".join(lines))
    conv = read_wikidata(src, progress=False)
    assert [e.id for e in conv.entities] == ["Q42", "Q1726", "Q80"]
    assert [str(d) for d in conv.dropped] == [
        f"{src}, line 3 (id 'Q7'): invalid JSON (Expecting value at column 41)",
        f"{src}, line 4 (id 'Q64'), field 'labels': must be an object {{language: ...}}, got list"]
    # a bad alias or image value is left out, the item kept (a description that is not a string is no description)
    assert conv.entities[1] == Entity("Q1726", "Munich")
    assert [str(r) for r in conv.repaired] == [
        f"{src}, line 5 (id 'Q1726'), field 'aliases': 'en' must be a list of terms, got str; the field is left out, "
        "the record kept",
        f"{src}, line 5 (id 'Q1726'), field 'images': P18 must be a Commons file name, got 'a/b.jpg'; the field is "
        "left out, the record kept"]
    with pytest.raises(DataError, match="line 3 \\(id 'Q7'\\): invalid JSON"):
        read_wikidata(src, progress=False, strict=True)
    # not the layout: no '[' line; two entities without a ',' between them; text after ']'
    for bad, message in (
            (dump_text([ADAMS])[2:], "line 1: a Wikidata JSON dump starts with a '[' line"),
            (dump_text([ADAMS, BERLIN]).replace("},\n{", "}\n{", 1), "line 2: no ',' after this entity, yet more "
                                                                      "lines follow"),
            (dump_text([ADAMS]) + "[\n", "line 4: text after the closing ']' line")):
        path = write_dump(tmp_path / "bad.json", text=bad)
        with pytest.raises(DataError) as err:
            read_wikidata(path, progress=False)
        assert str(err.value).startswith(f"{path}, {message}")


def test_memory_stays_flat_in_the_size_of_the_dump(tmp_path):
    """The dump streams: 10 times the items (about 10 times the bytes) read with the same KB kept costs about the same
    peak memory, far below the dump's size."""
    ids = tmp_path / "ids.txt"
    ids.write_text("Q42\nQ64\n")

    def peak(n: int) -> tuple[int, int]:
        filler = [item(f"Q{1000 + i}", {"en": f"filler {i}"}, {"en": "x" * 300}, p31=("Q5",),
                       p18=(f"f{i}.jpg",), sites=("en", "de", "fr")) for i in range(n)]
        src = write_dump(tmp_path / f"dump{n}.json.gz", [ADAMS, *filler, BERLIN])
        size = len(gzip.decompress(src.read_bytes()))
        tracemalloc.start()
        conv = read_wikidata(src, ids=ids, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert [e.id for e in conv.entities] == ["Q42", "Q64"]
        return top, size

    small, small_size = peak(300)
    big, big_size = peak(3000)
    assert big_size > 9 * small_size and big_size > 4_000_000
    assert big < 1.5 * small + 200_000 and big < big_size / 10


def _many_items_dump(path: Path, n: int) -> Path:
    """A gz dump of ``n`` small items (label, description, alias, P31, P18, sitelinks), the last one repeating the
    first's id, written a line at a time."""
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        fh.write("[\n")
        for i in range(1, n + 1):
            entity = item(f"Q{i}", {"en": f"item {i}"}, {"en": f"thing number {i}"}, {"en": [f"no. {i}"]},
                          p31=("Q5",), p18=(f"Picture {i}.jpg",), sites=("en",))
            fh.write(json.dumps(entity, separators=(",", ":"), ensure_ascii=False) + ",\n")
        fh.write(json.dumps(item("Q1", {"en": "item 1 again"}), separators=(",", ":")) + "\n]\n")
    return path


@pytest.mark.slow
def test_prepare_memory_is_flat_in_the_number_of_kept_entities(tmp_path):
    """prepare streams the kept entities into the staged folder: converting 4 times the items (5,000 and 20,000),
    every one kept, does not raise the peak of Python allocations (tracemalloc) beyond a small constant, where a KB
    held in memory until publishing grows with it (several hundred bytes an entity). The published files are those
    publishing the in-memory reader's list writes."""
    n = 5_000

    def peak(count: int) -> tuple[int, Path]:
        src = _many_items_dump(tmp_path / f"dump{count}.json.gz", count)
        out = tmp_path / f"kb{count}"
        tracemalloc.start()
        try:
            _, rep = prep.prepare("wikidata", src, out, echo=False, progress=False)
            top = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert rep.ok and rep.entities == count and rep.entities_with_images == count
        assert rep.warnings["missing_entity_images"] == count and rep.images["entity"]["referenced"] == count
        assert [d["reason"] for d in rep.dropped] == [f"duplicate item, first read at line 2 (id 'Q1')"]
        return top, out

    small, out = peak(n)
    big, _ = peak(4 * n)
    # slack: a resize of the interpreter's own tables (interned strings) during one run and not the other
    assert big < 1.5 * small + 1_000_000, (small, big)
    # the same files as publishing the KB read into a list (publish: the path of the other formats)
    converted = read_wikidata(tmp_path / f"dump{n}.json.gz", progress=False)
    assert len(converted.entities) == n and converted.entities[-1] == Entity(
        f"Q{n}", f"item {n}", f"thing number {n}", aliases=(f"no. {n}",), images=(f"images/commons/Picture_{n}.jpg",))
    listed, _ = prep.publish(converted, tmp_path / "listed", echo=False)
    for name in ("entities.jsonl", "mentions.jsonl", "dataset.json", "validation.json", "validation.txt"):
        assert (out / name).read_text().replace(str(out), "OUT") == (listed / name).read_text().replace(
            str(listed), "OUT"), name


def test_a_repeated_item_id_is_dropped_naming_its_first_read(tmp_path, capsys):
    """A second item with a kept item's id is a dropped record naming where the first was read; an id whose first
    item was skipped (no label) is no repeat. --strict: the first repeat is the error."""
    labelled = item("Q12345", {"en": "now in English"})
    src = write_dump(tmp_path / "dump.json", [ADAMS, NO_LABEL, BERLIN, dict(ADAMS), labelled, dict(BERLIN)])
    _, rep = prep.prepare("wikidata", src, tmp_path / "kb", echo=False, progress=False, max_invalid="2")
    assert [e.id for e in load_dataset(tmp_path / "kb").entities] == ["Q42", "Q64", "Q12345"]
    assert [(d["record"], d["field"], d["reason"]) for d in rep.dropped] == [
        ("line 5 (id 'Q42')", "id", "duplicate item, first read at line 2 (id 'Q42')"),
        ("line 7 (id 'Q64')", "id", "duplicate item, first read at line 4 (id 'Q64')")]
    assert run_cli(prep.main, ["--format", "wikidata", "--src", str(src), "--out", str(tmp_path / "strict"),
                               "--quiet", "--strict"]) == 2
    assert first_line(capsys.readouterr().err) == (f"error: {src}, line 5 (id 'Q42'), field 'id': duplicate item, "
                                                   "first read at line 2 (id 'Q42')\n")
    assert not (tmp_path / "strict").exists() and [p.name for p in tmp_path.iterdir() if p.name[0] == "."] == []
