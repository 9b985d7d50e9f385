"""Resuming on other training rows: compare what fixes the row order with the checkpoint's.

A full resume restores only the data position, ``consumed_rows``: the rows after it come from the epoch-wise
permutation that ``data.seed`` seeds over the training split's row count (``data/loader.py``
``GlobalBatchSampler``). A changed ``data.seed``, or a split with another number of rows (new sources, another
``data.seq_length`` or ``data.packing``, another prepared ``data.output_dir``), therefore trains on another
sequence of rows than the uninterrupted run: rows seen again, rows never seen, an epoch boundary elsewhere.
Megatron-LM resumes such a run without a word. Continuing on new data is sometimes what the user means, so this
is a warning (rank 0, before loading), not an error; :func:`data_order_changes` lists the differences.

The checkpoint's ``data.seed`` comes from its stored config; its row count from ``train_state["train_rows"]``
(checkpoints from before that key was written: unchecked).
"""

from __future__ import annotations

from bft_megatron.utils.logging import get_logger

__all__ = ["data_order_changes", "warn_data_order"]

_log = get_logger(__name__)


def data_order_changes(common: dict, seed: int, train_rows: int) -> list[str]:
    """One line per difference between the checkpoint's (``common``: its common state dict) row order inputs
    and this run's ``data.seed`` and training split row count ``train_rows``."""
    changes = []
    saved_seed = ((common.get("config") or {}).get("data") or {}).get("seed")
    if saved_seed is not None and saved_seed != seed:
        changes.append(f"data.seed: checkpoint {saved_seed}, config {seed}")
    saved_rows = (common.get("train_state") or {}).get("train_rows")
    if saved_rows is not None and int(saved_rows) != train_rows:
        changes.append(f"training rows: checkpoint {int(saved_rows)}, now {train_rows}")
    return changes


def warn_data_order(common: dict, seed: int, train_rows: int, path: str, rank: int) -> list[str]:
    """Log (global rank 0) that the resumed run reads its rows in another order than the checkpoint's run."""
    changes = data_order_changes(common, seed, train_rows)
    if changes and rank == 0:
        consumed = (common.get("train_state") or {}).get("consumed_rows")
        _log.warning("resuming %s on other training rows (%s): the data position (consumed_rows=%s) is kept, but the "
                     "rows after it differ from the uninterrupted run's (rows may repeat or be skipped); to train "
                     "the same rows, resume with the checkpoint's data settings", path, "; ".join(changes), consumed)
    return changes
