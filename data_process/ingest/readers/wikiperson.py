"""WikiPerson: a person-only MEL set. Its public preprocessed copies follow the MIMIC layout
(``kb_entity.json``, optional ``qid2id.json``, ``<NAME>_{train,dev,test}.json``, ``kb_image/``,
``mention_image/``), so this reader is the MIMIC reader with ``source_format = "wikiperson"``.
A copy laid out differently fails with the MIMIC reader's errors (which name the missing file).
"""

from __future__ import annotations

from pathlib import Path

from data_process.ingest.readers.common import Converted
from data_process.ingest.readers.mimic import read_mimic


def read_wikiperson(src: str | Path, *, dataset_name: str | None = None, progress: bool = True,
                    strict: bool = False) -> Converted:
    return read_mimic(src, dataset_name=dataset_name, source_format="wikiperson", progress=progress, strict=strict)
