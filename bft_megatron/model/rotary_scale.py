"""Longrope's attention factor with partial rotary (Phi-4-mini: 0.75 of each head rotated, a = 1.19).

HF multiplies cos and sin by the attention factor a, i.e. scales the *rotated* channels of each query and key head by
a and leaves the pass-through channels as they are. With whole heads rotated that is a softmax scale of a^2 (as for
YaRN, model/builder.py); with partial rotary it is not. RoPE is linear (rot(a q) = a rot(q)), so scaling the rotated
channels of the query and key heads *before* RoPE is exact: a forward hook multiplies ``linear_qkv``'s output by a
fixed per-channel vector. Its layout is megatron's, per query group [the group's query heads, its key head, its value
head] (``SelfAttention.get_query_key_value_tensors``; the weights' layout of convert/qkv.py), and tensor parallelism
holds whole groups, so each rank's vector is the one-group pattern repeated over its local groups. This works under
TE's fused RoPE (which cannot scale cos/sin), THD, CP and SP alike.
"""

from __future__ import annotations

import torch

__all__ = ["rotary_channel_scale", "install_rotary_attention_factor"]


def rotary_channel_scale(heads_per_group: int, head_dim: int, rotary_dim: int, factor: float) -> torch.Tensor:
    """One query group's ``linear_qkv`` output channels ``[(heads_per_group + 2) * head_dim]``: ``factor`` on the
    first ``rotary_dim`` channels of each query head and of the key head, 1 elsewhere (pass-through, value)."""
    head = torch.ones(head_dim)
    head[:rotary_dim] = factor
    return torch.cat([head] * (heads_per_group + 1) + [torch.ones(head_dim)])


def _hook(scale: torch.Tensor):
    # the full-width vector per (device, dtype, width), made once: a host-to-device copy on every forward would be
    # a blocking copy (a stream sync) per layer and micro-batch
    cache: dict[tuple, torch.Tensor] = {}

    def scale_qkv(module, args, output):
        out, rest = (output, None) if isinstance(output, torch.Tensor) else (output[0], tuple(output[1:]))
        width = scale.numel()
        assert out.shape[-1] % width == 0, f"linear_qkv output width {out.shape[-1]} is not a multiple of {width}"
        key = (out.device, out.dtype, out.shape[-1])
        if key not in cache:
            cache[key] = scale.repeat(out.shape[-1] // width).to(device=out.device, dtype=out.dtype)
        scaled = out * cache[key]
        return scaled if rest is None else (scaled, *rest)  # megatron's linear layers: (output, bias)

    return scale_qkv


def install_rotary_attention_factor(model, m) -> int:
    """Hook every attention layer of ``model`` (a GPTModel chunk) to scale its rotated query/key channels by longrope's
    attention factor; returns the number of layers hooked. ``m`` is the :class:`ModelConfig`."""
    scale = rotary_channel_scale(m.num_attention_heads // m.kv_groups, m.kv_channels, m.rotary_dim,
                                 m.rope_scaling.longrope_attention_factor())
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    for layer in layers:
        layer.self_attention.linear_qkv.register_forward_hook(_hook(scale))
    return len(layers)
