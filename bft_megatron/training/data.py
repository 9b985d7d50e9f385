"""Which rows the trainer reads: prepared data (``bft-megatron prepare``) or the synthetic set.

* ``data.train`` sources: global rank 0 prepares every configured split (``train``, ``valid``) whose
  ``data.output_dir/<split>/index.json`` is missing (never prepared, added to the config since, or
  interrupted) with the data layer's ``prepare.run``; then every rank, whatever rank 0 did, meets it
  at one barrier and opens the splits. A configured ``valid`` split is then required on every rank
  (so all ranks evaluate, or none); an unconfigured one is used when present.
* only ``data.output_dir``: read its prepared ``train/`` split (``valid/`` too when present).
* neither: the synthetic chain dataset (:mod:`bft_megatron.training.synthetic`), vocabulary from
  ``model.vocab_size``.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from bft_megatron.config.schema import Config
from bft_megatron.training.synthetic import SyntheticChatDataset
from bft_megatron.utils.logging import get_logger

__all__ = ["open_datasets"]

_log = get_logger(__name__)
SYNTHETIC_TRAIN_ROWS = 4096


def _prepare_missing(cfg: Config) -> None:
    """Rank 0 prepares the configured splits that are missing; all ranks then call one barrier."""
    d = cfg.data
    if not d.output_dir:
        raise ValueError("data.train names sources but data.output_dir is empty: set where prepared data goes")
    if not dist.is_initialized() or dist.get_rank() == 0:
        from bft_megatron.data.pipeline import missing_splits

        missing = missing_splits(d)
        if missing:
            from bft_megatron.data.prepare import run

            _log.info("preparing %s into %s (bft-megatron prepare)", "+".join(missing), d.output_dir)
            run(d, splits=missing)
    if dist.is_initialized():
        dist.barrier()  # every rank, unconditionally: the splits are complete past this point


def open_datasets(cfg: Config):
    """(train, valid or None) datasets with ``__len__``, ``__getitem__ -> Row``, ``pad_id``, ``packed``."""
    d = cfg.data
    if d.train or d.output_dir:
        from bft_megatron.data.storage import PackedDataset, is_prepared

        if d.train:
            _prepare_missing(cfg)
        train_dir, valid_dir = (os.path.join(d.output_dir, s) for s in ("train", "valid"))
        if not is_prepared(train_dir):
            raise FileNotFoundError(f"data.output_dir={d.output_dir}: no prepared train split (run bft-megatron "
                                    "prepare, or list data.train sources)")
        train = PackedDataset(train_dir)
        if train.seq_length > d.seq_length:
            raise ValueError(f"prepared rows are {train.seq_length} tokens but data.seq_length={d.seq_length}")
        tok_vocab = int(train.index["tokenizer"].get("vocab_size", 0))
        if tok_vocab > cfg.model.vocab_size:
            raise ValueError(f"the data was tokenized with a {tok_vocab}-token vocabulary but model.vocab_size="
                             f"{cfg.model.vocab_size}")
        use_valid = bool(d.train and d.valid) or is_prepared(valid_dir)  # configured: PackedDataset raises if absent
        return train, PackedDataset(valid_dir) if use_valid else None
    valid_rows = max(64, cfg.train.global_batch_size * cfg.train.eval_iters)
    return (SyntheticChatDataset(SYNTHETIC_TRAIN_ROWS, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed),
            SyntheticChatDataset(valid_rows, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed + 7919))
