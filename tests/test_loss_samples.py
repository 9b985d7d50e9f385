"""``sample_statistics`` (``--eval-samples``) against the per-sample oracle, the spec's worked example and the
objective's own metrics (the same values, per sample), also under context parallelism (gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bft_megatron.loss import objective, reduce_metrics, sample_statistics
from bft_megatron.parallel.context_parallel import split_for_cp
from tests.dist_harness import run_distributed
from tests.loss_reference import _reference_sample_statistics

ATOL = 1e-6
FLOATS = ("nll_sum", "lm_loss", "p_conf", "sample_weight")


def _assert_matches_oracle(got, ref, atol=ATOL):
    """``got``: sample_statistics' tensors; ``ref``: the oracle's dicts (None where NaN is expected)."""
    assert got["tokens"].dtype == torch.int64 and got["short"].dtype == torch.bool
    assert got["tokens"].tolist() == [r["tokens"] for r in ref]
    assert got["short"].tolist() == [r["short"] for r in ref]
    for name in FLOATS:
        assert got[name].dtype == torch.float64, name
        for b, (x, r) in enumerate(zip(got[name].tolist(), ref)):
            if r[name] is None:
                assert math.isnan(x), (name, b)
            else:
                assert x == pytest.approx(r[name], abs=atol, rel=0), (name, b)


def _padded_case(seed, batch=5, length=30, scale=3.0):
    """Rows with 0-3 supervised spans (a multi-turn conversation), one row empty, one short row."""
    gen = torch.Generator().manual_seed(seed)
    nll = torch.rand(batch, length, generator=gen) * scale
    mask = torch.zeros(batch, length)
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            lo = int(torch.randint(0, length, (1,), generator=gen))
            mask[b, lo:int(torch.randint(lo, length + 1, (1,), generator=gen))] = 1
    mask[1] = 0
    mask[2] = 0
    mask[2, 3:5] = 1
    return nll, mask


def _packed_case(seed, lengths=(9, 14, 0, 5, 12, 3), tail=4):
    """One packed row: samples of ``lengths`` (a zero-length one too), then ``tail`` filler tokens past
    ``cu_seqlens[-1]`` whose (nonzero) mask must count for nothing."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths) + tail
    nll = torch.rand(1, total, generator=gen) * 4
    mask = (torch.rand(1, total, generator=gen) < 0.7).float()
    mask[0, sum(lengths[:3]):sum(lengths[:4])] = 0  # the sample of length 5 has no supervised token
    mask[0, -tail:] = 1
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return nll, mask, cu


@pytest.mark.parametrize("variant,expected_p", [("v1", [0.265803, 0.367879]), ("v3", [0.477173, 0.367879])])
def test_spec_worked_example(variant, expected_p):
    nll = torch.tensor([[9, 9, 0.1, 0.2, 2.0, 3.0, 0.1, 0.05], [9, 9, 1, 1, 1, 1, 1, 1.0]])
    mask = torch.zeros(2, 8)
    mask[:, 2:] = 1
    got = sample_statistics(nll, mask, variant=variant, group_size=4)
    assert got["p_conf"].tolist() == pytest.approx(expected_p, abs=1e-6)
    assert got["sample_weight"].tolist() == pytest.approx([1 - p for p in expected_p], abs=1e-6)
    assert got["tokens"].tolist() == [6, 6] and got["short"].tolist() == [False, False]
    assert got["lm_loss"].tolist() == pytest.approx([5.45 / 6, 1.0], abs=1e-6)


@pytest.mark.parametrize("variant", ["v1", "v3"])
@pytest.mark.parametrize("group_size", [1, 3, 8, 64])
@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_padded_and_packed_against_oracle(variant, group_size, gamma):
    kw = dict(variant=variant, group_size=group_size, gamma=gamma, eps=1e-3)
    for seed in range(3):
        nll, mask = _padded_case(seed)
        _assert_matches_oracle(sample_statistics(nll, mask, **kw), _reference_sample_statistics(nll, mask, **kw))
        nll, mask, cu = _packed_case(seed)
        got = sample_statistics(nll, mask, cu_seqlens=cu, **kw)
        assert got["tokens"].shape == (len(cu) - 1,)  # one entry per segment, the zero-length one included
        _assert_matches_oracle(got, _reference_sample_statistics(nll, mask, cu_seqlens=cu, **kw))


@pytest.mark.parametrize("method", ["sft", "dft", "bft"])
@pytest.mark.parametrize("variant", ["v1", "v3"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_equals_what_the_objective_metrics_average(method, variant, packed):
    """The objective's p_conf / sample_weight / short_frac are means of these over samples with a supervised token,
    p_conf_min/max their extrema, lm_loss their token-weighted mean, and the units (bft) their count."""
    nll, mask, cu = _packed_case(5) if packed else (*_padded_case(5), None)
    kw = dict(variant=variant, group_size=4, cu_seqlens=cu)
    got = sample_statistics(nll, mask, **kw)
    _, units, partials = objective(nll, mask, method=method, **kw)
    metrics = reduce_metrics(partials)
    present = got["tokens"] > 0
    assert metrics["lm_loss"] == pytest.approx(float(got["nll_sum"].sum() / got["tokens"].sum()), abs=1e-6)
    if method != "bft":
        assert int(units) == int(got["tokens"].sum())
        return
    assert int(units) == int(present.sum())
    for name in ("p_conf", "sample_weight"):
        assert metrics[name] == pytest.approx(float(got[name][present].mean()), abs=1e-12), name
    assert metrics["short_frac"] == pytest.approx(float(got["short"][present].double().mean()), abs=1e-12)
    assert metrics["p_conf_min"] == float(got["p_conf"][present].min())
    assert metrics["p_conf_max"] == float(got["p_conf"][present].max())


def test_non_finite_nll_at_unsupervised_positions_is_ignored():
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0.0]])
    bad = torch.tensor([[float("inf"), 1.0, 0.5, float("nan"), 0.2, 2.0, 0.3, float("inf")]])
    got = sample_statistics(bad, mask, group_size=2)
    _assert_matches_oracle(got, _reference_sample_statistics(torch.where(mask != 0, bad, 0.0), mask, group_size=2))


def test_bad_arguments_name_the_field():
    nll = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="variant"):
        sample_statistics(nll, nll, variant="v2")
    with pytest.raises(ValueError, match="group_size"):
        sample_statistics(nll, nll, group_size=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sample_statistics(nll, nll, cu_seqlens=torch.tensor([0, 4]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), length=st.integers(1, 33),
       group_size=st.integers(1, 40), variant=st.sampled_from(["v1", "v3"]), packed=st.booleans(),
       gamma=st.sampled_from([0.5, 1.0, 2.0]))
def test_hypothesis_random_shapes(seed, batch, length, group_size, variant, packed, gamma):
    gen = torch.Generator().manual_seed(seed)
    nll = torch.rand(batch, length, generator=gen) * 5
    mask = (torch.rand(batch, length, generator=gen) < 0.6).float()
    cu = None
    if packed:
        nll, mask = nll.reshape(1, -1), mask.reshape(1, -1)
        cuts = torch.randint(0, batch * length + 1, (3,), generator=gen).tolist()
        end = int(torch.randint(0, batch * length + 1, (1,), generator=gen))  # tokens past it: trailing filler
        cu = torch.tensor(sorted([0, end, *[min(c, end) for c in cuts]]))
    kw = dict(variant=variant, group_size=group_size, gamma=gamma, cu_seqlens=cu)
    _assert_matches_oracle(sample_statistics(nll, mask, **kw), _reference_sample_statistics(nll, mask, **kw))


CP_LENGTHS = [8, 12, 4, 8, 4]  # multiples of 2*CP = 4


def _cp_data(packed):
    gen = torch.Generator().manual_seed(4)
    shape = (1, sum(CP_LENGTHS)) if packed else (3, 16)
    nll, mask = torch.rand(*shape, generator=gen) * 3, (torch.rand(*shape, generator=gen) < 0.7).float()
    cu = torch.tensor([0, *torch.tensor(CP_LENGTHS).cumsum(0).tolist()], dtype=torch.int32) if packed else None
    mask[-1, -4:] = 0  # packed: the last sample has no supervised token; padded: a short last row
    return nll, mask, cu


def _cp_worker(rank, world):
    out = {}
    for packed in (False, True):
        nll, mask, cu = _cp_data(packed)
        for variant in ("v1", "v3"):
            local = [split_for_cp(t, world, rank, cu) for t in (nll, mask)]
            out[(packed, variant)] = sample_statistics(*local, variant=variant, group_size=4, cu_seqlens=cu,
                                                       cp_group=dist.group.WORLD)
    return out


def test_context_parallel_ranks_hold_the_whole_samples():
    """CP=2 (gloo): every CP rank returns the single-process statistics of whole samples (windows span ranks)."""
    results = run_distributed(_cp_worker, 2)
    for packed in (False, True):
        nll, mask, cu = _cp_data(packed)
        for variant in ("v1", "v3"):
            ref = _reference_sample_statistics(nll, mask, variant=variant, group_size=4, cu_seqlens=cu)
            for res in results:
                _assert_matches_oracle(res[(packed, variant)], ref)
