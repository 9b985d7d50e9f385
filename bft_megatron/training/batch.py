"""Data-layer micro-batches -> the tensors the model and the loss take, one optimizer step at a time.

Rows (prepared data or :mod:`~bft_megatron.training.synthetic`) are chosen by the data layer's
``GlobalBatchSampler`` (layout-independent global batches; resuming needs only ``consumed_rows``)
and collated by ``bft_megatron.data.collate``: padded ``[b, s]`` or packed ``[1, T]`` with
``cu_seqlens`` (see docs/data.md).

Fixed shapes: a packed micro-batch is padded at its end to ``T`` tokens (``micro_batch_size *
seq_length`` without CP; :func:`micro_batch_length`) with one extra unsupervised segment, so pipeline
stages exchange tensors of one shape and the schedule sees ``(seq_length=T, micro_batch_size=1)``.

Attention: packed micro-batches always run as THD (``PackedSeqParams``): Transformer Engine's attention
on GPU, :class:`~bft_megatron.model.reference_attention.ReferenceAttention` in the local spec (CPU).

Context parallelism (``cp_size > 1``): every sample of a packed row is padded to a multiple of ``2*CP``
(unsupervised; TE's THD partitioning needs it), the fixed length ``T`` grows to fit the longest padded
row of the dataset, and each CP rank keeps its load-balanced shard (two of the ``2*CP`` chunks of each
sample, or of each padded row) — :func:`~bft_megatron.parallel.context_parallel.split_for_cp`. Shards
are cut on the host, before the copy to the device. ``cu_seqlens`` stay *global* (padded) boundaries:
attention and the loss's CP gather both need them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from bft_megatron.config.validate import packed_row_multiple
from bft_megatron.data.collate import collate, round_up
from bft_megatron.data.loader import GlobalBatchSampler
from bft_megatron.loss.units import unit_counts
from bft_megatron.parallel.context_parallel import split_for_cp
from bft_megatron.training.logit_rows import supervised_rows
from bft_megatron.utils.logging import get_logger

__all__ = ["MicroBatch", "to_micro_batch", "StepData", "micro_batch_length"]

_log = get_logger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch on the training device: ``[b, s]`` (padded) or ``[1, T]`` (packed); ``/CP`` under CP."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32 0/1: the label at this position is supervised
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None  # [S+1] int64 global (padded) sample boundaries of the row; None = padded
    max_seqlen: int = 0  # longest segment (THD attention needs it as a host int)
    poison: bool = False  # fault injection (tests): the loss of this micro-batch becomes NaN
    # [2] int64 on the host (the trainer sums a step's and copies that once): (supervised tokens, samples with
    # one) of the whole micro-batch, all CP shards (loss.units)
    units: torch.Tensor | None = None
    # [S, 3] int64 on the host, one row per sample (padded: per row; packed: per cu_seqlens segment): (row of the
    # split, the sample's index in that row, its sample_id); -1s for padding (a row past the stream's end_row, the
    # packed filler segment). --eval-samples names each sample's statistics by it.
    origins: torch.Tensor | None = None
    # train.supervised_logits_only (bft_megatron.training.logit_rows): the output layer's rows to compute on this
    # rank, and each (gathered) logits row's s-major position in [s * b] (s * b: a padding row); None = every row
    logit_rows: torch.Tensor | None = None
    logit_positions: torch.Tensor | None = None

    def packed_seq_params(self):
        """THD view for Transformer Engine attention."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


def _widen(d: dict, width: int, pad_id: int, what: str) -> tuple[dict, int]:
    """``d`` with ``tokens/labels/loss_mask`` padded on the right to ``width`` columns (unsupervised), and
    the number of columns added; the caller extends ``position_ids`` (and ``cu_seqlens``) to match."""
    rows, have = d["tokens"].shape
    extra = width - have
    if extra < 0:
        raise ValueError(f"{what} of {have} tokens exceeds {width}")
    out = dict(d)
    for key, fill in (("tokens", pad_id), ("labels", pad_id), ("loss_mask", 0)):
        out[key] = torch.cat((d[key], torch.full((rows, extra), fill, dtype=d[key].dtype)), dim=1)
    return out, extra


def _pad_packed(d: dict, total: int, pad_id: int) -> dict:
    """Extend a packed ``[1, T']`` micro-batch to ``[1, total]`` with one unsupervised trailing segment."""
    if d["tokens"].shape[1] == total:
        return d
    out, extra = _widen(d, total, pad_id, "packed micro-batch (the fixed micro-batch length T)")
    out["position_ids"] = torch.cat((d["position_ids"], torch.arange(extra).unsqueeze(0)), dim=1)
    out["cu_seqlens"] = torch.cat((d["cu_seqlens"].long(), torch.tensor([total])))
    out["max_seqlen"] = max(int(d["max_seqlen"]), extra)
    return out


def _pad_columns(d: dict, width: int, pad_id: int) -> dict:
    """Widen a padded ``[b, s']`` micro-batch to ``[b, width]`` (data prepared with a shorter seq_length)."""
    if d["tokens"].shape[1] == width:
        return d
    out, _ = _widen(d, width, pad_id, "padded micro-batch rows (data.seq_length)")
    out["position_ids"] = torch.arange(width).expand(d["tokens"].shape[0], width).clone()
    return out


def to_micro_batch(d: dict, device: torch.device, *, total: int, pad_id: int, cp_size: int = 1,
                   cp_rank: int = 0, origins: torch.Tensor | None = None,
                   logit_rows: tuple[int, int] | None = None) -> MicroBatch:
    """Data-layer micro-batch dict -> :class:`MicroBatch`: fixed length, this CP rank's shard, on ``device``.
    ``origins``: :attr:`MicroBatch.origins` of the collated samples (the packed filler segment is added here).
    ``logit_rows``: ``(tp_sp, tp_rank)`` to compute logits for supervised positions only (:mod:`.logit_rows`)."""
    packed = "cu_seqlens" in d
    if packed:
        d = _pad_packed(d, total, pad_id)
    else:  # every micro-batch [b, total/b]: pipeline stages exchange one shape
        d = _pad_columns(d, total // d["tokens"].shape[0], pad_id)
    cu = d["cu_seqlens"].long() if packed else None
    fields = {"tokens": d["tokens"].long(), "labels": d["labels"].long(), "loss_mask": d["loss_mask"].float(),
              "position_ids": d["position_ids"].long()}
    units = unit_counts(fields["loss_mask"], cu)
    if cp_size > 1:
        fields = {k: split_for_cp(v, cp_size, cp_rank, cu) for k, v in fields.items()}
    fields["cu_seqlens"] = cu
    if logit_rows is not None:
        fields["logit_rows"], fields["logit_positions"] = supervised_rows(fields["loss_mask"], *logit_rows)

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        # CUDA: pinned host memory, so the copy is truly asynchronous (a copy from pageable memory
        # synchronises the stream first, stalling the host's launch-ahead once per tensor).
        if t is None:
            return None
        return (t.pin_memory() if device.type == "cuda" else t).to(device=device, non_blocking=True)

    if origins is not None:  # -1s for the filler segment _pad_packed appended
        segments = cu.numel() - 1 if packed else fields["tokens"].shape[0]
        origins = torch.cat((origins, origins.new_full((segments - origins.shape[0], 3), -1)))
    return MicroBatch(**{k: move(v) for k, v in fields.items()}, max_seqlen=int(d["max_seqlen"]) if packed else 0,
                      units=units, origins=origins)


def _origins(rows: list[int], samples: list, kept: list[bool]) -> torch.Tensor:
    """:attr:`MicroBatch.origins` of the collated ``samples`` (the data layer's rows ``rows``; ``kept`` false: a
    padding row, whose samples get -1s)."""
    parts = []
    for r, row, keep in zip(rows, samples, kept):
        n = len(row.seqlens)
        ids = (np.full(n, r), np.arange(n), np.asarray(row.sample_ids)) if keep else (np.full(n, -1),) * 3
        parts.append(np.stack(ids, axis=1).astype(np.int64))
    return torch.from_numpy(np.concatenate(parts))


def micro_batch_length(dataset, *, packed: bool, micro_batch_size: int, seq_length: int, cp_size: int,
                       tp_sp: int = 1) -> int:
    """Fixed token count ``T`` of one packed micro-batch (``mbs * seq_length`` without CP).

    Under CP each sample grows to a multiple of ``2*CP``: ``T`` becomes ``mbs`` times the longest
    padded row (``dataset.max_padded_row_length``), rounded to ``16*CP*tp_sp`` (``tp_sp`` = TP with
    sequence parallel, else 1): every CP and SP shard is whole and holds a multiple of 8 tokens (FP8
    GEMMs need that; validation requires the same of ``seq_length``). Padded (unpacked) rows keep
    ``seq_length`` columns (validation requires it to be a multiple of ``2*CP``).
    """
    base = micro_batch_size * seq_length
    if not packed or cp_size == 1:
        return base
    longest = max(seq_length, int(dataset.max_padded_row_length(2 * cp_size)))
    return int(round_up(micro_batch_size * longest, packed_row_multiple(cp_size, tp_sp)))


class StepData:
    """One split's rows, served one global batch per call; state = ``consumed_rows``."""

    def __init__(self, dataset, *, packed: bool, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, seq_length: int, device: torch.device, cp_size: int = 1, cp_rank: int = 0,
                 tp_sp: int = 1, end_row: int | None = None, origins: bool = False,
                 logit_rows: tuple[int, int] | None = None) -> None:
        self.dataset, self.packed, self.device = dataset, packed, device
        self.logit_rows = logit_rows  # (tp_sp, tp_rank): logits for supervised positions only (to_micro_batch)
        # MicroBatch.origins (--eval-samples) built per micro-batch only where asked: not on the training stream
        self.origins = origins
        # Rows at stream positions >= end_row are padding (loss mask zeroed: they count for nothing): a validation
        # pass over the whole split fills its last global batch with them. None = an endless stream.
        self.end_row = end_row
        self.cp_size, self.cp_rank = cp_size, cp_rank
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size=global_batch_size,
                                          micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                          seed=seed)
        self.total = micro_batch_length(dataset, packed=packed, micro_batch_size=micro_batch_size,
                                        seq_length=seq_length, cp_size=cp_size, tp_sp=tp_sp)
        # Per-sample padding: only context parallelism needs it (TE's THD partitioning, 2*CP chunks).
        self.pad_multiple = 2 * cp_size if cp_size > 1 else 1
        if self.total > micro_batch_size * seq_length:
            _log.info("context parallel: samples padded to multiples of %d, packed micro-batch length %d -> %d tokens",
                      self.pad_multiple, micro_batch_size * seq_length, self.total)
        self.consumed_rows = 0
        self.last_real_tokens = 0  # non-padding tokens of this rank's last step (effective throughput)
        self._prefetched = None  # (consumed_rows, micro-batches, real tokens) built ahead by prefetch()

    def _build(self, consumed_rows: int) -> tuple[list[MicroBatch], int]:
        """This DP rank's micro-batches of the global batch starting at ``consumed_rows``, and their real tokens."""
        out, real = [], 0
        s = self.sampler
        first = consumed_rows + s.dp_rank * s.per_rank  # stream position of this rank's first row
        for i, rows in enumerate(s.rank_microbatches(s.global_batch(consumed_rows))):
            kept = [self.end_row is None or first + i * s.mbs + j < self.end_row for j in range(len(rows))]
            samples = [self._row(int(r), keep) for r, keep in zip(rows, kept)]
            real += sum(len(x.tokens) for x, keep in zip(samples, kept) if keep)
            d = collate(samples, packed=self.packed, pad_multiple=self.pad_multiple, pad_id=self.dataset.pad_id)
            out.append(to_micro_batch(d, self.device, total=self.total, pad_id=self.dataset.pad_id,
                                      cp_size=self.cp_size, cp_rank=self.cp_rank,
                                      origins=_origins(rows, samples, kept) if self.origins else None,
                                      logit_rows=self.logit_rows))
        return out, real

    def _row(self, r: int, keep: bool):
        """Row ``r`` of the dataset; a padding row (``keep`` false: past ``end_row``) with its loss mask zeroed."""
        row = self.dataset[r]
        return row if keep else dataclasses.replace(row, loss_mask=np.zeros_like(row.loss_mask))

    def prefetch(self) -> None:
        """Build the next step's micro-batches now (the trainer calls this while the GPU runs the backward).

        Nothing advances: :meth:`next_step` uses them only if ``consumed_rows`` has not moved meanwhile.
        """
        self._prefetched = (self.consumed_rows, *self._build(self.consumed_rows))

    def next_step(self) -> list[MicroBatch]:
        """This DP rank's micro-batches of the next global batch; advances ``consumed_rows``."""
        ready, self._prefetched = self._prefetched, None
        if ready is not None and ready[0] == self.consumed_rows:
            out, self.last_real_tokens = ready[1], ready[2]
        else:
            out, self.last_real_tokens = self._build(self.consumed_rows)
        self.consumed_rows += self.sampler.gbs
        return out

    @property
    def schedule_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) as the pipeline schedule must see them (global: it divides by CP)."""
        return (self.total, 1) if self.packed else (self.total // self.sampler.mbs, self.sampler.mbs)

