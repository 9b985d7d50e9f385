"""Assemble a :class:`Trainer` from a validated config and the process groups."""

from __future__ import annotations

from bft_megatron.config.schema import Config
from bft_megatron.config.validate import Layout
from bft_megatron.model import build_model_chunks
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.training.loop import Trainer
from bft_megatron.training.logit_rows import install_row_selection
from bft_megatron.training.setup import build_optimizer, build_scheduler, install_schedule_hooks, wrap_model
from bft_megatron.training.data import data_plan_line, open_datasets, validation_plan_warning
from bft_megatron.utils.logging import get_logger

__all__ = ["build_trainer"]


def build_trainer(cfg: Config, layout: Layout, groups: ParallelGroups, eval_only: bool = False) -> Trainer:
    """``eval_only`` (``--eval-only``): prepared data's train split is neither prepared nor opened (None)."""
    # first: a missing or bad dataset fails before any model exists
    train_data, valid_data = open_datasets(cfg, groups.control, eval_only)
    if groups.rank == 0:
        if train_data is not None:
            get_logger(__name__).info("%s", data_plan_line(cfg, train_data))
        twice = validation_plan_warning(cfg, valid_data)
        if twice:
            get_logger(__name__).warning("%s", twice)
    chunks, tconfig = build_model_chunks(cfg, groups)
    if cfg.train.supervised_logits_only:
        install_row_selection(chunks)
    model = wrap_model(chunks, tconfig, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    install_schedule_hooks(model, tconfig, optimizer, cfg)
    return Trainer(cfg, layout, groups, model, tconfig, optimizer, scheduler, train_data, valid_data)
