"""The resume's row-order check (``checkpoint/data_order.py``); the warning in a real resume is in
``test_train_faults.py``."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("seed, rows, want", [
    (1234, 80, []),
    (99, 80, ["data.seed: checkpoint 1234, config 99"]),
    (1234, 96, ["training rows: checkpoint 80, now 96"]),
    (99, 96, ["data.seed: checkpoint 1234, config 99", "training rows: checkpoint 80, now 96"]),
])
def test_a_resume_on_other_rows_lists_the_seed_and_the_row_count(seed, rows, want):
    """The row order after consumed_rows depends on data.seed and the training split's row count; a checkpoint
    written before train_rows was stored leaves the count unchecked."""
    from bft_megatron.checkpoint.data_order import data_order_changes

    common = {"config": {"data": {"seed": 1234}}, "train_state": {"consumed_rows": 16, "train_rows": 80}}
    assert data_order_changes(common, seed, rows) == want
    older = {"config": {"data": {"seed": 1234}}, "train_state": {"consumed_rows": 16}}
    assert data_order_changes(older, 1234, rows) == []
