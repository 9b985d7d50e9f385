"""Data-layer micro-batches -> the tensors the model and the loss take, one optimizer step at a time.

Rows (prepared data or :mod:`~bft_megatron.training.synthetic`) are chosen by the data layer's
``GlobalBatchSampler`` (layout-independent global batches; resuming needs only ``consumed_rows``)
and collated by ``bft_megatron.data.collate``: padded ``[b, s]`` or packed ``[1, T]`` with
``cu_seqlens`` (see docs/data.md).

Fixed shapes: a packed micro-batch is padded at its end to ``T = micro_batch_size * seq_length``
(one extra unsupervised segment), so pipeline stages exchange tensors of one shape and the schedule
sees ``(seq_length=T, micro_batch_size=1)``.

Attention: with Transformer Engine, packed micro-batches go through THD (``PackedSeqParams``).
megatron's local attention (CPU) supports neither THD nor context parallelism, so there packed
micro-batches get a dense block-diagonal causal mask ``[1, 1, T, T]`` (True = masked) built from
``cu_seqlens``; padded rows use the default causal mask. The loss always sees the true sample
boundaries through ``cu_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bft_megatron.data.collate import collate
from bft_megatron.data.loader import GlobalBatchSampler

__all__ = ["MicroBatch", "to_micro_batch", "StepData"]


@dataclass
class MicroBatch:
    """Tensors of one micro-batch on the training device: ``[b, s]`` (padded) or ``[1, T]`` (packed)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32 0/1: the label at this position is supervised
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # [1, 1, T, T] bool, True = masked; None = causal / THD
    cu_seqlens: torch.Tensor | None  # [S+1] int64 sample boundaries of the packed row; None = padded
    max_seqlen: int = 0  # longest segment (THD attention needs it as a host int)
    poison: bool = False  # fault injection (tests): the loss of this micro-batch becomes NaN

    def packed_seq_params(self):
        """THD view for Transformer Engine attention."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


def _block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, T, T]`` bool: query i may attend key j iff j <= i and both are in the same segment."""
    seg = torch.searchsorted(cu_seqlens[1:], torch.arange(total), right=True)
    allowed = (seg.unsqueeze(1) == seg.unsqueeze(0)) & torch.ones(total, total, dtype=torch.bool).tril()
    return (~allowed)[None, None]


def _pad_packed(d: dict, total: int, pad_id: int) -> dict:
    """Extend a packed ``[1, T']`` micro-batch to ``[1, total]`` with one unsupervised trailing segment."""
    extra = total - d["tokens"].shape[1]
    if extra < 0:
        raise ValueError(f"packed micro-batch of {d['tokens'].shape[1]} tokens exceeds micro_batch_size*seq_length"
                         f" = {total}")
    if extra == 0:
        return d
    out = dict(d)
    for key, fill in (("tokens", pad_id), ("labels", pad_id), ("loss_mask", 0)):
        out[key] = torch.cat((d[key], torch.full((1, extra), fill, dtype=d[key].dtype)), dim=1)
    out["position_ids"] = torch.cat((d["position_ids"], torch.arange(extra).unsqueeze(0)), dim=1)
    out["cu_seqlens"] = torch.cat((d["cu_seqlens"].long(), torch.tensor([total])))
    out["max_seqlen"] = max(int(d["max_seqlen"]), extra)
    return out


def to_micro_batch(d: dict, device: torch.device, *, total: int, pad_id: int, dense_mask: bool) -> MicroBatch:
    """Data-layer micro-batch dict -> :class:`MicroBatch` (masks built on CPU, then moved)."""
    packed = "cu_seqlens" in d
    if packed:
        d = _pad_packed(d, total, pad_id)
    cu = d["cu_seqlens"].long() if packed else None
    mask = _block_causal_mask(cu, total) if packed and dense_mask else None
    to = dict(device=device, non_blocking=True)
    return MicroBatch(
        tokens=d["tokens"].long().to(**to), labels=d["labels"].long().to(**to),
        loss_mask=d["loss_mask"].float().to(**to), position_ids=d["position_ids"].long().to(**to),
        attention_mask=None if mask is None else mask.to(**to), cu_seqlens=None if cu is None else cu.to(**to),
        max_seqlen=int(d["max_seqlen"]) if packed else 0,
    )


class StepData:
    """One split's rows, served one global batch per call; state = ``consumed_rows``."""

    def __init__(self, dataset, *, packed: bool, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, seq_length: int, device: torch.device, dense_mask: bool) -> None:
        self.dataset, self.packed, self.device, self.dense_mask = dataset, packed, device, dense_mask
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size=global_batch_size,
                                          micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                          seed=seed)
        self.total = micro_batch_size * seq_length
        self.consumed_rows = 0
        self.last_real_tokens = 0  # non-padding tokens of this rank's last step (effective throughput)

    def next_step(self) -> list[MicroBatch]:
        """This DP rank's micro-batches of the next global batch; advances ``consumed_rows``."""
        batch = self.sampler.global_batch(self.consumed_rows)
        self.consumed_rows += self.sampler.gbs
        out, self.last_real_tokens = [], 0
        for rows in self.sampler.rank_microbatches(batch):
            samples = [self.dataset[int(r)] for r in rows]
            self.last_real_tokens += sum(len(s.tokens) for s in samples)
            d = collate(samples, packed=self.packed, pad_id=self.dataset.pad_id)
            out.append(to_micro_batch(d, self.device, total=self.total, pad_id=self.dataset.pad_id,
                                      dense_mask=self.dense_mask))
        return out

    @property
    def schedule_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) as the pipeline schedule must see them."""
        return (self.total, 1) if self.packed else (self.total // self.sampler.mbs, self.sampler.mbs)

