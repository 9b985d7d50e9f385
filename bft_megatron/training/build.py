"""Assemble a :class:`Trainer` from a validated config and the process groups."""

from __future__ import annotations

from bft_megatron.config.schema import Config
from bft_megatron.config.validate import Layout
from bft_megatron.model import build_model_chunks
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.training.loop import Trainer
from bft_megatron.training.setup import build_optimizer, build_scheduler, install_schedule_hooks, wrap_model
from bft_megatron.training.synthetic import SyntheticChatDataset

__all__ = ["build_datasets", "build_trainer"]


def build_datasets(cfg: Config):
    """(train, valid) row datasets. Prepared data when ``data.train_path`` is set, else synthetic."""
    d = cfg.data
    packed = d.layout == "packed"
    if d.train_path is None:
        make = lambda n, seed: SyntheticChatDataset(n, d.seq_length, cfg.model.vocab_size, packed, seed=seed)  # noqa: E731
        return make(d.synthetic_samples, d.seed), make(max(64, cfg.train.global_batch_size * cfg.train.eval_iters),
                                                      d.seed + 7919)
    from bft_megatron.training.prepared import open_prepared

    return open_prepared(d.train_path, cfg), (open_prepared(d.valid_path, cfg) if d.valid_path else None)


def build_trainer(cfg: Config, layout: Layout, groups: ParallelGroups) -> Trainer:
    chunks, tconfig = build_model_chunks(cfg, groups)
    model = wrap_model(chunks, tconfig, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    install_schedule_hooks(model, tconfig, optimizer, cfg)
    train_data, valid_data = build_datasets(cfg)
    return Trainer(cfg, layout, groups, model, tconfig, optimizer, scheduler, train_data, valid_data)
