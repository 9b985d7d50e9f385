"""A dense core attention for the local (non-Transformer-Engine) spec: packed THD rows and context parallelism.

megatron-core's local ``DotProductAttention`` refuses both ``PackedSeqParams`` and ``context_parallel_size
> 1`` (only TE's attention has them). This module takes their place in the local spec so that CPU runs
(and GPU runs without TE) train the same batch layouts as TE runs: THD rows of packed samples, and
load-balanced context-parallel shards. It is a *reference*: it materialises the ``[sq, sk]`` score
matrix (O(T^2) memory), fine for tests and tiny models, never meant for real sequence lengths.

Context parallelism: every CP rank holds two of the ``2*CP`` chunks of each sample (megatron's causal
load balance, see :mod:`bft_megatron.parallel.context_parallel`). Keys and values are all-gathered over
the CP group (autograd: the backward reduce-scatters their gradients back to the owning rank); the
mask compares *global* token positions, so query ``i`` sees key ``j`` iff ``pos(j) <= pos(i)`` and,
for THD, both lie in the same (padded) sample. Padding at the end of a sample comes after all of
its real tokens, so real tokens never attend to it.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from bft_megatron.parallel.context_parallel import local_to_global_positions

__all__ = ["ReferenceAttention"]


class ReferenceAttention(MegatronModule):
    """Drop-in ``core_attention`` (same constructor and ``forward`` as megatron's ``DotProductAttention``)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        self.cp_rank = self.cp_group.rank() if self.cp_group is not None else 0
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.dropout = torch.nn.Dropout(p)
        # Sliding window (Gemma 3's local layers): megatron/TE's window_size (left, right), inclusive bounds, on the
        # layers is_layer_window_attention picks; query i then sees keys i-left <= j <= i (right: causal anyway).
        from megatron.core.transformer.utils import is_layer_window_attention

        window = getattr(config, "window_size", None)
        slides = bool(window) and is_layer_window_attention(window, config.window_attn_skip_freq, layer_number)
        self.window_left = window[0] if slides and window[0] >= 0 else None

    # ------------------------------------------------------------------ mask
    def _positions(self, local_len: int, cu: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of this rank's queries ``[sq]`` and of the gathered keys ``[cp*sq]`` (rank order)."""
        if self.cp_size == 1:
            pos = torch.arange(local_len, device=device)
            return pos, pos
        per_rank = [local_to_global_positions((1, local_len), self.cp_size, r, cu, device)
                    for r in range(self.cp_size)]
        return per_rank[self.cp_rank], torch.cat(per_rank)

    def _allowed(self, local_len: int, cu: torch.Tensor | None, attention_mask, device) -> torch.Tensor:
        """Bool ``[sq, sk]`` (or ``[b, 1, sq, sk]`` with an explicit mask): True = query may attend key."""
        pos_q, pos_k = self._positions(local_len, cu, device)
        allowed = pos_k.unsqueeze(0) <= pos_q.unsqueeze(1)
        if self.window_left is not None:  # positions are global in the row; the sample check below keeps it within one
            allowed = allowed & (pos_q.unsqueeze(1) - pos_k.unsqueeze(0) <= self.window_left)
        if cu is not None:  # THD: also the same sample
            seg_q = torch.searchsorted(cu[1:], pos_q, right=True)
            seg_k = torch.searchsorted(cu[1:], pos_k, right=True)
            allowed = allowed & (seg_q.unsqueeze(1) == seg_k.unsqueeze(0))
        if attention_mask is not None:  # megatron convention: True = masked
            if self.cp_size > 1:
                raise ValueError("ReferenceAttention: an explicit attention_mask is not supported with context "
                                 "parallelism (positions define the mask)")
            allowed = allowed & ~attention_mask.bool()
        return allowed

    # ------------------------------------------------------------------ forward
    def _gather_cp(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather along the token dim over CP; backward reduce-scatters (every rank used every key)."""
        if self.cp_size == 1:
            return t
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True, group=self.cp_group)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``query [sq, b, np, hn]``, ``key/value [sk, b, ng, hn]`` (THD: no ``b``) -> ``[sq, b, np*hn]``."""
        if attention_bias is not None:
            raise ValueError("ReferenceAttention does not support attention_bias")
        thd = packed_seq_params is not None
        cu = None
        if thd:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"ReferenceAttention: packed qkv_format must be 'thd', got "
                                 f"{packed_seq_params.qkv_format!r}")
            padded = packed_seq_params.cu_seqlens_q_padded
            cu = (padded if padded is not None else packed_seq_params.cu_seqlens_q).long()
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b = query.shape[:2]
        key, value = self._gather_cp(key), self._gather_cp(value)
        allowed = self._allowed(sq, cu, attention_mask, query.device)
        rep = self.heads // self.groups
        # [s, b, heads, hn] -> [b, heads, s, hn]; GQA: each key/value group serves `rep` query heads.
        q = query.permute(1, 2, 0, 3)
        k = key.repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # [b, heads, sq, sk], fp32 softmax
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(v.dtype)
        if self.dropout.p > 0 and self.config.sequence_parallel:
            probs = self.dropout(probs)
        elif self.dropout.p > 0:  # as megatron: the model-parallel RNG stream unless sequence parallel
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        out = torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, heads*hn]
        return out.squeeze(1) if thd else out
