"""The linking API (nel_model.inference.linker) on a small trained demo run: the same ranks as the run's own
predictions, `dim-mel link` end to end with resume, bad lines, and re-rankers plugged in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_process.core.records import load_dataset
from fake_openai_server import Action, FakeOpenAIServer
from nel_model.inference import linker as LK
from nel_model.inference import predict as P
from nel_model.inference.predict import Predictor
from nel_model.linking import Query
from nel_model.runs import load_predictions
from test_predict import demo as predict_demo  # noqa: F401  (the module-scoped demo run fixture)

pytestmark = pytest.mark.slow     # trains the demo run of test_predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(predict_demo):
    """The predict tests' demo run (synthetic dataset with images, tiny CLIP features, trained) with a Linker."""
    return {**predict_demo, "linker": LK.Linker(predict_demo["predictor"])}


def _input_file(demo, folder: Path, n: int | None = None) -> tuple[Path, list]:
    """The demo's test mentions as a unified-format JSONL in ``folder``, their images copied beside it."""
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:n]
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for m in ments:
        rec = {"id": m.id, "sentence": m.sentence, "mention": m.mention, "gold_id": m.gold_id}
        if m.image:
            shutil.copy(ds.image_path(m.image), folder / "imgs" / Path(m.image).name)
            rec["image"] = f"imgs/{Path(m.image).name}"
        lines.append(json.dumps(rec))
    path = folder / "mentions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, ments


def test_the_api_ranks_like_the_runs_own_predictions(demo):
    ds = load_dataset(demo["data"])
    ments = ds.split("test")
    qs = [Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id) for m in ments]
    got = demo["linker"].link_many(qs, top_k=3)
    preds = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    assert [r["gold_rank"] for r in got] == [preds[m.id].full_kb.rank for m in ments]
    assert [r["entities"][0]["entity_id"] for r in got] == [preds[m.id].top[0][0] for m in ments]
    one = demo["linker"].link(ments[0].sentence, ments[0].mention, image=ds.image_path(ments[0].image), top_k=3)
    names = {e.id: e.name for e in ds.entities}
    assert [e["rank"] for e in one["entities"]] == [1, 2, 3] and {e["stage"] for e in one["entities"]} == {"retriever"}
    assert all(e["name"] == names[e["entity_id"]] for e in one["entities"])
    assert one["entities"][0]["score"] >= one["entities"][1]["score"] >= one["entities"][2]["score"]


class Reverse:
    """A re-ranker that reverses the first ``top_k`` candidates."""

    kind = "reverse"

    def __init__(self, top_k):
        self.top_k = top_k
        self.seen: list[LK.MentionLists] = []

    def score(self, lists):
        self.seen.append(lists)
        return torch.tensor([[float(j) for j in range(len(c))] for c in lists.candidates])

    def info(self):
        return {"kind": self.kind}



def test_a_reranker_reorders_the_first_k_and_says_which_stage_scored(demo):
    ds = load_dataset(demo["data"])
    m = ds.split("test")[0]
    plain = demo["linker"].link(m.sentence, m.mention, image=ds.image_path(m.image), top_k=6)["entities"]
    rr = Reverse(3)
    got = LK.Linker(demo["linker"].predictor, rr).link(m.sentence, m.mention, image=ds.image_path(m.image), top_k=6)
    ids = [e["entity_id"] for e in plain]
    assert [e["entity_id"] for e in got["entities"]] == ids[:3][::-1] + ids[3:]
    assert [e["stage"] for e in got["entities"]] == ["reranker"] * 3 + ["retriever"] * 3
    assert [e["score"] for e in got["entities"][:3]] == [2.0, 1.0, 0.0]
    assert [e["score"] for e in got["entities"][3:]] == [e["score"] for e in plain[3:]]
    seen = rr.seen[0]
    assert seen.mentions[0].sentence == m.sentence and [c.entity_id for c in seen.candidates[0]] == ids[:3]
    # the gold's rank: its place in the re-ranked head, else the retriever's full-KB rank
    for gold in ids[:4]:
        r = LK.Linker(demo["linker"].predictor, Reverse(3)).link(m.sentence, m.mention, image=ds.image_path(m.image),
                                                                 top_k=2, gold_id=gold)
        assert r["gold_rank"] == {ids[0]: 3, ids[1]: 2, ids[2]: 1}.get(gold, 4)


def test_dim_mel_link_streams_a_jsonl_and_a_rerun_skips_what_is_written(demo, tmp_path, monkeypatch):
    inp, ments = _input_file(demo, tmp_path / "in")
    out = tmp_path / "linked.jsonl"
    args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--top-k", "4", "--no-progress",
            "--batch-size", "4"]
    assert LK.main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [m.id for m in ments] and all(len(r["entities"]) == 4 for r in lines)
    preds = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    assert [r["gold_rank"] for r in lines] == [preds[m.id].full_kb.rank for m in ments]

    # a killed run: two whole lines and a torn third; the rerun links only the rest
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:25])
    asked: list[str] = []
    real = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, qs, k=10: (asked.extend(q.id for q in qs), real(self, qs, k))[1])
    assert LK.main(args) == 0
    assert asked == [m.id for m in ments[2:]]
    again = [json.loads(x) for x in out.read_text().splitlines()]
    def ranked(recs):   # scores may differ in the last bits with another batch composition: compare the rankings
        return [(r["id"], [e["entity_id"] for e in r["entities"]], r["gold_rank"]) for r in recs]
    assert [r["id"] for r in again] == [m.id for m in ments] and ranked(again) == ranked(lines)
    assert (tmp_path / "linked.jsonl.corrupt").read_text().startswith(text[2][:25])
    asked.clear()
    assert LK.main(args) == 0 and asked == []


@pytest.mark.parametrize("line, where, field", [
    ('{"id": "x", "sentence": "s"}', "line 2 (id 'x')", "mention"),
    ('{"id": "x", "sentence": "s", "mention": "m", "image": "../outside.png"}', "line 2 (id 'x')", "image"),
    ('{"id": "x", "sentence": "s", "mention": "m", "image": "imgs/missing.png"}', "line 2 (id 'x')", "image"),
    ('{"id": "x", "sentence": "s", "mention": "m", "colour": 1}', "line 2 (id 'x')", "colour"),
    ('{"id": "x", "sentence": "s", "mention": "m"', "line 2", None),
])
def test_a_bad_input_line_is_an_error_naming_file_line_and_field(demo, tmp_path, line, where, field):
    (tmp_path / "outside.png").write_bytes(b"x")
    inp = tmp_path / "in" / "mentions.jsonl"
    inp.parent.mkdir()
    inp.write_text('{"id": "ok", "sentence": "A b.", "mention": "b"}\n' + line + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dim_mel", "link", "--run", str(demo["run"]), "--input", str(inp),
                           "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert err.startswith(f"error: {inp}, {where}") and (field is None or f"field '{field}'" in err), err
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_rerank_run_folders_load_through_the_registry(demo, tmp_path):
    feat = tmp_path / "feature_run"
    feat.mkdir()
    (feat / "results.json").write_text(json.dumps({"two_stage": {"reranker": {"kind": "feature"}}}))
    if "nel_model.rerank.feature" in LK.RERANKERS.values():
        try:
            import nel_model.rerank.feature  # noqa: F401
        except ModuleNotFoundError:
            with pytest.raises(LK.LinkError, match="needs nel_model.rerank.feature, which this installation"):
                LK.load_reranker(feat)
    (feat / "results.json").write_text(json.dumps({"label": "x"}))
    with pytest.raises(LK.LinkError, match="not a re-ranker run"):
        LK.load_reranker(feat)
    with pytest.raises(LK.LinkError, match="not found"):
        LK.load_reranker(tmp_path / "nowhere")


def test_dim_mel_link_with_the_llm_reranker(demo, tmp_path):
    inp, ments = _input_file(demo, tmp_path / "in", n=3)
    out = tmp_path / "linked.jsonl"
    with FakeOpenAIServer(responder=lambda body, i: Action.logprobs("2", {"2": -0.1, "1": -2.0})) as srv:
        args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--top-k", "5", "--no-progress",
                "--llm", "fake-model", "--base-url", srv.base_url, "--api-key", "sk", "--llm-top-k", "3"]
        assert LK.main(args) == 0
        assert len(srv.snapshot()) == 3 and "3. " in srv.snapshot()[0].user_content
        plain = LK.Linker(demo["linker"].predictor).link_many(
            [Query(m.sentence, m.mention, image=inp.parent / "imgs" / Path(m.image).name if m.image else None)
             for m in ments], 5)
        got = [json.loads(x) for x in out.read_text().splitlines()]
        for g, p in zip(got, plain):
            ids = [e["entity_id"] for e in p["entities"]]
            assert [e["entity_id"] for e in g["entities"]] == [ids[1], ids[0], ids[2], ids[3], ids[4]]
            assert [e["stage"] for e in g["entities"]] == ["reranker"] * 3 + ["retriever"] * 2
        assert (tmp_path / "linked.jsonl.llm_cache.jsonl").exists()
        out.unlink()
        assert LK.main(args) == 0 and len(srv.snapshot()) == 3      # the answers come from the cache


def test_the_feature_reranker_links_new_mentions_as_its_run_ranked_them(demo, tmp_path):
    """`--rerank RUN` with a trained feature re-ranker: mentions given as raw text and images, encoded by the
    retriever's encoders, come out in the order the re-ranker run's own predictions give them."""
    from nel_model.inference.retrieve import retrieve
    from nel_model.rerank.train_feature import main as rerank_main

    retriever = tmp_path / "retriever"
    shutil.copytree(demo["run"], retriever)
    retrieve(retriever, ("train", "dev", "test"), 5)
    out = tmp_path / "rr"
    assert rerank_main(["--retriever", str(retriever), "--output-dir", str(out), "--epochs", "3", "--top-k", "5",
                        "--batch-size", "32", "--warmup-steps", "2", "--patience", "0", "--threads", "1",
                        "--device", "cpu"]) == 0
    reranker = LK.load_reranker(out)
    assert reranker.kind == "feature" and reranker.top_k == 5
    linker = LK.Linker(P.Predictor(retriever), reranker)
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:12]
    got = linker.link_many([Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id)
                            for m in ments], top_k=5)
    written = {p.mention_id: p for p in load_predictions(out, "test").mentions}
    assert [[e["entity_id"] for e in r["entities"]] for r in got] == \
        [[eid for eid, _ in written[m.id].top[:5]] for m in ments]
    assert all(e["stage"] == "reranker" for r in got for e in r["entities"])
