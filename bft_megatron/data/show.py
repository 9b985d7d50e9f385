"""``bft-megatron show-data``: print prepared samples with their supervised tokens marked.

Usage::

    bft-megatron show-data runs/demo_cpu/data [--split train] [--samples 3] [--start 0] [--tokenizer PATH]

What the loss trains on is decided at preparation (the chat template, ``supervise``, truncation); this shows it
before any GPU time is spent. Each sample is decoded back to text; the tokens the loss supervises (the targets:
token ``t+1`` where ``loss_mask[t]`` is 1) are wrapped in ``[[`` ... ``]]``. Segments are decoded one by one, so
a tokenizer that merges a space into the next word may show it on either side of a marker.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from bft_megatron.data.errors import DataError
from bft_megatron.utils.cli_text import plain
from bft_megatron.utils.logging import get_logger

log = get_logger(__name__)

OPEN, CLOSE = "[[", "]]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bft-megatron show-data", description=plain(__doc__.split("\n\n")[0]))
    p.add_argument("directory", help="a prepared data directory (data.output_dir) or one of its splits")
    p.add_argument("--split", default="train", help="split under DIRECTORY [train]")
    p.add_argument("--samples", type=int, default=3, help="how many samples to print [3]")
    p.add_argument("--start", type=int, default=0, help="first sample, in stored (packed) order [0]")
    p.add_argument("--tokenizer", help="tokenizer to decode with [the one the split was prepared with]")
    return p


def supervised_targets(loss_mask: np.ndarray) -> np.ndarray:
    """Per token of one sample: is it a supervised target? The stored mask is shifted (``loss_mask[t]`` says
    whether token ``t+1`` is predicted), so the first token never is."""
    target = np.zeros(len(loss_mask), dtype=bool)
    target[1:] = np.asarray(loss_mask[:-1], dtype=bool)
    return target


def marked_text(tokens: np.ndarray, target: np.ndarray, decode) -> str:
    """The sample's text with each run of supervised tokens wrapped in OPEN ... CLOSE."""
    parts: list[str] = []
    edges = np.flatnonzero(np.diff(target.astype(np.int8))) + 1
    for lo, hi in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(tokens)]])):
        text = decode([int(t) for t in tokens[lo:hi]])
        parts.append(f"{OPEN}{text}{CLOSE}" if target[lo] else text)
    return "".join(parts)


def _split_dir(directory: str, split: str) -> str:
    """DIRECTORY itself when it is a split (holds index.json), else DIRECTORY/SPLIT."""
    return directory if os.path.isfile(os.path.join(directory, "index.json")) else os.path.join(directory, split)


def show(directory: str, split: str = "train", samples: int = 3, start: int = 0,
         tokenizer: str | None = None) -> str:
    from bft_megatron.data.storage import PackedDataset, is_prepared
    from bft_megatron.data.tokenizer import load_tokenizer

    path = _split_dir(directory, split)
    if not is_prepared(path):
        raise DataError(path, "not a prepared split (no complete index.json): run bft-megatron prepare, or name "
                              "data.output_dir (and --split)")
    ds = PackedDataset(path)
    count = len(ds.sample_offsets) - 1
    if not 0 <= start < count:
        raise DataError(path, f"--start {start} is outside its {count} samples [0, {count})")
    try:
        tok = load_tokenizer(tokenizer or ds.index["tokenizer"]["path"])
    except (DataError, FileNotFoundError, ValueError) as err:
        if tokenizer:
            raise
        raise DataError(path, f"{err} (the path the split was prepared with, relative to that run's working "
                              "directory: run from there, or pass --tokenizer)") from err
    top = int(np.max(ds.tokens[int(ds.sample_offsets[start]):int(ds.sample_offsets[min(count, start + samples)])],
                     initial=0))
    if top >= tok.vocab_size:
        raise DataError(path, f"token id {top} is outside {tok.name}'s vocabulary of {tok.vocab_size}: the split was "
                              f"prepared with {ds.index['tokenizer']['path']}")
    if ds.index["tokenizer"].get("fingerprint") not in (None, tok.fingerprint):
        log.warning("%s is not the tokenizer %s was prepared with (%s): the text may not be what was trained on",
                    tok.name, path, ds.index["tokenizer"]["path"])
    out = [f"{path}: {count} samples in {len(ds)} rows of {ds.seq_length} tokens, template "
           f"{ds.index.get('template')!r}, supervise {ds.index.get('supervise')!r}; {OPEN} {CLOSE} = trained on"]
    for s in range(start, min(count, start + samples)):
        t0, t1 = int(ds.sample_offsets[s]), int(ds.sample_offsets[s + 1])
        tokens, target = np.asarray(ds.tokens[t0:t1]), supervised_targets(ds.loss_mask[t0:t1])
        out.append(f"--- sample {s} (record {int(ds.sample_ids[s])}): {t1 - t0} tokens, {int(target.sum())} "
                   "supervised")
        out.append(marked_text(tokens, target, tok.decode))
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.samples < 1 or args.start < 0:
        log.error("show-data: --samples must be >= 1 and --start >= 0, got %d and %d", args.samples, args.start)
        return 2
    try:
        text = show(args.directory, args.split, args.samples, args.start, args.tokenizer)
    except (DataError, FileNotFoundError, ValueError) as err:
        log.error("show-data failed: %s", err)
        return 2
    sys.stdout.write(text)
    return 0
