"""Enrichment end to end: the real ``openai`` client against the fake OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.augment import enrich
from data_process.core.durable_io import JsonlCache
from data_process.augment.llm_prompts import PromptTemplate
from data_process.core.records import load_dataset
from fake_openai_server import Action
from llm_fixtures import REPO_ROOT, enrich_args, fake_server, make_toy_dataset, read_jsonl  # noqa: F401

pytestmark = pytest.mark.timeout(120)

ENTITY_TPL = REPO_ROOT / "configs" / "prompts" / "entity_v1.txt"
MENTION_TPL = REPO_ROOT / "configs" / "prompts" / "mention_v1.txt"


def _report(out: Path) -> dict:
    return json.loads((out / enrich.REPORT_FILE).read_text())


def _cache_records(out: Path) -> list[dict]:
    with JsonlCache(out / enrich.CACHE_FILE) as c:
        return [rec for _, rec in c.items()]


def test_end_to_end_writes_plus_dataset(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=4)
    out = tmp_path / "toy_plus"
    rc = enrich.main(enrich_args(data, out, fake_server))
    assert rc == 0
    assert len(fake_server.requests) == 8
    assert {r.authorization for r in fake_server.requests} == {"Bearer sk-test-SECRET-123"}
    body = fake_server.requests[0].body
    assert body["model"] == "fake-model" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    assert body["response_format"] == {"type": "json_object"}

    ds = load_dataset(out)
    assert ds.info.name == "toy+"
    ent_v = PromptTemplate.load(ENTITY_TPL).version
    men_v = PromptTemplate.load(MENTION_TPL).version
    for e in ds.entities:
        assert e.enrichment["text"] == f"thing: {e.name} is a test subject.; source: fake; subject: {e.name}"
        assert e.enrichment["type"] == "thing"
        assert e.enrichment["attributes"] == {"source": "fake", "subject": e.name}
        prov = e.enrichment["provenance"]
        assert (prov["model"], prov["template"], prov["template_version"]) == ("fake-model", "entity_v1", ent_v)
        assert ds.image_path(e.images[0]).read_bytes() == b"png-e" + e.id[1:].encode()
    for m in ds.mentions:
        assert m.enrichment["description"] == f"{m.mention} is a test subject."
        assert m.enrichment["provenance"]["template_version"] == men_v
        assert ds.image_path(m.image).read_bytes() == b"png-m" + m.id[1:].encode()
    assert (out / "images").is_symlink()
    assert ds.info.notes["enrichment"]["images"] == {"mode": "symlink", "entries": ["images"]}

    rep = _report(out)
    assert rep["counts"] == {"entity": {"total": 4, "ok": 4, "failed": 0, "missing": 0},
                             "mention": {"total": 4, "ok": 4, "failed": 0, "missing": 0}}
    assert rep["run"]["done"] == 8 and rep["run"]["cached"] == 0 and rep["complete"] is True
    assert rep["failures"] == []
    # The API key is written nowhere.
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink() and "images" not in f.parts:
            assert "SECRET" not in f.read_text(), f


@pytest.mark.parametrize("mode", ["json_schema", "none"])
def test_response_format_flag_is_sent(tmp_path, fake_server, mode):
    from data_process.augment.llm_prompts import ANSWER_SCHEMA

    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities", "--response-format", mode)) == 0
    [req] = fake_server.requests
    if mode == "none":
        assert "response_format" not in req.body
    else:
        assert req.body["response_format"] == {"type": "json_schema",
                                               "json_schema": {"name": "enrichment", "schema": ANSWER_SCHEMA}}


def test_copy_images_mode(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1)
    out = tmp_path / "plus"
    assert enrich.main(enrich_args(data, out, fake_server, "--images", "copy")) == 0
    assert not (out / "images").is_symlink() and (out / "images" / "e0.png").read_bytes() == b"png-e0"


def test_rerun_skips_cached_items(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=3)
    out = tmp_path / "plus"
    assert enrich.main(enrich_args(data, out, fake_server)) == 0
    first = (out / "entities.jsonl").read_text()
    assert len(fake_server.requests) == 6
    assert enrich.main(enrich_args(data, out, fake_server)) == 0
    assert len(fake_server.requests) == 6  # nothing asked again
    assert (out / "entities.jsonl").read_text() == first
    assert _report(out)["run"]["cached"] == 6


def test_identical_inputs_are_asked_once(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    lines = read_jsonl(data / "mentions.jsonl")
    lines[1].update(sentence=lines[0]["sentence"], mention=lines[0]["mention"], span=lines[0]["span"])
    (data / "mentions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "plus"
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "mentions")) == 0
    assert len(fake_server.requests) == 1
    ds = load_dataset(out)
    assert ds.mentions[0].enrichment == ds.mentions[1].enrichment
    assert all(e.enrichment is None for e in ds.entities)  # entities not asked for


def test_server_error_retried_then_succeeds(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.error(500), Action.error(503))
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    assert len(fake_server.requests) == 3
    assert _report(out)["run"]["transport_retries"] == 2
    assert load_dataset(out).entities[0].enrichment["description"] == "Entity 0 is a test subject."


def test_malformed_answer_retried_with_correction_then_succeeds(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.malformed("```json\n{\"type\": \"person\"}\n```"))
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    assert len(fake_server.requests) == 2
    retry_msgs = fake_server.requests[1].body["messages"]
    assert retry_msgs[-2] == {"role": "assistant", "content": "```json\n{\"type\": \"person\"}\n```"}
    assert retry_msgs[-1]["role"] == "user"
    assert "'description' must be a non-empty string" in retry_msgs[-1]["content"]
    [rec] = _cache_records(out)
    assert rec["status"] == "ok" and rec["attempts"] == 2
    assert rec["errors"] == ["'description' must be a non-empty string"]
    assert len(rec["raw"]) == 2
    assert load_dataset(out).entities[0].enrichment is not None


def test_always_invalid_is_recorded_failed_with_raw_text(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.responder = lambda body, i: Action.malformed("I cannot answer that.")
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--answer-retries", "2")
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 3
    [rec] = _cache_records(out)
    assert rec["status"] == "failed"
    assert rec["raw"] == ["I cannot answer that."] * 3
    assert rec["errors"] == ["no JSON object found"] * 3
    ds = load_dataset(out)
    assert ds.entities[0].enrichment is None  # never a made-up value
    rep = _report(out)
    assert rep["counts"]["entity"] == {"total": 1, "ok": 0, "failed": 1, "missing": 0}
    assert rep["failures"][0]["id"] == "Q0" and rep["failures"][0]["raw"] == ["I cannot answer that."] * 3

    # A re-run does not pay again for a failed item...
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 3
    # ...unless asked to: --retry-failed.
    fake_server.responder = None
    assert enrich.main(args + ["--retry-failed"]) == 0
    assert len(fake_server.requests) == 4
    [rec] = _cache_records(out)
    assert rec["status"] == "ok" and len(rec["raw"]) == 4  # earlier raw answers kept
    assert load_dataset(out).entities[0].enrichment["type"] == "thing"


def test_retry_after_seconds_is_honoured(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.error(429, {"Retry-After": "1"}))
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    first, second = fake_server.requests
    assert second.time - first.time >= 1.0  # backoff alone would be <= 0.05 s


def test_retry_after_http_date_is_honoured(tmp_path, fake_server):
    import email.utils
    import time

    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds, 1-2 s ahead
    # the same instant on the fake server's clock (time.monotonic): the retry must not come before it
    not_before = time.monotonic() + (email.utils.parsedate_to_datetime(when).timestamp() - time.time())
    fake_server.enqueue(Action.error(429, {"Retry-After": when}))
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    first, second = fake_server.requests
    assert second.time >= not_before - 0.05  # backoff alone would retry within 0.05 s of the first request


def test_hang_past_timeout_is_retried(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.hang(5))
    args = enrich_args(data, out, fake_server, "--kinds", "entities") + ["--timeout-s", "0.5"]
    assert enrich.main(args) == 0
    first, second = fake_server.requests
    assert second.time - first.time >= 0.5
    assert _report(out)["run"]["transport_retries"] == 1


def test_connection_closed_abruptly_is_retried(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.enqueue(Action.close())
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    assert len(fake_server.requests) == 2
    assert load_dataset(out).entities[0].enrichment is not None


def test_unanswered_items_are_not_cached_and_complete_on_rerun(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    fake_server.responder = lambda body, i: Action.error(502)
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--max-retries", "2")
    assert enrich.main(args) == enrich.EXIT_INCOMPLETE
    assert len(fake_server.requests) == 3
    assert _cache_records(out) == []
    rep = _report(out)
    assert rep["complete"] is False
    assert rep["counts"]["entity"] == {"total": 1, "ok": 0, "failed": 0, "missing": 1}
    assert rep["failures"][0]["errors"] == ["gave up after 3 attempts; last: HTTP 502"]
    assert load_dataset(out).entities[0].enrichment is None
    fake_server.responder = None
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 4
    assert load_dataset(out).entities[0].enrichment is not None


def test_auth_error_stops_the_run(tmp_path, fake_server, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    fake_server.responder = lambda body, i: Action.error(401)
    rc = enrich.main(enrich_args(data, out, fake_server, "--concurrency", "1"))
    assert rc == enrich.EXIT_USAGE
    assert len(fake_server.requests) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_torn_cache_line_is_skipped_and_only_that_item_asked_again(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    args = enrich_args(data, out, fake_server, "--concurrency", "1")
    assert enrich.main(args) == 0
    cache = out / enrich.CACHE_FILE
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 8  # each answer twice: as received (before parsing), then with its verdict
    # killed while writing the last answer as received: its verdict never written, the received line torn
    cache.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 5
    assert (out / (enrich.CACHE_FILE + ".corrupt")).exists()
    ds = load_dataset(out)
    assert all(x.enrichment is not None for x in [*ds.entities, *ds.mentions])


def test_dry_run_prints_prompts_and_cost_without_calling(tmp_path, fake_server, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=3, with_images=False)
    out = tmp_path / "plus"
    args = ["--data", str(data), "--out", str(out), "--model", "gpt-4o-mini", "--dry-run", "2", "--no-progress"]
    assert enrich.main(args) == 0
    assert fake_server.requests == []
    assert not out.exists()
    printed = capsys.readouterr().out
    tpl = PromptTemplate.load(ENTITY_TPL)
    first = tpl.render({"name": "Entity 0", "description": "The entity number 0.", "attributes": "- rank: 0"})
    assert f"--- user ---\n{first[1]['content']}\n" in printed
    assert printed.count("===== prompt ") == 2
    assert "dry run: 6 requests to make (3 entities, 3 mentions; 0 of 6 already cached), model gpt-4o-mini" in printed
    assert "~480 completion (80/request; at most 1536 with max_tokens=256)" in printed
    assert "estimated cost: $0.000" in printed


def test_openai_without_key_is_a_clear_error(tmp_path, monkeypatch):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        enrich.main(["--data", str(data), "--out", str(tmp_path / "o"), "--model", "gpt-4o-mini"])


def test_synthetic_demo_dataset(tmp_path, fake_server):
    synthetic = pytest.importorskip("data_process.fixtures.synthetic", reason="data_process.fixtures.synthetic not available")
    data = synthetic.generate(tmp_path / "demo", synthetic.SyntheticConfig(entities=6, mentions=12, image_size=16),
                              progress=False)
    out = tmp_path / "demo_plus"
    assert enrich.main(enrich_args(data, out, fake_server, "--concurrency", "8")) == 0
    src, ds = load_dataset(data), load_dataset(out)
    unique_mentions = {(m.sentence, m.mention) for m in src.mentions}
    assert len(fake_server.requests) == len(src.entities) + len(unique_mentions)
    assert [e.id for e in ds.entities] == [e.id for e in src.entities]
    assert all(x.enrichment is not None for x in [*ds.entities, *ds.mentions])
    for e_src, e in zip(src.entities, ds.entities):
        assert e.images == e_src.images
        for rel in e.images:
            assert ds.image_path(rel).read_bytes() == src.image_path(rel).read_bytes()
    for m in ds.mentions:
        if m.image:
            assert ds.image_path(m.image).is_file()


@pytest.mark.parametrize("status", [401, 400])
def test_api_key_echoed_by_the_server_is_never_printed_or_written(tmp_path, fake_server, capsys, status):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    echo = json.dumps({"error": {"message": "Invalid API key. Received API Key = sk-test-SECRET-123"}})
    fake_server.responder = lambda body, i: Action.error(status, body=echo)
    rc = enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities"))
    assert rc == (enrich.EXIT_USAGE if status == 401 else enrich.EXIT_INCOMPLETE)
    err = capsys.readouterr().err
    assert "SECRET" not in err
    if status == 401:
        assert "HTTP 401" in err and "Received API Key = ***" in err
    else:  # an unanswered request: its error is in the report
        [failure] = _report(out)["failures"]
        assert failure["errors"][0].startswith("HTTP 400") and "Received API Key = ***" in failure["errors"][0]
    for f in out.rglob("*") if out.exists() else []:
        if f.is_file():
            assert "SECRET" not in f.read_text(errors="replace"), f


def test_answers_received_before_a_fatal_error_are_still_cached(tmp_path, fake_server, monkeypatch):
    """A fatal error cancels the other workers; an answer already received (paid) must still reach the cache,
    even when its write was queued behind another one."""
    import threading
    import time

    from data_process.core import durable_io as io_utils

    data = make_toy_dataset(tmp_path / "toy", n=3, with_images=False)
    out = tmp_path / "plus"
    slow_put = io_utils.JsonlCache.put

    def put(self, key, record):
        time.sleep(0.4)  # a slow disk: the second answer waits for the first write
        return slow_put(self, key, record)

    monkeypatch.setattr(io_utils.JsonlCache, "put", put)
    gate = threading.Event()

    def responder(body, i):
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if "Entity 2" in user:
            gate.wait(0.15)  # after the two other answers have arrived
            return Action.error(401)
        return None

    fake_server.responder = responder
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--concurrency", "3")
    assert enrich.main(args) == enrich.EXIT_USAGE
    recs = {r["item_id"]: r["status"] for r in _cache_records(out)}
    # on disk as received at least (a write cut short by the stop is the verdict, which a rerun works out again)
    assert set(recs) == {"Q0", "Q1"} and set(recs.values()) <= {"ok", "received"}
    fake_server.responder = None
    asked = len(fake_server.requests)
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == asked + 1  # only Q2: the two received answers are parsed, not asked again
