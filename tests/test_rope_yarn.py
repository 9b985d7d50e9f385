"""YaRN ``rope_scaling`` (Qwen2.5 / Qwen3 long context; any Llama-layout family): the inverse frequencies and the
attention factor equal transformers' ``_compute_yarn_parameters`` for every parameter combination; config.json in
both spellings, the synthesised export config read back by transformers, config errors, the softmax scale that
carries the attention factor, and old checkpoints' llama3 ``rope_scaling`` (without the later keys) still comparing
equal. Logits against transformers at TP1/TP2/PP2 and the bit-identical round trip: tests/test_convert_e2e.py
(cases ``qwen2_yarn``, ``qwen3_yarn``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bft_megatron.checkpoint.architecture import architecture_changes
from bft_megatron.config import ConfigError, load_config, to_dict, validate
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.schema import ModelConfig
from bft_megatron.model.layers import yarn_inv_freq
from tests.launch import TINY

QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 32768,
          "rope_theta": 1000000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen2.5's recommendation


def _hf(scaling: dict, theta: float = 1e6, head_dim: int = 16, max_positions: int = 131072):
    """transformers' own (inv_freq, attention_factor) for ``scaling``."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_positions,
                         rope_scaling=dict(scaling), rope_theta=theta)
    return ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")


@pytest.mark.parametrize("scaling", [
    YARN,
    dict(YARN, factor=8.0, beta_fast=16.0, beta_slow=2.0),
    dict(YARN, truncate=False),
    dict(YARN, mscale=1.5, mscale_all_dim=0.5),
    dict(YARN, mscale=1.0, mscale_all_dim=1.0),   # DeepSeek's: ratio 1
    dict(YARN, attention_factor=1.25),
    dict(YARN, factor=1.0),                       # no scaling at all: the original frequencies, factor 1
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32768},  # factor = 131072 / 32768
    {"rope_type": "yarn", "factor": 4.0},  # original length = max_position_embeddings
])
@pytest.mark.parametrize("theta, head_dim", [(1e6, 16), (1e4, 128)])
def test_inverse_frequencies_and_attention_factor_equal_transformers(scaling, theta, head_dim):
    want_inv, want_factor = _hf(scaling, theta, head_dim)
    hf = dict(QWEN25, rope_scaling=scaling, rope_theta=theta, max_position_embeddings=131072,
              hidden_size=head_dim * 4)
    rs = model_fields_from_hf(hf)["rope_scaling"]
    got = yarn_inv_freq(head_dim, theta, rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow,
                        rs.truncate)
    torch.testing.assert_close(got, want_inv.float(), rtol=1e-6, atol=0)
    assert rs.yarn_attention_factor() == pytest.approx(want_factor, rel=1e-12)


def test_config_json_in_both_spellings_reads_the_same():
    legacy = model_fields_from_hf(dict(QWEN25, rope_scaling=YARN))
    v5 = {k: v for k, v in QWEN25.items() if k != "rope_theta"}
    new = model_fields_from_hf(dict(v5, rope_parameters=dict(YARN, rope_theta=1e6)))
    assert legacy["rope_scaling"] == new["rope_scaling"] and new["rope_theta"] == 1e6
    assert (legacy["rope_scaling"].rope_type, legacy["rope_scaling"].factor) == ("yarn", 4.0)
    # no original length: max_position_embeddings, as transformers' standardize_rope_params fills it
    assert model_fields_from_hf(dict(QWEN25, rope_scaling={"rope_type": "yarn", "factor": 4.0})
                                )["rope_scaling"].original_max_position_embeddings == 32768
    no_length = {k: v for k, v in QWEN25.items() if k != "max_position_embeddings"}
    with pytest.raises(ConfigError, match="yarn rope_scaling has no original_max_position_embeddings"):
        model_fields_from_hf(dict(no_length, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="only rope_type 'llama3' and 'yarn' are supported, got 'dynamic'"):
        model_fields_from_hf(dict(QWEN25, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_the_synthesised_export_config_reads_back_in_transformers(family):
    from bft_megatron.convert.hf_config import _synthesised_config
    from transformers import AutoConfig

    scaling = dict(YARN, beta_fast=16.0, mscale=1.5, mscale_all_dim=0.5, truncate=False)
    fields = model_fields_from_hf(dict(QWEN25, rope_scaling=scaling, max_position_embeddings=131072))
    fields.update(family=family, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    m = ModelConfig(**fields)
    config = _synthesised_config(m)
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                                      "beta_fast": 16.0, "beta_slow": 1.0, "mscale": 1.5, "mscale_all_dim": 0.5,
                                      "truncate": False}
    read = AutoConfig.for_model(config.pop("model_type"), **config)
    assert model_fields_from_hf(read.to_dict())["rope_scaling"] == m.rope_scaling


def _validate(*overrides):
    return validate(load_config(None, TINY + ["model.family=qwen2", "model.qkv_bias=true"] + list(overrides)), 1,
                    require_te=False)


@pytest.mark.parametrize("overrides, message", [
    (["model.rope_scaling.factor=0.5"], r"model.rope_scaling.factor must be >= 1 for rope_type yarn, got 0.5"),
    (["model.rope_scaling.beta_fast=1"], r"beta_fast > beta_slow > 0 for rope_type yarn, got 1.0 and 1.0"),
    (["model.rope_scaling.mscale=-1"], r"model.rope_scaling.mscale must be > 0 or null, got -1"),
    (["model.rope_scaling.original_max_position_embeddings=0"], r"original_max_position_embeddings must be >= 1"),
    (["model.rope_scaling.rope_type=ntk"], r"rope_type"),
])
def test_yarn_config_errors_name_the_field_and_value(overrides, message):
    _validate("model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4")
    with pytest.raises(ConfigError, match=message):
        _validate("model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4", *overrides)


def test_the_attention_factor_is_the_softmax_scale_squared():
    """HF scales cos and sin by a, i.e. queries and keys by a: scores by a^2 = megatron's softmax_scale."""
    from bft_megatron.model.builder import transformer_config

    groups = SimpleNamespace(device=torch.device("cpu"), vp_size=None)
    yarn = ["model.family=qwen2", "model.qkv_bias=true", "model.rope_scaling.rope_type=yarn",
            "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=16"]
    cfg = load_config(None, TINY + yarn)
    a = 0.1 * math.log(4) + 1
    assert transformer_config(cfg, groups).softmax_scale == pytest.approx(a * a / math.sqrt(16))
    llama3 = load_config(None, TINY + ["model.rope_scaling.factor=8"])
    assert transformer_config(llama3, groups).softmax_scale is None


def test_an_old_checkpoints_llama3_rope_scaling_still_compares_equal():
    """Checkpoints written before rope_type and YaRN's keys existed store four keys; the same llama3 scaling now
    has eleven: not an architecture change. A YaRN config against them is one."""
    cfg = to_dict(load_config(None, TINY + ["model.rope_scaling.factor=8"]))["model"]
    old = dict(cfg, rope_scaling={k: cfg["rope_scaling"][k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                        "original_max_position_embeddings")})
    assert architecture_changes(old, cfg)[0] == []
    yarn = to_dict(load_config(None, TINY + ["model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=8"]))
    [error] = architecture_changes(old, yarn["model"])[0]
    assert error.startswith("model.rope_scaling: checkpoint") and "'yarn'" in error
