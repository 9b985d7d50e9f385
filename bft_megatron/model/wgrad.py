"""Weight gradients accumulated straight into megatron's fp32 ``main_grad`` buffers, without apex.

Under ``gradient_accumulation_fusion`` TE's linear layers add their weight gradients into ``param.main_grad``
themselves (``fuse_wgrad_accumulation``) and hand autograd a dummy gradient; DDP's backward hook then skips
the add (``param.grad_added_to_main_grad``). Two weights are not TE's and would otherwise produce a bf16
gradient of ``vocab x hidden`` (1 GiB at Llama-3 shapes) per micro-batch that DDP's hook adds to ``main_grad``
in a separate pass:

* the output layer, megatron's own ``ColumnParallelLinear``, which calls apex's
  ``fused_weight_gradient_mlp_cuda`` for this: without apex it gets :class:`TorchWgradAccum` (CUDA only);
* the word embedding, megatron's ``VocabParallelEmbedding``, which has no fused path at all: megatron's
  ``tensor_parallel.layers`` module gets a ``torch.nn.functional`` whose ``embedding`` accumulates the rows
  of the incoming gradient into ``main_grad`` for weights marked with :data:`FUSED_EMBEDDING_ATTR`
  (:func:`fuse_embedding_wgrad`; plain ``F.embedding`` for every other weight). Pure torch, so it also runs
  on CPU, where the layout tests cover it.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.nn.functional as F

__all__ = ["TorchWgradAccum", "torch_wgrad_accum_available", "output_layer_without_apex", "fuse_embedding_wgrad",
           "FUSED_EMBEDDING_ATTR"]

FUSED_EMBEDDING_ATTR = "bft_fuse_wgrad_into_main_grad"


class TorchWgradAccum:
    """Stand-in for apex's ``fused_weight_gradient_mlp_cuda``, which megatron's ``ColumnParallelLinear`` (the
    output layer) calls under ``gradient_accumulation_fusion``: ``main_grad += grad_output^T @ input`` as one
    GEMM with bf16 inputs accumulating into the fp32 ``main_grad`` (torch's ``addmm`` with ``out_dtype``,
    CUDA only). Arguments are 2-D: ``total_input [N, in]``, ``grad_output [N, out]``, ``main_grad [out, in]``.
    """

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)


@functools.cache
def torch_wgrad_accum_available() -> bool:
    """Whether :class:`TorchWgradAccum` runs here: a CUDA device and an ``addmm`` that accumulates bf16
    products into an fp32 tensor. Probed once: torch 2.8-2.9 have ``aten::addmm.dtype_out`` but their CUDA
    kernel still rejects an fp32 ``self`` with bf16 matrices."""
    if not (torch.cuda.is_available() and hasattr(torch.ops.aten.addmm, "dtype_out")):
        return False
    acc = torch.zeros(2, 2, device="cuda")
    ones = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
    try:
        TorchWgradAccum.wgrad_gemm_accum_fp32(ones, ones, acc)
    except RuntimeError:
        return False
    return bool((acc == 2).all())


@contextlib.contextmanager
def output_layer_without_apex(enabled: bool):
    """Let megatron build a model with ``gradient_accumulation_fusion`` although apex is absent.

    Only megatron's own ``ColumnParallelLinear`` (the output layer) needs apex and refuses to build without
    it. Three cases: apex present or no fusion asked for (yields False, nothing to do); torch can stand in
    (megatron's layers module gets :class:`TorchWgradAccum` for the process: the backward looks the module
    up when it runs; yields False); neither (yields True: build anyway, then switch the fusion off on the
    output layer with :func:`unfuse_output_layer`, so it accumulates through DDP's hook).
    """
    from megatron.core.tensor_parallel import layers

    if not enabled or layers._grad_accum_fusion_available:
        yield False
        return
    if torch_wgrad_accum_available():
        layers.fused_weight_gradient_mlp_cuda = TorchWgradAccum
        layers._grad_accum_fusion_available = True
        yield False
        return
    layers._grad_accum_fusion_available = True
    try:
        yield True
    finally:
        layers._grad_accum_fusion_available = False


def unfuse_output_layer(model) -> None:
    output_layer = getattr(model, "output_layer", None)
    if output_layer is not None:
        output_layer.gradient_accumulation_fusion = False


# ------------------------------------------------------------------------------------------ embedding
@functools.cache
def _te_dummy_wgrad():
    """TE's ``get_dummy_wgrad`` or None (looked up once: a failed import would search sys.path every call)."""
    try:
        from transformer_engine.pytorch.module.base import get_dummy_wgrad
    except ImportError:
        return None
    return get_dummy_wgrad


def _dummy_wgrad(weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor for autograd to hand to DDP's hook, which ignores its values: TE's shared
    buffer where TE is installed (the output layer's dummy has the same shape, so no extra memory), else a
    fresh uninitialised one. Either way a new tensor object, so ``AccumulateGrad`` takes it without a copy."""
    get_dummy_wgrad = _te_dummy_wgrad()
    if get_dummy_wgrad is None or weight.device.type != "cuda":
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    return get_dummy_wgrad(list(weight.shape), weight.dtype)


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    """``F.embedding(indices, weight)`` whose weight gradient goes into ``weight.main_grad``.

    Backward: ``grad_output [..., hidden]`` flattened to one row per index and added, in ``main_grad``'s
    dtype (fp32: each token's contribution is rounded once, not first summed in bf16), at the row of its
    index. ``index_put_(accumulate=True)`` sorts the indices on CUDA and runs serially on CPU, so the sum
    is reproducible (bitwise resume). Rows of indices masked out by tensor parallelism get a zero gradient
    from megatron's in-place masking of the output, so adding them is harmless.
    """

    @staticmethod
    def forward(ctx, indices, weight):
        ctx.save_for_backward(indices)
        ctx.weight = weight
        return F.embedding(indices, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_output.reshape(-1, grad_output.shape[-1]).to(weight.main_grad.dtype)
        weight.main_grad.index_put_((indices.reshape(-1),), rows, accumulate=True)
        weight.grad_added_to_main_grad = True
        return None, _dummy_wgrad(weight)


def _fused_embedding(input, weight, *args, **kwargs):
    """``F.embedding`` for megatron's ``VocabParallelEmbedding``: fused for marked weights once DDP has given
    them a ``main_grad`` and a gradient is wanted; plain otherwise (no DDP, eval, extra arguments)."""
    fused = (getattr(weight, FUSED_EMBEDDING_ATTR, False) and hasattr(weight, "main_grad")
             and hasattr(weight, "grad_added_to_main_grad") and weight.requires_grad
             and torch.is_grad_enabled() and not args and not kwargs)
    if not fused:
        return F.embedding(input, weight, *args, **kwargs)
    return _EmbeddingIntoMainGrad.apply(input, weight)


class _FunctionalWithFusedEmbedding(types.ModuleType):
    """``torch.nn.functional`` as seen by megatron's ``tensor_parallel.layers``, with ``embedding`` fused."""

    embedding = staticmethod(_fused_embedding)

    def __getattr__(self, name):
        return getattr(F, name)


def fuse_embedding_wgrad(model) -> bool:
    """Mark ``model``'s word-embedding weight for the fused gradient (see the module docstring); returns
    whether it was marked. Not for a weight the output layer shares on the same stage (megatron's
    ``zero_out_wgrad``: both layers' gradients then meet in one ``AccumulateGrad``), nor in megatron's
    deterministic mode (which indexes the weight instead of calling ``F.embedding``)."""
    from megatron.core.tensor_parallel import layers

    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if embedding is None or getattr(embedding.weight, "zero_out_wgrad", False):
        return False
    if not isinstance(layers.F, _FunctionalWithFusedEmbedding):
        layers.F = _FunctionalWithFusedEmbedding("torch.nn.functional")
    setattr(embedding.weight, FUSED_EMBEDDING_ATTR, True)
    return True
