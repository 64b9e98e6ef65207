"""The linking API (nel_model.inference.linker) on a small trained demo run: the same ranks as the run's own
predictions, `dim-mel link` end to end with resume, bad lines, one writer, and re-rankers plugged in (each
checkpoint loaded once, the KB encoded at most once, a re-ranker only over the retriever it was trained on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_process.core.locks import OutputLocked, output_lock
from data_process.core.records import DataError, load_dataset
from data_process.encode.encoders import TextEncoder
from fake_openai_server import Action, FakeOpenAIServer
from nel_model.inference import linker as LK
from nel_model.linking import LinkError, Query
from nel_model.nel import DIM
from nel_model.rerank import registry
from nel_model.runs import ENTITY_EMBEDDINGS_META, RunError, load_predictions
from test_predict import demo as predict_demo  # noqa: F401  (the module-scoped demo run fixture)

pytestmark = pytest.mark.slow     # trains the demo run of test_predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(predict_demo):
    """The predict tests' demo run (synthetic dataset with images, tiny CLIP features, trained) with a Linker."""
    return {**predict_demo, "linker": LK.Linker(predict_demo["retriever"])}


@pytest.fixture(scope="module")
def feature_rr(demo, tmp_path_factory):
    """A copy of the demo run as a retriever (its lists retrieved) and a feature re-ranker trained on it."""
    from nel_model.inference.retrieve import retrieve
    from nel_model.rerank.train_feature import main as rerank_main

    d = tmp_path_factory.mktemp("feature_rr")
    retriever = d / "retriever"
    shutil.copytree(demo["run"], retriever)
    retrieve(retriever, ("train", "dev", "test"), 5)
    out = d / "rr"
    assert rerank_main(["--retriever", str(retriever), "--output-dir", str(out), "--epochs", "3", "--top-k", "5",
                        "--batch-size", "32", "--warmup-steps", "2", "--patience", "0", "--threads", "1",
                        "--device", "cpu"]) == 0
    return retriever, out


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


def _dim_mel(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dim_mel", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return next(x for x in proc.stderr.splitlines() if x.startswith("error: "))


def _ranked(lines: list[dict]) -> list:
    return [(r["id"], [e["entity_id"] for e in r["entities"]], r.get("gold_rank")) for r in lines]


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_api_ranks_like_the_runs_own_predictions(demo):
    ds = load_dataset(demo["data"])
    ments = ds.split("test")
    qs = [Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id) for m in ments]
    got = demo["linker"].link_many(qs, top_k=3)
    preds = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    assert [r.gold_rank for r in got] == [preds[m.id].full_kb.rank for m in ments]
    assert [r.entities[0].entity_id for r in got] == [preds[m.id].top[0][0] for m in ments]
    one = demo["linker"].link(ments[0].sentence, ments[0].mention, image=ds.image_path(ments[0].image), top_k=3)
    names = {e.id: e.name for e in ds.entities}
    assert [e.rank for e in one.entities] == [1, 2, 3] and {e.stage for e in one.entities} == {"retriever"}
    assert all(e.name == names[e.entity_id] for e in one.entities)
    assert one.entities[0].score >= one.entities[1].score >= one.entities[2].score
    assert "gold_rank" not in one.as_dict()


class Reverse:
    """A re-ranker that reverses the first ``top_k`` candidates."""

    kind = "reverse"

    def __init__(self, top_k):
        self.top_k = top_k
        self.seen: list = []

    def score(self, lists):
        self.seen.append(lists)
        return torch.tensor([[float(j) for j in range(len(c))] for c in lists.candidates])

    def info(self):
        return {"kind": self.kind}


def test_a_reranker_reorders_the_first_k_and_says_which_stage_scored(demo):
    ds = load_dataset(demo["data"])
    m = ds.split("test")[0]
    plain = demo["linker"].link(m.sentence, m.mention, image=ds.image_path(m.image), top_k=6).entities
    rr = Reverse(3)
    got = LK.Linker(demo["retriever"], rr).link(m.sentence, m.mention, image=ds.image_path(m.image), top_k=6)
    ids = [e.entity_id for e in plain]
    assert [e.entity_id for e in got.entities] == ids[:3][::-1] + ids[3:]
    assert [e.stage for e in got.entities] == ["reranker"] * 3 + ["retriever"] * 3
    assert [e.score for e in got.entities[:3]] == [2.0, 1.0, 0.0]
    assert [e.score for e in got.entities[3:]] == [e.score for e in plain[3:]]
    seen = rr.seen[0]
    assert seen.mentions[0].sentence == m.sentence and [c.entity_id for c in seen.candidates[0]] == ids[:3]
    # the re-ranker is given the mention's views and retriever embedding, already encoded
    assert seen.views["mention"].shape[0] == 1 and seen.embeddings.shape == (1, demo["retriever"].entity_emb.shape[1])
    # the gold's rank: its place in the re-ranked head, else the retriever's full-KB rank
    for gold in ids[:4]:
        r = LK.Linker(demo["retriever"], Reverse(3)).link(m.sentence, m.mention, image=ds.image_path(m.image),
                                                          top_k=2, gold_id=gold)
        assert r.gold_rank == {ids[0]: 3, ids[1]: 2, ids[2]: 1}.get(gold, 4)


def test_dim_mel_link_streams_a_jsonl_and_a_rerun_skips_what_is_written(demo, tmp_path, monkeypatch):
    inp, ments = _input_file(demo, tmp_path / "in")
    out = tmp_path / "linked.jsonl"
    args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--top-k", "4", "--no-progress",
            "--batch-size", "4"]
    assert LK.main(args) == 0
    lines = _read(out)
    assert [r["id"] for r in lines] == [m.id for m in ments] and all(len(r["entities"]) == 4 for r in lines)
    preds = {p.mention_id: p for p in load_predictions(demo["run"], "test").mentions}
    assert [r["gold_rank"] for r in lines] == [preds[m.id].full_kb.rank for m in ments]
    assert set(lines[0]["provenance"]) == {"input_sha256", "retriever_checkpoint_sha256", "kb", "reranker", "top_k"}

    # a killed run: two whole lines and a torn third; the rerun links only the rest
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:25])
    asked: list[str] = []
    real = LK.Linker.retrieve_many
    monkeypatch.setattr(LK.Linker, "retrieve_many",
                        lambda self, qs, k: (asked.extend(q.id for q in qs), real(self, qs, k))[1])
    assert LK.main(args) == 0
    assert asked == [m.id for m in ments[2:]]
    again = _read(out)
    assert [r["id"] for r in again] == [m.id for m in ments] and _ranked(again) == _ranked(lines)
    assert (tmp_path / "linked.jsonl.corrupt").read_text().startswith(text[2][:25])
    asked.clear()
    assert LK.main(args) == 0 and asked == []


def _scores(lines: list[dict]) -> torch.Tensor:
    return torch.tensor([[e["score"] for e in r["entities"]] for r in lines])


def _shape_dependent(monkeypatch) -> None:
    """Make the encoders' and the model's numbers depend on the shapes they run on, as BLAS kernels do (in the
    last bits, by shape; here by 1e-3, so a batch-dependent result shows): the text encoder's pooled features by
    the padded token length and the batch's rows; the model's embeddings by the batch's rows and by each row's
    place in the batch, as CPU ``scaled_dot_product_attention`` with a query of length 1 (the model's attention
    over the sentence) does with more than one thread (docs/RERANK.md)."""
    real_forward, real_encode = TextEncoder._forward, DIM.encode_mentions

    def forward(self, texts, limit, pad_to=None):
        tokens, pooled, att = real_forward(self, texts, limit, pad_to)
        return tokens, pooled + 1e-3 * (tokens.shape[0] + tokens.shape[1]), att

    monkeypatch.setattr(TextEncoder, "_forward", forward)
    def encode(self, views, normalize=True):
        rows = views["mention"].shape[0]
        return real_encode(self, views, normalize) + 1e-3 * (rows + torch.arange(rows, dtype=torch.float32)[:, None])

    monkeypatch.setattr(DIM, "encode_mentions", encode)


def test_a_resumed_link_matches_an_uninterrupted_one_whatever_the_batches(demo, tmp_path, monkeypatch):
    """Issue 26 item 7: a mention relinked after a torn tail sits in another batch; its numbers must not move.
    The kernels' arithmetic is made to depend on the shapes they run on (:func:`_shape_dependent`): a mention
    encoded in a batch shaped by the others would shift; mentions are encoded in fixed shapes."""
    _shape_dependent(monkeypatch)
    inp, ments = _input_file(demo, tmp_path / "in", n=10)
    clean, resumed = tmp_path / "clean.jsonl", tmp_path / "resumed.jsonl"
    flags = ["--run", str(demo["run"]), "--input", str(inp), "--top-k", "5", "--no-progress", "--batch-size", "4"]
    assert LK.main([*flags, "--out", str(clean)]) == 0
    text = clean.read_text().splitlines(keepends=True)
    resumed.write_text("".join(text[:3]) + text[3][:40])              # killed inside the 4th line
    assert LK.main([*flags, "--out", str(resumed)]) == 0
    a, b = _read(clean), _read(resumed)
    assert [[e["entity_id"] for e in r["entities"]] for r in a] == [[e["entity_id"] for e in r["entities"]] for r in b]
    assert torch.allclose(_scores(a), _scores(b), atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape_dependent", [False, True])
def test_a_mentions_entities_do_not_depend_on_the_mentions_linked_beside_it(demo, monkeypatch, shape_dependent):
    """Mentions are linked together (batched encoders) yet each gets the entities and scores it gets alone, in
    any order, beside any others, in batches larger than one encoder pass: with the real kernels, and with
    kernels whose numbers depend on the shapes they run on."""
    if shape_dependent:
        _shape_dependent(monkeypatch)
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:37]
    qs = [Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id,
                caption="a photo" if i % 3 == 0 else None) for i, m in enumerate(ments)]
    linker = demo["linker"]
    together = {r.id: r for r in linker.link_many(qs, top_k=5)}
    alone = [linker.link_many([q], top_k=5)[0] for q in qs[:6]]
    shuffled = linker.link_many(qs[::-1][:23], top_k=5)
    for got in (alone, shuffled):
        ref = [together[r.id] for r in got]
        assert [[e.entity_id for e in r.entities] for r in got] == [[e.entity_id for e in r.entities] for r in ref]
        assert [r.gold_rank for r in got] == [r.gold_rank for r in ref]
        assert torch.allclose(torch.tensor([[e.score for e in r.entities] for r in got]),
                              torch.tensor([[e.score for e in r.entities] for r in ref]), atol=2e-6, rtol=0)


def test_a_rerun_refuses_lines_computed_from_anything_else(demo, tmp_path):
    """Issue 26 item 8: a line is kept only when it was linked from the same input line, run, re-ranker and K."""
    inp, ments = _input_file(demo, tmp_path / "in", n=4)
    out = tmp_path / "linked.jsonl"
    args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--top-k", "3", "--no-progress"]
    assert LK.main(args) == 0
    before = out.read_bytes()
    recs = [json.loads(x) for x in inp.read_text().splitlines()]
    recs[1]["sentence"] += " Changed."
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=rf"line 2 \(id '{ments[1].id}'\), field 'provenance': linked from another "
                                        "input_sha256"):
        LK.main(args)
    with pytest.raises(DataError, match="field 'provenance': linked from another top_k"):
        LK.main([*args[:-3], "--top-k", "4", "--no-progress"])
    assert out.read_bytes() == before                                 # nothing appended, nothing lost
    # a mention not in the input is not "done": the output holds another input's links
    inp.write_text("".join(json.dumps(r) for r in recs[2:3]) + "\n")
    with pytest.raises(DataError, match=rf"line 1 \(id '{ments[0].id}'\), field 'id': not a mention of this input"):
        LK.main(args)
    # the same input, run and flags: every line kept
    _input_file(demo, tmp_path / "in", n=4)
    assert LK.main(args) == 0 and out.read_bytes() == before


def test_two_link_processes_on_one_out_the_second_is_refused(demo, tmp_path):
    """Issue 26 item 3: one writer per output; the second process gets a clear error, the first loses nothing."""
    inp, _ = _input_file(demo, tmp_path / "in", n=2)
    out = tmp_path / "linked.jsonl"
    args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--no-progress"]
    with output_lock(out):                                            # another process writing it
        with pytest.raises(OutputLocked, match=f"{out}: another process is writing it"):
            LK.main(args)
    assert not out.exists()
    assert LK.main(args) == 0 and len(out.read_text().splitlines()) == 2


def test_link_to_a_fifo_is_an_error_not_a_hang(demo, tmp_path):
    """Issue 26 item 6: every output path gets the regular-file check inputs get."""
    inp, _ = _input_file(demo, tmp_path / "in", n=1)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    err = _one_error_line(_dim_mel("link", "--run", str(demo["run"]), "--input", str(inp), "--out", str(fifo),
                                   timeout=120))
    assert err == f"error: {fifo}: not a regular file: a FIFO (an output must be a file path)"


def test_link_reads_the_toolkits_own_captioned_dataset(demo, tmp_path):
    """Issue 26 item 9: a dataset whose ``images`` is a folder link the toolkit placed (``caption``, ``enrich``)
    is read by ``link`` as ``features`` and ``caption`` read it."""
    ds = load_dataset(demo["data"])
    ments = [m for m in ds.split("test") if m.image][:3]
    cap = tmp_path / "data_cap"
    cap.mkdir()
    (cap / "images").symlink_to(Path(demo["data"]).resolve() / Path(ments[0].image).parts[0])
    rel = [str(Path("images", *Path(m.image).parts[1:])) for m in ments]
    (cap / "mentions.jsonl").write_text("".join(json.dumps({"id": m.id, "sentence": m.sentence, "mention": m.mention,
                                                            "image": r}) + "\n" for m, r in zip(ments, rel)))
    out = tmp_path / "linked.jsonl"
    assert LK.main(["--run", str(demo["run"]), "--input", str(cap / "mentions.jsonl"), "--out", str(out),
                    "--no-progress"]) == 0
    assert [r["id"] for r in _read(out)] == [m.id for m in ments]


def _bad_line_error(demo, tmp_path, line: str) -> tuple[Path, str]:
    """The error line of `dim-mel link` on an input whose second line is ``line`` (nothing written)."""
    (tmp_path / "outside.png").write_bytes(b"x")
    inp = tmp_path / "in" / "mentions.jsonl"
    (inp.parent / "imgs").mkdir(parents=True)
    (inp.parent / "imgs" / "notes.png").write_text("not an image at all\n")        # passes a whole-file check
    inp.write_text('{"id": "ok", "sentence": "A b.", "mention": "b"}\n' + line + "\n" +
                   '{"id": "z", "sentence": "A z.", "mention": "z"}\n')
    err = _one_error_line(_dim_mel("link", "--run", str(demo["run"]), "--input", str(inp), "--out",
                                   str(tmp_path / "o.jsonl"), "--max-line-bytes", "1000"))
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""
    return inp, err


@pytest.mark.parametrize("line, where, field", [
    ('{"id": "x", "sentence": "s"}', "line 2 (id 'x')", "mention"),
    ('{"id": "x", "sentence": "s", "mention": "m", "image": "../outside.png"}', "line 2 (id 'x')", "image"),
    ('{"id": "x", "sentence": "s", "mention": "m", "image": "imgs/missing.png"}', "line 2 (id 'x')", "image"),
    ('{"id": "x", "sentence": "s", "mention": "m", "colour": 1}', "line 2 (id 'x')", "colour"),
    ('{"id": "x", "sentence": "s", "mention": "m"', "line 2", None),
])
def test_a_bad_input_line_is_an_error_naming_file_line_and_field(demo, tmp_path, line, where, field):
    inp, err = _bad_line_error(demo, tmp_path, line)
    assert err.startswith(f"error: {inp}, {where}") and (field is None or f"field '{field}'" in err), err


def test_a_file_that_is_no_image_is_refused_when_its_line_is_read(demo, tmp_path):
    """Issue 26 item 13: checked with its line (file, line, id, field), not found mid-way naming only the image."""
    inp, err = _bad_line_error(demo, tmp_path,
                               '{"id": "x", "sentence": "s", "mention": "m", "image": "imgs/notes.png"}')
    assert err.startswith(f"error: {inp}, line 2 (id 'x'), field 'image': imgs/notes.png: cannot read the image"), err


def test_a_line_over_the_limit_is_refused_saying_so(demo, tmp_path):
    """Issue 26 item 14, with the flag."""
    inp, err = _bad_line_error(demo, tmp_path, '{"id": "x", "sentence": "' + "long " * 300 + '", "mention": "m"}')
    assert err.startswith(f"error: {inp}, line 2: longer than 1000 bytes") and "--max-line-bytes" in err, err


def test_a_huge_input_line_is_refused_under_the_default_limit(demo, tmp_path):
    """Issue 26 item 14: a 2 MB line is refused (the default limit, 1 MiB) without holding it whole."""
    inp = tmp_path / "mentions.jsonl"
    inp.write_text('{"id": "x", "sentence": "' + "w " * (1 << 20) + '", "mention": "w"}\n')
    with pytest.raises(DataError, match=rf"{inp}, line 1: longer than {LK.MAX_LINE_BYTES} bytes"):
        LK.main(["--run", str(demo["run"]), "--input", str(inp), "--out", str(tmp_path / "o.jsonl")])


def test_rerank_run_folders_load_through_the_registry(demo, tmp_path):
    assert set(registry.LOADERS) == {"feature", "llm", "pairwise"}
    feat = tmp_path / "feature_run"
    feat.mkdir()
    (feat / "results.json").write_text(json.dumps({"two_stage": {"reranker": {"kind": "unknown"}}}))
    with pytest.raises(LinkError, match="re-ranker kind 'unknown' unknown"):
        registry.load_reranker(feat, demo["retriever"])
    (feat / "results.json").write_text(json.dumps({"label": "x"}))
    with pytest.raises(LinkError, match="not a re-ranker run"):
        registry.load_reranker(feat, demo["retriever"])
    with pytest.raises(LinkError, match="not found"):
        registry.load_reranker(tmp_path / "nowhere", demo["retriever"])


def test_dim_mel_link_with_the_llm_reranker(demo, tmp_path):
    inp, ments = _input_file(demo, tmp_path / "in", n=3)
    out = tmp_path / "linked.jsonl"
    with FakeOpenAIServer(responder=lambda body, i: Action.logprobs("2", {"2": -0.1, "1": -2.0})) as srv:
        args = ["--run", str(demo["run"]), "--input", str(inp), "--out", str(out), "--top-k", "5", "--no-progress",
                "--llm", "fake-model", "--base-url", srv.base_url, "--api-key", "sk", "--llm-top-k", "3"]
        assert LK.main(args) == 0
        assert len(srv.snapshot()) == 3 and "3. " in srv.snapshot()[0].user_content
        plain = demo["linker"].link_many(
            [Query(m.sentence, m.mention, image=inp.parent / "imgs" / Path(m.image).name if m.image else None)
             for m in ments], 5)
        got = _read(out)
        for g, p in zip(got, plain):
            ids = [e.entity_id for e in p.entities]
            assert [e["entity_id"] for e in g["entities"]] == [ids[1], ids[0], ids[2], ids[3], ids[4]]
            assert [e["stage"] for e in g["entities"]] == ["reranker"] * 3 + ["retriever"] * 2
        assert (tmp_path / "linked.jsonl.llm_cache.jsonl").exists()
        out.unlink()
        assert LK.main(args) == 0 and len(srv.snapshot()) == 3      # the answers come from the cache


def test_the_feature_reranker_links_new_mentions_as_its_run_ranked_them(demo, feature_rr):
    """`--rerank RUN` with a trained feature re-ranker: mentions given as raw text and images, encoded by the
    retriever's encoders, come out in the order the re-ranker run's own predictions give them."""
    retriever, out = feature_rr
    linker = LK.Linker.from_run(retriever, out)
    assert linker.reranker.kind == "feature" and linker.reranker.top_k == 5
    assert linker.reranker.retriever is linker.retriever                 # given the loaded retriever, not its own
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:12]
    got = linker.link_many([Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id)
                            for m in ments], top_k=5)
    written = {p.mention_id: p for p in load_predictions(out, "test").mentions}
    assert [[e.entity_id for e in r.entities] for r in got] == \
        [[eid for eid, _ in written[m.id].top[:5]] for m in ments]
    assert all(e.stage == "reranker" for r in got for e in r.entities)


def test_one_link_with_a_reranker_loads_each_checkpoint_once_and_encodes_the_kb_at_most_once(demo, feature_rr,
                                                                                            tmp_path, monkeypatch):
    """Issue 25: `dim-mel link --rerank` used to load checkpoints 4 times and encode the KB 3 times."""
    retriever, rr = feature_rr
    loads: Counter = Counter()
    rows: list[int] = []
    real_load, real_encode = torch.load, DIM.encode_entities

    def counting_load(f, *a, **kw):
        if isinstance(f, (str, Path)) and str(f).endswith(".pt"):
            loads[Path(f).resolve()] += 1
        return real_load(f, *a, **kw)

    def counting_encode(self, views, normalize=True):
        rows.append(len(next(iter(views.values()))))
        return real_encode(self, views, normalize)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(DIM, "encode_entities", counting_encode)
    inp, _ = _input_file(demo, tmp_path / "in", n=20)
    kb = len(demo["retriever"].data.entity_ids)

    def link(out: str) -> None:
        loads.clear(), rows.clear()
        assert LK.main(["--run", str(retriever), "--rerank", str(rr), "--input", str(inp), "--out",
                        str(tmp_path / out), "--top-k", "3", "--no-progress"]) == 0
        assert set(loads) == {(retriever / "checkpoints" / "best.pt").resolve(),
                              (rr / "checkpoints" / "best.pt").resolve()} and max(loads.values()) == 1, loads

    (retriever / ENTITY_EMBEDDINGS_META).unlink()        # no saved KB embeddings: encoded once, then saved
    link("a.jsonl")
    assert sum(rows) == kb
    link("b.jsonl")                                     # the saved ones match the checkpoint: no KB encoding
    assert sum(rows) == 0
    assert _ranked(_read(tmp_path / "a.jsonl")) == _ranked(_read(tmp_path / "b.jsonl"))


def test_a_reranker_trained_on_another_retriever_is_refused(demo, feature_rr, tmp_path):
    retriever, rr = feature_rr
    # the same run at another checkpoint: another retriever
    with pytest.raises(RunError, match="the re-ranker was trained on the retriever .* not on .*last checkpoint"):
        LK.Linker.from_run(retriever, rr, checkpoint="last")
    err = _one_error_line(_dim_mel("predict", "--run", str(retriever), "--checkpoint", "last", "--rerank", str(rr),
                                   "--sentence", "s", "--mention", "m"))
    assert "the re-ranker was trained on the retriever" in err
    # an older re-ranker run without the checkpoint's hash: the run folder must be the one it names
    old = tmp_path / "old_rr"
    shutil.copytree(rr, old)
    res = json.loads((old / "results.json").read_text())
    del res["two_stage"]["retriever"]["checkpoint_sha256"]
    (old / "results.json").write_text(json.dumps(res))
    assert LK.Linker.from_run(retriever, old).reranker.kind == "feature"
    with pytest.raises(RunError, match="the re-ranker was trained on the retriever"):
        LK.Linker.from_run(demo["run"], old)
