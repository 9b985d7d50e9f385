"""Micro-batch collation for the trainer, in the padded or the packed (THD, ``cu_seqlens``) layout.

Padding for context parallel (and tensor parallel with sequence parallel) is applied here, at train
time, so one prepared dataset serves every parallel layout: each sample is padded at its end to a
multiple of ``pad_multiple`` (the trainer uses 2·CP; under CP it rounds the packed micro-batch total to
16·CP, or 16·CP·TP with SP) with loss_mask 0 and position ids continuing.
Labels are shifted within each sample; the last position of a sample is never supervised.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bft_megatron.data.storage import Row


def round_up(n: int | np.ndarray, multiple: int) -> Any:
    return -(-n // multiple) * multiple


def _check(rows: Sequence[Row], pad_multiple: int) -> None:
    if not rows:
        raise ValueError("collate: empty micro-batch")
    if pad_multiple < 1:
        raise ValueError(f"collate: pad_multiple={pad_multiple} must be >= 1")


def _within_sample_labels(tokens: np.ndarray, seqlens: np.ndarray, pad_id: int) -> np.ndarray:
    """label[t] = tokens[t+1] inside a sample; a sample's last position gets ``pad_id`` (masked)."""
    labels = np.full(len(tokens), pad_id, dtype=np.int64)
    labels[:-1] = tokens[1:]
    ends = np.cumsum(seqlens) - 1
    labels[ends[seqlens > 0]] = pad_id
    return labels


def _padded(rows: Sequence[Row], pad_multiple: int, pad_id: int) -> dict[str, Any]:
    for r in rows:
        if len(r.seqlens) != 1:
            raise ValueError(f"collate(packed=False) needs one sample per row, got a row with {len(r.seqlens)} "
                             "(prepare with packing: false, or collate with packed=True)")
    s = int(round_up(max(max(r.seq_length, len(r.tokens)) for r in rows), pad_multiple))
    mbs = len(rows)
    tokens = np.full((mbs, s), pad_id, dtype=np.int64)
    labels = np.full((mbs, s), pad_id, dtype=np.int64)
    mask = np.zeros((mbs, s), dtype=np.float32)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n] = r.tokens
        labels[i, :n] = _within_sample_labels(r.tokens.astype(np.int64), r.seqlens, pad_id)
        mask[i, :n] = r.loss_mask
    positions = np.broadcast_to(np.arange(s, dtype=np.int64), (mbs, s)).copy()
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask), "position_ids": torch.from_numpy(positions),
            "num_segments": mbs,
            "sample_ids": torch.from_numpy(np.concatenate([r.sample_ids for r in rows]).astype(np.int64))}


def _packed(rows: Sequence[Row], pad_multiple: int, pad_id: int) -> dict[str, Any]:
    src_tok = np.concatenate([r.tokens for r in rows]).astype(np.int64)
    src_mask = np.concatenate([r.loss_mask for r in rows]).astype(np.float32)
    lens = np.concatenate([r.seqlens for r in rows]).astype(np.int64)
    padded = round_up(lens, pad_multiple)
    src_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    dst_starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    total = int(padded.sum())  # a sum of multiples of pad_multiple, hence itself one
    where = np.repeat(dst_starts - src_starts, lens) + np.arange(len(src_tok))
    tokens = np.full(total, pad_id, dtype=np.int64)
    labels = np.full(total, pad_id, dtype=np.int64)
    mask = np.zeros(total, dtype=np.float32)
    tokens[where] = src_tok
    labels[where] = _within_sample_labels(src_tok, lens, pad_id)
    mask[where] = src_mask
    positions = np.arange(total, dtype=np.int64) - np.repeat(dst_starts, padded)
    cu = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
    cu_real = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return {"tokens": torch.from_numpy(tokens)[None], "labels": torch.from_numpy(labels)[None],
            "loss_mask": torch.from_numpy(mask)[None], "position_ids": torch.from_numpy(positions)[None],
            "cu_seqlens": torch.from_numpy(cu), "cu_seqlens_unpadded": torch.from_numpy(cu_real),
            "max_seqlen": int(padded.max()), "num_segments": len(lens),
            "sample_ids": torch.from_numpy(np.concatenate([r.sample_ids for r in rows]).astype(np.int64))}


def collate(rows: Sequence[Row], *, packed: bool, pad_multiple: int = 1, pad_id: int = 0) -> dict[str, Any]:
    """Build the micro-batch dict the trainer consumes (see ``docs/data.md`` for the contract)."""
    _check(rows, pad_multiple)
    return _packed(rows, pad_multiple, pad_id) if packed else _padded(rows, pad_multiple, pad_id)
