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


def test_values_print_as_yaml_spells_them(capsys):
    import yaml

    assert main([CONFIG, "train.bf16", "train.bf16=false"]) == 0
    assert capsys.readouterr().out == "false\n"
    assert main([CONFIG, "model.rope_scaling", "model.rope_scaling.factor=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["factor"] == 4.0
    assert main([CONFIG, "data.train", "data.train=[a.jsonl,b.jsonl:0.5]"]) == 0
    sources = yaml.safe_load(capsys.readouterr().out)
    assert [(s["path"], s["weight"]) for s in sources] == [("a.jsonl", 1.0), ("b.jsonl", 0.5)]
