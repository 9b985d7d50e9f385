"""``bft-megatron train --eval-only``: one validation of the weights a run would start from, nothing trained or
saved (Megatron-LM's ``--skip-train``).

The weights are what the run's start would load: ``checkpoint.save``'s latest checkpoint when it has one (a run in
progress or finished: its latest step), else ``checkpoint.load`` (with ``finetune`` or not), else the initial
weights (warned). The validation is the trainer's own (``train.eval_iters`` global batches, or with
``train.eval_iters: null`` every validation row once), logged as a ``validation at step N`` line and, with
``--eval-out FILE``, written by global rank 0 as JSON: ``{"iteration", "checkpoint", "eval_iters",
"validation_rows", "metrics"}``; with ``--eval-samples FILE`` BFT's statistics of each validation sample as JSONL
(:mod:`bft_megatron.training.eval_samples`).
"""

from __future__ import annotations

import json
import os

from bft_megatron.utils.files import atomic_write_text
from bft_megatron.utils.logging import get_logger

__all__ = ["evaluate_only", "parse_with_eval_flags"]

_log = get_logger(__name__)


def parse_with_eval_flags(parser, argv: list[str] | None):
    """The train CLI's arguments: ``parser`` with ``--eval-out`` and ``--eval-samples`` added, parsed (overrides may
    follow the flags, too); either without ``--eval-only`` is a usage error (exit 2)."""
    parser.add_argument("--eval-out", metavar="FILE", help="with --eval-only: write the metrics there as JSON")
    parser.add_argument("--eval-samples", metavar="FILE", help="with --eval-only: write BFT's statistics of each "
                        "validation sample there as JSONL (lm_loss, p_conf, sample_weight, ...; docs/training.md)")
    args = parser.parse_intermixed_args(argv)
    for flag, value in (("--eval-out", args.eval_out), ("--eval-samples", args.eval_samples)):
        if value and not args.eval_only:
            parser.error(f"{flag} needs --eval-only")
    return args


def evaluate_only(trainer, loaded_from: str | None, out: str | None, samples_out: str | None = None) -> int:
    """Validate ``trainer``'s loaded model once; ``loaded_from``: the checkpoint directory, or None (initial weights).
    Returns the CLI's exit status on every rank (0); the metrics reach global rank 0 only, and so do the per-sample
    statistics written to ``samples_out``. The trainer installs no exit-signal handler for an evaluation: a SIGTERM
    ends it (there is nothing to save)."""
    first = trainer.groups.rank == 0
    if first and loaded_from is None:
        _log.warning("--eval-only: no checkpoint to load (checkpoint.save has none and checkpoint.load is unset): "
                     "evaluating the initial weights")
    t = trainer.cfg.train
    if first and t.eval_iters is not None:
        _log.info("--eval-only: train.eval_iters=%d x train.global_batch_size=%d = %d rows of the %d validation rows "
                  "(train.eval_iters=null reads every row once)", t.eval_iters, t.global_batch_size,
                  t.eval_iters * t.global_batch_size, len(trainer.valid_data))
    for path in (out, samples_out) if first else ():  # a missing folder fails now, not after the whole validation
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sink = [] if samples_out else None
    values = trainer.evaluate(sample_sink=sink)
    if samples_out:
        from bft_megatron.training import eval_samples

        rows = eval_samples.gather_sample_rows(eval_samples.local_sample_rows(sink, trainer.groups),
                                               trainer.groups.control)
        if first:
            eval_samples.write_sample_lines(rows, trainer.valid_data, samples_out)
    if first and out:
        atomic_write_text(out, json.dumps({
            "iteration": trainer.state.iteration, "checkpoint": loaded_from, "eval_iters": t.eval_iters,
            "validation_rows": len(trainer.valid_data), "metrics": values}, indent=1) + "\n")
        _log.info("--eval-only: metrics written to %s", out)
    trainer.progress.close()
    return 0
