"""The names and descriptions of an index's entities (``INDEX/entities.jsonl``): what a linker shows for an id the
search returns, whether or not the run's own KB has it.

One line ``{"key": id, "name", "description"}`` an entity, appended and fsynced (``JsonlCache``: the last line of an
id wins, a torn last line after a kill is set aside), so a rerun after a kill appends what is missing and nothing
written is lost. Held in memory when opened (one dictionary entry an entity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from data_process.core.durable_io import JsonlCache, parse_cache_records
from data_process.core.records import Entity

TEXTS_FILE = "entities.jsonl"
WRITE_ROWS = 4096


def add_entity_texts(index_root: str | Path, entities: Iterable[Entity]) -> int:
    """Append the names and descriptions of the entities not yet recorded (blocks of ``WRITE_ROWS``, one fsync
    each); returns how many were appended."""
    cache = JsonlCache(Path(index_root) / TEXTS_FILE)
    try:
        block, n = [], 0
        for e in entities:
            if e.id in cache:
                continue
            block.append((e.id, {"name": e.name, "description": e.description}))
            if len(block) >= WRITE_ROWS:
                n += len(cache.put_many(block))
                block = []
        return n + len(cache.put_many(block))
    finally:
        cache.close()


def read_entity_texts(index_root: str | Path) -> dict[str, tuple[str, str]]:
    """``{id: (name, description)}`` of an index, read without writing (a torn last line is skipped: the next
    ``add_entity_texts`` sets it aside); an index without the file (built by the library alone) gives ``{}``."""
    path = Path(index_root) / TEXTS_FILE
    if not path.is_file():
        return {}
    records, _, _ = parse_cache_records(path, path.read_bytes())
    return {k: (str(r.get("name", "")), str(r.get("description", ""))) for k, r in records.items()}
