"""Evaluation: re-evaluating a saved run, device-resident gathering, chunking, hard negatives, CLI errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nel_model import distributed as D
from nel_model import encoding as enc
from nel_model.runs import RunError
from nel_model.evaluation import evaluate as ev
from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.training.batches import make_epoch_plan
from nel_model.training.hard_negatives import hard_negative_table
from nel_model.data import FeatureSource, load_mel_data
from nel_model.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    write_synthetic(d / "ds", d / "feat", num_entities=40, mentions_per_split=(128, 48, 48), seed=5)
    out = d / "run"
    train_main(["--config", str(ROOT / "configs/synthetic.yaml"), "--features", str(d / "feat"),
                "--output_dir", str(out), "--epochs", "3"])
    return d / "feat", out


def test_cli_reevaluation_matches_results_json(trained_run, capsys):
    feat, out = trained_run
    saved = json.loads((out / "results.json").read_text())
    res = ev.evaluate_run(["--run", str(out), "--split", "all"])
    assert res == saved["protocols"]                     # the same numbers, not close ones: one code path
    table = capsys.readouterr().out
    assert f"scores {saved['score_dtype']}" in table and f"encoded {saved['encode_dtype']}" in table
    for proto in ("full_kb", "candidates"):
        row = next(line for line in table.splitlines() if line.split()[:2] == [proto, "test"])
        assert row.split()[2:4] == [f"{100 * saved['protocols'][proto]['test'][m]:.2f}" for m in ("mrr", "hits@1")]
    strict = ev.evaluate_run(["--run", str(out), "--split", "test", "--tie-rule", "strict"])
    assert strict["full_kb"]["test"] == saved["tie_rules"]["strict"]["full_kb"]["test"]


def test_host_and_device_resident_sources_and_chunks_agree(trained_run):
    feat, out = trained_run
    model, _ = enc.load_run_model(out, "best", torch.device("cpu"))
    data = load_mel_data(feat)
    dist = D.DistInfo()
    host = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
    dev = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views(), torch.device("cpu"), on_device=True)
    a = ev.evaluate_splits(model, data, host, ["test"], dist, ev.EvalSettings())
    b = ev.evaluate_splits(model, data, dev, ["test"], dist, ev.EvalSettings(mention_chunk=7, entity_chunk=9))
    assert a == b
    rows = np.array([3, 1, 3, 0])
    x, y = host.mentions(rows), dev.mentions(rows)
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_hard_negative_table_and_plan(trained_run):
    feat, out = trained_run
    model, _ = enc.load_run_model(out, "best", torch.device("cpu"))
    data = load_mel_data(feat)
    src = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
    train = data.splits["train"]
    table = hard_negative_table(model, data, src, train, 5, D.DistInfo(), ev.EvalSettings(mention_chunk=16))
    assert table.shape == (len(data.mention_ids), 5)
    assert (table[train] != data.gold[train, None]).all() and (table[train] >= 0).all()
    other = np.setdiff1d(np.arange(len(data.mention_ids)), train)
    assert (table[other] == -1).all()
    plan = make_epoch_plan(1, 0, train, data.gold, data.num_entities, 16, 3, table, hard_ratio=1.0)
    assert (plan.negatives != plan.gold[:, None]).all()
    assert all(set(n) <= set(table[r]) for r, n in zip(plan.order, plan.negatives))
    again = make_epoch_plan(1, 0, train, data.gold, data.num_entities, 16, 3, table, hard_ratio=1.0)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.negatives, again.negatives)


def test_clear_errors(tmp_path):
    with pytest.raises(RunError, match="no config.json"):
        ev.evaluate_run(["--run", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not a feature folder"):
        load_mel_data(tmp_path)


def test_dataloader_workers_gather_the_same_batches(trained_run):
    from nel_model.training.batches import TrainBatches, make_loader

    feat, _ = trained_run
    data = load_mel_data(feat)
    src = FeatureSource(data, ("mention", "sentence", "regions"), ("desc", "image"))
    plan = make_epoch_plan(3, 1, data.splits["train"], data.gold, data.num_entities, 24, 2)
    ds = TrainBatches(plan, src, rank=1, world_size=2)
    got = list(make_loader(ds, 2, num_workers=1, pin_memory=False))
    assert len(got) == len(ds) - 2
    for b, batch in enumerate(got, start=2):
        want = ds[b]
        assert tuple(batch["local"]) == want["local"] and batch["global_n"] == want["global_n"]
        assert all(torch.equal(batch["mention"][k], want["mention"][k]) for k in want["mention"])
        assert all(torch.equal(batch["entity"][k], want["entity"][k]) for k in want["entity"])
    lo, hi = ds[0]["local"]
    assert (lo, hi) == (12, 24) and ds[0]["mention"]["mention"].shape[0] == 12
    assert ds[0]["entity"]["desc"].shape[0] == 24 * 3        # global golds + 2 negatives each


def test_faiss_index_evaluation_matches_exact_on_a_small_kb(trained_run, capsys):
    _, out = trained_run
    res = ev.evaluate_run(["--run", str(out), "--split", "test", "--faiss", "hnsw", "--faiss_k", "40"])
    approx, exact = res["faiss_hnsw"]["test"], res["full_kb"]["test"]
    assert approx["recall@20_vs_exact"] == pytest.approx(1.0)
    for key in ("mrr", "hits@1", "hits@5", "hits@20", "n"):
        assert approx[key] == pytest.approx(exact[key])
    assert "faiss_hnsw" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Per-mention predictions (RUN/predictions/<split>.jsonl)


def test_predictions_agree_with_an_independent_float64_ranking(trained_run):
    from nel_model.evaluation.metrics import metrics_from_ranks
    from nel_model.runs import load_predictions

    feat, out = trained_run
    cpu = torch.device("cpu")
    model, ckpt = enc.load_run_model(out, "best", cpu)
    data = load_mel_data(feat)
    src = FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views())
    results = json.loads((out / "results.json").read_text())
    for split in ("dev", "test"):
        preds = load_predictions(out, split)
        rows = data.splits[split]
        assert preds.meta["n"] == len(rows) == len(preds.mentions)
        assert preds.meta["checkpoint"] == {"name": "best", "epoch": ckpt["epoch"]}
        assert preds.meta["kb_entities"] == data.num_entities and preds.meta["top_k"] == 10
        q = enc.encode_mentions(model, src, rows, cpu, ev.EvalSettings()).double()
        scores = q @ enc.encode_entities(model, src, cpu, ev.EvalSettings()).double().T
        for i, p in enumerate(preds.mentions):
            s, gold, cands = scores[i].tolist(), int(data.gold[rows[i]]), data.candidates[rows[i]]
            assert (p.mention_id, p.gold) == (data.mention_ids[rows[i]], data.entity_ids[gold])
            assert p.full_kb.rank == sum(v >= s[gold] for v in s)        # pessimistic: the gold counts itself once
            best = sorted(range(len(s)), key=lambda r: (-s[r], r))[:10]
            assert [e for e, _ in p.top] == [data.entity_ids[r] for r in best]
            assert [v for _, v in p.top] == pytest.approx([s[r] for r in best], abs=1e-5)
            others = [c for c in cands.tolist() if c >= 0 and c != gold]
            assert p.candidates.rank == 1 + sum(s[c] >= s[gold] for c in others)    # DIM's rule: gold always ranked
        saved = dict(results["protocols"]["full_kb"][split])
        assert saved.pop("nan") == 0
        assert metrics_from_ranks([p.full_kb.rank for p in preds.mentions]) == pytest.approx(saved)


def test_evaluate_predictions_flag_rewrites_the_same_files(trained_run, tmp_path):
    import shutil

    _, out = trained_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = {p.name: p.read_bytes() for p in (run / "predictions").iterdir()}
    assert sorted(before) == ["dev.jsonl", "dev.meta.json", "test.jsonl", "test.meta.json"]
    shutil.rmtree(run / "predictions")
    ev.evaluate_run(["--run", str(run), "--split", "all", "--predictions"])
    assert {p.name: p.read_bytes() for p in (run / "predictions").iterdir()} == before


def test_top_entities_orders_ties_by_kb_row_and_nan_last():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0], [float("nan"), 0.0]])
    scores, rows = ev.top_entities(q, e, 2, chunk=1)
    assert rows.tolist() == [[1, 2], [0, 1]] and scores.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    scores, rows = ev.top_entities(q, e, 6, chunk=2)
    assert rows.tolist() == [[1, 2, 4, 3, 0, 5], [0, 1, 2, 3, 4, 5]]


def test_predictions_reader_names_file_line_and_field(tmp_path):
    from nel_model.runs import RunError, load_predictions

    with pytest.raises(RunError, match=r"predictions/test.jsonl: no predictions for split 'test' .*--predictions\)$"):
        load_predictions(tmp_path, "test")
    (tmp_path / "predictions").mkdir()
    good = {"mention_id": "m1", "gold": "e1", "rank": 2, "higher": 1, "equal": 0, "unordered": 0,
            "top": [["e2", 0.5], ["e1", 0.25]]}
    bad = {**good, "mention_id": "m2", "candidates": {"rank": -1, "higher": 0, "equal": 0, "unordered": 0}}
    path = tmp_path / "predictions" / "test.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RunError) as exc:
        load_predictions(tmp_path, "test")
    assert str(exc.value) == f"{path}, line 2 (mention 'm2'), field 'candidates.rank': must be a non-negative " \
                             "integer, got -1"
    path.write_text(json.dumps(good) + "\n")
    (tmp_path / "predictions" / "test.meta.json").write_text('{"n": 3}')
    with pytest.raises(RunError, match="field 'n' says 3 mentions but .* has 1 lines"):
        load_predictions(tmp_path, "test")


def test_model_side_faults_are_one_error_line(trained_run, tmp_path, capsys, monkeypatch):
    """A truncated checkpoint, a cache without a view the model uses, a CUDA device the machine lacks and a full disk
    while training: each one line naming what failed, exit status 2, no traceback (docs/RELIABILITY.md)."""
    import errno
    import shutil

    from data_process.core.entry import run_main

    feat, out = trained_run

    def fails(main, argv):
        with pytest.raises(SystemExit) as ex:
            run_main(main, argv)
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "Traceback" not in err
        return err.splitlines()[0]

    cut = tmp_path / "cut_run"
    shutil.copytree(out, cut)
    best = cut / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    assert fails(ev.main, ["--run", str(cut)]).startswith(f"error: {best}: unreadable checkpoint")

    thin = tmp_path / "thin_feat"
    shutil.copytree(feat, thin)
    meta = json.loads((thin / "meta.json").read_text())
    for name in [k for k in meta["views"] if k == "mention.regions"]:
        del meta["views"][name]
    (thin / "meta.json").write_text(json.dumps(meta))
    for f in thin.glob("mention.regions*"):
        f.unlink()
    line = fails(ev.main, ["--run", str(out), "--features", str(thin)])
    assert line.startswith(f"error: {thin}: the feature cache has no mention view 'regions', which the model uses")

    assert fails(ev.main, ["--run", str(out), "--device", "cuda:7"]) == \
        "error: --device cuda:7: CUDA is not available on this machine (use --device cpu or auto)"

    from nel_model import train
    from nel_model.training import engine

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(engine, "atomic_write_json", full_disk)
    line = fails(train.command, ["--config", str(ROOT / "configs/synthetic.yaml"), "--features", str(feat),
                                "--output-dir", str(tmp_path / "full"), "--epochs", "1"])
    assert line.startswith(f"error: {tmp_path / 'full' / 'config.json'}: no space left on device")
