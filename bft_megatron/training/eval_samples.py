"""``--eval-samples FILE``: BFT's per-sample statistics of an ``--eval-only`` validation, as JSONL on global rank 0.

Each micro-batch's statistics come from :func:`bft_megatron.loss.sample_statistics` on the last pipeline stage
(the objective's math, per sample), keyed by :attr:`~bft_megatron.training.batch.MicroBatch.origins` (row of the
split, index in the row, sample_id). One rank per data-parallel slice holds them (last stage, TP rank 0, CP rank 0:
the others hold the same samples); :func:`gather_sample_rows` brings them to global rank 0 (with PP > 1 not on
the last stage) in one ``gather_object`` over the gloo control group, and :func:`write_sample_lines` writes one
line per sample of the split the validation read, sorted by its index in the split:

``{"index": 17, "sample_id": 402, "tokens": 35, "lm_loss": 1.93, "p_conf": 0.0712, "sample_weight": 0.9288,
"short": true}``

Padding (the rows filling the last global batch of a whole-split validation, the packed filler segment) is left
out. A sample without a supervised token is written with ``"tokens": 0`` and nulls (``lm_loss``, ``p_conf``,
``sample_weight``, ``short``): the objective leaves it out. A sample read more than once (``train.eval_iters``
batches past the end of the split) is written once (its reads differ by float rounding at most).
"""

from __future__ import annotations

import json

import math

import numpy as np
import torch
import torch.distributed as dist

from bft_megatron.utils.files import atomic_write_text
from bft_megatron.utils.logging import get_logger

__all__ = ["host_statistics", "local_sample_rows", "gather_sample_rows", "write_sample_lines", "first_samples",
           "COLUMNS"]

_log = get_logger(__name__)

# Columns of the host arrays :func:`local_sample_rows` returns (one row per sample, float64).
COLUMNS = ("row", "position", "sample_id", "tokens", "nll_sum", "lm_loss", "p_conf", "sample_weight", "short")


def host_statistics(stats: dict) -> torch.Tensor:
    """``[len(COLUMNS) - 3, S]`` float64 host copy of one micro-batch's :func:`~bft_megatron.loss.sample_statistics`
    (``COLUMNS[3:]``): one stacked tensor, copied without blocking into pinned memory on CUDA (the evaluation keeps
    launching; :func:`local_sample_rows` synchronises once), so nothing piles up in device memory."""
    stacked = torch.stack([stats[k].double() for k in COLUMNS[3:]])
    if not stacked.is_cuda:
        return stacked
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    return host.copy_(stacked, non_blocking=True)


def local_sample_rows(sink: list, groups) -> np.ndarray:
    """This rank's ``[K, len(COLUMNS)]`` float64 statistics of real samples from ``sink`` (the evaluation's
    ``(origins, host_statistics)`` per micro-batch); empty where another rank reports the same samples."""
    reports = groups.is_last_pp_stage and groups.tp_rank == 0 and groups.cp_rank == 0
    if reports and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking copies of host_statistics have landed
    parts = []
    for origins, stats in (sink if reports else []):
        if origins is None:
            raise ValueError("--eval-samples: a micro-batch without sample origins (MicroBatch.origins)")
        cols = [origins[:, 0], origins[:, 1], origins[:, 2], *stats]
        block = np.stack([c.double().numpy() for c in cols], axis=1)
        parts.append(block[origins[:, 0].numpy() >= 0])  # -1: a padding row or the packed filler segment
    return np.concatenate(parts) if parts else np.zeros((0, len(COLUMNS)))


def gather_sample_rows(local: np.ndarray, group) -> np.ndarray | None:
    """Every rank's :func:`local_sample_rows` on global rank 0 (None elsewhere). Collective over ``group``
    (the world: the gloo control group, host objects, no device memory)."""
    first = dist.get_rank() == 0
    parts = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(local, parts, dst=0, group=group)
    return np.concatenate(parts) if first else None


def first_samples(dataset) -> np.ndarray:
    """``[R+1]`` int64: row r of ``dataset`` holds the split's samples ``out[r] .. out[r+1]-1`` (a prepared
    split's ``row_offsets``; counted row by row for a dataset without them, the synthetic one)."""
    offsets = getattr(dataset, "row_offsets", None)
    if offsets is not None:
        return np.asarray(offsets, dtype=np.int64)
    counts = [len(dataset[r].seqlens) for r in range(len(dataset))]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _line(index: int, values: np.ndarray) -> str:
    tokens = int(values[COLUMNS.index("tokens")])
    fields = {"index": index, "sample_id": int(values[COLUMNS.index("sample_id")]), "tokens": tokens}
    for name in ("lm_loss", "p_conf", "sample_weight"):
        value = float(values[COLUMNS.index(name)])
        fields[name] = value if tokens and math.isfinite(value) else None  # JSON has no NaN/Infinity (jq refuses)
    fields["short"] = bool(values[COLUMNS.index("short")]) if tokens else None
    return json.dumps(fields, allow_nan=False)


def write_sample_lines(rows: np.ndarray, dataset, path: str) -> int:
    """Write ``rows`` (:func:`gather_sample_rows`) to ``path`` as JSONL sorted by the samples' index in the split
    of ``dataset``, each sample once; returns the number of lines."""
    index = first_samples(dataset)[rows[:, 0].astype(np.int64)] + rows[:, 1].astype(np.int64)
    order = np.argsort(index, kind="stable")
    index, rows = index[order], rows[order]
    keep = np.concatenate([[True], index[1:] != index[:-1]]) if len(index) else np.zeros(0, dtype=bool)
    lines = [_line(int(i), r) for i, r in zip(index[keep], rows[keep])]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    empty = sum(1 for r in rows[keep] if r[COLUMNS.index("tokens")] == 0)
    _log.info("--eval-only: per-sample statistics of %d validation samples written to %s (%d without a supervised "
              "token, written with nulls)", len(lines), path, empty)
    return len(lines)
