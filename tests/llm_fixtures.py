"""Shared helpers for the enrichment tests: a toy unified dataset and the fake server fixture."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from data_process.core.durable_io import JsonlCache
from data_process.core.records import DatasetInfo, Entity, Mention, save_dataset
from fake_openai_server import Action, FakeOpenAIServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_toy_dataset(root: Path, n: int = 4, *, with_images: bool = True) -> Path:
    """``n`` entities and ``n`` mentions (one per entity), with one tiny image file each when asked."""
    ents, ments = [], []
    for i in range(n):
        img = f"images/e{i}.png" if with_images else None
        ents.append(Entity(id=f"Q{i}", name=f"Entity {i}", description=f"The entity number {i}.",
                           attributes={"rank": str(i)}, images=(img,) if img else ()))
        sentence = f"Yesterday Person {i} met the press."
        ments.append(Mention(id=f"m{i}", sentence=sentence, mention=f"Person {i}", gold_id=f"Q{i}",
                             split=("train", "dev", "test")[i % 3], span=(10, 10 + len(f"Person {i}")),
                             image=f"images/m{i}.png" if with_images else None))
    save_dataset(root, DatasetInfo(name="toy", source_format="test"), ents, ments)
    if with_images:
        (root / "images").mkdir(exist_ok=True)
        for i in range(n):
            (root / "images" / f"e{i}.png").write_bytes(b"png-e%d" % i)
            (root / "images" / f"m{i}.png").write_bytes(b"png-m%d" % i)
    return root


def enrich_args(data: Path, out: Path, server: FakeOpenAIServer, *extra: str) -> list[str]:
    """CLI args for a fast run against the fake server (tiny backoff, short timeout)."""
    return ["--data", str(data), "--out", str(out), "--model", "fake-model", "--base-url", server.base_url,
            "--api-key", "sk-test-SECRET-123", "--no-progress", "--backoff-base-s", "0.01",
            "--backoff-max-s", "0.05", "--timeout-s", "5", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def fake_server():
    with FakeOpenAIServer() as srv:
        yield srv


def child_env() -> dict[str, str]:
    """The environment of a command run as a child process: this checkout first, no API key from the caller."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    return env


def race_two_writers(srv: FakeOpenAIServer, cmd: list[str],
                     respond: Callable[[dict[str, Any], int], Action | None] | None = None
                     ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run ``cmd`` twice against ``srv``: the first process's first request is held at the server until the second
    process has run to its end (so both want the same output at once); then the first one finishes. ``respond``
    answers every request (the server's default when None). Returns both finished processes (first, second)."""
    started, release = threading.Event(), threading.Event()

    def responder(body: dict[str, Any], index: int) -> Action | None:
        if index == 0:
            started.set()
            release.wait(120)
        return respond(body, index) if respond is not None else None

    srv.responder = responder
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        if not started.wait(120):
            first.kill()
            raise AssertionError(f"the first process sent no request: {first.communicate(timeout=60)[1][-2000:]}")
        second = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    finally:
        release.set()
        out, err = first.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, first.returncode, out, err), second


def full_disk_from(monkeypatch, n: int) -> list[str]:
    """Answer-cache writes fail with ENOSPC from the ``n``-th on, nothing of them written (a full disk); returns the
    keys written before."""
    real, written = JsonlCache.put, []

    def put(self, key, record):
        if len(written) + 1 >= n:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        written.append(key)
        return real(self, key, record)

    monkeypatch.setattr(JsonlCache, "put", put)
    return written
