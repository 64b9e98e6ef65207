"""``dim-mel index``: a KB encoded by a trained run into an index folder that ``dim-mel link --index`` and
``dim-mel serve --index`` link against (``nel_model.index``; layout in ``docs/CONTRACTS.md``, "KB index folders").

::

    dim-mel index --run RUN --out INDEX                       # the run's own KB (its feature cache's vectors)
    dim-mel index --run RUN --kb KB --out INDEX [--kind flat|ivfpq|hnsw] [--dtype float32|float16]
    torchrun --nproc-per-node 4 -m nel_model.inference.kb_index --run RUN --kb KB --out INDEX   # ranks share shards
    dim-mel index --run RUN --out INDEX --add MORE.jsonl     # new entities, nothing else encoded or retrained
    dim-mel index --run RUN --out INDEX --remove IDS.txt     # one id a line
    dim-mel index --out INDEX --info

* ``--kb``: a unified dataset folder (``entities.jsonl``, images named inside it: ``dim-mel prepare``, a KB-only
  one from ``--format wikidata`` included), read as a stream. Each entity is encoded as the run's feature step and
  model encode the KB (``LoadedRun.encode_entity_records``): an entity without an image gets the zero-and-mask
  treatment of the feature cache. Without ``--kb``: the run's own KB, the vectors its evaluation scores
  (``LoadedRun.entity_emb``), so a ``flat`` index gives ``dim-mel evaluate``'s ranks.
* The index is fingerprinted to the run (its checkpoint's SHA-256, the encoders and their text lengths, the
  embedding size): opening it with another run is refused. A pairwise run (MIMIC) has no entity vectors: refused.
* Resumable: a rerun after a kill (kill -9 included) verifies the finished shards and encodes the rest; the same
  shards result. Under ``torchrun`` each rank encodes every ``world_size``-th shard; rank 0 writes the manifest.
* The approximate kinds measure their recall@1/10 against exact search on up to ``--recall-queries`` of the run's
  dev mentions (the run's own encodings), recorded in the manifest and printed.
* ``INDEX/entities.jsonl`` keeps each entity's name and description (``nel_model.index.texts``).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from data_process.core.entry import run_main
from data_process.core.records import ENTITIES_FILE, Entity, entity_from_dict, iter_records, read_id_lines
from data_process.core.settings import ToolkitParser, add_bool
from nel_model import distributed as D
from nel_model.evaluation.evaluate import open_run
from nel_model.index import DEFAULT_APPROX_KIND, INDEX_KINDS, EntityBatch, HNSWParams, IVFPQParams, KBIndexFolder
from nel_model.index.folder import DEFAULT_SHARD_SIZE
from nel_model.index.shards import DTYPES
from nel_model.index.texts import add_entity_texts
from nel_model.loaded_run import LoadedRun

BATCH = 256                    # entities encoded together
RECALL_QUERIES = 1000          # dev mentions the approximate kinds' recall is measured on


def record_batches(entities: Iterable[Entity], size: int) -> Iterator[EntityBatch]:
    """Entity records in batches of ``size``, KB order (an :class:`EntityBatch` carries the records)."""
    it = iter(entities)
    while block := list(itertools.islice(it, size)):
        yield EntityBatch([e.id for e in block], block)


def record_encoder(run: LoadedRun, image_root: Path):
    """``encode(batch)`` of records: the run's feature step and model (``LoadedRun.encode_entity_records``)."""
    return lambda batch: run.encode_entity_records(batch.data, image_root).cpu().numpy()


def own_kb(run: LoadedRun, size: int) -> tuple[Iterator[EntityBatch], Any]:
    """The run's own KB: batches of its rows and an ``encode`` that takes them from its evaluation's vectors."""
    ids = list(run.data.entity_ids)
    batches = (EntityBatch(ids[s:s + size], np.arange(s, min(s + size, len(ids)))) for s in range(0, len(ids), size))
    return batches, lambda batch: run.entity_emb[batch.data].cpu().numpy()


def own_records(run: LoadedRun) -> Iterator[Entity]:
    """The run's KB records, in its order (names for ``entities.jsonl``)."""
    for eid in run.data.entity_ids:
        yield run.entity(eid) or Entity(id=eid, name="")


def kb_records(kb: Path) -> Iterator[Entity]:
    """The entities of a unified dataset folder, streamed (a bad record: one error naming file, line, field)."""
    path = kb / ENTITIES_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (--kb is a unified dataset folder: dim-mel prepare)")
    return iter_records(path, entity_from_dict)


def sample_queries(run: LoadedRun, n: int) -> np.ndarray | None:
    """Up to ``n`` of the run's dev mentions (test when it has no dev split), evenly spaced, as the run encodes
    them: the queries the approximate kinds' recall is measured on."""
    rows = run.data.splits.get("dev")
    if rows is None or not len(rows):
        rows = run.data.splits.get("test")
    if n <= 0 or rows is None or not len(rows):
        return None
    pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(np.int64))]
    return run.mention_embeddings(pick).cpu().numpy()


def search_params(a) -> IVFPQParams | HNSWParams | None:
    """The approximate kind's parameters with ``--nprobe`` / ``--ef-search`` (recorded in the manifest, used by every
    search of the index); ``None``: the kind's defaults."""
    if a.nprobe is not None and a.kind != "ivfpq" or a.ef_search is not None and a.kind != "hnsw":
        raise ValueError(f"--nprobe is for --kind ivfpq and --ef-search for --kind hnsw (not --kind {a.kind})")
    for flag, value in (("--nprobe", a.nprobe), ("--ef-search", a.ef_search)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if a.nprobe is not None:
        return IVFPQParams(nprobe=a.nprobe)
    return HNSWParams(ef_search=a.ef_search) if a.ef_search is not None else None


def build_parser():
    p = ToolkitParser(prog="dim-mel index", description="Encode a KB with a trained run into an index folder "
                      "(dim-mel link --index); add or remove entities without re-encoding the rest.")
    p.add_argument("--out", required=True, type=Path, help="the index folder")
    p.add_argument("--run", type=Path, help="the trained (bi-encoder) run whose encoders and model encode the KB")
    p.add_argument("--kb", type=Path, help="a unified dataset folder (default: the run's own KB)")
    p.add_argument("--kind", choices=INDEX_KINDS, default="flat",
                   help=f"flat: exact; ivfpq, hnsw: approximate (the default approximate kind: {DEFAULT_APPROX_KIND})")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the shards' vectors (float16: half the disk)")
    p.add_argument("--nprobe", type=int, default=None, help=f"ivfpq: cells a search visits (default "
                   f"{IVFPQParams.nprobe}; 512 at 10M entities: bench/results/index_scale_10m_ivfpq_cpu.md)")
    p.add_argument("--ef-search", type=int, default=None, help=f"hnsw: the search's breadth (default {HNSWParams.ef_search})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="entities a shard")
    p.add_argument("--batch-size", type=int, default=BATCH, help="entities encoded together")
    p.add_argument("--recall-queries", type=int, default=RECALL_QUERIES,
                   help="dev mentions the approximate kinds' recall is measured on (0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished index at --out")
    g = p.add_argument_group("change an index (instead of building one)")
    g.add_argument("--add", type=Path, help="a JSON Lines file of entities (unified format) to add")
    g.add_argument("--image-root", type=Path, help="folder --add's image names are read from (default: its folder)")
    g.add_argument("--remove", type=Path, help="a file of entity ids to drop, one a line")
    g.add_argument("--info", action="store_true", help="print the index's manifest summary and stop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    add_bool(p, "progress", True, "a line per shard written")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if sum(x is not None and x is not False for x in (a.add, a.remove, a.info or None)) > 1:
        p.error("give one of --add, --remove, --info")
    if a.info:
        print(json.dumps(KBIndexFolder.open(a.out, None).info(), indent=1))
        return 0
    if a.run is None:
        p.error("--run is required (except with --info)")
    if a.batch_size < 1 or a.shard_size < 1:
        p.error("--batch-size and --shard-size must be at least 1")
    t0 = time.time()
    if a.remove is not None:
        index = KBIndexFolder.open(a.out, open_run(a.run, a.device, a.checkpoint).index_fingerprint())
        n = index.remove(text for _, text in read_id_lines(a.remove))
        print(f"removed {n} entities: {len(index)} in {a.out}", file=sys.stderr)
        return 0
    if a.add is not None:
        run = open_run(a.run, a.device, a.checkpoint)
        index = KBIndexFolder.open(a.out, run.index_fingerprint())
        if not a.add.is_file():
            raise ValueError(f"{a.add}: not found (--add takes a JSON Lines file of entities)")
        root = a.image_root or a.add.parent
        add_entity_texts(a.out, iter_records(a.add, entity_from_dict))      # names first: never an id without one
        n = index.add(record_batches(iter_records(a.add, entity_from_dict), a.batch_size), record_encoder(run, root))
        print(f"added {n} entities in {time.time() - t0:.1f} s: {len(index)} in {a.out}", file=sys.stderr)
        return 0
    info = D.setup(a.device)
    try:
        run = open_run(a.run, info.device if info.enabled else a.device, a.checkpoint)
        fp = run.index_fingerprint()
        if a.kb is None:
            batches, encode = own_kb(run, a.batch_size)
            records = own_records
        else:
            batches = record_batches(kb_records(a.kb), a.batch_size)
            encode, records = record_encoder(run, a.kb), (lambda _run: kb_records(a.kb))
        queries = sample_queries(run, a.recall_queries) if a.kind != "flat" and info.is_main else None
        index = KBIndexFolder.build(a.out, batches, encode, fp, kind=a.kind, dtype=a.dtype, params=search_params(a),
                                    sample_queries=queries,
                                    shard_size=a.shard_size, dist=info, overwrite=a.overwrite,
                                    log=lambda m: print(m, file=sys.stderr) if a.progress else None)
        if index is None:                       # a rank other than 0: its shards are written
            return 0
        add_entity_texts(a.out, records(run))
        summary = index.info()
        print(f"indexed {summary['entities']} entities ({summary['kind']}, {summary['dtype']}, "
              f"{summary['shards']} shards, {summary['disk_bytes'] / 2**20:.1f} MiB) in {time.time() - t0:.1f} s: "
              f"{a.out}" + (f"; recall {summary['recall']}" if summary.get("recall") else ""), file=sys.stderr)
        return 0
    finally:
        D.cleanup(info)


if __name__ == "__main__":
    run_main(main)
