"""GPU checks of the loss: same values as on CPU, and no host synchronisation in forward or backward."""

from __future__ import annotations

import pytest
import torch

from bft_megatron.loss import objective, vocab_parallel_nll

pytestmark = pytest.mark.gpu
CASES = [("sft", "v1"), ("dft", "v1"), ("bft", "v1"), ("bft", "v3")]


def _data(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(96, 1, 257, generator=gen) * 3
    labels = torch.randint(0, 257, (96, 1), generator=gen)
    mask = (torch.rand(96, 1, generator=gen) < 0.7).float()
    cu = torch.tensor([0, 10, 40, 41, 96], dtype=torch.int32)
    return logits.to(device), labels.to(device), mask.to(device), cu.to(device)


def _run(data, method, variant, packed, dtype=torch.float32):
    logits, labels, mask, cu = data
    x = logits.to(dtype).requires_grad_(True)
    nll = vocab_parallel_nll(x, labels)
    loss_sum, units, _ = objective(nll.t(), mask.t(), method=method, variant=variant, group_size=8,
                                   cu_seqlens=cu if packed else None)
    loss_sum.backward()
    return loss_sum.detach(), units, x.grad


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method,variant", CASES)
def test_cuda_matches_cpu(method, variant, packed):
    cpu = _run(_data("cpu"), method, variant, packed)
    gpu = _run(_data("cuda"), method, variant, packed)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    assert int(gpu[1]) == int(cpu[1])
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method,variant", CASES)
def test_no_host_synchronisation(method, variant, packed):
    data = _data("cuda")
    _run(data, method, variant, packed, torch.bfloat16)             # warm up kernels and caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(data, method, variant, packed, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
