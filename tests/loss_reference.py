"""Single-device oracles for the loss, written from shared/spec/BFT.md with per-sample Python loops.

They materialise full-vocabulary fp32 (or fp64) logits and use autograd for gradients: slow and
obvious on purpose, so that the vectorised, vocab-parallel implementation can be checked against them.
"""

from __future__ import annotations

import math

import torch


def _reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL from full-vocabulary logits ``[..., V]`` (computed in the logits' float dtype >= fp32)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return -torch.log_softmax(x, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _reference_segments(shape, cu_seqlens):
    """List of (row, start, end) spans, one per sample."""
    batch, length = shape
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cu = [int(x) for x in cu_seqlens]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _reference_sample_weights(logc: list[float], method, variant, g, gamma, eps):
    """(token weights, p, s) for one sample's compacted log-probabilities ``logc`` (floats)."""
    n = len(logc)
    c = [math.exp(x) for x in logc]
    if method == "sft":
        return [1.0] * n, None, 1.0
    if method == "dft":
        return c, None, 1.0
    if variant == "v1":
        if n >= g:
            p = math.exp(min(sum(logc[k:k + g]) / g for k in range(n - g + 1)))
        else:
            p = math.exp(sum(logc) / n)
        w = c
    else:
        lo_off, hi_off = (g - 1) // 2, math.ceil((g - 1) / 2)
        c_loc = []
        for t in range(n):
            lo, hi = max(0, t - lo_off), min(n - 1, t + hi_off)
            c_loc.append(sum(c[lo:hi + 1]) / (hi - lo + 1))
        p = min(c_loc)
        w = [min(max(c[t] / (c_loc[t] + eps), 0.0), 1.0) for t in range(n)]
    p = min(max(p, 0.0), 1.0)
    return w, p, 1.0 - p ** gamma


def _reference_terms(nll, mask, *, method="bft", variant="v1", group_size=256, gamma=1.0, eps=1e-6,
                     cu_seqlens=None):
    """``(sum, units, samples)``: the objective's numerator (differentiable), its unit count (bft: samples with
    a supervised token; sft/dft: supervised tokens; the mean is ``sum / units``) and, per sample with a
    supervised token, ``(p, s, n, sum of token weights)`` (p None for sft/dft)."""
    terms, units, samples = [], 0, []
    for row, start, end in _reference_segments(tuple(nll.shape), cu_seqlens):
        idx = [t for t in range(start, end) if float(mask[row, t]) != 0]
        if not idx:
            continue
        l = nll[row, idx]
        logc = [-float(x) for x in l.detach().double()]
        w, p, s = _reference_sample_weights(logc, method, variant, group_size, gamma, eps)
        samples.append((p, s, len(idx), sum(w)))
        w = torch.tensor(w, dtype=l.dtype)
        if method == "bft":
            terms.append(s * (w * l).sum() / len(idx))
            units += 1
        else:
            terms.append((w * l).sum())
            units += len(idx)
    return (torch.stack(terms).sum() if terms else nll.sum() * 0.0), units, samples


def _reference_objective(nll, mask, **kwargs):
    """The global-batch objective ``L`` (a mean) as a differentiable scalar, plus per-sample p's.

    sft/dft: token mean over the batch; bft: ``(1/N) sum_b s_b L_b`` over samples with supervised tokens.
    """
    total, units, samples = _reference_terms(nll, mask, **kwargs)
    return (total / units if units else total), [x[0] for x in samples if x[0] is not None]


def _reference_loss_from_logits(logits, labels, mask, **kwargs):
    """Materialise full-vocab logits ``[b, s, V]``, compute NLL and the objective (a mean)."""
    return _reference_objective(_reference_nll(logits, labels), mask, **kwargs)[0]


def _reference_sample_statistics(nll, mask, *, variant="v1", group_size=256, gamma=1.0, eps=1e-6, cu_seqlens=None):
    """One dict per sample (every segment, empty ones included), in order: ``tokens``, ``nll_sum``, ``lm_loss``,
    ``p_conf``, ``sample_weight`` (the last three None without a supervised token) and ``short``; in float64."""
    out = []
    for row, start, end in _reference_segments(tuple(nll.shape), cu_seqlens):
        idx = [t for t in range(start, end) if float(mask[row, t]) != 0]
        if not idx:
            out.append({"tokens": 0, "nll_sum": 0.0, "lm_loss": None, "p_conf": None, "sample_weight": None,
                        "short": False})
            continue
        l = [float(x) for x in nll[row, idx].detach().double()]
        _, p, s = _reference_sample_weights([-x for x in l], "bft", variant, group_size, gamma, eps)
        out.append({"tokens": len(idx), "nll_sum": sum(l), "lm_loss": sum(l) / len(idx), "p_conf": p,
                    "sample_weight": s, "short": len(idx) < group_size})
    return out
