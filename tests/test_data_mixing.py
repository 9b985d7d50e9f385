"""Source weights: whole passes plus a seeded subsample of the fraction; weights that select nothing."""

from __future__ import annotations

import numpy as np
import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data.errors import DataError
from bft_megatron.data.prepare import run
from bft_megatron.data.storage import PackedDataset
from tests.data_fixtures import DEMO_SP, synthetic_chats, write_jsonl


def test_weighted_mixing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", synthetic_chats(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", synthetic_chats(10, seed=2))
    cfg = DataConfig(train=[SourceConfig(path=str(a), weight=2.0), SourceConfig(path=str(b), weight=0.5)],
                     tokenizer=DEMO_SP, seq_length=256, output_dir=str(tmp_path / "o"))
    run(cfg)
    ds = PackedDataset(tmp_path / "o" / "train")
    ids = np.sort(ds.sample_ids)
    counts = np.bincount(ids, minlength=20)
    assert counts[:10].tolist() == [2] * 10  # source a: two passes
    assert counts[10:].sum() == 5 and set(counts[10:].tolist()) <= {0, 1}  # source b: a seeded half
    assert ds.index["stats"]["per_source"][1]["weight"] == 0.5


def test_weights_that_select_no_sample_are_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", synthetic_chats(3, seed=1))
    cfg = DataConfig(train=[SourceConfig(path=str(a), weight=0.1)], tokenizer=DEMO_SP, seq_length=256,
                     output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"train split: the source weights select no sample \(.*a\.jsonl:0\.1 of 3 "
                                        r"samples\): a weight below 1 takes that fraction"):
        run(cfg)  # was an empty train/ split, refused later by the trainer with less to go on


def test_fractional_weight_is_a_seeded_random_subsample():
    """The fraction of a weight picks rows at random (seeded, source by source), not the first rows."""
    from bft_megatron.data.pipeline import mix

    rows = [list(range(100)), list(range(100, 200))]
    picks = {seed: mix(rows, [0.5, 1.5], seed) for seed in (1, 2)}
    for seed, pick in picks.items():
        first, second = pick[pick < 100], pick[pick >= 100]
        assert len(first) == 50 and len(set(first.tolist())) == 50 and first.tolist() != list(range(50))
        assert len(second) == 150 and np.bincount(second - 100).max() == 2  # one full pass + half again
        np.testing.assert_array_equal(mix(rows, [0.5, 1.5], seed), pick)  # same seed, same rows
    assert picks[1].tolist() != picks[2].tolist()
