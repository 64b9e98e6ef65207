"""One typed configuration (issue 17): the YAML loader, the flag style, and how training flags go together."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_process.core.settings import (ConfigError, Setting, ToolkitParser, add_bool, check_settings, load_settings,
                                        settings_from_parser)
from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.config import TrainConfig, parse_train_args as parse_args


def build_parser():
    return TrainConfig.build_parser()

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_config_value_is_overridden_by_either_form_of_a_boolean_flag():
    paper = str(CONFIGS / "dim_paper.yaml")
    assert parse_args(["--config", paper]).model.residual is False
    assert parse_args(["--config", paper, "--residual"]).model.residual is True
    assert parse_args(["--config", paper, "--residual", "--no-residual"]).model.residual is False
    assert parse_args(["--config", paper]).model.shared_attention is True
    assert parse_args(["--config", paper, "--no-shared-attention"]).model.shared_attention is False


def test_dashes_and_underscores_are_one_flag():
    dashed = parse_args(["--batch-size", "7", "--no-entity-image", "--select-by", "full_kb:hits@1"])
    under = parse_args(["--batch_size", "7", "--no_entity_image", "--select_by", "full_kb:hits@1"])
    assert (dashed.optim.batch_size, dashed.model.entity_image, dashed.optim.select_by) == (7, False, "full_kb:hits@1")
    assert dashed == under
    assert "--batch-size" in build_parser().format_help() and "--batch_size" not in build_parser().format_help()


@pytest.mark.parametrize("text, key, problem", [
    ("batch_size: 3.7\n", "batch_size", "expected an integer, got 3.7"),
    ("epochs: [1, 2]\n", "epochs", "expected an integer, got [1, 2]"),
    ("lr: fast\n", "lr", "expected a number, got 'fast'"),
    ("residual: 1\n", "residual", "expected true or false, got 1"),
    ("loss: hinge\n", "loss", "invalid value 'hinge' (choose from triplet, infonce, npair)"),
    ("batchsize: 64\n", "batchsize", "unknown key; did you mean 'batch_size'?"),
    ("no_residual: true\n", "no_residual", "unknown key; did you mean 'residual'?"),
])
def test_a_bad_training_config_names_file_key_and_what_is_allowed(tmp_path, text, key, problem):
    cfg = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(cfg)])
    assert str(err.value) == f"{cfg}: {key}: {problem}"


def test_yaml_off_reads_as_the_choice_it_spells_and_a_repeated_key_is_an_error(tmp_path):
    assert parse_args(["--config", str(write(tmp_path / "a.yaml", "amp: off\n"))]).optim.amp == "off"
    cfg = write(tmp_path / "twice.yaml", "lr: 0.1\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: lr: repeated key \(line 2\)"):
        parse_args(["--config", str(cfg)])


def test_dataset_configs_hold_only_what_differs_from_the_base(tmp_path):
    base = load_settings(CONFIGS / "base.yaml", settings_from_parser(build_parser()))
    for name in ("wiki", "rich", "diverse", "person"):
        assert load_settings(CONFIGS / f"{name}.yaml", settings_from_parser(build_parser())) == base
    assert base["epochs"] == 300 and base["lr"] == 5e-5
    paper = parse_args(["--config", str(CONFIGS / "dim_paper.yaml")])
    assert (paper.optim.epochs, paper.loss.loss, paper.optim.patience) == (300, "npair", 0)    # base value, own value, override
    write(tmp_path / "a.yaml", "base: b.yaml\nlr: 0.5\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: the base files form a loop"):
        parse_args(["--config", str(tmp_path / "a.yaml")])


def test_every_shipped_training_config_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name in ("enrich.yaml", "caption.yaml", "rerank.yaml", "rerank_llm.yaml"):     # other commands'
            continue
        parse_args(["--config", str(path)])


def test_a_flag_without_effect_warns_and_only_when_given(capsys):
    parse_args(["--loss", "infonce", "--margin", "0.3", "--hard-negative-pool", "5"])
    err = capsys.readouterr().err
    assert "warning: --margin has no effect with --loss infonce" in err
    assert "warning: --hard-negative-pool has no effect without --hard-negatives" in err
    parse_args(["--loss", "infonce"])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--no-image", "--regions"], "--no-image contradicts --regions"),
])
def test_contradictory_flags_are_an_error(capsys, argv, message):
    with pytest.raises(SystemExit) as ex:
        parse_args(argv)
    assert ex.value.code == 2 and message in capsys.readouterr().err


def test_an_explicit_residual_with_another_output_size_is_an_error(tmp_path, capsys):
    from nel_model import distributed as D
    from nel_model.training.engine import Engine
    from nel_model.training.loop import RetrieverTask

    write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=12, mentions_per_split=(16, 8, 8), seed=1)
    base = ["--features", str(tmp_path / "feat"), "--output-dir", str(tmp_path / "run"), "--output-size", "16",
            "--hidden-size", "16", "--num-heads", "2"]
    with pytest.raises(ValueError, match="--residual contradicts --output-size 16 differs from the text feature size"):
        Engine(parse_args(base + ["--residual"]), RetrieverTask, D.DistInfo())
    engine = Engine(parse_args(base), RetrieverTask, D.DistInfo())
    assert not engine.task.model_cfg.is_residual
    assert "warning: no residual (zero-shot) start: --output-size 16 differs" in capsys.readouterr().err


def test_the_schema_checker_on_its_own():
    schema = {"n": Setting(int), "x": Setting(float, nullable=True), "mode": Setting(str, ("a", "b"))}
    assert check_settings("f.yaml", {"n": 3, "x": 2, "mode": "b"}, schema) == {"n": 3, "x": 2.0, "mode": "b"}
    assert check_settings("f.yaml", {"x": None}, schema) == {"x": None}
    with pytest.raises(ConfigError, match=r"^f.yaml: n: expected an integer, got True$"):
        check_settings("f.yaml", {"n": True}, schema)
    p = ToolkitParser(prog="t")
    add_bool(p, "flag_x", False, "x")
    assert p.parse_args(["--flag-x"]).flag_x and not p.parse_args(["--no_flag_x"]).flag_x


@pytest.mark.parametrize("command, argv", [
    ("nel_model.train", ["--features", "F", "--output-dir", "O"]),
    ("data_process.augment.enrich", ["--data", "D", "--out", "O"]),
    ("data_process.augment.caption", ["--data", "D", "--out", "O"]),
    ("nel_model.rerank.train_feature", ["--retriever", "R", "--output-dir", "O"]),
    ("nel_model.rerank.llm", ["--retriever", "R", "--out", "O", "--model", "m"]),
])
def test_every_yaml_the_toolkit_reads_rejects_an_unknown_key_naming_file_and_key(tmp_path, command, argv):
    import importlib

    cfg = write(tmp_path / "c.yaml", "bogus_key: 1\n")
    main = importlib.import_module(command).main
    with pytest.raises(ConfigError) as err:
        main(["--config", str(cfg), *argv])
    assert str(err.value).startswith(f"{cfg}: bogus_key: unknown key")
