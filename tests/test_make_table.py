"""nel_model/reporting/tables.py (dim-mel table) and nel_model/runs.py on fixture run folders (no training)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nel_model.runs import RunError, expand_run_dirs, load_metrics, load_results, load_run

ROOT = Path(__file__).resolve().parents[1]
TABLE = ["-m", "nel_model.reporting.tables"]


from nel_model.reporting import tables as mt  # noqa: E402


def metrics(mrr, h1, h3, h5, h10, h20, n=100):
    return {"mrr": mrr, "hits@1": h1, "hits@3": h3, "hits@5": h5, "hits@10": h10, "hits@20": h20, "n": n}


def write_run(path: Path, dataset: str, label: str, seed: int, test: dict, *, dev: dict | None = None,
              candidates: dict | None = None, **extra) -> Path:
    """A run folder; ``extra`` goes into results.json as given (e.g. kb_entities, tie_rule, score_dtype)."""
    path.mkdir(parents=True)
    protocols = {"full_kb": {"dev": dev or test, "test": test}}
    if candidates is not None:
        protocols["candidates"] = {"dev": candidates, "test": candidates}
    (path / "results.json").write_text(json.dumps(
        {"dataset": dataset, "label": label, "seed": seed, "best_epoch": 2, "protocols": protocols, **extra}))
    (path / "config.json").write_text(json.dumps({"label": label, "seed": seed}))
    lines = [{"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "lr": 1e-4, "time_s": 1.0,
              "dev": {"mrr": 0.1 * e, "hits@1": 0.05 * e}} for e in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    write_run(r / "dim_s1", "WikiMEL", "DIM", 1, metrics(0.80, 0.70, 0.85, 0.90, 0.95, 0.98),
              candidates=metrics(0.9, 0.85, 0.95, 0.97, 0.99, 1.0))
    write_run(r / "dim_s2", "WikiMEL", "DIM", 2, metrics(0.82, 0.72, 0.87, 0.92, 0.96, 0.99))
    write_run(r / "dim_s3", "WikiMEL", "DIM", 3, metrics(0.84, 0.74, 0.89, 0.94, 0.97, 1.00))
    write_run(r / "text_s1", "WikiMEL", "text only", 1, metrics(0.5, 0.4, 0.55, 0.6, 0.7, 0.8))
    write_run(r / "rich_dim", "Rich|MEL", "DIM", 1, metrics(0.61234, 0.5, 0.6, 0.7, 0.8, 0.9))
    return r


EXPECTED_MD = """\
Protocol: full_kb, split: test, tie rule: pessimistic, scores: not recorded; KB entities: WikiMEL not recorded, \
Rich|MEL not recorded. Percentages (2 decimals); mean ± sample std over the n runs (seeds) of a method.

| Method | n | WikiMEL MRR | WikiMEL H@1 | Rich\\|MEL MRR | Rich\\|MEL H@1 |
|:---|---:|---:|---:|---:|---:|
| DIM | 3/1 | 82.00 ± 2.00 | 72.00 ± 2.00 | 61.23 | 50.00 |
| text only | 1/0 | 50.00 | 40.00 | – | – |
"""

EXPECTED_CSV = """\
method,source,protocol,split,tie rule,score dtype,stages,two stage,WikiMEL n,WikiMEL MRR,WikiMEL MRR std,WikiMEL H@1,WikiMEL H@1 std,Rich|MEL n,Rich|MEL MRR,Rich|MEL MRR std,Rich|MEL H@1,Rich|MEL H@1 std,note
DIM,ours,full_kb,test,pessimistic,not recorded,1,,3,82.00,2.00,72.00,2.00,1,61.23,,50.00,,
text only,ours,full_kb,test,pessimistic,not recorded,1,,1,50.00,,40.00,,,,,,,
"""


def test_markdown_and_csv_exact(runs):
    loaded = [load_run(d) for d in expand_run_dirs([runs])]
    table = mt.build_table(loaded, "full_kb", "test", ["mrr", "hits@1"])
    assert mt.render_markdown(table) == EXPECTED_MD
    assert mt.render_csv(table) == EXPECTED_CSV


def test_all_metrics_and_order_of_first_appearance(runs):
    loaded = [load_run(runs / n) for n in ("text_s1", "dim_s1")]
    table = mt.build_table(loaded)
    md = mt.render_markdown(table).splitlines()
    assert md[2] == ("| Method | n | WikiMEL MRR | WikiMEL H@1 | WikiMEL H@3 | WikiMEL H@5 | WikiMEL H@10 "
                     "| WikiMEL H@20 |")
    assert md[4] == "| text only | 1 | 50.00 | 40.00 | 55.00 | 60.00 | 70.00 | 80.00 |"
    assert md[5] == "| DIM | 1 | 80.00 | 70.00 | 85.00 | 90.00 | 95.00 | 98.00 |"


def test_candidates_protocol_leaves_out_runs_without_it(runs):
    warnings = []
    loaded = [load_run(d) for d in expand_run_dirs([runs])]
    table = mt.build_table(loaded, "candidates", "test", ["mrr"], warn=warnings.append)
    assert mt.render_csv(table) == ("method,source,protocol,split,tie rule,score dtype,stages,two stage,WikiMEL n,"
                                    "WikiMEL MRR,WikiMEL MRR std,note\n"
                                    "DIM,ours,candidates,test,pessimistic,not recorded,1,,1,90.00,,\n")
    assert len(warnings) == 4 and all("no 'candidates' / 'test' results; left out" in w for w in warnings)


def test_latex(runs):
    loaded = [load_run(runs / n) for n in ("dim_s1", "dim_s2", "dim_s3", "text_s1")]
    tex = mt.render_latex(mt.build_table(loaded, metrics=["mrr", "hits@1"]))
    assert tex.splitlines()[2:] == [
        "\\begin{tabular}{lcc}",
        "\\toprule",
        " & \\multicolumn{2}{c}{WikiMEL} \\\\",
        "\\cmidrule(lr){2-3}",
        "Method & MRR & H@1 \\\\",
        "\\midrule",
        "DIM & 82.00 $\\pm$ 2.00 & 72.00 $\\pm$ 2.00 \\\\",
        "text only & 50.00 & 40.00 \\\\",
        "\\bottomrule",
        "\\end{tabular}",
    ]
    assert mt.tex_escape("a_b & 5%") == "a\\_b \\& 5\\%"


PUBLISHED_HEADER = "method,venue,dataset,protocol,kb_entities,split,metric,value,source\n"
PUBLISHED = PUBLISHED_HEADER + """\
DIM,PRCV'24,WIKIMEL,full_kb,5000,test,mrr,81.5,paper table 2
DIM,PRCV'24,wikimel,full_kb,5000,test,hits@1,71.25,paper table 2
DIM,PRCV'24,WikiMEL,full_kb,5000,test,hits@20,99,paper table 2
Old,,WikiMEL,full_kb,9999,test,mrr,60,somewhere
Lists,,WikiMEL,candidates_10,,test,mrr,90,elsewhere
Dev,,WikiMEL,full_kb,5000,dev,mrr,70,elsewhere
Other,,Richpedia,full_kb,5000,test,mrr,50,elsewhere
"""


def test_published_rows_beside_ours_only_where_comparable(tmp_path, capsys):
    runs = tmp_path / "runs"
    m = metrics(0.80, 0.70, 0.85, 0.90, 0.95, 0.98)
    for seed in (1, 2):
        write_run(runs / f"dim_s{seed}", "WikiMEL", "DIM (ours)", seed, {**m, "mrr": 0.80 + 0.02 * (seed - 1)},
                  kb_entities=5000, tie_rule="strict", score_dtype="float32")
    paper = tmp_path / "published.csv"
    paper.write_text("# a comment\n" + PUBLISHED)
    prefix = tmp_path / "out" / "table"
    rc = mt.main([str(runs / "dim_s1"), str(runs / "dim_s2"), "--metrics", "mrr", "hits@1",
                  "--paper", str(paper), "--out", str(prefix)])
    assert rc == 0
    out = capsys.readouterr().out
    expected = (
        "Protocol: full_kb, split: test, tie rule: strict, scores: float32; KB entities: WikiMEL 5,000. Percentages "
        "(2 decimals); mean ± sample std over the n runs (seeds) of a method.\n\n"
        "| Method | n | WikiMEL MRR | WikiMEL H@1 |\n"
        "|:---|---:|---:|---:|\n"
        "| DIM (PRCV'24) | published | 81.50 | 71.25 |\n"
        "| DIM (ours) | 2 | 81.00 ± 1.41 | 70.00 ± 0.00 |\n"
        "\n"
        f"- Published rows (from {paper}): as reported by their sources, which do not state a tie rule; shown only "
        "where dataset, protocol, KB size / candidate-list length and split match ours.\n"
        f"- Published results not comparable with these runs (from {paper}):\n"
        "  - WikiMEL full_kb (9,999 entities), test: Old. Not comparable: WikiMEL full_kb with 9,999 entities; our "
        "runs rank against 5,000\n"
        "  - WikiMEL candidates_10, test: Lists. Not comparable: protocol candidates_10; this table reports full_kb\n"
        "  - WikiMEL full_kb (5,000 entities), dev: Dev. Not comparable: published on the dev split; this table "
        "reports test\n"
        "  - Richpedia full_kb (5,000 entities), test: Other. Not comparable: no run of ours on Richpedia (our "
        "datasets: WikiMEL)\n")
    assert out == expected
    assert (tmp_path / "out" / "table.md").read_text() == expected
    assert (tmp_path / "out" / "table.csv").read_text() == (
        "method,source,protocol,split,tie rule,score dtype,stages,two stage,WikiMEL n,WikiMEL MRR,WikiMEL MRR std,"
        "WikiMEL H@1,WikiMEL H@1 std,note\n"
        "DIM (PRCV'24),published,full_kb,test,not reported,not reported,1,,,81.50,,71.25,,paper table 2\n"
        "DIM (ours),ours,full_kb,test,strict,float32,1,,2,81.00,1.41,70.00,0.00,\n")
    tex = (tmp_path / "out" / "table.tex").read_text().splitlines()
    assert tex[0].startswith("% Protocol: full_kb, split: test, tie rule: strict, scores: float32")
    assert tex[-5] == f"% - Published results not comparable with these runs (from {paper}):"
    # the other protocol: only the candidates_10 row can stand beside runs whose lists have 10 entries
    for d in (runs / "dim_s1", runs / "dim_s2"):
        res = json.loads((d / "results.json").read_text())
        res["protocols"]["candidates"] = {"test": m}
        res["candidate_recall"] = {"test": {"mean_list_length": 10.0, "n": 100}}
        (d / "results.json").write_text(json.dumps(res))
    table = mt.build_table([load_run(runs / "dim_s1")], "candidates", metrics=["mrr"], paper=paper)
    assert [(r.method, r.cells["WikiMEL"].mean) for r in table.rows] == [("Lists", {"mrr": 90.0}),
                                                                        ("DIM (ours)", {"mrr": 80.0})]


def _demo_like_run(path: Path) -> Path:
    """What scripts/demo.sh writes: the synthetic dataset, 240 KB entities, candidate lists of 10."""
    m = metrics(0.8, 0.7, 0.9, 0.95, 0.99, 1.0, n=340)
    return write_run(path, "synthetic", "ours (text+image+caption)", 0, m, candidates=m, kb_entities=240,
                     tie_rule="pessimistic", score_dtype="float32",
                     candidate_recall={"dev": {"mean_list_length": 10.0}, "test": {"mean_list_length": 10.0}})


@pytest.mark.slow
def test_shipped_published_results_and_a_demo_run_nothing_comparable(tmp_path, capsys):
    _demo_like_run(tmp_path / "full")
    for protocol in ("full_kb", "candidates"):
        proc = subprocess.run([sys.executable, *TABLE, str(tmp_path / "full"), "--paper", "--protocol",
                               protocol, "--metrics", "mrr"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[2:5] == ["| Method | n | synthetic MRR |", "|:---|---:|---:|",
                              "| ours (text+image+caption) | 1 | 80.00 |"]
        assert "published" not in lines[4] and len(lines) == 5 + 2 + 7
        assert lines[6] == ("- Published results not comparable with these runs (from "
                            f"{ROOT / 'configs' / 'published_results.csv'}):")
        assert lines[7:] == [
            "  - WikiMEL full_kb (109,976 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), "
            "MMoE (KDD'25), M3EL (KDD'25), KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25), OT-MEL (Findings "
            "ACL'24), MELOV, IIER. Not comparable: no run of ours on WikiMEL (our datasets: synthetic)",
            "  - RichpediaMEL full_kb (160,933 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), "
            "MMoE (KDD'25), M3EL (KDD'25), OT-MEL (Findings ACL'24), MELOV, IIER. Not comparable: no run of ours on "
            "RichpediaMEL (our datasets: synthetic)",
            "  - WikiDiverse full_kb (132,460 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), "
            "MMoE (KDD'25), M3EL (KDD'25), KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25), OT-MEL (Findings "
            "ACL'24), MELOV, IIER. Not comparable: no run of ours on WikiDiverse (our datasets: synthetic)",
            "  - WikiMEL candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: no run of "
            "ours on WikiMEL (our datasets: synthetic)",
            "  - RichpediaMEL candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: no run "
            "of ours on RichpediaMEL (our datasets: synthetic)",
            "  - WikiDiverse candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: no run "
            "of ours on WikiDiverse (our datasets: synthetic)",
            "  - RichpediaMEL full_kb (160,935 entities), test: KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25). "
            "Not comparable: no run of ours on RichpediaMEL (our datasets: synthetic)"]


MIMIC_README_WIKIMEL = [  # (method, H@1, H@3, H@5, MRR) on WikiMEL, pengfei-luo/MIMIC readme.md
    ("CLIP zero-shot", 83.23, 92.10, 94.51, 88.23), ("GHMFC (re-run)", 76.55, 88.40, 92.01, 83.36),
    ("MIMIC (KDD'23)", 87.98, 95.07, 96.37, 91.82)]


def test_shipped_published_results_beside_a_wikimel_full_kb_run(tmp_path, capsys):
    m = metrics(0.9, 0.85, 0.93, 0.95, 0.97, 0.98, n=6000)
    write_run(tmp_path / "ours", "WIKIMEL", "DIM", 1, m, kb_entities=109976, tie_rule="pessimistic",
              score_dtype="float32")
    assert mt.main([str(tmp_path / "ours"), "--paper", "--metrics", "hits@1", "hits@3", "hits@5", "mrr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Protocol: full_kb, split: test, tie rule: pessimistic, scores: float32; "
                               "KB entities: WIKIMEL 109,976.")
    assert lines[2] == "| Method | n | WIKIMEL H@1 | WIKIMEL H@3 | WIKIMEL H@5 | WIKIMEL MRR |"
    shown = {ln.split(" | ")[0][2:]: ln for ln in lines[4:14]}
    for method, *values in MIMIC_README_WIKIMEL:
        assert shown[method] == f"| {method} | published | " + " | ".join(f"{v:.2f}" for v in values) + " |"
    assert list(shown) == ["CLIP zero-shot", "GHMFC (re-run)", "MIMIC (KDD'23)", "MMoE (KDD'25)", "M3EL (KDD'25)",
                           "KGMEL retrieval only (SIGIR'25)", "OT-MEL (Findings ACL'24)", "MELOV", "IIER", "DIM"]
    # the values of issue 29 (KGMEL's Table 3; OT-MEL, MELOV, IIER): H@1 and MRR only, H@3 and H@5 not published
    assert shown["KGMEL retrieval only (SIGIR'25)"] == "| KGMEL retrieval only (SIGIR'25) | published | 87.29 | – | – | 89.99 |"
    assert shown["OT-MEL (Findings ACL'24)"] == "| OT-MEL (Findings ACL'24) | published | 88.97 | – | – | 92.59 |"
    assert shown["MELOV"] == "| MELOV | published | 88.91 | – | – | 92.32 |"
    assert shown["IIER"] == "| IIER | published | 88.93 | – | – | – |"
    assert shown["DIM"] == "| DIM | 1 | 85.00 | 93.00 | 95.00 | 90.00 |"
    assert lines[15].startswith("- Published rows (from ") and "do not state a tie rule" in lines[15]
    assert lines[16] == f"- Published results not comparable with these runs (from {mt.PUBLISHED_FILE}):"
    # KGMEL with its re-ranking is measured like these runs but re-ranks a retriever's list: not beside a one-stage run
    assert lines[17:] == [
        "  - RichpediaMEL full_kb (160,933 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), MMoE "
        "(KDD'25), M3EL (KDD'25), OT-MEL (Findings ACL'24), MELOV, IIER. Not comparable: no run of ours on "
        "RichpediaMEL (our datasets: WIKIMEL)",
        "  - WikiDiverse full_kb (132,460 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), MMoE "
        "(KDD'25), M3EL (KDD'25), KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25), OT-MEL (Findings ACL'24), "
        "MELOV, IIER. Not comparable: no run of ours on WikiDiverse (our datasets: WIKIMEL)",
        "  - WikiMEL candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: protocol "
        "candidates_100; this table reports full_kb",
        "  - RichpediaMEL candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: no run of "
        "ours on RichpediaMEL (our datasets: WIKIMEL)",
        "  - WikiDiverse candidates_100, test: DWE (AAAI'24), DWE+, UniMEL (CIKM'24). Not comparable: no run of "
        "ours on WikiDiverse (our datasets: WIKIMEL)",
        "  - WikiMEL full_kb (109,976 entities), test: KGMEL (SIGIR'25). Not comparable: a two-stage (retrieve, then "
        "re-rank) system; our WIKIMEL runs here are one-stage",
        "  - RichpediaMEL full_kb (160,935 entities), test: KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25). Not "
        "comparable: no run of ours on RichpediaMEL (our datasets: WIKIMEL)"]
    # the same run against a smaller KB (e.g. a subset prepared locally): nothing beside it, and the reason
    res = json.loads((tmp_path / "ours" / "results.json").read_text())
    (tmp_path / "ours" / "results.json").write_text(json.dumps({**res, "kb_entities": 18880}))
    assert mt.main([str(tmp_path / "ours"), "--paper", "--metrics", "mrr"]) == 0
    out = capsys.readouterr().out
    assert "| published |" not in out
    assert ("  - WikiMEL full_kb (109,976 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), MMoE "
            "(KDD'25), M3EL (KDD'25), KGMEL (SIGIR'25), KGMEL retrieval only (SIGIR'25), OT-MEL (Findings ACL'24), "
            "MELOV, IIER. Not comparable: WikiMEL full_kb with 109,976 entities; our runs rank against 18,880"
            ) in out.splitlines()
    # an older run folder that does not record its KB size is never set beside published numbers
    (tmp_path / "ours" / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k != "kb_entities"}))
    assert mt.main([str(tmp_path / "ours"), "--paper", "--metrics", "mrr"]) == 0
    out = capsys.readouterr().out
    assert "| published |" not in out and "the KB size of our runs is not recorded (older run folders)" in out


def test_shipped_published_results_file_holds_the_gathered_rows():
    from nel_model.reporting.published import PUBLISHED_FILE, read_published

    rows = read_published(PUBLISHED_FILE)
    # 5 MIMIC-readme / MMoE / M3EL systems and DWE, DWE+ x 3 datasets x 4 metrics; UniMEL 3 x 4; KGMEL with and
    # without re-ranking, OT-MEL, MELOV 3 x 2 (H@1, MRR); IIER 3 x 1 (H@1)
    assert PUBLISHED_FILE == ROOT / "configs" / "published_results.csv"
    assert len(rows) == 7 * 3 * 4 + 3 * 4 + 4 * 3 * 2 + 3
    got = {(r.name, r.dataset, r.protocol, r.kb_entities, r.split, r.metric): r.value for r in rows}
    assert got[("MMoE (KDD'25)", "WikiDiverse", "full_kb", 132460, "test", "mrr")] == 84.23
    assert got[("M3EL (KDD'25)", "RichpediaMEL", "full_kb", 160933, "test", "hits@5")] == 95.34
    # issue 29: KGMEL's Table 3 (with re-ranking: two-stage; retrieval only: one-stage), OT-MEL, MELOV, IIER
    assert [got[("KGMEL (SIGIR'25)", d, "full_kb", kb, "test", m)] for m in ("hits@1", "mrr")
            for d, kb in (("WikiMEL", 109976), ("RichpediaMEL", 160935), ("WikiDiverse", 132460))] == [
        90.58, 85.21, 88.23, 93.04, 88.08, 90.84]
    assert [got[("KGMEL retrieval only (SIGIR'25)", d, "full_kb", kb, "test", m)] for m in ("hits@1", "mrr")
            for d, kb in (("WikiMEL", 109976), ("RichpediaMEL", 160935), ("WikiDiverse", 132460))] == [
        87.29, 76.40, 82.12, 89.99, 80.94, 86.00]
    mimic_kbs = (("WikiMEL", 109976), ("RichpediaMEL", 160933), ("WikiDiverse", 132460))
    assert [got[("OT-MEL (Findings ACL'24)", d, "full_kb", kb, "test", m)] for m in ("hits@1", "mrr")
            for d, kb in mimic_kbs] == [88.97, 83.30, 66.07, 92.59, 88.27, 75.43]
    assert [got[("MELOV", d, "full_kb", kb, "test", m)] for m in ("hits@1", "mrr") for d, kb in mimic_kbs] == [
        88.91, 84.14, 67.32, 92.32, 88.80, 76.57]
    assert [got[("IIER", d, "full_kb", kb, "test", "hits@1")] for d, kb in mimic_kbs] == [88.93, 84.63, 69.47]
    assert {r.name: r.stages for r in rows if "KGMEL" in r.name} == {"KGMEL (SIGIR'25)": 2,
                                                                     "KGMEL retrieval only (SIGIR'25)": 1}
    # RichpediaMEL's KB as each source gives it: MIMIC's, MMoE's, M3EL's configs 160,933; KGMEL's table 160,935
    sizes = {r.name: r.kb_entities for r in rows if r.dataset == "RichpediaMEL" and r.protocol == "full_kb"}
    assert {n for n, kb in sizes.items() if kb == 160935} == {"KGMEL (SIGIR'25)", "KGMEL retrieval only (SIGIR'25)"}
    assert set(sizes.values()) == {160933, 160935}
    assert got[("DWE+", "WikiMEL", "candidates_100", None, "test", "hits@20")] == 99.7
    assert got[("DWE (AAAI'24)", "RichpediaMEL", "candidates_100", None, "test", "hits@5")] == 97.1
    assert {r.metric for r in rows if r.protocol == "full_kb"} == {"hits@1", "hits@3", "hits@5", "mrr"}
    assert {r.metric for r in rows if r.protocol != "full_kb"} == {"hits@1", "hits@5", "hits@10", "hits@20"}


RICHPEDIA_KB_NOTE = ("RichpediaMEL full_kb: published with {published} entities, our runs rank against {ours}: "
                     "RichpediaMEL's KB is 160,933 entities in MIMIC's, MMoE's and M3EL's configs (config/"
                     "richpediamel.yaml num_entity) and 160,935 in KGMEL's table; taken as one KB")


def test_richpediamel_kb_sizes_of_its_sources_are_one_kb_with_a_note(tmp_path, capsys):
    m = metrics(0.8, 0.7, 0.85, 0.9, 0.95, 0.98)
    run = write_run(tmp_path / "rich", "RichpediaMEL", "ours", 1, m, kb_entities=160933, tie_rule="pessimistic",
                    score_dtype="float32")
    assert mt.main([str(run), "--paper", "--metrics", "hits@1", "mrr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # hand-copied from configs/published_results.csv: MIMIC readme, MMoE / M3EL logs, issue 29
    assert lines[4:14] == [
        "| CLIP zero-shot | published | 67.78 | 77.57 |",
        "| GHMFC (re-run) | published | 72.92 | 80.76 |",
        "| MIMIC (KDD'23) | published | 81.02 | 86.95 |",
        "| MMoE (KDD'25) | published | 85.51 | 89.86 |",
        "| M3EL (KDD'25) | published | 82.82 | 88.26 |",
        "| KGMEL retrieval only (SIGIR'25) | published | 76.40 | 80.94 |",
        "| OT-MEL (Findings ACL'24) | published | 83.30 | 88.27 |",
        "| MELOV | published | 84.14 | 88.80 |",
        "| IIER | published | 84.63 | – |",
        "| ours | 1 | 70.00 | 80.00 |"]
    assert lines[16] == "- KGMEL retrieval only (SIGIR'25): " + RICHPEDIA_KB_NOTE.format(published="160,935",
                                                                                         ours="160,933")
    # a run on the 160,935 count: the same rows beside it, the note naming the ones counted 160,933
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "kb_entities": 160935}))
    assert mt.main([str(run), "--paper", "--metrics", "hits@1", "mrr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" | ")[0][2:] for ln in lines[4:14]][-1] == "ours" and lines[13].startswith("| ours |")
    assert lines[16] == ("- CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), MMoE (KDD'25), M3EL (KDD'25), OT-MEL "
                         "(Findings ACL'24), MELOV, IIER: " + RICHPEDIA_KB_NOTE.format(published="160,933",
                                                                                      ours="160,935"))
    # any other size is another KB: nothing beside it, both counts named
    (run / "results.json").write_text(json.dumps({**res, "kb_entities": 160934}))
    assert mt.main([str(run), "--paper", "--metrics", "hits@1", "mrr"]) == 0
    out = capsys.readouterr().out
    assert "| published |" not in out and "taken as one KB" not in out
    assert ("RichpediaMEL full_kb with 160,933 entities; our runs rank against 160,934" in out
            and "RichpediaMEL full_kb with 160,935 entities; our runs rank against 160,934" in out)
    # the rule is the dataset's, not the file's: a file of one's own gets it too; other datasets do not
    paper = tmp_path / "p.csv"
    paper.write_text(PUBLISHED_HEADER + "A,,Richpedia,full_kb,160935,test,mrr,50,x\nB,,WikiMEL,full_kb,18881,test,mrr,50,y\n")
    write_run(tmp_path / "wiki", "WikiMEL", "ours", 1, m, kb_entities=18880)
    (run / "results.json").write_text(json.dumps(res))
    table = mt.build_table([load_run(run), load_run(tmp_path / "wiki")], metrics=["mrr"], paper=paper)
    assert [r.method for r in table.rows if r.source == "published"] == ["A"]
    assert table.not_comparable == ["WikiMEL full_kb (18,881 entities), test: B. Not comparable: WikiMEL full_kb "
                                    "with 18,881 entities; our runs rank against 18,880"]


def test_tie_rule_option_reports_every_run_under_one_rule(tmp_path, capsys):
    m = metrics(0.5, 0.4, 0.6, 0.7, 0.8, 0.9)
    write_run(tmp_path / "a", "D", "A", 1, m, tie_rule="pessimistic",
              tie_rules={"strict": {"full_kb": {"test": {**m, "mrr": 0.55}}}})
    write_run(tmp_path / "b", "D", "B", 1, {**m, "mrr": 0.6}, tie_rule="strict")
    assert mt.main([str(tmp_path / "a"), str(tmp_path / "b"), "--metrics", "mrr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Protocol: full_kb, split: test, tie rule: pessimistic / strict, scores: not recorded")
    assert out[-2:] == ["- A: tie rule pessimistic", "- B: tie rule strict"]
    assert mt.main([str(tmp_path / "a"), str(tmp_path / "b"), "--metrics", "mrr", "--tie_rule", "strict"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Protocol: full_kb, split: test, tie rule: strict,")
    assert out[4:] == ["| A | 1 | 55.00 |", "| B | 1 | 60.00 |"]


def test_skipped_rows(runs):
    table = mt.build_table([load_run(runs / "text_s1")], metrics=["mrr"],
                           skipped=[("+captions", "feature store has no caption row")])
    assert mt.render_markdown(table).splitlines()[4:] == [
        "| text only | 1 | 50.00 |",
        "| +captions | skipped | – |",
        "",
        "- +captions: skipped (feature store has no caption row)",
    ]
    assert mt.render_csv(table).splitlines()[-1] == ("+captions,skipped,full_kb,test,,,,,,,,"
                                                     "feature store has no caption row")


def test_errors(tmp_path, capsys):
    with pytest.raises(RunError, match=r"^.*nowhere: run folder not found$"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    with pytest.raises(RunError) as exc:
        expand_run_dirs([tmp_path / "x"])
    assert str(exc.value) == f"{tmp_path / 'x'}: not a run folder (no results.json)"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"dataset": "D", "label": "L", "protocols": {"full_kb": {"test": {"mrr": 80}}}}')
    with pytest.raises(RunError) as exc:
        load_results(bad)
    assert str(exc.value) == f"{bad / 'results.json'}: protocols.full_kb.test.mrr must be a fraction in [0, 1], got 80"
    (bad / "results.json").write_text("{not json")
    with pytest.raises(RunError, match="results.json: invalid JSON"):
        load_results(bad)
    assert mt.main([str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x'}: not a run folder (no results.json)\n"


def test_published_file_errors_name_file_line_and_column(tmp_path):
    from nel_model.reporting.published import read_published

    paper = tmp_path / "p.csv"
    cases = [
        ("DIM,,WikiMEL,full_kb,10,test,mrr,abc,src\n", "line 2, column 'value': must be a percentage in [0, 100], "
                                                       "got 'abc'"),
        ("DIM,,WikiMEL,full_kb,10,test,mrr,0.9,src\nDIM,,wikimel,full_kb,10,test,mrr,0.8,src\n",
         "line 3, column 'metric': DIM wikimel full_kb test mrr already given on line 2"),
        ("DIM,,WikiMEL,top100,,test,mrr,90,src\n", "line 2, column 'protocol': must be full_kb or candidates_<N>, "
                                                   "got 'top100'"),
        ("DIM,,WikiMEL,full_kb,1e5,test,mrr,90,src\n", "line 2, column 'kb_entities': must be a positive integer or "
                                                       "empty, got '1e5'"),
        ("DIM,,WikiMEL,full_kb,,test,MRR,90,src\n", "line 2, column 'metric': must be one of mrr, hits@1, hits@3, "
                                                    "hits@5, hits@10, hits@20, got 'MRR'"),
        ("DIM,,WikiMEL,full_kb,,test,mrr,90\n", "line 2: 8 values for 9 columns"),
        # issue 26, item 12: digits Python's isdigit() or float() accept but a count or a percentage is not
        ("DIM,,WikiMEL,full_kb,\u00b2,test,mrr,90,src\n", "line 2, column 'kb_entities': must be a positive integer "
                                                          "or empty, got '\u00b2'"),
        ("DIM,,WikiMEL,full_kb,10,test,mrr,\u0669\u0660,src\n", "line 2, column 'value': must be a percentage in "
                                                                "[0, 100], got '\u0669\u0660'"),
        ("DIM,,WikiMEL,full_kb,10,test,mrr,1e1,src\n", "line 2, column 'value': must be a percentage in [0, 100], "
                                                       "got '1e1'"),
        # a field over the csv module's 128 KB limit: the line, not a _csv.Error traceback
        ("# c\nDIM,,WikiMEL,full_kb,10,test,mrr,90," + "s" * 200_000 + "\n",
         "line 3: not a valid CSV line (field larger than field limit (131072))"),
    ]
    for body, message in cases:
        paper.write_text(PUBLISHED_HEADER + body)
        with pytest.raises(RunError) as exc:
            read_published(paper)
        assert str(exc.value) == f"{paper}, {message}"
    # not UTF-8, UTF-16: the file (and line); a UTF-8 byte-order mark is fine
    paper.write_bytes(PUBLISHED_HEADER.encode() + b"DIM,,WikiMEL,full_kb,10,test,mrr,90,caf\xe9 src\n")
    with pytest.raises(RunError) as exc:
        read_published(paper)
    assert str(exc.value) == (f"{paper}, line 2: not UTF-8 text (invalid continuation byte at byte 39 of the line); "
                              "save the file as UTF-8")
    paper.write_text(PUBLISHED_HEADER + "DIM,,WikiMEL,full_kb,10,test,mrr,90,src\n", encoding="utf-16")
    with pytest.raises(RunError) as exc:
        read_published(paper)
    assert str(exc.value) == f"{paper}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    paper.write_text(PUBLISHED_HEADER + "DIM,,WikiMEL,full_kb,10,test,mrr,90,src\n", encoding="utf-8-sig")
    assert [r.value for r in read_published(paper)] == [90.0]
    paper.write_text("method,dataset,mrr\n")
    with pytest.raises(RunError, match="line 1: the header must be method,venue,dataset,protocol,kb_entities,"):
        read_published(paper)
    with pytest.raises(RunError, match="nowhere.csv: published results file not found"):
        read_published(tmp_path / "nowhere.csv")


def test_torn_metrics_line_and_unfinished_runs_skipped(runs, tmp_path):
    with (runs / "dim_s1" / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 4, "tr')
    assert [r["epoch"] for r in load_metrics(runs / "dim_s1")] == [1, 2, 3]
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "config.json").write_text("{}")
    warnings = []
    dirs = expand_run_dirs([runs], warn=warnings.append)
    assert [d.name for d in dirs] == ["dim_s1", "dim_s2", "dim_s3", "rich_dim", "text_s1"]
    assert warnings == [f"{runs / 'unfinished'}: skipped, no results.json (unfinished run?)"]


@pytest.mark.slow
def test_cli_as_script(runs):
    proc = subprocess.run([sys.executable, *TABLE, str(runs / "text_s1"), "--metrics", "mrr"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "| text only | 1 | 50.00 |"


# ---------------------------------------------------------------------------------------------
# nel_model/ablations.py with a stand-in train module (the real one is exercised in test_predict.py)

FAKE_TRAIN = '''
import argparse, json, sys
from pathlib import Path
p = argparse.ArgumentParser()
for f in ("--config", "--features", "--output_dir", "--seed", "--label", "--epochs"):
    p.add_argument(f)
for f in ("--no_image", "--no_caption", "--no_enrichment", "--no_entity_image", "--no_entity_profile",
          "--resume", "--overwrite"):
    p.add_argument(f, action="store_true")
a = p.parse_args()
if a.label == "text + image" and a.seed == "2":
    print("boom", file=sys.stderr)
    sys.exit(3)
score = 0.5 + 0.1 * (not a.no_image) + 0.01 * int(a.seed)
m = {k: score for k in ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")}
out = Path(a.output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"dataset": "toy", "label": a.label, "seed": int(a.seed),
    "best_epoch": 1, "protocols": {"full_kb": {"dev": m, "test": m}}, "argv": sys.argv[1:]}))
'''


def _toy_features(root: Path, caption: bool) -> Path:
    import numpy as np

    from data_process.encode.feature_store import FeatureStore

    store = FeatureStore(root)
    store.set_ids("mention", ["m0", "m1"])
    store.update_meta(text_dim=4, image_dim=4)

    def put(side, view, data, mask=None, **info):
        w = store.writer(side, view, len(data), data.shape[1:], None if mask is None else mask.shape[1:], "fp")
        w.write(0, data.astype(np.float16), mask)
        w.commit(info)

    put("mention", "mention", np.ones((2, 4)))
    put("mention", "image", np.ones((2, 4)), np.array([True, False]))
    put("mention", "profile", np.ones((2, 2, 4)), np.array([[True, caption], [False, False]]),
        rows=["enrichment", "caption"])
    return root


def _ablations():
    from nel_model import ablations

    return ablations


def test_available_views(tmp_path):
    ra = _ablations()
    assert ra.available_views(_toy_features(tmp_path / "a", caption=True)) == {
        "image": None, "caption": None, "enrichment": None}
    views = ra.available_views(_toy_features(tmp_path / "b", caption=False))
    assert views == {"image": None, "enrichment": None,
                     "caption": "the feature cache has no caption text (mention.profile row 'caption' empty)"}
    with pytest.raises(RunError, match="not a feature folder"):
        ra.available_views(tmp_path / "none")


def test_run_ablations_with_stand_in_trainer(tmp_path, monkeypatch, capsys):
    ra = _ablations()
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setenv("PYTHONPATH", str(mod_dir))
    feats = _toy_features(tmp_path / "feat", caption=False)
    out = tmp_path / "abl"
    argv = ["--features", str(feats), "--out", str(out), "--seeds", "1", "2", "--train_module", "fake_train",
            "--", "--epochs", "2"]
    assert ra.main(argv) == 1  # one training failed
    md = (out / "ablations.md").read_text().splitlines()
    assert md[2:] == [
        "| Method | n | toy MRR | toy H@1 | toy H@3 | toy H@5 | toy H@10 | toy H@20 |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
        "| text only | 2 | 51.50 ± 0.71 | 51.50 ± 0.71 | 51.50 ± 0.71 | 51.50 ± 0.71 | 51.50 ± 0.71 | 51.50 ± 0.71 |",
        "| text + image | 1 | 61.00 | 61.00 | 61.00 | 61.00 | 61.00 | 61.00 |",
        "| text + image [failed] | skipped | – | – | – | – | – | – |",
        "| text + image + caption | skipped | – | – | – | – | – | – |",
        "| text + image + enrichment | 2 | 61.50 ± 0.71 | 61.50 ± 0.71 | 61.50 ± 0.71 | 61.50 ± 0.71 | 61.50 ± 0.71 "
        "| 61.50 ± 0.71 |",
        "| full (DIM) | skipped | – | – | – | – | – | – |",
        "",
        f"- text + image [failed]: skipped (training failed: seed 2 exit code 3, see {out / 'logs' / 'text_image_s2.log'})",
        "- text + image + caption: skipped (the feature cache has no caption text (mention.profile row 'caption' "
        "empty))",
        "- full (DIM): skipped (the feature cache has no caption text (mention.profile row 'caption' empty))",
    ]
    assert (out / "logs" / "text_image_s2.log").read_text() == "boom\n"
    argv_seen = json.loads((out / "text_only_s1" / "results.json").read_text())["argv"]
    assert argv_seen == ["--features", str(feats), "--output_dir", str(out / "text_only_s1"), "--seed", "1",
                         "--label", "text only", "--no_image", "--no_caption", "--no_enrichment", "--no_entity_image",
                         "--no_entity_profile", "--epochs", "2"]
    assert (out / "ablations.csv").is_file() and (out / "ablations.tex").is_file()
    # re-running reuses finished runs and retries only the failed one
    capsys.readouterr()
    assert ra.main(argv + []) == 1
    err = capsys.readouterr().err
    assert f"reuse {out / 'text_only_s1'} (results.json present)" in err
    assert err.count("$ ") == 1


def test_force_retrains_instead_of_resuming_a_finished_run(tmp_path):
    ra = _ablations()
    run_dir = tmp_path / "abl" / "full_s1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"ckpt")
    args = ra.build_parser().parse_args(["--features", str(tmp_path / "feat"), "--out", str(tmp_path / "abl")])
    # interrupted run (no results.json): resumed
    assert "--resume" in ra.train_command(ra.BY_KEY["full"], 1, run_dir, args, [])
    # finished run: resuming would just reload the last epoch; --force must train again from scratch
    (run_dir / "results.json").write_text("{}")
    args.force = True
    cmd = ra.train_command(ra.BY_KEY["full"], 1, run_dir, args, [])
    assert "--resume" not in cmd and "--overwrite" in cmd


def _two_stage(path: Path, label: str, test: dict, **extra) -> Path:
    info = {"retriever": {"run": "/runs/wiki_ours_s1", "label": "ours", "checkpoint": "best"}, "top_k": 10,
            "reranker": {"kind": "feature", "run": str(path)}}
    return write_run(path, "WikiMEL", label, 1, test, kb_entities=109976, tie_rule="pessimistic",
                     score_dtype="float32", two_stage=info, **extra)


def test_paper_sets_two_stage_systems_beside_two_stage_runs_only(tmp_path, capsys):
    one = write_run(tmp_path / "ours", "WikiMEL", "ours", 1, metrics(0.9, 0.85, 0.93, 0.95, 0.97, 0.98),
                    kb_entities=109976, tie_rule="pessimistic", score_dtype="float32")
    two = _two_stage(tmp_path / "rr", "ours + re-ranker", metrics(0.93, 0.9, 0.95, 0.96, 0.97, 0.98))
    assert load_run(one).stages == 1 and load_run(two).stages == 2
    # both kinds among our runs: every published row measured like them stands, the two-stage ones named below
    assert mt.main([str(one), str(two), "--paper", "--metrics", "hits@1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    methods = [ln.split(" | ")[0][2:] for ln in lines[4:] if ln.startswith("| ")]
    assert methods == ["CLIP zero-shot", "GHMFC (re-run)", "MIMIC (KDD'23)", "MMoE (KDD'25)", "M3EL (KDD'25)",
                       "KGMEL (SIGIR'25)", "KGMEL retrieval only (SIGIR'25)", "OT-MEL (Findings ACL'24)", "MELOV",
                       "IIER", "ours", "ours + re-ranker"]
    assert "| KGMEL (SIGIR'25) | published | 90.58 |" in lines
    i = lines.index("- Two-stage rows (retrieve, then re-rank; a published two-stage system stands only beside "
                    "two-stage runs of ours, a one-stage one beside one-stage runs):")
    assert lines[i + 1: i + 3] == [
        "  - KGMEL (SIGIR'25): a published two-stage system",
        "  - ours + re-ranker: retriever ours (best checkpoint), lists of 10 entities, re-ranker feature"]
    # only the two-stage run: the one-stage systems are left out, and why
    assert mt.main([str(two), "--paper", "--metrics", "hits@1", "--out", str(tmp_path / "t")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" | ")[0][2:] for ln in lines[4:6]] == ["KGMEL (SIGIR'25)", "ours + re-ranker"]
    assert ("  - WikiMEL full_kb (109,976 entities), test: CLIP zero-shot, GHMFC (re-run), MIMIC (KDD'23), MMoE "
            "(KDD'25), M3EL (KDD'25), KGMEL retrieval only (SIGIR'25), OT-MEL (Findings ACL'24), MELOV, IIER. Not "
            "comparable: a one-stage system; our WikiMEL runs here are two-stage (retrieve, then re-rank)") in lines
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,source,protocol,split,tie rule,score dtype,stages,two stage,")
    assert csv_lines[1].startswith("KGMEL (SIGIR'25),published,full_kb,test,not reported,not reported,2,"
                                   "a published two-stage system,")
    assert next(csv.reader([csv_lines[2]]))[6:10] == [
        "2", "retriever ours (best checkpoint), lists of 10 entities, re-ranker feature", "1", "90.00"]


def test_an_llm_run_on_a_sample_says_so_and_a_bad_stages_value_is_an_error(tmp_path, capsys):
    from nel_model.reporting.published import read_published

    run = _two_stage(tmp_path / "llm", "ours + llm", metrics(0.6, 0.5, 0.6, 0.7, 0.8, 0.9),
                     sample={"limit": 500, "seed": 0, "n": {"test": 500}})
    res = json.loads((run / "results.json").read_text())
    res["two_stage"]["reranker"] = {"kind": "llm", "model": "smollm2", "k": 5}
    (run / "results.json").write_text(json.dumps(res))
    assert mt.main([str(run), "--metrics", "hits@1"]) == 0
    assert ("  - ours + llm: retriever ours (best checkpoint), lists of 10 entities, re-ranker llm smollm2 (top 5), "
            "on a sample of 500 test mentions (seed 0)") in capsys.readouterr().out.splitlines()
    paper = tmp_path / "p.csv"
    paper.write_text("method,venue,dataset,protocol,kb_entities,split,metric,value,source,stages\n"
                     "X,,WikiMEL,full_kb,10,test,mrr,50,somewhere,3\n")
    with pytest.raises(RunError, match=r"p.csv, line 2, column 'stages': must be 1 \(one stage\) or 2"):
        read_published(paper)
