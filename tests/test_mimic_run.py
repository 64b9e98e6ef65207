"""A MIMIC run linking new mentions, alone and as the pairwise re-ranker of a two-stage linker: test_predict's demo
(synthetic dataset, tiny CLIP features, a DIM run) -> a feature cache of the views MIMIC reads (dim-mel features
--config configs/mimic.yaml) -> a MIMIC run -> retrieve with the DIM run -> rerank-pairwise -> link / predict. The mentions given as raw text and images rank as the
runs' own predictions rank them (about a minute on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.core.records import load_dataset
from nel_model.evaluation.evaluate import open_run
from nel_model.inference import linker as LK
from nel_model.inference import predict as P
from nel_model.inference.linker import Linker
from nel_model.linking import Query
from nel_model.runs import load_predictions
from nel_model.train import main as train_main
from test_predict import demo as predict_demo  # noqa: F401  (the module-scoped demo run fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(predict_demo, tmp_path_factory):
    """test_predict's demo (a synthetic dataset, a tiny CLIP, its feature cache and a trained DIM run, the
    retriever here), a feature cache of the views configs/mimic.yaml lists, a MIMIC run on it, and the DIM run's
    lists re-ranked by the MIMIC run."""
    from data_process.encode import features
    from nel_model.inference.retrieve import retrieve
    from nel_model.rerank.pairwise import rerank_pairwise

    w = tmp_path_factory.mktemp("mimic_demo")
    data, dim = predict_demo["data"], predict_demo["run"]
    assert features.main(["--data", str(data), "--out", str(w / "feat"), "--clip", str(predict_demo["root"] / "clip"),
                          "--max-len", "16", "--desc-max-len", "16", "--region-grid", "2", "--num-workers", "0",
                          "--device", "cpu", "--config", str(ROOT / "configs" / "mimic.yaml")]) == 0
    train_main(["--config", str(ROOT / "configs" / "mimic.yaml"), "--features", str(w / "feat"), "--output-dir",
                str(w / "mimic"), "--epochs", "4", "--lr", "3e-3", "--hidden", "32", "--dv", "32", "--text-len", "16",
                "--batch-size", "32", "--dev-protocol", "candidates", "--select-by", "candidates:mrr", "--threads",
                "1", "--device", "cpu", "--seed", "1"])
    retrieve(dim, ("dev", "test"), 5, device="cpu")
    rerank_pairwise(dim, w / "mimic", w / "two")
    return {"data": Path(data), "dim": dim, "mimic": w / "mimic", "two": w / "two"}


def _queries(ds, mentions) -> list[Query]:
    return [Query(sentence=m.sentence, mention=m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id)
            for m in mentions]


def test_a_mimic_run_links_new_mentions_as_its_predictions_rank_them(demo):
    """The linker over a pairwise run: each mention encoded from its raw text and image alone, scored against the
    run's encoded KB side: the gold's whole-KB rank and the top 5 of the run's predictions."""
    ds = load_dataset(demo["data"])
    written = {p.mention_id: p for p in load_predictions(demo["mimic"], "test").mentions}
    sample = ds.split("test")[:20]
    linker = Linker(open_run(demo["mimic"], "cpu"))
    results = linker.link_many(_queries(ds, sample), top_k=5)
    assert [r.gold_rank for r in results] == [written[m.id].full_kb.rank for m in sample]
    assert [[e.entity_id for e in r.entities] for r in results] == \
        [[eid for eid, _ in written[m.id].top[:5]] for m in sample]
    assert [r.entities[0].score for r in results] == pytest.approx([written[m.id].top[0][1] for m in sample],
                                                                   abs=1e-3)


def test_dim_mel_link_and_predict_with_a_pairwise_reranker(demo, tmp_path, capsys):
    """`dim-mel link --run DIM --rerank TWO` (a rerank-pairwise run): the first 5 entities in the order of the
    two-stage run's predictions, scored by the re-ranker; `predict` with the MIMIC run alone."""
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:10]
    linker = Linker.from_run(demo["dim"], demo["two"])
    assert linker.reranker.kind == "pairwise" and linker.reranker.top_k == 5 and linker.reranker.shared_views
    got = linker.link_many(_queries(ds, ments), top_k=5)
    written = {p.mention_id: p for p in load_predictions(demo["two"], "test").mentions}
    assert [[e.entity_id for e in r.entities] for r in got] == [[e for e, _ in written[m.id].top[:5]] for m in ments]
    assert all(e.stage == "reranker" for r in got for e in r.entities)
    # the re-ranker encoding the mentions with its own run's encoders gives the same order
    linker.reranker.shared_views = False
    again = linker.link_many(_queries(ds, ments), top_k=5)
    assert [[e.entity_id for e in r.entities] for r in again] == [[e.entity_id for e in r.entities] for r in got]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": m.id, "sentence": m.sentence, "mention": m.mention}) + "\n"
                           for m in ments))
    assert LK.main(["--run", str(demo["dim"]), "--rerank", str(demo["two"]), "--input", str(inp), "--out",
                    str(tmp_path / "out.jsonl"), "--top-k", "3", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(e["stage"] == "reranker" for x in lines for e in x["entities"])
    m = next(x for x in ments if x.image)
    capsys.readouterr()
    assert P.main(["--run", str(demo["mimic"]), "--sentence", m.sentence, "--mention", m.mention, "--image",
                   str(ds.image_path(m.image)), "--top-k", "3", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    own = {p.mention_id: p for p in load_predictions(demo["mimic"], "test").mentions}
    assert [e["entity_id"] for e in alone["entities"]] == [e for e, _ in own[m.id].top[:3]]
