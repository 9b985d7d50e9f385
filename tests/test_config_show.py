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
    ([CONFIG, "train.lrr"], "config has no field 'train.lrr' (no 'lrr'; did you mean 'lr'?)"),
    ([CONFIG, "train.lr.x"], "config has no field 'train.lr.x' (no 'x')"),  # below a value: nothing to suggest
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


def test_null_model_fields_take_from_hf_values(tmp_path):
    """A recipe's explicit shape fields win over model.from_hf; `model.X=null` on the command line unsets one so
    that config.json's value applies (it used to fail: 'model.hidden_size must not be null'). Nullable fields keep
    null's meaning, and without from_hf a null is still an error."""
    import json

    from bft_megatron.config import ConfigError, load_config

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cpu.yaml")

    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 3000, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    nulls = [f"model.{k}=null" for k in ("hidden_size", "num_layers", "ffn_hidden_size", "rope_theta", "norm_epsilon")]
    m = load_config(demo, [f"model.from_hf={tmp_path}", *nulls, "model.num_query_groups=null"]).model
    assert (m.hidden_size, m.num_layers, m.ffn_hidden_size, m.rope_theta, m.norm_epsilon) == (64, 2, 176, 5e5, 1e-6)
    assert m.num_query_groups is None and m.num_attention_heads == 4  # nullable: null = MHA, as written
    assert load_config(demo, [f"model.from_hf={tmp_path}"]).model.hidden_size == 128  # YAML wins
    with pytest.raises(ConfigError, match="model.hidden_size must not be null"):
        load_config(demo, ["model.hidden_size=null"])
