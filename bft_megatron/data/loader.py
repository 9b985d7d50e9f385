"""Global-batch sampling that is independent of the data-parallel layout, and exactly resumable.

The rows of a prepared split form an endless stream: epoch e is a permutation of all rows drawn from
``default_rng([seed, e])``. Global batch k is rows ``stream[c + k*gbs : c + (k+1)*gbs]`` where c is the
``consumed_rows`` count a run resumes from; DP rank r takes the slice ``[r*per_rank, (r+1)*per_rank)``
of each global batch (per_rank = gbs / dp_size) and cuts it into micro-batches. Nothing depends on
dp_size except which slice a rank takes, so a checkpoint taken at one layout resumes at another.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from bft_megatron.data.collate import collate
from bft_megatron.data.storage import PackedDataset


class GlobalBatchSampler:
    """Yields this DP rank's micro-batches as lists of row indices, from ``consumed_rows`` on."""

    def __init__(self, num_rows: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, consumed_rows: int = 0) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows={num_rows}: the dataset is empty")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of dp_size={dp_size}")
        per_rank = global_batch_size // dp_size
        if micro_batch_size < 1 or per_rank % micro_batch_size:
            raise ValueError(f"micro_batch_size={micro_batch_size} must divide global_batch_size/dp_size={per_rank}")
        if consumed_rows < 0:
            raise ValueError(f"consumed_rows={consumed_rows} must be >= 0")
        self.num_rows, self.gbs, self.mbs = num_rows, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.per_rank = dp_rank, dp_size, per_rank
        self.seed, self.consumed_rows = seed, consumed_rows
        self._perm_epoch: int | None = None
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.mbs

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def stream(self, start: int, count: int) -> np.ndarray:
        """Rows at stream positions [start, start+count), crossing epoch boundaries as needed."""
        out = np.empty(count, dtype=np.int64)
        pos = 0
        while pos < count:
            epoch, offset = divmod(start + pos, self.num_rows)
            take = min(count - pos, self.num_rows - offset)
            out[pos: pos + take] = self.epoch_permutation(epoch)[offset: offset + take]
            pos += take
        return out

    def global_batch(self, consumed_rows: int) -> np.ndarray:
        """The full global batch (all DP ranks) that starts at ``consumed_rows``."""
        return self.stream(consumed_rows, self.gbs)

    def rank_microbatches(self, batch: np.ndarray) -> list[list[int]]:
        mine = batch[self.dp_rank * self.per_rank: (self.dp_rank + 1) * self.per_rank]
        return [mine[i: i + self.mbs].tolist() for i in range(0, self.per_rank, self.mbs)]

    def __iter__(self) -> Iterator[list[int]]:
        """Endless. ``consumed_rows`` advances by one global batch as its last micro-batch is handed
        out, so a checkpoint taken after the optimizer step records the batch as consumed."""
        while True:
            micros = self.rank_microbatches(self.global_batch(self.consumed_rows))
            for i, micro in enumerate(micros):
                if i == len(micros) - 1:
                    self.consumed_rows += self.gbs
                yield micro


def iterate_batches(dataset: PackedDataset, sampler: GlobalBatchSampler, *, packed: bool | None = None,
                    pad_multiple: int = 1) -> Iterator[dict[str, Any]]:
    """Collated micro-batches of this rank; ``packed`` defaults to how the dataset was prepared."""
    use_packed = dataset.packed if packed is None else packed
    for micro in sampler:
        yield collate([dataset[r] for r in micro], packed=use_packed, pad_multiple=pad_multiple,
                      pad_id=dataset.pad_id)


class BatchLoader:
    """The trainer's one-stop object: a prepared split, its sampler, and collated micro-batches.

    ``consumed_rows`` is what a checkpoint stores; pass it back to resume (at any DP layout).
    """

    def __init__(self, directory: str, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, consumed_rows: int = 0, pad_multiple: int = 1,
                 packed: bool | None = None) -> None:
        self.dataset = PackedDataset(directory)
        self.sampler = GlobalBatchSampler(len(self.dataset), global_batch_size=global_batch_size,
                                          micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                          seed=seed, consumed_rows=consumed_rows)
        self.pad_multiple, self.packed = pad_multiple, packed

    @property
    def consumed_rows(self) -> int:
        return self.sampler.consumed_rows

    @property
    def num_microbatches(self) -> int:
        return self.sampler.num_microbatches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iterate_batches(self.dataset, self.sampler, packed=self.packed, pad_multiple=self.pad_multiple)
