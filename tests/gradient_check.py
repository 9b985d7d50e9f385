"""The trainer's gradient against the spec's, at its absolute scale (run inside tests/train_worker.py).

The trainer divides each micro-batch's loss sum by the step's global unit count ``N`` (counted ahead from the masks,
summed over DP) and megatron's ``finalize_model_grads`` leaves the summed gradient unscaled. Layout-equivalence
tests compare loss histories under Adam with clipping, which barely notice a gradient off by a constant factor (a
missing ``1/N``, an extra ``1/DP``). Here one step's reduced ``main_grad`` is compared with autograd's gradient of
``tests.loss_reference``'s global objective: full-vocabulary logits, per-sample Python loops, the global unit count
summed over the data-parallel ranks. The step's statistics reduced over DP (what the progress line and TensorBoard
report) are compared with the reference's per-sample values gathered from every rank. Single model chunk (PP1), TP1,
CP1, non-distributed optimizer (so every rank's ``main_grad`` holds the whole reduced gradient).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist

from bft_megatron.loss.metrics import reduce_metrics
from tests.loss_reference import _reference_nll, _reference_terms


def _reference_sum(model, mb, cfg) -> tuple[torch.Tensor, int, list, list[float]]:
    """This micro-batch's objective numerator, units, per-sample ``(p, s, n, sum w)`` and supervised NLLs, from
    the model's full logits (TP1)."""
    if mb.cu_seqlens is not None:  # packed: one [1, T] sequence, samples are segments of it
        logits = model(mb.tokens.reshape(1, -1), mb.position_ids.reshape(1, -1), None,
                       packed_seq_params=mb.packed_seq_params())
    else:
        logits = model(mb.tokens, mb.position_ids, None)
    labels = mb.labels.reshape(logits.shape[:-1])
    nll = _reference_nll(logits[..., : cfg.model.vocab_size], labels)  # megatron's padding rows left out
    mask = mb.loss_mask.reshape(nll.shape)
    loss = cfg.loss
    total, units, samples = _reference_terms(nll, mask, method=loss.method, variant=loss.variant,
                                             group_size=loss.group_size, gamma=loss.gamma, eps=loss.eps,
                                             cu_seqlens=mb.cu_seqlens)
    return total, units, samples, nll[mask != 0].tolist()


def _reference_metrics(sums: list, group_size: int, group) -> dict[str, float]:
    """What the progress line reports for the step, from the reference's samples on every DP rank."""
    mine = [(samples, nlls) for _, _, samples, nlls in sums]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    samples = [x for rank in everyone for ss, _ in rank for x in ss]
    nlls = [x for rank in everyone for _, ns in rank for x in ns]
    out = {"lm_loss": sum(nlls) / len(nlls), "token_weight": sum(x[3] for x in samples) / len(nlls)}
    ps = [x[0] for x in samples if x[0] is not None]
    if ps:
        out.update(p_conf=sum(ps) / len(ps), p_conf_min=min(ps), p_conf_max=max(ps),
                   sample_weight=sum(x[1] for x in samples) / len(samples),
                   short_frac=sum(x[2] < group_size for x in samples) / len(samples))
    return out


def _main_grads(trainer) -> list[torch.Tensor]:
    return [p.main_grad.detach().clone() for chunk in trainer.model for p in chunk.parameters()]


def compare(trainer, cfg) -> dict:
    """One training step's gradient (schedule, DDP, finalize) vs the reference's; rank-local numbers."""
    g = trainer.groups
    if len(trainer.model) != 1 or g.tp_size != 1 or g.cp_size != 1 or cfg.parallel.distributed_optimizer:
        raise ValueError("gradient_check needs one chunk, TP1, CP1 and parallel.distributed_optimizer=false")
    micro = trainer.train_data.next_step()
    replay = SimpleNamespace(next_step=lambda: micro, schedule_shape=trainer.train_data.schedule_shape)
    chunk = trainer.model[0]
    chunk.zero_grad_buffer()
    partials = trainer._fwd_bwd(replay, forward_only=False)
    trained = _main_grads(trainer)
    units = sum(int(p.sums["loss"][1]) for p in partials)

    chunk.zero_grad_buffer()
    with chunk.no_sync() if hasattr(chunk, "no_sync") else contextlib.nullcontext():
        sums = [_reference_sum(chunk, mb, cfg) for mb in micro]
        local_units = sum(x[1] for x in sums)
        global_units = torch.tensor(float(local_units))
        dist.all_reduce(global_units, group=g.dp)
        (torch.stack([x[0] for x in sums]).sum() / global_units).backward()
    reference = _main_grads(trainer)
    for t in reference:  # the spec's gradient is the sum over the data-parallel ranks' shares
        dist.all_reduce(t, group=g.dp)
    diff = max(float((a - b).abs().max()) for a, b in zip(trained, reference))
    scale = max(float(b.abs().max()) for b in reference)
    return {"units": units, "reference_units": local_units, "global_units": int(global_units),
            "max_diff": diff, "max_grad": scale, "micro_batches": len(micro),
            "metrics": reduce_metrics(partials, g.dp_cp),
            "reference_metrics": _reference_metrics(sums, cfg.loss.group_size, g.dp)}
