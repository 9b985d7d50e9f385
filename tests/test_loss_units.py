"""The loss's units counted ahead of the forward pass (bft_megatron.loss.units) equal the objective's own
``num_units``, for every method, packed and padded, with empty samples and a tail after the last boundary; and
every context-parallel rank's micro-batch carries the whole micro-batch's units (the trainer sums them over DP
only)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bft_megatron.data.collate import collate
from bft_megatron.loss import objective
from bft_megatron.loss.units import UNIT_INDEX, unit_counts
from bft_megatron.training.batch import to_micro_batch
from bft_megatron.training.synthetic import SyntheticChatDataset


def _reference_units(mask: torch.Tensor, cu_seqlens, method: str) -> int:
    """Per-sample Python loop: supervised tokens, or samples with one (segments of a packed row, padded rows)."""
    if cu_seqlens is None:
        samples = [row for row in mask]
    else:
        flat, cu = mask.reshape(-1), cu_seqlens.tolist()
        samples = [flat[a:b] for a, b in zip(cu[:-1], cu[1:])]
    if method == "bft":
        return sum(int((s != 0).any()) for s in samples)
    return sum(int((s != 0).sum()) for s in samples)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), packed=st.booleans(), method=st.sampled_from(["sft", "dft", "bft"]))
def test_units_equal_the_objectives(data, packed, method):
    rows, length = (1, data.draw(st.integers(1, 60))) if packed else (data.draw(st.integers(1, 4)),
                                                                      data.draw(st.integers(1, 30)))
    density = data.draw(st.sampled_from([0.0, 0.2, 0.9]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    mask = (torch.rand(rows, length, generator=gen) < density).float()
    nll = torch.rand(rows, length, generator=gen) * 3
    cu = None
    if packed:  # sorted boundaries from 0; empty samples allowed; the last may stop short (a padding tail)
        inner = sorted(data.draw(st.lists(st.integers(0, length), max_size=6)))
        end = data.draw(st.integers(inner[-1] if inner else 0, length))
        cu = torch.tensor([0] + inner + [end], dtype=torch.int64)
    counts = unit_counts(mask, cu)
    _, units, _ = objective(nll, mask, method=method, group_size=4, cu_seqlens=cu)
    assert counts.dtype == torch.int64 and counts.shape == (2,)
    assert int(counts[UNIT_INDEX[method]]) == int(units) == _reference_units(mask, cu, method)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("cp", [2, 4])
def test_every_cp_rank_carries_the_whole_micro_batchs_units(packed, cp):
    ds = SyntheticChatDataset(8, 64, 50, packed=packed, seed=4)
    d = collate([ds[0], ds[1]], packed=packed, pad_multiple=2 * cp, pad_id=0)
    total = 2 * 64 + 16 * cp
    whole = to_micro_batch(d, torch.device("cpu"), total=total, pad_id=0)
    want = unit_counts(whole.loss_mask, whole.cu_seqlens)
    samples = len(ds[0].seqlens) + len(ds[1].seqlens) if packed else 2  # each supervises its response
    assert int(want[0]) == int(whole.loss_mask.sum()) > 0 and int(want[1]) == samples
    for rank in range(cp):
        shard = to_micro_batch(d, torch.device("cpu"), total=total, pad_id=0, cp_size=cp, cp_rank=rank)
        assert shard.loss_mask.numel() == whole.loss_mask.numel() // cp
        assert torch.equal(shard.units, want)
