"""Rows -> micro-batches: sampling order, data-parallel slicing, attention masks, sample boundaries.

A *row* is one training sequence of ``seq_length`` positions, a dict of numpy arrays:
``tokens``, ``labels`` (int64; the next token), ``loss_mask`` (1 = supervised label),
``position_ids`` (restart at every packed sample) and ``segment_ids`` (sample index inside the row;
padding gets its own id). A *padded* row holds one sample, a *packed* row several.

Order: the global batch of step ``k`` is rows ``consumed .. consumed + global_batch_size`` of an
epoch-wise seeded permutation; micro-batch ``j`` of data-parallel rank ``d`` takes rows
``(j*dp + d)*mbs ..`` of it. The global batch is therefore the same set of rows at any DP size or
accumulation count, which is what makes the loss layout-invariant, and resuming only needs
``consumed`` (rows).

Attention on CPU: megatron's local attention supports neither THD packing nor context
parallelism, so packed rows get a dense block-diagonal causal mask ``[b, 1, s, s]`` (True =
masked); padded rows use the default causal mask. The loss always sees true sample boundaries:
packed micro-batches are flattened to ``[1, b*s]`` with ``cu_seqlens`` (one segment per sample
and per padding run; segments with no supervised token are not counted by the objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["RowDataset", "RowSampler", "MicroBatch", "collate"]

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


class RowDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclass
class MicroBatch:
    """Tensors of one micro-batch on the training device. Shapes ``[b, s]`` unless noted."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32 0/1
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # [b, 1, s, s] bool, True = masked; None = plain causal
    cu_seqlens: torch.Tensor | None  # [S+1] int64 over the flattened [1, b*s] view; None = padded rows
    max_seqlen: int = 0  # longest segment (THD attention needs it as a host int)
    poison: bool = False  # fault injection (tests): the loss of this micro-batch becomes NaN

    def packed_seq_params(self):
        """THD view for Transformer Engine attention: the micro-batch as one ``[1, b*s]`` sequence."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def _cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of runs of equal ids in the flattened ``[b*s]`` view; rows never share a run."""
    b, s = segment_ids.shape
    flat = (segment_ids.long() + torch.arange(b).unsqueeze(1) * (s + 1)).reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(change).squeeze(1)
    return torch.cat((starts, torch.tensor([flat.numel()]))).long()


def _block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool: query i may attend key j iff j <= i and both are in the same segment."""
    s = segment_ids.shape[1]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (~(same & causal)).unsqueeze(1)


def collate(rows: list[dict[str, np.ndarray]], packed: bool, device: torch.device, thd: bool = False) -> MicroBatch:
    """Stack rows into a :class:`MicroBatch` (masks and boundaries built on CPU, then moved).

    ``thd``: packed rows will go through THD attention (Transformer Engine), so no dense mask is built.
    """
    t = {k: torch.from_numpy(np.stack([np.asarray(r[k]) for r in rows])) for k in ROW_KEYS}
    seg = t["segment_ids"]
    mask = _block_causal_mask(seg) if packed and not thd else None
    cu = _cu_seqlens(seg) if packed else None
    to = dict(device=device, non_blocking=True)
    return MicroBatch(
        tokens=t["tokens"].long().to(**to), labels=t["labels"].long().to(**to),
        loss_mask=t["loss_mask"].float().to(**to), position_ids=t["position_ids"].long().to(**to),
        attention_mask=None if mask is None else mask.to(**to), cu_seqlens=None if cu is None else cu.to(**to),
        max_seqlen=int((cu[1:] - cu[:-1]).max()) if cu is not None else 0,
    )


class RowSampler:
    """Deterministic, resumable row order (see the module docstring). State = ``consumed`` rows."""

    def __init__(self, dataset: RowDataset, seed: int, consumed: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows")
        self.dataset = dataset
        self.seed = seed
        self.consumed = consumed
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _row(self, global_index: int) -> dict[str, np.ndarray]:
        n = len(self.dataset)
        epoch, offset = divmod(global_index, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return self.dataset[int(self._perm[offset])]

    def step_rows(self, global_batch: int, micro_batch: int, dp: int, dp_rank: int) -> list[list[dict]]:
        """This DP rank's micro-batches (lists of rows) of the next step; advances ``consumed``."""
        num_micro = global_batch // (micro_batch * dp)
        out = []
        for j in range(num_micro):
            first = self.consumed + (j * dp + dp_rank) * micro_batch
            out.append([self._row(first + r) for r in range(micro_batch)])
        self.consumed += global_batch
        return out
