"""The SFT / DFT / BFT objective over per-token NLL and sample boundaries.

Layer two of the loss: pure tensor math on ``[tokens]`` vectors (never on logits). Its only
communication is the optional context-parallel all-gather of two floats per token.

Flattened view used throughout (``N`` = tokens of the *global* sequence, ``S`` = samples):
``seg[t]`` = sample id of token t (``S`` for trailing padding), ``m[t]`` = supervised flag,
``a[t] = -nll[t] = log c[t]``. Supervised tokens are *compacted* by a cumulative sum of ``m``: the
compacted index ``k[t]`` orders every sample's supervised tokens contiguously, so all window sums of
the spec are differences of one float64 prefix sum over the compacted sequence; per-sample minima are
``scatter_reduce(amin)``. No per-sample Python loop, no host synchronisation, O(N) memory.

Gradient placement: every weight (token weight ``w``, sample weight ``s_b``, ``1/n_b``) is detached, so
``loss_sum = sum_t coef[t] * nll[t]`` back-propagates ``coef[t] * (softmax - onehot)`` into the logits
through the cross-entropy's own backward, with no extra pass over the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bft_megatron.loss.metrics import MetricPartials
from bft_megatron.parallel.context_parallel import local_to_global_positions
from bft_megatron.utils.logging import get_logger

__all__ = ["objective", "compiled_bft_math", "compile_failed", "METHODS", "VARIANTS"]

_log = get_logger(__name__)

METHODS = ("sft", "dft", "bft")
VARIANTS = ("v1", "v3")


def _check_args(nll, loss_mask, method, variant, group_size, gamma, eps, cu_seqlens) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (v3 divides by a window mean that can underflow to 0), got {eps!r}")
    if nll.dim() != 2 or nll.shape != loss_mask.shape:
        raise ValueError(f"nll and loss_mask must both be [b, s]; got {tuple(nll.shape)} and {tuple(loss_mask.shape)}")
    if cu_seqlens is not None and (nll.shape[0] != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError(f"packed input needs nll [1, T] and cu_seqlens [S+1]; got nll {tuple(nll.shape)}, "
                         f"cu_seqlens {tuple(cu_seqlens.shape)}")


def _sample_ids(shape: tuple[int, int], cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """``seg[N]`` (int64) for the global flat sequence and the number of samples ``S``."""
    batch, length = shape
    if cu_seqlens is None:
        return torch.arange(batch, device=device).repeat_interleave(length), batch
    pos = torch.arange(length, device=device)
    # cu_seqlens[0] == 0 <= pos: counting all boundaries <= pos, minus one, avoids slicing the boundaries
    # (inductor's bucketize lowering wants a whole buffer). Tokens after the last sample get seg == S.
    seg = torch.searchsorted(cu_seqlens.to(torch.int64), pos, right=True) - 1
    return seg, cu_seqlens.numel() - 1


def _segments(m: torch.Tensor, global_shape: tuple[int, int], cu_seqlens: torch.Tensor | None):
    """``(m, seg, S)``: the supervised flags ``[N]`` restricted to real samples, each token's sample ``seg[N]`` (``S``
    for every unsupervised token: the discarded slot of the per-sample reductions) and the sample count ``S``."""
    seg, num_samples = _sample_ids(global_shape, cu_seqlens, m.device)
    m = m & (seg < num_samples)
    return m, torch.where(m, seg, num_samples), num_samples


def _gather_cp(a: torch.Tensor, m: torch.Tensor, global_len: int, positions: list[torch.Tensor], cp_group):
    """All-gather ``(a, m)`` of every CP rank and scatter them into global token order."""
    local = torch.stack((a, m))
    parts = [torch.empty_like(local) for _ in positions]
    dist.all_gather(parts, local, group=cp_group)
    full = local.new_zeros(2, global_len)
    full[:, torch.cat(positions)] = torch.cat(parts, dim=1)
    return full[0], full[1]


def _segment_prefix(values: torch.Tensor, k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Float64 prefix sums over the compacted supervised sequence: ``P[j] = sum of values[:j]``.

    ``values`` ``[N, C]`` are scattered to their compacted slots ``k`` (unsupervised tokens go to a
    discarded slot ``N``), then cumulated; ``P`` has ``N+1`` rows.
    """
    n = values.shape[0]
    slots = torch.where(m, k, n)
    # Scans only over whole tensors, slicing afterwards: inductor (torch 2.11, CUDA) cannot lower a scan
    # whose input is a SliceView of a scattered buffer ("NotImplementedError: SliceView").
    comp = values.new_zeros(n + 1, values.shape[1], dtype=torch.float64).index_copy(
        0, slots, torch.where(m.unsqueeze(1), values.double(), 0.0))
    return torch.cat((comp.new_zeros(1, values.shape[1]), torch.cumsum(comp, dim=0)[:n]))


def _segment_min(values: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    """Per-sample minimum of ``values`` (``index == num`` discards); +inf where a sample has none."""
    out = values.new_full((num + 1,), float("inf"))
    return out.scatter_reduce(0, index, values, reduce="amin", include_self=True)[:num]


def _bft_weights(a, m, seg, num_samples, variant, g, gamma, eps):
    """Token weights ``w[N]``, per-sample ``p_b``, ``s_b``, ``n_b`` for BFT (all detached)."""
    n_tok = a.shape[0]
    m_int = m.to(torch.int64)
    k = torch.cumsum(m_int, 0) - 1                                   # compacted index of each token
    n_all = torch.zeros(num_samples + 1, dtype=torch.int64, device=a.device).index_add(0, seg, m_int)
    n_b = n_all[:num_samples]                                        # slot num_samples: unsupervised tokens
    start = (torch.cumsum(n_all, 0) - n_all)[:num_samples]           # first compacted slot of each sample
    sid = seg.clamp(max=num_samples - 1)
    tok_start, tok_end = start[sid], (start + n_b)[sid]
    c = torch.exp(a.double())  # float64: v3's s_b = 1 - min C_loc loses digits in fp32 when p_b is near 1
    if variant == "v1":
        prefix = _segment_prefix(a.unsqueeze(1), k, m)[:, 0]          # sums of log c
        hi = k + g
        valid = m & (hi <= tok_end)                                  # full windows starting at k
        window = prefix[hi.clamp(max=n_tok)] - prefix[k.clamp(min=0)]
        min_window = _segment_min(torch.where(valid, window, float("inf")), torch.where(valid, seg, num_samples),
                                  num_samples)
        total = prefix[start + n_b] - prefix[start]
        log_p = torch.where(n_b >= g, min_window / g, total / n_b.clamp(min=1))
        p = torch.exp(log_p).clamp(0.0, 1.0)
        w = c
    else:
        prefix = _segment_prefix(c.unsqueeze(1), k, m)[:, 0]          # sums of c
        lo = torch.maximum(k - (g - 1) // 2, tok_start)
        hi = torch.minimum(k + g // 2, tok_end - 1)                   # ceil((g-1)/2) == g // 2
        lo, hi = torch.where(m, lo, 0), torch.where(m, hi, 0)
        c_loc = (prefix[hi + 1] - prefix[lo]) / (hi - lo + 1).clamp(min=1)
        p = _segment_min(torch.where(m, c_loc, float("inf")), torch.where(m, seg, num_samples), num_samples)
        p = torch.where(n_b > 0, p, 1.0).clamp(0.0, 1.0)
        w = torch.clamp(c.double() / (c_loc + eps), 0.0, 1.0)
    s = 1.0 - p.pow(gamma)
    return w.float(), p, s, n_b


def objective(
    nll: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    method: str = "bft",
    variant: str = "v1",
    group_size: int = 256,
    gamma: float = 1.0,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
    compile_backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MetricPartials]:
    """SFT / DFT / BFT loss as ``(loss_sum, num_units, metrics)`` for Megatron's per-token-loss contract.

    Args:
        nll: per-token NLL, ``[b, s]`` (padded: each row a sample) or ``[1, T]`` with ``cu_seqlens``
            (packed: each segment a sample). Under context parallelism this rank's load-balanced shard
            (``[b, s/CP]`` / ``[1, T/CP]``), and ``cu_seqlens`` are the *global* boundaries, each sample
            padded to a multiple of ``2*CP`` (padding masked). ``cu_seqlens[0]`` must be 0 (as the collator
            writes them; not checked, which would cost a host sync); tokens after the last boundary are padding
            for every method (neither loss nor counts), whatever their mask.
        loss_mask: same shape; nonzero where the label is supervised. Unsupervised positions contribute
            nothing, even an inf/NaN NLL there.
        method: ``sft`` (w=1, s=1), ``dft`` (w=sg(c), s=1), ``bft`` (per-sample weight ``1 - p_b**gamma``).
        variant: BFT variant, ``v1`` (released code: min window mean of log c) or ``v3`` (paper:
            group-normalised token weights). Ignored for sft/dft.
        group_size, gamma, eps: BFT's ``g``, ``gamma`` and ``eps``.
        cp_group: context-parallel group, or None.
        compile_backend: BFT only: run the weight math through ``torch.compile`` with this backend
            (``"inductor"`` on GPUs); None = eager. Same values to float rounding.

    Returns:
        ``loss_sum`` fp32 scalar (a sum: the caller divides by the global ``num_units``);
        ``num_units`` 0-dim int64: supervised tokens (sft/dft) or samples with >= 1 supervised token
        (bft; counted on CP rank 0 only); ``metrics`` local :class:`MetricPartials`.
    """
    _check_args(nll, loss_mask, method, variant, group_size, gamma, eps, cu_seqlens)
    l_loc, m_loc, positions = _local_tokens(nll, loss_mask, cu_seqlens, cp_group, every_rank=method == "bft")
    # The NLL with unsupervised positions zeroed (gradient 0 there): a zero coefficient times an inf/NaN NLL at
    # a label the caller never meant to supervise would otherwise make the sum NaN.
    l_sup = torch.where(m_loc, l_loc, 0.0)
    metrics = MetricPartials()
    tokens = m_loc.sum()
    metrics.add_sum("lm_loss", l_sup.detach().sum(), tokens)
    if method == "sft":
        metrics.add_sum("token_weight", tokens.double(), tokens)
        return l_sup.sum(), tokens.to(torch.int64), metrics
    if method == "dft":
        coef = torch.where(m_loc, torch.exp(-l_loc.detach()), 0.0)
        metrics.add_sum("token_weight", coef.sum(), tokens)
        return (coef * l_sup).sum(), tokens.to(torch.int64), metrics
    return _bft(l_loc, l_sup, m_loc, tuple(nll.shape), variant, group_size, gamma, eps, cu_seqlens, cp_group,
                positions, metrics, compile_backend)


def _local_tokens(nll, loss_mask, cu_seqlens, cp_group, every_rank: bool):
    """This rank's flat fp32 NLL ``[n]`` and supervised flags ``[n]`` (tokens past ``cu_seqlens[-1]`` unsupervised
    for every method), and the CP ranks' global token positions (:func:`_cp_positions`)."""
    l_loc = nll.float().reshape(-1)
    m_loc = loss_mask.reshape(-1) != 0
    positions = _cp_positions(tuple(nll.shape), cu_seqlens, cp_group, nll.device, every_rank=every_rank)
    if cu_seqlens is not None:  # every method: tokens after the last sample are padding, whatever their mask
        mine = positions[_cp_rank(cp_group)] if positions else torch.arange(nll.shape[1], device=nll.device)
        m_loc = m_loc & (mine < cu_seqlens[-1])
    return l_loc, m_loc, positions


def _global_tokens(a_loc, m_loc, local_shape, cp_group, positions):
    """The whole samples' ``a = log c`` and supervised flags (CP: all-gathered into global order, identical on every
    CP rank), the global ``[b, s]`` shape, this CP rank's positions in it (None without CP) and the CP rank."""
    cp_size = len(positions) if positions else 1
    cp_rank = _cp_rank(cp_group)
    batch, local_len = local_shape
    global_shape = (batch, local_len * cp_size)
    if not positions:
        return a_loc, m_loc, global_shape, None, cp_rank
    ordered = [positions[r] for r in range(cp_size)]
    a, m_f = _gather_cp(a_loc, m_loc.float(), batch * local_len * cp_size, ordered, cp_group)
    return a, m_f != 0, global_shape, positions[cp_rank], cp_rank


def _cp_rank(cp_group) -> int:
    return dist.get_rank(cp_group) if cp_group is not None else 0


def _cp_positions(local_shape, cu_seqlens, cp_group, device, every_rank: bool) -> dict[int, torch.Tensor] | None:
    """Global positions (``[N]`` long, into the flattened ``[b, s]``) of the tokens of CP rank ``r``, by ``r``.

    None without CP. BFT needs every rank's (to place the all-gathered tokens); sft/dft only their own, and only
    for the tail mask of packed rows, so they skip the computation for padded rows.
    """
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    if cp_size == 1 or (not every_rank and cu_seqlens is None):
        return None
    ranks = range(cp_size) if every_rank else [_cp_rank(cp_group)]
    return {r: local_to_global_positions(local_shape, cp_size, r, cu_seqlens, device) for r in ranks}


def _bft(l_loc, l_sup, m_loc, local_shape, variant, g, gamma, eps, cu_seqlens, cp_group, positions, metrics,
         compile_backend):
    """``l_sup``: the NLL zeroed outside the supervised positions; ``positions``: every CP rank's global token
    positions (:func:`_cp_positions`), or None without CP."""
    a, m, global_shape, mine, cp_rank = _global_tokens(-l_loc.detach(), m_loc, local_shape, cp_group, positions)
    args = (a, m, global_shape, cu_seqlens, mine, variant, g, gamma, eps, cp_rank == 0)
    coef, stats = _bft_math(*args) if compile_backend is None else _run_compiled(compile_backend, args)
    loss_sum = (coef * l_sup).sum()
    metrics.add_pairs(SAMPLE_STATS, stats[:2 * len(SAMPLE_STATS)])
    metrics.add_min("p_conf", stats[-3])
    metrics.add_max("p_conf", stats[-2])
    return loss_sum, stats[-1].to(torch.int64), metrics


# Names of the (sum, count) pairs in the statistics vector of ``_bft_math``, in order.
SAMPLE_STATS = ("p_conf", "sample_weight", "short_frac", "token_weight")


def _bft_math(a, m, global_shape, cu_seqlens, mine, variant, g, gamma, eps, count_here: bool):
    """BFT's detached math from the global ``a = log c`` and supervised flags ``m`` (no communication).

    Returns ``coef`` (fp32, this rank's tokens: ``coef[t] = w_t * s_b / n_b`` on supervised tokens, else 0)
    and one float64 statistics vector: the (sum, count) pairs of :data:`SAMPLE_STATS`, then ``p`` min,
    ``p`` max (+-inf without samples) and the number of samples with a supervised token (the loss's
    units). Per-sample statistics count on CP rank 0 only (``count_here``); ``mine`` selects this
    CP rank's tokens from the global sequence (None without CP). Pure tensor code, so that
    ``torch.compile`` can fuse its ~110 small ops into a few kernels (see :func:`compiled_bft_math`).
    """
    m, seg, num_samples = _segments(m, global_shape, cu_seqlens)
    w, p, s, n_b = _bft_weights(a, m, seg, num_samples, variant, g, gamma, eps)
    sid = seg.clamp(max=num_samples - 1)
    coef = torch.where(m, w.double() * (s / n_b.clamp(min=1))[sid], 0.0).float()
    w_tok = torch.where(m, w, 0.0)
    m_tok = m
    if mine is not None:
        coef, w_tok, m_tok = coef[mine], w_tok[mine], m[mine]
    present = n_b > 0
    scale = 1.0 if count_here else 0.0
    count = present.sum().double() * scale
    p_min = torch.where(present, p, float("inf")).amin()
    p_max = torch.where(present, p, float("-inf")).amax()
    stats = torch.stack((
        torch.where(present, p, 0.0).sum().double() * scale, count,
        torch.where(present, s, 0.0).sum().double() * scale, count,
        (present & (n_b < g)).sum().double() * scale, count,
        w_tok.sum().double(), m_tok.sum().double(),
        p_min.double() if count_here else torch.full_like(p_min, float("inf"), dtype=torch.float64),
        p_max.double() if count_here else torch.full_like(p_max, float("-inf"), dtype=torch.float64),
        count,
    ))
    return coef, stats


_COMPILED: dict[str, object] = {}
_FAILED: set[str] = set()


def _run_compiled(backend: str, args):
    """The compiled math. If it raises, the eager math runs instead: an error there too is a real one
    and propagates; otherwise the compiler failed (a backend bug, a recompile limit), which costs one
    warning and the rest of the process runs eagerly (``compile_failed`` reports it)."""
    if backend not in _FAILED:
        try:
            return compiled_bft_math(backend)(*args)
        except Exception as err:  # noqa: BLE001 - judged by the eager rerun below
            out = _bft_math(*args)
            _FAILED.add(backend)
            reason = " ".join([line.strip() for line in str(err).splitlines() if line.strip()][:2])
            _log.warning("torch.compile (%s) of BFT's weight math failed (%s: %s); continuing eagerly "
                         "(set loss.compile=false to skip the attempt)", backend, type(err).__name__, reason)
            return out
    return _bft_math(*args)


def compile_failed(backend: str) -> bool:
    """Whether ``backend`` failed in this process and the objective fell back to eager."""
    return backend in _FAILED


def compiled_bft_math(backend: str = "inductor"):
    """:func:`_bft_math` under ``torch.compile`` (dynamic shapes: the token and sample counts vary).

    On a GPU the eager BFT objective is ~110 small ops per micro-batch more than SFT, which cost more host
    time than GPU time at 1B-model shapes; inductor fuses the element-wise chains around the scans and gathers.
    Same result to float rounding (the prefix sums stay float64). One compiled function per backend.
    """
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_bft_math, backend=backend, dynamic=True, fullgraph=True)
    return _COMPILED[backend]
