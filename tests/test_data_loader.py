"""Global batches independent of the DP layout, exact resume, per-epoch reshuffle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bft_megatron.data.loader import GlobalBatchSampler


def _take(sampler, n_micro):
    return list(itertools.islice(iter(sampler), n_micro))


def _global_batches(num_rows, gbs, mbs, dp, seed, consumed, n_batches):
    """Reassemble each global batch from all DP ranks' micro-batches."""
    per_rank = []
    for r in range(dp):
        s = GlobalBatchSampler(num_rows, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=r, dp_size=dp,
                               seed=seed, consumed_rows=consumed)
        micro = _take(s, n_batches * s.num_microbatches)
        per_rank.append([sum(micro[k * s.num_microbatches:(k + 1) * s.num_microbatches], [])
                         for k in range(n_batches)])
    return [sum((per_rank[r][k] for r in range(dp)), []) for k in range(n_batches)]


def test_global_batch_is_independent_of_dp_size_and_micro_batch():
    ref = _global_batches(37, 8, 8, 1, 5, 0, 12)
    for dp, mbs in ((2, 2), (4, 1), (8, 1), (2, 4)):
        assert _global_batches(37, 8, mbs, dp, 5, 0, 12) == ref


def test_resume_from_consumed_rows_at_another_layout():
    full = _global_batches(37, 8, 1, 4, 5, 0, 10)
    resumed = _global_batches(37, 8, 2, 2, 5, 3 * 8, 7)
    assert resumed == full[3:]


def test_epochs_cover_all_rows_and_reshuffle():
    s = GlobalBatchSampler(20, global_batch_size=4, micro_batch_size=4, seed=9)
    e0, e1 = s.stream(0, 20), s.stream(20, 20)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(20))
    assert e0.tolist() != e1.tolist()
    # a batch crossing the epoch boundary takes the tail of epoch 0 then the head of epoch 1
    assert s.stream(18, 4).tolist() == e0[18:].tolist() + e1[:2].tolist()
    other = GlobalBatchSampler(20, global_batch_size=4, micro_batch_size=4, seed=10)
    assert other.stream(0, 20).tolist() != e0.tolist()


def test_consumed_rows_advance_per_global_batch():
    s = GlobalBatchSampler(10, global_batch_size=4, micro_batch_size=1, dp_rank=1, dp_size=2, seed=0)
    it = iter(s)
    assert next(it) == [int(s.global_batch(0)[2])] and s.consumed_rows == 0
    assert next(it) == [int(s.global_batch(0)[3])] and s.consumed_rows == 4  # batch fully handed out
    assert next(it) == [int(s.global_batch(4)[2])] and s.consumed_rows == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=6, micro_batch_size=1, dp_size=4), "multiple of dp_size"),
    (dict(global_batch_size=8, micro_batch_size=3, dp_size=2), "must divide"),
    (dict(global_batch_size=8, micro_batch_size=1, dp_size=2, dp_rank=2), "dp_rank"),
    (dict(global_batch_size=8, micro_batch_size=1, consumed_rows=-1), "consumed_rows"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(10, **kwargs)


def test_permutation_is_reproducible_across_instances():
    a = GlobalBatchSampler(50, global_batch_size=5, micro_batch_size=5, seed=3).stream(0, 150)
    b = GlobalBatchSampler(50, global_batch_size=5, micro_batch_size=5, seed=3).stream(0, 150)
    assert np.array_equal(a, b)


def test_iterate_batches_end_to_end_matches_across_dp_layouts(tmp_path):
    from bft_megatron.data.loader import iterate_batches
    from bft_megatron.data.storage import PackedDataset
    from tests.data_fixtures import prepare_dir, synthetic_chats

    ds = PackedDataset(prepare_dir(tmp_path / "p", synthetic_chats(40, seed=3), seq_length=128))

    def samples(dp: int, mbs: int, consumed: int, n_global: int) -> list[list[int]]:
        per_batch: list[list[int]] = [[] for _ in range(n_global)]
        for r in range(dp):
            s = GlobalBatchSampler(len(ds), global_batch_size=4, micro_batch_size=mbs, dp_rank=r, dp_size=dp,
                                   seed=1, consumed_rows=consumed)
            it = iterate_batches(ds, s, pad_multiple=4)
            for k in range(n_global):
                for _ in range(s.num_microbatches):
                    b = next(it)
                    assert b["tokens"].shape[1] % 4 == 0 and "cu_seqlens" in b
                    per_batch[k] += b["sample_ids"].tolist()
        return per_batch

    ref = samples(1, 4, 0, 6)
    assert samples(2, 1, 0, 6) == ref and samples(4, 1, 8, 4) == ref[2:]


def test_batch_loader_resumes_from_its_consumed_rows(tmp_path):
    from bft_megatron.data.loader import BatchLoader
    from tests.data_fixtures import prepare_dir, synthetic_chats

    path = str(prepare_dir(tmp_path / "p", synthetic_chats(30, seed=6), seq_length=128))
    first = BatchLoader(path, global_batch_size=4, micro_batch_size=2, seed=2, pad_multiple=2)
    it = iter(first)
    seen = [next(it)["sample_ids"].tolist() for _ in range(6)]  # 3 global batches of 2 micro-batches
    assert first.consumed_rows == 12 and first.num_microbatches == 2
    again = BatchLoader(path, global_batch_size=4, micro_batch_size=4, seed=2, consumed_rows=8)
    assert next(iter(again))["sample_ids"].tolist() == seen[4] + seen[5]
