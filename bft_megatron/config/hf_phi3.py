"""Phi3's RoPE keys of a Hugging Face ``config.json``: ``longrope`` scaling (Phi-3.5-mini, Phi-3-mini/medium-128k,
Phi-4-mini) and ``partial_rotary_factor`` (Phi-4-mini: 0.75), read as transformers' ``Phi3Config`` reads them in both
spellings: transformers 4.x's top-level ``rope_scaling`` / ``partial_rotary_factor`` and transformers 5's
``rope_parameters`` holding them (after :func:`bft_megatron.config.hf.legacy_rope_keys`, which copies a non-default
``rope_parameters`` to ``rope_scaling``)."""

from __future__ import annotations

from bft_megatron.config.base import ConfigError
from bft_megatron.utils.logging import get_logger

__all__ = ["phi3_rope_fields", "PHI3_ORIGINAL_DEFAULT"]

_log = get_logger(__name__)
PHI3_ORIGINAL_DEFAULT = 4096  # Phi3Config's original_max_position_embeddings (and max_position_embeddings)


def _rope_dict(hf: dict) -> dict:
    """Phi3Config takes ``rope_scaling`` over ``rope_parameters`` (``convert_rope_params_to_dict``)."""
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(key), dict) and hf[key]:
            return hf[key]
    return {}


def _partial(hf: dict, rope: dict) -> float:
    """transformers 5 keeps it in the RoPE dict (which wins there), 4.x top-level; absent: 1.0 (whole heads)."""
    for src in (rope, hf):
        if src.get("partial_rotary_factor") is not None:
            return float(src["partial_rotary_factor"])
    return 1.0


def _factors(rope: dict, key: str) -> list[float]:
    value = rope.get(key)
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ConfigError(f"model.from_hf: config.json's longrope rope_scaling.{key} must be a list of numbers, got "
                          f"{value!r}")
    return [float(x) for x in value]


def _longrope(hf: dict, rope: dict):
    """HF's longrope parameters: the original length is the top-level key (Phi3Config's 4096 when absent; it wins over
    one inside the RoPE dict, as in transformers); a null factor is max_position_embeddings over it."""
    from bft_megatron.config.schema import RopeScaling

    original = int(hf.get("original_max_position_embeddings") or PHI3_ORIGINAL_DEFAULT)
    inner = rope.get("original_max_position_embeddings")
    if inner is not None and int(inner) != original:
        _log.warning("config.json: rope_scaling.original_max_position_embeddings=%s differs from the top-level "
                     "original_max_position_embeddings=%s; the top-level one applies (as in transformers' Phi3)",
                     inner, original)
    factor = rope.get("factor")
    if factor is None:
        factor = int(hf.get("max_position_embeddings") or PHI3_ORIGINAL_DEFAULT) / original
    optional = {"attention_factor": float(rope["attention_factor"])} if rope.get("attention_factor") is not None else {}
    return RopeScaling(rope_type="longrope", factor=float(factor), original_max_position_embeddings=original,
                       short_factor=_factors(rope, "short_factor"), long_factor=_factors(rope, "long_factor"),
                       **optional)


def phi3_rope_fields(hf: dict) -> dict:
    """``{"rope_scaling": RopeScaling | None, "partial_rotary_factor": float}`` of a Phi3 config.json. Phi3Config
    knows only longrope (its old names ``su`` and ``yarn`` included, renamed as transformers does); another
    rope_type is refused."""
    rope = _rope_dict(hf)
    kind = rope.get("rope_type", rope.get("type"))
    scaling = None
    if kind in ("longrope", "su", "yarn"):
        scaling = _longrope(hf, rope)
    elif kind not in (None, "default"):
        raise ConfigError(f"model.from_hf: rope_scaling with rope_type={kind!r} is not supported for Phi3 (HF's "
                          "Phi3Config knows only 'longrope')")
    return {"rope_scaling": scaling, "partial_rotary_factor": _partial(hf, rope)}
