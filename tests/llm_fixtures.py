"""Shared helpers for the enrichment tests: a toy unified dataset and the fake server fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.core.records import DatasetInfo, Entity, Mention, save_dataset
from fake_openai_server import FakeOpenAIServer

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
