"""``dim-mel COMMAND --help`` works for every command (argparse %-formats help strings: a bare '%' crashes it)."""

from __future__ import annotations

import sys
import warnings

import pytest

from dim_mel import cli


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_help_exits_0_with_its_usage(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))      # cli.main sets sys.argv for the module it runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # runpy: the module may be imported already
        code = cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("usage: ")
    assert "--help" in out


def test_top_level_usage_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_candidates_help_exits_0(capsys, monkeypatch):
    """``python -m data_process.ingest.candidates`` is no dim-mel command, but its --help must work too."""
    from data_process.ingest.candidates import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: ")
