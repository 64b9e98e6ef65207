"""Unit tests of the enrichment building blocks: answers, templates, Retry-After, backoff, rate limits, cost."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random

import pytest

from data_process.augment.paid_calls import estimate_cost, model_price
from data_process.augment.llm_client import (
    LLMConfig, TokenBucket, backoff_delay, parse_retry_after, response_format_body,
)
from data_process.augment.llm_prompts import ANSWER_SCHEMA, AnswerError, PromptTemplate, TemplateError, enrichment_text, parse_answer

GOOD = {"description": "A footballer.", "type": "person", "attributes": {"team": "Ajax"}}


@pytest.mark.parametrize("text", [
    '{"description": "A footballer.", "type": "person", "attributes": {"team": "Ajax"}}',
    '```json\n{"description": "A footballer.", "type": "person", "attributes": {"team": "Ajax"}}\n```',
    'Here you go:\n```\n{"description": " A footballer. ", "type": "person", "attributes": {"team": "Ajax"}}```',
    'Answer: {"description": "A footballer.", "type": "person", "attributes": {"team": "Ajax"}, "x": 1} Hope it helps',
])
def test_parse_answer_accepts_fences_and_surrounding_text(text):
    assert parse_answer(text) == GOOD


def test_parse_answer_coerces_scalar_attributes():
    got = parse_answer('{"description": "d", "type": null, "attributes": {"born": 1990, "active": true, '
                       '"clubs": ["Ajax", "PSV"], "empty": ""}}')
    assert got == {"description": "d", "type": "", "attributes": {"born": "1990", "active": "yes",
                                                                   "clubs": "Ajax, PSV"}}


@pytest.mark.parametrize("text,error", [
    ("", "empty answer"),
    ("no json here", "no JSON object found"),
    ('{"description": "x",', "invalid JSON (Expecting property name enclosed in double quotes at char 20)"),
    ('[1, 2]', "no JSON object found"),
    ('{"type": "person"}', "'description' must be a non-empty string"),
    ('{"description": "  "}', "'description' must be a non-empty string"),
    ('{"description": "d", "type": 3}', "'type' must be a string"),
    ('{"description": "d", "attributes": [1]}', "'attributes' must be an object"),
    ('{"description": "d", "attributes": {"a": {"b": 1}}}', "attribute 'a' must be a string, number or list of those"),
])
def test_parse_answer_rejects_invalid(text, error):
    with pytest.raises(AnswerError) as exc:
        parse_answer(text)
    assert str(exc.value) == error


def test_enrichment_text():
    assert enrichment_text(GOOD) == "person: A footballer.; team: Ajax"
    assert enrichment_text({"description": "d", "type": "", "attributes": {"b": "2", "a": "1"}}) == "d; a: 1; b: 2"


def test_template_version_is_file_hash_and_render(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# comment\n[system]\nSys {name}.\n[user]\nName: {name}\nJSON: {\"a\": 1} {unknown_x}\n")
    t = PromptTemplate.load(p)
    assert t.version == hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    assert t.name == "t" and t.fields == ("name", "unknown_x")
    with pytest.raises(TemplateError, match="no value for placeholder"):
        t.render({"name": "Ada"})
    assert t.render({"name": "Ada", "unknown_x": "?"}) == [
        {"role": "system", "content": "Sys Ada."},
        {"role": "user", "content": 'Name: Ada\nJSON: {"a": 1} ?'},
    ]


def test_template_explicit_version_header_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# version: entity-v7\n[user]\nhi {name}\n")
    assert PromptTemplate.load(p).version == "entity-v7"
    p.write_text("stray text\n[user]\nhi\n")
    with pytest.raises(TemplateError, match="line 1: text before the first"):
        PromptTemplate.load(p)
    p.write_text("[system]\nhi\n")
    with pytest.raises(TemplateError, match="no \\[user\\] section"):
        PromptTemplate.load(p)


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after({"Retry-After": "3"}, now) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}, now) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}, now) == 0.25
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now + 7, usegmt=True)}, now) == 7.0
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now - 7, usegmt=True)}, now) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}, now) is None
    assert parse_retry_after({}, now) is None


def test_backoff_delay_is_exponential_with_jitter_and_capped():
    rng = random.Random(0)
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 30.0)]:
        for _ in range(20):
            d = backoff_delay(attempt, 1.0, 30.0, rng)
            assert full / 2 <= d <= full


def test_token_bucket_waits_exactly_for_refill():
    t = [0.0]
    slept = []

    async def fake_sleep(s):
        slept.append(s)
        t[0] += s

    async def go():
        b = TokenBucket(60, clock=lambda: t[0], sleep=fake_sleep)  # 1 unit per second, burst 60
        waits = [await b.acquire(30), await b.acquire(30), await b.acquire(3)]
        b.adjust(2)  # 2 more units were used than estimated
        waits.append(await b.acquire(1))
        return waits

    assert asyncio.run(go()) == [0.0, 0.0, 3.0, 3.0]
    assert slept == [3.0, 3.0]


def test_price_table_lookup_and_cost():
    prices = {"gpt-4o": {"prompt": 2.5, "completion": 10.0}, "gpt-4o-mini": {"prompt": 0.15, "completion": 0.6}}
    assert model_price("gpt-4o-mini-2024-07-18", prices) == prices["gpt-4o-mini"]
    assert model_price("llama3", prices) is None
    assert estimate_cost("gpt-4o", 1_000_000, 100_000, prices) == pytest.approx(3.5)
    assert estimate_cost("llama3", 10, 10, prices) is None


def test_llm_config_never_shows_the_key():
    cfg = LLMConfig(model="m", api_key="sk-SECRET")
    assert "SECRET" not in repr(cfg) and "SECRET" not in str(cfg.public())


def test_response_format_bodies():
    assert response_format_body("json_object", ANSWER_SCHEMA) == {"type": "json_object"}
    assert response_format_body("none", ANSWER_SCHEMA) is None
    assert response_format_body("json_object_schema", ANSWER_SCHEMA) == {"type": "json_object", "schema": ANSWER_SCHEMA}
    assert response_format_body("json_schema", ANSWER_SCHEMA) == {
        "type": "json_schema", "json_schema": {"name": "enrichment", "schema": ANSWER_SCHEMA}}
    with pytest.raises(ValueError, match="must be one of"):
        response_format_body("xml", ANSWER_SCHEMA)


def test_parse_answer_rejects_copied_instructions():
    instr = ('Answer with {"description": "one or two sentences saying who or what it is", '
             '"type": "a short type such as person, organization", "attributes": {"attribute name": "value"}}')
    with pytest.raises(AnswerError, match="'description' copies the instructions"):
        parse_answer('{"description": "One or two sentences saying who or what it is.", "type": "x"}', instr)
    with pytest.raises(AnswerError, match="'type' copies the instructions"):
        parse_answer('{"description": "A ship.", "type": "a short type such as person"}', instr)
    got = parse_answer('{"description": "A ship.", "type": "ship", "attributes": '
                       '{"attribute name": "value", "class": "liner"}}', instr)
    assert got == {"description": "A ship.", "type": "ship", "attributes": {"class": "liner"}}
    # A short answer that happens to occur in the instructions is fine.
    assert parse_answer('{"description": "A person.", "type": "person"}', instr)["type"] == "person"
