"""nel_model/tables.py (scripts/make_table.py) and nel_model/run_io.py on fixture run folders (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nel_model.run_io import RunError, expand_run_dirs, load_metrics, load_results, load_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_table.py"


from nel_model import tables as mt  # noqa: E402


def metrics(mrr, h1, h3, h5, h10, h20, n=100):
    return {"mrr": mrr, "hits@1": h1, "hits@3": h3, "hits@5": h5, "hits@10": h10, "hits@20": h20, "n": n}


def write_run(path: Path, dataset: str, label: str, seed: int, test: dict, *, dev: dict | None = None,
              candidates: dict | None = None) -> Path:
    path.mkdir(parents=True)
    protocols = {"full_kb": {"dev": dev or test, "test": test}}
    if candidates is not None:
        protocols["candidates"] = {"dev": candidates, "test": candidates}
    (path / "results.json").write_text(json.dumps(
        {"dataset": dataset, "label": label, "seed": seed, "best_epoch": 2, "protocols": protocols}))
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
Protocol: full_kb, split: test. Percentages (2 decimals); mean ± sample std over the n runs (seeds) of a method.

| Method | n | WikiMEL MRR | WikiMEL H@1 | Rich\\|MEL MRR | Rich\\|MEL H@1 |
|:---|---:|---:|---:|---:|---:|
| DIM | 3/1 | 82.00 ± 2.00 | 72.00 ± 2.00 | 61.23 | 50.00 |
| text only | 1/0 | 50.00 | 40.00 | – | – |
"""

EXPECTED_CSV = """\
method,source,WikiMEL n,WikiMEL MRR,WikiMEL MRR std,WikiMEL H@1,WikiMEL H@1 std,Rich|MEL n,Rich|MEL MRR,Rich|MEL MRR std,Rich|MEL H@1,Rich|MEL H@1 std,note
DIM,ours,3,82.00,2.00,72.00,2.00,1,61.23,,50.00,,
text only,ours,1,50.00,,40.00,,,,,,,
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
    assert mt.render_csv(table) == "method,source,WikiMEL n,WikiMEL MRR,WikiMEL MRR std,note\nDIM,ours,1,90.00,,\n"
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


PAPER = """\
# comment line
method,dataset,protocol,mrr,hits@1,hits@3,hits@5,hits@10,hits@20,source
DIM,WikiMEL,full_kb,81.5,71.25%,,,,,Table 2
DIM,RichpediaMEL,full_kb,,,,,,,Table 2
MIMIC,WikiMEL,candidates,90,,,,,,Table 9
Empty,WikiMEL,,,,,,,,
"""


def test_paper_rows_and_cli_outputs(runs, tmp_path, capsys):
    paper = tmp_path / "paper.csv"
    paper.write_text(PAPER)
    prefix = tmp_path / "out" / "table"
    rc = mt.main([str(runs / "dim_s1"), str(runs / "dim_s2"), "--metrics", "mrr", "hits@1",
                  "--paper", str(paper), "--out", str(prefix)])
    assert rc == 0
    out = capsys.readouterr().out
    expected = (
        "Protocol: full_kb, split: test. Percentages (2 decimals); mean ± sample std over the n runs (seeds) "
        "of a method.\n\n"
        "| Method | n | WikiMEL MRR | WikiMEL H@1 |\n"
        "|:---|---:|---:|---:|\n"
        "| DIM (paper) | paper | 81.50 | 71.25 |\n"
        "| DIM | 2 | 81.00 ± 1.41 | 71.00 ± 1.41 |\n")
    assert out == expected
    assert (tmp_path / "out" / "table.md").read_text() == expected
    assert (tmp_path / "out" / "table.csv").read_text() == (
        "method,source,WikiMEL n,WikiMEL MRR,WikiMEL MRR std,WikiMEL H@1,WikiMEL H@1 std,note\n"
        "DIM (paper),paper,,81.50,,71.25,,\n"
        "DIM,ours,2,81.00,1.41,71.00,1.41,\n")
    assert (tmp_path / "out" / "table.tex").read_text().startswith("% Protocol: full_kb")


def test_skipped_rows(runs):
    table = mt.build_table([load_run(runs / "text_s1")], metrics=["mrr"],
                           skipped=[("+captions", "feature store has no caption row")])
    assert mt.render_markdown(table).splitlines()[4:] == [
        "| text only | 1 | 50.00 |",
        "| +captions | skipped | – |",
        "",
        "- +captions: skipped (feature store has no caption row)",
    ]
    assert mt.render_csv(table).splitlines()[-1] == "+captions,skipped,,,,feature store has no caption row"


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


def test_paper_file_errors(runs, tmp_path):
    paper = tmp_path / "p.csv"
    paper.write_text("method,dataset,mrr\nDIM,WikiMEL,abc\n")
    with pytest.raises(RunError) as exc:
        mt.read_paper(paper, ["WikiMEL"], "full_kb", ["mrr"])
    assert str(exc.value) == f"{paper}, line 2, column 'mrr': not a number: 'abc'"
    paper.write_text("method,dataset,MRR\n")
    with pytest.raises(RunError, match="line 1: unknown column 'MRR'"):
        mt.read_paper(paper, ["WikiMEL"], "full_kb", ["mrr"])


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


def test_cli_as_script(runs):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(runs / "text_s1"), "--metrics", "mrr"],
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


def test_shipped_paper_file_parses_and_holds_no_invented_numbers():
    rows = mt.read_paper(ROOT / "configs" / "paper_results.csv", ["WikiMEL", "RichpediaMEL", "WikiDiverse"],
                         "full_kb", list(mt.METRIC_KEYS))
    assert rows == []  # placeholders only: empty values until a user fills them in


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
