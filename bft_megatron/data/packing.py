"""Assign samples to rows of at most ``seq_length`` tokens.

Packing is done once, in ``prepare``, and knows nothing of the parallel layout: a row is a list of
whole samples (their boundaries are kept exactly). Per-sample padding for context/sequence parallel
happens later, in the collator. Both layouts are deterministic given the seed.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    rows: list[np.ndarray]  # sample indices of each row, in row order
    efficiency: float  # real tokens / (rows * seq_length)


def _efficiency(lengths: np.ndarray, num_rows: int, seq_length: int) -> float:
    return float(lengths.sum()) / float(num_rows * seq_length) if num_rows else 0.0


def pack_best_fit(lengths: np.ndarray, seq_length: int, seed: int) -> Layout:
    """Best-fit decreasing: longest first, each into the fullest row that still has room.

    Ties are broken by a seeded permutation so equal-length samples from one source do not always
    share rows; the row order is shuffled with the same generator.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > seq_length or lengths.min() < 1):
        raise ValueError(f"sample lengths must be in [1, {seq_length}], got {lengths.min()}..{lengths.max()}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    # Rows grouped by remaining capacity: ``caps`` holds the distinct non-zero capacities, sorted, so
    # its length (and each insertion's cost) is bounded by seq_length, not by the number of rows.
    caps: list[int] = []
    by_cap: dict[int, deque[int]] = {}
    rows: list[list[int]] = []
    for idx in order.tolist():
        need = int(lengths[idx])
        pos = bisect.bisect_left(caps, need)
        if pos < len(caps):
            remaining = caps[pos]
            row = by_cap[remaining].popleft()
            if not by_cap[remaining]:
                del caps[pos], by_cap[remaining]
        else:
            remaining, row = seq_length, len(rows)
            rows.append([])
        rows[row].append(idx)
        left = remaining - need
        if left > 0:
            if left not in by_cap:
                bisect.insort(caps, left)
                by_cap[left] = deque()
            by_cap[left].append(row)
    perm = rng.permutation(len(rows))
    out = [np.asarray(rows[r], dtype=np.int64) for r in perm.tolist()]
    return Layout(out, _efficiency(lengths, len(out), seq_length))


def one_per_row(lengths: np.ndarray, seq_length: int, seed: int) -> Layout:
    """The padded layout: one sample per row, rows in a seeded order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(lengths))
    return Layout([np.asarray([i], dtype=np.int64) for i in perm.tolist()],
                  _efficiency(lengths, len(lengths), seq_length))
