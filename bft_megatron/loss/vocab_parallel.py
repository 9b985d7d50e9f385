"""Per-token negative log-likelihood from vocabulary-sharded logits.

Layer one of the loss. Tensor-parallel ranks each hold ``V/TP`` contiguous vocabulary columns of the
logits; the full-vocabulary logits are never gathered. The math is the one of megatron-core's
``vocab_parallel_cross_entropy`` (softmax kept in place in the upcast buffer for backward), with two
differences that matter to us:

* the tensor-parallel group is an argument (megatron-core < 0.19 always uses the global TP group);
* the two sum-reductions (target logit, sum of exponentials) travel in one collective, and at TP=1
  there is no collective at all.

Memory: one fp32 ``[tokens, V/TP]`` buffer (the upcast of bf16 logits, reused for ``exp`` and the
softmax and then for the gradient) plus O(tokens) vectors, the same as megatron-core.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_nll", "local_valid_columns"]


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _VocabParallelNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, tp_group, inplace: bool, vocab_size):
        tp_size, tp_rank = _group_size_rank(tp_group)
        part = logits.size(-1)
        vocab_start = tp_rank * part

        # [*, V/TP] fp32 work buffer. For bf16/fp16 logits `.float()` already copies; for fp32 logits
        # we only overwrite the caller's tensor when allowed (the model's logits are not needed again).
        work = logits.float()
        if work.data_ptr() == logits.data_ptr() and not inplace:
            work = work.clone()
        # Padding columns (global index >= vocab_size) at -inf: probability 0, so gradient 0 (backward).
        valid = local_valid_columns(vocab_size, vocab_start, part)
        if valid < part:
            work[..., valid:] = float("-inf")

        logits_max = work.amax(dim=-1)
        if tp_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        work.sub_(logits_max.unsqueeze(-1))

        # Target logit: only the rank owning the label's vocabulary slice contributes.
        local_label = labels - vocab_start
        not_here = (local_label < 0) | (local_label >= part)
        local_label = local_label.masked_fill(not_here, 0)
        target_logit = work.gather(-1, local_label.unsqueeze(-1)).squeeze(-1)
        target_logit.masked_fill_(not_here, 0.0)

        torch.exp(work, out=work)
        sum_exp = work.sum(dim=-1)
        if tp_size > 1:
            both = torch.stack((target_logit, sum_exp))
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
            target_logit, sum_exp = both[0], both[1]

        nll = torch.log(sum_exp) - target_logit
        work.div_(sum_exp.unsqueeze(-1))  # work is now this rank's softmax shard
        ctx.save_for_backward(work, local_label, not_here)
        ctx.in_dtype = logits.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        softmax, local_label, not_here = ctx.saved_tensors
        # d nll / d logits = softmax - onehot(label); the onehot lives on one rank only.
        grad = softmax
        onehot = (~not_here).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -onehot)
        grad.mul_(grad_nll.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def local_valid_columns(vocab_size: int | None, vocab_start: int, part: int) -> int:
    """How many of this rank's ``part`` columns (from global column ``vocab_start``) are real vocabulary,
    not megatron's padding: ``part`` without a ``vocab_size``; 0 for a rank holding padding only."""
    if vocab_size is None:
        return part
    return max(0, min(part, vocab_size - vocab_start))


def _triton_function():
    """The Triton autograd function, or None where Triton (or a CUDA device) is unavailable."""
    global _TRITON
    if _TRITON is None:
        try:
            from bft_megatron.loss.triton_nll import TritonVocabParallelNLL

            _TRITON = TritonVocabParallelNLL
        except ImportError:
            _TRITON = False
    return _TRITON or None


_TRITON = None
IMPLS = ("auto", "torch", "triton")


def vocab_parallel_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    inplace: bool = False,
    impl: str = "auto",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token NLL ``-log softmax(logits)[label]`` in fp32 from vocabulary-parallel logits.

    Args:
        logits: ``[..., V/TP]`` this rank's contiguous vocabulary slice (Megatron: ``[s, b, V/TP]``),
            any float dtype. Rank ``r`` of ``tp_group`` owns columns ``r*V/TP .. (r+1)*V/TP``.
        labels: ``[...]`` int64 global vocabulary ids. Ids outside ``[0, V)`` (e.g. -100) give a
            finite, meaningless value and must be masked by the caller.
        tp_group: the tensor-parallel group; ``None`` or a group of size 1 means no communication.
        inplace: allow the caller's logits to be overwritten to save a ``[tokens, V/TP]`` buffer: the
            eager path reuses fp32 logits as its work buffer, the Triton path writes the gradient
            into the logits' storage. Safe when nothing else reads the logits afterwards (the
            model's output feeding only this loss).
        impl: ``torch`` (eager, megatron-core's algorithm: one fp32 work buffer holding the softmax),
            ``triton`` (CUDA: fused kernels, no fp32 buffer, logits read once forward and once
            backward), or ``auto`` = triton on CUDA when Triton imports, else torch.
        vocab_size: the real vocabulary size, or None. Columns at global index ``>= vocab_size`` (megatron
            pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp``) are left out of the
            softmax: probability and gradient 0, so the NLL is the unpadded (HF) model's whatever the padding
            and whatever those rows hold (a checkpoint reloaded at another padding leaves new rows at their
            random initialisation). Labels must be ``< vocab_size``.

    Returns:
        fp32 ``[...]`` per-token NLL (computed in fp32 whatever the input dtype), identical on every rank of
        ``tp_group``. Backward writes the gradient into the saved softmax buffer (no extra ``[tokens, V/TP]``
        allocation in fp32).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
                         f"dimension {tuple(logits.shape[:-1])}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "torch" and logits.is_cuda and _triton_function() is not None:
        return _triton_function().apply(logits, labels, tp_group, inplace, vocab_size)
    if impl == "triton":
        raise ValueError("impl='triton' needs CUDA logits and an importable triton")
    return _VocabParallelNLL.apply(logits, labels, tp_group, inplace, vocab_size)
