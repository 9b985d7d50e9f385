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


# ---------------------------------------------------------------- megatron's vocabulary padding left out
def _reference_unpadded(logits: torch.Tensor, labels: torch.Tensor, vocab: int):
    """NLL and logits gradient (d sum(nll * w) / d logits, w = 1..N) of the model without padding columns:
    float64 cross-entropy over the first ``vocab`` columns; padding columns get gradient 0."""
    x = logits.detach().double().requires_grad_(True)
    nll = F.cross_entropy(x[:, :vocab], labels, reduction="none")
    (nll * torch.arange(1, len(labels) + 1, dtype=torch.float64)).sum().backward()
    return nll.detach(), x.grad


def _padded_logits(rows: int, vocab: int, padded: int, seed: int = 0):
    """Logits whose padding columns hold large values: any of them in the softmax would show."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, padded, generator=gen) * 3
    logits[:, vocab:] = 40 + torch.randn(rows, padded - vocab, generator=gen)
    return logits, torch.randint(0, vocab, (rows,), generator=gen)


@pytest.mark.parametrize("inplace", [False, True])
def test_padding_columns_are_left_out_of_the_softmax(inplace):
    logits, labels = _padded_logits(9, 29, 32)
    want_nll, want_grad = _reference_unpadded(logits, labels, 29)
    leaf = logits.clone().requires_grad_(True)
    # inplace: a non-leaf fp32 input (as the model's output is), whose storage the NLL may overwrite
    nll = vocab_parallel_nll(leaf * 1.0 if inplace else leaf, labels, inplace=inplace, vocab_size=29)
    (nll * torch.arange(1, 10)).sum().backward()
    torch.testing.assert_close(nll.double(), want_nll, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), want_grad, atol=1e-6, rtol=1e-6)
    assert torch.equal(leaf.grad[:, 29:], torch.zeros(9, 3))
    # without vocab_size the padding columns dominate the softmax
    assert (vocab_parallel_nll(logits, labels) > want_nll.float() + 5).all()


def _tp2_padded(rank: int, world: int, vocab: int):
    import torch.distributed as dist

    logits, labels = _padded_logits(6, vocab, 16, seed=3)
    shard = logits[:, rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    nll = vocab_parallel_nll(shard, labels, dist.group.WORLD, vocab_size=vocab)
    (nll * torch.arange(1, 7)).sum().backward()
    return nll.detach(), shard.grad


@pytest.mark.parametrize("vocab", [12, 7])  # rank 1 holds 4 real + 4 padding columns / padding only
def test_padding_left_out_under_tensor_parallel(vocab):
    from tests.dist_harness import run_distributed

    logits, labels = _padded_logits(6, vocab, 16, seed=3)
    want_nll, want_grad = _reference_unpadded(logits, labels, vocab)
    for rank, (nll, grad) in enumerate(run_distributed(_tp2_padded, 2, vocab)):
        torch.testing.assert_close(nll.double(), want_nll, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad[:, rank * 8:(rank + 1) * 8], atol=1e-6, rtol=1e-6)
