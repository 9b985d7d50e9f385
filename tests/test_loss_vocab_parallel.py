"""The per-token NLL layer at TP=1 (multi-rank TP is in test_loss_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bft_megatron.loss import vocab_parallel_nll


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6)])
def test_matches_torch_cross_entropy(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 29, generator=gen) * 8).to(dtype)
    labels = torch.randint(0, 29, (7, 3), generator=gen)
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().double().requires_grad_(True)
    nll = vocab_parallel_nll(x1, labels)
    ref = F.cross_entropy(x2.reshape(-1, 29), labels.reshape(-1), reduction="none").reshape(7, 3)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll.double(), ref.detach(), atol=tol, rtol=tol)
    weights = torch.rand(7, 3, generator=gen)
    (nll * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, atol=tol, rtol=tol)
    assert x1.grad.dtype == dtype


def test_fp32_logits_are_not_clobbered_unless_inplace():
    logits = torch.randn(5, 11)
    labels = torch.randint(0, 11, (5,))
    before = logits.clone()
    vocab_parallel_nll(logits, labels)
    assert torch.equal(logits, before)
    nll_inplace = vocab_parallel_nll(logits, labels, inplace=True)
    torch.testing.assert_close(nll_inplace, vocab_parallel_nll(before, labels))
    assert not torch.equal(logits, before)               # the work buffer reused the caller's storage


def test_bf16_logits_keep_dtype_and_are_untouched():
    logits = torch.randn(6, 4, 33).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 33, (6, 4))
    before = logits.detach().clone()
    nll = vocab_parallel_nll(logits, labels)
    nll.sum().backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(before.float().reshape(-1, 33), labels.reshape(-1), reduction="none").reshape(6, 4)
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)


def test_out_of_range_labels_are_finite_and_do_not_disturb_others():
    logits = torch.randn(4, 9)
    labels = torch.tensor([1, -100, 3, 9])
    nll = vocab_parallel_nll(logits, labels)
    assert torch.isfinite(nll).all()
    ref = F.cross_entropy(logits[[0, 2]], labels[[0, 2]], reduction="none")
    torch.testing.assert_close(nll[[0, 2]], ref)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_nll(torch.randn(4, 9), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="floating point"):
        vocab_parallel_nll(torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long))
