"""Read -> validate -> tokenize (multiprocess) -> length policy -> mix -> pack -> write, for one split.

A split is written into a hidden staging directory, its ``index.json`` (stats included) last, and moved into
place complete; :func:`missing_splits` names the configured splits without one (never prepared, or interrupted).
Preparations into one output directory take turns (``.prepare.lock``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.data.json_text import UNPARSED_REASONS
from bft_megatron.data.packing import one_per_row, pack_best_fit
from bft_megatron.data.progress import RecordProgress, count_records, progress_mode
from bft_megatron.data.provenance import RULES_VERSION, rebuild_reason, source_record
from bft_megatron.data.readers import read_records
from bft_megatron.data.records import Conversation, to_conversation
from bft_megatron.data.split_stats import SplitStats
from bft_megatron.data.storage import (SCRATCH_PREFIX, SampleStream, is_prepared, publish_index, read_index,
                                       remove_stale_staging, replace_split, staging_dir, write_split)
from bft_megatron.data.templates import TOKENIZER_TEMPLATES, check_template
from bft_megatron.data.tokenize import Encoded, apply_length_policy, encode, special_text_finder
from bft_megatron.data.tokenizer import Tokenizer, describe, load_tokenizer
from bft_megatron.utils.files import file_in_the_way
from bft_megatron.utils.locks import LockUnsupported, holder_text, wait_for_lock
from bft_megatron.utils.logging import get_logger
from bft_megatron.utils.signal_shield import detach_pool_worker

log = get_logger(__name__)

PREPARE_LOCK = ".prepare.lock"
LOCK_POLL_S = 2.0
CHUNK = 64  # conversations per worker task: large enough to amortise pickling, small for a smooth bar

_WORKER: dict[str, Any] = {}
ChunkResults = list[tuple[str, Any, Any, str | None]]  # _encode_chunk's results for one chunk


def _init_worker(tokenizer: str, template: str, supervise: str, reasoning_format: str) -> None:
    tok = load_tokenizer(tokenizer)
    _WORKER.update(tok=tok, template=template, supervise=supervise,
                   special=special_text_finder(tok, reasoning_format))


def _init_pool_worker(tokenizer: str, template: str, supervise: str, reasoning_format: str) -> None:
    detach_pool_worker()  # the launcher's exit signal must not kill a worker mid-chunk (imap would hang)
    _init_worker(tokenizer, template, supervise, reasoning_format)


def _encode_chunk(chunk: list[Conversation]) -> ChunkResults:
    """("ok", tokens, mask, control-token text found or None) or ("error", origin, message, None) per
    conversation, in order."""
    out: ChunkResults = []
    for conv in chunk:
        try:
            enc = encode(conv, _WORKER["template"], _WORKER["tok"], _WORKER["supervise"])
        except DataError as err:
            out.append(("error", err.where, err.message, None))
            continue
        special = _WORKER["special"](conv)
        out.append(("ok", enc.tokens, enc.loss_mask, special and f"{conv.origin}: {special}"))
    return out


def _conversations(src: SourceConfig, reasoning_format: str, skips: SkipLog, cache_dir: str, first: int,
                   ordinals: deque[int], seen: list[int]) -> Iterator[Conversation]:
    """Valid conversations of one source. Each one's ordinal (``first`` + its position among the
    source's parseable records) is queued on ``ordinals``; ``seen[0]`` counts parseable records. A ``columns``
    entry that no record has (a typo) is an error at the end: a record may lack an optional one."""
    present: set[str] = set()
    for i, raw in enumerate(read_records(src.path, src.split, skips, cache_dir, src.subset)):
        seen[0] = i + 1
        if src.columns and isinstance(raw.data, Mapping):
            present.update(k for k, v in raw.data.items() if v is not None)  # Arrow fills absent keys with None
        try:
            conv = to_conversation(raw.data, src.format, raw.where, src.columns, reasoning_format)
        except DataError as err:
            skips.handle(err, "invalid_record")
            continue
        ordinals.append(first + i)
        yield conv
    never = [f"{column!r} (columns.{name})" for name, column in src.columns.items() if column not in present]
    if seen[0] and never:
        raise DataError(src.path, f"no record has the column {', '.join(never)}: check the source's columns")


def _chunks(items: Iterable[Conversation]) -> Iterator[list[Conversation]]:
    chunk: list[Conversation] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def available_cores() -> int:
    """The cores this process may run on (its affinity: a SLURM task's share, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _workers(cfg: DataConfig) -> int:
    """``data.num_workers``, at most one per available core (a recipe's 16 on a 4-core login node or job step)."""
    cores = available_cores()
    if cfg.num_workers > cores:
        log.info("data.num_workers=%d but %d core(s) are available: tokenizing with %d", cfg.num_workers, cores,
                 cores)
    return min(cfg.num_workers, cores)


@contextlib.contextmanager
def _encoder(cfg: DataConfig) -> Iterator[Callable[[Iterable[list[Conversation]]], Iterator[ChunkResults]]]:
    """A function from chunks to their results, in order, for every source of a split: one pool of workers (when
    more than one runs), started once, not per source (each worker imports the data layer and loads the tokenizer:
    seconds each)."""
    workers, init = _workers(cfg), (cfg.tokenizer, cfg.template, cfg.supervise, cfg.reasoning_format)
    if workers <= 1:
        _init_worker(*init)
        yield lambda chunks: map(_encode_chunk, chunks)
        return
    with mp.get_context("spawn").Pool(workers, _init_pool_worker, init) as pool:
        yield lambda chunks: pool.imap(_encode_chunk, chunks)


def _tokenize_source(cfg: DataConfig, src: SourceConfig, stream: SampleStream, stats: SplitStats,
                     cache_dir: str, bar: RecordProgress, encode_chunks) -> list[int]:
    """Append one source's samples to ``stream``; return their stream indices.

    A sample's id is its record ordinal over all sources of the split, so it traces back to a source
    (``per_source`` in the index lists each source's parseable record count, in order).
    """
    ordinals: deque[int] = deque()
    seen = [0]
    mine: list[int] = []
    skipped_before, unparsed_before = stats.skips.total, _unparsed(stats.skips)
    log.info("reading %s (weight %s)", src.path, src.weight)
    convs = _conversations(src, cfg.reasoning_format, stats.skips, cache_dir, stats.parsed, ordinals, seen)
    for results in encode_chunks(_chunks(convs)):
        for kind, a, b, special in results:
            bar.update(1)
            ordinal = ordinals.popleft()  # results arrive in submission order
            if kind == "error":
                stats.skips.handle(DataError(a, b), "template_error")
                continue
            if special:
                stats.special_text += 1
                stats.special_examples += [special][:3 - len(stats.special_examples)]
            stats.encoded_tokens += len(a)
            sample, status = apply_length_policy(Encoded(a, b), cfg.seq_length, cfg.truncation)
            stats.length[status] += 1
            if sample is not None:
                mine.append(len(stream.lengths))
                stream.append(sample.tokens, sample.loss_mask, ordinal)
    malformed = _unparsed(stats.skips) - unparsed_before  # lines (or files) that never parsed
    stats.parsed += seen[0]
    stats.records += seen[0] + malformed
    stats.per_source.append({"path": src.path, "weight": src.weight, "records": seen[0] + malformed,
                             "parsed": seen[0], "samples": len(mine),
                             "skipped": stats.skips.total - skipped_before})
    return mine


def _unparsed(skips: SkipLog) -> int:
    return sum(skips.counts[reason] for reason in UNPARSED_REASONS)


def mix(per_source: list[list[int]], weights: list[float], seed: int) -> np.ndarray:
    """Weight w = passes per epoch: floor(w) full copies plus a seeded subsample of the fraction."""
    parts: list[np.ndarray] = []
    for i, (indices, w) in enumerate(zip(per_source, weights)):
        idx = np.asarray(indices, dtype=np.int64)
        whole, frac = int(w), w - int(w)
        parts.extend([idx] * whole)
        extra = int(round(frac * len(idx)))
        if extra:
            pick = np.random.default_rng([seed, i]).choice(len(idx), size=extra, replace=False)
            parts.append(idx[np.sort(pick)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _no_samples_hint(cfg: DataConfig, stats: SplitStats) -> str:
    """What to change when the length policy or the skip policy left nothing."""
    if stats.length["dropped_too_long"]:
        return (f"; every sample is longer than data.seq_length={cfg.seq_length}: raise data.seq_length, or set "
                "data.truncation=truncate to keep each sample's first data.seq_length tokens")
    if stats.length["dropped_no_supervision"]:
        return (f"; truncation to data.seq_length={cfg.seq_length} left no supervised (assistant) token in any "
                "sample: raise data.seq_length")
    if stats.skips.examples:
        return f"; every record was unusable (skipped under data.on_error=skip), the first: {stats.skips.examples[0]}"
    return ""


def prepare_split(cfg: DataConfig, split: str, sources: list[SourceConfig], tok: Tokenizer,
                  cache_dir: str, progress: bool | str = True) -> SplitStats:
    """Prepare ``split`` into a staging directory and move it to ``output_dir/split`` once complete (a failed
    preparation leaves the previous split as it was)."""
    stage = staging_dir(Path(cfg.output_dir), split)
    try:
        stats = _prepare_into(stage, cfg, split, sources, tok, cache_dir, progress)
        replace_split(stage, Path(cfg.output_dir) / split)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stats


def _prepare_into(out: Path, cfg: DataConfig, split: str, sources: list[SourceConfig], tok: Tokenizer,
                  cache_dir: str, progress: bool | str) -> SplitStats:
    stats = SplitStats(skips=SkipLog(policy=cfg.on_error))
    stream = SampleStream(out, split)
    start = time.perf_counter()
    recorded_sources = [source_record(s) for s in sources]  # before reading: a file changed meanwhile is noticed
    try:
        mode = progress_mode(progress)
        total = count_records(sources) if mode != "off" else None
        with RecordProgress(f"tokenize {split}", total, mode) as bar, _encoder(cfg) as encode_chunks:
            per_source = [_tokenize_source(cfg, s, stream, stats, cache_dir, bar, encode_chunks) for s in sources]
        stats.seconds = time.perf_counter() - start
        tokens, mask = stream.close()
        if not stream.lengths:
            raise DataError(f"{split} split", f"no usable samples: {stats.records} records, skipped "
                                              f"{dict(stats.skips.counts)}, length policy {dict(stats.length)}"
                                              f"{_no_samples_hint(cfg, stats)}")
        selection = mix(per_source, [s.weight for s in sources], cfg.seed)
        if not len(selection):  # every weight below 1 rounds its source's share down to no sample
            shares = ", ".join(f"{s.path}:{s.weight:g} of {len(i)} samples" for s, i in zip(sources, per_source))
            raise DataError(f"{split} split", f"the source weights select no sample ({shares}): a weight below 1 "
                                              "takes that fraction of its source's samples, rounded; raise it")
        lengths = np.asarray(stream.lengths, dtype=np.int64)
        layout = (pack_best_fit if cfg.packing else one_per_row)(lengths[selection], cfg.seq_length, cfg.seed)
        rows = [selection[r] for r in layout.rows]
        meta = {"split": split, "seq_length": cfg.seq_length, "packed": cfg.packing, "template": cfg.template,
                "supervise": cfg.supervise, "reasoning_format": cfg.reasoning_format, "truncation": cfg.truncation,
                "seed": cfg.seed, "on_error": cfg.on_error,
                "tokenizer": describe(tok), "sources": recorded_sources, "rules_version": RULES_VERSION,
                "packing_efficiency": round(layout.efficiency, 6)}
        index = write_split(out, tokens, mask, stream.lengths, stream.ids, rows, meta)
        del tokens, mask
    finally:
        stream.remove()
    stats.samples, stats.tokens = index["num_samples"], index["num_tokens"]
    stats.supervised_tokens, stats.rows = index["supervised_tokens"], index["num_rows"]
    stats.packing_efficiency = layout.efficiency
    publish_index(out, {**index, "stats": stats.to_json()})
    return stats


def configured_splits(cfg: DataConfig) -> dict[str, list[SourceConfig]]:
    """The splits ``cfg`` names sources for, in preparation order."""
    return {split: sources for split, sources in (("train", cfg.train), ("valid", cfg.valid)) if sources}


def missing_splits(cfg: DataConfig) -> list[str]:
    """Configured splits with no complete prepared directory under ``cfg.output_dir``."""
    return [split for split in configured_splits(cfg) if not is_prepared(Path(cfg.output_dir) / split)]


def _scratch_parent(cfg: DataConfig) -> str:
    """Where ``datasets`` puts its Arrow copy of local sources (as large as the sources; removed afterwards):
    ``$TMPDIR`` when set, else beside the output (``/tmp`` is RAM or small on many cluster nodes, and the output's
    file system already holds a prepared copy of the same data)."""
    if os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    os.makedirs(cfg.output_dir, exist_ok=True)
    return cfg.output_dir


def prepare_all(cfg: DataConfig, progress: bool | str = True, cache_dir: str | None = None,
                splits: Iterable[str] | None = None, reuse: bool = False) -> dict[str, SplitStats]:
    """Prepare every configured split; with ``splits`` (the trainer's first use) those of them still missing once
    this process holds the output directory's lock. ``reuse`` (the ``prepare`` CLI without --force): a split
    already prepared exactly as ``cfg`` would prepare it now is kept (its stats ``reused``)."""
    blocker = file_in_the_way(cfg.output_dir)
    if blocker is not None:  # else a NotADirectoryError traceback
        where = "" if blocker == cfg.output_dir else f"{blocker} "
        raise DataError(f"output_dir={cfg.output_dir!r}", f"{where}exists and is not a directory: name the directory "
                                                          "to write train/ and valid/ into")
    tok = load_tokenizer(cfg.tokenizer)
    check_template(cfg.template, tok)
    if tok.chat_template and cfg.template not in TOKENIZER_TEMPLATES:
        log.info("using the built-in %r template; the tokenizer's own chat_template is used only with "
                 "template: tokenizer or tokenizer_generation", cfg.template)
    elif cfg.template in TOKENIZER_TEMPLATES and "strftime_now" in str(tok.chat_template):  # str(): or a dict
        log.warning("%s's chat template writes today's date (strftime_now, e.g. Llama-3.2's 'Today Date'): "
                    "preparing these sources on another day gives other tokens", tok.name)
    wanted = configured_splits(cfg)
    if splits is not None:
        wanted = {split: sources for split, sources in wanted.items() if split in set(splits)}
    results: dict[str, SplitStats] = {}
    made_output_dir = not os.path.exists(cfg.output_dir)
    try:
        with _output_lock(cfg.output_dir) as locked:
            if splits is not None:  # the trainer's first use: another job may have prepared them while this waited
                missing = missing_splits(cfg)
                wanted = {split: sources for split, sources in wanted.items() if split in missing}
            if reuse:
                results.update(_up_to_date(cfg, wanted))
                wanted = {split: sources for split, sources in wanted.items() if split not in results}
            if locked:
                remove_stale_staging(Path(cfg.output_dir))
            if wanted:  # else nothing to write (every split kept: the output directory may be another user's)
                with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=_scratch_parent(cfg)) as tmp:
                    for split, sources in wanted.items():
                        results[split] = prepare_split(cfg, split, sources, tok, cache_dir or tmp, progress)
    except BaseException:
        _remove_empty_outputs(cfg.output_dir, list(wanted), made_output_dir)
        raise
    return results


def _up_to_date(cfg: DataConfig, wanted: dict[str, list[SourceConfig]]) -> dict[str, SplitStats]:
    """The prepared splits among ``wanted`` that need no rebuild, with their recorded stats; says why others do."""
    kept = {}
    for split, sources in wanted.items():
        directory = Path(cfg.output_dir) / split
        if not is_prepared(directory):
            continue
        reason = rebuild_reason(directory, cfg, split, sources)
        if reason is None:
            log.info("%s is up to date (same sources, tokenizer and settings): kept", directory)
            kept[split] = SplitStats.from_index(read_index(directory))
        else:
            log.info("%s is rebuilt: %s", directory, reason)
    return kept


@contextlib.contextmanager
def _output_lock(output_dir: str) -> Iterator[bool]:
    """Hold ``output_dir/.prepare.lock`` (waiting for another preparation into it to finish); yields whether it is
    held (False where the file system cannot lock: preparations are then not serialised). Two preparations at
    once failed on each other's scratch files, or one replaced the split the other had just checked."""
    os.makedirs(output_dir, exist_ok=True)
    try:
        lock, _ = wait_for_lock(os.path.join(output_dir, PREPARE_LOCK), LOCK_POLL_S, lambda holder, waited: True,
                                lambda holder: log.info("waiting for another preparation into %s to finish (%s)",
                                                        output_dir, holder_text(holder)))
    except (LockUnsupported, PermissionError) as exc:
        log.info("%s: not locked for preparation (%s): another preparation into it at the same time would not be "
                 "waited for", output_dir, exc.strerror)
        lock = None
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.release()


def _remove_empty_outputs(output_dir: str, splits: list[str], made_output_dir: bool) -> None:
    """After a failed preparation: the split directories it left empty (and the output directory, if this run
    created it), so that a failed first try leaves no empty ``train/`` that looks like a preparation."""
    paths = [os.path.join(output_dir, split) for split in splits] + ([output_dir] if made_output_dir else [])
    if made_output_dir:  # the lock file made with it (released by now)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(output_dir, PREPARE_LOCK))
    for path in paths:
        with contextlib.suppress(OSError):  # only an empty directory goes; a kept split or a user's file stays
            os.rmdir(path)
