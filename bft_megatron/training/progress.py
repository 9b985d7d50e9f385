"""Progress reporting: metric hand-off from the last pipeline stage, the rank-0 line, TensorBoard, MFU.

Losses exist only on the last pipeline stage; the training loop reduces the metric partials there
(over DP x CP) and :func:`to_rank0` ships the resulting small dict to global rank 0, which logs.

MFU (model FLOPs utilisation), stated formula::

    flops_per_token = 6 * P_matmul + 6 * L * s * h
    MFU             = tokens_per_s_per_gpu * flops_per_token / peak_flops_per_gpu

``P_matmul`` = parameters taking part in matmuls (all transformer-layer weights + the output
layer ``V_pad*h``, the vocabulary padded to ``make_vocab_size_divisible_by * tp`` as the model's output layer is;
the input embedding is a lookup and is excluded), ``6`` = forward (2) + backward (4)
FLOPs per weight per token; ``6*L*s*h`` = attention scores and weighted sum (``QK^T`` and ``AV``,
``4*s*h`` forward per layer per token, halved for causal masking, x3 for fwd+bwd; ``s = data.seq_length``
also for packed rows, whose attention stays within each sample: Megatron-LM's count, an upper bound there, stated
in docs/training.md). Recompute is not counted (model FLOPs, not hardware FLOPs). Peak: the GPU's dense BF16 peak
(:data:`PEAK_BF16_TFLOPS`, e.g. 989 TFLOP/s on H100 SXM / H200, 756 on H100 PCIe) unless ``logging.peak_tflops`` is
set; no MFU on CPU or an unlisted GPU.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from bft_megatron.config.schema import Config
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.utils.logging import get_logger

__all__ = ["reporter_rank", "to_rank0", "flops_per_token", "format_duration", "peak_flops", "PEAK_BF16_TFLOPS",
           "ProgressLog"]

_log = get_logger(__name__)


def reporter_rank(groups: ParallelGroups) -> int:
    """Global rank of (last PP stage, tp=dp=cp=0): it holds the reduced metrics. Collective."""
    mine = groups.is_last_pp_stage and groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    flag = torch.tensor([groups.rank if mine else -1], dtype=torch.int64, device=groups.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def to_rank0(values: dict | None, src: int, groups: ParallelGroups) -> dict:
    """Send ``values`` from ``src`` to global rank 0 (every rank calls; returns {} elsewhere)."""
    if src == 0:
        return values or {}
    box = [values if groups.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return (box[0] or {}) if groups.rank == 0 else {}


def flops_per_token(cfg: Config) -> float:
    """Model FLOPs per token (formula in the module docstring; shared with ``bft-megatron plan``)."""
    from bft_megatron.config.plan import flops_per_token as plan_flops

    return plan_flops(cfg.model, cfg.data.seq_length, cfg.parallel.tp)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``16h40m``: the ETA of runs from minutes to days, readable at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# Dense (no sparsity) BF16 peak TFLOP/s per GPU from NVIDIA's datasheets, keyed by a substring of
# torch.cuda.get_device_name(), first match wins: the H100/H200 PCIe and NVL parts run at lower clocks and power
# than the SXM ones, so they must be matched before the bare "H100"/"H200" (the SXM names, e.g. "NVIDIA H100 80GB
# HBM3", "NVIDIA H200"; also "NVIDIA GH200 480GB"), else their MFU reads up to 24% low. BF16 also under train.fp8
# (the FP8 peaks are twice these; set logging.peak_tflops to measure against one).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))


def peak_flops(configured_tflops: float | None) -> float | None:
    """Per-GPU peak FLOP/s for MFU: ``logging.peak_tflops`` if set, else :data:`PEAK_BF16_TFLOPS` for this
    GPU; None (no MFU) on CPU or an unlisted GPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key, tflops in PEAK_BF16_TFLOPS:
            if key.lower() in name:
                return tflops * 1e12
    return None


def _start_wandb(cfg: Config, groups: ParallelGroups):
    """The W&B run, on global rank 0 (None elsewhere). A collective when distributed: if W&B fails to start (a bad
    API key, no network in online mode), every rank raises instead of the others waiting in the next collective."""
    from bft_megatron.parallel.rank0 import on_rank0
    from bft_megatron.training.wandb_log import WandbLog

    started = []
    on_rank0(lambda: started.append(WandbLog(cfg)), "starting the W&B run (logging.wandb_project)",
             getattr(groups, "control", None))
    return started[0] if started else None


class ProgressLog:
    """Formats the progress line and writes TensorBoard (and W&B) scalars (global rank 0 only)."""

    def __init__(self, cfg: Config, groups: ParallelGroups) -> None:
        self.cfg, self.groups = cfg, groups
        self.flops = flops_per_token(cfg)
        self.peak = peak_flops(cfg.logging.peak_tflops)
        self.writer = self.wandb = None
        if groups.rank == 0 and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        if cfg.logging.wandb_project and (groups.rank == 0 or dist.is_initialized()):
            self.wandb = _start_wandb(cfg, groups)

    def line(self, it: int, values: dict, step_time: float, lr: float, grad_norm: float | None,
             skipped: int) -> str:
        t = self.cfg.train
        tokens_per_gpu = t.global_batch_size * self.cfg.data.seq_length / self.groups.world_size / max(step_time, 1e-9)
        parts = [f"step {it}/{t.train_iters}", f"loss {values.get('loss', math.nan):.6f}",
                 f"lm loss {values.get('lm_loss', math.nan):.6f}", f"lr {lr:.3e}",
                 f"grad norm {grad_norm:.4f}" if grad_norm is not None else "grad norm n/a",
                 f"tok/s/GPU {tokens_per_gpu:.1f}"]
        if self.peak:
            parts.append(f"MFU {tokens_per_gpu * self.flops / self.peak:.3f}")
        parts.append(f"{step_time * 1000:.0f} ms/step")
        mem_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        if mem_gib is not None:
            parts.append(f"mem {mem_gib:.2f} GiB")
        if "effective_tokens_per_s_per_gpu" in values:
            parts.append(f"effective tok/s/GPU {values['effective_tokens_per_s_per_gpu']:.1f}")
        parts.append(f"ETA {format_duration((t.train_iters - it) * step_time)}")
        if skipped:
            parts.append(f"skipped {skipped}")
        for k in ("p_conf", "p_conf_min", "sample_weight", "token_weight"):
            if k in values:
                parts.append(f"{k} {values[k]:.4f}")
        # skipped_steps: the run's cumulative count (a checkpoint restores it), a float so _scalars keeps it; 0 too,
        # so a curve exists from the start and a jump stands out.
        self._scalars(it, {**values, "lr": lr, "grad_norm": grad_norm, "tokens_per_s_per_gpu": tokens_per_gpu,
                           "step_time_ms": step_time * 1000, "mem_allocated_gib": mem_gib,
                           "skipped_steps": float(skipped)}, prefix="train")
        return " | ".join(parts)

    def _scalars(self, it: int, values: dict, prefix: str) -> None:
        """Every finite float of ``values`` as ``<prefix>/<name>`` (None and inf/NaN are left out), to TensorBoard
        and W&B."""
        finite = {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, float) and math.isfinite(v)}
        if self.writer is not None:
            for k, v in finite.items():
                self.writer.add_scalar(k, v, it)
        if self.wandb is not None and finite:
            self.wandb.log(it, finite)

    def eval(self, it: int, values: dict) -> None:
        if self.groups.rank == 0:
            shown = " | ".join(f"{'lm loss' if k == 'lm_loss' else k} {v:.6f}" for k, v in sorted(values.items()))
            _log.info("validation at step %d | %s", it, shown)
            self._scalars(it, values, prefix="valid")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
