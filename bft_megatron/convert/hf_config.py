"""Write the non-weight files of an exported HF model: config.json, generation_config.json, tokenizer.

With a template directory (the source HF model) its config.json is kept, after checking that the
architecture matches the exported weights, and its tokenizer and generation config are copied.
Without one, config.json is synthesised from :class:`ModelConfig` through transformers' own config
class (so the key names match the installed transformers version).
"""

from __future__ import annotations

import json
import os

import torch

from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert.hf_io import copy_side_files
from bft_megatron.convert.importer import model_config_from_hf_dir
from bft_megatron.utils.logging import get_logger

__all__ = ["write_hf_metadata"]

_log = get_logger(__name__)

_ARCH_FIELDS = ("family", "hidden_size", "num_layers", "num_attention_heads", "kv_groups", "ffn_hidden_size",
                "vocab_size", "tie_embeddings", "qkv_bias", "rope_theta", "rope_scaling")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check_template(template_dir: str, m: ModelConfig) -> None:
    t = model_config_from_hf_dir(template_dir)
    bad = [f"{f}: template {getattr(t, f)!r} vs weights {getattr(m, f)!r}" for f in _ARCH_FIELDS
           if getattr(t, f) != getattr(m, f)]
    if bad:
        raise ValueError(f"{template_dir}/config.json does not describe the exported model: {'; '.join(bad)}")


def _synthesised_config(m: ModelConfig) -> dict:
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.kv_groups, max_position_embeddings=m.max_position_embeddings,
                  rms_norm_eps=m.norm_epsilon, tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope_theta)
    if m.rope_scaling is not None:
        rs = m.rope_scaling
        kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                                  "high_freq_factor": rs.high_freq_factor,
                                  "original_max_position_embeddings": rs.original_max_position_embeddings}
    if m.family == "qwen2":
        cfg = Qwen2Config(**kwargs)
        cfg.architectures = ["Qwen2ForCausalLM"]
    else:
        cfg = LlamaConfig(attention_bias=m.qkv_bias, **kwargs)
        cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_dict()


def write_hf_metadata(out_dir: str, m: ModelConfig, dtype: torch.dtype, template_dir: str | None) -> None:
    """config.json (+ dtype), generation_config.json and tokenizer files into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    if template_dir and os.path.isfile(os.path.join(template_dir, "config.json")):
        _check_template(template_dir, m)
        with open(os.path.join(template_dir, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    else:
        _log.warning("no HF template config: synthesising config.json from the model section")
        config = _synthesised_config(m)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = _DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    copied = copy_side_files(template_dir, out_dir)
    if "generation_config.json" not in copied:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(out_dir)
    if not any(name.startswith("tokenizer") for name in copied):
        _log.warning("no tokenizer files found (template %s): pass --hf DIR to add them", template_dir)
