"""Triton kernels for the vocabulary-parallel NLL on CUDA: one read of the logits forward, one
read + one write backward, and no ``[tokens, V/TP]`` fp32 buffer at all.

Forward, per row (token): an online max / sum-of-exponentials over this rank's vocabulary slice in
fp32 registers, plus the target logit if the label falls in the slice. The cross-rank combination
(max, rescaled sums) is done on ``[tokens]`` vectors outside the kernel, in the same two collectives
as the eager path. Saved for backward: the logits themselves (already alive as the model's output,
in their own dtype) and the fp32 log-sum-exp per token.

Backward, per row: ``grad = (exp(x - lse) - onehot(label)) * grad_nll``, computed in fp32 and stored
in the logits' dtype, optionally into the logits' own storage (``inplace``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from bft_megatron.loss.vocab_parallel import local_valid_columns

_BLOCK = 4096


@triton.jit
def _fwd_kernel(x_ptr, stride, labels_ptr, vocab_start, n_cols, n_valid, max_ptr, sum_ptr, tgt_ptr,
                BLOCK: tl.constexpr):
    # Only the first n_valid columns (real vocabulary, not padding) enter the softmax.
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    for start in range(0, n_valid, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        run_max = new_max
    label = tl.load(labels_ptr + row) - vocab_start
    here = (label >= 0) & (label < n_cols)
    target = tl.load(base + tl.where(here, label, 0)).to(tl.float32)
    tl.store(max_ptr + row, run_max)
    tl.store(sum_ptr + row, run_sum)
    tl.store(tgt_ptr + row, tl.where(here, target, 0.0))


@triton.jit
def _bwd_kernel(x_ptr, stride, g_ptr, g_stride, labels_ptr, vocab_start, n_cols, n_valid, lse_ptr, scale_ptr,
                BLOCK: tl.constexpr):
    # Padding columns (index >= n_valid) get gradient 0: written, since the buffer may be the logits' own.
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    out = g_ptr + row * g_stride
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    label = tl.load(labels_ptr + row) - vocab_start
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        keep = idx < n_cols
        x = tl.load(base + idx, mask=keep, other=0.0).to(tl.float32)
        grad = tl.where(idx < n_valid, tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0), 0.0)
        tl.store(out + idx, (grad * scale).to(out.dtype.element_ty), mask=keep)


class TritonVocabParallelNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, inplace, vocab_size=None):
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        n_cols = logits.shape[-1]
        n_valid = local_valid_columns(vocab_size, tp_rank * n_cols, n_cols)
        x = logits.reshape(-1, n_cols)
        if x.stride(-1) != 1:
            x = x.contiguous()
        flat_labels = labels.reshape(-1).contiguous()
        rows = x.shape[0]
        stats = torch.empty(3, rows, device=x.device, dtype=torch.float32)
        if rows:
            _fwd_kernel[(rows,)](x, x.stride(0), flat_labels, tp_rank * n_cols, n_cols, n_valid, stats[0],
                                 stats[1], stats[2], BLOCK=_BLOCK, num_warps=8)
        local_max, local_sum, target = stats[0], stats[1], stats[2]
        if tp_size > 1:
            global_max = local_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            both = torch.stack((target, local_sum * torch.exp(local_max - global_max)))
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
            target, lse = both[0], global_max + torch.log(both[1])
        else:
            lse = local_max + torch.log(local_sum)
        ctx.save_for_backward(x, flat_labels, lse)
        ctx.meta = (tp_rank * n_cols, n_valid, inplace, logits.shape)
        return (lse - target).reshape(labels.shape)

    @staticmethod
    def backward(ctx, grad_nll):
        x, flat_labels, lse = ctx.saved_tensors
        vocab_start, n_valid, inplace, shape = ctx.meta
        grad = x if inplace else torch.empty_like(x)
        scale = grad_nll.reshape(-1).float().contiguous()
        if x.shape[0]:
            _bwd_kernel[(x.shape[0],)](x, x.stride(0), grad, grad.stride(0), flat_labels, vocab_start, x.shape[1],
                                       n_valid, lse, scale, BLOCK=_BLOCK, num_warps=8)
        return grad.reshape(shape), None, None, None, None
