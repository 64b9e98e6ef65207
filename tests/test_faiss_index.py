import numpy as np
import pytest

from nel_model.evaluation.faiss_index import IndexSettings, KBIndex, ranks_from_topk, recall_vs_exact


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def kb():
    rng = np.random.default_rng(0)
    entities = _unit(rng.normal(size=(4000, 32)))
    queries = _unit(entities[:200] + 0.05 * rng.normal(size=(200, 32)))
    return entities, queries


def test_flat_index_is_exact(kb):
    entities, queries = kb
    index = KBIndex(entities, IndexSettings(kind="flat"))
    _, rows = index.search(queries, 5)
    exact = np.argsort(-(queries @ entities.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, exact)
    assert recall_vs_exact(index, queries, entities, k=5, chunk=64) == 1.0


def test_hnsw_recall_is_reported_and_high_for_near_duplicates(kb):
    entities, queries = kb
    index = KBIndex(entities, IndexSettings(kind="hnsw"))
    _, rows = index.search(queries, 20)
    ranks = ranks_from_topk(rows, np.arange(200))
    assert (ranks == 1).mean() > 0.95
    assert 0.5 < recall_vs_exact(index, queries, entities, k=20) <= 1.0


def test_ranks_from_topk_marks_misses_as_k_plus_one():
    rows = np.array([[3, 1, 2], [5, 6, 7]])
    np.testing.assert_array_equal(ranks_from_topk(rows, np.array([2, 9])), [3, 4])


def test_unknown_kind_is_rejected(kb):
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        KBIndex(kb[0], IndexSettings(kind="lsh"))


def test_recall_vs_exact_on_a_kb_smaller_than_k():
    rng = np.random.default_rng(1)
    entities = _unit(rng.normal(size=(8, 16)))
    index = KBIndex(entities, IndexSettings(kind="flat"))
    assert recall_vs_exact(index, entities[:3], entities, k=20) == 1.0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_never_pads_a_list_with_missing_entities(kind):
    """A k larger than the KB gives lists of the KB's size, every entry a real, distinct entity."""
    from nel_model.evaluation.faiss_index import missing_entries

    rng = np.random.default_rng(2)
    entities = _unit(rng.normal(size=(40, 16)))
    index = KBIndex(entities, IndexSettings(kind=kind, nlist=1))
    scores, rows = index.search(entities[:5], 50)
    assert rows.shape == (5, 40) and (rows >= 0).all() and all(len(set(r.tolist())) == 40 for r in rows)
    assert np.isfinite(scores).all() and missing_entries(rows) is None
    assert missing_entries(np.array([[3, 1], [2, -1]])) == (1, 1)
