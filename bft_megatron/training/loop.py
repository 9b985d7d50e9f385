"""The training loop: one optimizer step per global batch, validation, logging, checkpoints, exits.

Non-finite handling: after the forward/backward pass every rank checks its loss partials (last
stage), one all-reduce over the world agrees on them, and the gradients are judged by megatron's global
gradient norm, which the optimizer step then reuses (so the gradients are read once, not twice). A bad step is
skipped everywhere (no optimizer or scheduler step; its rows count as consumed; global rank 0 alone warns); after
``train.max_consecutive_skips`` bad steps in a row the run aborts with an error on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bft_megatron.config.schema import Config
from bft_megatron.config.validate import Layout
from bft_megatron.loss import MetricPartials, reduce_metrics
from bft_megatron.loss.units import UNIT_INDEX
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.training.batch import MicroBatch, StepData
from bft_megatron.training.progress import ProgressLog, reporter_rank, to_rank0
from bft_megatron.training.step import make_forward_step
from bft_megatron.utils.logging import get_logger

__all__ = ["TrainState", "NonFiniteError", "Trainer", "all_finite", "known_grad_norm"]

_log = get_logger(__name__)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: every element of every tensor is finite (no host sync).

    One read pass per tensor: the max-abs norm propagates NaN and is inf for +-inf, and unlike a sum it
    cannot overflow on finite values. ``torch.isfinite(g).all()`` costs several passes with full-size
    temporaries over the fp32 gradient buffer (>= 11 ms per step on an H200 for the 8B proxy, docs/benchmarks.md).
    """
    flags = [torch.isfinite(torch.linalg.vector_norm(t, ord=float("inf"))) for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


@contextlib.contextmanager
def known_grad_norm(optimizer, grad_norm: float):
    """Within: megatron's (chained) ``optimizer.step()`` clips with ``grad_norm`` instead of computing the norm
    again, and skips the gradient preparation already done for it (:meth:`Trainer._verdict`).

    ``ChainedOptimizer.step`` reads both through ``self.prepare_grads()`` / ``self.get_grad_norm()`` (megatron-core
    0.16-0.19), so instance attributes take their place for one call; deleting them restores the class methods.
    """
    optimizer.prepare_grads = lambda: False
    optimizer.get_grad_norm = lambda: grad_norm
    try:
        yield
    finally:
        del optimizer.prepare_grads, optimizer.get_grad_norm


class NonFiniteError(RuntimeError):
    """Raised on every rank after too many consecutive non-finite steps."""


@dataclass
class TrainState:
    """Everything a checkpoint restores besides model/optimizer/scheduler."""

    iteration: int = 0
    consumed_rows: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    # rank 0: per logged step {"iteration", "loss", "lm_loss", "grad_norm", "skipped", "lr"}
    history: list = field(default_factory=list)


@dataclass
class StepResult:
    metrics: dict
    grad_norm: float | None
    skipped: bool
    lr: float  # the learning rate this step used (the scheduler has already moved on)
    real_tokens: int  # non-padding tokens this rank processed


class Trainer:
    """Owns the wrapped model chunks, optimizer, scheduler and data samplers of one run."""

    def __init__(self, cfg: Config, layout: Layout, groups: ParallelGroups, model, tconfig, optimizer, scheduler,
                 train_data, valid_data=None) -> None:
        self.cfg, self.layout, self.groups = cfg, layout, groups
        self.model, self.tconfig, self.optimizer, self.scheduler = model, tconfig, optimizer, scheduler
        self.state = TrainState()
        # None: an evaluation (--eval-only) of prepared validation data alone, which never steps
        self.train_data = None if train_data is None else self._step_data(train_data, cfg.data.seed)
        self.valid_data = valid_data
        self.progress = ProgressLog(cfg, groups)
        self.reporter = reporter_rank(groups)
        self.poison_steps: set[int] = set()  # test seam: iterations whose loss is made NaN
        self._log_grown_plan()

    def _log_grown_plan(self) -> None:
        """Under CP, packed micro-batches grow past ``mbs * seq_length`` (sample padding): re-plan memory."""
        t, seq = self.cfg.train, self.cfg.data.seq_length
        grown = self.train_data.total / t.micro_batch_size if self.train_data is not None else 0
        if grown <= seq or self.groups.rank != 0:
            return
        from bft_megatron.config.plan import plan_memory

        recompute = t.recompute == "full"
        before = plan_memory(self.cfg, self.layout.dp, self.layout.num_microbatches)[0].total(recompute)
        after = plan_memory(self.cfg, self.layout.dp, self.layout.num_microbatches, grown)[0].total(recompute)
        _log.info("memory plan at the grown micro-batch length (%.0f tokens per row instead of %d): %.2f GiB "
                  "per GPU (%.2f GiB planned at data.seq_length)", grown, seq, after, before)

    def _step_data(self, dataset, seed: int, end_row: int | None = None, origins: bool = False) -> StepData:
        t, g = self.cfg.train, self.groups
        tp_sp = g.tp_size if self.cfg.parallel.sequence_parallel else 1
        return StepData(dataset, packed=bool(dataset.packed), global_batch_size=t.global_batch_size,
                        micro_batch_size=t.micro_batch_size, dp_rank=g.dp_rank, dp_size=g.dp_size, seed=seed,
                        seq_length=self.cfg.data.seq_length, device=g.device, cp_size=g.cp_size, cp_rank=g.cp_rank,
                        tp_sp=tp_sp, end_row=end_row, origins=origins,
                        logit_rows=(tp_sp, g.tp_rank if tp_sp > 1 else 0) if t.supervised_logits_only else None)

    def _loss_cfg(self):
        """The configured loss, or plain SFT during ``loss.sft_warmup_iters`` (validation follows suit)."""
        lo = self.cfg.loss
        return dataclasses.replace(lo, method="sft") if self.state.iteration < lo.sft_warmup_iters else lo

    # ---------------------------------------------------------------- one step
    def _fwd_bwd(self, data: StepData, forward_only: bool, poison: bool = False,
                 sample_sink: list | None = None) -> list[MetricPartials]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = data.next_step()
        seq_length, micro_batch_size = data.schedule_shape
        if poison:
            for mb in micro:
                mb.poison = True
        iters = [iter(micro) for _ in self.model]
        fwd_bwd = get_forward_backward_func(pp_size=self.groups.pp_size, vp_size=self.groups.vp_size)
        cp_group = self.groups.cp if self.groups.cp_size > 1 else None
        loss_cfg = self._loss_cfg()
        step_fn = make_forward_step(loss_cfg, self.groups.tp, cp_group, self.cfg.train.bf16,
                                    vocab_size=self.cfg.model.vocab_size,
                                    loss_scale=None if forward_only else self._loss_scale(micro, loss_cfg.method),
                                    sample_sink=sample_sink)
        out = fwd_bwd(forward_step_func=step_fn,
                      data_iterator=iters if len(iters) > 1 else iters[0], model=self.model,
                      num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=micro_batch_size,
                      forward_only=forward_only)
        return list(out) if self.groups.is_last_pp_stage else []

    def _loss_scale(self, micro: list[MicroBatch], method: str) -> torch.Tensor:
        """0-dim fp32 ``1 / units`` of this step's global batch (:mod:`bft_megatron.loss.units`; 1 without any).

        Every rank counts its own micro-batches (whole, before the CP split, on the host), so a sum over DP alone
        gives the global count; one asynchronous 8-byte copy to the device, no host sync.
        """
        units = torch.stack([mb.units for mb in micro]).sum(dim=0)[UNIT_INDEX[method]]
        device = self.groups.device
        units = (units.pin_memory() if device.type == "cuda" else units).to(device, non_blocking=True)
        if self.groups.dp_size > 1:
            dist.all_reduce(units, group=self.groups.dp)
        return units.clamp(min=1).double().reciprocal().float()

    def _grad_tensors(self) -> list[torch.Tensor]:
        """The contiguous DDP gradient buffers (one check per buffer), or per-parameter grads as fallback."""
        out = []
        for chunk in self.model:
            buffers = list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
            if buffers and all(hasattr(b, "grad_data") for b in buffers):
                out += [b.grad_data for b in buffers]
            else:
                out += [p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
        return out

    def _all_finite(self, partials: list[MetricPartials]) -> bool:
        """Agree on every rank whether this step's losses and gradients are finite (one host sync).

        Gradients are checked in the DDP buffers after the DP reduction: a NaN on any rank reaches the
        reduced shard of its owner, and every rank's local buffer; the MIN all-reduce spreads the verdict.
        """
        flag, _ = self._agree(all_finite([p.sums["loss"] for p in partials] + self._grad_tensors()))
        return bool(flag.item())

    def _agree(self, ok: torch.Tensor, async_op: bool = False):
        """(flag, pending work): ``ok`` (0-dim bool) as an int32 device tensor MIN-all-reduced over the world."""
        flag = ok.to(device=self.groups.device, dtype=torch.int32).reshape(1)
        return flag, dist.all_reduce(flag, op=dist.ReduceOp.MIN, async_op=async_op)

    def _verdict(self, partials: list[MetricPartials]) -> tuple[bool, float | None]:
        """(finite, grad norm): whether this step's losses and gradients are finite on every rank, and megatron's
        global gradient norm (None where the optimizer is not megatron's chained one: then :meth:`_all_finite`).

        The norm is the one ``optimizer.step()`` clips with (over every rank's share of the gradients, all-reduced
        by megatron); a NaN or inf in any gradient makes it non-finite, as does a sum of squares beyond fp32's range
        (a step that clipping would zero anyway). The loss flag's all-reduce runs while the norm is computed; the
        norm's ``.item()`` is the step's first host sync.
        """
        opt = self.optimizer
        if not hasattr(opt, "chained_optimizers"):
            return self._all_finite(partials), None
        flag, pending = self._agree(all_finite([p.sums["loss"] for p in partials]), async_op=True)
        found_inf = opt.prepare_grads()  # megatron: the main grads point into the DDP buffers (no fp16 scaler here)
        grad_norm = float(opt.get_grad_norm())
        pending.wait()
        return bool(flag.item()) and not found_inf and math.isfinite(grad_norm), grad_norm

    def train_step(self, report: bool = True) -> StepResult:
        """One optimizer step. ``report``: reduce the metrics over DP x CP (only steps that get logged need
        them; skipping it saves two small all-reduces and a host sync per step)."""
        g = self.groups
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        partials = self._fwd_bwd(self.train_data, forward_only=False,
                                 poison=self.state.iteration in self.poison_steps)
        if self.state.iteration + 1 < self.cfg.train.train_iters:
            # The host has queued the whole backward; build the next batch while the GPU runs it (the
            # finiteness check below is the step's first host sync).
            self.train_data.prefetch()
        finite, known_norm = self._verdict(partials)
        grad_norm, lr = None, self.optimizer.param_groups[0]["lr"]
        if finite:
            with known_grad_norm(self.optimizer, known_norm) if known_norm is not None else contextlib.nullcontext():
                updated, grad_norm, _ = self.optimizer.step()
            if updated:
                self.scheduler.step(increment=1)
        metrics = reduce_metrics(partials, g.dp_cp) if partials and report else {}
        return StepResult(metrics=metrics, grad_norm=grad_norm, skipped=not finite, lr=lr,
                          real_tokens=self.train_data.last_real_tokens)

    def record_step(self, result: StepResult) -> None:
        """Advance the iteration and data position; count skips (raises after too many in a row)."""
        s = self.state
        s.iteration += 1
        s.consumed_rows = self.train_data.consumed_rows
        if result.skipped:
            s.skipped_steps += 1
            s.consecutive_skips += 1
            # Every rank reaches the same verdict (one all-reduce), so one line says it all: from every rank it would
            # be world-size copies of the same warning (the logger passes warnings from all ranks).
            if self.groups.rank == 0:
                _log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d skipped in total)",
                             s.iteration, s.consecutive_skips, s.skipped_steps)
            if s.consecutive_skips >= self.cfg.train.max_consecutive_skips:
                raise NonFiniteError(f"{s.consecutive_skips} consecutive non-finite steps (limit "
                                     f"train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}); aborting")
        else:
            s.consecutive_skips = 0

    # ---------------------------------------------------------------- validation
    def evaluate(self, stop: Callable[[], bool] | None = None, sample_sink: list | None = None) -> dict:
        """Forward-only over ``eval_iters`` global batches of the validation rows (same every time); with
        ``eval_iters`` null over every row once: ``ceil(rows / global_batch_size)`` batches, the last one filled with
        padding rows that count for nothing.

        ``stop``: asked before each batch (a collective: every rank calls it at the same point); when it
        returns True, validation ends there and reports nothing (partial means would read like a full
        validation), so a SIGTERM's grace period is not spent on a long validation.
        ``sample_sink`` (``--eval-samples``): gets each micro-batch's per-sample statistics on the last pipeline
        stage (:func:`~bft_megatron.training.step.loss_func`).
        """
        t, g = self.cfg.train, self.groups
        whole = len(self.valid_data) if t.eval_iters is None else None
        data = self._step_data(self.valid_data, self.cfg.data.seed + 1, end_row=whole, origins=sample_sink is not None)
        batches = t.eval_iters or -(-whole // t.global_batch_size)
        partials: list[MetricPartials] = []
        done = 0
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            while done < batches and not (stop is not None and stop()):
                partials += self._fwd_bwd(data, forward_only=True, sample_sink=sample_sink)
                done += 1
        for chunk in self.model:
            chunk.train()
        if done < batches:
            if g.rank == 0:
                _log.info("validation at step %d stopped after %d of %d batches (exit requested): not reported",
                          self.state.iteration, done, batches)
            return {}
        values = reduce_metrics(partials, g.dp_cp) if partials else {}
        values = to_rank0(values if g.rank == self.reporter else None, self.reporter, g)
        self.progress.eval(self.state.iteration, values)
        return values
