"""Phi3 ``longrope`` scaling and ``partial_rotary_factor`` (Phi-3.5-mini, Phi-3-*-128k, Phi-4-mini): inverse
frequencies and attention factor = transformers' ``_compute_longrope_parameters`` (short and long, whole and partial
heads, explicit and default factor / attention factor); config.json in both spellings (published-like Phi-3.5-mini-
instruct and Phi-4-mini-instruct keys); the synthesised export config read back by transformers; config errors; the
softmax scale / rotary-channel scale that carry the attention factor; old checkpoints still comparing equal. Logits
against transformers: tests/test_model_longrope_logits.py and tests/test_convert_e2e.py (``phi3_longrope``,
``phi3_partial``, ``phi3_partial_longrope``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bft_megatron.checkpoint.architecture import architecture_changes
from bft_megatron.config import ConfigError, load_config, to_dict, validate
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.schema import ModelConfig
from bft_megatron.model.layers import longrope_inv_freq
from bft_megatron.model.rotary_scale import rotary_channel_scale
from tests.launch import TINY


def _factors(n: int, top: float) -> list[float]:
    return [1.0 + (top - 1.0) * i / max(n - 1, 1) for i in range(n)]


# published architecture keys (transformers 4.x spelling); the factors are synthetic lists of the right length
PHI35_MINI = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
              "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "sliding_window": 262144, "tie_word_embeddings": False, "hidden_act": "silu",
              "rope_scaling": {"type": "longrope", "short_factor": _factors(48, 2.7), "long_factor": _factors(48, 60)}}
PHI4_MINI = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-5, "sliding_window": 262144, "tie_word_embeddings": True, "hidden_act": "silu",
             "partial_rotary_factor": 0.75,
             "rope_scaling": {"type": "longrope", "short_factor": _factors(48, 3.0), "long_factor": _factors(48, 50)}}


def _tiny(partial: float = 1.0, heads: int = 4, hidden: int = 128, original: int = 64, max_positions: int = 256,
          **scaling) -> dict:
    dim = int(hidden // heads * partial)
    rope = {"type": "longrope", "short_factor": _factors(dim // 2, 2.5), "long_factor": _factors(dim // 2, 40.0)}
    return dict(PHI35_MINI, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=max_positions, original_max_position_embeddings=original,
                partial_rotary_factor=partial, rope_scaling=dict(rope, **scaling))


def _hf_rope(hf: dict, seq_len: int | None = None):
    """transformers' own (inv_freq, attention_factor) for config.json ``hf``."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = Phi3Config(**{k: v for k, v in hf.items() if k != "architectures"})
    return ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("hf", [
    _tiny(),                                      # full rotary, factor 256/64, default attention factor
    _tiny(partial=0.75),                          # Phi-4-mini's partial rotary
    _tiny(partial=0.5, heads=8),
    _tiny(factor=2.0),                            # an explicit factor wins over max/original
    _tiny(partial=0.75, attention_factor=1.3),    # an explicit attention factor
    _tiny(max_positions=64),                      # factor 1: attention factor 1
    dict(_tiny(partial=0.75), rope_theta=250000.0),
], ids=["full", "partial_0.75", "partial_0.5", "factor", "attention_factor", "factor_1", "theta"])
def test_inverse_frequencies_and_attention_factor_equal_transformers(hf):
    fields = model_fields_from_hf(hf)
    m = ModelConfig(**fields)
    rs = m.rope_scaling
    assert m.rotary_dim == int(m.kv_channels * hf["partial_rotary_factor"])
    want_short, want_a = _hf_rope(hf)
    want_long, want_a_long = _hf_rope(hf, seq_len=hf["original_max_position_embeddings"] + 1)
    torch.testing.assert_close(longrope_inv_freq(m.rotary_dim, m.rope_theta, rs.short_factor), want_short.float(),
                               rtol=0, atol=0)
    torch.testing.assert_close(longrope_inv_freq(m.rotary_dim, m.rope_theta, rs.long_factor), want_long.float(),
                               rtol=0, atol=0)
    assert rs.longrope_attention_factor() == pytest.approx(want_a, rel=1e-12) == want_a_long


def test_phi35_mini_and_phi4_mini_config_json_in_both_spellings():
    from transformers import Phi3Config

    a35 = math.sqrt(1 + math.log(32) / math.log(4096))
    # (config.json, partial_rotary_factor, head width, tied, kv heads): 96 rotated channels in both (48 factors)
    for hf, partial, width, tied, groups in ((PHI35_MINI, 1.0, 96, False, 32), (PHI4_MINI, 0.75, 128, True, 8)):
        legacy = model_fields_from_hf(hf)
        m = ModelConfig(**legacy)
        assert (m.family, m.kv_channels, m.rotary_dim, m.partial_rotary_factor) == ("phi3", width, 96, partial)
        assert (m.tie_embeddings, m.kv_groups, m.sliding_window) == (tied, groups, 262144)
        rs = m.rope_scaling
        assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == ("longrope", 32.0, 4096)
        assert len(rs.short_factor) == len(rs.long_factor) == 48 and rs.attention_factor is None
        assert rs.longrope_attention_factor() == pytest.approx(a35, rel=1e-12)
        # transformers 5's own file: rope_parameters holding theta, partial_rotary_factor and the scaling
        v5 = Phi3Config(**{k: v for k, v in hf.items() if k != "architectures"}).to_diff_dict()
        v5 = {k: v for k, v in v5.items() if k not in ("rope_scaling", "rope_theta", "partial_rotary_factor")}
        assert "rope_parameters" in v5
        assert model_fields_from_hf(dict(v5, architectures=hf["architectures"])) == legacy
    # only the top-level original length counts (transformers: Phi3Config's 4096 when absent)
    inner = dict(PHI35_MINI, rope_scaling=dict(PHI35_MINI["rope_scaling"], original_max_position_embeddings=2048))
    assert model_fields_from_hf(inner)["rope_scaling"].original_max_position_embeddings == 4096
    with pytest.raises(ConfigError, match="rope_scaling.short_factor must be a list of numbers, got None"):
        model_fields_from_hf(dict(PHI35_MINI, rope_scaling={"type": "longrope", "long_factor": [1.0] * 48}))
    with pytest.raises(ConfigError, match="rope_type='dynamic' is not supported for Phi3"):
        model_fields_from_hf(dict(PHI35_MINI, rope_scaling={"type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("hf", [PHI35_MINI, PHI4_MINI, _tiny(partial=0.75, attention_factor=1.3, factor=3.0)],
                         ids=["phi35_mini", "phi4_mini", "explicit"])
def test_the_synthesised_export_config_reads_back_in_transformers(hf):
    from bft_megatron.convert.hf_config import _synthesised_config
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    m = ModelConfig(**model_fields_from_hf(hf))
    config = _synthesised_config(m)
    # transformers 4.x's keys too: top-level rope_scaling, original length and partial_rotary_factor
    assert config["rope_scaling"]["rope_type"] == "longrope" and config["original_max_position_embeddings"] == \
        m.rope_scaling.original_max_position_embeddings
    assert config.get("partial_rotary_factor", 1.0) == m.partial_rotary_factor
    read = AutoConfig.for_model(config.pop("model_type"), **config)
    back = ModelConfig(**model_fields_from_hf(read.to_dict()))
    assert (back.rope_scaling, back.partial_rotary_factor) == (m.rope_scaling, m.partial_rotary_factor)
    inv, a = ROPE_INIT_FUNCTIONS["longrope"](read, "cpu")
    torch.testing.assert_close(longrope_inv_freq(m.rotary_dim, m.rope_theta, m.rope_scaling.short_factor), inv,
                               rtol=0, atol=0)
    assert a == pytest.approx(m.rope_scaling.longrope_attention_factor(), rel=1e-12)


LONGROPE = ["model.family=phi3", "model.num_query_groups=4", "model.rope_scaling.rope_type=longrope",
            "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=32",
            "model.rope_scaling.short_factor=[1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5]",
            "model.rope_scaling.long_factor=[2, 3, 4, 5, 6, 7, 8, 9]"]


def _validate(*overrides):
    return validate(load_config(None, TINY + list(overrides)), 1, require_te=False)


def test_valid_longrope_and_partial_configs_pass():
    _validate(*LONGROPE)  # rows of 32 = the original length
    _validate("model.family=phi3", "model.partial_rotary_factor=0.75")
    _validate(*LONGROPE, "model.partial_rotary_factor=0.5", "model.rope_scaling.short_factor=[1, 2, 3, 4]",
              "model.rope_scaling.long_factor=[5, 6, 7, 8]")


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_length=33"], r"data.seq_length=33 > model.rope_scaling.original_max_position_embeddings=32 with "
                             r"rope_type longrope is not supported: transformers uses the long factors only"),
    (["model.rope_scaling.short_factor=[1, 2, 3]"], r"model.rope_scaling.short_factor has 3 numbers, rope_type "
                                                    r"longrope needs one per rotated channel pair: .* = 8"),
    (["model.partial_rotary_factor=0.5"], r"model.rope_scaling.short_factor has 8 numbers, .* = 4"),
    (["model.rope_scaling.long_factor=null"], r"model.rope_scaling.long_factor is null with rope_type longrope"),
    (["model.rope_scaling.long_factor=[2, 3, 4, 5, 6, 7, 8, 0]"], r"long_factor must be all > 0, got 0"),
    (["model.rope_scaling.factor=0"], r"model.rope_scaling.factor must be > 0, got 0"),
    (["model.rope_scaling.attention_factor=-1"], r"model.rope_scaling.attention_factor must be > 0 or null, got -1"),
    (["model.rope_scaling.original_max_position_embeddings=0"], r"original_max_position_embeddings must be >= 1"),
    (["model.partial_rotary_factor=0"], r"model.partial_rotary_factor must be in \(0, 1\], got 0"),
    (["model.partial_rotary_factor=1.5"], r"model.partial_rotary_factor must be in \(0, 1\], got 1.5"),
    (["model.partial_rotary_factor=0.1"], r"rotates int\(head width 16 \* 0.1\) = 1 channels per head"),
    (["model.family=llama"], r"rope_type=longrope with model.family=llama: only Phi3"),
    (["model.rope_scaling.rope_type=llama3"], r"rope_scaling.rope_type=llama3 with model.family=phi3: HF Phi3 has "
                                              r"only longrope"),
])
def test_config_errors_name_the_field_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _validate(*LONGROPE, *overrides)


def test_a_factor_other_than_the_length_ratio_is_a_warning():
    """transformers 4.x's Phi3 derives the attention factor from max_position_embeddings / original length."""
    from bft_megatron.config.validate import config_warnings

    assert not [w for w in config_warnings(load_config(None, TINY + LONGROPE + ["model.max_position_embeddings=128"]))
                if "rope_scaling" in w]
    for extra in (["model.max_position_embeddings=64"], ["model.rope_scaling.factor=3"]):
        [warning] = [w for w in config_warnings(load_config(None, TINY + LONGROPE + extra)) if "rope_scaling" in w]
        assert warning.startswith("model.rope_scaling.factor=") and "attention_factor to pin it" in warning
    pinned = TINY + LONGROPE + ["model.rope_scaling.factor=3", "model.rope_scaling.attention_factor=1.1"]
    assert not [w for w in config_warnings(load_config(None, pinned)) if "rope_scaling" in w]


def test_partial_rotary_is_phi3_only():
    with pytest.raises(ConfigError, match=r"model.partial_rotary_factor=0.75 with model.family=llama: only Phi3"):
        _validate("model.partial_rotary_factor=0.75")


def test_the_attention_factor_is_the_softmax_scale_or_the_rotary_channels():
    """Whole heads: HF's a on cos and sin is a^2 on the scores (softmax scale). Partial rotary: a on the rotated
    channels of each query and key head (before RoPE) and nowhere else, in megatron's [q.., k, v] group layout."""
    from bft_megatron.model.builder import transformer_config

    groups = SimpleNamespace(device=torch.device("cpu"), vp_size=None)
    a = math.sqrt(1 + math.log(4) / math.log(32))
    cfg = load_config(None, TINY + LONGROPE)
    assert transformer_config(cfg, groups).softmax_scale == pytest.approx(a * a / math.sqrt(16), rel=1e-12)
    partial = load_config(None, TINY + LONGROPE + ["model.partial_rotary_factor=0.5"])
    assert transformer_config(partial, groups).softmax_scale is None
    scale = rotary_channel_scale(heads_per_group=2, head_dim=4, rotary_dim=2, factor=a)
    assert scale.tolist() == pytest.approx([a, a, 1, 1] * 3 + [1] * 4)


def test_old_checkpoints_compare_equal_and_partial_rotary_is_an_architecture_field():
    """Checkpoints written before partial_rotary_factor and longrope's keys existed: the same model now is not an
    architecture change; partial rotary or longrope against them is."""
    cfg = to_dict(load_config(None, TINY + ["model.family=phi3", "model.num_query_groups=4"]))["model"]
    old = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
    assert architecture_changes(old, cfg)[0] == []
    llama3 = to_dict(load_config(None, TINY + ["model.rope_scaling.factor=8"]))["model"]
    old3 = dict(llama3, rope_scaling={k: v for k, v in llama3["rope_scaling"].items()
                                      if k not in ("short_factor", "long_factor")})
    assert architecture_changes(old3, llama3)[0] == []
    partial = dict(cfg, partial_rotary_factor=0.75)
    [error] = architecture_changes(old, partial)[0]
    assert error == "model.partial_rotary_factor: checkpoint 1.0, config 0.75"
    longrope = to_dict(load_config(None, TINY + LONGROPE))["model"]
    [error] = architecture_changes(old, longrope)[0]
    assert error.startswith("model.rope_scaling: checkpoint null") and "'longrope'" in error
