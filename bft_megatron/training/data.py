"""Which rows the trainer reads: prepared data (``bft-megatron prepare``) or the synthetic set.

* ``data.train`` sources: global rank 0 prepares every configured split (``train``, ``valid``) whose
  ``data.output_dir/<split>/index.json`` is missing (never prepared, added to the config since, or
  interrupted) with the data layer's ``prepare.run``, and logs its summary (plus a warning when many
  samples are truncated, dropped or skipped); then every rank, whatever rank 0 did, receives rank 0's
  verdict in one broadcast (an error raises on every rank) and opens the splits. A configured ``valid`` split is
  then required on every rank (so all ranks evaluate, or none); an unconfigured one is used when present.
* only ``data.output_dir``: read its prepared ``train/`` split (``valid/`` too when present).
* ``--eval-only`` (``eval_only``): the ``valid`` split alone, never ``train``: prepared when missing from
  ``data.valid`` sources (with or without ``data.train``), checked strictly against them (a changed ``data.valid``
  is refused like any changed split, never rebuilt silently); the training sources are neither tokenized nor read.
* neither: the synthetic chain dataset (:mod:`bft_megatron.training.synthetic`), vocabulary from
  ``model.vocab_size``, with a warning.

Every split opened is checked against the config on rank 0 (:mod:`bft_megatron.data.provenance`: strictly
when ``data.train`` lists sources, only what the config sets otherwise; one reader of the sources, which other
nodes need not see); a difference raises on every rank alike, before any model exists. A ``valid/`` read beside
``train/`` must also have been prepared like it (template, supervise, reasoning format, tokenizer, rules:
``splits_disagree``).
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from bft_megatron.config.data import SourceConfig
from bft_megatron.config.schema import Config
from bft_megatron.parallel.rank0 import on_rank0
from bft_megatron.training.synthetic import SyntheticChatDataset
from bft_megatron.utils.logging import get_logger

__all__ = ["open_datasets", "has_validation"]

_log = get_logger(__name__)
SYNTHETIC_TRAIN_ROWS = 4096


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _prepare_missing(cfg: Config, eval_only: bool) -> None:
    """(Rank 0) prepare the configured splits that are missing (``eval_only``: ``valid`` alone) and log the summary."""
    from bft_megatron.data.pipeline import missing_splits

    d = cfg.data
    missing = [split for split in missing_splits(d) if split == "valid" or not eval_only]
    if missing:
        from bft_megatron.data.prepare import format_summary, preparation_warnings, run

        _check_tokenizer_vocab(cfg)  # before a preparation that may take an hour at scale, not after it
        _log.info("preparing %s into %s (bft-megatron prepare)", "+".join(missing), d.output_dir)
        results = run(d, progress="log", splits=missing)  # a log line a minute while the other ranks wait
        for line in format_summary(d, results).splitlines():
            _log.info("%s", line)
        for warning in preparation_warnings(d, results):
            _log.warning("%s", warning)


def _check_tokenizer_vocab(cfg: Config) -> None:
    """(Rank 0) ``data.tokenizer``'s ids fit ``model.vocab_size`` (raises :class:`ConfigError`)."""
    from bft_megatron.data.tokenizer import load_tokenizer

    size = load_tokenizer(cfg.data.tokenizer).vocab_size
    if size > cfg.model.vocab_size:
        raise _vocab_error(f"data.tokenizer={cfg.data.tokenizer} has a {size}-token vocabulary", size, cfg)


def _vocab_error(what: str, size: int, cfg: Config):
    from bft_megatron.config.base import ConfigError

    return ConfigError(f"{what} but model.vocab_size={cfg.model.vocab_size}: the model has no embedding for ids "
                       f"from {cfg.model.vocab_size} on. Set model.vocab_size >= {size} (an imported model's own "
                       "vocabulary), or use the model's own tokenizer")


def _splits(cfg: Config, eval_only: bool = False) -> dict[str, list[SourceConfig] | None]:
    """The splits to open (name -> configured sources): train (not with ``eval_only``), and valid when configured
    (then required: PackedDataset raises if absent) or present."""
    d = cfg.data
    train = {} if eval_only else {"train": d.train}
    return {**train, **({"valid": d.valid} if has_validation(cfg, eval_only) else {})}


def has_validation(cfg: Config, eval_only: bool = False) -> bool:
    """Whether the trainer will have validation rows: synthetic data (no ``data.train``, no ``data.output_dir``) has
    them; otherwise configured sources that are prepared on first use (with training sources, or for ``eval_only``
    alone) or a prepared ``valid/``."""
    from bft_megatron.data.storage import is_prepared

    d = cfg.data
    if not (d.train or d.output_dir):
        return True
    return bool(d.valid and (d.train or eval_only)) or is_prepared(os.path.join(d.output_dir, "valid"))


def _check(cfg: Config, prepared_only: bool = False, eval_only: bool = False) -> None:
    """(Rank 0) the prepared splits exist and match the config (provenance; tokenizer vocabulary).
    ``prepared_only``: skip a configured split not prepared yet (``--check``: the trainer would prepare it).
    ``eval_only``: the valid split alone (strictly with ``data.valid`` sources; beside a prepared train/ only when
    it defines the data: ``splits_disagree`` reads train/'s index, not its sources)."""
    from bft_megatron.config.base import ConfigError
    from bft_megatron.config.paths import no_train_split
    from bft_megatron.data.provenance import (PreparedDataMismatch, compare, mismatch_message, record_new_mtimes,
                                             splits_disagree, unchecked_message)
    from bft_megatron.data.storage import PackedDataset, is_prepared, read_index

    d = cfg.data
    train_dir = os.path.join(d.output_dir, "train")
    if not (eval_only or is_prepared(train_dir)):
        raise ConfigError(no_train_split(d))
    strict, problems, indexes = bool(d.train or (eval_only and d.valid)), {}, {}
    if eval_only and not d.valid and is_prepared(train_dir):
        indexes["train"] = read_index(train_dir)
    for split, sources in _splits(cfg, eval_only).items():
        if prepared_only and not is_prepared(os.path.join(d.output_dir, split)):
            continue
        ds = PackedDataset(os.path.join(d.output_dir, split))
        indexes[split] = ds.index
        recorded = json.dumps(ds.index, sort_keys=True)
        differences, unchecked = compare(ds.index, d, split, sources, strict)
        if differences:
            problems[str(ds.directory)] = differences
        elif unchecked:
            _log.warning("%s", unchecked_message(ds.directory, unchecked))
        if not differences and json.dumps(ds.index, sort_keys=True) != recorded:
            record_new_mtimes(ds.directory, ds.index, recorded)
        size = int(ds.index["tokenizer"].get("vocab_size", 0))
        if size > cfg.model.vocab_size:  # every split opened (an evaluation opens valid/ alone)
            raise _vocab_error(f"the data was tokenized with a {size}-token vocabulary", size, cfg)
    if problems:
        raise PreparedDataMismatch(mismatch_message(problems, strict))
    both = indexes.keys() == {"train", "valid"}
    disagreement = both and splits_disagree(d.output_dir, indexes["train"], indexes["valid"])
    if disagreement:
        raise PreparedDataMismatch(disagreement)


def check_prepared(cfg: Config) -> bool:
    """``train --check`` (the SLURM pre-flight): the splits already prepared under ``data.output_dir`` match the
    config, as the trainer checks them before building the model (raises :class:`PreparedDataMismatch` or
    :class:`ConfigError`); False when no train split is prepared yet (the trainer's first use prepares it)."""
    from bft_megatron.data.storage import is_prepared

    if not is_prepared(os.path.join(cfg.data.output_dir, "train")):
        if cfg.data.train and cfg.data.tokenizer:
            _check_tokenizer_vocab(cfg)
        return False
    _check(cfg, prepared_only=True)
    return True


def _prepare_and_check(cfg: Config, eval_only: bool) -> None:
    """(Rank 0) The data layer's user errors (a bad record, a missing source or tokenizer, a template the tokenizer
    cannot express, a split with no usable sample) become a :class:`ConfigError`, which :func:`on_rank0` raises on
    every rank as one: the CLI exits 2 everywhere, and a requeue would fail the same way."""
    from bft_megatron.config.base import ConfigError
    from bft_megatron.data.errors import DataError

    try:
        if cfg.data.train or (eval_only and cfg.data.valid):
            _prepare_missing(cfg, eval_only)
        _check(cfg, eval_only=eval_only)
    except DataError as err:
        raise ConfigError(f"data preparation for data.output_dir={cfg.data.output_dir} failed: {err}") from err


def open_datasets(cfg: Config, wait_group: dist.ProcessGroup | None = None, eval_only: bool = False):
    """(train, valid or None) datasets with ``__len__``, ``__getitem__ -> Row``, ``pad_id``, ``packed``;
    ``eval_only`` (``--eval-only``): prepared data's train is None (neither prepared, read nor checked).

    ``wait_group``: the world-sized group the other ranks wait on while rank 0 prepares missing splits
    (``ParallelGroups.control``, whose timeout outlasts a long preparation; None: the default group)."""
    d = cfg.data
    if d.train or d.output_dir:
        from bft_megatron.data.storage import PackedDataset

        if d.train and not d.output_dir:
            from bft_megatron.config.base import ConfigError

            raise ConfigError("data.train names sources but data.output_dir is empty: set where prepared data goes")
        # Rank 0 alone prepares what is missing and checks the splits against the config (one reader of
        # the sources, even for a multi-node job); every rank then opens the same splits.
        on_rank0(lambda: _prepare_and_check(cfg, eval_only), "data preparation / check", wait_group)
        opened = {split: PackedDataset(os.path.join(d.output_dir, split)) for split in _splits(cfg, eval_only)}
        return opened.get("train"), opened.get("valid")
    if _rank0():
        _log.warning("neither data.train nor data.output_dir is set: training on SYNTHETIC data (%d random chat "
                     "rows, bft_megatron/training/synthetic.py), not on any dataset; list data.train sources to "
                     "train on real data", SYNTHETIC_TRAIN_ROWS)
    valid_rows = max(64, cfg.train.global_batch_size * (cfg.train.eval_iters or 1))
    return (SyntheticChatDataset(SYNTHETIC_TRAIN_ROWS, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed),
            SyntheticChatDataset(valid_rows, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed + 7919))


def data_plan_line(cfg: Config, train) -> str:
    """What the run will read: rows in the training split, rows the schedule consumes, and how many epochs
    that is (the sampler reshuffles the rows each epoch), so a run that sees a fraction of its data, or many
    passes over it, says so before it starts."""
    t = cfg.train
    rows, needed = len(train), t.train_iters * t.global_batch_size
    index = getattr(train, "index", None)  # PackedDataset's index.json; synthetic data has none
    index = index if isinstance(index, dict) else {}
    samples = f" ({index['num_samples']} samples)" if "num_samples" in index else ""
    return (f"training data: {rows} rows of {cfg.data.seq_length} tokens{samples}; train.train_iters="
            f"{t.train_iters} x train.global_batch_size={t.global_batch_size} = {needed} rows = "
            f"{needed / max(rows, 1):.2f} epochs")


def validation_plan_warning(cfg: Config, valid) -> str | None:
    """Why each validation would count some rows twice, or None: it reads ``eval_iters`` global batches, and where
    they hold more rows than the validation split the reading wraps around (the repeated rows weigh double in the
    reported means)."""
    t = cfg.train
    if valid is None or not (t.eval_interval or t.eval_on_start) or t.eval_iters is None:
        return None
    rows, needed = len(valid), t.eval_iters * t.global_batch_size
    if needed <= rows:
        return None
    fits = rows // t.global_batch_size
    advice = (f"set train.eval_iters={fits} ({fits * t.global_batch_size} rows), or null (every row once), or add "
              "validation data" if fits else "set train.eval_iters=null (every row once) or add validation data")
    return (f"validation data: {rows} rows, but train.eval_iters={t.eval_iters} x train.global_batch_size="
            f"{t.global_batch_size} = {needed} rows per validation: {needed - rows} rows are read twice in each "
            f"validation and weigh double in its means; {advice}")
