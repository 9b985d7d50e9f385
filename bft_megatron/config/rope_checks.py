"""Validation of Phi3's RoPE fields (part of :func:`bft_megatron.config.validate`): ``longrope`` scaling and
``partial_rotary_factor``. Errors are :class:`ConfigError` naming the field(s) and value(s)."""

from __future__ import annotations

from bft_megatron.config.base import ConfigError

__all__ = ["check_phi3_rope", "check_longrope_rows", "longrope_warnings"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_phi3_rope(m) -> None:
    """``model.partial_rotary_factor`` and a ``longrope`` ``model.rope_scaling``: Phi3 only, and in range."""
    p = m.partial_rotary_factor
    _require(0 < p <= 1, f"model.partial_rotary_factor must be in (0, 1], got {p}")
    _require(p == 1 or m.family == "phi3", f"model.partial_rotary_factor={p} with model.family={m.family}: only "
             "Phi3 (model.family=phi3, e.g. Phi-4-mini) rotates part of each head here; leave it 1.0")
    even = m.rotary_dim >= 2 and m.rotary_dim % 2 == 0  # (whole heads: the head width's own checks)
    _require(p == 1 or even, f"model.partial_rotary_factor={p} rotates int(head width {m.kv_channels} * {p}) = "
             f"{m.rotary_dim} channels per head: RoPE needs a positive even number")
    rs = m.rope_scaling
    longrope = rs is not None and rs.rope_type == "longrope"
    # Phi3Config knows only longrope: llama3 or yarn scaling would not load in transformers
    _require(m.family != "phi3" or rs is None or longrope, f"model.rope_scaling.rope_type={rs and rs.rope_type} with "
             "model.family=phi3: HF Phi3 has only longrope scaling; use rope_type longrope or leave it null")
    _require(m.family == "phi3" or not longrope, f"model.rope_scaling.rope_type=longrope with model.family="
             f"{m.family}: only Phi3 (model.family=phi3) has longrope scaling here")
    if longrope:
        _check_longrope(rs, m.rotary_dim)


def _check_longrope(rs, rotary_dim: int) -> None:
    """HF's own checks (``Phi3Config.validate_rope``, ``_validate_longrope_rope_parameters``) as errors, plus positive
    values: a factor <= 0 makes a frequency infinite or negative."""
    _require(rs.original_max_position_embeddings >= 1, "model.rope_scaling.original_max_position_embeddings must be "
             f">= 1, got {rs.original_max_position_embeddings}")
    _require(rs.factor > 0, f"model.rope_scaling.factor must be > 0, got {rs.factor}")
    _require(rs.attention_factor is None or rs.attention_factor > 0,
             f"model.rope_scaling.attention_factor must be > 0 or null, got {rs.attention_factor}")
    for name in ("short_factor", "long_factor"):
        values = getattr(rs, name)
        _require(values is not None, f"model.rope_scaling.{name} is null with rope_type longrope: it needs "
                 f"rotary_dim/2 = {rotary_dim // 2} numbers (model.from_hf reads them from config.json)")
        _require(len(values) == rotary_dim // 2, f"model.rope_scaling.{name} has {len(values)} numbers, rope_type "
                 f"longrope needs one per rotated channel pair: int(head width * model.partial_rotary_factor)/2 = "
                 f"{rotary_dim // 2}")
        bad = [v for v in values if not v > 0]
        _require(not bad, f"model.rope_scaling.{name} must be all > 0, got {bad[0] if bad else None} among them")


def check_longrope_rows(cfg) -> None:
    """Rows longer than longrope's original length. HF picks the factors per forward by the batch's largest position:
    long factors for a sample longer than original_max_position_embeddings, short ones for every shorter sample. A
    model built once cannot do both for the samples of such rows (shorter samples would train on other frequencies
    than inference uses them with), so they are refused; rows up to that length are exact (short factors)."""
    rs, seq = cfg.model.rope_scaling, cfg.data.seq_length
    if rs is None or rs.rope_type != "longrope":
        return
    original = rs.original_max_position_embeddings
    _require(seq <= original, f"data.seq_length={seq} > model.rope_scaling.original_max_position_embeddings="
             f"{original} with rope_type longrope is not supported: transformers uses the long factors only for "
             f"samples longer than {original} tokens and the short ones for every shorter sample, which one built "
             f"model cannot do for all samples of such rows; use data.seq_length <= {original}")


def longrope_warnings(m) -> list[str]:
    """A longrope ``factor`` other than max_position_embeddings / original length: transformers 5 uses the factor for
    the default attention factor, transformers 4.x's Phi3 the ratio of the exported config.json's lengths."""
    rs = m.rope_scaling
    if rs is None or rs.rope_type != "longrope" or rs.attention_factor is not None:
        return []
    ratio = m.max_position_embeddings / rs.original_max_position_embeddings
    if abs(rs.factor - ratio) <= 1e-9 * ratio:
        return []
    return [f"model.rope_scaling.factor={rs.factor} differs from model.max_position_embeddings / "
            f"model.rope_scaling.original_max_position_embeddings = {ratio:g}: the attention factor is the factor's "
            "(as transformers 5), but transformers 4.x derives it from that ratio of an exported config.json; set "
            "model.rope_scaling.attention_factor to pin it for both"]
