"""Phi3 (``Phi3ForCausalLM``: microsoft/phi-4, Phi-3-mini/medium 4k): its config.json read with Phi3Config's defaults,
its longrope scaling and partial rotary read (su / yarn as longrope, as transformers does), other RoPE scaling refused
by name, the fused HF tensors (``qkv_proj``,
``gate_up_proj``) in the name table and the tensor transforms, and the synthesised export config. Logits against
transformers at TP1/TP2/PP2, the bit-identical export round trip and loading the export in transformers are in
test_convert_e2e (cases ``phi3_untied``, ``phi3_tied``); fine-tuning and exporting at TP2 in test_convert_finetune."""

from __future__ import annotations

import pytest
import torch

from bft_megatron.config import ConfigError, load_config
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.schema import ModelConfig
from bft_megatron.config.validate import validate
from bft_megatron.convert.mapping import FUSED_FAMILIES, global_rules, layer_rules, rule_by_megatron_name
from bft_megatron.convert.qkv import merge_gate_up, merge_qkv
from bft_megatron.convert.tensors import to_hf, to_megatron
from tests.launch import TINY

# microsoft/phi-4's config.json (architecture keys), as published
PHI4 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "vocab_size": 100352, "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
        "rope_theta": 250000, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "sliding_window": None,
        "rope_scaling": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}
# microsoft/Phi-3-mini-4k-instruct: MHA, a 2047-token window
PHI3_MINI_4K = dict(PHI4, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                    original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=2047)
# microsoft/Phi-3.5-mini-instruct's rope_scaling (factors shortened): 128k context by longrope
LONGROPE = {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}
PHI3 = ["model.family=phi3"]


def test_phi4_config_json_reads_as_llama_shaped_fields():
    fields = model_fields_from_hf(PHI4)
    assert (fields["family"], fields["num_query_groups"], fields["norm_epsilon"], fields["rope_theta"]) == \
        ("phi3", 10, 1e-5, 250000.0)
    assert (fields["head_dim"], fields["qkv_bias"], fields["qk_norm"], fields["sliding_window"]) == \
        (None, False, False, None)
    assert ModelConfig(**fields).kv_channels == 128
    assert model_fields_from_hf(PHI3_MINI_4K)["sliding_window"] == 2047


def test_absent_keys_read_as_phi3config_defaults():
    """What transformers' Phi3Config makes of keys config.json lacks: MHA, eps 1e-5, theta 1e4, untied, no window."""
    from transformers import Phi3Config

    absent = ("num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "sliding_window")
    bare = {k: v for k, v in PHI4.items() if k not in absent}
    fields, ref = model_fields_from_hf(bare), Phi3Config(**bare)
    assert fields["num_query_groups"] == ref.num_key_value_heads == 40
    assert fields["norm_epsilon"] == ref.rms_norm_eps == 1e-5
    assert fields["rope_theta"] == ref.rope_parameters["rope_theta"] == 10000.0
    assert fields["tie_embeddings"] is ref.tie_word_embeddings is False
    assert fields["sliding_window"] is ref.sliding_window is None


@pytest.mark.parametrize("change, partial, longrope", [
    ({"partial_rotary_factor": 0.75}, 0.75, False),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, 0.5, False),
    ({"rope_scaling": LONGROPE}, 1.0, True),
    ({"rope_scaling": dict(LONGROPE, type="su")}, 1.0, True),  # Phi3Config's old names for longrope
    ({"rope_scaling": dict(LONGROPE, type="yarn")}, 1.0, True),
    ({"rope_parameters": dict(LONGROPE, rope_type="longrope", rope_theta=1e4)}, 1.0, True),
])
def test_partial_rotary_and_longrope_are_read(change, partial, longrope):
    """(Their semantics against transformers: tests/test_rope_longrope.py.)"""
    fields = model_fields_from_hf({**PHI4, **change})
    assert fields["partial_rotary_factor"] == partial
    assert (fields["rope_scaling"] is not None and fields["rope_scaling"].rope_type == "longrope") is longrope


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}},
     "rope_scaling with rope_type='llama3' is not supported for Phi3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_what_phi3_computes_beyond_llama_is_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message.replace("config.json: ", "model.from_hf: ")):
        model_fields_from_hf({**PHI4, **change})


def test_a_partial_rotary_factor_of_one_and_bias_keys_are_the_llama_function():
    """Phi3 builds no biases whatever attention_bias says (transformers ignores the key), so it is no error."""
    from transformers import Phi3Config, Phi3ForCausalLM

    fields = model_fields_from_hf({**PHI4, "partial_rotary_factor": 1.0, "attention_bias": True})
    assert fields["qkv_bias"] is False
    tiny = Phi3ForCausalLM(Phi3Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=32, pad_token_id=None, attention_bias=True))
    assert not [n for n, _ in tiny.named_parameters() if n.endswith("bias")]


@pytest.mark.parametrize("overrides, message", [
    (PHI3 + ["model.qkv_bias=true"], "model.qkv_bias=true with model.family=phi3: HF Phi3's attention has no biases"),
    (PHI3 + ["model.qk_norm=true"], "model.qk_norm=true with model.family=phi3"),
    (PHI3 + ["model.rope_scaling.factor=8.0", "model.rope_scaling.low_freq_factor=1.0",
             "model.rope_scaling.high_freq_factor=4.0", "model.rope_scaling.original_max_position_embeddings=32"],
     "model.rope_scaling.rope_type=llama3 with model.family=phi3: HF Phi3 has only longrope scaling"),
    (PHI3 + ["model.sliding_window=0"], "model.sliding_window=0 with model.family=phi3"),
])
def test_inconsistent_phi3_fields_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, TINY + overrides), world_size=1, require_te=False)


def test_a_phi3_config_with_a_window_over_or_under_its_rows_validates():
    """Under the rows (16 < 32) the trainer applies it (tests/test_model_window_logits.py has Phi3's logits)."""
    for window in (32, 16):
        validate(load_config(None, TINY + PHI3 + [f"model.sliding_window={window}"]), world_size=1, require_te=False)


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(family="phi3", hidden_size=16, num_layers=2, num_attention_heads=4,
                                 num_query_groups=2, ffn_hidden_size=24, vocab_size=40), **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_the_name_table_is_phi3s_state_dict(tied):
    """The HF names the rules read and write are exactly Phi3ForCausalLM's parameters (fused, no q/k/v/gate/up)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from bft_megatron.convert.hf_config import _synthesised_config

    m = _tiny(tie_embeddings=tied)
    assert m.family in FUSED_FAMILIES
    names = {n for r in global_rules(tied) for n in r.hf_names()}
    names |= {n for i in range(m.num_layers) for r in layer_rules(m.qkv_bias, m.qk_norm, True) for n in r.hf_names(i)}
    model = Phi3ForCausalLM(Phi3Config(**_synthesised_config(m)))
    # tied: lm_head.weight is the embedding's (save_pretrained writes no such tensor)
    assert names == set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert rule_by_megatron_name("mlp.linear_fc1.weight", "te", False, False, True).hf == \
        ("model.layers.{i}.mlp.gate_up_proj.weight",)


def test_fused_tensors_split_by_rows_in_phi3s_order():
    """qkv_proj rows are [q (heads*d); k (groups*d); v (groups*d)], gate_up_proj rows [gate; up] (Phi3MLP's
    chunk(2)): to_megatron gives what the unfused Llama rules give for those parts, to_hf inverts it at TP1/TP2."""
    m = _tiny()
    fused = {r.local: r for r in layer_rules(False, False, True)}
    q, k, v = torch.randn(16, 16), torch.randn(8, 16), torch.randn(8, 16)
    qkv = to_megatron(fused["self_attention.linear_qkv.weight"], {"model.layers.1.self_attn.qkv_proj.weight":
                      torch.cat((q, k, v))}.__getitem__, m, 1, 64)
    assert torch.equal(qkv, merge_qkv(q, k, v, 4, 2, 4))
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    fc1_rule = fused["mlp.linear_fc1.weight"]
    fc1 = to_megatron(fc1_rule, {"model.layers.1.mlp.gate_up_proj.weight": torch.cat((gate, up))}.__getitem__,
                      m, 1, 64)
    assert torch.equal(fc1, merge_gate_up(gate, up, tp=1))
    [(name, back)] = to_hf(fc1_rule, merge_gate_up(gate, up, tp=2), m, 1, fc1_tp=2)  # live export's TP2 gather
    assert name == "model.layers.1.mlp.gate_up_proj.weight" and torch.equal(back, torch.cat((gate, up)))
    [(name, back)] = to_hf(fused["self_attention.linear_qkv.weight"], qkv, m, 1)
    assert name == "model.layers.1.self_attn.qkv_proj.weight" and torch.equal(back, torch.cat((q, k, v)))
    with pytest.raises(ValueError, match=r"qkv_proj.weight has 31 rows, expected 16 \+ 8 \+ 8 = 32"):
        to_megatron(fused["self_attention.linear_qkv.weight"], lambda n: torch.zeros(31, 16), m, 1, 64)


@pytest.mark.parametrize("hf", [PHI4, PHI3_MINI_4K], ids=["phi-4", "phi-3-mini-4k"])
def test_a_synthesised_export_config_reads_back_as_the_same_phi3(hf):
    from transformers import AutoConfig

    from bft_megatron.convert.hf_config import _synthesised_config

    m = ModelConfig(**model_fields_from_hf(hf))
    config = _synthesised_config(m)
    assert (config["architectures"], config["model_type"]) == (["Phi3ForCausalLM"], "phi3")
    back = AutoConfig.for_model(**config)
    assert type(back).__name__ == "Phi3Config" and back.sliding_window == hf["sliding_window"]
    assert back.pad_token_id is None  # not Phi3Config's 32000, outside another tokenizer's vocabulary
    assert ModelConfig(**model_fields_from_hf(config)) == m
