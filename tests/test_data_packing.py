"""Best-fit packing, the padded layout, and the truncation policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bft_megatron.data.packing import one_per_row, pack_best_fit
from bft_megatron.data.tokenize import Encoded, apply_length_policy


def _check_layout(lengths, layout, cap):
    flat = np.concatenate(layout.rows) if layout.rows else np.zeros(0, int)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # each sample exactly once
    assert all(lengths[r].sum() <= cap for r in layout.rows)
    assert layout.efficiency == pytest.approx(lengths.sum() / (len(layout.rows) * cap))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(0, 2**31))
def test_best_fit_is_a_valid_deterministic_partition(lengths, seed):
    lengths = np.asarray(lengths)
    a = pack_best_fit(lengths, 64, seed)
    _check_layout(lengths, a, 64)
    b = pack_best_fit(lengths, 64, seed)
    assert [r.tolist() for r in a.rows] == [r.tolist() for r in b.rows]
    # any-fit property: a new row is opened only when nothing fits, so at most one row is half empty
    assert sum(int(lengths[r].sum()) <= 32 for r in a.rows) <= 1


def test_best_fit_packs_tightly_and_seed_changes_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, size=2000)
    a, b = pack_best_fit(lengths, 1024, 1), pack_best_fit(lengths, 1024, 2)
    _check_layout(lengths, a, 1024)
    assert a.efficiency > 0.97
    assert [r.tolist() for r in a.rows] != [r.tolist() for r in b.rows]


def test_best_fit_rows_come_in_a_seeded_random_order():
    """Best-fit-decreasing opens rows longest-sample first; the rows are then shuffled, so the order a row is
    read in does not follow the length of its samples."""
    lengths = np.random.default_rng(0).integers(10, 300, size=2000)
    longest = [int(lengths[r].max()) for r in pack_best_fit(lengths, 1024, 1).rows]
    assert np.corrcoef(np.arange(len(longest)), longest)[0, 1] > -0.2
    assert longest != sorted(longest, reverse=True)


def test_best_fit_chooses_the_fullest_row():
    # 6 then 5 open two rows (rem 4, 5); 4 must go to the row with 4 left (best fit), not the first
    layout = pack_best_fit(np.asarray([6, 5, 4, 5]), 10, 0)
    assert sorted(sorted(r.tolist()) for r in layout.rows) == [[0, 2], [1, 3]]


def test_over_length_samples_are_refused_by_the_packer():
    with pytest.raises(ValueError, match="sample lengths must be in"):
        pack_best_fit(np.asarray([3, 11]), 10, 0)


def test_one_per_row():
    lengths = np.asarray([3, 7, 5])
    layout = one_per_row(lengths, 8, 0)
    _check_layout(lengths, layout, 8)
    assert all(len(r) == 1 for r in layout.rows)


def _enc(n, supervised_from):
    mask = np.zeros(n, np.uint8)
    mask[supervised_from:-1] = 1
    return Encoded(np.arange(n, dtype=np.int32), mask)


def test_length_policy():
    ok, status = apply_length_policy(_enc(8, 2), 8, "truncate")
    assert status == "ok" and len(ok.tokens) == 8
    cut, status = apply_length_policy(_enc(12, 2), 8, "truncate")
    assert status == "truncated" and cut.tokens.tolist() == list(range(8))
    assert cut.loss_mask.tolist() == [0, 0, 1, 1, 1, 1, 1, 0]  # new last position masked
    assert apply_length_policy(_enc(12, 2), 8, "drop") == (None, "dropped_too_long")
    assert apply_length_policy(_enc(12, 9), 8, "truncate") == (None, "dropped_no_supervision")
