"""An existing unified dataset folder as a reader input (``prepare --format unified``): it is loaded with the
record checks of ``data_process.core.records`` and re-validated; image paths keep their meaning through links from
the output folder to the source folder's top-level image folders."""

from __future__ import annotations

from pathlib import Path

from data_process.ingest.readers.common import Converted
from data_process.core.records import load_dataset


def read_unified(src: str | Path, *, dataset_name: str | None = None, progress: bool = True) -> Converted:
    src = Path(src)
    ds = load_dataset(src, check_gold=False)
    tops: set[str] = set()
    for rel in [m.image for m in ds.mentions if m.image] + [p for e in ds.entities for p in e.images]:
        parts = Path(rel).parts
        if parts and not Path(rel).is_absolute() and parts[0] != "..":
            tops.add(parts[0])
    links = {top: (src / top).resolve() for top in sorted(tops) if (src / top).exists()}
    info = ds.info
    if dataset_name:
        info = type(info)(name=dataset_name, source_format=info.source_format, split_rule=info.split_rule,
                          notes=info.notes)
    return Converted(info=info, entities=ds.entities, mentions=ds.mentions, image_links=links)
