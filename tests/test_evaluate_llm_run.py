"""`dim-mel evaluate` of a hand-damaged LLM re-ranker run folder: one error line naming the file and field, never a
traceback (issue 26 item 11)."""

from __future__ import annotations

import json
import shutil

import pytest

from dim_mel import cli
from fake_openai_server import FakeOpenAIServer
from nel_model.rerank import llm as L
from test_rerank_llm import _args, oracle
from test_rerank_llm import retriever_run  # noqa: F401  (the module-scoped retriever fixture)


@pytest.fixture(scope="module")
def llm_run(retriever_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("llm_eval") / "llm"
    with FakeOpenAIServer(responder=oracle(retriever_run["gold_name"])) as srv:
        assert L.main(_args(retriever_run["run"], out, srv, "--split", "test", "--top-k", "5")) == 0
    return out


@pytest.mark.parametrize("damage, field", [
    (lambda rr: rr.pop("model"), "two_stage.reranker.model"),
    (lambda rr: rr.update(k=None), "two_stage.reranker.k"),
    (lambda rr: rr.update(k="5"), "two_stage.reranker.k"),
    (lambda rr: rr.update(top_logprobs=[20]), "two_stage.reranker.top_logprobs"),
    (lambda rr: rr.update(vision="yes"), "two_stage.reranker.vision"),
])
def test_a_damaged_results_json_is_one_error_line(llm_run, tmp_path, capsys, damage, field):
    run = tmp_path / "llm"
    shutil.copytree(llm_run, run)
    res = json.loads((run / "results.json").read_text())
    damage(res["two_stage"]["reranker"])
    (run / "results.json").write_text(json.dumps(res))
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0].startswith(f"error: {run / 'results.json'}, field '{field}': must be ")


def test_the_undamaged_run_evaluates_from_its_cache(llm_run, capsys):
    assert cli.main(["evaluate", "--run", str(llm_run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((llm_run / "results.json").read_text())["protocols"]


@pytest.mark.parametrize("damage", [lambda s: s[:-1], lambda s: s + [0.0]])
def test_cached_scores_of_the_wrong_length_are_one_error_line(llm_run, tmp_path, capsys, damage):
    run = tmp_path / "llm"
    shutil.copytree(llm_run, run)
    cache = run / "rerank_llm_cache.jsonl"
    lines = cache.read_text(encoding="utf-8").splitlines()
    ok = [i for i, line in enumerate(lines) if json.loads(line).get("status") == "ok"]
    assert ok, "the fixture run has answered prompts"
    rec = json.loads(lines[ok[0]])
    rec["scores"] = damage(rec["scores"])
    lines[ok[0]] = json.dumps(rec)
    cache.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"error: {cache}") and "scores" in first and f"{rec['k']} numbers" in first
