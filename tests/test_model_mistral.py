"""Mistral (``MistralForCausalLM``: Mistral-7B v0.1-v0.3, BioMistral, Mistral-Nemo): its config.json, the sliding
window the trainer can honour only by fitting rows into it, the checkpoint architecture check and the synthesised
export config. Logits against transformers at TP1/TP2/PP2 and the bit-identical export round trip are in
test_convert_e2e (case ``mistral_untied``)."""

from __future__ import annotations

import pytest

from bft_megatron.checkpoint.architecture import architecture_changes
from bft_megatron.config import load_config, to_dict
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.schema import ModelConfig
from bft_megatron.config.validate import validate
from tests.launch import TINY

# mistralai/Mistral-7B-v0.1's config.json (BioMistral-7B's base), architecture keys as published
MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                  "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                  "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000}
# mistralai/Mistral-Nemo-Base-2407: no window, 32 heads of 128 over hidden 5120
NEMO = dict(MISTRAL_7B_V01, hidden_size=5120, head_dim=128, num_hidden_layers=40, sliding_window=None,
            rope_theta=1000000.0, vocab_size=131072, max_position_embeddings=1024000)
MISTRAL = ["model.family=mistral", "model.sliding_window=32"]


def test_mistral_config_json_reads_its_window_and_head_width():
    v01 = model_fields_from_hf(MISTRAL_7B_V01)
    assert (v01["family"], v01["sliding_window"], v01["head_dim"], v01["qkv_bias"]) == ("mistral", 4096, None, False)
    nemo = ModelConfig(**model_fields_from_hf(NEMO))
    assert nemo.sliding_window is None and (nemo.kv_channels, nemo.query_size) == (128, 4096)
    # what MistralConfig makes of absent keys: a 4096-token window and 8 key/value heads
    bare = {k: v for k, v in MISTRAL_7B_V01.items() if k not in ("sliding_window", "num_key_value_heads")}
    assert (model_fields_from_hf(bare)["sliding_window"], model_fields_from_hf(bare)["num_query_groups"]) == (4096, 8)


def test_rows_longer_than_the_window_are_refused():
    """The trainer attends over whole samples: equal to Mistral's window only while a row fits in it."""
    validate(load_config(None, TINY + MISTRAL), world_size=1, require_te=False)  # TINY rows: 32 tokens
    with pytest.raises(ValueError, match="data.seq_length=32 exceeds model.sliding_window=16: the model attends to "
                                         "the last 16 tokens only.* set data.seq_length <= 16"):
        validate(load_config(None, TINY + ["model.family=mistral", "model.sliding_window=16"]), world_size=1,
                 require_te=False)


@pytest.mark.parametrize("overrides, message", [
    (["model.sliding_window=4096"],
     "model.sliding_window=4096 with model.family=llama: only Mistral's, Phi3's and Gemma3's"),
    (["model.family=qwen2", "model.qkv_bias=true", "model.sliding_window=64"], "with model.family=qwen2: only"),
    (["model.family=mistral", "model.sliding_window=0"], "model.sliding_window=0 with model.family=mistral"),
    (MISTRAL + ["model.qkv_bias=true"], "model.qkv_bias=true with model.family=mistral: HF Mistral's attention has "
                                        "no biases"),
    (MISTRAL + ["model.qk_norm=true"], "model.qk_norm=true with model.family=mistral"),
])
def test_inconsistent_mistral_fields_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, TINY + overrides), world_size=1, require_te=False)


def test_the_window_is_part_of_the_architecture_check():
    saved = to_dict(load_config(None, TINY + MISTRAL).model)
    errors, _, _ = architecture_changes(saved, to_dict(load_config(None, TINY + ["model.family=mistral"]).model))
    assert "model.sliding_window: checkpoint 32, config null" in errors


def test_a_synthesised_export_config_keeps_the_window_as_transformers_reads_it():
    from transformers import MistralConfig

    from bft_megatron.convert.hf_config import _synthesised_config

    for hf in (MISTRAL_7B_V01, NEMO):
        m = ModelConfig(**model_fields_from_hf(hf))
        config = _synthesised_config(m)
        assert config["architectures"] == ["MistralForCausalLM"]
        assert MistralConfig(**config).sliding_window == hf["sliding_window"]  # a null window written, not dropped
        assert ModelConfig(**model_fields_from_hf(config)) == m
