"""``dim-mel index`` (nel_model.inference.kb_index) and linking against an index (``Linker(index=)``, ``dim-mel link
--index``): the run's own KB as an index links as ``link`` does; a KB's records encode to the run's own vectors;
``--add``/``--remove`` equal a rebuild; an index of another run, a pairwise run and a missing folder are refused with
one error line; a re-ranker re-orders an index's lists. The library's resume after kill -9 and torchrun ranks are
``tests/test_kb_index.py``'s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_process.core.records import ENTITIES_FILE, load_dataset
from nel_model.index import IndexMismatch, KBIndexFolder
from nel_model.index.texts import read_entity_texts
from nel_model.inference import kb_index
from nel_model.inference.linker import Linker
from nel_model.linking import Query
from nel_model.loaded_run import LoadedRun
from nel_model.runs import RunError
from test_predict import demo  # noqa: F401  (the module-scoped demo run fixture)

pytestmark = pytest.mark.slow     # trains the demo run of test_predict

ROOT = Path(__file__).resolve().parents[1]


def _queries(demo, split: str = "test") -> list[Query]:
    ds = load_dataset(demo["data"])
    return [Query(m.sentence, m.mention, image=ds.image_path(m.image), id=m.id, gold_id=m.gold_id)
            for m in ds.split(split)]


def _kb_folder(demo, folder: Path, keep) -> Path:
    """A unified KB folder holding the demo's entities that ``keep(i, entity)`` selects (images through a link to
    the demo's image folder, as a dataset's image source may be)."""
    folder.mkdir(parents=True)
    lines = [x for i, x in enumerate((demo["data"] / ENTITIES_FILE).read_text().splitlines())
             if keep(i, json.loads(x))]
    (folder / ENTITIES_FILE).write_text("\n".join(lines) + "\n")
    (folder / "images").symlink_to(demo["data"] / "images")
    return folder


@pytest.fixture(scope="module")
def own_index(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "index"
    assert kb_index.main(["--run", str(demo["run"]), "--out", str(out), "--shard-size", "10"]) == 0
    return out


def test_the_runs_own_kb_as_an_index_links_as_link_does(demo, own_index):
    qs = _queries(demo)
    plain = Linker(demo["retriever"]).link_many(qs, top_k=5)
    indexed = Linker.from_run(demo["run"], index=own_index).link_many(qs, top_k=5)
    assert [[e.entity_id for e in r.entities] for r in indexed] == [[e.entity_id for e in r.entities] for r in plain]
    assert [[e.name for e in r.entities] for r in indexed] == [[e.name for e in r.entities] for r in plain]
    np.testing.assert_allclose([[e.score for e in r.entities] for r in indexed],
                               [[e.score for e in r.entities] for r in plain], atol=1e-5)
    # the gold's place: the list's, where the list holds it (an index ranks no further than the list)
    assert [r.gold_rank for r in indexed] == [p.gold_rank if p.gold_rank is not None and p.gold_rank <= 5 else None
                                              for p in plain]
    assert sum(r.gold_rank == 1 for r in indexed) > len(qs) / 2          # the trained run finds most golds


def test_dim_mel_link_index_writes_the_apis_lines_and_records_the_index(demo, own_index, tmp_path):
    ds = load_dataset(demo["data"])
    ments = ds.split("test")[:6]
    (tmp_path / "imgs").mkdir()
    lines = []
    for m in ments:
        rec = {"id": m.id, "sentence": m.sentence, "mention": m.mention}
        if m.image:
            shutil.copy(ds.image_path(m.image), tmp_path / "imgs" / Path(m.image).name)
            rec["image"] = f"imgs/{Path(m.image).name}"
        lines.append(json.dumps(rec))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def link(out: str, *flags: str) -> list[dict]:
        proc = subprocess.run([sys.executable, "-m", "dim_mel", "link", "--run", str(demo["run"]), "--input",
                               str(tmp_path / "in.jsonl"), "--out", str(tmp_path / out), "--top-k", "3", *flags],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(x) for x in (tmp_path / out).read_text().splitlines()]

    with_index, without = link("a.jsonl", "--index", str(own_index)), link("b.jsonl")
    assert [[e["entity_id"] for e in r["entities"]] for r in with_index] == \
        [[e["entity_id"] for e in r["entities"]] for r in without]
    assert with_index[0]["provenance"]["kb"] != without[0]["provenance"]["kb"]       # what the lines came from
    proc = subprocess.run([sys.executable, "-m", "dim_mel", "link", "--run", str(demo["run"]), "--input",
                           str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "c.jsonl"), "--index",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'nowhere'}: not an index folder (no manifest.json)" in proc.stderr


def test_a_kbs_records_encode_to_the_runs_own_vectors(demo, own_index, tmp_path):
    out = tmp_path / "index"
    assert kb_index.main(["--run", str(demo["run"]), "--kb", str(demo["data"]), "--out", str(out)]) == 0
    from_records, own = KBIndexFolder.open(out, None), KBIndexFolder.open(own_index, None)
    assert from_records.entity_ids == own.entity_ids == list(demo["retriever"].data.entity_ids)
    a = np.concatenate([from_records.shards.open_shard(i) for i in range(len(from_records.shards.shards))])
    b = demo["retriever"].entity_emb.numpy()
    np.testing.assert_allclose(a, b, atol=2e-3)          # the feature step's float16 views, encoded again
    names = {e.id: e.name for e in load_dataset(demo["data"]).entities}
    assert {k: v[0] for k, v in read_entity_texts(out).items()} == names
    # an entity without an image: its image view is zeros with the mask off, as in the feature cache
    ent = next(e for e in load_dataset(demo["data"]).entities if e.images)
    views = demo["retriever"].entity_views([ent.__class__(id="X1", name=ent.name, description=ent.description)],
                                           demo["data"])
    assert not views["image_mask"].any() and not views["image"].any()


def test_an_index_is_never_written_into_a_folder_that_is_not_one(demo, tmp_path):
    """A dataset folder given as --out (even with --overwrite) is refused and left as it was; so is a folder holding
    only an entities.jsonl."""
    kb = _kb_folder(demo, tmp_path / "kb", lambda i, e: True)
    before = (kb / ENTITIES_FILE).read_bytes()
    for flags in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="a folder with other files, not an index folder"):
            kb_index.main(["--run", str(demo["run"]), "--kb", str(kb), "--out", str(kb), *flags])
    assert (kb / ENTITIES_FILE).read_bytes() == before
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(kb / ENTITIES_FILE, alone / ENTITIES_FILE)
    with pytest.raises(ValueError, match="entities.jsonl without shards"):
        kb_index.main(["--run", str(demo["run"]), "--out", str(alone), "--overwrite"])
    assert (alone / ENTITIES_FILE).read_bytes() == before


def test_add_and_remove_equal_a_rebuild(demo, tmp_path):
    run, q = demo["run"], demo["retriever"].mention_embeddings(demo["retriever"].data.splits["test"]).numpy()
    n = demo["retriever"].data.num_entities
    full = _kb_folder(demo, tmp_path / "kb_full", lambda i, e: True)
    first = _kb_folder(demo, tmp_path / "kb_first", lambda i, e: i < n - 8)
    rest = [x for i, x in enumerate((full / ENTITIES_FILE).read_text().splitlines()) if i >= n - 8]
    (full / "more.jsonl").write_text("\n".join(rest) + "\n")
    for name, kb in (("full", full), ("grown", first)):
        assert kb_index.main(["--run", str(run), "--kb", str(kb), "--out", str(tmp_path / name), "--shard-size",
                              "7"]) == 0
    assert kb_index.main(["--run", str(run), "--out", str(tmp_path / "grown"), "--add", str(full / "more.jsonl")]) == 0
    rebuilt, grown = KBIndexFolder.open(tmp_path / "full", None), KBIndexFolder.open(tmp_path / "grown", None)
    assert grown.entity_ids == rebuilt.entity_ids and len(grown) == n
    (sa, ia), (sb, ib) = grown.search(q, 5), rebuilt.search(q, 5)
    assert ia == ib
    np.testing.assert_allclose(np.array(sa), np.array(sb), atol=1e-6)
    assert set(read_entity_texts(tmp_path / "grown")) == set(rebuilt.entity_ids)
    # remove: equal to an index built without those entities
    gone = rebuilt.entity_ids[3:7]
    (tmp_path / "gone.txt").write_text("# ids to drop\n" + "\n".join(gone) + "\n")
    assert kb_index.main(["--run", str(run), "--out", str(tmp_path / "full"), "--remove",
                          str(tmp_path / "gone.txt")]) == 0
    without = _kb_folder(demo, tmp_path / "kb_without", lambda i, e: e["id"] not in gone)
    assert kb_index.main(["--run", str(run), "--kb", str(without), "--out", str(tmp_path / "smaller")]) == 0
    shrunk, smaller = KBIndexFolder.open(tmp_path / "full", None), KBIndexFolder.open(tmp_path / "smaller", None)
    assert shrunk.entity_ids == smaller.entity_ids and len(shrunk) == n - 4
    (sa, ia), (sb, ib) = shrunk.search(q, 5), smaller.search(q, 5)
    assert ia == ib and not set(gone) & {x for row in ia for x in row}
    np.testing.assert_allclose(np.array(sa), np.array(sb), atol=1e-6)


def test_an_index_of_another_run_or_of_a_pairwise_run_is_refused(demo, tmp_path):
    out = tmp_path / "index"
    assert kb_index.main(["--run", str(demo["run"]), "--out", str(out), "--checkpoint", "last"]) == 0
    with pytest.raises(IndexMismatch, match="build an index with this run"):
        Linker.from_run(demo["run"], index=out)                      # the best checkpoint: another fingerprint
    with pytest.raises(RunError, match="a pairwise run .MIMIC. scores each .mention, entity. pair and has no entity "
                                       "vectors to index"):
        LoadedRun.index_fingerprint(SimpleNamespace(pairwise=True, run=Path("runs/mimic")))


class Reverse:
    """A re-ranker that reverses the first ``top_k`` candidates."""

    kind, top_k = "reverse", 3

    def score(self, lists):
        return torch.tensor([[float(j) for j in range(self.top_k)] for _ in lists.mentions])

    def info(self):
        return {"kind": self.kind, "top_k": self.top_k}


def test_a_reranker_reorders_an_indexs_lists(demo, own_index):
    qs = _queries(demo)[:4]
    plain = Linker.from_run(demo["run"], index=own_index).link_many(qs, top_k=5)
    reranked = Linker.from_run(demo["run"], reranker=Reverse(), index=own_index).link_many(qs, top_k=5)
    for p, r in zip(plain, reranked):
        ids = [e.entity_id for e in p.entities]
        assert [e.entity_id for e in r.entities] == ids[:3][::-1] + ids[3:]
        assert [e.stage for e in r.entities] == ["reranker"] * 3 + ["retriever"] * 2


def test_nprobe_is_recorded_and_used_and_misplaced_flags_are_refused(demo, tmp_path):
    out = tmp_path / "index"
    assert kb_index.main(["--run", str(demo["run"]), "--out", str(out), "--kind", "ivfpq", "--nprobe", "3"]) == 0
    index = KBIndexFolder.open(out, None)
    params = index.manifest["faiss"]["params"]
    assert params["nprobe"] == 3 and index.manifest["recall"]["search"]["nprobe"] == min(3, params["nlist"])
    with pytest.raises(ValueError, match="--nprobe is for --kind ivfpq and --ef-search for --kind hnsw"):
        kb_index.main(["--run", str(demo["run"]), "--out", str(tmp_path / "other"), "--nprobe", "3"])
