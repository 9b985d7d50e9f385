"""The loss's units of a micro-batch, counted from its mask and boundaries alone (before any forward pass).

:func:`~bft_megatron.loss.objective.objective` returns ``loss_sum`` and ``num_units`` (supervised tokens for
sft/dft, samples with >= 1 supervised token for bft); the global loss is ``sum(loss_sum) / sum(num_units)``
over every micro-batch of the step on every DP rank. The units depend only on the loss mask and the sample
boundaries, so the trainer counts them when it builds the step's micro-batches (:func:`unit_counts`, on the
host, the whole micro-batch before its context-parallel split) and scales each ``loss_sum`` by
``1/global units`` before the backward pass. That replaces megatron's scaling of the whole fp32 gradient buffer
after it (a read and a write of 4 bytes per parameter per step, and a host sync in megatron-core 0.16/0.17) with
one scalar multiply.
"""

from __future__ import annotations

import torch

__all__ = ["unit_counts", "UNIT_INDEX"]

# Position of each method's units in the vector returned by :func:`unit_counts`.
UNIT_INDEX = {"sft": 0, "dft": 0, "bft": 1}


def unit_counts(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``[2]`` int64: (supervised tokens, samples with >= 1 supervised token) of one micro-batch.

    ``loss_mask``: ``[b, s]`` (padded: each row a sample) or ``[1, T]`` with ``cu_seqlens`` (packed: each
    segment ``cu_seqlens[i]:cu_seqlens[i+1]`` a sample; tokens after the last boundary count for nothing, as in
    the objective). The whole micro-batch (not a context-parallel shard): the same numbers the objective's
    ``num_units`` sum to over the CP ranks.
    """
    m = loss_mask != 0
    if cu_seqlens is None:
        return torch.stack((m.sum(), m.any(dim=1).sum())).to(torch.int64)
    flat = m.reshape(-1).to(torch.int64)
    cu = cu_seqlens.to(device=flat.device, dtype=torch.int64)
    prefix = torch.cat((flat.new_zeros(1), flat.cumsum(0)))  # prefix[i] = supervised tokens before position i
    per_sample = prefix[cu[1:]] - prefix[cu[:-1]]
    return torch.stack((prefix[cu[-1]], (per_sample > 0).sum())).to(torch.int64)
