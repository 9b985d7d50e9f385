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


def _split_of_rows(directory, num_rows: int, row_tokens: int) -> PackedDataset:
    """A prepared split of ``num_rows`` one-sample rows of ``row_tokens`` tokens each."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1000, size=num_rows * row_tokens).astype(TOKEN_DTYPE)
    mask = np.ones(tokens.size, MASK_DTYPE)
    rows = [np.array([r], np.int64) for r in range(num_rows)]
    publish_index(directory, write_split(directory, tokens, mask, [row_tokens] * num_rows, list(range(num_rows)),
                                         rows, dict(META)))
    return PackedDataset(directory)


class _MadviseSpy:
    """Stands in for a memory map's ``mmap.mmap``: records ``madvise`` calls and forwards them."""

    def __init__(self, real, calls: list) -> None:
        self.real, self.calls = real, calls

    def madvise(self, *args):
        self.calls.append(args)
        return self.real.madvise(*args)


def test_token_and_mask_maps_are_advised_random_access(tmp_path, monkeypatch):
    """The shuffled sampler reads rows at random: without MADV_RANDOM the kernel's read-ahead reads megabytes
    around every ~20 kB row (the measurement is in docs/benchmarks.md and the next test)."""
    import mmap

    _split_of_rows(tmp_path, 4, 64)
    advised: dict[str, list] = {}
    real_load = np.load

    def load(path, *args, **kwargs):
        array = real_load(path, *args, **kwargs)
        advised[str(path).rsplit("/", 1)[-1]] = calls = []
        array._mmap = _MadviseSpy(array._mmap, calls)
        return array

    monkeypatch.setattr(storage.np, "load", load)
    ds = PackedDataset(tmp_path)
    assert advised["tokens.npy"] == [(mmap.MADV_RANDOM,)] and advised["loss_mask.npy"] == [(mmap.MADV_RANDOM,)]
    assert ds[2].tokens.size == 64


def _disk_read_bytes() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes"))


def _evict(directory) -> None:
    import os

    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_shuffled_rows_from_a_cold_cache_read_little_more_than_the_rows(tmp_path):
    """8 MB of tokens, 16 rows of 5 kB (tokens and mask) read in shuffled order from a cold page cache: with the
    random-access advice little more than the rows is read from disk; the default read-ahead reads it all."""
    import os

    if not (os.path.exists("/proc/self/io") and hasattr(os, "posix_fadvise")):
        pytest.skip("needs Linux /proc/self/io and posix_fadvise")
    row_tokens, num_rows = 1024, 2048
    ds = _split_of_rows(tmp_path, num_rows, row_tokens)
    del ds
    _evict(tmp_path)
    before = _disk_read_bytes()
    ds = PackedDataset(tmp_path)
    for r in np.random.default_rng(1).permutation(num_rows)[:16]:
        assert ds[int(r)].tokens.size == row_tokens
    read = _disk_read_bytes() - before
    if read == 0:
        pytest.skip("this file system's reads do not show in /proc/self/io read_bytes (page cache not evictable)")
    split_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    # Here: 0.3 MB with the advice, the whole 10.4 MB split without it. The bound leaves room for other
    # read-ahead settings (the header reads at open) while staying far below the unadvised reads.
    assert read <= split_bytes / 8, (read, split_bytes)


def test_a_killed_preparations_leftovers_are_removed_but_not_other_files(tmp_path):
    """SIGTERM during a preparation left its staging split and its Arrow cache of the sources (as large as they
    are) in output_dir; the next preparation (holding the lock) removes both, and nothing else."""
    out = tmp_path / "out"
    leftovers = [out / ".train.partial-x1", out / ".valid.old-x2", out / f"{storage.SCRATCH_PREFIX}k3l"]
    kept = [out / "train", out / ".prepare.lock", out / "notes.txt", tmp_path / f"{storage.SCRATCH_PREFIX}elsewhere"]
    for path in leftovers + kept[:1] + kept[3:]:
        (path / "sub").mkdir(parents=True)
    for path in kept[1:3]:
        path.write_text("x")
    storage.remove_stale_staging(out)
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in kept)
