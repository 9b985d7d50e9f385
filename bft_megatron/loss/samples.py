"""Per-sample BFT statistics (``bft-megatron train --eval-only --eval-samples``): which samples BFT finds hard.

The same math as :func:`~bft_megatron.loss.objective.objective` (its token preparation, context-parallel gather,
sample segmentation and :func:`~bft_megatron.loss.objective._bft_weights`), returned per sample instead of summed
into the loss and its metrics: the mean of ``p_conf`` over the samples with a supervised token is the objective's
``p_conf`` metric, the mean of ``sample_weight`` its ``sample_weight`` metric, and the token-weighted mean of
``lm_loss`` its ``lm_loss`` metric. Computed whatever ``loss.method`` is (an SFT run's samples get the weights
BFT would give them). Detached; not part of the training step (an evaluation calls it beside the objective).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bft_megatron.loss.objective import _bft_weights, _check_args, _global_tokens, _local_tokens, _segments

__all__ = ["sample_statistics", "SAMPLE_FIELDS"]

# The per-sample tensors :func:`sample_statistics` returns, in order.
SAMPLE_FIELDS = ("tokens", "nll_sum", "lm_loss", "p_conf", "sample_weight", "short")


@torch.no_grad()
def sample_statistics(
    nll: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    variant: str = "v1",
    group_size: int = 256,
    gamma: float = 1.0,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """BFT's per-sample statistics of one micro-batch, ``[S]`` tensors keyed by :data:`SAMPLE_FIELDS`.

    Args: as :func:`~bft_megatron.loss.objective.objective`'s (``nll``/``loss_mask`` ``[b, s]``, each row a sample,
    or ``[1, T]`` with ``cu_seqlens``, each segment a sample; under CP this rank's shard and the global boundaries).
    ``S`` = ``b`` (padded) or ``len(cu_seqlens) - 1`` (packed, the trailing filler segment included).

    Returns, on every CP rank for whole samples (CP: one all-gather of two floats per token, as the objective's):
    ``tokens`` int64 supervised tokens ``n_b``; ``nll_sum`` float64 sum of their NLL; ``lm_loss`` float64
    ``nll_sum / n_b``; ``p_conf`` float64 ``p_b`` (min group confidence, ``variant``/``group_size``/``eps``);
    ``sample_weight`` float64 ``1 - p_b**gamma``; ``short`` bool ``0 < n_b < group_size``. ``lm_loss``, ``p_conf``
    and ``sample_weight`` are NaN for a sample without a supervised token (the objective leaves it out).
    """
    _check_args(nll, loss_mask, "bft", variant, group_size, gamma, eps, cu_seqlens)
    l_loc, m_loc, positions = _local_tokens(nll.detach(), loss_mask, cu_seqlens, cp_group, every_rank=True)
    a, m, global_shape, _, _ = _global_tokens(-l_loc, m_loc, tuple(nll.shape), cp_group, positions)
    m, seg, num_samples = _segments(m, global_shape, cu_seqlens)
    _, p, s, n_b = _bft_weights(a, m, seg, num_samples, variant, group_size, gamma, eps)
    # -a is the fp32 NLL exactly (a sign flip); zeroed where unsupervised (an inf/NaN there is nobody's loss).
    nll_sum = torch.zeros(num_samples + 1, dtype=torch.float64, device=a.device).index_add(
        0, seg, torch.where(m, -a, 0.0).double())[:num_samples]
    present = n_b > 0
    nan = torch.full_like(nll_sum, float("nan"))
    return {
        "tokens": n_b,
        "nll_sum": nll_sum,
        "lm_loss": torch.where(present, nll_sum / n_b.clamp(min=1), nan),
        "p_conf": torch.where(present, p.double(), nan),
        "sample_weight": torch.where(present, s.double(), nan),
        "short": present & (n_b < group_size),
    }
