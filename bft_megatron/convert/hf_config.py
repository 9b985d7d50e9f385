"""Write the non-weight files of an exported HF model: config.json, generation_config.json, tokenizer.

With a template directory (the source HF model) its config.json is kept, after checking that the
architecture matches the exported weights, and its generation config is the base of the new one.
Without one, config.json is synthesised from :class:`ModelConfig` through transformers' own config
class (so the key names match the installed transformers version). The tokenizer (the training one:
:mod:`bft_megatron.convert.sources`) is written by :mod:`bft_megatron.convert.hf_tokenizer`, and its
bos/eos/pad ids and chat end-of-turn token go into both configs; without a tokenizer the synthesised
config carries no token ids (never transformers' defaults) and a warning says which option supplies one.
"""

from __future__ import annotations

import json
import os

import torch

from bft_megatron.config.hf import legacy_rope_keys
from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert.hf_tokenizer import SpecialIds, check_auto_tokenizer, write_tokenizer
from bft_megatron.convert.importer import model_config_from_hf_dir
from bft_megatron.convert.sources import ExportSources
from bft_megatron.utils.logging import get_logger

__all__ = ["write_hf_metadata"]

_log = get_logger(__name__)

# What a template config.json must agree on with the exported weights: everything that changes the model's
# outputs (max_position_embeddings does not: a run may train at another context length).
_ARCH_FIELDS = ("family", "hidden_size", "num_layers", "num_attention_heads", "kv_groups", "ffn_hidden_size",
                "vocab_size", "tie_embeddings", "qkv_bias", "kv_channels", "qk_norm", "sliding_window", "rope_theta",
                "rope_scaling", "norm_epsilon", "sliding_window_pattern", "rope_local_theta", "rope_linear_factor",
                "query_pre_attn_scalar", "partial_rotary_factor")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _template_config(sources: ExportSources, m: ModelConfig) -> tuple[dict | None, bool]:
    """(the template's config.json if it describes ``m``, whether its generation_config.json applies: the same
    vocabulary, so its stop ids and sampling defaults are this model's even where the architecture changed, e.g. a
    longer-context fine-tune's rope_theta). A mismatch raises for ``--hf``, else is skipped (warning)."""
    template_dir = sources.template_dir
    if not (template_dir and os.path.isfile(os.path.join(template_dir, "config.json"))):
        return None, False
    t = model_config_from_hf_dir(template_dir)
    bad = [f"{f}: template {getattr(t, f)!r} vs weights {getattr(m, f)!r}" for f in _ARCH_FIELDS
           if getattr(t, f) != getattr(m, f)]
    if bad:
        message = f"{template_dir}/config.json does not describe the exported model: {'; '.join(bad)}"
        if sources.template_explicit:
            raise ValueError(message)
        same_vocab = t.vocab_size == m.vocab_size
        _log.warning("%s; synthesising config.json instead%s", message,
                     " (its generation_config.json still applies: the same vocabulary)" if same_vocab else "")
        return None, same_vocab
    with open(os.path.join(template_dir, "config.json"), encoding="utf-8") as fh:
        # A transformers-5 config.json has only `rope_parameters`: add the 4.x keys, as a synthesised config has.
        return legacy_rope_keys(json.load(fh)), True


def _rope_scaling(rs) -> dict:
    """HF's ``rope_scaling`` of ``rs`` (llama3, yarn or longrope; the optional keys only where set, as HF reads
    them). longrope's factor is written out: transformers would otherwise derive it from max_position_embeddings,
    which a run may have changed."""
    if rs.rope_type == "longrope":
        out = {"rope_type": "longrope", "factor": rs.factor, "short_factor": list(rs.short_factor),
               "long_factor": list(rs.long_factor),
               "original_max_position_embeddings": rs.original_max_position_embeddings}
        return out if rs.attention_factor is None else {**out, "attention_factor": rs.attention_factor}
    if rs.rope_type == "yarn":
        out = {"rope_type": "yarn", "factor": rs.factor,
               "original_max_position_embeddings": rs.original_max_position_embeddings,
               "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow}
        out.update({k: getattr(rs, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                    if getattr(rs, k) is not None})
        return out if rs.truncate else {**out, "truncate": False}
    return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings}


def _gemma3_config(m: ModelConfig) -> dict:
    """Gemma3TextConfig's config.json, with transformers 4.x's keys too (rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern: what the Hub's Gemma 3 files have and 4.x reads)."""
    from transformers import Gemma3TextConfig

    full = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_linear_factor is not None:
        full = {"rope_type": "linear", "factor": m.rope_linear_factor, "rope_theta": m.rope_theta}
    pattern = m.sliding_window_pattern
    scalar = m.query_pre_attn_scalar  # Gemma3TextConfig (strict) types it int; every Gemma 3 has an integral one
    cfg = Gemma3TextConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_groups,
        head_dim=m.kv_channels, max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings, sliding_window=m.sliding_window,
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(m.num_layers)],
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": m.rope_local_theta}},
        # Gemma's own ids (pad 0, eos 1, bos 2) belong to its tokenizer: the training tokenizer's are written later
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.architectures = ["Gemma3ForCausalLM"]
    config = cfg.to_diff_dict()
    config.pop("_sliding_window_pattern", None)  # the config class's private copy of sliding_window_pattern
    config.update(rope_theta=m.rope_theta, rope_local_base_freq=m.rope_local_theta, sliding_window_pattern=pattern,
                  rope_scaling=None if m.rope_linear_factor is None else
                  {"rope_type": "linear", "factor": m.rope_linear_factor})
    return config


def _synthesised_config(m: ModelConfig) -> dict:
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    if m.family == "gemma3":
        return _gemma3_config(m)

    kwargs = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.kv_groups, max_position_embeddings=m.max_position_embeddings,
                  rms_norm_eps=m.norm_epsilon, tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope_theta,
                  head_dim=m.kv_channels)
    if m.rope_scaling is not None:
        kwargs["rope_scaling"] = _rope_scaling(m.rope_scaling)
    if m.family == "qwen3":
        cfg = Qwen3Config(attention_bias=False, **kwargs)
        cfg.architectures = ["Qwen3ForCausalLM"]
    elif m.family == "phi3":
        # Phi3Config's own token ids (32000: Phi-3's vocabulary) would outlive _set_token_ids (which keeps a set
        # pad id) and be out of range for another vocabulary: none here, the tokenizer's are written later.
        # original_max_position_embeddings: longrope's (the top-level key wins over the one in rope_scaling in
        # transformers); without longrope it matters to nothing (phi-4 has it equal to the context).
        rs = m.rope_scaling
        original = rs.original_max_position_embeddings if rs is not None else m.max_position_embeddings
        cfg = Phi3Config(sliding_window=m.sliding_window, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         original_max_position_embeddings=original, partial_rotary_factor=m.partial_rotary_factor,
                         **kwargs)
        cfg.architectures = ["Phi3ForCausalLM"]
    elif m.family == "mistral":
        cfg = MistralConfig(sliding_window=m.sliding_window, **kwargs)
        cfg.architectures = ["MistralForCausalLM"]
    elif m.family == "qwen2":
        cfg = Qwen2Config(**kwargs)
        cfg.architectures = ["Qwen2ForCausalLM"]
    else:
        cfg = LlamaConfig(attention_bias=m.qkv_bias, **kwargs)
        cfg.architectures = ["LlamaForCausalLM"]
    # Only what differs from transformers' generic defaults (no id2label / label2id / return_dict ...).
    config = cfg.to_diff_dict()
    # transformers >= 5 writes RoPE only as `rope_parameters`; transformers 4.x (and serving stacks pinned to
    # it) read the top-level `rope_theta` / `rope_scaling` and, without them, would silently use theta 10000
    # and no llama3 scaling. Both readers accept both forms, so write both (as HF's own Llama-3.1 files do the
    # 4.x form).
    config["rope_theta"] = m.rope_theta
    if m.rope_scaling is not None:  # built afresh: transformers adds rope_theta into the dict it was given
        config["rope_scaling"] = _rope_scaling(m.rope_scaling)
    if m.partial_rotary_factor != 1:  # 4.x reads it top-level (5.x in rope_parameters, which to_diff_dict wrote)
        config["partial_rotary_factor"] = m.partial_rotary_factor
    return config


def _set_token_ids(config: dict, ids: SpecialIds) -> None:
    """bos/eos/pad of config.json from the tokenizer; an eos list that already holds its eos is kept."""
    eos = config.get("eos_token_id")
    if ids.eos is not None and not (eos == ids.eos or (isinstance(eos, list) and ids.eos in eos)):
        config["eos_token_id"] = ids.eos
    if ids.bos is not None:
        config["bos_token_id"] = ids.bos
    if config.get("pad_token_id") is None and ids.pad is not None:
        config["pad_token_id"] = ids.pad


def _generation_config(config: dict, template_dir: str | None, ids: SpecialIds | None) -> dict:
    """The template's generation_config.json (else one from config.json), with the tokenizer's ids merged in."""
    path = os.path.join(template_dir, "generation_config.json") if template_dir else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            gen = json.load(fh)
    else:
        import transformers

        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        gen["transformers_version"] = transformers.__version__
    if ids is not None:
        gen.pop("_from_model_config", None)  # else transformers may re-derive it from config.json's single eos
        old = gen.get("eos_token_id")
        old = old if isinstance(old, list) else [] if old is None else [old]
        eos = list(dict.fromkeys(ids.generation_eos + old))
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        for key, value in (("bos_token_id", ids.bos), ("pad_token_id", ids.pad)):
            if value is not None:
                gen[key] = value
    return gen


def write_hf_metadata(out_dir: str, m: ModelConfig, dtype: torch.dtype, sources: ExportSources) -> None:
    """config.json (+ dtype), generation_config.json, tokenizer files and chat template into ``out_dir``.

    Raises (before writing anything) if an explicit template config.json (``--hf``) does not describe ``m``.
    """
    os.makedirs(out_dir, exist_ok=True)
    config, generation_applies = _template_config(sources, m)
    template_dir = sources.template_dir if config is not None else None
    if config is None:
        _log.info("no HF config.json to start from: synthesising config.json from the model section")
        config = _synthesised_config(m)
    # transformers 5 reads `dtype`, 4.x (and serving stacks pinned to it) `torch_dtype`: both are set, whatever the
    # template has (transformers 5 saves only `dtype`, 4.x only `torch_dtype`, an earlier export both, where a stale
    # one would name the old weights' dtype).
    config.update(dtype=_DTYPE_NAMES[dtype], torch_dtype=_DTYPE_NAMES[dtype])
    ids, tok = write_tokenizer(sources.tokenizer, out_dir, m.vocab_size) if sources.tokenizer else (None, None)
    if ids is not None:
        _set_token_ids(config, ids)
    else:
        if template_dir is None:  # never transformers' class defaults (Llama's 1/2): no ids rather than wrong ones
            config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        _log.warning("NO TOKENIZER in the export (looked at: %s): the folder has no tokenizer files%s; %s",
                     "; ".join(sources.looked_at),
                     "" if template_dir else " and config.json / generation_config.json no bos/eos ids "
                     "(generation will not stop at an end-of-sequence token)", sources.hint)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as fh:
        json.dump(_generation_config(config, sources.template_dir if generation_applies else None, ids), fh,
                  indent=2, sort_keys=True)
    if tok is not None:  # AutoTokenizer reads config.json too: only now can the folder be loaded as users will
        check_auto_tokenizer(out_dir, tok)
