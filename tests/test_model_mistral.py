"""Mistral (``MistralForCausalLM``: Mistral-7B v0.1-v0.3, BioMistral, Mistral-Nemo): its config.json, the sliding
window (applied when rows exceed it; logits in test_model_window_logits), the checkpoint architecture check and the
synthesised export config. Logits against transformers at TP1/TP2/PP2 and the bit-identical export round trip are
in test_convert_e2e (case ``mistral_untied``)."""

from __future__ import annotations

import pytest
import torch

from bft_megatron.checkpoint.architecture import architecture_changes
from bft_megatron.config import load_config, to_dict
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.plan import format_plan
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


def test_rows_longer_than_the_window_apply_it_in_every_layer(monkeypatch):
    """data.seq_length above the window: megatron's window_size (W-1, 0) on every layer (keys i-W < j <= i, as HF's
    sliding-window mask; logits in tests/test_model_window_logits.py); at or below it no window (it changes nothing
    and TE keeps its causal kernels). Under TE, context parallelism runs all-to-all while the window applies
    (cp_comm_type a2a: TE's p2p ring has no window), refused where the heads per TP rank do not split over CP."""
    import importlib
    from types import SimpleNamespace

    from bft_megatron.model.builder import transformer_config

    groups = SimpleNamespace(device=torch.device("cpu"), vp_size=None)
    for window, want in ((16, (15, 0)), (32, None), (64, None)):  # TINY rows: 32 tokens
        cfg = load_config(None, TINY + ["model.family=mistral", f"model.sliding_window={window}"])
        validate(cfg, world_size=1, require_te=False)
        tconfig = transformer_config(cfg, groups)
        assert (tconfig.window_size, tconfig.window_attn_skip_freq) == (want, None), window
    validate_mod = importlib.import_module("bft_megatron.config.validate")
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: True)
    narrow = TINY + ["model.family=mistral", "model.sliding_window=16", "parallel.cp=4"]  # 2 kv heads
    with pytest.raises(ValueError, match=r"parallel.cp=4 with model.family=mistral under Transformer Engine: the "
                                         r"window applies \(model.sliding_window=16 < data.seq_length=32\)"):
        validate(load_config(None, narrow), world_size=4, require_te=False)
    cp2 = load_config(None, TINY + ["model.family=mistral", "model.sliding_window=16", "parallel.cp=2"])
    validate(cp2, world_size=2, require_te=False)  # TE's all-to-all CP takes it
    assert transformer_config(cp2, groups).cp_comm_type == "a2a"
    assert "CP2 runs all-to-all (cp_comm_type a2a" in format_plan(cp2, 2, 0.4, 989.0)
    wide = load_config(None, TINY + MISTRAL + ["parallel.cp=4"])  # 32: no window, p2p
    validate(wide, world_size=4, require_te=False)
    assert transformer_config(wide, groups).cp_comm_type is None
    assert "all-to-all" not in format_plan(wide, 4, 0.4, 989.0)


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
