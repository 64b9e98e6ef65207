"""Crash safety: SIGKILL the enrichment mid-run, run it again, and check that no paid work was repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_process.augment import enrich
from data_process.core.durable_io import JsonlCache
from data_process.augment.llm_prompts import PromptTemplate
from data_process.core.records import load_dataset
from fake_openai_server import FakeOpenAIServer
from llm_fixtures import REPO_ROOT, enrich_args, make_toy_dataset
from procs import sigkill

pytestmark = pytest.mark.slow

N = 16  # entities and mentions: 32 requests
CONCURRENCY = 4


def _cached_user_contents(cache_path) -> dict[str, str]:
    """The user message of every input whose answer is in the cache, with the record's status ("ok", or
    "received": paid and cached, the kill came before it was parsed)."""
    out = {}
    with JsonlCache(cache_path) as c:
        for _, rec in c.items():
            tpl = PromptTemplate.load(REPO_ROOT / "configs" / "prompts" / f"{rec['template']}.txt")
            out[tpl.render(rec["input"])[-1]["content"]] = rec["status"]
    return out


@pytest.mark.timeout(180)
def test_sigkill_mid_run_then_resume_repeats_no_cached_request(tmp_path):
    data = make_toy_dataset(tmp_path / "toy", n=N)
    out = tmp_path / "plus"
    with FakeOpenAIServer(delay=0.2) as srv:  # slowed: the whole run takes >= 32 * 0.2 / 4 = 1.6 s
        args = enrich_args(data, out, srv, "--concurrency", str(CONCURRENCY))
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        env["PYTHONPATH"] = str(REPO_ROOT)
        proc = subprocess.Popen([sys.executable, "-m", "data_process.augment.enrich", *args], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 90
            while len(srv.requests) < 10:  # well into the run, far from its end
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the enrichment never got going"
                time.sleep(0.02)
        finally:
            sigkill(proc)
        assert proc.returncode == -signal.SIGKILL
        first_run = srv.snapshot()
        cached = _cached_user_contents(out / enrich.CACHE_FILE)
        assert 0 < len(cached) < 2 * N
        assert not (out / "entities.jsonl").exists()  # the output is written only at the end

        assert enrich.main(args) == 0  # resume in-process
        second_run = srv.snapshot()[len(first_run):]

    asked_again = [r.user_content for r in second_run if r.user_content in cached]
    assert asked_again == []  # no cached input was requested twice
    counts = srv.input_counts()
    assert len(counts) == 2 * N  # every input was asked
    # Only requests that were in flight at the kill may have been sent twice.
    assert sum(c - 1 for c in counts.values()) <= CONCURRENCY
    ds = load_dataset(out)
    assert all(x.enrichment is not None for x in [*ds.entities, *ds.mentions])
    rep = json.loads((out / enrich.REPORT_FILE).read_text())
    # an answer received but not parsed at the kill is parsed from the cache (no request: asked_again is empty) and
    # counted as done; only parsed answers count as cached (under load, the kill can land between the two writes)
    assert rep["run"]["cached"] == sum(status == "ok" for status in cached.values()) and rep["complete"] is True
