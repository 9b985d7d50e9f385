"""Logits for supervised positions only (``train.supervised_logits_only``).

Every objective here (SFT, DFT, BFT) reads the target log-probability at supervised positions only, so the
output layer (``hidden x vocab``: at Llama-3 widths the largest GEMMs of a step, three per micro-batch) and the
vocabulary-parallel NLL need only those rows. Three pieces:

* :func:`supervised_rows` (host, per micro-batch, after the CP split): which rows of the output layer's input to
  keep and where each kept row's NLL goes back. Megatron's hidden states are ``[s, b, h]``, so rows are counted
  in that s-major order (packed micro-batches: ``b = 1``, the token order). With sequence parallelism the output
  layer sees this TP rank's contiguous ``s/TP`` slice and all-gathers its input along rows, so each TP rank keeps
  its own slice's supervised rows, padded to the same count on every rank (the gathered order is rank-major).
* :func:`install_row_selection` / :func:`selecting_rows`: a forward pre-hook on megatron's output layer that
  index-selects those rows (``[n, 1, h]``), so GPTModel returns ``[1, n, V/TP]`` logits; the backward of the
  selection scatters the rows' gradient into the full hidden gradient (zeros elsewhere).
* :func:`scatter_rows`: the kept rows' NLL back to the micro-batch's ``[b, s]`` layout (0 at unsupervised
  positions, which the loss mask leaves out anyway); padding rows land in a dropped extra slot.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["supervised_rows", "install_row_selection", "selecting_rows", "scatter_rows", "output_layer_of"]

_ATTR = "_bft_logit_rows"
# Rows kept per rank, rounded up with padding rows: the output layer's weight-gradient GEMM reduces over them, and
# GEMM kernels want that dimension aligned (bf16: multiples of 8 elements = 16 bytes).
_ROW_MULTIPLE = 8


def supervised_rows(loss_mask: torch.Tensor, tp_sp: int = 1, tp_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions), int64 on the host, for one micro-batch's ``[b, s]`` loss mask (this CP rank's shard).

    ``rows``: indices into this rank's s-major ``[s/tp_sp * b]`` output-layer input (``tp_sp``: TP with sequence
    parallelism, else 1). ``positions``: for each row of the (gathered) logits, its s-major index in ``[s * b]``,
    or ``s * b`` for a padding row. Each rank keeps a multiple of 8 rows, at least 8 (padding rows read row 0).
    """
    b, s = loss_mask.shape
    flat = loss_mask.t().reshape(-1).numpy() > 0  # s-major
    chunk = flat.size // tp_sp
    picked = [np.flatnonzero(flat[k * chunk:(k + 1) * chunk]) for k in range(tp_sp)]
    n = -(-max(1, max(p.size for p in picked)) // _ROW_MULTIPLE) * _ROW_MULTIPLE
    rows = np.zeros(n, dtype=np.int64)
    rows[:picked[tp_rank].size] = picked[tp_rank]
    positions = np.full(tp_sp * n, s * b, dtype=np.int64)
    for k, p in enumerate(picked):
        positions[k * n:k * n + p.size] = p + k * chunk
    return torch.from_numpy(rows), torch.from_numpy(positions)


def output_layer_of(chunk: torch.nn.Module) -> torch.nn.Module | None:
    """The GPTModel's ``output_layer`` inside a (DDP / Float16Module wrapped) chunk; None off the last stage."""
    from bft_megatron.checkpoint.state import unwrap  # lazily: the data path imports this module

    module = unwrap(chunk)
    return getattr(module, "output_layer", None) if getattr(module, "post_process", True) else None


def _select_rows(layer, args, kwargs):
    rows = getattr(layer, _ATTR, None)
    if rows is None:  # a forward outside selecting_rows (export, logits checks): every row
        return None
    hidden = args[0] if args else kwargs["input_"]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).unsqueeze(1)  # [n, 1, h]
    if args:
        return (picked, *args[1:]), kwargs
    return args, {**kwargs, "input_": picked}


def install_row_selection(chunks: list[torch.nn.Module]) -> None:
    """Put the row-selecting pre-hook on every chunk's output layer (the last pipeline stage's)."""
    for chunk in chunks:
        layer = output_layer_of(chunk)
        if layer is not None and not hasattr(layer, _ATTR):
            setattr(layer, _ATTR, None)
            layer.register_forward_pre_hook(_select_rows, with_kwargs=True)


@contextlib.contextmanager
def selecting_rows(chunk: torch.nn.Module, rows: torch.Tensor | None):
    """Within: ``chunk``'s output layer computes only ``rows`` (None: all); cleared afterwards."""
    layer = output_layer_of(chunk) if rows is not None else None
    if layer is None or not hasattr(layer, _ATTR):
        yield
        return
    setattr(layer, _ATTR, rows)
    try:
        yield
    finally:
        setattr(layer, _ATTR, None)


def scatter_rows(values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[n]`` per-row values -> ``[b, s]`` (``shape``) with zeros at rows not kept (differentiable)."""
    b, s = shape
    out = values.new_zeros(s * b + 1).index_add(0, positions, values)  # the extra slot takes padding rows
    return out[:-1].reshape(s, b).t()
