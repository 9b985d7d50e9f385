"""Context-parallel token placement: which tokens of a sequence a CP rank holds, and where they go.

Megatron (and Transformer Engine's THD partitioning) split every sample into ``2*CP`` equal chunks
and give CP rank ``r`` chunks ``r`` and ``2*CP-1-r`` (causal-attention load balance), concatenated
in that order. For packed batches this happens per sample: each sample's length is padded to a
multiple of ``2*CP`` and the local row is the concatenation, sample by sample, of the two chunks.

These helpers compute, without host synchronisation, the *global* position of every local token;
the loss uses them to rebuild each sample's full token order after an all-gather, and the CPU
tests use :func:`split_for_cp` to produce a rank's shard. Everything is vectorised over samples.
"""

from __future__ import annotations

import torch

__all__ = ["local_to_global_positions", "split_for_cp"]


def _padded_positions(batch: int, local_len: int, cp_size: int, cp_rank: int, device) -> torch.Tensor:
    """Global flat positions ``[batch*local_len]`` of a padded ``[batch, local_len]`` CP shard."""
    chunk = local_len // 2
    i = torch.arange(local_len, device=device)
    in_row = torch.where(i < chunk, cp_rank * chunk + i, (2 * cp_size - 1 - cp_rank) * chunk + (i - chunk))
    rows = torch.arange(batch, device=device).unsqueeze(1) * (local_len * cp_size)
    return (rows + in_row).reshape(-1)


def _packed_positions(cu_seqlens: torch.Tensor, local_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions ``[local_len]`` of a packed CP shard; ``cu_seqlens`` are the global boundaries."""
    cu = cu_seqlens.to(torch.int64)
    cu_local = cu // cp_size
    j = torch.arange(local_len, device=cu.device)
    num_samples = cu.numel() - 1
    # Sample of each local token; tokens past the last boundary (trailing padding) get id num_samples.
    sample = torch.searchsorted(cu_local[1:], j, right=True)
    in_sample = sample < num_samples
    sid = sample.clamp(max=num_samples - 1)
    offset = j - cu_local[sid]
    chunk = (cu[sid + 1] - cu[sid]) // (2 * cp_size)
    pos = cu[sid] + torch.where(offset < chunk, cp_rank * chunk + offset,
                                (2 * cp_size - 1 - cp_rank) * chunk + (offset - chunk))
    # Trailing padding (if any): give each rank its own block after the last sample.
    tail_len = local_len - cu_local[-1]
    tail = cu[-1] + cp_rank * tail_len + (j - cu_local[-1])
    return torch.where(in_sample, pos, tail)


def local_to_global_positions(
    local_shape: tuple[int, ...],
    cp_size: int,
    cp_rank: int,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat global positions (int64) of the tokens of this CP rank's ``[b, s/CP]`` or ``[1, T/CP]`` shard.

    Padded layout (``cu_seqlens`` None): row ``b`` of the global ``[b, s]`` batch starts at ``b*s``.
    Packed layout: positions index the global ``[1, T]`` row; ``cu_seqlens`` (global, each sample a
    multiple of ``2*CP`` long) give the sample boundaries.
    """
    batch, local_len = local_shape
    if cu_seqlens is None:
        if local_len % 2:
            raise ValueError(f"a CP shard holds two equal chunks per row; local length {local_len} is odd")
        return _padded_positions(batch, local_len, cp_size, cp_rank, device)
    if batch != 1:
        raise ValueError(f"packed (cu_seqlens) batches must have shape [1, T/CP], got {tuple(local_shape)}")
    return _packed_positions(cu_seqlens, local_len, cp_size, cp_rank)


def split_for_cp(
    tensor: torch.Tensor, cp_size: int, cp_rank: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """This CP rank's load-balanced shard of a global ``[b, s]`` / ``[1, T]`` (or ``[b, s, ...]``) tensor."""
    batch, length = tensor.shape[:2]
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} must be a multiple of 2*CP = {2 * cp_size}")
    local_shape = (batch, length // cp_size)
    pos = local_to_global_positions(local_shape, cp_size, cp_rank, cu_seqlens, tensor.device)
    flat = tensor.reshape(batch * length, *tensor.shape[2:])
    return flat[pos].reshape(*local_shape, *tensor.shape[2:])
