"""Hostile answers and faults around paid LLM calls (issue 26, items 1-4), for both commands that pay for them:
enrichment (``data_process.augment.enrich``) and the LLM re-ranker (``nel_model.rerank.llm``), which share one
machinery (``data_process.augment.paid_calls``). An LLM call is never paid twice and never lost without saying so:

1. answers of digits ``int()`` refuses or that are not ASCII (``²``, ``①``, ``３``, ``٣``) are failed items, on the
   first run and when read back from the cache;
2. an answer whose ``usage`` block has odd types is kept, its usage recorded as unknown;
3. one writer per output and per answer cache (two real processes: ``-m slow``);
4. timed-out requests and answers a full disk kept from the cache are counted and said; an answer the cache cannot
   encode (a lone surrogate) is kept, repaired.
"""

from __future__ import annotations

import json
import sys

import pytest

from data_process.augment import enrich
from data_process.core.durable_io import JsonlCache
from data_process.core.entry import run_main
from data_process.core.locks import OutputLocked, output_lock
from data_process.core.records import load_dataset
from fake_openai_server import Action, FakeOpenAIServer
from llm_fixtures import (enrich_args, fake_server, full_disk_from, make_toy_dataset,  # noqa: F401
                          race_two_writers, read_jsonl)
from nel_model.linking import Candidate, MentionLists, Query
from nel_model.rerank import llm as L

pytestmark = pytest.mark.timeout(180)

NOT_ASCII_DIGITS = ["²", "①", "３", "٣"]   # superscript, circled, full-width, Arabic-Indic three
ODD_USAGE = {
    "string count": {"prompt_tokens": "12", "completion_tokens": 3},
    "list count": {"prompt_tokens": [12], "completion_tokens": 3},
    "negative count": {"prompt_tokens": -5, "completion_tokens": 3},
    "infinite count": {"prompt_tokens": 1e400, "completion_tokens": 3},
    "boolean count": {"prompt_tokens": True, "completion_tokens": 3},
    "word count": {"prompt_tokens": "lots", "completion_tokens": 3},
    "missing count": {"prompt_tokens": 12},
    "null": None,
    "string": "lots",
    "list": [1, 2],
}


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as exit_:
        run_main(main, argv)
    return exit_.value.code


def _lists(n: int, k: int = 3) -> MentionLists:
    cands = [Candidate(f"Q{i}", f"entity {i}", f"desc {i}", 1.0 - i / 10) for i in range(k)]
    return MentionLists([Query(f"Sentence number {j}.", f"thing {j}", id=f"m{j}") for j in range(n)], [cands] * n)


def _reranker(srv: FakeOpenAIServer, cache, timeout_s: float = 5.0) -> L.LLMReranker:
    llm = L.LLMConfig(model="fake-model", base_url=srv.base_url, api_key="sk", max_retries=1, backoff_base_s=0.01,
                      backoff_max_s=0.02, timeout_s=timeout_s, response_format="none", max_tokens=4)
    return L.LLMReranker(llm, L.RerankOptions(top_k=3, concurrency=1, progress=False), cache)


def _order(row) -> list[int]:
    return sorted(range(len(row)), key=lambda j: -float(row[j]))


# ---------------------------------------------------------------------------------------------
# 1. Digits that are not ASCII digits


@pytest.mark.parametrize("digit", NOT_ASCII_DIGITS)
def test_rerank_an_answer_of_non_ascii_digits_is_a_failed_item_not_a_crash(tmp_path, digit):
    lists = _lists(3)
    with FakeOpenAIServer() as srv:
        srv.enqueue(Action.logprobs(digit, {digit: -0.01, "x": -3.0}), Action.content(f"{digit}"),
                    Action.logprobs("2", {"2": -0.1, "1": -2.0}))
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        scores = rr.score(lists)
        assert len(srv.snapshot()) == 3
        again = _reranker(srv, tmp_path / "cache.jsonl")
        assert again.score(lists).tolist() == scores.tolist()
        assert len(srv.snapshot()) == 3                       # the failed items are answers: not asked again
    assert rr.stats.malformed == 2 and rr.stats.by_logprobs == 1 and rr.stats.unanswered == 0
    assert _order(scores[0]) == _order(scores[1]) == [0, 1, 2]  # the retriever's order kept
    assert _order(scores[2])[0] == 1
    assert again.stats.malformed == 2 and again.stats.cached == 3


@pytest.mark.parametrize("digit", NOT_ASCII_DIGITS)
def test_rerank_a_cached_answer_of_non_ascii_digits_is_a_failed_item_and_never_asked_again(tmp_path, digit):
    """The state a run that died between the answer and its verdict leaves: ``received`` records read back."""
    lists, path = _lists(2), tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as srv:
        rr = _reranker(srv, path)
        with JsonlCache(path) as cache:
            for p, raw, top in zip(rr.prompts(lists), (digit, f"candidate {digit}"), ([[digit, -0.01]], None)):
                cache.put(p.key, {"mention_id": p.mention_id, "model": "fake-model", "prompt": rr.template.name,
                                  "prompt_version": rr.template.version, "k": p.k, "raw": raw, "top_logprobs": top,
                                  "usage": {"prompt_tokens": 9, "completion_tokens": 1}, "attempts": 1,
                                  "created": "2026-01-01T00:00:00+00:00", "status": "received"})
        scores = rr.score(lists)
        assert srv.snapshot() == []
    assert rr.stats.malformed == 2 and rr.stats.cached == 2
    assert _order(scores[0]) == _order(scores[1]) == [0, 1, 2]
    with JsonlCache(path) as cache:
        assert sorted(r["status"] for _, r in cache.items()) == ["malformed", "malformed"]


def test_answer_numbers_are_read_with_the_ascii_rule():
    for digit in NOT_ASCII_DIGITS:
        assert L.scores_from_logprobs([[digit, -0.01]], 5) is None
        assert L.scores_from_logprobs([[f" {digit}", -0.01], ["2", -1.0]], 5)[1] == -1.0
        assert L.scores_from_text(digit, 5) is None and L.scores_from_text(f"3, {digit}", 5) is not None
    assert L.scores_from_text("٣ or 2", 5) == L.scores_from_text("2", 5)   # ٣ is text, not a number
    assert L.verdict({"raw": "①", "top_logprobs": [["²", -0.1]]}, 3)["status"] == "malformed"


# ---------------------------------------------------------------------------------------------
# 2. Usage is bookkeeping


@pytest.mark.parametrize("usage", list(ODD_USAGE.values()), ids=list(ODD_USAGE))
def test_rerank_an_answer_with_odd_usage_is_kept_and_paid_once(tmp_path, usage):
    answer = Action.logprobs("2", {"2": -0.1, "1": -2.0}).with_usage(usage)
    with FakeOpenAIServer(responder=lambda body, i: answer) as srv:
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        scores = rr.score(_lists(3))
        assert len(srv.snapshot()) == 3                       # one request per prompt: none thrown away, none retried
    s = rr.stats
    assert (s.requests, s.usage_unknown, s.unanswered, s.malformed) == (3, 3, 0, 0)
    assert s.prompt_tokens == 0 and s.completion_tokens == 0   # unknown, not made up
    assert all(_order(row)[0] == 1 for row in scores)
    recs = read_jsonl(tmp_path / "cache.jsonl")
    assert {json.dumps(r["usage"]) for r in recs} == {json.dumps({"prompt_tokens": 0, "completion_tokens": 0,
                                                                  "unknown": 1})}


@pytest.mark.parametrize("usage", [ODD_USAGE[k] for k in ("string count", "list count", "infinite count", "null")],
                         ids=["string count", "list count", "infinite count", "null"])
def test_enrich_an_answer_with_odd_usage_is_kept_and_paid_once(tmp_path, fake_server, usage):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    fake_server.responder = lambda body, i: Action.ok().with_usage(usage)
    args = enrich_args(data, out, fake_server, "--kinds", "entities")
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 2
    run = json.loads((out / enrich.REPORT_FILE).read_text())["run"]
    assert (run["requests"], run["usage_unknown"], run["done"], run["errors"]) == (2, 2, 2, 0)
    assert run["prompt_tokens"] == 0 and all(e.enrichment is not None for e in load_dataset(out).entities)
    assert enrich.main(args) == 0 and len(fake_server.requests) == 2


# ---------------------------------------------------------------------------------------------
# 3. One writer per output and per answer cache


def test_enrich_refuses_an_output_another_process_writes_and_asks_nothing(tmp_path, fake_server, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    with output_lock(out):
        assert _exit_code(enrich.main, enrich_args(data, out, fake_server)) == 2
    assert "another process is writing it" in capsys.readouterr().err
    with output_lock(tmp_path / "shared.jsonl"):              # another output, the same answer cache
        with pytest.raises(OutputLocked):
            enrich.main(enrich_args(data, tmp_path / "plus2", fake_server, "--cache", str(tmp_path / "shared.jsonl")))
    assert fake_server.requests == []
    assert enrich.main(enrich_args(data, out, fake_server)) == 0 and len(fake_server.requests) == 4


def test_rerank_refuses_an_answer_cache_another_process_writes(tmp_path):
    """The linker's ``--rerank RUN`` and ``rerank-llm`` write the same run's cache: one writer at a time."""
    with FakeOpenAIServer() as srv:
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        with output_lock(tmp_path / "cache.jsonl"):
            with pytest.raises(OutputLocked, match="another process is writing it"):
                rr.score(_lists(2))
            assert rr.score(_lists(2), cache_only=True).shape == (2, 3)    # reading needs no lock
        assert srv.snapshot() == []


@pytest.mark.slow
def test_two_enrich_processes_on_one_out_pay_each_prompt_once(tmp_path):
    data = make_toy_dataset(tmp_path / "toy", n=6, with_images=False)       # 12 prompts
    out = tmp_path / "plus"
    with FakeOpenAIServer() as srv:
        cmd = [sys.executable, "-m", "data_process.augment.enrich",
               *enrich_args(data, out, srv, "--concurrency", "1", "--timeout-s", "120")]
        first, second = race_two_writers(srv, cmd)
        assert first.returncode == 0, first.stderr[-2000:]
        assert second.returncode == 2 and "another process is writing it" in second.stderr, second.stderr[-2000:]
        assert len(srv.snapshot()) == 12                          # 12 prompts: 12 requests, not 24
    assert all(e.enrichment is not None for e in load_dataset(out).entities)


# ---------------------------------------------------------------------------------------------
# 4. Timed-out requests, answers a full disk kept from the cache, answers the cache cannot encode


def test_rerank_timed_out_requests_are_counted(tmp_path):
    with FakeOpenAIServer(responder=lambda body, i: Action.logprobs("2", {"2": -0.1})) as srv:
        srv.enqueue(Action.hang(3))
        rr = _reranker(srv, tmp_path / "cache.jsonl", timeout_s=0.5)
        rr.score(_lists(2))
        assert len(srv.snapshot()) == 3
    s = rr.stats
    assert (s.timed_out, s.transport_retries, s.requests, s.unsaved) == (1, 1, 2, 0)
    assert rr.info()["counts"]["timed_out"] == 1


def test_enrich_timed_out_requests_are_counted_and_said(tmp_path, fake_server, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.hang(3))
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities", "--timeout-s", "0.5")) == 0
    run = json.loads((out / enrich.REPORT_FILE).read_text())["run"]
    assert (run["timed_out"], run["requests"], run["unsaved"]) == (1, 1, 0)
    assert "1 request timed out (the server may bill it; its answer never came)" in capsys.readouterr().err


def test_enrich_answers_paid_but_not_saved_on_a_full_disk_are_counted_and_said(tmp_path, fake_server,
                                                                               monkeypatch, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=3, with_images=False)
    out = tmp_path / "plus"
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--concurrency", "1")
    with monkeypatch.context() as m:
        full_disk_from(m, 3)               # Q0: received + ok written; Q1's received answer is not
        assert _exit_code(enrich.main, args) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err
    assert "1 answer received this run could not be saved" in err and "asks for it again" in err
    asked = [r.user_content for r in fake_server.requests]
    assert len(asked) == 2                                    # nothing asked after the failed write
    assert enrich.main(args) == 0
    again = [r.user_content for r in fake_server.requests[2:]]
    assert len(again) == 2 and again[0] == asked[1] and "Entity 2" in again[1]   # Q1 paid again, as said


def test_rerank_answers_paid_but_not_saved_on_a_full_disk_are_counted(tmp_path, monkeypatch):
    with FakeOpenAIServer(responder=lambda body, i: Action.logprobs("2", {"2": -0.1})) as srv:
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        with monkeypatch.context() as m:
            full_disk_from(m, 3)           # m0: received + verdict written; m1's received answer is not
            with pytest.raises(OSError, match="1 answer received this run could not be saved"):
                rr.score(_lists(3))
        assert len(srv.snapshot()) == 2 and rr.stats.unsaved == 1 and rr.stats.requests == 2
        again = _reranker(srv, tmp_path / "cache.jsonl")
        again.score(_lists(3))
        assert again.stats.cached == 1 and again.stats.requests == 2     # m1 (paid twice, as said) and m2


def test_an_answer_the_cache_cannot_encode_is_kept_repaired(tmp_path, fake_server):
    """A lone surrogate (a JSON escape of half a character) cannot be written as UTF-8: before, the cache write
    failed after the payment and every rerun paid again."""
    with FakeOpenAIServer() as srv:
        srv.enqueue(Action.content("\ud800"), Action.logprobs("2 \udcff", {"2": -0.1, "\udcff": -1.0}))
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        scores = rr.score(_lists(2))
        again = _reranker(srv, tmp_path / "cache.jsonl")
        assert again.score(_lists(2)).tolist() == scores.tolist() and again.stats.cached == 2
        assert len(srv.snapshot()) == 2
    assert (rr.stats.malformed, rr.stats.by_logprobs, rr.stats.requests) == (1, 1, 2)
    assert {r["raw"] for r in read_jsonl(tmp_path / "cache.jsonl")} == {"\ufffd", "2 \ufffd"}

    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.content('{"description": "A \ud800 thing.", "type": "thing", "attributes": {}}'))
    args = enrich_args(data, out, fake_server, "--kinds", "entities")
    assert enrich.main(args) == 0 and enrich.main(args) == 0
    assert len(fake_server.requests) == 1
    assert load_dataset(out).entities[0].enrichment["description"] == "A \ufffd thing."


def test_answers_in_flight_when_the_disk_fills_are_finished_counted_and_nothing_more_is_asked(tmp_path, monkeypatch,
                                                                                               capsys):
    data = make_toy_dataset(tmp_path / "toy", n=6, with_images=False)
    with FakeOpenAIServer(delay=0.3) as srv:          # three requests in flight when the first answer's write fails
        full_disk_from(monkeypatch, 1)
        args = enrich_args(data, tmp_path / "plus", srv, "--kinds", "entities", "--concurrency", "3")
        assert _exit_code(enrich.main, args) == 2
        assert len(srv.snapshot()) == 3                          # no request started after the failed write
    assert "3 answers received this run could not be saved: a rerun asks for them again" in capsys.readouterr().err


@pytest.mark.parametrize("top, best", [({"2": 10**400}, 1), ({"2": "high", "1": -0.5}, 0),
                                       ({"2": float("nan"), "3": -0.1}, 2)],
                         ids=["too large for a float: the text read", "a string: left out", "NaN: left out"])
def test_log_probabilities_of_odd_values_never_throw_the_answer_away(tmp_path, top, best):
    with FakeOpenAIServer(responder=lambda body, i: Action.logprobs("2", top)) as srv:
        rr = _reranker(srv, tmp_path / "cache.jsonl")
        scores = rr.score(_lists(2))
        assert len(srv.snapshot()) == 2                          # one request each: kept, not retried
    assert rr.stats.requests == 2 and rr.stats.unanswered == 0 and rr.stats.malformed == 0
    assert [_order(row)[0] for row in scores] == [best, best]
