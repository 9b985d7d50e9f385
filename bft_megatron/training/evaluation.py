"""``bft-megatron train --eval-only``: one validation of the weights a run would start from, nothing trained or
saved (Megatron-LM's ``--skip-train``).

The weights are what the run's start would load: ``checkpoint.save``'s latest checkpoint when it has one (a run in
progress or finished: its latest step), else ``checkpoint.load`` (with ``finetune`` or not), else the initial
weights (warned). The validation is the trainer's own (``train.eval_iters`` global batches, or with
``train.eval_iters: null`` every validation row once), logged as a ``validation at step N`` line and, with
``--eval-out FILE``, written by global rank 0 as JSON: ``{"iteration", "checkpoint", "eval_iters",
"validation_rows", "metrics"}``.
"""

from __future__ import annotations

import json
import os

from bft_megatron.utils.files import atomic_write_text
from bft_megatron.utils.logging import get_logger

__all__ = ["evaluate_only"]

_log = get_logger(__name__)


def evaluate_only(trainer, loaded_from: str | None, out: str | None) -> int:
    """Validate ``trainer``'s loaded model once; ``loaded_from``: the checkpoint directory, or None (initial weights).
    Returns the CLI's exit status on every rank (0); the metrics reach global rank 0 only. The trainer installs no
    exit-signal handler for an evaluation: a SIGTERM ends it (there is nothing to save)."""
    first = trainer.groups.rank == 0
    if first and loaded_from is None:
        _log.warning("--eval-only: no checkpoint to load (checkpoint.save has none and checkpoint.load is unset): "
                     "evaluating the initial weights")
    t = trainer.cfg.train
    if first and t.eval_iters is not None:
        _log.info("--eval-only: train.eval_iters=%d x train.global_batch_size=%d = %d rows of the %d validation rows "
                  "(train.eval_iters=null reads every row once)", t.eval_iters, t.global_batch_size,
                  t.eval_iters * t.global_batch_size, len(trainer.valid_data))
    if first and out:  # a missing folder fails now, not after the whole validation
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    values = trainer.evaluate()
    if first and out:
        atomic_write_text(out, json.dumps({
            "iteration": trainer.state.iteration, "checkpoint": loaded_from, "eval_iters": t.eval_iters,
            "validation_rows": len(trainer.valid_data), "metrics": values}, indent=1) + "\n")
        _log.info("--eval-only: metrics written to %s", out)
    trainer.progress.close()
    return 0
