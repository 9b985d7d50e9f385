"""Wrap model chunks for training: Float16Module, megatron DDP, optimizer, LR scheduler, schedule hooks."""

from __future__ import annotations

from functools import partial

import torch

from bft_megatron.config.schema import Config

__all__ = ["wrap_model", "build_optimizer", "build_scheduler", "install_schedule_hooks"]


def wrap_model(chunks: list[torch.nn.Module], tconfig, cfg: Config) -> list[torch.nn.Module]:
    """bf16 -> ``Float16Module``; then megatron DDP (contiguous grad buffers, bucketed reduce).

    ``average_in_collective=False``: grads are summed over DP; each micro-batch's loss already carries
    ``1/global units`` (training/step.py), so the sum is the gradient of the global mean.
    ``parallel.grad_reduce_in_fp32`` (default) keeps accumulation and reduction in fp32 in bf16 runs. Only the
    first chunk uses buckets (as megatron does): the others' grads are reduced in one go when their backward
    finishes.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    if cfg.train.bf16:
        chunks = [Float16Module(tconfig, c) for c in chunks]
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=p.grad_reduce_in_fp32, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather, use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # the training loop skips non-finite steps itself
        bucket_size=p.bucket_size, average_in_collective=False,
    )
    return [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def build_optimizer(model: list[torch.nn.Module], cfg: Config):
    """megatron Adam (distributed optimizer when configured) with global-norm clipping."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(opt_config, model)


def build_scheduler(optimizer, cfg: Config):
    """Linear warmup from 0 to ``lr`` over ``warmup_iters``, then cosine/linear decay to ``min_lr`` (or ``lr`` held
    until the last ``wsd_decay_iters`` before ``decay_iters``, then the WSD anneal to ``min_lr``).

    Steps are optimizer steps (the scheduler is stepped with increment 1 per successful step). On resume
    megatron's ``load_state_dict`` takes the step count from the checkpoint and, as in Megatron-LM, asserts that
    the schedule values match, or with ``checkpoint.override_scheduler`` keeps this config's; the checkpointer
    compares them first (``checkpoint/schedule.py``) to fail with the config fields named.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    decay_iters = t.decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=max(decay_iters, t.warmup_iters + 1), lr_decay_style="WSD" if t.decay == "wsd" else t.decay,
        wsd_decay_steps=t.wsd_decay_iters, lr_wsd_decay_style=t.wsd_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=cfg.checkpoint.override_scheduler,
    )


def install_schedule_hooks(model: list[torch.nn.Module], tconfig, optimizer, cfg: Config) -> None:
    """Hooks the pipeline schedules call: loss scaling, grad-sync control, grad finalisation."""
    from megatron.core.distributed import finalize_model_grads

    tconfig.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        grad_sync = [m.start_grad_sync for m in model]
        tconfig.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        tconfig.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    if cfg.parallel.overlap_param_gather:
        param_sync = [m.start_param_sync for m in model]
        tconfig.param_sync_func = param_sync[0] if len(model) == 1 else param_sync
    tconfig.finalize_model_grads_func = partial(finalize_unscaled, finalize_model_grads)


def finalize_unscaled(finalize, model, num_tokens=None, *args, **kwargs):
    """Megatron's ``finalize_model_grads`` without its ``1/num_tokens`` gradient scaling: each micro-batch's
    loss already carries ``1/global units`` (training/step.py). ``num_tokens`` (the schedule's sum of the
    loss's units) is dropped: scaling by it would divide twice and costs a pass over the gradient buffer.
    Megatron's MoE auxiliary and MTP losses count on that scaling (their gradients would come out ``units``
    times too large): the trainer builds neither; a model that adds them must scale them itself."""
    return finalize(model, None, *args, **kwargs)
