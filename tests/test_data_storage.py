"""The prepared-split writer (``bft_megatron.data.storage.write_split``) against a direct Python oracle.

``write_split`` gathers the samples into row order a chunk of ``_CHUNK_SAMPLES`` (4096) samples at a time; the
prepare tests never reach a second chunk, so here the chunk is made tiny to exercise the chunk boundaries.
"""

from __future__ import annotations

import numpy as np
import pytest

from bft_megatron.data import storage
from bft_megatron.data.storage import PackedDataset, publish_index, write_split
from bft_megatron.data.tokenize import MASK_DTYPE, TOKEN_DTYPE

META = {"seq_length": 64, "packed": True, "tokenizer": {"pad_id": 0}}


def _reference_split(samples: list[tuple[np.ndarray, np.ndarray]], ids: list[int], rows: list[list[int]]):
    """Per row, its samples (tokens, mask, sample id) in order, by plain list indexing."""
    return [[(samples[s][0].tolist(), samples[s][1].tolist(), ids[s]) for s in row] for row in rows]


def _stream(num_samples: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=num_samples)
    samples = [(rng.integers(1, 1000, size=n).astype(TOKEN_DTYPE), rng.integers(0, 2, size=n).astype(MASK_DTYPE))
               for n in lengths]
    ids = [int(i) for i in rng.permutation(num_samples) + 100]
    order = rng.permutation(num_samples)
    cuts = np.sort(rng.choice(np.arange(1, num_samples), size=num_samples // 3, replace=False))
    rows = [r.astype(np.int64) for r in np.split(order, cuts)]
    return samples, lengths, ids, rows


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_write_split_puts_every_sample_in_row_order_across_gather_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(storage, "_CHUNK_SAMPLES", chunk)
    samples, lengths, ids, rows = _stream(23, seed=chunk)
    tokens = np.concatenate([t for t, _ in samples])
    mask = np.concatenate([m for _, m in samples])
    index = write_split(tmp_path, tokens, mask, lengths.tolist(), ids, rows, dict(META))
    publish_index(tmp_path, index)
    ds = PackedDataset(tmp_path)
    want = _reference_split(samples, ids, [r.tolist() for r in rows])
    assert len(ds) == len(rows) and index["num_samples"] == len(samples) and index["num_tokens"] == tokens.size
    assert index["supervised_tokens"] == int(mask.sum())
    for r, row_want in enumerate(want):
        row = ds[r]
        assert row.seqlens.tolist() == [len(t) for t, _, _ in row_want]
        assert row.tokens.tolist() == [x for t, _, _ in row_want for x in t]
        assert row.loss_mask.tolist() == [x for _, m, _ in row_want for x in m]
        assert row.sample_ids.tolist() == [i for _, _, i in row_want]


def test_row_index_out_of_range_is_an_error(tmp_path):
    samples, lengths, ids, rows = _stream(6, seed=0)
    tokens = np.concatenate([t for t, _ in samples])
    mask = np.concatenate([m for _, m in samples])
    publish_index(tmp_path, write_split(tmp_path, tokens, mask, lengths.tolist(), ids, rows, dict(META)))
    ds = PackedDataset(tmp_path)
    for bad in (-1, len(ds)):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]


@pytest.mark.parametrize("key, value", [("format", "something-else"), ("version", storage.FORMAT_VERSION + 1)])
def test_index_of_another_format_or_version_is_refused(tmp_path, key, value):
    samples, lengths, ids, rows = _stream(6, seed=1)
    tokens = np.concatenate([t for t, _ in samples])
    mask = np.concatenate([m for _, m in samples])
    index = write_split(tmp_path, tokens, mask, lengths.tolist(), ids, rows, dict(META))
    index[key] = value
    publish_index(tmp_path, index)
    with pytest.raises(ValueError, match="expected 'bft-megatron-prepared' v1"):
        PackedDataset(tmp_path)
