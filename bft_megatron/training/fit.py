"""The outer loop: steps, logging cadence, validation, checkpoint cadence, signal and time-limit exits.

Exit requests (SIGTERM / SIGUSR1 when ``checkpoint.save_on_signal``, or ``train.exit_duration_minutes``
elapsed) are agreed on by all ranks with one all-reduce per step (and per validation batch, so a signal
during validation ends it early), so every rank saves the same iteration and leaves the loop together.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from bft_megatron.config.base import format_value
from bft_megatron.training.loop import NonFiniteError, Trainer, TrainState
from bft_megatron.training.progress import to_rank0
from bft_megatron.utils.logging import get_logger
from bft_megatron.utils.signal_shield import (EXIT_SIGNALS, HandlerGuard, action_handler, native_action,
                                              native_handler, native_owner, start_compile_workers)

__all__ = ["fit", "ExitRequest"]

_log = get_logger(__name__)


class ExitRequest:
    """Set by signal handlers; polled (and agreed on) once per step. ``started``: when it was made, the start of
    ``train.exit_duration_minutes`` (the CLI makes it before building the model and loading the checkpoint)."""

    def __init__(self, install: bool) -> None:
        self.requested = False
        self.reason = ""
        self.started = time.time()
        self._native: dict[int, int | None] = {}  # signal -> the C-level handler Python installed for ours
        self._actions: dict[int, bytes] = {}      # signal -> its whole C-level action, for HandlerGuard
        if install:
            for sig in EXIT_SIGNALS:
                signal.signal(sig, self._handler)
                action = native_action(sig)   # one read: the address for reclaim, the whole action for the guard
                self._native[sig] = None if action is None else action_handler(action)
                if action is not None:
                    self._actions[sig] = action

    def _handler(self, signum, _frame) -> None:
        self.requested = True
        self.reason = signal.Signals(signum).name

    def shield_compile_workers(self, device: torch.device) -> None:
        """With the handlers installed, on CUDA: start inductor's compile workers with the exit signals ignored
        (``start_compile_workers``). After the rank's device is set (inductor may read device properties) and
        before the first compile (step 1); without CUDA there is no Triton, so no workers."""
        if self._native and device.type == "cuda":
            start_compile_workers()

    def guard(self) -> HandlerGuard:
        """A context in which a thread takes the handlers back within ~50 ms of a native library taking them, also
        in the middle of a step (``HandlerGuard``); ``reclaim`` still runs between steps."""
        return HandlerGuard(self._actions, self._handler, self._restored_by_guard)

    def _restored_by_guard(self, sig: int, address: int) -> None:
        _log_restored(sig, native_owner(address) or f"address {address:#x}")

    def reclaim(self) -> None:
        """Take the handlers back where a native library replaced them (polled with the flag, once per step).

        LLVM in Triton's compiler installs its own SIGTERM/SIGUSR1 handlers at the first compile in the process
        (inductor for megatron's and TE's ``torch.compile``d fusions, Triton kernels: step 1, new shapes) and drops
        SIGUSR1, so on GPUs torchrun's and SLURM's SIGUSR1 was lost until the launcher's SIGKILL. A SIGUSR1 that
        arrives between such a compile and the end of its step is still lost (SIGTERM is not: LLVM restores ours
        and re-raises it)."""
        for sig, ours in self._native.items():
            owner = self._taken_by(sig, ours)
            if owner is not None:
                signal.signal(sig, self._handler)
                if owner:
                    _log_restored(sig, owner)

    def _taken_by(self, sig: int, ours: int | None) -> str | None:
        """Who holds ``sig`` instead of our handler ("": cannot tell, re-install anyway; None: ours)."""
        if signal.getsignal(sig) != self._handler:  # replaced from Python
            return repr(signal.getsignal(sig))
        now = native_handler(sig)
        if ours is None or now is None:  # the kernel's view cannot be read here: one syscall to be sure
            return ""
        if now != ours:
            return native_owner(now) or f"address {now:#x}"
        return None


_reported: set[tuple[int, str]] = set()  # (signal, owner) already logged at INFO in this process
_reported_lock = threading.Lock()         # the guard thread and the main thread both log


def _log_restored(sig: int, owner: str) -> None:
    """INFO the first time a (signal, library) pair is seen in this process, DEBUG after: nvrtc takes SIGTERM at
    every compile, LLVM SIGUSR1 at every new kernel, and one line each tells the user all there is to know."""
    with _reported_lock:
        first = (sig, owner) not in _reported
        _reported.add((sig, owner))
    _log.log(logging.INFO if first else logging.DEBUG, "%s's handler had been replaced by %s; restored "
             "(checkpoint.save_on_signal)%s", signal.Signals(sig).name, owner, "" if first else " again")


def _agree(local: bool, device) -> bool:
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _exit_agreed(cfg, exit_request: ExitRequest, device) -> bool:
    """Whether any rank has a signal, or the walltime is up (one all-reduce; every rank must call it)."""
    exit_request.reclaim()
    timed_out = (cfg.train.exit_duration_minutes is not None
                 and time.time() - exit_request.started > 60 * cfg.train.exit_duration_minutes)
    return _agree(exit_request.requested or timed_out, device)


def _log_step(trainer: Trainer, result, step_time: float, real_tokens: int, interval_time: float) -> None:
    """Every rank calls this (collectives); rank 0 logs. ``real_tokens``: this rank's over the interval."""
    it = trainer.state.iteration
    values = to_rank0(result.metrics if trainer.groups.rank == trainer.reporter else None, trainer.reporter,
                      trainer.groups)
    count = torch.tensor([real_tokens], dtype=torch.float64, device=trainer.groups.device)
    dist.all_reduce(count, group=trainer.groups.dp)  # one DP group's ranks hold the whole global batch
    if trainer.groups.rank != 0:
        return
    values["effective_tokens_per_s_per_gpu"] = float(count.item()) / trainer.groups.world_size / max(interval_time,
                                                                                                      1e-9)
    grad_norm = float(result.grad_norm) if result.grad_norm is not None else None
    trainer.state.history.append({"iteration": it, "loss": values.get("loss"), "lm_loss": values.get("lm_loss"),
                                  "grad_norm": grad_norm, "skipped": result.skipped, "lr": result.lr})
    _log.info(trainer.progress.line(it, values, step_time, result.lr, grad_norm, trainer.state.skipped_steps))


def _mark_resume(save_dir: str, stopped_early: bool, reason: str) -> None:
    """``<save>/RESUME`` exists iff the run stopped before ``train_iters`` (launch/slurm.sbatch requeues)."""
    marker = os.path.join(save_dir, "RESUME")
    if stopped_early:
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(reason + "\n")
    elif os.path.exists(marker):
        os.remove(marker)


def finished_note(cfg, iteration: int, what: str) -> str:
    """Why a run whose checkpoint (``what``) is at ``iteration`` >= ``train.train_iters`` trains nothing."""
    return (f"{what} is at iteration {iteration}, already train.train_iters={cfg.train.train_iters}: nothing to "
            "train (to continue, raise train.train_iters with checkpoint.override_scheduler=true, or with "
            "train.decay_iters at the old train_iters to keep the schedule; or give a new checkpoint.save to start "
            "another run)")


def idle_notes(cfg, iteration: int, has_valid: bool, from_scratch: bool = False) -> list[str]:
    """Why a run will not train, or not validate, or not learn, although its config suggests it (logged at the
    start). ``from_scratch``: no checkpoint was loaded (the model keeps its random initialisation)."""
    notes = []
    lo = cfg.loss
    if from_scratch and lo.method != "sft" and lo.sft_warmup_iters == 0:
        notes.append(f"loss.method={lo.method} from step 1 on a randomly initialised model (nothing was loaded): its "
                     "token weights are the model's own probabilities (about 1/vocab), so the lm loss will not fall "
                     "and may rise; fine-tune imported weights (bft-megatron convert import, then checkpoint.load="
                     "DIR checkpoint.finetune=true) or set loss.sft_warmup_iters (docs/training.md, 'Random "
                     "initialisation and DFT/BFT')")
    if iteration >= cfg.train.train_iters:
        notes.append(finished_note(cfg, iteration, "the loaded checkpoint"))
    asked = [f"train.{k}={format_value(v)}" for k, v in (("eval_interval", cfg.train.eval_interval),
                                                          ("eval_on_start", cfg.train.eval_on_start)) if v]
    if asked and not has_valid:
        notes.append(f"{' and '.join(asked)} but there is no validation split (data.valid "
                     "sources, or a prepared valid/ under data.output_dir): no validation will run")
    return notes


def switch_note(cfg, iteration: int) -> str | None:
    """The line marking the end of ``loss.sft_warmup_iters`` after step ``iteration``, else None."""
    lo = cfg.loss
    if lo.method == "sft" or lo.sft_warmup_iters <= 0 or iteration != lo.sft_warmup_iters:
        return None
    return (f"step {iteration}: SFT warm-up (loss.sft_warmup_iters={lo.sft_warmup_iters}) done; from step "
            f"{iteration + 1} the loss is {lo.method} ({lo.variant if lo.method == 'bft' else 'token-weighted'}): "
            "'loss' drops to the weighted objective's scale, 'lm loss' stays comparable")


def _record(trainer: Trainer, result, checkpointer) -> None:
    """``trainer.record_step``; its abort after too many non-finite steps (raised on every rank at the same step)
    first commits an async save still in flight: that state predates the bad steps, the last good one to resume
    from, and left uncommitted the next run's first commit would delete it as a leftover."""
    try:
        trainer.record_step(result)
    except NonFiniteError:
        if checkpointer is not None:
            checkpointer.finalize()
        raise


def _announce(trainer: Trainer, checkpointer, from_scratch: bool) -> None:
    """Rank 0, before the first step: the start-up notes, and the resolved config written into checkpoint.save."""
    for note in idle_notes(trainer.cfg, trainer.state.iteration, trainer.valid_data is not None, from_scratch):
        _log.warning(note)
    if checkpointer is not None:
        try:  # best effort, rank 0 alone: an error here must not leave the other ranks in a collective
            _log.info("resolved config: %s", checkpointer.write_run_config())
        except OSError as exc:
            _log.warning("could not write the resolved config into checkpoint.save: %s", exc)


def _train(trainer: Trainer, checkpointer, exit_request: ExitRequest) -> int:
    """fit's steps, validations and cadence saves until the last step or an agreed exit; returns the iteration
    last saved (-1: none in this run)."""
    cfg, state = trainer.cfg, trainer.state
    # The steps since the last progress line: a line's step time and tokens/s cover exactly those (the last line,
    # fewer than log_interval steps after the previous one, must not take in steps that line already reported).
    step_times: list[float] = []
    # A run resumed at iteration N already has checkpoint N: only save again after new steps.
    saved_at, interval_tokens = (state.iteration if state.iteration > 0 else -1), 0

    def stop_validation() -> bool:  # a collective: asked before each validation batch
        return _exit_agreed(cfg, exit_request, trainer.groups.device)

    if cfg.train.eval_on_start and state.iteration == 0 and trainer.valid_data is not None:
        trainer.evaluate(stop=stop_validation)
    while state.iteration < cfg.train.train_iters:
        t0 = time.perf_counter()
        upcoming = state.iteration + 1
        result = trainer.train_step(report=upcoming % cfg.logging.log_interval == 0
                                    or upcoming == cfg.train.train_iters)
        _record(trainer, result, checkpointer)
        step_times.append(time.perf_counter() - t0)
        interval_tokens += result.real_tokens
        it = state.iteration
        if it % cfg.logging.log_interval == 0 or it == cfg.train.train_iters:
            _log_step(trainer, result, sum(step_times) / len(step_times), interval_tokens, sum(step_times))
            step_times, interval_tokens = [], 0
        note = switch_note(cfg, it) if trainer.groups.rank == 0 else None
        if note:
            _log.info(note)
        if cfg.train.eval_interval and it % cfg.train.eval_interval == 0 and trainer.valid_data is not None:
            trainer.evaluate(stop=stop_validation)
        if checkpointer is not None and cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
            checkpointer.save(trainer)
            saved_at = it
        if checkpointer is not None:
            checkpointer.poll()
        if _exit_agreed(cfg, exit_request, trainer.groups.device):
            _log.info("exit requested (%s) at step %d", exit_request.reason or "exit_duration_minutes", it)
            break
    return saved_at


def fit(trainer: Trainer, checkpointer=None, exit_request: ExitRequest | None = None,
        from_scratch: bool = False) -> TrainState:
    """Train until ``train.train_iters`` (or an agreed exit); save at cadence, on exit and at the end.
    ``from_scratch``: nothing was loaded into the model (only for the start-up notes)."""
    cfg, state = trainer.cfg, trainer.state
    exit_request = exit_request or ExitRequest(install=False)
    exit_request.shield_compile_workers(trainer.groups.device)
    if trainer.groups.rank == 0:
        _announce(trainer, checkpointer, from_scratch)
    with exit_request.guard():
        saved_at = _train(trainer, checkpointer, exit_request)
    if checkpointer is not None and saved_at != state.iteration:
        checkpointer.save(trainer)
    if checkpointer is None and state.iteration < cfg.train.train_iters and trainer.groups.rank == 0:
        _log.warning("stopped at step %d of train.train_iters=%d (%s) without checkpoint.save: nothing was saved, "
                     "a new run starts again from the beginning (set checkpoint.save to save on signals and at the "
                     "time limit)", state.iteration, cfg.train.train_iters,
                     exit_request.reason or "exit_duration_minutes")
    if checkpointer is not None:
        checkpointer.finalize()
        if trainer.groups.rank == 0:
            _mark_resume(cfg.checkpoint.save, state.iteration < cfg.train.train_iters,
                         exit_request.reason or "exit_duration_minutes")
    trainer.progress.close()
    return state
