"""GPU checks of the loss: same values as on CPU, and no host synchronisation in forward or backward."""

from __future__ import annotations

import pytest
import torch

from bft_megatron.loss import objective, vocab_parallel_nll
from bft_megatron.loss.objective import compile_failed

pytestmark = pytest.mark.gpu
CASES = [("sft", "v1"), ("dft", "v1"), ("bft", "v1"), ("bft", "v3")]


def _data(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(96, 1, 257, generator=gen) * 3
    labels = torch.randint(0, 257, (96, 1), generator=gen)
    mask = (torch.rand(96, 1, generator=gen) < 0.7).float()
    cu = torch.tensor([0, 10, 40, 41, 96], dtype=torch.int32)
    return logits.to(device), labels.to(device), mask.to(device), cu.to(device)


def _run(data, method, variant, packed, dtype=torch.float32, impl="auto", compile_backend=None):
    logits, labels, mask, cu = data
    x = logits.to(dtype).requires_grad_(True)
    nll = vocab_parallel_nll(x, labels, impl=impl)
    loss_sum, units, _ = objective(nll.t(), mask.t(), method=method, variant=variant, group_size=8,
                                   cu_seqlens=cu if packed else None, compile_backend=compile_backend)
    loss_sum.backward()
    return loss_sum.detach(), units, x.grad


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method,variant", CASES)
def test_cuda_matches_cpu(method, variant, packed, impl):
    cpu = _run(_data("cpu"), method, variant, packed)
    gpu = _run(_data("cuda"), method, variant, packed, impl=impl)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    assert int(gpu[1]) == int(cpu[1])
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", ["v1", "v3"])
def test_compiled_bft_math_matches_cpu(variant, packed):
    """``loss.compile`` (opt-in): BFT's weight math through inductor equals the eager CPU loss."""
    cpu = _run(_data("cpu"), "bft", variant, packed)
    gpu = _run(_data("cuda"), "bft", variant, packed, compile_backend="inductor")
    assert not compile_failed("inductor"), "inductor failed; the objective fell back to eager"
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    assert int(gpu[1]) == int(cpu[1])
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("compile_backend", [None, "inductor"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method,variant", CASES)
def test_no_host_synchronisation(method, variant, packed, impl, compile_backend):
    data = _data("cuda")
    _run(data, method, variant, packed, torch.bfloat16, impl, compile_backend)  # warm up kernels and caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(data, method, variant, packed, torch.bfloat16, impl, compile_backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert compile_backend is None or not compile_failed(compile_backend)


# Gradients: fp32 differ only by summation order (atol 1e-6); bf16 by one rounding of the output.
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 2e-5, 2e-2)])
def test_triton_matches_eager_at_llm_vocab(dtype, atol, rtol):
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(257, 2, 32003, device="cuda", generator=gen) * 4).to(dtype)
    labels = torch.randint(0, 32003, (257, 2), device="cuda", generator=gen)
    weights = torch.rand(257, 2, device="cuda", generator=gen)
    out = {}
    for impl in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        nll = vocab_parallel_nll(x, labels, impl=impl)
        (nll * weights).sum().backward()
        out[impl] = (nll.detach(), x.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    assert out["triton"][1].dtype == dtype
    torch.testing.assert_close(out["triton"][1].float(), out["torch"][1].float(), atol=atol, rtol=rtol)


def test_triton_inplace_gradient_reuses_logits_storage():
    logits = torch.randn(64, 1, 5000, device="cuda").bfloat16().requires_grad_(True)
    labels = torch.randint(0, 5000, (64, 1), device="cuda")
    ref_x = logits.detach().clone().requires_grad_(True)
    vocab_parallel_nll(ref_x, labels, impl="triton").sum().backward()
    work = logits.detach().clone().requires_grad_(True)
    vocab_parallel_nll(work, labels, impl="triton", inplace=True).sum().backward()
    torch.testing.assert_close(work.grad, ref_x.grad, atol=0, rtol=0)
    assert work.grad.data_ptr() == work.data_ptr()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("padded", [32768, 36864])  # 765 padding columns in the last block / a whole extra block
def test_triton_leaves_vocab_padding_out(inplace, padded):
    """Llama-2 vocabulary padded as megatron pads it: padding columns holding large values change neither the
    NLL nor the real columns' gradient (float64 reference on the unpadded logits) and get gradient 0."""
    vocab = 32003
    gen = torch.Generator(device="cuda").manual_seed(2)
    logits = torch.randn(129, padded, device="cuda", generator=gen) * 4
    logits[:, vocab:] = 60.0
    labels = torch.randint(0, vocab, (129,), device="cuda", generator=gen)
    ref = logits.bfloat16()[:, :vocab].double().requires_grad_(True)  # the same bf16 values
    want = torch.nn.functional.cross_entropy(ref, labels, reduction="none")
    want.sum().backward()
    leaf = logits.bfloat16().requires_grad_(True)
    x = leaf * 1 if inplace else leaf  # inplace: a non-leaf whose storage receives the gradient
    nll = vocab_parallel_nll(x, labels, impl="triton", inplace=inplace, vocab_size=vocab)
    nll.sum().backward()
    torch.testing.assert_close(nll.double(), want.detach(), atol=1e-4, rtol=1e-5)  # fp32 accumulation
    torch.testing.assert_close(leaf.grad[:, :vocab].double(), ref.grad, atol=1e-5, rtol=2e-2)  # bf16 output
    assert torch.count_nonzero(leaf.grad[:, vocab:]) == 0
