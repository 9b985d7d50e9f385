"""Read a Hugging Face ``config.json`` (Llama-3.x, Qwen2.x, Qwen3 dense, Mistral, Phi-3/Phi-4, Gemma 3 text) into
:class:`ModelConfig`. Gemma 3's keys: :mod:`bft_megatron.config.hf_gemma3`."""

from __future__ import annotations

import dataclasses
import json
import os

from bft_megatron.config.base import ConfigError, format_value
from bft_megatron.config.hf_gemma3 import REFUSED_ARCHITECTURES, gemma3_fields
from bft_megatron.config.hf_phi3 import phi3_rope_fields
from bft_megatron.utils.logging import get_logger

__all__ = ["model_fields_from_hf", "merge_hf_config", "legacy_rope_keys", "HF_NAMES"]

_log = get_logger(__name__)
_FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
             "MistralForCausalLM": "mistral", "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3"}
HF_NAMES = {family: arch.removesuffix("ForCausalLM") for arch, family in _FAMILIES.items()}  # qwen3 -> Qwen3
# transformers' default for a num_key_value_heads absent from config.json (a null one means one per head everywhere)
_KV_HEADS_DEFAULT = {"qwen2": 32, "qwen3": 32, "mistral": 8}
# sliding_window when config.json has none: MistralConfig's 4096, Phi3Config's None (null: no window either way)
_WINDOW_DEFAULT = {"mistral": 4096, "phi3": None}
# transformers' rms_norm_eps for an absent key (Phi3Config: 1e-5; Llama/Qwen/Mistral: 1e-6)
_NORM_EPS_DEFAULT = {"phi3": 1e-5}


def _rope_scaling(raw, max_positions: int | None = None):
    from bft_megatron.config.schema import RopeScaling

    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind == "yarn":
        return _yarn_scaling(raw, max_positions)
    if kind != "llama3":
        raise ConfigError(f"model.rope_scaling: only rope_type 'llama3' and 'yarn' are supported, got {kind!r} "
                          "(and 'longrope' with Phi3ForCausalLM)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if raw.get(k) is None]
    if missing:  # a KeyError / TypeError from float(None) before
        raise ConfigError(f"model.from_hf: config.json's llama3 rope_scaling has no {', '.join(missing)} (or it is "
                          "null); llama3 scaling needs all four of " + ", ".join(keys))
    return RopeScaling(factor=float(raw["factor"]), low_freq_factor=float(raw["low_freq_factor"]),
                       high_freq_factor=float(raw["high_freq_factor"]),
                       original_max_position_embeddings=int(raw["original_max_position_embeddings"]))


def _yarn_scaling(raw: dict, max_positions: int | None):
    """HF's YaRN parameters (``_compute_yarn_parameters``): a null ``factor`` is max_position_embeddings over the
    original length, as there; a missing original length is max_position_embeddings (transformers'
    ``standardize_rope_params``); the optional keys keep HF's defaults."""
    from bft_megatron.config.schema import RopeScaling

    original = raw.get("original_max_position_embeddings") or max_positions
    if original is None:
        raise ConfigError("model.from_hf: config.json's yarn rope_scaling has no original_max_position_embeddings "
                          "and config.json no max_position_embeddings (or they are null): YaRN needs the "
                          "pre-training context length")
    factor = raw.get("factor")
    if factor is None and max_positions:
        factor = max_positions / int(original)
    if factor is None:
        raise ConfigError("model.from_hf: config.json's yarn rope_scaling has no factor (and no "
                          "max_position_embeddings to derive it from)")
    optional = {k: float(raw[k]) for k in ("mscale", "mscale_all_dim", "attention_factor") if raw.get(k) is not None}
    return RopeScaling(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                       beta_fast=float(raw.get("beta_fast") or 32.0), beta_slow=float(raw.get("beta_slow") or 1.0),
                       truncate=bool(raw.get("truncate", True)), **optional)


def legacy_rope_keys(hf: dict) -> dict:
    """Copy of an HF config dict with top-level ``rope_theta`` / ``rope_scaling``.

    transformers >= 5 writes ``rope_parameters`` (theta and scaling together) instead of the 4.x keys;
    without this, rope theta and Llama-3.1 scaling would silently fall back to defaults (when we read a config,
    and for transformers 4.x readers of an exported one).
    """
    hf = dict(hf)
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and hf.get("rope_theta") is None:  # a null rope_theta means absent, too
            hf["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return hf


def _required(hf: dict, key: str):
    """A key every supported config.json has (a missing or null one used to raise KeyError / TypeError)."""
    if hf.get(key) is None:
        raise ConfigError(f"model.from_hf: config.json has no {key} (or it is null)")
    return hf[key]


def _optional(hf: dict, key: str, default):
    """A key that may be absent; transformers' configs also write some as null (``num_key_value_heads`` in some
    Llama ones), which means the same as absent: the class default."""
    value = hf.get(key)
    return default if value is None else value


def _check_supported(hf: dict, family: str) -> None:
    heads, hidden = int(_required(hf, "num_attention_heads")), int(_required(hf, "hidden_size"))
    # Phi3 has neither key: its attention and MLP never have biases, whatever config.json says (transformers ignores
    # them, and a stray bias tensor would fail the import as unmapped)
    biased = [k for k in ("attention_bias", "mlp_bias") if hf.get(k) and family not in ("qwen2", "phi3")]
    if biased:  # Llama's and Qwen3's attention_bias also biases o_proj, which megatron's qkv bias does not cover
        where = "q/k/v/o projections" if biased[0] == "attention_bias" else "MLP"
        raise ConfigError(f"model.from_hf: {'/'.join(f'{k}=true' for k in biased)} ({HF_NAMES[family]} with biases "
                          f"on its {where}) is not supported; "
                          "biases on q/k/v only are Qwen2's layout (Qwen2ForCausalLM)")
    act = hf.get("hidden_act", "silu")  # Llama's and Qwen2's default
    if act not in ("silu", "swish"):  # the MLP megatron builds here is SwiGLU: another activation, another model
        raise ConfigError(f"model.from_hf: hidden_act={act!r} is not supported (the trainer's MLP is SwiGLU: silu)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and (int(head_dim) <= 0 or int(head_dim) % 2):
        raise ConfigError(f"model.from_hf: head_dim={head_dim} is not a positive even number")
    if head_dim is None and hidden % heads:
        raise ConfigError(f"model.from_hf: hidden_size={hidden} is not divisible by num_attention_heads={heads} and "
                          "config.json has no head_dim")
    # Qwen2 slides its attention window only in layers >= max_window_layers: with none of those, attention is global.
    # 28: transformers' Qwen2Config default, which applies when config.json has no max_window_layers.
    layers, window_layers = int(_required(hf, "num_hidden_layers")), hf.get("max_window_layers", 28)
    sliding = hf.get("use_sliding_window") and hf.get("sliding_window", 4096)  # 4096: transformers' default
    layer_types = hf.get("layer_types")
    if sliding and layer_types is not None:  # transformers >= 4.53 takes an explicit list over max_window_layers
        slid = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        if slid:
            raise ConfigError(f"model.from_hf: use_sliding_window=true with layer_types naming "
                              f"{len(slid)} sliding_attention layer(s) (first: {slid[0]}) is not supported (the "
                              "model attends globally in every layer)")
    elif sliding and (window_layers is None or int(window_layers) < layers):
        raise ConfigError(f"model.from_hf: use_sliding_window=true with max_window_layers={window_layers} < "
                          f"num_hidden_layers={layers} is not supported (the model attends globally in every layer)")


def model_fields_from_hf(hf: dict) -> dict:
    """Map HF config keys to ours. Raises :class:`ConfigError` for an unsupported architecture."""
    hf = legacy_rope_keys(hf)
    archs = hf.get("architectures") or []
    family = next((_FAMILIES[a] for a in archs if a in _FAMILIES), None)
    refused = next((a for a in archs if a in REFUSED_ARCHITECTURES), None)
    if family is None and refused is not None:
        raise ConfigError(f"model.from_hf: architectures {archs!r}: {REFUSED_ARCHITECTURES[refused]}")
    if family == "gemma3":
        return gemma3_fields(hf)
    if family is None:
        raise ConfigError(f"model.from_hf: unsupported architectures {archs!r}; expected one of {list(_FAMILIES)}")
    if family == "qwen3" and hf.get("head_dim") is None:
        # transformers' Qwen3Config has head_dim=128 of its own (not hidden/heads, as Llama's and Qwen2's null means):
        # a config.json without it builds 128-wide heads there
        hf = {**hf, "head_dim": 128}
    _check_supported(hf, family)
    heads, head_dim = int(hf["num_attention_heads"]), hf.get("head_dim")
    kv_default = heads if "num_key_value_heads" in hf else _KV_HEADS_DEFAULT.get(family, heads)
    return {
        "family": family,
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_query_groups": int(_optional(hf, "num_key_value_heads", kv_default)),  # transformers: None = MHA
        "ffn_hidden_size": int(_required(hf, "intermediate_size")),
        "vocab_size": int(_required(hf, "vocab_size")),
        "max_position_embeddings": int(_optional(hf, "max_position_embeddings", 4096)),
        "rope_theta": float(_optional(hf, "rope_theta", 10000.0)),
        **(phi3_rope_fields(hf) if family == "phi3" else {  # longrope, partial rotary: config/hf_phi3.py
            "rope_scaling": _rope_scaling(hf.get("rope_scaling"), hf.get("max_position_embeddings")),
            "partial_rotary_factor": 1.0}),
        "norm_epsilon": float(_optional(hf, "rms_norm_eps", _NORM_EPS_DEFAULT.get(family, 1e-6))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": family == "qwen2",  # Llama with attention_bias is refused above
        # only where it differs from hidden/heads (Qwen3-32B: 128, not 5120/64), so that a Llama config stays null
        "head_dim": int(head_dim) if head_dim is not None and int(head_dim) * heads != int(hf["hidden_size"]) else None,
        "qk_norm": family == "qwen3",
        "sliding_window": _window(hf, family) if family in _WINDOW_DEFAULT else None,  # Qwen's: refused above
    }


def _window(hf: dict, family: str) -> int | None:
    """Mistral's and Phi3's attention window: every layer slides (no use_sliding_window switch); an absent key is
    the config class's default, a null one no window (Mistral v0.2+, Nemo, phi-4; Phi-3-mini-4k has 2047)."""
    window = hf.get("sliding_window", _WINDOW_DEFAULT[family])
    return None if window is None else int(window)


def _shown(value) -> str:
    return format_value(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)


def _same_field(model, fields: dict, explicit: set[str], key: str) -> bool:
    """Whether the explicit ``model.<key>`` means config.json's value. ``head_dim``: null and hidden/heads are one
    width (Qwen3-8B's config.json 128 = 4096/32 reads as null; a recipe spelling out 128 names the same model)."""
    if key != "head_dim":
        return getattr(model, key) == fields[key]
    merged = dataclasses.replace(model, **{k: v for k, v in fields.items() if k not in explicit})
    return merged.kv_channels == dataclasses.replace(merged, head_dim=fields["head_dim"]).kv_channels


def merge_hf_config(model, explicit: set[str]):
    """Fill ``model`` from ``model.from_hf/config.json``; keys set explicitly in YAML/CLI win.

    An explicit value that disagrees with config.json is a warning (global rank 0; every rank loads the config),
    deliberate for, say, a longer ``max_position_embeddings``, a silent change of the model for ``rope_theta``.
    """
    path = os.path.join(model.from_hf, "config.json")
    if not os.path.isfile(path):
        from bft_megatron.checkpoint.pointer import HF_SUBDIR

        nested = os.path.join(model.from_hf, HF_SUBDIR)  # an import's run directory or a checkpoint's iter_ dir
        hint = (f" (a bft-megatron convert import or checkpoint directory keeps it in {HF_SUBDIR}/: "
                f"model.from_hf={nested})" if os.path.isfile(os.path.join(nested, "config.json")) else "")
        raise ConfigError(f"model.from_hf: {path} does not exist{hint}")
    with open(path, encoding="utf-8") as fh:
        fields = model_fields_from_hf(json.load(fh))
    differ = [f"model.{k}={_shown(getattr(model, k))} (config.json: {_shown(v)})"
              for k, v in fields.items() if k in explicit and not _same_field(model, fields, explicit, k)]
    if differ and int(os.environ.get("RANK", "0")) == 0:
        _log.warning("model.from_hf=%s: explicit model fields differ from its config.json and are used instead: %s",
                     model.from_hf, "; ".join(differ))
    return dataclasses.replace(model, **{k: v for k, v in fields.items() if k not in explicit})
