"""The feature re-ranker: it starts as its retriever, trains past it on namesake-style synthetic data (the gold
is told apart by the image, the text barely helps), resumes exactly, and loads as a scorer for a two-stage linker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process.core.records import DatasetInfo, Entity, Mention, save_dataset
from data_process.fixtures.synthetic_features import write_synthetic
from dim_mel import cli
from nel_model.evaluation import evaluate as one_stage
from nel_model.evaluation.metrics import metrics_from_counts
from nel_model.inference.retrieve import retrieve
from nel_model.rerank.feature import LEXICAL_NAMES, FeatureReranker, LexicalFeatures
from nel_model.rerank.train_feature import main as rerank_main
from nel_model.evaluation.evaluate import open_run
from nel_model.rerank.two_stage import two_stage_counts
from nel_model.runs import RunError, load_predictions
from nel_model.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
K = 8
FAST = ["--warmup-steps", "5", "--batch-size", "32", "--lr", "3e-3", "--patience", "0", "--threads", "1",
        "--hidden-size", "32", "--proj", "16"]


@pytest.fixture(scope="module")
def retriever_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("rerank_feature")
    write_synthetic(d / "ds", d / "feat", num_entities=40, mentions_per_split=(192, 64, 64), seed=6, signal="image")
    train_main(["--config", str(ROOT / "configs/synthetic.yaml"), "--features", str(d / "feat"),
                "--output-dir", str(d / "run"), "--epochs", "2"])
    retrieve(d / "run", ("train", "dev", "test"), K)
    return d / "run"


def _rerank(retriever_run, out, *flags):
    assert rerank_main(["--retriever", str(retriever_run), "--output-dir", str(out), *FAST, *flags]) == 0
    return json.loads((out / "results.json").read_text())


def _metrics_lines(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "train_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_untrained_reranker_ranks_as_its_retriever(retriever_run):
    retr = open_run(retriever_run, "cpu")
    lists = retr.lists("test")
    rr = FeatureReranker(FeatureReranker.config_for(retr, K))
    scores = rr.score(retr, lists)
    assert scores.shape == (64, K)
    same = two_stage_counts(retr, lists, scores)["full_kb"].ranks("pessimistic").tolist()
    assert same == [p.full_kb.rank for p in load_predictions(retriever_run, "test").mentions]
    with pytest.raises(ValueError, match="lists of 12 entities"):
        FeatureReranker(FeatureReranker.config_for(retr, 12)).score(retr, lists)
    # a view switch for a view the cache lacks is simply off
    retr.data.mention_views = tuple(v for v in retr.data.mention_views if v != "regions")
    cfg = FeatureReranker.config_for(retr, K, regions=True, entity_image=False, lexical=False)
    assert "regions" not in cfg.views and cfg.entity_views == ("profile",) and not cfg.lexical


@pytest.fixture(scope="module")
def reranker_run(retriever_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("reranker") / "rr"
    return out, _rerank(retriever_run, out, "--epochs", "8")


def test_the_trained_reranker_beats_its_retriever_on_namesakes(retriever_run, reranker_run):
    out, res = reranker_run
    retr = json.loads((retriever_run / "results.json").read_text())["protocols"]["full_kb"]["test"]
    ours = res["protocols"]["full_kb"]["test"]
    assert res["best_epoch"] > 0 and res["two_stage"]["top_k"] == K
    assert ours["hits@1"] >= retr["hits@1"] + 0.15 and ours["mrr"] > retr["mrr"]
    assert ours["hits@1"] <= res["oracle_recall_at_k"]["test"] + 1e-9      # the list's recall is the ceiling
    speed = res["rerank_speed"]
    assert speed["mentions"] == 64 and speed["rerank_mentions_per_s"] > 0
    # the saved re-ranker, loaded as a Linker uses it, reproduces the run's test ranking
    rr = FeatureReranker.load(out)
    r = open_run(retriever_run, "cpu")
    lists = r.lists("test")
    again = metrics_from_counts(two_stage_counts(r, lists, rr.score(r, lists))["full_kb"])
    assert again["hits@1"] == pytest.approx(ours["hits@1"]) and again["mrr"] == pytest.approx(ours["mrr"])


def test_dim_mel_evaluate_prints_a_two_stage_runs_results_json(reranker_run, tmp_path, capsys):
    out, res = reranker_run
    assert cli.main(["evaluate", "--run", str(out), "--split", "all", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == res["protocols"]        # the same numbers: one code path
    assert cli.main(["evaluate", "--run", str(out), "--device", "cpu", "--tie-rule", "strict"]) == 0
    table = capsys.readouterr().out
    assert "two-stage run" in table and f"lists of {K} entities, re-ranker feature" in table
    row = next(line.split() for line in table.splitlines() if line.split()[:2] == ["full_kb", "test"])
    assert row[2:4] == [f"{100 * res['tie_rules']['strict']['full_kb']['test'][m]:.2f}" for m in ("mrr", "hits@1")]
    # --predictions rewrites the run's predictions as they were
    before = (out / "predictions" / "test.jsonl").read_bytes()
    (out / "predictions" / "test.jsonl").unlink()
    assert cli.main(["evaluate", "--run", str(out), "--device", "cpu", "--predictions"]) == 0
    assert (out / "predictions" / "test.jsonl").read_bytes() == before
    capsys.readouterr()
    # the last checkpoint is the re-ranker's; a one-stage evaluation of the folder says what it is
    assert cli.main(["evaluate", "--run", str(out), "--device", "cpu", "--checkpoint", "last", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["full_kb"]["test"]["n"] == 64
    with pytest.raises(RunError, match="a two-stage run .* dim-mel evaluate"):
        one_stage.evaluate_run(["--run", str(out)])
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    results = json.loads((moved / "results.json").read_text())
    results["two_stage"]["retriever"]["run"] = str(tmp_path / "gone")
    (moved / "results.json").write_text(json.dumps(results))
    assert cli.main(["evaluate", "--run", str(moved), "--device", "cpu"]) == 2
    assert "gone is not there (moved? give --retriever FOLDER)" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run", str(moved), "--device", "cpu", "--json",
                     "--retriever", res["two_stage"]["retriever"]["run"]]) == 0
    assert json.loads(capsys.readouterr().out)["full_kb"]["test"] == res["protocols"]["full_kb"]["test"]


def test_resume_is_exact(retriever_run, tmp_path):
    full = _rerank(retriever_run, tmp_path / "full", "--epochs", "4")
    assert rerank_main(["--retriever", str(retriever_run), "--output-dir", str(tmp_path / "cut"), *FAST,
                        "--epochs", "4", "--stop-after-epochs", "2"]) == 0
    assert not (tmp_path / "cut" / "results.json").exists() and len(_metrics_lines(tmp_path / "cut")) == 2
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as fh:        # a line of an epoch that never checkpointed
        fh.write(json.dumps({"epoch": 3, "train_loss": 9.0}) + "\n")
    resumed = _rerank(retriever_run, tmp_path / "cut", "--epochs", "4", "--resume")
    assert _metrics_lines(tmp_path / "cut") == _metrics_lines(tmp_path / "full")
    assert resumed["protocols"] == full["protocols"] and resumed["best_epoch"] == full["best_epoch"]


def test_bad_runs_are_one_error_line(retriever_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        rerank_main(["--retriever", str(retriever_run), "--output-dir", str(tmp_path / "none"), "--resume"])
    _rerank(retriever_run, tmp_path / "rr", "--epochs", "1")
    with pytest.raises(FileExistsError, match="--resume or --overwrite"):
        rerank_main(["--retriever", str(retriever_run), "--output-dir", str(tmp_path / "rr"), *FAST])
    with pytest.raises(ValueError, match="--epochs 0"):
        rerank_main(["--retriever", str(retriever_run), "--output-dir", str(tmp_path / "rr"), *FAST,
                     "--epochs", "0", "--resume"])
    with pytest.raises(ValueError, match="--hidden-size 16"):
        rerank_main(["--retriever", str(retriever_run), "--output-dir", str(tmp_path / "rr"), *FAST,
                     "--epochs", "2", "--resume", "--hidden-size", "16"])


def test_lexical_features_compare_the_mention_with_the_names_and_count_namesakes(tmp_path):
    ents = [Entity("Q1", "Paris", "capital city of France"), Entity("Q2", "Paris", "figure of Greek mythology"),
            Entity("Q3", "Parish", "church district")]
    ments = [Mention("m1", "Paris of Troy in Greek mythology", "Paris", "Q2", "test")]
    save_dataset(tmp_path / "ds", DatasetInfo(name="lex", source_format="test", split_rule="test"), ents, ments)
    lex = LexicalFeatures(tmp_path / "ds", ["m1"], ["Q1", "Q2", "Q3"])
    f = lex.pairs(np.array([0]), torch.tensor([[0, 1, 2]]))[0]
    col = {n: f[:, i].tolist() for i, n in enumerate(LEXICAL_NAMES)}
    assert col["name_exact"] == [1.0, 1.0, 0.0] and col["namesakes_in_list"][0] > col["namesakes_in_list"][2] == 0
    assert col["sentence_desc_idf_overlap"][1] > 2 * col["sentence_desc_idf_overlap"][0]     # "Greek mythology"
    assert 0 < col["name_trigram_jaccard"][2] < col["name_trigram_jaccard"][0] == 1
    with pytest.raises(ValueError, match="entity 'Q9'"):
        LexicalFeatures(tmp_path / "ds", ["m1"], ["Q9"])
