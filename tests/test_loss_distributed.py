"""The loss over real gloo process groups: TP=2/4, DP=2 x 2 micro-batches, CP=2 and CP=4 (padded and packed),
CP x TP.

Every rank builds the same global data from a seed, computes its share with the production code, and
returns tensors; the assertions compare them with the single-process oracle in the parent process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bft_megatron.loss import objective, reduce_metrics, vocab_parallel_nll
from bft_megatron.parallel.context_parallel import local_to_global_positions, split_for_cp
from tests.dist_harness import run_distributed
from tests.loss_reference import _reference_loss_from_logits, _reference_nll, _reference_objective

CASES = [("sft", "v1"), ("dft", "v1"), ("bft", "v1"), ("bft", "v3")]
FP32 = dict(atol=1e-6, rtol=1e-6)
GROUP = 4
PACKED_LENGTHS = [8, 12, 4, 8]          # multiples of 2*CP = 4
PACKED_LENGTHS_CP4 = [8, 24, 8, 16]     # multiples of 2*CP = 8 (a 32k recipe runs CP4)


def _data(seed, batch, length, vocab, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) < 0.7).float()
    if empty_row:
        mask[min(1, batch - 1)] = 0
    return logits, labels, mask


def _packed_data(seed, vocab=12, lengths=PACKED_LENGTHS):
    logits, labels, mask = _data(seed, 1, sum(lengths), vocab, empty_row=False)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mask[0, cu[-2]:] = 0                  # the last sample has no supervised token
    return logits, labels, mask, cu


def _groups(world, sizes):
    """Create consecutive-rank groups of each size (every rank must call new_group for every group)."""
    out = {}
    for size in sizes:
        for start in range(0, world, size):
            ranks = list(range(start, start + size))
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                out[size] = g
    return out


def _tp_scenario(rank, group, tp_size, method, variant):
    logits, labels, mask = _data(0, 3, 12, 16)
    tp_rank = dist.get_rank(group)
    part = 16 // tp_size
    # Megatron layout [s, b, V/TP]; the objective takes [b, s].
    shard = logits.transpose(0, 1)[..., tp_rank * part:(tp_rank + 1) * part].contiguous().requires_grad_(True)
    nll = vocab_parallel_nll(shard, labels.t(), group)
    loss_sum, units, _ = objective(nll.t(), mask, method=method, variant=variant, group_size=GROUP)
    (loss_sum / units).backward()
    return {"loss": (loss_sum / units).detach(), "grad": shard.grad, "nll": nll.detach()}


def _dp_scenario(rank, group, method, variant):
    """8 samples; DP=2 ranks x 2 micro-batches of 2; Megatron's contract: sum losses, divide by global units."""
    torch.manual_seed(0)
    hidden = torch.randn(8, 10, 6)
    weight = torch.randn(6, 13).requires_grad_(True)
    _, labels, mask = _data(1, 8, 10, 13)
    dp_rank = dist.get_rank(group)
    units_total = torch.zeros([], dtype=torch.int64)
    loss_total = torch.zeros([])
    for mb in range(2):
        rows = slice(4 * dp_rank + 2 * mb, 4 * dp_rank + 2 * mb + 2)
        nll = vocab_parallel_nll(hidden[rows] @ weight, labels[rows])
        loss_sum, units, _ = objective(nll, mask[rows], method=method, variant=variant, group_size=GROUP)
        loss_sum.backward()
        units_total += units
        loss_total += loss_sum.detach()
    for t in (units_total, loss_total, weight.grad):
        dist.all_reduce(t, group=group)
    return {"loss": loss_total / units_total, "grad": weight.grad / units_total}


def _cp_scenario(rank, cp_group, tp_group, method, variant, packed, compile_backend=None, lengths=PACKED_LENGTHS):
    if packed:
        logits, labels, mask, cu = _packed_data(2, lengths=lengths)
    else:
        (logits, labels, mask), cu = _data(3, 2, 16, 12), None
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    local = split_for_cp(logits, cp_size, cp_rank, cu)
    if tp_group is not None:
        tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        part = local.shape[-1] // tp_size
        local = local[..., tp_rank * part:(tp_rank + 1) * part]
    local = local.contiguous().requires_grad_(True)
    nll = vocab_parallel_nll(local, split_for_cp(labels, cp_size, cp_rank, cu), tp_group)
    loss_sum, units, metrics = objective(nll, split_for_cp(mask, cp_size, cp_rank, cu), method=method,
                                         variant=variant, group_size=GROUP, cu_seqlens=cu, cp_group=cp_group,
                                         compile_backend=compile_backend)
    totals = torch.stack((loss_sum.detach().double(), units.double()))
    dist.all_reduce(totals, group=cp_group)
    (loss_sum / totals[1].float()).backward()
    if compile_backend is not None:
        from bft_megatron.loss.objective import compile_failed

        assert not compile_failed(compile_backend), "the compiled math fell back to eager"
    return {"loss": totals[0] / totals[1], "grad": local.grad, "units": int(units),
            "positions": local_to_global_positions(tuple(nll.shape), cp_size, cp_rank, cu),
            "metrics": reduce_metrics(metrics, cp_group)}


def _all_scenarios(rank, world):
    groups = _groups(world, [2, 4])
    # CP groups that stride over TP pairs: ranks (0, 2) and (1, 3).
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    cp_of_pair = strided[rank % 2]
    out = {}
    for method, variant in CASES:
        for tp in (2, 4):
            out[("tp", tp, method, variant)] = _tp_scenario(rank, groups[tp], tp, method, variant)
        out[("dp", method, variant)] = _dp_scenario(rank, groups[2], method, variant)
        for packed in (False, True):
            out[("cp", packed, method, variant)] = _cp_scenario(rank, groups[2], None, method, variant, packed)
            if method == "bft":  # loss.compile: the compiled weight math with the CP gather around it
                out[("cpc", packed, method, variant)] = _cp_scenario(rank, groups[2], None, method, variant, packed,
                                                                     compile_backend="aot_eager")
            out[("cptp", packed, method, variant)] = _cp_scenario(rank, cp_of_pair, groups[2], method, variant,
                                                                  packed)
            out[("cp4", packed, method, variant)] = _cp_scenario(rank, dist.group.WORLD, None, method, variant,
                                                                 packed, lengths=PACKED_LENGTHS_CP4)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_scenarios, 4)


def _oracle(logits, labels, mask, method, variant, cu=None):
    x = logits.double().requires_grad_(True)
    loss = _reference_loss_from_logits(x, labels, mask, method=method, variant=variant, group_size=GROUP,
                                       cu_seqlens=cu)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("method,variant", CASES)
def test_tensor_parallel_matches_oracle(results, tp, method, variant):
    logits, labels, mask = _data(0, 3, 12, 16)
    loss, grad = _oracle(logits, labels, mask, method, variant)
    grad = grad.transpose(0, 1)
    part = 16 // tp
    for rank, res in enumerate(results):
        r = res[("tp", tp, method, variant)]
        torch.testing.assert_close(r["loss"].double(), loss, **FP32)
        tp_rank = rank % tp
        torch.testing.assert_close(r["grad"].double(), grad[..., tp_rank * part:(tp_rank + 1) * part], **FP32)
        torch.testing.assert_close(r["nll"], results[rank - rank % tp][("tp", tp, method, variant)]["nll"],
                                   atol=0, rtol=0)   # bitwise identical on every TP rank


@pytest.mark.slow
@pytest.mark.parametrize("method,variant", CASES)
def test_dp_and_accumulation_match_one_process(results, method, variant):
    torch.manual_seed(0)
    hidden = torch.randn(8, 10, 6)
    weight = torch.randn(6, 13).double().requires_grad_(True)
    _, labels, mask = _data(1, 8, 10, 13)
    loss = _reference_objective(_reference_nll(hidden.double() @ weight, labels), mask, method=method,
                                variant=variant, group_size=GROUP)[0]
    loss.backward()
    for res in results:
        r = res[("dp", method, variant)]
        torch.testing.assert_close(r["loss"].double(), loss.detach(), **FP32)
        torch.testing.assert_close(r["grad"].double(), weight.grad, **FP32)


def _check_cp(results, key, packed, method, variant, lengths=PACKED_LENGTHS):
    if packed:
        logits, labels, mask, cu = _packed_data(2, lengths=lengths)
    else:
        (logits, labels, mask), cu = _data(3, 2, 16, 12), None
    loss, grad = _oracle(logits, labels, mask, method, variant, cu)
    flat_grad = grad.reshape(-1, grad.shape[-1])
    single = objective(_reference_nll(logits, labels), mask, method=method, variant=variant, group_size=GROUP,
                       cu_seqlens=cu)
    ref_metrics = reduce_metrics(single[2])
    return loss, flat_grad, int(single[1]), ref_metrics


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method,variant", CASES)
def test_context_parallel_equals_cp1(results, packed, method, variant):
    _assert_cp_equals_cp1(results, "cp", packed, method, variant)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method,variant", CASES)
def test_context_parallel_4_equals_cp1(results, packed, method, variant):
    """CP4 (all four ranks): each rank holds two of eight chunks of every sample, so a confidence window (4 tokens
    here) often straddles two ranks; loss, gradients, statistics and the unit count as at CP1."""
    _assert_cp_equals_cp1(results, "cp4", packed, method, variant, cp_groups=((0, 1, 2, 3),),
                          lengths=PACKED_LENGTHS_CP4)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("variant", ["v1", "v3"])
def test_compiled_bft_math_under_context_parallel(results, packed, variant):
    _assert_cp_equals_cp1(results, "cpc", packed, "bft", variant)


def _assert_cp_equals_cp1(results, key, packed, method, variant, cp_groups=((0, 1), (2, 3)),
                          lengths=PACKED_LENGTHS):
    loss, flat_grad, units, ref_metrics = _check_cp(results, key, packed, method, variant, lengths)
    for ranks in cp_groups:
        got_units = 0
        for rank in ranks:
            r = results[rank][(key, packed, method, variant)]
            torch.testing.assert_close(r["loss"], loss, **FP32)
            torch.testing.assert_close(r["grad"].reshape(-1, flat_grad.shape[-1]).double(), flat_grad[r["positions"]],
                                       **FP32)
            got_units += r["units"]
            for k, v in ref_metrics.items():
                assert r["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        assert got_units == units            # bft samples are counted on CP rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method,variant", CASES)
def test_context_and_tensor_parallel_together(results, packed, method, variant):
    loss, flat_grad, _, _ = _check_cp(results, "cptp", packed, method, variant)
    for rank, res in enumerate(results):
        r = res[("cptp", packed, method, variant)]
        part = flat_grad.shape[-1] // 2
        tp_rank = rank % 2
        torch.testing.assert_close(r["loss"], loss, **FP32)
        expected = flat_grad[r["positions"]][:, tp_rank * part:(tp_rank + 1) * part]
        torch.testing.assert_close(r["grad"].reshape(expected.shape).double(), expected, **FP32)
