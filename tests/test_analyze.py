"""nel_model/reporting/analyze.py on a hand-built run folder: a tiny unified dataset and predictions written by hand, with
every bucket, metric and confusion computed by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.core.records import DatasetInfo, Entity, Mention, save_dataset
from nel_model.reporting import analyze
from nel_model.runs import RunError

PROV = {"provenance": {"model": "hand"}}

# 11 entities: "Paris" x3 (one spelled "paris  "), "Rome" x1, "Lyon" x6, "Oslo" x1
ENTITIES = ([Entity("E1", "Paris"), Entity("E2", "paris  "), Entity("E3", "Paris"), Entity("E4", "Rome")]
            + [Entity(f"E{i}", "Lyon") for i in range(5, 11)] + [Entity("E11", "Oslo")])


def _m(mid, text, gold, split="test", image=False, caption=False, enrichment=False):
    return Mention(mid, f"About {text}.", text, gold, split, image="img.png" if image else None,
                   caption={"text": "a photo", **PROV} if caption else None,
                   enrichment={"text": "facts", **PROV} if enrichment else None)


MENTIONS = [
    _m("t1", "Paris", "E1", "train"), _m("t2", "Rome", "E4", "train"), _m("d1", "Oslo", "E2", "dev"),
    _m("m1", "Paris", "E1", image=True, caption=True),   # name shared by 3; seen in train
    _m("m2", "PARIS", "E2"),                             # 3; unseen
    _m("m3", "Rome", "E4", image=True, enrichment=True), # 1; seen
    _m("m4", "Lyon", "E5", image=True),                  # 6; unseen
    _m("m5", "Milan", "E4"),                             # 0 (no entity is named Milan); seen
    _m("m6", "  lyon ", "E5"),                           # 6; unseen
]

# run A: (mention, gold, higher, equal, top ids); pessimistic ranks 1, 2, 1, 4, 2, 3 (m5 ties with one entity:
# strict rank 1); errors and their top non-gold entity: m2 E2->E1, m4 E5->E6, m5 E4->E3, m6 E5->E6
RUN_A = [("m1", "E1", 0, 0, ["E1", "E2"]), ("m2", "E2", 1, 0, ["E1", "E2"]), ("m3", "E4", 0, 0, ["E4", "E1"]),
         ("m4", "E5", 3, 0, ["E6", "E7", "E8", "E5"]), ("m5", "E4", 0, 1, ["E4", "E3"]),
         ("m6", "E5", 2, 0, ["E6", "E7", "E5"])]
# run B (in another line order): ranks m1 2, m2 1, m3 1, m4 1, m5 2, m6 5
RUN_B = [("m6", "E5", 4, 0, ["E9"]), ("m1", "E1", 1, 0, ["E2", "E1"]), ("m2", "E2", 0, 0, ["E2"]),
         ("m3", "E4", 0, 0, ["E4"]), ("m4", "E5", 0, 0, ["E5"]), ("m5", "E4", 0, 1, ["E4", "E3"])]


def _write_run(root: Path, name: str, label: str, preds, dataset: Path) -> Path:
    run = root / name
    (run / "predictions").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"dataset": "hand", "label": label, "seed": 1, "protocols": {},
                                                  "tie_rule": "pessimistic"}))
    (run / "config.json").write_text(json.dumps({"dataset_resolved": str(dataset)}))
    lines = [json.dumps({"mention_id": m, "gold": g, "rank": 1 + h + e, "rank_strict": 1 + h,
                         "rank_mean": 1 + h + e / 2, "higher": h, "equal": e, "unordered": 0,
                         "top": [[t, 1.0 - 0.1 * i] for i, t in enumerate(top)]}) for m, g, h, e, top in preds]
    (run / "predictions" / "test.jsonl").write_text("".join(ln + "\n" for ln in lines))
    (run / "predictions" / "test.meta.json").write_text(json.dumps(
        {"split": "test", "n": len(lines), "kb_entities": len(ENTITIES), "rank_score_dtype": "float16",
         "exact_float32_ranks": True,
         "checkpoint": {"name": "best", "epoch": 3}}))
    return run


@pytest.fixture
def hand(tmp_path) -> dict[str, Path]:
    data = save_dataset(tmp_path / "data", DatasetInfo("hand", "unified"), ENTITIES, MENTIONS)
    return {"a": _write_run(tmp_path, "a", "full", RUN_A, data),
            "b": _write_run(tmp_path, "b", "text only", RUN_B, data)}


def _by_bucket(res: dict, key: str, what) -> dict[str, object]:
    return {row["bucket"]: what(row) for row in res["breakdowns"][key]}


def test_breakdown_counts_and_metrics_by_hand(hand, capsys):
    assert analyze.main(["--run", str(hand["a"])]) == 0
    res = json.loads((hand["a"] / "analysis.json").read_text())
    assert (hand["a"] / "analysis.md").is_file() and (hand["a"] / "analysis.png").stat().st_size > 0
    n = lambda row: row["n"]                                     # noqa: E731
    mrr = lambda row: round(row["metrics"][0]["mrr"], 6)         # noqa: E731
    h1 = lambda row: row["metrics"][0]["hits@1"]                 # noqa: E731
    assert res["n"] == 6 and res["tie_rule"] == "pessimistic" and res["protocol"] == "full_kb"
    assert _by_bucket(res, "name_shared", n) == {"0": 1, "1": 1, "2–5": 2, "6+": 2, "2+": 4}
    assert _by_bucket(res, "name_shared", mrr) == {"0": 0.5, "1": 1.0, "2–5": 0.75,
                                                   "6+": round((1 / 4 + 1 / 3) / 2, 6),
                                                   "2+": round((1 + 1 / 2 + 1 / 4 + 1 / 3) / 4, 6)}
    assert _by_bucket(res, "name_shared", h1) == {"0": 0.0, "1": 1.0, "2–5": 0.5, "6+": 0.0, "2+": 0.25}
    assert _by_bucket(res, "mention_has", n) == {"image: yes": 3, "image: no": 3, "caption: yes": 1, "caption: no": 5,
                                                 "enrichment: yes": 1, "enrichment: no": 5}
    assert _by_bucket(res, "mention_has", mrr) == {
        "image: yes": 0.75, "image: no": round((1 / 2 + 1 / 2 + 1 / 3) / 3, 6), "caption: yes": 1.0,
        "caption: no": round((1 / 2 + 1 + 1 / 4 + 1 / 2 + 1 / 3) / 5, 6), "enrichment: yes": 1.0,
        "enrichment: no": round((1 + 1 / 2 + 1 / 4 + 1 / 2 + 1 / 3) / 5, 6)}
    assert _by_bucket(res, "gold_in_train", n) == {"unseen": 3, "seen": 3}
    assert _by_bucket(res, "gold_in_train", mrr) == {"unseen": round((1 / 2 + 1 / 4 + 1 / 3) / 3, 6),
                                                     "seen": round((1 + 1 + 1 / 2) / 3, 6)}
    conf = res["confusions"][0]
    assert conf["errors"] == 4
    assert [(c["gold"], c["predicted"], c["count"], c["mentions"]) for c in conf["pairs"]] == [
        ("E5", "E6", 2, ["Lyon", "  lyon "]), ("E2", "E1", 1, ["PARIS"]), ("E4", "E3", 1, ["Milan"])]
    md = capsys.readouterr().out
    assert "Split test, 6 mentions; protocol full_kb (gold ranked against all 11 KB entities); tie rule pessimistic; " \
           "scores float16 (ranks exact in float32). Metrics in percent." in md
    assert "| 2–5 | 2 | 75.00 | 50.00 | 100.00 | 100.00 | 100.00 |" in md.splitlines()
    assert "| 0 | 1 | 50.00 | 0.00 | 100.00 | 100.00 | 100.00 |" in md.splitlines()
    assert md.splitlines()[-3:] == ["| 2 | Lyon (E5) | Lyon (E6) | Lyon,   lyon  |",
                                    "| 1 | paris   (E2) | Paris (E1) | PARIS |",
                                    "| 1 | Rome (E4) | Paris (E3) | Milan |"]


def test_strict_tie_rule_counts_the_tie_for_the_gold(hand, tmp_path):
    assert analyze.main(["--run", str(hand["a"]), "--tie_rule", "strict", "--out", str(tmp_path / "s")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["tie_rule"] == "strict"
    assert _by_bucket(res, "name_shared", lambda r: r["metrics"][0]["mrr"])["0"] == 1.0
    assert res["confusions"][0]["errors"] == 3


def test_compare_two_runs_side_by_side(hand, capsys):
    assert analyze.main(["--run", str(hand["a"]), "--compare", str(hand["b"])]) == 0
    prefix = hand["a"] / "analysis_vs_b"
    res = json.loads(prefix.with_suffix(".json").read_text())
    assert prefix.with_suffix(".png").stat().st_size > 0
    better = _by_bucket(res, "name_shared", lambda r: r["better"])
    # ranks A: m1 1, m2 2, m3 1, m4 4, m5 2, m6 3; B: m1 2, m2 1, m3 1, m4 1, m5 2, m6 5
    assert better == {"0": [0, 0], "1": [0, 0], "2–5": [1, 1], "6+": [1, 1], "2+": [2, 2]}
    assert _by_bucket(res, "gold_in_train", lambda r: r["better"]) == {"unseen": [1, 2], "seen": [1, 0]}
    mrr_b = _by_bucket(res, "name_shared", lambda r: round(r["metrics"][1]["mrr"], 6))
    assert mrr_b["6+"] == round((1 + 1 / 5) / 2, 6) and mrr_b["2–5"] == 0.75
    assert [c["errors"] for c in res["confusions"]] == [4, 3]
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "# Error analysis: full vs text only"
    assert "| 6+ | 2 | 29.17 | 60.00 | -30.83 | 0.00 | 50.00 | 1 | 1 |" in md


def test_errors_name_the_file(hand, tmp_path, capsys):
    lines = (hand["b"] / "predictions" / "test.jsonl").read_text().splitlines()
    (hand["b"] / "predictions" / "test.jsonl").write_text("\n".join(lines[1:]) + "\n")
    (hand["b"] / "predictions" / "test.meta.json").unlink()
    assert analyze.main(["--run", str(hand["a"]), "--compare", str(hand["b"])]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {hand['b'] / 'predictions' / 'test.jsonl'}: covers other mentions than "
                   f"{hand['a'] / 'predictions' / 'test.jsonl'} (5 vs 6 mentions; e.g. 'm6' is in only one of them)\n")
    assert analyze.main(["--run", str(hand["a"]), "--split", "dev"]) == 2
    assert "predictions/dev.jsonl: no predictions for split 'dev'" in capsys.readouterr().err
    assert analyze.main(["--run", str(hand["a"]), "--dataset", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: --dataset: dataset folder {tmp_path / 'nowhere'} not found " \
                                      "(pass --dataset DIR)\n"
    assert analyze.main(["--run", str(hand["a"]), "--protocol", "candidates"]) == 2
    assert "mention 'm1' has no 'candidates' ranks" in capsys.readouterr().err


def test_dim_mel_lists_the_command():
    from dim_mel.cli import COMMANDS

    assert COMMANDS["analyze"][0] == "nel_model.reporting.analyze"
    with pytest.raises(RunError):
        analyze.load_runs([Path("/nonexistent/run")], "test", "full_kb")
