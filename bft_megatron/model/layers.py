"""Layers the local (non-Transformer-Engine) spec needs beyond megatron-core's own.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism: under SP each tensor-parallel
rank normalises a different slice of the sequence, so the norm weight's gradient is a *partial* sum
that must be all-reduced over TP. ``finalize_model_grads`` does that for every parameter carrying
``sequence_parallel=True``; :class:`RMSNorm` sets that flag.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RMSNorm", "llama3_inv_freq", "yarn_inv_freq", "longrope_inv_freq"]


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm: ``x / rms(x) * weight``, statistics in fp32, result in the input dtype.

    With megatron's ``config.layernorm_zero_centered_gamma`` (Gemma 3) it is Gemma's ``x / rms(x) * (1 + weight)``
    (weight initialised to zeros, as HF's), all in fp32 and cast once at the end, as ``Gemma3RMSNorm``: the stored
    weight is HF's own tensor, so import and export copy it bit for bit (no ``1 + w`` rounded into bf16).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Tells finalize_model_grads to all-reduce this grad over TP when sequence parallel is on.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return normed.to(x.dtype) * self.weight


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.x scaled RoPE inverse frequencies ``[head_dim/2]`` (HF ``rope_type: llama3``).

    megatron-core 0.16 only exposes ``factor``; the other three are fixed there (1, 4, 8192), so we
    compute the frequencies ourselves and install them on the model's rotary embedding.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN's inverse frequencies ``[head_dim/2]`` (HF ``rope_type: yarn``, ``_compute_yarn_parameters``): the
    high-frequency dimensions (more than ``beta_fast`` rotations over the original context) keep theirs, the
    low-frequency ones (fewer than ``beta_slow``) are interpolated by ``factor``, a linear ramp in between.
    The attention factor HF multiplies cos and sin by is applied as a softmax scale (model/builder.py)."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def longrope_inv_freq(rotary_dim: int, theta: float, ext_factors: list[float]) -> torch.Tensor:
    """Phi3 longrope's inverse frequencies ``[rotary_dim/2]`` (HF ``rope_type: longrope``,
    ``_compute_longrope_parameters``): the plain RoPE frequencies over the rotated channels, each divided by its
    factor (the short or the long list). The attention factor is applied by model/builder.py."""
    factors = torch.tensor(ext_factors, dtype=torch.float32)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (factors * theta ** exponents)
