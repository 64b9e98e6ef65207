"""A pairwise model (MIMIC) in the one evaluation and in the training engine, on a synthetic feature cache with the
views MIMIC reads (a sentence token carries a rotation of the gold's description: learnable, not zero-shot): whole-KB
and candidate counts in chunks equal to unchunked ones and to a rank computed pair by pair, the memory bound of a
chunk, ``dim-mel train --model mimic`` (learning, exact resume, the official optimiser, the dev protocols), ``dim-mel
evaluate`` / ``retrieve`` of a MIMIC run, and a MIMIC run as the pairwise re-ranker of a two-stage run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process.fixtures.synthetic_features import write_synthetic
from nel_model import distributed as D
from nel_model.config import MIMICTrainConfig, mimic_config, parse_train_args, views_read
from nel_model.data import FeatureSource, load_mel_data
from nel_model.encoding import EvalSettings, encode_entities, encode_mentions
from nel_model.evaluation.evaluate import main as evaluate_main, open_run, split_counts
from nel_model.evaluation.scoring import MiB, PairScorer, kb_scorer
from nel_model.mimic import MIMIC, EntitySide, pair_bytes
from nel_model.runs import RunError, load_predictions
from nel_model.train import TASKS, main as train_main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--dv", "16", "--text-len", "6", "--batch-size", "32", "--lr", "3e-3", "--threads", "1",
         "--device", "cpu", "--dev-protocol", "candidates", "--select-by", "candidates:mrr"]
RULES = ("pessimistic", "strict", "mean")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    w = tmp_path_factory.mktemp("mimic_cache")
    write_synthetic(w / "ds", w / "feat", num_entities=40, mentions_per_split=(192, 48, 48), seed=5,
                    entity_tokens=True, signal="text")
    return w / "feat"


def train(cache: Path, out: Path, *flags: str) -> dict:
    return train_main(["--model", "mimic", "--features", str(cache), "--output-dir", str(out), *SMALL, *flags])


@pytest.fixture(scope="module")
def mimic_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("mimic_run") / "run"
    train(cache, out, "--epochs", "5", "--label", "mimic")
    return out


def _model(data, hidden: int = 16) -> MIMIC:
    torch.manual_seed(0)
    cfg = parse_train_args(["--model", "mimic", "--hidden", str(hidden), "--dv", "16", "--text-len", "6"])
    return MIMIC(mimic_config(cfg.model, data)).eval()


def test_whole_kb_pairwise_evaluation_in_chunks_equals_an_unchunked_one_and_pair_by_pair_ranks(cache):
    data = load_mel_data(cache)
    model = _model(data, hidden=96)
    source = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
    cpu = D.DistInfo(device=torch.device("cpu"))
    rows = data.splits["test"]
    whole = EvalSettings(mention_chunk=10_000, entity_chunk=10_000, pair_memory_mb=1 << 20)
    small = EvalSettings(mention_chunk=7, entity_chunk=5, pair_memory_mb=1 << 20)
    tiny = EvalSettings(mention_chunk=64, entity_chunk=64, pair_memory_mb=1)     # the bound cuts the chunks
    kb = encode_entities(model, source, torch.device("cpu"), small)               # encoded in blocks of 5
    assert isinstance(kb, EntitySide) and len(kb) == data.num_entities
    ref = split_counts(model, data, source, rows, cpu, whole, top_k=10)
    for settings in (small, tiny):
        got = split_counts(model, data, source, rows, cpu, settings, kb, top_k=10)
        for proto in ("full_kb", "candidates"):
            for rule in RULES:
                assert torch.equal(got[proto].ranks(rule), ref[proto].ranks(rule)), (proto, rule)
        assert torch.equal(got["full_kb"].top_rows, ref["full_kb"].top_rows)
        assert torch.allclose(got["full_kb"].top_scores, ref["full_kb"].top_scores, atol=1e-5)
    cut = kb_scorer(model, kb, tiny)
    assert cut.entity_chunk < data.num_entities                 # 1 MiB holds fewer than 64 x 40 pairs
    # the ranks of pairs scored one mention at a time against the whole KB, counted here
    with torch.no_grad():
        m = encode_mentions(model, source, rows, torch.device("cpu"), whole)
        scores = torch.cat([model.pair_scores(m.rows(slice(i, i + 1)), kb) for i in range(len(rows))])
    gold = torch.from_numpy(data.gold[rows])
    g = scores.gather(1, gold[:, None])
    assert torch.equal(ref["full_kb"].ranks("pessimistic"), (scores >= g).sum(1))
    assert torch.equal(ref["full_kb"].ranks("strict"), 1 + (scores > g).sum(1))
    cands = torch.from_numpy(data.candidates[rows])
    cg = scores.gather(1, cands.clamp(min=0))
    listed = (cands >= 0) & (cands != gold[:, None])
    assert torch.equal(ref["candidates"].ranks("pessimistic"), 1 + ((cg >= g) & listed).sum(1))


def test_a_chunk_stays_within_the_memory_bound(cache):
    data = load_mel_data(cache)
    model = _model(data, hidden=96)
    source = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
    kb = encode_entities(model, source, torch.device("cpu"), EvalSettings())
    for mb in (1, 4):
        s = kb_scorer(model, kb, EvalSettings(mention_chunk=512, entity_chunk=8192, pair_memory_mb=mb))
        assert isinstance(s, PairScorer)
        cost = pair_bytes(s.mention_chunk, s.entity_chunk, model.cfg.text_len, s.entity_len, 96, model.cfg.units,
                          text_dim=data.text_dim)
        assert cost + 12 * s.mention_chunk * data.num_entities <= mb * MiB
        assert s.describe()["pair_memory_mb"] == mb


def test_mimic_config_file_holds_the_commands_defaults_and_the_views_it_reads():
    cfg = parse_train_args(["--config", str(ROOT / "configs" / "mimic.yaml")])
    default = MIMICTrainConfig()
    assert type(cfg) is MIMICTrainConfig
    assert {k: v for k, v in cfg.flat().items() if k not in ("config", "views")} == \
        {k: v for k, v in default.flat().items() if k not in ("config", "views")}
    assert (cfg.model.hidden, cfg.model.dv, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.epochs,
            cfg.model.text_len) == (96, 96, 1e-5, 128, 20, 40)
    assert views_read(cfg) == cfg.data.views
    text_only = parse_train_args(["--model", "mimic", "--no-use-image-unit", "--no-use-fusion-unit"])
    assert views_read(text_only) == ("mention.sentence", "mention.context", "entity.desc", "entity.desc_tokens")


@pytest.mark.parametrize("argv, message", [
    (["--dev-protocol", "candidates"], "select on them too (--select-by candidates:mrr"),
    (["--eval-dtype", "float16"], "a pairwise model scores in float32"),
    (["--no-use-text-unit", "--no-use-image-unit", "--no-use-fusion-unit"], "MIMIC needs at least one unit"),
    (["--views", "entity.captions"], "unknown view 'entity.captions'"),
])
def test_contradictory_mimic_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as ex:
        parse_train_args(["--model", "mimic", *argv])
    assert ex.value.code == 2 and message in capsys.readouterr().err


def test_dim_mel_train_model_mimic_learns_beyond_the_untrained_model(cache, mimic_run, tmp_path):
    untrained = train(cache, tmp_path / "zero", "--epochs", "0")
    trained = json.loads((mimic_run / "results.json").read_text())
    for proto in ("full_kb", "candidates"):
        assert trained["protocols"][proto]["test"]["mrr"] > untrained["protocols"][proto]["test"]["mrr"] + 0.1, proto
    conf = json.loads((mimic_run / "config.json").read_text())
    assert conf["task"] == "mimic" and conf["model_config"]["model"] == "mimic"
    assert trained["dev_protocol"] == {"protocol": "candidates", "subset": None}
    assert set(trained["protocols"]["full_kb"]) == {"test"}
    assert set(trained["protocols"]["candidates"]) == {"dev", "test"}
    lines = [json.loads(x) for x in (mimic_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4, 5]
    assert all(x["dev_protocol"] == "candidates" and x["dev"] == x["dev_candidates"] for x in lines)
    assert {x["lr"] for x in lines} == {3e-3}                                    # the official constant rate
    assert set(trained["eval_s"]) == {"kb_side", "test", "dev"}


def test_the_official_optimiser(cache, tmp_path):
    from nel_model.training.engine import Engine

    cfg = parse_train_args(["--model", "mimic", "--features", str(cache), "--output-dir", str(tmp_path / "o"),
                            "--hidden", "16", "--dv", "16"])
    engine = Engine(cfg, TASKS["mimic"], D.DistInfo())
    decay, no_decay = engine.optimizer.param_groups
    names = {id(p): n for n, p in engine.model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0 and decay["eps"] == 1e-4
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in engine.model.named_parameters()
                                                          if "bias" in n}
    assert any(n.endswith("norm.weight") for n in (names[id(p)] for p in decay["params"]))
    assert {f(s) for f in engine.scheduler.lr_lambdas for s in (0, 10, 10_000)} == {1.0}      # constant


def test_a_resumed_mimic_run_ends_with_the_metrics_of_an_uninterrupted_one(cache, tmp_path):
    full = train(cache, tmp_path / "full", "--epochs", "3", "--dev-subset", "20")
    assert train(cache, tmp_path / "cut", "--epochs", "3", "--dev-subset", "20", "--stop-after-epochs", "2") == \
        {"stopped_at_epoch": 2}
    resumed = train(cache, tmp_path / "cut", "--epochs", "3", "--dev-subset", "20", "--resume")
    assert resumed["protocols"] == full["protocols"] and resumed["best_epoch"] == full["best_epoch"]

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "train_s")}
                for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "cut") == lines(tmp_path / "full")


def test_a_fixed_dev_subset_is_the_same_sample_for_every_seed(cache, tmp_path):
    a = train(cache, tmp_path / "a", "--epochs", "1", "--dev-protocol", "subset", "--dev-subset", "20",
              "--select-by", "full_kb:mrr", "--seed", "1")
    line = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["dev"]["n"] == 20 and line["dev_candidates"]["n"] == 48 and "dev_protocol" not in line
    assert a["dev_protocol"] == {"protocol": "subset", "subset": 20}
    from nel_model.training.mimic_task import dev_subset
    rows = np.arange(100, 148)
    assert np.array_equal(dev_subset(rows, 20), dev_subset(rows, 20)) and len(set(dev_subset(rows, 20))) == 20


def test_dim_mel_evaluate_and_retrieve_of_a_mimic_run(mimic_run, capsys):
    results = json.loads((mimic_run / "results.json").read_text())
    assert evaluate_main(["--run", str(mimic_run), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for proto in ("full_kb", "candidates"):
        for key, value in results["protocols"][proto]["test"].items():
            assert printed[proto]["test"][key] == pytest.approx(value, abs=1e-12), (proto, key)
    r = open_run(mimic_run, "cpu")
    assert r.pairwise and isinstance(r.kb, EntitySide)
    with pytest.raises(RunError, match="a pairwise run \\(MIMIC\\) scores each \\(mention, entity\\) pair"):
        r.entity_emb
    from nel_model.inference.retrieve import retrieve
    report = retrieve(mimic_run, ("test",), 5, device="cpu")
    lists = load_predictions(mimic_run, "test", "retrieval")
    preds = load_predictions(mimic_run, "test")
    assert [[e for e, _ in p.top] for p in lists.mentions] == [[e for e, _ in p.top[:5]] for p in preds.mentions]
    assert report["splits"]["test"]["recall@1"] == pytest.approx(results["protocols"]["full_kb"]["test"]["hits@1"])
    with pytest.raises(ValueError, match="is a pairwise run"):
        retrieve(mimic_run, ("test",), 5, device="cpu", faiss="ivf")


def test_a_mimic_run_reranks_a_retrievers_lists_in_a_two_stage_run(cache, mimic_run, tmp_path, capsys):
    from nel_model.inference.retrieve import retrieve
    from nel_model.rerank.pairwise import main as rerank_main
    from nel_model.rerank.registry import load_reranker, reranker_kind

    dim = tmp_path / "dim"
    train_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), "--features", str(cache), "--output-dir",
                str(dim), "--epochs", "2", "--threads", "1", "--device", "cpu"])
    retrieve(dim, ("dev", "test"), 10, device="cpu")
    two = tmp_path / "two"
    assert rerank_main(["--retriever", str(dim), "--pairwise", str(mimic_run), "--output-dir", str(two)]) == 0
    capsys.readouterr()
    results = json.loads((two / "results.json").read_text())
    assert results["two_stage"]["reranker"]["kind"] == "pairwise" and results["two_stage"]["top_k"] == 10
    # the re-ranked lists: the retriever's 10 entities in the order of the MIMIC run's own whole-KB scores
    m = open_run(mimic_run, "cpu")
    rows = m.data.splits["test"]
    scores = kb_scorer(m.model, m.kb, m.settings).scores(m.mention_embeddings(rows))
    row_of = {e: i for i, e in enumerate(m.data.entity_ids)}
    for p, l, s in zip(load_predictions(two, "test").mentions, load_predictions(dim, "test", "retrieval").mentions,
                       scores):
        listed = [e for e, _ in l.top]
        expect = sorted(listed, key=lambda e: -float(s[row_of[e]]))
        assert [e for e, _ in p.top] == expect
    # dim-mel evaluate gives its results.json numbers; the registry loads it for the linker
    from nel_model.evaluate import main as evaluate_any
    assert evaluate_any(["--run", str(two), "--split", "all", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for proto in ("full_kb", "candidates"):
        for split in ("dev", "test"):
            assert printed[proto][split]["mrr"] == pytest.approx(results["protocols"][proto][split]["mrr"])
    assert reranker_kind(two) == "pairwise"
    rr = load_reranker(two, open_run(dim, "cpu"))
    assert rr.top_k == 10 and rr.fingerprint == m.checkpoint_sha256 and rr.shared_views


def test_tables_and_the_error_analysis_read_a_mimic_run(mimic_run, tmp_path, capsys):
    from nel_model.reporting.analyze import main as analyze_main
    from nel_model.reporting.tables import main as table_main

    mrr = json.loads((mimic_run / "results.json").read_text())["protocols"]["full_kb"]["test"]["mrr"]
    assert table_main([str(mimic_run)]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| mimic |"))
    assert f"{100 * mrr:.2f}" in row
    assert analyze_main(["--run", str(mimic_run), "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert (report["n"], report["protocol"], report["split"]) == (48, "full_kb", "test") and report["breakdowns"]
