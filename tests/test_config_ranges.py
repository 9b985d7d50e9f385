"""Range checks of numeric config fields, empty YAML sections, and HF config.json nulls.

Every value here used to pass validation (or fail with a TypeError / "must not be null") and reach megatron, torch
or the training loop: a non-finite optimizer setting, a zero collective timeout, a negative init std, ...
"""

import json

import pytest

from bft_megatron.config import ConfigError, load_config
from bft_megatron.config.hf import model_fields_from_hf

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}


def test_an_empty_yaml_section_means_all_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\nloss:\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(str(path), ["loss.gamma=2"])
    assert cfg.train == type(cfg.train)() and cfg.loss.gamma == 2.0 and cfg.model.hidden_size == 64
    # An optional section left empty stays off (rope_scaling: null = no scaling), as documented.
    path.write_text("model:\n  rope_scaling:\n")
    assert load_config(str(path)).model.rope_scaling is None


def test_hf_null_num_key_value_heads_means_multi_head_attention(tmp_path):
    fields = model_fields_from_hf({**LLAMA, "num_key_value_heads": None})
    assert fields["num_query_groups"] == 4  # transformers: None = num_attention_heads
    # Other optional keys written as null take the same default as when they are absent.
    nulls = model_fields_from_hf({**LLAMA, "max_position_embeddings": None, "rope_theta": None,
                                  "rms_norm_eps": None, "tie_word_embeddings": None, "rope_scaling": None})
    assert nulls == model_fields_from_hf(LLAMA)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_key_value_heads": None}))
    assert load_config(None, [f"model.from_hf={tmp_path}"]).model.kv_groups == 4


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "vocab_size"])
def test_hf_required_keys_missing_or_null_are_config_errors(key):
    with pytest.raises(ConfigError, match=rf"model.from_hf: config.json has no {key} \(or it is null\)"):
        model_fields_from_hf({**LLAMA, key: None})
    with pytest.raises(ConfigError, match=rf"model.from_hf: config.json has no {key}"):
        model_fields_from_hf({k: v for k, v in LLAMA.items() if k != key})
