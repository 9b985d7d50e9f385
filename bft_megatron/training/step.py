"""``forward_step`` / ``loss_func`` in megatron's per-token-loss contract (pretrain_gpt style).

``forward_step(data_iterator, model)`` runs one micro-batch through one model chunk and returns
``(output_tensor, partial(loss_func, ...))``; the pipeline schedule calls the loss function on the
last stage only. ``loss_func`` returns ``(loss, num_units, metrics)``:

* ``loss`` — fp32 scalar: this micro-batch's SUM (``sum_b s_b * L_b`` for BFT) times ``loss_scale``, the
  reciprocal of the step's global unit count over DP (:mod:`bft_megatron.loss.units`, counted by the
  trainer before the forward pass). The schedule back-propagates it as is and the trainer's
  ``finalize_model_grads`` leaves the gradients unscaled: their sum over micro-batches and DP ranks is the
  gradient of the exact global mean. (Megatron's own contract would scale the whole gradient buffer by
  ``1/total`` after the backward pass instead: a pass over 4 bytes per parameter, and a host sync in
  megatron-core 0.16/0.17.)
* ``num_units`` — 0-dim integer tensor (tokens for sft/dft, samples for bft).
* ``metrics`` — :class:`bft_megatron.loss.MetricPartials` (plus the objective's own unscaled sum/count
  under ``loss``), reduced once per logging interval by the training loop.
"""

from __future__ import annotations

from functools import partial

import torch

from bft_megatron.config.schema import LossConfig
from bft_megatron.loss import objective, sample_statistics, vocab_parallel_nll
from bft_megatron.training.batch import MicroBatch
from bft_megatron.training.logit_rows import scatter_rows, selecting_rows

__all__ = ["forward_step", "loss_func", "make_forward_step", "loss_compile_backend"]


def loss_func(batch: MicroBatch, loss_cfg: LossConfig, tp_group, output_tensor: torch.Tensor, cp_group=None,
              vocab_size: int | None = None, loss_scale: torch.Tensor | None = None, sample_sink: list | None = None):
    """Per-token NLL from ``[b, s, V/TP]`` (or THD ``[1, b*s, V/TP]``, or the supervised rows' ``[1, n, V/TP]``)
    logits, then the objective.

    Under context parallelism the logits, labels and mask are this rank's shard (``s/CP``) and
    ``cp_group`` lets the objective gather per-sample statistics (BFT's window minimum spans ranks).
    ``loss.compile`` runs BFT's weight math through ``torch.compile``. ``vocab_size`` (the model's, unpadded)
    leaves megatron's vocabulary padding out of the softmax: the loss is the HF model's at any padding.
    ``loss_scale`` (training; 0-dim fp32): multiplies the returned loss, not the metrics. ``sample_sink``
    (``--eval-samples``): a list that gets ``(batch.origins, host_statistics(sample_statistics(...)))`` of this
    micro-batch (:func:`bft_megatron.loss.sample_statistics` with the loss config's BFT settings, whatever its
    method).
    """
    nll = _token_nll(batch, output_tensor, tp_group, vocab_size)
    mask = batch.loss_mask
    if batch.cu_seqlens is not None:  # packed rows: samples are segments of the flattened [1, b*s] view
        nll, mask = nll.reshape(1, -1), mask.reshape(1, -1)
    loss_sum, num_units, metrics = objective(
        nll, mask, method=loss_cfg.method, variant=loss_cfg.variant, group_size=loss_cfg.group_size,
        gamma=loss_cfg.gamma, eps=loss_cfg.eps, cu_seqlens=batch.cu_seqlens, cp_group=cp_group,
        compile_backend=loss_compile_backend(loss_cfg),
    )
    if sample_sink is not None:
        from bft_megatron.training.eval_samples import host_statistics

        sample_sink.append((batch.origins, host_statistics(sample_statistics(
            nll, mask, variant=loss_cfg.variant, group_size=loss_cfg.group_size, gamma=loss_cfg.gamma,
            eps=loss_cfg.eps, cu_seqlens=batch.cu_seqlens, cp_group=cp_group))))
    if batch.poison:
        loss_sum = loss_sum * float("nan")
    metrics.add_sum("loss", loss_sum.detach(), num_units)
    return (loss_sum if loss_scale is None else loss_sum * loss_scale), num_units, metrics


def _token_nll(batch: MicroBatch, logits: torch.Tensor, tp_group, vocab_size: int | None) -> torch.Tensor:
    """fp32 ``[b, s]`` per-token NLL (equal on all TP ranks) from GPTModel's logits: ``[b, s, V/TP]``, or with
    :attr:`MicroBatch.logit_rows` ``[1, n, V/TP]`` for the kept rows only (scattered back; 0 elsewhere)."""
    # inplace: the logits are not needed after the loss (the output layer's backward saves its input and
    # weight, not its output), so the NLL backward may write the logits' gradient into their storage.
    if batch.logit_positions is None:
        labels = batch.labels.reshape(logits.shape[:-1])  # padding labels are masked by the objective
        return vocab_parallel_nll(logits, labels, tp_group, inplace=True, vocab_size=vocab_size)
    n = batch.logit_positions.numel()
    if logits.dim() != 3 or logits.shape[:2] != (1, n):  # else labels could pair with the wrong rows silently
        raise RuntimeError(f"train.supervised_logits_only: the model returned logits of shape {tuple(logits.shape)} "
                           f"for {n} selected rows; its output layer has no row selection (build the model through "
                           "build_trainer, which calls training.logit_rows.install_row_selection)")
    shape = tuple(batch.labels.shape)
    flat_labels = batch.labels.t().reshape(-1)  # s-major, as the rows were counted
    labels = flat_labels.index_select(0, batch.logit_positions.clamp(max=flat_labels.numel() - 1))
    nll = vocab_parallel_nll(logits, labels.reshape(logits.shape[:-1]), tp_group, inplace=True,
                             vocab_size=vocab_size)
    return scatter_rows(nll.reshape(-1), batch.logit_positions, shape)


def forward_step(data_iterator, model, *, loss_cfg: LossConfig, tp_group, cp_group=None, bf16: bool = False,
                 vocab_size: int | None = None, loss_scale: torch.Tensor | None = None,
                 sample_sink: list | None = None):
    """One micro-batch through ``model`` (one chunk). Every stage reads the full micro-batch itself.

    Packed rows (``cu_seqlens``) run as one ``[1, T]`` THD sequence with ``PackedSeqParams``; padded
    rows as ``[b, s]`` with the causal mask. ``cp_group`` (context parallel > 1) goes to the loss.
    ``bf16``: the model is wrapped in ``Float16Module``; ``fp32_output=False`` keeps the logits in bf16
    (the NLL computes in fp32 itself; an fp32 copy of ``[tokens, V/TP]`` logits would cost 2x their memory).
    """
    batch: MicroBatch = next(data_iterator)
    kwargs = {"fp32_output": False} if bf16 else {}
    with selecting_rows(model, batch.logit_rows):  # train.supervised_logits_only: the output layer's rows
        if batch.cu_seqlens is not None:
            output = model(batch.tokens.reshape(1, -1), batch.position_ids.reshape(1, -1), None,
                           packed_seq_params=batch.packed_seq_params(), **kwargs)
        else:
            output = model(batch.tokens, batch.position_ids, None, **kwargs)
    return output, partial(loss_func, batch, loss_cfg, tp_group, cp_group=cp_group, vocab_size=vocab_size,
                           loss_scale=loss_scale, sample_sink=sample_sink)


def make_forward_step(loss_cfg: LossConfig, tp_group, cp_group=None, bf16: bool = False,
                      vocab_size: int | None = None, loss_scale: torch.Tensor | None = None,
                      sample_sink: list | None = None):
    """The two-argument callable megatron's schedules expect (``cp_group``: None unless CP > 1;
    ``vocab_size``, ``loss_scale``, ``sample_sink``: see :func:`loss_func`)."""
    return partial(forward_step, loss_cfg=loss_cfg, tp_group=tp_group, cp_group=cp_group, bf16=bf16,
                   vocab_size=vocab_size, loss_scale=loss_scale, sample_sink=sample_sink)


def loss_compile_backend(loss_cfg: LossConfig) -> str | None:
    """``loss.compile`` resolved to a ``torch.compile`` backend for BFT's weight math (None = eager)."""
    return "inductor" if loss_cfg.compile else None
