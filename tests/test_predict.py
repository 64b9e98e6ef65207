"""nel_model.inference.predict on a small trained demo run: synthetic dataset -> tiny CLIP features -> 8 epochs -> predict.

The whole pipeline runs once per module (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process.core.records import load_dataset
from nel_model.inference import predict as P
from nel_model.runs import load_predictions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from data_process.encode.features import FeatureSettings, build_features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    w = tmp_path_factory.mktemp("predict_demo")
    data = generate(w / "data", SyntheticConfig(entities=24, mentions=160, seed=0, image_size=32), progress=False)
    clip = save_tiny_clip(w / "clip", image_size=32)
    build_features(data, w / "feat", FeatureSettings(clip=str(clip), max_len=16, region_grid=2), num_workers=0,
                   device="cpu", progress=False)
    run = w / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nel_model.train", "--config", str(ROOT / "configs" / "synthetic.yaml"),
                           "--features", str(w / "feat"), "--output_dir", str(run), "--epochs", "8", "--seed", "1",
                           "--label", "demo", "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": w, "data": Path(data), "run": run, "predictor": P.Predictor(run)}


def _cache_top1(pred: P.Predictor, mention_ids: list[str]) -> list[str]:
    """Top-1 entity of dataset mentions scored from the feature cache (the training/evaluation path)."""
    from nel_model.data import FeatureSource, load_mel_data

    data = load_mel_data(pred.features)
    src = FeatureSource(data, pred.model.cfg.mention_views(), pred.model.cfg.entity_views())
    rows = np.array([data.mention_ids.index(m) for m in mention_ids])
    with torch.no_grad():
        q = pred.model.encode_mentions(src.mentions(rows))
    return [pred.entity_ids[i] for i in (q @ pred.entity_emb.T).argmax(1).tolist()]


def test_predict_matches_cache_and_finds_gold(demo, capsys):
    pred: P.Predictor = demo["predictor"]
    ds = load_dataset(demo["data"])
    train = [m for m in ds.split("train") if m.image is not None][:24]
    cache_top = _cache_top1(pred, [m.id for m in train])
    queries = [P.Query(sentence=m.sentence, mention=m.mention, image=ds.image_path(m.image), id=m.id,
                       gold_id=m.gold_id) for m in train]
    results = pred.predict(queries, top_k=3)
    # Encoding a mention from raw inputs reproduces the cached features: same ranking as evaluation.
    assert [r["predictions"][0]["entity_id"] for r in results] == cache_top
    easy = next(m for m, top in zip(train, cache_top) if top == m.gold_id)
    names = {e.id: e.name for e in ds.entities}
    rc = P.main(["--run", str(demo["run"]), "--sentence", easy.sentence, "--mention", easy.mention,
                 "--image", str(ds.image_path(easy.image)), "--top_k", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mention {easy.mention!r} in {easy.sentence!r} with image {ds.image_path(easy.image)}"
    assert lines[1].split() == ["rank", "score", "id", "name", "description"]
    assert len(lines) == 5
    first = lines[2].split()
    assert first[0] == "1" and first[2] == easy.gold_id and first[3] == names[easy.gold_id]
    assert -1.0 <= float(first[1]) <= 1.0


def test_batch_mode(demo, tmp_path):
    ds = load_dataset(demo["data"])
    ms = [m for m in ds.split("test") if m.image is not None][:3]
    inp = tmp_path / "in.jsonl"
    # relative image paths resolve against the input file's folder
    (tmp_path / "img.png").write_bytes(ds.image_path(ms[0].image).read_bytes())
    lines = [{"id": "a", "sentence": ms[0].sentence, "mention": ms[0].mention, "image": "img.png",
              "gold_id": ms[0].gold_id},
             {"sentence": ms[1].sentence, "mention": ms[1].mention},
             {"id": 7, "sentence": ms[2].sentence, "mention": ms[2].mention, "caption": "a photo of a river"}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    assert P.main(["--run", str(demo["run"]), "--input", str(inp), "--output", str(out), "--top_k", "4"]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a", None, "7"]
    assert [r["mention"] for r in recs] == [m.mention for m in ms]
    for r in recs:
        assert [h["rank"] for h in r["predictions"]] == [1, 2, 3, 4]
        scores = [h["score"] for h in r["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert set(r["predictions"][0]) == {"rank", "entity_id", "name", "score", "description"}
    gold = next(h for h in recs[0]["predictions"] if h["entity_id"] == ms[0].gold_id) \
        if any(h["entity_id"] == ms[0].gold_id for h in recs[0]["predictions"]) else None
    ranked = {p.mention_id: p.full_kb.rank for p in load_predictions(demo["run"], "test").mentions}
    assert recs[0]["gold_rank"] == ranked[ms[0].id]          # the same input as the dataset mention: its rank
    if gold is not None:
        assert gold["rank"] == recs[0]["gold_rank"]
    assert "gold_rank" not in recs[1]


def test_predict_ranks_and_top_lists_are_the_runs_predictions(demo):
    pred: P.Predictor = demo["predictor"]
    ds = load_dataset(demo["data"])
    written = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    sample = ds.split("test")[:20]
    queries = [P.Query(sentence=m.sentence, mention=m.mention, image=ds.image_path(m.image), id=m.id,
                       gold_id=m.gold_id) for m in sample]
    results = pred.predict(queries, top_k=5)
    assert [r["gold_rank"] for r in results] == [written[m.id].full_kb.rank for m in sample]
    assert [[h["entity_id"] for h in r["predictions"]] for r in results] == \
        [[eid for eid, _ in written[m.id].top[:5]] for m in sample]
    assert len({r["gold_rank"] for r in results}) > 1          # not one rank for everything


def test_predict_last_checkpoint_encodes_the_kb_with_that_checkpoint(demo):
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.encoding import EncodeSettings, encode_entities, load_run_model

    last = P.Predictor(demo["run"], checkpoint="last")
    model, ckpt = load_run_model(demo["run"], "last", torch.device("cpu"))
    data = load_mel_data(last.features)
    own = encode_entities(model, FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views()),
                          torch.device("cpu"), EncodeSettings())
    assert torch.equal(last.entity_emb, own)
    best_epoch = json.loads((demo["run"] / "results.json").read_text())["best_epoch"]
    if best_epoch != ckpt["epoch"]:
        assert not torch.equal(last.entity_emb, demo["predictor"].entity_emb)


def test_errors(demo, tmp_path, capsys):
    run = str(demo["run"])
    missing_run = tmp_path / "no_run"
    assert P.main(["--run", str(missing_run), "--sentence", "s", "--mention", "m"]) == 2
    assert capsys.readouterr().err == f"error: {missing_run}: run folder not found\n"
    missing_img = tmp_path / "nope.png"
    assert P.main(["--run", run, "--sentence", "s", "--mention", "m", "--image", str(missing_img)]) == 2
    assert capsys.readouterr().err == f"error: {missing_img}: image not found\n"
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"not a png")
    assert P.main(["--run", run, "--sentence", "s", "--mention", "m", "--image", str(bad_img)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad_img}: cannot read the image (unreadable: ")
    inp = tmp_path / "q.jsonl"
    inp.write_text('{"sentence": "s", "mention": "m"}\n{"sentence": "s", "mention": "m", "image": "x.png"}\n')
    assert P.main(["--run", run, "--input", str(inp)]) == 2
    assert capsys.readouterr().err == f"error: {inp}, line 2: image {tmp_path / 'x.png'} not found\n"
    inp.write_text('{"sentence": "s"}\n')
    assert P.main(["--run", run, "--input", str(inp)]) == 2
    assert capsys.readouterr().err == f"error: {inp}, line 1: field 'mention' is missing or empty\n"
    not_run = tmp_path / "empty_dir"
    not_run.mkdir()
    assert P.main(["--run", str(not_run), "--sentence", "s", "--mention", "m"]) == 2
    assert capsys.readouterr().err == f"error: {not_run}: no config.json (not a complete run folder)\n"
    with pytest.raises(SystemExit):
        P.main(["--run", run, "--sentence", "s"])
