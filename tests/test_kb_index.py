"""KB index folders (nel_model.index): exact search with evaluation's tie rule, faiss kinds without padding, resume
after kill -9, two torchrun ranks = one process, add/remove = a rebuild, fingerprints, one writer.

Run as a script, this file is the worker the kill -9 and torchrun tests start:
``python tests/test_kb_index.py OUT [--slow S] [--dist] [--kind K]`` builds the test KB into OUT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ != "__main__":
    from tests.procs import sigkill

from data_process.core.locks import OutputLocked, output_lock
from nel_model.index import EntityBatch, HNSWParams, IndexMismatch, IVFPQParams, KBIndexFolder
from nel_model.index import approx
from nel_model.index.shards import SHARD_DIR

FP = {"checkpoint": "sha256:test", "encoders": ["text:test"]}
N, DIM, BATCH, SHARD = 600, 32, 25, 100


# ---------------------------------------------------------------------------------------------
# the test KB: vectors made per entity (a batch's vectors do not depend on how the KB is batched)


def unit_rows(seed: int, rows: np.ndarray, dim: int = DIM) -> np.ndarray:
    out = np.stack([np.random.default_rng([seed, int(r)]).standard_normal(dim) for r in rows]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def kb_ids(rows) -> list[str]:
    return [f"Q{int(r)}" for r in rows]


class KB:
    """Entity ``Q<r>``'s vector is ``unit_rows(seed, [r])``; batches of entity rows in any order; ``encode`` counts
    its calls (and sleeps ``slow`` s a batch: the kill -9 test catches a build mid-way)."""

    def __init__(self, seed: int = 0, dim: int = DIM, slow: float = 0.0, vectors=None):
        self.seed, self.dim, self.slow, self.vectors = seed, dim, slow, vectors
        self.calls: list[str] = []

    def batches(self, rows, size: int = BATCH):
        rows = list(rows)
        for a in range(0, len(rows), size):
            part = np.array(rows[a:a + size])
            yield EntityBatch(kb_ids(part), part)

    def vecs(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        return self.vectors[rows] if self.vectors is not None else unit_rows(self.seed, rows, self.dim)

    def __call__(self, batch: EntityBatch) -> np.ndarray:
        self.calls.append(batch.ids[0])
        if self.slow:
            time.sleep(self.slow)
        return self.vecs(batch.data)


def queries(n: int = 40, seed: int = 99, dim: int = DIM) -> np.ndarray:
    return unit_rows(seed, np.arange(n), dim)


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top k: float64 scores, higher first, ties by row (np.lexsort)."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.stack([np.lexsort((np.arange(x.shape[0]), -row))[:k] for row in s])
    return np.take_along_axis(s, order, 1), order


def dyadic_kb(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors with four entries of +-1/2: every inner product is an exact multiple of 1/4 under any
    summation order (exact ties, many of them; duplicates too)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for i in range(n):
        x[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


# ---------------------------------------------------------------------------------------------
# exact search


def test_flat_equals_brute_force_with_ties_in_kb_order(tmp_path):
    x = dyadic_kb(300, 16, seed=1)
    q = dyadic_kb(50, 16, seed=2)
    kb = KB(vectors=x)
    index = KBIndexFolder.build(tmp_path / "ix", kb.batches(range(300), size=7), kb, FP, shard_size=40)
    assert len(index.shards.shards) == 8                 # 7 shards of 42 rows and one of 6: ties cross shards
    scores, rows = index.search_rows(q, 25)
    ref_s, ref_rows = brute_force(q, x, 25)
    ties = sum(len(r) - len(set(np.round(s, 6))) for s, r in zip(scores, rows))
    assert ties > 200                                    # the check below is about ties
    np.testing.assert_array_equal(np.stack(rows), ref_rows)
    np.testing.assert_array_equal(np.stack(scores), ref_s.astype(np.float32))   # exact multiples of 1/4
    _, ids = index.search(q, 25)
    assert ids == [[f"Q{r}" for r in row] for row in ref_rows]
    assert index.entity_ids == kb_ids(range(300))


def test_float16_index_is_half_the_size_and_scores_its_rounded_vectors(tmp_path):
    kb = KB()
    f32 = KBIndexFolder.build(tmp_path / "f32", kb.batches(range(N)), kb, FP, shard_size=SHARD)
    f16 = KBIndexFolder.build(tmp_path / "f16", kb.batches(range(N)), kb, FP, shard_size=SHARD, dtype="float16")
    size = lambda ix: sum(p.stat().st_size for p in (ix.root / SHARD_DIR).glob("*.npy"))
    assert size(f16) < 0.52 * size(f32)
    q = queries()
    x16 = kb.vecs(np.arange(N)).astype(np.float16).astype(np.float32)
    scores, rows = f16.search_rows(q, 10)
    ref_s, ref_rows = brute_force(q, x16, 10)
    np.testing.assert_array_equal(np.stack(rows), ref_rows)
    np.testing.assert_allclose(np.stack(scores), ref_s, atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_k_larger_than_the_index_gives_every_entity_once(tmp_path, kind):
    kb = KB()
    index = KBIndexFolder.build(tmp_path / kind, kb.batches(range(12), size=5), kb, FP, kind=kind, shard_size=5)
    scores, ids = index.search(queries(3), 50)
    for s, i in zip(scores, ids):
        assert sorted(i) == sorted(kb_ids(range(12)))
        assert np.all(np.diff(s) <= 0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(queries(1), 0)


# ---------------------------------------------------------------------------------------------
# faiss kinds: no padding


def test_ivfpq_returns_no_padding_where_faiss_finds_fewer(tmp_path):
    kb = KB()
    index = KBIndexFolder.build(tmp_path / "ix", kb.batches(range(N)), kb, FP, kind="ivfpq", shard_size=SHARD,
                                params=IVFPQParams(nlist=16, nprobe=1))
    q = queries()
    raw = approx.candidates("ivfpq", index.index, index.params, q, 120, index.shards.removed)
    assert (raw == -1).any()                             # faiss pads: one cell holds fewer than the pool
    scores, rows = index.search_rows(q, 120)
    assert any(len(r) < 120 for r in rows)
    for s, r in zip(scores, rows):
        assert (r >= 0).all() and len(set(r.tolist())) == len(r)
        assert np.all(np.diff(s) <= 0)


def test_hnsw_filters_removed_entities_without_padding(tmp_path):
    kb = KB()
    index = KBIndexFolder.build(tmp_path / "ix", kb.batches(range(40), size=10), kb, FP, kind="hnsw",
                                shard_size=20)
    index.remove(kb_ids(range(0, 40, 2)))
    q = queries(5)
    raw = approx.candidates("hnsw", index.index, index.params, q, 30, index.shards.removed)
    assert (raw == -1).any()                             # 20 live entities, a pool of 30
    scores, ids = index.search(q, 30)
    for s, i in zip(scores, ids):
        assert sorted(i) == sorted(kb_ids(range(1, 40, 2)))
    np.testing.assert_allclose(scores[0], np.sort(kb.vecs(range(1, 40, 2)) @ q[0])[::-1], atol=1e-5)


def test_approximate_scores_are_exact_and_recall_is_recorded(tmp_path):
    kb = KB()
    q = queries()
    index = KBIndexFolder.build(tmp_path / "ix", kb.batches(range(N)), kb, FP, kind="ivfpq", shard_size=SHARD,
                                sample_queries=q)
    rec = index.manifest["recall"]
    assert rec["queries"] == len(q) and rec["entities"] == N
    assert 0.5 <= rec["recall@10"] <= 1.0 and 0 <= rec["recall@1"] <= 1.0
    assert index.manifest["faiss"]["params"]["nlist"] >= 1 and index.manifest["faiss"]["params"]["nprobe"] >= 1
    scores, rows = index.search_rows(q, 10)
    for i, (s, r) in enumerate(zip(scores, rows)):
        np.testing.assert_allclose(s, kb.vecs(r) @ q[i], atol=1e-5)
    no_q = KBIndexFolder.build(tmp_path / "h", kb.batches(range(N)), kb, FP, kind="hnsw", shard_size=SHARD)
    assert no_q.manifest["recall"]["queries"] == 0 and "not measured" in no_q.manifest["recall"]["note"]
    flat = KBIndexFolder.build(tmp_path / "f", kb.batches(range(N)), kb, FP, shard_size=SHARD, sample_queries=q)
    assert flat.manifest["recall"] is None


# ---------------------------------------------------------------------------------------------
# fingerprints, checks, one writer


def test_another_fingerprint_is_refused_with_one_line(tmp_path):
    kb = KB()
    KBIndexFolder.build(tmp_path / "ix", kb.batches(range(50)), kb, FP)
    assert len(KBIndexFolder.open(tmp_path / "ix", FP)) == 50
    with pytest.raises(IndexMismatch) as err:
        KBIndexFolder.open(tmp_path / "ix", {**FP, "checkpoint": "sha256:other"})
    assert "\n" not in str(err.value) and "sha256:other" in str(err.value) and str(tmp_path / "ix") in str(err.value)


def test_bad_input_is_refused(tmp_path):
    kb = KB()
    with pytest.raises(ValueError, match="'Q3' is given twice"):
        KBIndexFolder.build(tmp_path / "a", kb.batches([0, 1, 2, 3, 3]), kb, FP)
    with pytest.raises(ValueError, match="norm 2"):
        KBIndexFolder.build(tmp_path / "b", kb.batches(range(5)), lambda b: 2 * kb(b), FP)
    with pytest.raises(ValueError, match=r"batch starting at 'Q0': encode returned shape \[4, 32\], expected \[5, D\]"):
        KBIndexFolder.build(tmp_path / "c", kb.batches(range(5)), lambda b: kb(b)[:-1], FP)
    with pytest.raises(ValueError, match=r"shape \[2, 16\], expected \[2, 32\]"):
        KBIndexFolder.build(tmp_path / "c", kb.batches(range(4), size=2),
                            lambda b: kb(b) if b.ids[0] == "Q0" else unit_rows(0, b.data, 16), FP, overwrite=True)
    index = KBIndexFolder.build(tmp_path / "d", kb.batches(range(5)), kb, FP)
    with pytest.raises(ValueError, match="already there"):
        KBIndexFolder.build(tmp_path / "d", kb.batches(range(5)), kb, FP)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(kb.batches([4, 5]), kb)
    with pytest.raises(ValueError, match="not in the index: 'Q9'"):
        index.remove(["Q1", "Q9"])
    with pytest.raises(ValueError, match=r"queries must be \[N, 32\]"):
        index.search(np.zeros((2, 5), np.float32), 3)
    assert len(index) == 5                               # nothing half-done


def test_one_writer_per_index_folder(tmp_path):
    kb = KB()
    index = KBIndexFolder.build(tmp_path / "ix", kb.batches(range(20)), kb, FP)
    with output_lock(tmp_path / "ix"):
        with pytest.raises(OutputLocked):
            index.add(kb.batches([30]), kb)
        with pytest.raises(OutputLocked):
            KBIndexFolder.build(tmp_path / "ix", kb.batches(range(20)), kb, FP, overwrite=True)
    assert index.add(kb.batches([30]), kb) == 1


def test_an_unfinished_build_with_other_settings_is_refused(tmp_path):
    kb = KB()
    root = tmp_path / "ix"

    def stop(batch):
        if batch.ids[0] == "Q200":
            raise KeyboardInterrupt
        return kb(batch)

    with pytest.raises(KeyboardInterrupt):
        KBIndexFolder.build(root, kb.batches(range(N)), stop, FP, shard_size=SHARD)
    with pytest.raises(ValueError, match="unfinished index build"):
        KBIndexFolder.open(root, FP)
    with pytest.raises(ValueError, match=r"unfinished build with other settings \(dtype\)"):
        KBIndexFolder.build(root, kb.batches(range(N)), kb, FP, shard_size=SHARD, dtype="float16")
    index = KBIndexFolder.build(root, kb.batches(range(N)), kb, FP, shard_size=SHARD)
    assert len(index) == N


# ---------------------------------------------------------------------------------------------
# add / remove = a rebuild


def _final_rows():
    """Entities 0..399, then 400..519 added, with 17 of them (old and new) removed: the final KB in order."""
    removed = [3, 4, 5, 77, 150, 151, 299, 300, 399, 400, 401, 450, 519, 0, 250, 251, 252]
    return list(range(400)), list(range(400, 520)), removed, [r for r in range(520) if r not in set(removed)]


def _grown(tmp_path, kind, params=None):
    kb = KB()
    first, more, removed, final = _final_rows()
    index = KBIndexFolder.build(tmp_path / "grown", kb.batches(first), kb, FP, kind=kind, shard_size=SHARD,
                                params=params)
    index.remove(kb_ids(removed[:9]))
    assert index.add(kb.batches(more), kb) == len(more)
    index.remove(kb_ids(removed[9:]))
    reopened = KBIndexFolder.open(index.root, FP)
    assert reopened.entity_ids == kb_ids(final) == index.entity_ids
    return kb, index, reopened, final


def test_add_remove_equal_a_rebuild_flat(tmp_path):
    kb, _, grown, final = _grown(tmp_path, "flat")
    calls = len(kb.calls)
    rebuilt = KBIndexFolder.build(tmp_path / "rebuilt", kb.batches(final), kb, FP, shard_size=SHARD)
    assert calls == 400 // BATCH + 5                     # add encoded only the new entities (5 batches)
    q = queries()
    s1, i1 = grown.search(q, 30)
    s2, i2 = rebuilt.search(q, 30)
    assert i1 == i2
    np.testing.assert_allclose(np.stack(s1), np.stack(s2), atol=1e-6)
    assert grown.info()["removed"] == 17 and len(grown) == len(final)


def test_add_remove_equal_a_rebuild_ivfpq_with_the_same_quantiser(tmp_path):
    kb, grown_live, grown, final = _grown(tmp_path, "ivfpq", IVFPQParams(nlist=8, nprobe=2, pool=20))
    assert grown.index.ntotal == len(final)              # removed entities' codes are gone
    rebuilt = KBIndexFolder.build(tmp_path / "rebuilt", kb.batches(final), kb, FP, kind="ivfpq", shard_size=SHARD,
                                  trained_from=grown)
    assert rebuilt.manifest["faiss"]["trained_from"] == str(grown.root)
    q = queries()
    s1, i1 = grown.search(q, 10)
    s2, i2 = rebuilt.search(q, 10)
    assert i1 == i2 and i1 == grown_live.search(q, 10)[1]
    np.testing.assert_allclose(np.stack(s1), np.stack(s2), atol=1e-6)
    _, exact = grown.search(q, 10, exact=True)
    assert i1 != exact                                   # nprobe 2 of 8 cells: approximate, yet equal to the rebuild


def test_add_remove_equal_a_rebuild_hnsw_when_the_search_is_exhaustive(tmp_path):
    kb, _, grown, final = _grown(tmp_path, "hnsw", HNSWParams(m=8, ef_construction=40))
    rebuilt = KBIndexFolder.build(tmp_path / "rebuilt", kb.batches(final), kb, FP, kind="hnsw", shard_size=SHARD,
                                  params=HNSWParams(m=8, ef_construction=40))
    q = queries()
    s1, i1 = grown.search(q, 10, ef_search=600, pool=600)
    s2, i2 = rebuilt.search(q, 10, ef_search=600, pool=600)
    assert i1 == i2 == grown.search(q, 10, exact=True)[1]
    np.testing.assert_allclose(np.stack(s1), np.stack(s2), atol=1e-6)
    removed = set(kb_ids(_final_rows()[2]))
    assert not removed & {x for row in grown.search(q, 50)[1] for x in row}


# ---------------------------------------------------------------------------------------------
# resume after kill -9, two ranks = one process (worker processes: this file as a script)


def _worker(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _same_index(a: KBIndexFolder, b: KBIndexFolder) -> None:
    assert a.entity_ids == b.entity_ids
    assert [s.ids_sha256 for s in a.shards.shards] == [s.ids_sha256 for s in b.shards.shards]
    np.testing.assert_allclose(a.shards.gather(np.arange(len(a))), b.shards.gather(np.arange(len(b))), atol=1e-6)
    q = queries()
    assert a.search(q, 20)[1] == b.search(q, 20)[1]


def test_resume_after_kill_9_equals_an_uninterrupted_build(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_worker(str(out), "--slow", "0.1", "--log"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        written = [proc.stdout.readline() for _ in range(2)]     # the worker logs each shard it has written
    finally:
        sigkill(proc)
    assert all(line.startswith("shard ") for line in written), proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL
    done = len(list((out / SHARD_DIR).glob("*.json")))
    assert 2 <= done < N // SHARD and not (out / "manifest.json").exists()
    kb = KB()
    resumed = KBIndexFolder.build(out, kb.batches(range(N)), kb, FP, shard_size=SHARD)
    assert len(kb.calls) == (N - done * SHARD) // BATCH       # finished shards were verified, not encoded again
    assert resumed.manifest["build"]["skipped_shards"] == done
    fresh_kb = KB()
    fresh = KBIndexFolder.build(tmp_path / "fresh", fresh_kb.batches(range(N)), fresh_kb, FP, shard_size=SHARD)
    _same_index(resumed, fresh)


def test_a_corrupt_finished_shard_is_encoded_again(tmp_path):
    kb = KB()
    root = tmp_path / "ix"
    KBIndexFolder.build(root, kb.batches(range(N)), kb, FP, shard_size=SHARD)
    (root / "manifest.json").unlink()                    # as if the build had died before its manifest
    shard = root / SHARD_DIR / "00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = KB()
    index = KBIndexFolder.build(root, again.batches(range(N)), again, FP, shard_size=SHARD)
    assert again.calls == kb_ids(range(200, 300, BATCH))   # only shard 2's batches
    index.verify()


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path / "two"), "--dist", "--kind", "ivfpq"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = KBIndexFolder.open(tmp_path / "two", FP)
    assert two.manifest["build"]["processes"] == 2
    calls = {r: json.loads((tmp_path / f"two.calls{r}.json").read_text()) for r in (0, 1)}
    per_shard = SHARD // BATCH
    assert calls[0] == kb_ids([s * SHARD + b * BATCH for s in (0, 2, 4) for b in range(per_shard)])
    assert calls[1] == kb_ids([s * SHARD + b * BATCH for s in (1, 3, 5) for b in range(per_shard)])
    kb = KB()
    one = KBIndexFolder.build(tmp_path / "one", kb.batches(range(N)), kb, FP, shard_size=SHARD, kind="ivfpq")
    _same_index(two, one)


def _main(argv: list[str]) -> int:
    """The worker: build the test KB (N entities, shards of SHARD) into argv[0]."""
    import argparse

    from nel_model import distributed as D

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--dist", action="store_true")
    ap.add_argument("--kind", default="flat")
    ap.add_argument("--log", action="store_true", help="print a line as each shard is written")
    a = ap.parse_args(argv)
    info = D.setup("cpu") if a.dist else D.DistInfo()
    kb = KB(slow=a.slow)
    try:
        KBIndexFolder.build(a.out, kb.batches(range(N)), kb, FP, shard_size=SHARD, kind=a.kind, dist=info,
                            log=(lambda msg: print(msg, flush=True)) if a.log else None)
    finally:
        D.cleanup(info)
    if a.dist:
        (a.out.parent / f"{a.out.name}.calls{info.rank}.json").write_text(json.dumps(kb.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_a_matrix_index_gives_matrix_rows_never_padded_and_leaves_nothing_behind(kind, tmp_path, monkeypatch):
    """``matrix_index`` (evaluate / retrieve ``--faiss``): rows of the matrix, best first, exact scores for what it
    finds, no padding even when k exceeds what it finds; its temporary folder is gone afterwards."""
    import tempfile

    from nel_model.index import matrix_index

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = unit_rows(3, np.arange(300))
    q = x[:20] + 0.01 * unit_rows(4, np.arange(20))
    with matrix_index(x, kind) as index:
        scores, rows = index.search_rows(q, 10)
        assert all(len(r) == 10 and len(set(r.tolist())) == 10 for r in rows)
        assert [int(r[0]) for r in rows] == list(range(20))          # each query's own near-duplicate first
        np.testing.assert_allclose(np.stack(scores), np.take_along_axis(q @ x.T, np.stack(rows), 1), atol=1e-5)
        assert index.measure_recall(q, ks=(1,))["recall@1"] == 1.0
    assert list(tmp_path.iterdir()) == []
