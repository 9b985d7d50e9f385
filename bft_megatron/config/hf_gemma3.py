"""Read a Gemma 3 text ``config.json`` (``Gemma3ForCausalLM``, ``model_type: gemma3_text``: google/gemma-3-1b,
MedGemma-27B-text, the text halves of gemma-3-4b/12b/27b) into :class:`ModelConfig` fields.

Two spellings exist and both are read: the Hub files of transformers 4.5x (top-level ``rope_theta``,
``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``) and transformers 5's (``rope_parameters``
per layer type, ``{"full_attention": {...}, "sliding_attention": {...}}``, and an explicit ``layer_types`` list).
Absent keys take ``Gemma3TextConfig``'s defaults. What Gemma 3 text models do not compute, or the trainer does
not, is refused by name: logit softcapping (Gemma 2), bidirectional attention, another activation, biases, a
RoPE type other than linear on the global layers, a layer pattern that is not "every N-th layer global".
"""

from __future__ import annotations

from bft_megatron.config.base import ConfigError

__all__ = ["gemma3_fields", "REFUSED_ARCHITECTURES"]

# Architectures named in the error rather than "unsupported": what the user most likely has instead
REFUSED_ARCHITECTURES = {
    "Gemma2ForCausalLM": "Gemma 2 (attention and final logit softcapping, another layer pattern) is not supported; "
                         "Gemma 3 text models (Gemma3ForCausalLM) are",
    "GemmaForCausalLM": "Gemma 1 is not supported; Gemma 3 text models (Gemma3ForCausalLM) are",
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 checkpoint (vision tower, config.json with a "
                                      "text_config) is not supported: only its text model is (Gemma3ForCausalLM, "
                                      "model_type gemma3_text, e.g. google/gemma-3-1b-it or MedGemma-27B-text)",
}
# Gemma3TextConfig's defaults for keys a config.json may lack
_DEFAULTS = {"head_dim": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "sliding_window_pattern": 6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "max_position_embeddings": 131072, "rope_theta": 1e6, "rope_local_base_freq": 1e4}


def _get(hf: dict, key: str):
    value = hf.get(key)
    return _DEFAULTS[key] if value is None else value


def _required(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConfigError(f"model.from_hf: config.json has no {key} (or it is null)")
    return hf[key]


def _check_refused(hf: dict) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ConfigError(f"model.from_hf: {key}={hf[key]} (Gemma 2's logit softcapping) is not supported: "
                              "Gemma 3 has none (null)")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("model.from_hf: use_bidirectional_attention=true (an encoder use of Gemma 3) is not "
                          "supported: the trainer's attention is causal")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"model.from_hf: hidden_activation={act!r} is not supported with Gemma3ForCausalLM (the "
                          "trainer's Gemma 3 MLP is gated gelu with the tanh approximation: gelu_pytorch_tanh)")
    if hf.get("attention_bias"):
        raise ConfigError("model.from_hf: attention_bias=true is not supported with Gemma3ForCausalLM (Gemma 3 "
                          "has no biases)")


def _rope(hf: dict) -> tuple[float, float, float | None]:
    """(global theta, local theta, linear factor of the global layers or None) from either spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        where = "rope_parameters.full_attention"
    else:  # transformers 4.x: rope_scaling applies to the global layers only (Gemma3TextConfig)
        full = dict(hf.get("rope_scaling") or {}, rope_theta=_get(hf, "rope_theta"))
        local = {"rope_type": "default", "rope_theta": _get(hf, "rope_local_base_freq")}
        where = "rope_scaling"
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"model.from_hf: {where} with rope_type={kind!r} is not supported for Gemma 3 (its "
                          "global layers use linear scaling, e.g. factor 8, or none)")
    local_kind = local.get("rope_type", local.get("type", "default"))
    if local_kind != "default":
        raise ConfigError(f"model.from_hf: rope_parameters.sliding_attention with rope_type={local_kind!r} is not "
                          "supported (Gemma 3's sliding layers use unscaled RoPE)")
    factor = float(full["factor"]) if kind == "linear" else None
    if factor is not None and factor <= 0:
        raise ConfigError(f"model.from_hf: {where}.factor={factor} must be > 0")
    theta = full.get("rope_theta")
    local_theta = local.get("rope_theta")
    return (float(_DEFAULTS["rope_theta"] if theta is None else theta),
            float(_DEFAULTS["rope_local_base_freq"] if local_theta is None else local_theta), factor)


def _pattern(hf: dict, layers: int) -> int:
    """N of "layer i (0-based) attends globally iff (i+1) % N == 0" (HF's sliding_window_pattern), checked
    against ``layer_types`` where config.json has one; N = layers+1 if every layer slides."""
    types = hf.get("layer_types")
    if types is None:
        return int(_get(hf, "sliding_window_pattern"))
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"model.from_hf: layer_types must name sliding_attention or full_attention for each of "
                          f"the {layers} layers, got {types!r}")
    for n in range(1, layers + 2):
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(types)):
            return n
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    raise ConfigError(f"model.from_hf: layer_types with full_attention at layers {full} is not supported: the "
                      "trainer needs every N-th layer global (Gemma 3: layers 5, 11, 17, ...)")


def gemma3_fields(hf: dict) -> dict:
    """:class:`ModelConfig` fields of a Gemma3ForCausalLM config.json."""
    _check_refused(hf)
    heads, hidden = int(_required(hf, "num_attention_heads")), int(_required(hf, "hidden_size"))
    layers = int(_required(hf, "num_hidden_layers"))
    head_dim = int(_get(hf, "head_dim"))
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"model.from_hf: head_dim={head_dim} is not a positive even number")
    theta, local_theta, factor = _rope(hf)
    pattern = _pattern(hf, layers)
    window = hf.get("sliding_window", _DEFAULTS["sliding_window"])
    if window is None and pattern <= layers:
        raise ConfigError("model.from_hf: sliding_window=null with sliding layers (layer_types / "
                          "sliding_window_pattern) is not supported")
    return {
        "family": "gemma3",
        "hidden_size": hidden,
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_query_groups": int(_get(hf, "num_key_value_heads")),
        "ffn_hidden_size": int(_required(hf, "intermediate_size")),
        "vocab_size": int(_required(hf, "vocab_size")),
        "max_position_embeddings": int(_get(hf, "max_position_embeddings")),
        "rope_theta": theta,
        "rope_scaling": None,  # llama3's; Gemma 3's linear scaling is rope_linear_factor
        "norm_epsilon": float(_get(hf, "rms_norm_eps")),
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings")),
        "qkv_bias": False,
        # only where it differs from hidden/heads (MedGemma-27B: 128, not 5376/32 = 168), as for the other families
        "head_dim": head_dim if head_dim * heads != hidden else None,
        "qk_norm": True,
        "sliding_window": None if window is None else int(window),
        "sliding_window_pattern": pattern,
        "rope_local_theta": local_theta,
        "rope_linear_factor": factor,
        "query_pre_attn_scalar": float(_get(hf, "query_pre_attn_scalar")),
    }
