"""The typed configuration (issue 25): one default per setting, one source of a command's defaults, config.json of
both formats, renamed keys, and the feature views a configuration's model reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from data_process.core.settings import ConfigError, load_settings, settings_from_parser
from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.config import (FEATURE_VIEWS, DIMModelConfig, RerankConfig, TrainConfig, dim_config,
                              parse_train_args, train_config_of, views_read)
from nel_model.nel import DIMConfig
from nel_model.runs import RunError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BRANCH_POINT_RUNS = Path(__file__).resolve().parent / "fixtures" / "branch_point_runs"


def test_dim_mel_rerank_without_a_config_trains_what_configs_rerank_yaml_says():
    """The README's `dim-mel rerank --retriever R --output-dir O` and configs/rerank.yaml (docs/RERANK.md, the
    benchmark) are one configuration: the file holds the command's defaults."""
    parser = RerankConfig.build_parser()
    yaml = load_settings(CONFIGS / "rerank.yaml", settings_from_parser(parser))
    defaults = {a.dest: a.default for a in parser._actions}
    assert {k: defaults[k] for k in yaml} == yaml
    assert {"epochs", "patience", "lr", "hidden_size", "num_heads", "num_layers", "score_temperature"} <= set(yaml)
    plain = RerankConfig.parse(["--retriever", "R", "--output-dir", "O"])
    from_file = RerankConfig.parse(["--retriever", "R", "--output-dir", "O", "--config", str(CONFIGS / "rerank.yaml")])
    assert {k: v for k, v in plain.flat().items() if k != "config"} == \
        {k: v for k, v in from_file.flat().items() if k != "config"}
    assert (plain.optim.epochs, plain.optim.patience) == (6, 2)


def test_every_model_setting_has_the_models_default():
    """DIMConfig (the model, resolved values) and the training flags agree: the model built from the default
    configuration is DIMConfig's default model (the output size 0 = the text size, the residual base the mix)."""
    model_fields = {f.name: f.default for f in fields(DIMConfig)}
    for f in fields(DIMModelConfig):
        if f.name in model_fields:
            assert f.default == model_fields[f.name], f.name

    class FullCache:
        mention_views, entity_views = ("mention", "sentence", "context", "image", "regions", "profile"), \
            ("desc", "image", "profile")
        profile_rows, text_dim, image_dim = ("enrichment", "caption"), 32, 24

    assert dim_config(TrainConfig().model, FullCache()) == DIMConfig(text_dim=32, image_dim=24)
    assert DIMConfig(text_dim=32, image_dim=24).output_size == 32


def test_config_json_serialises_the_typed_configuration_and_reads_it_back(tmp_path):
    cfg = parse_train_args(["--config", str(CONFIGS / "dim_paper.yaml"), "--lr", "0.01", "--features", "F"])
    rec = cfg.record({"label": "x"})
    assert rec["format"] == 2 and rec["task"] == "dim" and rec["label"] == "x"
    assert rec["config"]["optim"]["lr"] == 0.01 and rec["config"]["loss"]["loss"] == "npair"
    back = train_config_of(json.loads(json.dumps(rec)))
    assert back == cfg and back.data.views == cfg.data.views and isinstance(back.data.views, tuple)
    rr = RerankConfig.parse(["--retriever", "R", "--output-dir", "O", "--hidden-size", "32"])
    assert train_config_of(json.loads(json.dumps(rr.record({"retriever_resolved": "/R"})))) == rr
    with pytest.raises(RunError, match="a 'dim' run, not one of dim-mel rerank"):
        RerankConfig.from_record(rec)


def test_a_renamed_key_or_flag_is_one_line_naming_the_new_one(tmp_path, capsys):
    old = tmp_path / "old_rerank.yaml"
    old.write_text("epochs: 3\nhidden: 64\n")
    with pytest.raises(ConfigError) as err:
        RerankConfig.parse(["--retriever", "R", "--output-dir", "O", "--config", str(old)])
    assert str(err.value) == f"{old}: hidden: renamed to hidden_size (write hidden_size: 64)"
    with pytest.raises(SystemExit) as ex:
        RerankConfig.parse(["--retriever", "R", "--output-dir", "O", "--heads", "2"])
    assert ex.value.code == 2 and "--heads is now --num-heads" in capsys.readouterr().err


def test_shipped_configs_list_exactly_the_views_their_model_reads():
    """A config's ``views`` (what dim-mel features --config encodes) is what its model reads; without the key the
    model reads every view (the default model, the feature step's default)."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name in ("enrich.yaml", "caption.yaml", "rerank.yaml", "rerank_llm.yaml"):     # other commands'
            continue
        cfg = parse_train_args(["--config", str(path)])
        assert views_read(cfg) == (cfg.data.views or FEATURE_VIEWS), path.name
    paper = parse_train_args(["--config", str(CONFIGS / "dim_paper.yaml")])
    assert "mention.context" not in views_read(paper) and "entity.image" not in views_read(paper)
    assert views_read(parse_train_args([])) == FEATURE_VIEWS
    assert "mention.context" in views_read(parse_train_args(["--config", str(CONFIGS / "dim_code.yaml")]))


def test_a_views_list_that_leaves_out_a_view_the_model_reads_is_a_warning_naming_them(capsys):
    parse_train_args(["--views", "mention.mention,mention.sentence,entity.desc"])
    assert "warning: --views leaves out mention.context, mention.image" in capsys.readouterr().err
    ok = parse_train_args(["--views", "mention.mention,mention.sentence,entity.desc", "--no-image", "--no-caption",
                           "--no-enrichment", "--no-entity-image", "--no-entity-profile", "--residual-base", "mention"])
    assert views_read(ok) == ("mention.mention", "mention.sentence", "entity.desc")
    assert "warning" not in capsys.readouterr().err
    paper = parse_train_args(["--config", str(CONFIGS / "dim_paper.yaml"), "--residual"])     # a switch over a list
    assert paper.model.residual and "leaves out mention.context" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_train_args(["--views", "mention.caption"])
    assert "unknown view 'mention.caption'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Run folders written by the branch point's code (flat config.json; tests/fixtures/branch_point_runs/make.sh)

@pytest.fixture()
def branch_point_runs(tmp_path):
    """The fixture's run folders, their feature cache rebuilt (the same seed) and their paths moved here."""
    runs = tmp_path / "runs"
    shutil.copytree(BRANCH_POINT_RUNS, runs)
    write_synthetic(runs / "ds", runs / "feat", num_entities=24, mentions_per_split=(96, 32, 32), seed=2,
                    signal="image")
    for path in runs.rglob("*.json*"):
        path.write_text(path.read_text().replace("/tmp/bp/runs", str(runs)))
    return runs


def _lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "train_s")}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_branch_point_run_evaluates_and_resumes_under_the_typed_configuration(branch_point_runs, capsys):
    from dim_mel import cli
    from nel_model.train import main as train_main

    runs = branch_point_runs
    old = json.loads((runs / "dim_stopped" / "config.json").read_text())
    assert "format" not in old and old["hidden_size"] == 16          # the flat file of the branch point
    finished = json.loads((runs / "dim_finished" / "results.json").read_text())
    assert cli.main(["evaluate", "--run", str(runs / "dim_finished"), "--split", "all", "--device", "cpu",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == finished["protocols"]
    flags = ["--config", str(CONFIGS / "synthetic.yaml"), "--features", str(runs / "feat"), "--epochs", "3",
             "--hidden-size", "16", "--num-heads", "2", "--ff-size", "32", "--batch-size", "16", "--patience", "0",
             "--threads", "1", "--output-dir", str(runs / "dim_stopped")]
    with pytest.raises(RunError, match=r"--lr 0.1 \(the run's: 0.002\)"):
        train_main(flags + ["--resume", "--lr", "0.1"])           # the typed check reads the flat file
    resumed = train_main(flags + ["--resume"])
    assert resumed["protocols"] == finished["protocols"] and resumed["best_epoch"] == finished["best_epoch"]
    assert _lines(runs / "dim_stopped") == _lines(runs / "dim_finished")
    conf = json.loads((runs / "dim_stopped" / "config.json").read_text())
    assert conf["format"] == 2 and conf["config"]["model"]["hidden_size"] == 16   # recorded in today's format


def test_a_branch_point_reranker_run_evaluates_and_resumes_under_its_new_flag_names(branch_point_runs, capsys):
    from dim_mel import cli
    from nel_model.rerank.train_feature import main as rerank_main

    runs = branch_point_runs
    assert json.loads((runs / "rerank_stopped" / "config.json").read_text())["hidden"] == 16
    finished = json.loads((runs / "rerank_finished" / "results.json").read_text())
    assert cli.main(["evaluate", "--run", str(runs / "rerank_finished"), "--split", "all", "--device", "cpu",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == finished["protocols"]
    flags = ["--retriever", str(runs / "dim_finished"), "--epochs", "3", "--hidden-size", "16", "--proj", "8",
             "--num-heads", "2", "--batch-size", "16", "--patience", "0", "--lr", "0.01", "--warmup-steps", "0",
             "--threads", "1", "--seed", "3", "--output-dir", str(runs / "rerank_stopped")]
    with pytest.raises(RunError, match=r"--hidden-size 32 \(the run's: 16\)"):
        rerank_main(flags[:-2] + ["--hidden-size", "32", "--output-dir", str(runs / "rerank_stopped"), "--resume"])
    assert rerank_main(flags + ["--resume"]) == 0
    resumed = json.loads((runs / "rerank_stopped" / "results.json").read_text())
    assert resumed["protocols"] == finished["protocols"] and resumed["best_epoch"] == finished["best_epoch"] == 3
    assert _lines(runs / "rerank_stopped") == _lines(runs / "rerank_finished")
