"""CP shard placement against a naive per-sample chunking (the layout of Megatron / TE THD partitioning)."""

from __future__ import annotations

import pytest
import torch

from bft_megatron.parallel.context_parallel import local_to_global_positions, split_for_cp


def _reference_cp_shard(row: list[int], bounds: list[int], cp: int, r: int) -> list[int]:
    """Per sample: cut into 2*cp equal chunks, keep chunk r then chunk 2*cp-1-r."""
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        chunk = (e - s) // (2 * cp)
        out += row[s + r * chunk:s + (r + 1) * chunk]
        out += row[s + (2 * cp - 1 - r) * chunk:s + (2 * cp - r) * chunk]
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_packed_shards_match_naive_chunking(cp):
    lengths = [2 * cp * k for k in (1, 3, 2, 5)]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    row = list(range(bounds[-1]))
    x = torch.tensor(row).unsqueeze(0)
    seen = []
    for r in range(cp):
        shard = split_for_cp(x, cp, r, torch.tensor(bounds, dtype=torch.int32))
        assert shard[0].tolist() == _reference_cp_shard(row, bounds, cp, r)
        seen += shard[0].tolist()
    assert sorted(seen) == row                       # every token on exactly one rank


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_padded_shards_match_naive_chunking(cp):
    batch, length = 3, 8 * cp
    x = torch.arange(batch * length).reshape(batch, length)
    for r in range(cp):
        shard = split_for_cp(x, cp, r)
        for b in range(batch):
            assert shard[b].tolist() == _reference_cp_shard(x[b].tolist(), [0, length], cp, r)
        pos = local_to_global_positions(tuple(shard.shape), cp, r)
        assert torch.equal(x.reshape(-1)[pos], shard.reshape(-1))


def test_trailing_padding_positions_are_unique():
    cp, bounds = 2, [0, 4, 12]
    total = 16                                          # 4 trailing tokens after the last sample
    pos = torch.cat([local_to_global_positions((1, total // cp), cp, r, torch.tensor(bounds)) for r in range(cp)])
    assert sorted(pos.tolist()) == list(range(total))


def test_bad_lengths_are_rejected():
    with pytest.raises(ValueError, match="multiple of 2"):
        split_for_cp(torch.zeros(1, 6), 2, 0)


def test_bad_local_shapes_are_rejected():
    """The loss calls local_to_global_positions directly (not through split_for_cp): its own checks matter."""
    with pytest.raises(ValueError, match="local length 7 is odd"):
        local_to_global_positions((2, 7), 2, 0)
    with pytest.raises(ValueError, match=r"shape \[1, T/CP\], got \(2, 8\)"):
        local_to_global_positions((2, 8), 2, 0, torch.tensor([0, 8, 16]))
