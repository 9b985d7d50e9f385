"""Layout helpers: fused QKV (interleaved per query group) and fused gate/up (``linear_fc1``).

QKV. HF keeps ``q_proj [heads*d, H]``, ``k_proj [groups*d, H]``, ``v_proj [groups*d, H]`` (``d`` =
head dim; biases are the same without ``H``). megatron's ``linear_qkv`` is
``[groups * (heads/groups + 2) * d, H]``: for each query group g, the ``heads/groups`` query heads of
g, then g's key head, then g's value head. Tensor parallelism splits whole groups, so this global
layout is the same at every TP size and is what a dist checkpoint stores.

gate/up. megatron's ``linear_fc1`` of a gated MLP is ``[2*ffn/TP, H]`` per TP rank: that rank's gate
rows then its up rows. Gathered over TP it is ``[g0; u0; g1; u1; ...]``. A dist checkpoint stores
the TP-independent ``[gate; up]`` (megatron's swiglu sharded factory), i.e. the ``tp=1`` layout.
"""

from __future__ import annotations

import torch

__all__ = ["merge_qkv", "split_qkv", "merge_gate_up", "split_gate_up"]


def _check_groups(num_heads: int, num_groups: int) -> int:
    if num_groups <= 0 or num_heads % num_groups:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_query_groups={num_groups}")
    return num_heads // num_groups


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
              head_dim: int) -> torch.Tensor:
    """HF q/k/v (weights ``[rows, H]`` or biases ``[rows]``) -> megatron ``linear_qkv`` (global layout)."""
    per_group = _check_groups(num_heads, num_groups)
    expected = (num_heads * head_dim, num_groups * head_dim, num_groups * head_dim)
    for name, t, rows in (("q", q, expected[0]), ("k", k, expected[1]), ("v", v, expected[2])):
        if t.shape[0] != rows:
            raise ValueError(f"{name} projection has {t.shape[0]} rows, expected {rows} "
                             f"(heads={num_heads}, groups={num_groups}, head_dim={head_dim})")
    tail = q.shape[1:]
    qg = q.reshape(num_groups, per_group * head_dim, *tail)
    kg = k.reshape(num_groups, head_dim, *tail)
    vg = v.reshape(num_groups, head_dim, *tail)
    return torch.cat((qg, kg, vg), dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron ``linear_qkv`` (global layout) -> HF (q, k, v); inverse of :func:`merge_qkv`."""
    per_group = _check_groups(num_heads, num_groups)
    rows = num_groups * (per_group + 2) * head_dim
    if qkv.shape[0] != rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {rows} "
                         f"(heads={num_heads}, groups={num_groups}, head_dim={head_dim})")
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """HF gate/up ``[ffn, H]`` -> ``linear_fc1`` gathered over ``tp`` shards: ``[g0; u0; g1; u1; ...]``."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    if gate.shape[0] % tp:
        raise ValueError(f"ffn_hidden_size={gate.shape[0]} is not divisible by tensor-parallel size {tp}")
    tail = gate.shape[1:]
    g = gate.reshape(tp, -1, *tail)
    u = up.reshape(tp, -1, *tail)
    return torch.cat((g, u), dim=1).reshape(-1, *tail)


def split_gate_up(fc1: torch.Tensor, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_fc1`` gathered over ``tp`` shards -> HF (gate, up); inverse of :func:`merge_gate_up`."""
    if fc1.shape[0] % (2 * tp):
        raise ValueError(f"linear_fc1 has {fc1.shape[0]} rows, not divisible by 2*tp={2 * tp}")
    tail = fc1.shape[1:]
    shards = fc1.reshape(tp, 2, -1, *tail)
    return shards[:, 0].reshape(-1, *tail).contiguous(), shards[:, 1].reshape(-1, *tail).contiguous()
