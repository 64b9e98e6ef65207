"""An existing unified dataset folder as a reader input (``prepare --format unified``): it is loaded with the
record checks of ``data_process.core.records`` and re-validated; image paths keep their meaning through links from
the output folder to the source folder's top-level image folders.

A malformed line, a duplicate id, or a mention whose gold entity (or a candidate) is not in the KB is dropped and
listed; ``strict`` keeps the first malformed line an error and leaves gold and candidate checks to validation. A
fault in a non-essential field (``records.ESSENTIAL_FIELDS`` lists the others: a description, aliases, images, a
caption, an enrichment, an unknown field) is mended or the field left out, listed as a warning, and the record kept.
An image path that is absolute, holds ``..`` or leads (through a symlink) out of the source's image folder is left
out of its record and listed (``common.guard_images``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_process.core.placement import dataset_links, record_image_paths
from data_process.core.records import (ENTITIES_FILE, MENTIONS_FILE, DataError, entity_from_dict, iter_records,
                                       load_dataset, mention_from_dict, missing_entity, read_info)
from data_process.ingest.readers.common import Converted, RecordPolicy, guard_images


def read_unified(src: str | Path, *, dataset_name: str | None = None, progress: bool = True,
                 strict: bool = False) -> Converted:
    src = Path(src)
    policy = RecordPolicy(strict)
    if strict:
        ds = load_dataset(src, check_gold=False)
        info, entities, mentions = ds.info, ds.entities, ds.mentions
    else:
        info = read_info(src)

        def on_error(err: DataError, _kind: str) -> None:
            policy.drop(err)

        entities = list(iter_records(src / ENTITIES_FILE, entity_from_dict, on_error, on_repair=policy.repair))
        kb = {e.id for e in entities}
        mentions = []
        for m in iter_records(src / MENTIONS_FILE, mention_from_dict, on_error, on_repair=policy.repair):
            err = missing_entity(m, kb, src / MENTIONS_FILE)
            if err is not None:
                policy.drop(err)
            else:
                mentions.append(m)
    policy.records = len(entities) + len(mentions) + len(policy.dropped)
    links = {top: target.resolve()
             for top, target in dataset_links(src, record_image_paths(entities, mentions)).items()}
    if dataset_name:
        info = dataclasses.replace(info, name=dataset_name)
    return guard_images(Converted(info=info, entities=entities, mentions=mentions, image_links=links,
                                  dropped=policy.dropped, records_read=policy.records, repaired=policy.repaired),
                        folder_links=True)
