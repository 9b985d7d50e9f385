"""Every ``--help`` reads as plain text: the module docstrings it shows are written for the docs (RST ``literals``),
and a terminal printed their double backticks verbatim."""

import pytest

from bft_megatron.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("argv", [[name] for name in SUBCOMMANDS] + [["convert", "import"], ["convert", "export"]])
def test_help_has_no_rst_markup(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: bft-megatron " + " ".join(argv))
    assert "``" not in text
