"""The word embedding's weight gradient accumulated straight into ``main_grad`` (bft_megatron.model.wgrad).

Single process, no megatron model: a weight carrying the attributes megatron's DDP gives it (``main_grad``,
``grad_added_to_main_grad``), looked up through the ``torch.nn.functional`` stand-in that megatron's
``tensor_parallel.layers`` module gets. The oracle is autograd's own embedding gradient in float64. The
trainer-level check (fused vs unfused training, TP masking, SP, tied PP) is in tests/test_train_parallel.py.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bft_megatron.model import wgrad

# fp32: a row can accumulate up to 99 gradient rows (batch 3 x seq 33) of N(0, 1) values in fp32, whose rounding
# reaches ~2e-6 (hypothesis found vocab=2, hidden=11, batch=3, seq=28, seed=42807 at 1e-6); 1e-5 holds that with a
# 10x margin over 3000 random cases, while a dropped, doubled or misplaced row errs by O(1).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _weight(vocab: int, hidden: int, dtype, gen) -> torch.nn.Parameter:
    """A parameter as megatron's DDP leaves it: fp32 ``main_grad`` (non-zero: accumulation across
    micro-batches), ``grad_added_to_main_grad`` reset, marked for the fused gradient."""
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen).to(dtype))
    weight.main_grad = torch.randn(vocab, hidden, generator=gen)
    weight.grad_added_to_main_grad = False
    setattr(weight, wgrad.FUSED_EMBEDDING_ATTR, True)
    return weight


def _reference_embedding_grad(indices, weight, grad_out, mask=None) -> torch.Tensor:
    """d(sum(out * grad_out))/d(weight) in float64, with masked positions' outputs zeroed (as megatron's
    VocabParallelEmbedding does in place for indices outside this TP rank's vocabulary shard)."""
    w = weight.detach().double().requires_grad_()
    out = F.embedding(indices, w)
    if mask is not None:
        out = out.masked_fill(mask.unsqueeze(-1), 0.0)
    out.backward(grad_out.double())
    return w.grad


def _fused(indices, weight, grad_out, mask=None) -> torch.Tensor:
    functional = wgrad._FunctionalWithFusedEmbedding("torch.nn.functional")
    out = functional.embedding(indices, weight)
    if mask is not None:
        out[mask, :] = 0.0  # in place on the Function's output, as megatron does
    out.backward(grad_out)
    return weight.grad


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(1, 40), hidden=st.integers(1, 16), batch=st.integers(1, 3), seq=st.integers(1, 33),
       masked=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_embedding_adds_the_reference_gradient_to_main_grad(vocab, hidden, batch, seq, masked, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    weight = _weight(vocab, hidden, dtype, gen)
    before = weight.main_grad.clone()
    indices = torch.randint(0, vocab, (batch, seq), generator=gen)  # repeats: rows accumulate
    grad_out = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    mask = torch.rand(batch, seq, generator=gen) < 0.3 if masked else None
    dummy = _fused(indices, weight, grad_out, mask)
    want = before.double() + _reference_embedding_grad(indices, weight, grad_out, mask)
    torch.testing.assert_close(weight.main_grad.double(), want, **TOL[dtype])
    assert weight.main_grad.dtype == torch.float32
    # DDP's hook must skip the dummy: the flag is set and the dummy has the weight's shape and layout.
    assert weight.grad_added_to_main_grad is True
    assert dummy.shape == weight.shape and dummy.dtype == weight.dtype and dummy.is_contiguous()


def test_fused_embedding_forward_equals_plain_embedding():
    gen = torch.Generator().manual_seed(0)
    weight = _weight(10, 4, torch.float32, gen)
    indices = torch.tensor([[1, 2, 2, 9]])
    functional = wgrad._FunctionalWithFusedEmbedding("torch.nn.functional")
    assert torch.equal(functional.embedding(indices, weight), F.embedding(indices, weight))
    assert functional.linear is F.linear  # everything else is torch.nn.functional's


@pytest.mark.parametrize("case", ["unmarked", "no_main_grad", "no_grad", "extra_args"])
def test_plain_embedding_where_fusion_does_not_apply(case):
    """Unmarked weights, weights without DDP's main_grad, no-grad forwards and calls with extra arguments
    keep autograd's ordinary weight gradient."""
    gen = torch.Generator().manual_seed(1)
    weight = _weight(10, 4, torch.float32, gen)
    main_before = weight.main_grad.clone()
    indices = torch.tensor([[0, 3, 3]])
    kwargs = {}
    if case == "unmarked":
        setattr(weight, wgrad.FUSED_EMBEDDING_ATTR, False)
    elif case == "no_main_grad":
        del weight.main_grad
    elif case == "extra_args":
        kwargs = {"padding_idx": 5}
    functional = wgrad._FunctionalWithFusedEmbedding("torch.nn.functional")
    if case == "no_grad":
        with torch.no_grad():
            out = functional.embedding(indices, weight)
        assert out.grad_fn is None
        return
    functional.embedding(indices, weight, **kwargs).sum().backward()
    assert weight.grad_added_to_main_grad is False
    torch.testing.assert_close(weight.grad, _reference_embedding_grad(indices, weight, torch.ones(1, 3, 4)).float())
    if hasattr(weight, "main_grad"):
        assert torch.equal(weight.main_grad, main_before)


def test_marking_skips_a_weight_shared_with_the_output_layer():
    """megatron's ``zero_out_wgrad`` (tied embeddings on one stage): both layers' gradients meet in one
    AccumulateGrad there, so the embedding keeps the ordinary path."""
    from megatron.core.tensor_parallel import layers

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = torch.nn.Embedding(8, 4)

    model = torch.nn.Module()
    model.embedding = Embedding()
    model.embedding.word_embeddings.weight.zero_out_wgrad = True
    assert not wgrad.fuse_embedding_wgrad(model)
    assert not getattr(model.embedding.word_embeddings.weight, wgrad.FUSED_EMBEDDING_ATTR, False)
    del model.embedding.word_embeddings.weight.zero_out_wgrad
    assert wgrad.fuse_embedding_wgrad(model)
    assert getattr(model.embedding.word_embeddings.weight, wgrad.FUSED_EMBEDDING_ATTR)
    assert isinstance(layers.F, wgrad._FunctionalWithFusedEmbedding)
    assert not wgrad.fuse_embedding_wgrad(torch.nn.Linear(2, 2))  # no embedding on this stage
