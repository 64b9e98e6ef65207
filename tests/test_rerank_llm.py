"""The LLM / VLM re-ranker (nel_model.rerank.llm) against the fake OpenAI server, one SIGKILL test, and one run with
the real SmolLM2-135M behind llama.cpp's server (``-m llm``)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from data_process.core.durable_io import JsonlCache
from data_process.core.entry import run_main
from dim_mel import cli
from fake_openai_server import Action, FakeOpenAIServer, image_parts
from llm_fixtures import full_disk_from, race_two_writers
from nel_model.linking import Candidate, MentionLists, Query
from nel_model.inference.retrieve import retrieve
from nel_model.rerank import llm as L
from nel_model.runs import load_predictions, load_run
from procs import sigkill
from run_fixtures import trained_run

ROOT = Path(__file__).resolve().parent.parent
K = 8


@pytest.fixture(scope="module")
def retriever_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("rerank_llm")
    trained_run(d, entities=40, splits=(16, 12, 24), seed=3, epochs=1)
    retrieve(d / "run", ("dev", "test"), K)
    gold = {m["sentence"]: f"entity {m['gold_id'][1:]}"
            for m in map(json.loads, (d / "ds" / "mentions.jsonl").read_text().splitlines())}
    return {"run": d / "run", "gold_name": gold}


def _candidates(text: str) -> dict[str, int]:
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^(\d+)\. (.+?): ", text, re.MULTILINE)}


def oracle(gold_name: dict[str, str], logprobs: bool = True):
    """A responder naming the gold entity's number when it is listed, else a malformed answer."""
    def respond(body, index):
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        user = user if isinstance(user, str) else user[0]["text"]
        sentence = re.search(r"^Sentence: (.*)$", user, re.MULTILINE).group(1)
        n = _candidates(user).get(gold_name[sentence])
        if n is None:
            return Action.content("I am not sure.")
        return Action.logprobs(str(n), {str(n): -0.05, "1" if n != 1 else "2": -3.2}) if logprobs \
            else Action.content(f"{n}")
    return respond


def _args(run, out, srv, *extra):
    return ["--retriever", str(run), "--out", str(out), "--model", "fake-model", "--base-url", srv.base_url,
            "--api-key", "sk-test", "--no-progress", "--backoff-base-s", "0.01", "--backoff-max-s", "0.02",
            "--timeout-s", "5", "--max-retries", "1", "--device", "cpu", *extra]


def test_answers_become_scores_logprobs_first_then_the_text():
    assert L.scores_from_logprobs([["2", -0.1], [" 1", -2.3], ["x", -0.01], ["9", -0.5]], 3)[:2] == [-2.3, -0.1]
    s = L.scores_from_logprobs([["2", -0.1]], 3)
    assert s[1] > s[0] > s[2]                                   # missing numbers: below, in the retriever's order
    assert L.scores_from_logprobs([["The", -0.1]], 3) is None and L.scores_from_logprobs(None, 3) is None
    assert L.scores_from_text("3", 4) == [4.0, 3.0, 8.0, 1.0]   # the chosen one first, the rest as retrieved
    order = L.scores_from_text("2, 4, 1", 4)
    assert sorted(range(4), key=lambda j: -order[j]) == [1, 3, 0, 2]
    for bad in ("", "none of them", "Candidate 7", "0"):
        assert L.scores_from_text(bad, 5) is None
    assert L.verdict({"raw": "2", "top_logprobs": [["5", -0.2]]}, 3) == {
        "status": "ok", "scoring": "text", "scores": L.scores_from_text("2", 3)}   # 5 is out of range: the text


def test_logprob_reranking_of_the_lists_is_evaluated_as_a_two_stage_run(retriever_run, tmp_path, capsys):
    run, out = retriever_run["run"], tmp_path / "llm"
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"])) as srv:
        assert L.main(_args(run, out, srv, "--split", "all", "--top-k", "5")) == 0
        asked = srv.snapshot()
    assert len(asked) == 12 + 24
    body = asked[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 4
    assert "response_format" not in body and "5. " in body["messages"][-1]["content"]
    res = load_run(out).results
    info = res["two_stage"]["reranker"]
    assert info["kind"] == "llm" and info["model"] == "fake-model" and info["k"] == 5 and info["scoring"] == "logprobs"
    assert info["prompt"] == "rerank_v1" and len(info["prompt_version"]) == 12
    for split in ("dev", "test"):
        lists = load_predictions(run, split, "retrieval").mentions
        in_top5 = sum(p.gold in [e for e, _ in p.top[:5]] for p in lists)
        m = res["tie_rules"]["pessimistic"]["full_kb"][split]
        assert m["hits@1"] == pytest.approx(in_top5 / len(lists))     # the oracle puts every listed gold first
        base = res["retriever_same_mentions"]["pessimistic"]["full_kb"][split]
        assert base["hits@1"] == pytest.approx(sum(p.full_kb.rank == 1 for p in lists) / len(lists))
        assert "candidates" in res["tie_rules"]["strict"]
    n_missing = sum(p.gold not in [e for e, _ in p.top[:5]] for s in ("dev", "test")
                    for p in load_predictions(run, s, "retrieval").mentions)
    assert 0 < n_missing < 36 and info["malformed"] == n_missing       # "I am not sure": retriever order, counted
    # a malformed answer keeps the retriever's order for that mention
    preds = {p.mention_id: p for p in load_predictions(out, "test").mentions}
    for p in load_predictions(run, "test", "retrieval").mentions:
        if p.gold not in [e for e, _ in p.top[:5]]:
            assert [e for e, _ in preds[p.mention_id].top[:K]] == [e for e, _ in p.top[:K]]

    # a rerun answers from the cache: nothing asked again
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"])) as srv:
        assert L.main(_args(run, out, srv, "--split", "all", "--top-k", "5")) == 0
        assert srv.snapshot() == []
    assert load_run(out).results["tie_rules"] == res["tie_rules"]

    # dim-mel evaluate answers from the run's cache (no server is running): results.json's numbers, no file touched
    cache = (out / L.CACHE_FILE).read_bytes()
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(out), "--split", "all", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == res["protocols"]
    assert (out / L.CACHE_FILE).read_bytes() == cache

    # the linker's --rerank RUN: the run folder loads as its re-ranker, answering from the run's cache
    from data_process.core.records import load_dataset
    from nel_model.evaluation.evaluate import open_run
    from nel_model.rerank.registry import load_reranker

    retr = open_run(run, "cpu")
    rr = load_reranker(out, retr)
    assert isinstance(rr, L.LLMReranker) and rr.top_k == 5 and rr.llm.model == "fake-model"
    lists = retr.lists("test")
    scores = rr.score(L.dataset_lists(retr, lists, load_dataset(retr.data.dataset, check_gold=False)))
    assert rr.stats.requests == 0 and rr.stats.cached == 24 and scores.shape == (24, K)


def test_text_answers_and_scoring_text_and_an_unanswered_request(retriever_run, tmp_path, capsys):
    run, out = retriever_run["run"], tmp_path / "text"
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"], logprobs=False)) as srv:
        srv.enqueue(Action.error(400), Action.content("7"))     # no answer (not cached), out of range (counted)
        assert L.main(_args(run, out, srv, "--limit", "10", "--scoring", "text", "--concurrency", "1")) == 0
        asked = srv.snapshot()
    assert len(asked) == 10 and all("logprobs" not in r.body for r in asked)
    info = load_run(out).results["two_stage"]["reranker"]
    assert info["scoring"] == "text" and info["unanswered"] == 1 and info["counts"]["requests"] == 9
    assert load_run(out).results["sample"]["n"] == {"test": 10}
    with JsonlCache(out / L.CACHE_FILE) as c:
        recs = [r for _, r in c.items()]
    assert len(recs) == 9 and sum(r["status"] == "malformed" for r in recs) >= 1
    # dim-mel evaluate: the same 10 mentions, the unanswered one in the retriever's order again, and said so
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(out), "--device", "cpu", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out) == load_run(out).results["protocols"]
    assert "no answer for 1 of 10 mentions" in printed.err and "(the run recorded 1 unanswered)" in printed.err
    assert cli.main(["evaluate", "--run", str(out), "--device", "cpu", "--split", "all"]) == 2
    assert "answered the test split(s), not dev (give --split test)" in capsys.readouterr().err
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"], logprobs=False)) as srv:
        assert L.main(_args(run, out, srv, "--limit", "10", "--scoring", "text")) == 0
        assert [r.user_content for r in srv.snapshot()] == [asked[0].user_content]   # only the unanswered one


def test_dry_run_asks_nothing_and_touches_no_file(retriever_run, tmp_path, capsys):
    out = tmp_path / "dry"
    with FakeOpenAIServer() as srv:
        assert L.main(_args(retriever_run["run"], out, srv, "--dry-run", "1", "--limit", "4",
                            "--model", "gpt-4o-mini")) == 0
        assert srv.snapshot() == []
    text = capsys.readouterr().out
    assert "===== prompt 1/1" in text and "Candidates:" in text and "dry run: 4 requests to make" in text
    assert re.search(r"estimated cost: at most \$\d+\.\d{4}", text)
    assert not out.exists()


def _png(path: Path, color) -> Path:
    Image.new("RGB", (40, 30), color).save(path)
    return path


def test_vision_sends_the_mention_image_as_a_data_url_part(tmp_path):
    img = _png(tmp_path / "m.png", (200, 10, 10))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cands = [Candidate(f"Q{i}", f"entity {i}", f"desc {i}", 1.0 - i / 10) for i in range(3)]
    lists = MentionLists([Query("A red thing.", "thing", image=img, id="a"),
                          Query("A broken one.", "one", image=tmp_path / "bad.png", id="b"),
                          Query("No image.", "none", id="c")], [cands, cands, cands])
    with FakeOpenAIServer() as srv:
        srv.enqueue(Action.logprobs("3", {"3": -0.1, "1": -1.0}), Action.logprobs("2", {"2": -0.1}),
                    Action.content("1"))
        llm = L.LLMConfig(model="fake-vlm", base_url=srv.base_url, api_key="sk", max_retries=0,
                          response_format="none", max_tokens=4)
        rr = L.LLMReranker(llm, L.RerankOptions(top_k=3, vision=True, concurrency=1, progress=False),
                           tmp_path / "cache.jsonl")
        scores = rr.score(lists)
        asked = srv.snapshot()
    urls = [image_parts(r.body) for r in asked]
    assert [len(u) for u in urls] == [1, 0, 0]                   # an unreadable image is sent as text only
    assert urls[0][0].startswith("data:image/jpeg;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(urls[0][0].split(",", 1)[1])))
    assert back.size == (40, 30) and back.convert("RGB").getpixel((5, 5))[0] > 150
    assert scores.shape == (3, 3) and int(scores[0].argmax()) == 2 and int(scores[1].argmax()) == 1
    assert rr.stats.images == 1 and rr.stats.images_unreadable == 1
    assert rr.info()["scoring"] == "mixed" and rr.info()["vision"] is True


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_asks_no_answered_prompt_again(retriever_run, tmp_path):
    run, out = retriever_run["run"], tmp_path / "killed"
    hung = threading.Event()

    def respond(body, index):
        if index == 6:                       # the 7th request never gets its answer: the client is killed meanwhile
            hung.set()
            return Action.hang(30)
        return Action.logprobs("1", {"1": -0.1, "2": -1.5})

    with FakeOpenAIServer(responder=respond) as srv:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("OPENAI_API_KEY", None)
        proc = subprocess.Popen([sys.executable, "-m", "nel_model.rerank.llm",
                                 *_args(run, out, srv, "--concurrency", "1")],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert hung.wait(120), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no 7th request"
        finally:
            sigkill(proc)
        assert proc.returncode == -signal.SIGKILL
        first = srv.snapshot()
        with JsonlCache(out / L.CACHE_FILE) as c:
            assert len(c) == 6                           # every answered prompt was on disk before the next request
        srv.responder = lambda body, index: Action.logprobs("1", {"1": -0.1, "2": -1.5})
        assert L.main(_args(run, out, srv)) == 0
        second = srv.snapshot()[len(first):]
    counts = srv.input_counts()
    assert len(counts) == 24 and len(second) == 24 - 6
    assert {p for p, c in counts.items() if c > 1} == {first[6].user_content}   # only the unanswered one, once more
    assert load_run(out).results["two_stage"]["reranker"]["counts"]["cached"] == 6


def test_summary_says_timed_out_requests_and_a_full_disk_the_unsaved_answers(retriever_run, tmp_path, capsys,
                                                                              monkeypatch):
    run, out = retriever_run["run"], tmp_path / "said"
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"])) as srv:
        srv.enqueue(Action.hang(3))
        assert L.main(_args(run, out, srv, "--limit", "3", "--timeout-s", "0.5", "--concurrency", "1")) == 0
        assert len(srv.snapshot()) == 4
        assert "1 request timed out (the server may bill it; its answer never came)" in capsys.readouterr().err
        assert load_run(out).results["two_stage"]["reranker"]["counts"]["timed_out"] == 1

        full_disk_from(monkeypatch, 3)        # the 3rd write fails: the second new answer is not saved
        with pytest.raises(SystemExit) as exit_:
            run_main(L.main, _args(run, out, srv, "--limit", "6", "--concurrency", "1"))
        assert exit_.value.code == 2 and len(srv.snapshot()) == 4 + 2
    err = capsys.readouterr().err
    assert f"error: {out / L.CACHE_FILE}: no space left on device" in err and "Traceback" not in err
    assert "1 answer received this run could not be saved: a rerun asks for it again, and pays again" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_on_one_out_pay_each_prompt_once(retriever_run, tmp_path):
    run, out = retriever_run["run"], tmp_path / "twice"
    with FakeOpenAIServer() as srv:
        cmd = [sys.executable, "-m", "nel_model.rerank.llm",
               *_args(run, out, srv, "--split", "all", "--concurrency", "1", "--timeout-s", "120")]
        first, second = race_two_writers(srv, cmd, oracle(retriever_run["gold_name"]))
        assert first.returncode == 0, first.stderr[-2000:]
        assert second.returncode == 2 and "another process is writing it" in second.stderr, second.stderr[-2000:]
        assert len(srv.snapshot()) == 12 + 24                    # 36 prompts: 36 requests, not 72
    assert load_run(out).results["two_stage"]["reranker"]["counts"]["requests"] == 36


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M (llama.cpp's server): end to end, no accuracy claim

from test_enrich_llm import ALIAS, llama_server  # noqa: E402,F401  (the module-scoped server fixture)


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.timeout(900)
def test_real_smollm2_reranks_end_to_end(retriever_run, tmp_path, llama_server):  # noqa: F811
    out = tmp_path / "smol"
    args = ["--retriever", str(retriever_run["run"]), "--out", str(out), "--model", ALIAS, "--base-url", llama_server,
            "--api-key", "sk-local", "--limit", "6", "--concurrency", "1", "--timeout-s", "300", "--no-progress",
            "--device", "cpu"]
    assert L.main(args) == 0
    info = load_run(out).results["two_stage"]["reranker"]
    c = info["counts"]
    assert c["mentions"] == 6 and c["requests"] == 6 and c["unanswered"] == 0
    assert c["by_logprobs"] + c["by_text"] + info["malformed"] == 6     # every answer scored or counted as malformed
    assert c["prompt_tokens"] > 0 and info["estimated_cost_usd"] == 0.0
    assert len(load_predictions(out, "test").mentions) == 6
    assert L.main(args) == 0 and load_run(out).results["two_stage"]["reranker"]["counts"]["requests"] == 0
