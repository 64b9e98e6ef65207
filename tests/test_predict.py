"""Linking new mentions (dim-mel predict, the linker's retrieval, new KB entities) on a small trained demo run:
synthetic dataset -> tiny CLIP features -> 8 epochs -> predict.

The whole pipeline runs once per module (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process.core.records import load_dataset
from dim_mel import cli
from nel_model.evaluation.evaluate import open_run
from nel_model.inference import linker as LK
from nel_model.inference import predict as P
from nel_model.inference.linker import Linker
from nel_model.linking import Query
from nel_model.loaded_run import LoadedRun
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
    return {"root": w, "data": Path(data), "run": run, "retriever": open_run(run, "cpu")}


def _cache_top1(r: LoadedRun, mention_ids: list[str]) -> list[str]:
    """Top-1 entity of dataset mentions scored from the feature cache (the training/evaluation path)."""
    rows = np.array([r.data.mention_ids.index(m) for m in mention_ids])
    q = r.mention_embeddings(rows)
    return [r.data.entity_ids[i] for i in (q @ r.entity_emb.T).argmax(1).tolist()]


def _queries(ds, mentions) -> list[Query]:
    return [Query(sentence=m.sentence, mention=m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id)
            for m in mentions]


def test_predict_matches_cache_and_finds_gold(demo, capsys):
    ds = load_dataset(demo["data"])
    train = [m for m in ds.split("train") if m.image is not None][:24]
    cache_top = _cache_top1(demo["retriever"], [m.id for m in train])
    results = Linker(demo["retriever"]).link_many(_queries(ds, train), top_k=3)
    # Encoding a mention from raw inputs reproduces the cached features: same ranking as evaluation.
    assert [r.entities[0].entity_id for r in results] == cache_top
    easy = next(m for m, top in zip(train, cache_top) if top == m.gold_id)
    names = {e.id: e.name for e in ds.entities}
    rc = P.main(["--run", str(demo["run"]), "--sentence", easy.sentence, "--mention", easy.mention,
                 "--image", str(ds.image_path(easy.image)), "--top-k", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mention {easy.mention!r} in {easy.sentence!r} with image {ds.image_path(easy.image)}"
    assert lines[1].split() == ["rank", "score", "id", "name", "description"]
    assert len(lines) == 5
    first = lines[2].split()
    assert first[0] == "1" and first[2] == easy.gold_id and first[3] == names[easy.gold_id]
    assert -1.0 <= float(first[1]) <= 1.0


def test_predict_is_link_with_one_mention(demo, tmp_path, capsys):
    """`predict --json` prints the object `link` writes a line of, for the same mention: one linker, one schema."""
    ds = load_dataset(demo["data"])
    m = next(m for m in ds.split("test") if m.image is not None)
    (tmp_path / "img.png").write_bytes(ds.image_path(m.image).read_bytes())
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "sentence": m.sentence, "mention": m.mention,
                                                   "image": "img.png", "caption": {"text": "a photo", "provenance": {
                                                       "source": "test"}}}) + "\n")
    assert LK.main(["--run", str(demo["run"]), "--input", str(tmp_path / "in.jsonl"), "--out",
                    str(tmp_path / "out.jsonl"), "--top-k", "4", "--no-progress"]) == 0
    linked = json.loads((tmp_path / "out.jsonl").read_text())
    capsys.readouterr()
    assert P.main(["--run", str(demo["run"]), "--sentence", m.sentence, "--mention", m.mention, "--image",
                   str(tmp_path / "img.png"), "--caption", "a photo", "--top-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"id", "mention", "entities"} and set(linked) == {"id", "mention", "entities", "provenance"}
    assert [e["entity_id"] for e in got["entities"]] == [e["entity_id"] for e in linked["entities"]]
    assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in linked["entities"]], abs=1e-5)
    assert set(got["entities"][0]) == {"rank", "entity_id", "name", "description", "score", "stage"}


def test_predict_ranks_and_top_lists_are_the_runs_predictions(demo):
    ds = load_dataset(demo["data"])
    written = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    sample = ds.split("test")[:20]
    results = Linker(demo["retriever"]).link_many(_queries(ds, sample), top_k=5)
    assert [r.gold_rank for r in results] == [written[m.id].full_kb.rank for m in sample]
    assert [[e.entity_id for e in r.entities] for r in results] == \
        [[eid for eid, _ in written[m.id].top[:5]] for m in sample]
    assert len({r.gold_rank for r in results}) > 1          # not one rank for everything


def test_predict_last_checkpoint_encodes_the_kb_with_that_checkpoint(demo):
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.encoding import EncodeSettings, encode_entities, load_run_model

    last = open_run(demo["run"], "cpu", "last")
    model, ckpt = load_run_model(demo["run"], "last", torch.device("cpu"))
    data = load_mel_data(last.data.root)
    own = encode_entities(model, FeatureSource(data, model.cfg.mention_views(), model.cfg.entity_views()),
                          torch.device("cpu"), EncodeSettings(entity_chunk=last.settings.entity_chunk))
    assert torch.equal(last.entity_emb, own)
    best_epoch = json.loads((demo["run"] / "results.json").read_text())["best_epoch"]
    if best_epoch != ckpt["epoch"]:
        assert not torch.equal(last.entity_emb, demo["retriever"].entity_emb)


def test_new_kb_entities_are_encoded_as_the_feature_cache_encodes_them(demo):
    """Entity records the run was not trained on go through the feature step's views and the run's model: the
    KB's own records give the KB's embeddings (up to float16 rounding and batching) and rank mentions alike."""
    r = demo["retriever"]
    ds = load_dataset(demo["data"])
    by_id = {e.id: e for e in ds.entities}
    emb = r.encode_entity_records([by_id[i] for i in r.data.entity_ids], ds.root)
    assert emb.shape == r.entity_emb.shape
    cos = (emb * r.entity_emb).sum(1)
    assert float(cos.min()) > 0.999, float(cos.min())
    q = r.mention_embeddings(r.data.splits["test"])
    assert ((q @ emb.T).argmax(1) == (q @ r.entity_emb.T).argmax(1)).float().mean() > 0.95
    # an entity without its image: the image view is zero and masked, as the feature step writes it
    e = by_id[r.data.entity_ids[0]]
    views = r.entity_views([e, dataclasses.replace(e, images=()), dataclasses.replace(e, images=("nope.png",))],
                           ds.root)
    assert views["image_mask"].tolist() == [bool(e.images), False, False]
    assert not views["image"][1:].any()


def test_errors(demo, tmp_path, capsys):
    def dim_mel(*args):
        code = cli.main(["predict", *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err.splitlines()[0] + "\n"

    run = str(demo["run"])
    missing_run = tmp_path / "no_run"
    assert dim_mel("--run", str(missing_run), "--sentence", "s", "--mention", "m") == \
        (2, f"error: {missing_run}: run folder not found\n")
    missing_img = tmp_path / "nope.png"
    assert dim_mel("--run", run, "--sentence", "s", "--mention", "m", "--image", str(missing_img)) == \
        (2, f"error: {missing_img}: image not found\n")
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"not a png")
    code, err = dim_mel("--run", run, "--sentence", "s", "--mention", "m", "--image", str(bad_img))
    assert code == 2 and err.startswith(f"error: {bad_img}: cannot read the image (unreadable: ")
    not_run = tmp_path / "empty_dir"
    not_run.mkdir()
    assert dim_mel("--run", str(not_run), "--sentence", "s", "--mention", "m") == \
        (2, f"error: {not_run}: no config.json (not a complete run folder)\n")
    # the batch mode is dim-mel link's: one line saying so, before anything is loaded
    inp = tmp_path / "q.jsonl"
    inp.write_text('{"sentence": "s", "mention": "m"}\n')
    code, err = dim_mel("--run", run, "--input", str(inp))
    assert code == 2 and "use: dim-mel link --run" in err
    with pytest.raises(SystemExit):
        P.main(["--run", run, "--sentence", "s"])
