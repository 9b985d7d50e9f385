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


def test_fewer_rows_and_a_checkpoint_without_a_seed():
    """A shrunk split is a change too; a common dict without a stored config leaves data.seed unchecked."""
    from bft_megatron.checkpoint.data_order import data_order_changes

    assert data_order_changes({"train_state": {"train_rows": 80}}, 99, 64) == ["training rows: checkpoint 80, now 64"]
    assert data_order_changes({"config": {"data": {}}, "train_state": {"train_rows": 80}}, 99, 80) == []


def test_the_warning_is_logged_once_by_global_rank_0_with_the_data_position(log_records):
    import logging

    from bft_megatron.checkpoint.data_order import warn_data_order

    common = {"config": {"data": {"seed": 1234}}, "train_state": {"consumed_rows": 16, "train_rows": 80}}
    for rank in (0, 1, 2):
        assert warn_data_order(common, 99, 80, "/run/iter_0000002", rank) == ["data.seed: checkpoint 1234, config 99"]
    assert warn_data_order(common, 1234, 80, "/run/iter_0000002", 0) == []
    [warning] = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    assert warning.startswith("resuming /run/iter_0000002 on other training rows (data.seed: checkpoint 1234, "
                              "config 99): the data position (consumed_rows=16) is kept")
