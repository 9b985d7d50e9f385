"""On-disk format of a prepared split: memory-mapped ``.npy`` arrays plus a JSON index.

``<dir>/tokens.npy``          int32 [T]   every sample's tokens, samples in row order
``<dir>/loss_mask.npy``       uint8 [T]   shifted mask: 1 iff the label at t (token t+1) is supervised
``<dir>/sample_offsets.npy``  int64 [S+1] sample s = tokens[sample_offsets[s]:sample_offsets[s+1]]
``<dir>/row_offsets.npy``     int64 [R+1] row r = samples row_offsets[r] .. row_offsets[r+1]-1
``<dir>/sample_ids.npy``      int64 [S]   index of the sample's conversation in source order (debugging,
                                           layout-equivalence checks; repeats when a source is upsampled)
``<dir>/index.json``          metadata, counts and sha256 of each array, the sources' size/mtime/sha256

The arrays are byte-reproducible (same sources and settings, same bytes); ``index.json`` is too, up to the
sources' recorded mtimes (which the trainer updates when a touched source's contents are unchanged).
``index.json`` is written last, atomically (:func:`publish_index`): a directory with an ``index.json`` holds a
complete split (:func:`is_prepared`). A split is written into a hidden staging directory and moved into place
complete (:func:`replace_split`), so readers of a previous split keep reading it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bft_megatron.data.tokenize import MASK_DTYPE, TOKEN_DTYPE
from bft_megatron.utils.files import atomic_write_text, default_dir_mode

FORMAT_NAME = "bft-megatron-prepared"
FORMAT_VERSION = 1
ARRAYS = ("tokens", "loss_mask", "sample_offsets", "row_offsets", "sample_ids")
INDEX = "index.json"
_CHUNK_SAMPLES = 4096  # bounds the gather index to 4096 * seq_length int64s


class SampleStream:
    """Append-only scratch store of encoded samples in arrival order (disk-backed, not in RAM)."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tok_path = directory / f".{name}.tokens.tmp"
        self.mask_path = directory / f".{name}.mask.tmp"
        self._tok = self.tok_path.open("wb")
        self._mask = self.mask_path.open("wb")
        self.lengths: list[int] = []
        self.ids: list[int] = []

    def append(self, tokens: np.ndarray, mask: np.ndarray, sample_id: int) -> None:
        self._tok.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self._mask.write(np.ascontiguousarray(mask, dtype=MASK_DTYPE).tobytes())
        self.lengths.append(len(tokens))
        self.ids.append(sample_id)

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        self._tok.close()
        self._mask.close()
        if not self.lengths:
            return np.zeros(0, TOKEN_DTYPE), np.zeros(0, MASK_DTYPE)
        return (np.memmap(self.tok_path, dtype=TOKEN_DTYPE, mode="r"),
                np.memmap(self.mask_path, dtype=MASK_DTYPE, mode="r"))

    def remove(self) -> None:
        for p in (self.tok_path, self.mask_path):
            if p.exists():
                p.unlink()


def advise_random_access(mapped: np.ndarray) -> None:
    """Tell the kernel that ``mapped`` (an ``np.load(..., mmap_mode="r")`` array) is read at random places.

    The sampler reads rows in shuffled order, and the kernel's default read-ahead for a memory map turns each
    ~20 kB row into megabytes of reads: from a cold page cache, 201 shuffled rows of up to 4096 tokens (<= 3.9 MiB)
    of a 662 MB split read 611.6 MiB from disk at ~3 ms per row; with ``MADV_RANDOM`` 8.6 MiB at ~0.7 ms
    (docs/benchmarks.md, bench/prepare_scale.py). Pages already cached, also by other ranks, are shared as before.
    A no-op where ``madvise`` is unavailable."""
    import mmap

    advice = getattr(mmap, "MADV_RANDOM", None)
    handle = getattr(mapped, "_mmap", None)  # np.memmap keeps its mmap.mmap here
    if advice is not None and handle is not None:
        handle.madvise(advice)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gather(src: np.ndarray, src_offsets: np.ndarray, order: np.ndarray, dst: np.ndarray,
            dst_offsets: np.ndarray) -> None:
    """dst[sample k] = src[sample order[k]], vectorised a chunk of samples at a time."""
    for lo in range(0, len(order), _CHUNK_SAMPLES):
        sel = order[lo: lo + _CHUNK_SAMPLES]
        starts = src_offsets[sel]
        lens = src_offsets[sel + 1] - starts
        base = dst_offsets[lo]
        total = int(lens.sum())
        shift = np.repeat(starts - (dst_offsets[lo: lo + len(sel)] - base), lens)
        dst[base: base + total] = src[shift + np.arange(total)]


def write_split(out: Path, tokens: np.ndarray, mask: np.ndarray, lengths: Sequence[int],
                sample_ids: Sequence[int], rows: list[np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the samples of ``rows`` (indices into the arrival-order stream) in row order.

    Returns the split's index; it is not published (the caller adds its stats, then :func:`publish_index`).
    """
    out.mkdir(parents=True, exist_ok=True)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    src_offsets = np.concatenate([[0], np.cumsum(lengths_arr)]).astype(np.int64)
    order = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    dst_offsets = np.concatenate([[0], np.cumsum(lengths_arr[order])]).astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    total = int(dst_offsets[-1])
    dst_tok = np.lib.format.open_memmap(out / "tokens.npy", mode="w+", dtype=TOKEN_DTYPE, shape=(total,))
    dst_mask = np.lib.format.open_memmap(out / "loss_mask.npy", mode="w+", dtype=MASK_DTYPE, shape=(total,))
    if total:
        _gather(np.asarray(tokens), src_offsets, order, dst_tok, dst_offsets)
        _gather(np.asarray(mask), src_offsets, order, dst_mask, dst_offsets)
    dst_tok.flush()
    dst_mask.flush()
    supervised = int(np.count_nonzero(dst_mask)) if total else 0
    del dst_tok, dst_mask
    np.save(out / "sample_offsets.npy", dst_offsets)
    np.save(out / "row_offsets.npy", row_offsets)
    np.save(out / "sample_ids.npy", np.asarray(sample_ids, dtype=np.int64)[order])
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta,
             "num_rows": len(rows), "num_samples": len(order), "num_tokens": total,
             "supervised_tokens": supervised,
             "files": {f"{name}.npy": sha256_file(out / f"{name}.npy") for name in ARRAYS}}
    return index


def is_prepared(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete prepared split (its ``index.json`` is published)."""
    return (Path(directory) / INDEX).is_file()


def staging_dir(output_dir: Path, split: str) -> Path:
    """A new empty hidden directory beside ``output_dir/split`` (``.<split>.partial-XXXX``; beside its target when
    the split is a symbolic link, e.g. to a larger disk) to write a split into before :func:`replace_split` moves
    it into place. Its permissions are a new directory's (``mkdtemp``'s 0700 would lock the team out)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    parent = Path(os.path.realpath(output_dir / split)).parent
    stage = Path(tempfile.mkdtemp(prefix=f".{split}.partial-", dir=parent))
    os.chmod(stage, default_dir_mode())
    return stage


def replace_split(stage: Path, out: Path) -> None:
    """Move the complete split ``stage`` to ``out`` by renames, the previous ``out`` (if any) out of the way first
    and then removed. A trainer reading the previous split keeps its memory-mapped arrays (their inodes live until
    unmapped): rewritten in place, they changed under it, silently, from the first row not yet cached."""
    out = Path(os.path.realpath(out))  # a symbolic link stays, its target is replaced
    old = None
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(stage, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames survive a crash
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # NFS keeps a mapped file as .nfsXXXX: whatever stays is harmless


SCRATCH_PREFIX = ".bft-prepare-cache-"  # a preparation's temporary datasets cache inside output_dir


def remove_stale_staging(output_dir: Path) -> None:
    """Staging and replaced directories, and the Arrow cache of the sources (as large as they are; pipeline.py),
    left by a killed preparation (call only while holding the directory's preparation lock: another preparation's
    would otherwise go)."""
    for split in ("train", "valid"):
        for parent in {output_dir, Path(os.path.realpath(output_dir / split)).parent}:  # beside a link's target too
            for path in [*parent.glob(f".{split}.partial-*"), *parent.glob(f".{split}.old-*")]:
                shutil.rmtree(path, ignore_errors=True)
    for path in output_dir.glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def publish_index(out: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically (temporary file, fsync, rename): readers see all of it or none."""
    atomic_write_text(out / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_index(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a prepared data directory (run `bft-megatron prepare`)")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {index.get('format')!r} v{index.get('version')!r}, "
                         f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return index


@dataclass(frozen=True)
class Row:
    """One row: its samples' tokens and shifted loss masks back to back, and the sample lengths."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    seqlens: np.ndarray  # int64 [num samples in row]
    sample_ids: np.ndarray
    seq_length: int


def _open_consistent(directory: Path, wait_s: float = 10.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``index.json`` and the arrays it describes. A preparation into the same directory replaces the split by two
    renames (:func:`replace_split`): opened in between, the split is missing, or the index and some arrays come
    from different preparations. Such an open is retried (``wait_s``) until the index read before and after the
    arrays is the same and matches their sizes."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            index = read_index(directory)
            arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in ARRAYS}
            if read_index(directory) == index and len(arrays["tokens"]) == index["num_tokens"] \
                    and len(arrays["row_offsets"]) == index["num_rows"] + 1:
                return index, arrays
            problem: Exception = ValueError(f"{directory}: index.json does not describe its arrays")
        except (FileNotFoundError, ValueError) as exc:
            problem = exc
        if time.monotonic() >= deadline:
            raise problem
        time.sleep(0.1)


class PackedDataset:
    """Random access to the rows of a prepared split (memory-mapped; cheap to open in every rank)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.index, arrays = _open_consistent(self.directory)
        self.tokens, self.loss_mask = arrays["tokens"], arrays["loss_mask"]
        for mapped in (self.tokens, self.loss_mask):
            advise_random_access(mapped)
        self.sample_offsets = np.asarray(arrays["sample_offsets"])
        self.row_offsets = np.asarray(arrays["row_offsets"])
        self.sample_ids = np.asarray(arrays["sample_ids"])
        self.seq_length = int(self.index["seq_length"])
        self.packed = bool(self.index["packed"])
        self.pad_id = int(self.index["tokenizer"]["pad_id"])
        self._max_padded_row: dict[int, int] = {}  # max_padded_row_length cache, per multiple

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def max_padded_row_length(self, multiple: int, rows_per_chunk: int = 1 << 20) -> int:
        """Longest row once each of its samples is padded to a multiple of ``multiple`` (context parallel).

        Scanned in chunks of rows (bounded host memory for very large splits) and cached per multiple.
        """
        cache = self._max_padded_row
        if multiple not in cache:
            best = 0
            for r0 in range(0, len(self), rows_per_chunk):
                r1 = min(len(self), r0 + rows_per_chunk)
                s0, s1 = int(self.row_offsets[r0]), int(self.row_offsets[r1])
                lens = np.diff(self.sample_offsets[s0:s1 + 1])
                padded = np.concatenate([[0], np.cumsum(-(-lens // multiple) * multiple)])
                starts = np.asarray(self.row_offsets[r0:r1 + 1]) - s0
                best = max(best, int(np.max(padded[starts[1:]] - padded[starts[:-1]], initial=0)))
            cache[multiple] = best
        return cache[multiple]

    def __getitem__(self, r: int) -> Row:
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} out of range [0, {len(self)})")
        s0, s1 = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
        t0, t1 = int(self.sample_offsets[s0]), int(self.sample_offsets[s1])
        return Row(np.array(self.tokens[t0:t1]), np.array(self.loss_mask[t0:t1]),
                   np.diff(self.sample_offsets[s0: s1 + 1]), self.sample_ids[s0:s1].copy(), self.seq_length)
