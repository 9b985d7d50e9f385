"""Per-rule tensor transforms in both directions (HF <-> megatron), driven by :mod:`.mapping`.

Megatron tensors here are in the *global* layout: gathered over TP, one layer (no layer axis).
For ``linear_fc1`` the layout depends on how it was gathered: a dist checkpoint stores
``[gate; up]`` (``tp=1``); concatenating in-memory shards of a TP-``n`` model gives the per-shard
interleave (``tp=n``). Vocabulary tensors carry megatron's padding rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert.mapping import Rule
from bft_megatron.convert.qkv import merge_gate_up, merge_qkv, split_gate_up, split_qkv

__all__ = ["to_megatron", "to_hf", "pad_rows", "cast"]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad ``[V, H]`` with zero rows to ``[rows, H]`` (megatron's padded vocabulary)."""
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def _qkv_rows(m: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in an HF projection: ``heads*d``, ``groups*d``, ``groups*d``."""
    return m.num_attention_heads * m.kv_channels, m.kv_groups * m.kv_channels, m.kv_groups * m.kv_channels


def _fused(name: str, read: Callable[[str], torch.Tensor], rows: tuple[int, ...]) -> torch.Tensor:
    """The fused HF tensor ``name`` (Phi3), checked to be its parts' ``rows`` one after another."""
    fused = read(name)
    if fused.shape[0] != sum(rows):
        raise ValueError(f"{name} has {fused.shape[0]} rows, expected {' + '.join(map(str, rows))} = {sum(rows)}")
    return fused


def to_megatron(rule: Rule, read: Callable[[str], torch.Tensor], m: ModelConfig, layer: int | None,
                padded_vocab: int) -> torch.Tensor:
    """One megatron tensor (global layout, ``[gate; up]`` for fc1) from the HF tensors of ``rule``.

    ``read(name)`` returns an HF tensor; ``layer`` fills ``{i}`` in per-layer HF names.
    """
    names = rule.hf_names(layer)
    if rule.kind == "qkv":
        rows = _qkv_rows(m)
        q, k, v = torch.split(_fused(names[0], read, rows), rows) if rule.fused else (read(n) for n in names)
        return merge_qkv(q, k, v, m.num_attention_heads, m.kv_groups, m.kv_channels)
    if rule.kind == "gate_up":
        if rule.fused:  # Phi3's gate_up_proj [gate; up] is already fc1's TP-independent layout: no copy
            return _fused(names[0], read, (m.ffn_hidden_size, m.ffn_hidden_size))
        gate, up = (read(n) for n in names)
        return merge_gate_up(gate, up, tp=1)
    tensor = read(names[0])
    if rule.kind == "vocab":
        if tensor.shape[0] != m.vocab_size:
            raise ValueError(f"{names[0]} has {tensor.shape[0]} rows but vocab_size is {m.vocab_size}")
        return pad_rows(tensor, padded_vocab)
    return tensor


def to_hf(rule: Rule, tensor: torch.Tensor, m: ModelConfig, layer: int | None,
          fc1_tp: int = 1) -> list[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs from one megatron tensor (global layout; see module doc for fc1)."""
    names = rule.hf_names(layer)
    if rule.kind in ("qkv", "gate_up"):
        parts = (split_qkv(tensor, m.num_attention_heads, m.kv_groups, m.kv_channels) if rule.kind == "qkv"
                 else split_gate_up(tensor, tp=fc1_tp))
        # fused (Phi3): the parts one after another, [q; k; v] or [gate; up], under the one HF name
        return [(names[0], torch.cat(parts))] if rule.fused else list(zip(names, parts))
    if rule.kind == "vocab":
        if tensor.shape[0] < m.vocab_size:
            raise ValueError(f"{rule.local} has {tensor.shape[0]} rows, fewer than vocab_size={m.vocab_size}")
        tensor = tensor[: m.vocab_size]  # strip megatron's padding rows
    return [(names[0], tensor)]


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (``None``: unchanged), refusing a cast that turns finite values into inf.

    fp16's largest value is 65504: a bf16/fp32-trained weight beyond it (rare, but embedding and norm weights
    of long fine-tunes do get there) would be written as inf and the exported model would produce NaNs.
    """
    if dtype is None or dtype == tensor.dtype:
        return tensor
    out = tensor.to(dtype)
    if out.is_floating_point() and (torch.isinf(out) & torch.isfinite(tensor)).any():
        big = tensor.abs().max().item()
        raise ValueError(f"{name}: a value of magnitude {big:.6g} does not fit {str(dtype).removeprefix('torch.')} "
                         f"(largest {torch.finfo(dtype).max:.6g}); export in bf16 or fp32 instead")
    return out
