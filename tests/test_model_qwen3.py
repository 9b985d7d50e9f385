"""Qwen3 (dense) support: its config.json, validation, the planner's counts, the checkpoint architecture check and
the synthesised export config. Logits against transformers at TP1/TP2/PP2 and the bit-identical export round trip
are in test_convert_e2e (case ``qwen3_untied``); TP2 and TP2+SP training against TP1 in test_train_parallel."""

from __future__ import annotations

import logging

import pytest

from bft_megatron.checkpoint.architecture import architecture_changes, check_architecture
from bft_megatron.config import ConfigError, load_config, to_dict
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.plan import flops_per_token, layer_params, total_params
from bft_megatron.config.schema import ModelConfig
from bft_megatron.config.validate import validate
from tests.data_fixtures import logged
from tests.launch import TINY

# Qwen/Qwen3-32B's config.json (architecture keys), as published
QWEN3_32B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
             "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 25600,
             "max_position_embeddings": 40960, "max_window_layers": 64, "num_attention_heads": 64,
             "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
             "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False,
             "vocab_size": 151936}
QWEN3 = ["model.family=qwen3", "model.qk_norm=true", "model.head_dim=32"]


def test_a_qwen3_config_json_reads_head_dim_and_query_key_norms():
    fields = model_fields_from_hf(QWEN3_32B)
    assert fields["family"] == "qwen3" and fields["qk_norm"] is True and fields["qkv_bias"] is False
    assert fields["head_dim"] == 128  # 64 heads x 128 = 8192 query channels, wider than hidden 5120
    m = ModelConfig(**fields)
    assert (m.kv_channels, m.query_size, m.qkv_size) == (128, 8192, 8192 + 2 * 8 * 128)
    llama = model_fields_from_hf({**QWEN3_32B, "architectures": ["LlamaForCausalLM"], "head_dim": 80})
    assert llama["head_dim"] is None and llama["qk_norm"] is False  # head_dim = hidden/heads is left unset


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true (Qwen3 with biases on its q/k/v/o projections) is not supported"),
    ({"head_dim": 127}, "head_dim=127 is not a positive even number"),
    ({"use_sliding_window": True, "sliding_window": 4096,
      "layer_types": ["full_attention"] * 63 + ["sliding_attention"]},
     "use_sliding_window=true with layer_types naming 1 sliding_attention layer(s) (first: 63) is not supported"),
])
def test_unsupported_qwen3_configs_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_fields_from_hf({**QWEN3_32B, **change})


@pytest.mark.parametrize("overrides, message", [
    (["model.family=qwen3"], "model.qk_norm=false with model.family=qwen3: .* set model.qk_norm=true"),
    (["model.qk_norm=true"], "model.qk_norm=true with model.family=llama: .* use model.family=qwen3"),
    (QWEN3 + ["model.qkv_bias=true"], "model.qkv_bias=true with model.family=qwen3: HF Qwen3's attention_bias"),
    (QWEN3[:2] + ["model.head_dim=31"], "model.head_dim must be a positive even number or null"),
    (QWEN3[:2] + ["model.head_dim=0"], "model.head_dim must be a positive even number or null"),
])
def test_inconsistent_qwen3_fields_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, TINY + overrides), world_size=1, require_te=False)


def test_head_dim_lifts_the_hidden_size_divisibility():
    validate(load_config(None, TINY + QWEN3 + ["model.hidden_size=72"]), world_size=1, require_te=False)
    with pytest.raises(ValueError, match="model.hidden_size=72 must be divisible by .* \\(or set model.head_dim\\)"):
        validate(load_config(None, TINY + ["model.hidden_size=72", "model.num_attention_heads=5",
                                           "model.num_query_groups=1"]), world_size=1, require_te=False)


def test_planner_counts_match_transformers_and_the_published_size():
    """The planner's parameter count equals transformers' own Qwen3 model's, head norms included; at 32B it is
    the published 32.8B."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = dict(QWEN3_32B, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=300)
    model = Qwen3ForCausalLM(Qwen3Config(**hf))
    m = ModelConfig(**model_fields_from_hf(hf))
    assert total_params(m) == sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert layer_params(m) == layer
    assert total_params(ModelConfig(**model_fields_from_hf(QWEN3_32B))) / 1e9 == pytest.approx(32.76, abs=0.01)


def test_flops_count_the_query_width_not_the_hidden_size():
    """Megatron-LM's count: QKV and the output projection at the query width heads*head_dim, attention scores over
    the query width (causal half)."""
    m = ModelConfig(**model_fields_from_hf(QWEN3_32B))
    h, q, kv, f, seq = 5120, 8192, 1024, 25600, 4096
    dense = h * (q + 2 * kv) + q * h + 3 * h * f
    want = 3 * (2 * 64 * (dense + seq * q) + 2 * h * 151936)  # the vocabulary is 1187 x 128: no padding
    assert flops_per_token(m, seq) == want


def test_checkpoints_from_before_the_fields_compare_as_the_defaults():
    """head_dim and qk_norm were added later: a checkpoint without them was built with neither (no 'unchecked'
    info), and a Qwen3 config against such a Llama checkpoint is refused naming the field."""
    common = {"config": to_dict(load_config(None, TINY)), "train_state": {"iteration": 2}}
    del common["config"]["model"]["head_dim"], common["config"]["model"]["qk_norm"]
    errors, _, unchecked = architecture_changes(common["config"]["model"], to_dict(load_config(None, TINY).model))
    assert not errors and not unchecked
    with logged(logging.INFO) as records:
        check_architecture(common, load_config(None, TINY + ["model.head_dim=16"]), "old", finetune=True)
    assert not records  # head_dim 16 = 64/4: the same model
    with pytest.raises(ConfigError) as err:
        check_architecture(common, load_config(None, TINY + QWEN3), "old", finetune=True)
    for line in ("model.family: checkpoint llama, config qwen3", "model.head_dim: checkpoint 16, config 32",
                 "model.qk_norm: checkpoint false, config true"):
        assert line in str(err.value)


def test_a_synthesised_export_config_loads_as_qwen3_and_reads_back_the_same():
    from transformers import Qwen3Config

    from bft_megatron.convert.hf_config import _synthesised_config

    m = ModelConfig(**model_fields_from_hf(QWEN3_32B))
    config = _synthesised_config(m)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 128
    hf = Qwen3Config(**config)
    assert hf.head_dim == 128 and hf.attention_bias is False
    back = ModelConfig(**model_fields_from_hf(hf.to_dict()))
    assert back == m


def test_a_qwen3_config_json_is_read_as_transformers_reads_it(tmp_path):
    """What transformers' Qwen3Config makes of keys config.json leaves out: head_dim 128 (not hidden/heads) and 32
    key/value heads; and layer_types, which it takes over max_window_layers."""
    import json

    from transformers import AutoConfig

    def both(hf):
        with open(tmp_path / "config.json", "w", encoding="utf-8") as fh:
            json.dump({"model_type": "qwen3", **hf}, fh)
        return AutoConfig.from_pretrained(str(tmp_path)), ModelConfig(**model_fields_from_hf(hf))

    small = dict(QWEN3_32B, hidden_size=1024, num_attention_heads=16)  # hidden/heads = 64
    del small["head_dim"], small["num_key_value_heads"]
    theirs, ours = both(small)
    assert (ours.kv_channels, ours.kv_groups) == (theirs.head_dim, theirs.num_key_value_heads) == (128, 32)
    # a window in every layer of an explicit list (max_window_layers = all layers would say none) is refused
    slid = dict(QWEN3_32B, use_sliding_window=True, sliding_window=4096, layer_types=["sliding_attention"] * 64)
    assert both(dict(slid, layer_types=None))[0].layer_types.count("sliding_attention") == 0
    with pytest.raises(ConfigError, match="layer_types naming 64 sliding_attention layer"):
        model_fields_from_hf(slid)
    # the list without a window (use_sliding_window false) attends globally: accepted
    assert model_fields_from_hf(dict(slid, use_sliding_window=False))["family"] == "qwen3"


def test_an_explicit_head_dim_equal_to_config_jsons_null_is_not_a_difference(tmp_path):
    """Qwen3-8B's config.json head_dim 128 = 4096/32 reads as null; a recipe that spells out head_dim: 128 names
    the same model: no 'explicit model fields differ' warning (one for another width)."""
    import dataclasses
    import json

    from bft_megatron.config.hf import merge_hf_config

    with open(tmp_path / "config.json", "w", encoding="utf-8") as fh:
        json.dump(dict(QWEN3_32B, hidden_size=4096, num_attention_heads=32), fh)
    for head_dim, warned in ((128, False), (64, True)):
        with logged(logging.WARNING) as records:
            merged = merge_hf_config(ModelConfig(from_hf=str(tmp_path), head_dim=head_dim), explicit={"head_dim"})
        assert merged.kv_channels == head_dim and bool(records) == warned, [r.getMessage() for r in records]
        assert dataclasses.replace(merged, head_dim=None).kv_channels == 128
