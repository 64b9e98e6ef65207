"""One loaded run (nel_model.loaded_run): the KB's embeddings that training saves are read back only when they
match the checkpoint and the feature cache, encoded once otherwise, and the numbers stay results.json's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_process.core.locks import output_lock
from dim_mel import cli
from nel_model.evaluation.evaluate import open_run
from nel_model.nel import DIM
from nel_model.runs import (ENTITY_EMBEDDINGS_FILE, ENTITY_EMBEDDINGS_META, RETRIEVAL_DIR, RunError, load_checkpoint,
                            save_checkpoint)
from run_fixtures import trained_run

E = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("loaded_run"), entities=E, splits=(64, 32, 32), seed=8, epochs=2)


@pytest.fixture()
def encoded(monkeypatch):
    """The KB rows the model encodes (every call of ``DIM.encode_entities``)."""
    rows: list[int] = []
    real = DIM.encode_entities

    def counting(self, views, normalize=True):
        rows.append(len(next(iter(views.values()))))
        return real(self, views, normalize)

    monkeypatch.setattr(DIM, "encode_entities", counting)
    return rows


def test_evaluation_reads_the_kb_embeddings_training_saved_and_measures_results_json(run, encoded, capsys):
    record = json.loads((run / ENTITY_EMBEDDINGS_META).read_text())
    assert record["checkpoint"] == "best" and record["dtype"] == "float32" and record["shape"][0] == E
    assert set(record["entity_views"]) >= {"entity.desc"}
    assert cli.main(["evaluate", "--run", str(run), "--split", "all", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((run / "results.json").read_text())["protocols"]
    assert sum(encoded) == 0                                   # the KB was read, not encoded again
    r = open_run(run, "cpu")
    assert torch.equal(r.entity_emb, torch.from_numpy(np.load(run / ENTITY_EMBEDDINGS_FILE)))


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_a_saved_copy_of_another_checkpoint_is_not_read_and_is_replaced(run, tmp_path, encoded):
    copy = _copy(run, tmp_path)
    best = copy / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(best)
    gen = torch.Generator().manual_seed(0)
    for k, v in ckpt["model"].items():                         # another model under the same name
        if v.is_floating_point() and v.dim() == 2:
            ckpt["model"][k] = v + 0.5 * torch.randn(v.shape, generator=gen)
    save_checkpoint(best, ckpt)
    r = open_run(copy, "cpu")
    saved = torch.from_numpy(np.load(copy / ENTITY_EMBEDDINGS_FILE))
    emb = r.entity_emb
    assert sum(encoded) == E and not torch.allclose(emb, saved)
    # saved for the next command, with the new checkpoint's hash: read back, not encoded
    assert json.loads((copy / ENTITY_EMBEDDINGS_META).read_text())["checkpoint_sha256"] == r.checkpoint_sha256
    encoded.clear()
    assert torch.equal(open_run(copy, "cpu").entity_emb, emb) and sum(encoded) == 0


@pytest.mark.parametrize("damage", ["array", "record", "cache"])
def test_a_damaged_or_stale_copy_is_encoded_again(run, tmp_path, encoded, damage):
    copy = _copy(run, tmp_path)
    first = open_run(copy, "cpu")
    want = first.entity_emb.clone()
    encoded.clear()
    features = None
    if damage == "array":                                      # bytes changed after the record was written
        raw = bytearray((copy / ENTITY_EMBEDDINGS_FILE).read_bytes())
        raw[-8:] = b"\x00" * 8
        (copy / ENTITY_EMBEDDINGS_FILE).write_bytes(bytes(raw))
    elif damage == "record":
        (copy / ENTITY_EMBEDDINGS_META).write_text("{not json")
    else:                                                      # the feature cache's entity view is another one now
        features = tmp_path / "feat"
        shutil.copytree(first.data.root, features)
        meta = json.loads((features / "meta.json").read_text())
        meta["views"]["entity.desc"]["files"]["entity.desc.npy"]["sha256"] = "0" * 64
        (features / "meta.json").write_text(json.dumps(meta))
    r = open_run(copy, "cpu", features=features)
    assert torch.allclose(r.entity_emb, want) and sum(encoded) == E


def test_the_saved_copy_is_written_only_by_the_holder_of_the_runs_lock(run, tmp_path, encoded):
    copy = _copy(run, tmp_path)
    (copy / ENTITY_EMBEDDINGS_META).unlink()
    with output_lock(copy):                                    # a training or another command writes the run
        open_run(copy, "cpu").entity_emb
    assert not (copy / ENTITY_EMBEDDINGS_META).exists() and sum(encoded) == E
    open_run(copy, "cpu").entity_emb
    assert (copy / ENTITY_EMBEDDINGS_META).exists() and sum(encoded) == 2 * E


def test_retrieved_lists_with_an_entity_twice_are_refused_not_a_traceback(run, tmp_path, capsys):
    """Issue 26 item 5: lists padded with copies of the last entity (older `retrieve --faiss` with K > KB)."""
    from nel_model.inference.retrieve import retrieve

    copy = _copy(run, tmp_path)
    retrieve(copy, ("train", "dev", "test"), 5)
    path = copy / RETRIEVAL_DIR / "dev.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[2]["top"][-1] = [lines[2]["top"][-2][0], -3.4e38]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RunError, match=rf"dev.jsonl, line 3 \(mention .*\), field 'top': entity .* is listed twice"):
        open_run(copy, "cpu").lists("dev")
    assert cli.main(["rerank", "--retriever", str(copy), "--output-dir", str(tmp_path / "rr"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is listed twice" in err.splitlines()[0]
