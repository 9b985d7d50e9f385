"""Which rows the trainer reads: prepared data (``bft-megatron prepare``) or the synthetic set.

* ``data.output_dir`` with a prepared ``train/`` split: read it (``valid/`` too when present).
* ``data.train`` sources but nothing prepared yet: global rank 0 prepares them into
  ``data.output_dir`` (the data layer's ``prepare.run``), the others wait at a barrier.
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


def _prepared(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "index.json"))


def _prepare_if_needed(cfg: Config) -> None:
    d = cfg.data
    if not d.output_dir:
        raise ValueError("data.train names sources but data.output_dir is empty: set where prepared data goes")
    if _prepared(os.path.join(d.output_dir, "train")):
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        from bft_megatron.data.prepare import run

        _log.info("preparing data into %s (bft-megatron prepare)", d.output_dir)
        run(d)
    if dist.is_initialized():
        dist.barrier()


def open_datasets(cfg: Config):
    """(train, valid or None) datasets with ``__len__``, ``__getitem__ -> Row``, ``pad_id``, ``packed``."""
    d = cfg.data
    if d.train or d.output_dir:
        from bft_megatron.data.storage import PackedDataset

        if d.train:
            _prepare_if_needed(cfg)
        train_dir, valid_dir = (os.path.join(d.output_dir, s) for s in ("train", "valid"))
        if not _prepared(train_dir):
            raise FileNotFoundError(f"data.output_dir={d.output_dir}: no prepared train split (run bft-megatron "
                                    "prepare, or list data.train sources)")
        train = PackedDataset(train_dir)
        if train.seq_length > d.seq_length:
            raise ValueError(f"prepared rows are {train.seq_length} tokens but data.seq_length={d.seq_length}")
        tok_vocab = int(train.index["tokenizer"].get("vocab_size", 0))
        if tok_vocab > cfg.model.vocab_size:
            raise ValueError(f"the data was tokenized with a {tok_vocab}-token vocabulary but model.vocab_size="
                             f"{cfg.model.vocab_size}")
        return train, PackedDataset(valid_dir) if _prepared(valid_dir) else None
    valid_rows = max(64, cfg.train.global_batch_size * cfg.train.eval_iters)
    return (SyntheticChatDataset(SYNTHETIC_TRAIN_ROWS, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed),
            SyntheticChatDataset(valid_rows, d.seq_length, cfg.model.vocab_size, d.packing, seed=d.seed + 7919))
