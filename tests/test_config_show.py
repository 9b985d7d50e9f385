"""``python -m bft_megatron.config.show CONFIG FIELD [overrides]``: what the launch scripts read from a config
(slurm.sbatch takes ``checkpoint.save`` from it: an unset value must print as an empty line, not ``None``)."""

from __future__ import annotations

import os

import pytest

from bft_megatron.config.show import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def test_prints_the_field_after_every_override(capsys):
    assert main([CONFIG, "checkpoint.save", "checkpoint.save=/tmp/a", "parallel.tp=1"]) == 0
    assert capsys.readouterr().out == "/tmp/a\n"
    assert main([CONFIG, "parallel.tp", "checkpoint.save=/tmp/a", "parallel.tp=2"]) == 0
    assert capsys.readouterr().out == "2\n"


def test_unset_value_prints_an_empty_line(capsys):
    assert main([CONFIG, "checkpoint.save", "checkpoint.save=null"]) == 0
    assert capsys.readouterr().out == "\n"


@pytest.mark.parametrize("argv, message", [
    ([CONFIG, "checkpoint.nosuch"], "config has no field 'checkpoint.nosuch' (no 'nosuch')"),
    ([CONFIG], "usage: python -m bft_megatron.config.show CONFIG FIELD"),
])
def test_bad_arguments_are_a_usage_error(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
