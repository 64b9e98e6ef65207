"""Readers for the public MEL releases; each returns a :class:`~data_process.ingest.readers.common.Converted`.

``READERS[format](src, dataset_name=..., progress=..., strict=...)``; MELBench also takes ``seed``, ``splits``
and ``image_dir``; GHMFC ``annotations``, ``image_dir`` and ``entity_text``; Wikidata (a KB alone) ``language``,
``ids``, ``instance_of`` and ``min_sitelinks``. See docs/DATA.md for the folder layout
each expects.
"""

from __future__ import annotations

from data_process.ingest.readers.common import (Converted, Dropped, RecordPolicy, find_span, split_rule_text,
                                                split_samples)
from data_process.ingest.readers.ghmfc import read_ghmfc
from data_process.ingest.readers.melbench import read_melbench
from data_process.ingest.readers.mimic import mimic_image_name, read_mimic
from data_process.ingest.readers.unified import read_unified
from data_process.ingest.readers.wikidata import read_wikidata
from data_process.ingest.readers.wikidiverse import read_wikidiverse
from data_process.ingest.readers.wikiperson import read_wikiperson

READERS = {
    "melbench": read_melbench,
    "mimic": read_mimic,
    "ghmfc": read_ghmfc,
    "wikidiverse": read_wikidiverse,
    "wikiperson": read_wikiperson,
    "unified": read_unified,
    "wikidata": read_wikidata,
}

__all__ = [
    "Converted",
    "Dropped",
    "READERS",
    "RecordPolicy",
    "find_span",
    "mimic_image_name",
    "read_melbench",
    "read_ghmfc",
    "read_mimic",
    "read_unified",
    "read_wikidata",
    "read_wikidiverse",
    "read_wikiperson",
    "split_rule_text",
    "split_samples",
]
