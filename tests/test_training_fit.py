"""fit()'s cadences and its walltime exit, and the per-step non-finite verdict and skip count, with stub
trainers (no model) on gloo ranks."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

from tests.dist_harness import run_distributed

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "logging.log_interval=100"]


def _fit(rank: int, world: int, overrides: list[str], started_ago_s: float,
         start_at: int = 0, valid: bool = True) -> tuple[int, list[int], int]:
    """(iterations trained, iterations validated at, steps logged) of a stub run whose clock started
    ``started_ago_s`` seconds ago, resumed at step ``start_at`` (without a validation split unless ``valid``).
    A validation without a stop callback (it could not end early on an exit request) is listed as -1."""
    import torch

    from bft_megatron.config import load_config
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import TrainState

    cfg = load_config(None, TINY + overrides)
    state, evaluated, logged = TrainState(iteration=start_at), [], []
    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=object() if valid else None, reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=lambda it, *a: logged.append(it) or "", close=lambda: None),
        train_step=lambda report: SimpleNamespace(real_tokens=0, metrics={}, grad_norm=None, skipped=False, lr=0.0),
        record_step=lambda result: setattr(state, "iteration", state.iteration + 1),
        evaluate=lambda stop=None: evaluated.append(state.iteration if callable(stop) else -1))
    exit_request = ExitRequest(install=False)
    exit_request.started = time.time() - started_ago_s
    fit(trainer, None, exit_request)
    return state.iteration, evaluated, len(logged)


def test_validation_and_logging_cadence():
    [(iterations, evaluated, logged)] = run_distributed(_fit, 1, ["train.train_iters=7", "train.eval_interval=3"], 0.0)
    assert (iterations, evaluated, logged) == (7, [3, 6], 1)  # log_interval 100: the last step only


@pytest.mark.parametrize("start_at, want", [(0, [0, 3, 6]), (2, [3, 6])])
def test_eval_on_start_validates_the_loaded_weights_before_step_1_unless_resumed(start_at, want):
    over = ["train.train_iters=7", "train.eval_interval=3", "train.eval_on_start=true"]
    [(iterations, evaluated, _)] = run_distributed(_fit, 1, over, 0.0, start_at)
    assert (iterations, evaluated) == (7, want)


def test_eval_on_start_without_a_validation_split_validates_nothing():
    """No valid_data (idle_notes says so): evaluate would fail on None, so the start validation is skipped."""
    [(iterations, evaluated, _)] = run_distributed(_fit, 1, ["train.train_iters=2", "train.eval_on_start=true"], 0.0,
                                                   0, False)
    assert (iterations, evaluated) == (2, [])


def test_exit_duration_is_in_minutes_from_the_start():
    minute = ["train.train_iters=5", "train.exit_duration_minutes=1.0"]
    within, = run_distributed(_fit, 1, minute, 40.0)  # 40 s of the minute gone: the run finishes
    past, = run_distributed(_fit, 1, minute, 70.0)    # 70 s: it stops after the step in progress
    assert within[0] == 5 and past[0] == 1


def _fit_signalled(rank: int, world: int, how: str, reclaim: bool, guard: bool = True) -> tuple[int, str, bool, list]:
    """(iterations trained, exit reason, whether Python still reported our handler, the guard's restores) of a
    6-step stub run whose step 1 replaces the SIGUSR1 handler, ``how="c"`` at the C level as LLVM does at Triton's
    first compile in a process (here with SIG_IGN; LLVM's own handler drops SIGUSR1 alike) or ``"python"`` through
    ``signal.signal``, and whose step 3 gets SIGUSR1 (as from torchrun). ``how="fn"``: step 3 itself installs a
    native function that drops the signal (libc's getpid, as LLVM's info handler) 0.3 s before the signal."""
    import ctypes
    import os
    import signal

    from bft_megatron.config import load_config
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import TrainState

    state, seen, restored = TrainState(), [], []
    libc = ctypes.CDLL(None)

    def train_step(report):
        if state.iteration == 0 and how == "c":
            libc.signal(int(signal.SIGUSR1), ctypes.c_void_p(1))  # SIG_IGN, behind Python's back
        elif state.iteration == 0 and how == "python":
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if state.iteration == 0:
            seen.append(signal.getsignal(signal.SIGUSR1) == exit_request._handler)
        if state.iteration == 2 and how == "fn":   # mid-step, as LLVM at a compile: only the guard can help
            libc.signal(int(signal.SIGUSR1), ctypes.cast(libc.getpid, ctypes.c_void_p))
            time.sleep(0.3)
        if state.iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)  # delivered (and, with Python's handler, run) before the step ends
        return SimpleNamespace(real_tokens=0, metrics={}, grad_norm=None, skipped=False, lr=0.0)

    cfg = load_config(None, TINY + ["train.train_iters=6"])
    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=None, reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=lambda *a: "", close=lambda: None), train_step=train_step,
        record_step=lambda result: setattr(state, "iteration", state.iteration + 1), evaluate=lambda stop=None: None)
    exit_request = ExitRequest(install=True)
    if not reclaim:
        exit_request.reclaim = lambda: None
    if not guard:
        exit_request.guard = contextlib.nullcontext
    exit_request._restored_by_guard = lambda sig, address: restored.append((sig, address))
    shielded = []
    exit_request.shield_compile_workers = shielded.append   # fit starts the compile workers before step 1
    fit(trainer, None, exit_request)
    assert shielded == [torch.device("cpu")], shielded
    return state.iteration, exit_request.reason, seen[0], restored


@pytest.mark.parametrize("how, reclaim, guard", [("c", True, True), ("c", False, True), ("python", True, True),
                                                ("fn", True, True), ("fn", True, False)],
                         ids=["c_level", "c_level_without_reclaim", "python_level", "mid_step", "mid_step_unguarded"])
def test_sigusr1_still_stops_the_run_after_a_library_replaced_its_handler(how, reclaim, guard):
    """On GPUs Triton's LLVM took SIGUSR1 at the first step's kernel compile and dropped it: torchrun's and SLURM's
    exit signal was lost and the rank SIGKILLed without a save. fit polls the handler each step (the kernel's
    view and Python's) and takes it back (``ExitRequest.reclaim``), and a guard thread does so within the step
    (``HandlerGuard``); the runs without reclaim or without the guard show the signal is lost without them."""
    import signal

    [(iterations, reason, python_saw_ours, restored)] = run_distributed(_fit_signalled, 1, how, reclaim, guard)
    assert python_saw_ours == (how != "python")       # at the C level signal.getsignal cannot tell
    assert (iterations, reason) == ((3, "SIGUSR1") if reclaim and guard else (6, ""))
    assert [sig for sig, _ in restored] == ([signal.SIGUSR1] if how == "fn" and guard else [])


def _fit_warnings(rank: int, world: int, overrides: list[str], started_ago_s: float) -> list[str]:
    """The warnings a stub run (as in _fit) logs."""
    import logging

    from tests.data_fixtures import logged

    with logged(logging.WARNING) as records:
        _fit(rank, world, overrides, started_ago_s)
    return [r.getMessage() for r in records]


def test_an_early_stop_without_checkpoint_save_warns_that_nothing_was_saved():
    """A run stopped by the time limit (or a signal) with no checkpoint.save loses its steps: rank 0 says so; a
    run that finishes does not warn."""
    minute = ["train.train_iters=5", "train.exit_duration_minutes=1.0"]
    [stopped] = run_distributed(_fit_warnings, 1, minute, 70.0)
    [finished] = run_distributed(_fit_warnings, 1, minute, 0.0)
    assert [m for m in stopped if "without checkpoint.save" in m] == [
        "stopped at step 1 of train.train_iters=5 (exit_duration_minutes) without checkpoint.save: nothing was "
        "saved, a new run starts again from the beginning (set checkpoint.save to save on signals and at the time "
        "limit)"]
    assert not [m for m in finished if "without checkpoint.save" in m]


@pytest.mark.parametrize("method, warmup, at, shown", [("bft", 3, 3, True), ("bft", 3, 2, False), ("bft", 3, 4, False),
                                                      ("dft", 2, 2, True), ("sft", 3, 3, False), ("bft", 0, 0, False)])
def test_the_end_of_the_sft_warmup_is_logged_once(method, warmup, at, shown):
    from bft_megatron.config import load_config
    from bft_megatron.training.fit import switch_note

    cfg = load_config(None, TINY + [f"loss.method={method}", f"loss.sft_warmup_iters={warmup}", "train.train_iters=9"])
    note = switch_note(cfg, at)
    assert (note is not None) == shown
    if shown:
        assert f"sft_warmup_iters={warmup}" in note and f"from step {at + 1} the loss is {method}" in note


# ---------------------------------------------------------------------------- the non-finite step verdict
def _bare_trainer(max_skips: int = 2, rank: int = 0):
    """A Trainer with only what ``_all_finite`` / ``record_step`` read (no model: no gradient buffers)."""
    from types import SimpleNamespace

    from bft_megatron.training.loop import Trainer, TrainState

    trainer = object.__new__(Trainer)
    trainer.state = TrainState()
    trainer.cfg = SimpleNamespace(train=SimpleNamespace(max_consecutive_skips=max_skips))
    trainer.train_data = SimpleNamespace(consumed_rows=0)
    trainer.model = []
    trainer.groups = SimpleNamespace(device=torch.device("cpu"), rank=rank)
    return trainer


def _loss_partials(value: float):
    from bft_megatron.loss import MetricPartials

    partials = MetricPartials()
    partials.add_sum("loss", torch.tensor(value), torch.tensor(1))
    return [partials]


def _verdicts(rank: int, world: int) -> list[bool]:
    """Each rank's verdict for: all finite; a NaN loss on rank 1 only (finite gradients: 0 * inf)."""
    trainer = _bare_trainer()
    return [trainer._all_finite(_loss_partials(1.0)),
            trainer._all_finite(_loss_partials(float("nan") if rank == 1 else 1.0))]


def test_a_nan_loss_alone_skips_the_step_on_every_rank():
    from tests.dist_harness import run_distributed

    assert run_distributed(_verdicts, 2, timeout=120) == [[True, False], [True, False]]


def test_a_finite_step_resets_the_run_of_skips():
    from bft_megatron.training.loop import NonFiniteError, StepResult

    trainer = _bare_trainer(max_skips=2)
    for skipped in (True, False, True):
        trainer.record_step(StepResult({}, None, skipped, 0.0, 0))
    assert (trainer.state.skipped_steps, trainer.state.consecutive_skips, trainer.state.iteration) == (2, 1, 3)
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite"):
        trainer.record_step(StepResult({}, None, True, 0.0, 0))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_skipped_step_is_warned_about_once_by_global_rank_0(rank):
    """Every rank skips the same step; only global rank 0 says so, with the step and both counts."""
    import logging

    from bft_megatron.training.loop import StepResult
    from tests.data_fixtures import logged

    trainer = _bare_trainer(max_skips=5, rank=rank)
    with logged(logging.WARNING) as records:
        for skipped in (True, False, True, True):
            trainer.record_step(StepResult({}, None, skipped, 0.0, 0))
    messages = [r.getMessage() for r in records]
    if rank:
        assert messages == []
    else:
        assert [m.split(":")[0] for m in messages] == ["step 1", "step 3", "step 4"]
        assert "update skipped (2 in a row, 3 skipped in total)" in messages[-1]



def _fit_with_unwritable_config(rank: int, world: int, save_dir: str) -> tuple[int, list[int]]:
    from bft_megatron.config import load_config
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import TrainState

    def refuse():
        raise PermissionError("read-only file system")

    cfg = load_config(None, TINY + ["train.train_iters=2", f"checkpoint.save={save_dir}"])
    state, saved = TrainState(), []
    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=None, reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=lambda *a: "", close=lambda: None),
        train_step=lambda report: SimpleNamespace(real_tokens=0, metrics={}, grad_norm=None, skipped=False, lr=0.0),
        record_step=lambda result: setattr(state, "iteration", state.iteration + 1))
    checkpointer = SimpleNamespace(write_run_config=refuse, save=lambda t: saved.append(state.iteration),
                                   poll=lambda: None, finalize=lambda: None)
    fit(trainer, checkpointer, ExitRequest(install=False))
    return state.iteration, saved


def test_an_unwritable_run_config_does_not_stop_training(tmp_path):
    """write_run_config runs on rank 0 alone: an OSError there is a warning, never a rank-0-only exception
    that would leave the other ranks in the first collective."""
    [(iterations, saved)] = run_distributed(_fit_with_unwritable_config, 1, str(tmp_path))
    assert iterations == 2 and saved == [2]


def _fit_aborting_on_nan(rank: int, world: int, save_dir: str) -> list:
    """What a stub run's checkpointer is asked to do when the third step aborts (too many non-finite steps) after
    a save at step 2, and what fit raised."""
    from bft_megatron.config import load_config
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import NonFiniteError, TrainState

    cfg = load_config(None, TINY + ["train.train_iters=5", f"checkpoint.save={save_dir}", "checkpoint.save_interval=2"])
    state, calls = TrainState(), []

    def record_step(result):
        state.iteration += 1
        if state.iteration == 3:
            raise NonFiniteError("3 consecutive non-finite steps")

    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=None, reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=lambda *a: "", close=lambda: None),
        train_step=lambda report: SimpleNamespace(real_tokens=0, metrics={}, grad_norm=None, skipped=True, lr=0.0),
        record_step=record_step)
    checkpointer = SimpleNamespace(write_run_config=lambda: save_dir, poll=lambda: None,
                                   save=lambda t: calls.append(("save", state.iteration)),
                                   finalize=lambda: calls.append(("finalize", state.iteration)))
    try:
        fit(trainer, checkpointer, ExitRequest(install=False))
    except NonFiniteError as exc:
        calls.append(("raised", str(exc)))
    return calls


def test_a_non_finite_abort_commits_the_async_save_in_flight(tmp_path):
    """The step-2 save may still be writing (async_save) when step 3 aborts the run on every rank: fit finalises it
    (commits it as `latest`: it predates the bad steps) before re-raising, instead of leaving a complete checkpoint
    for the next run's first commit to delete as an uncommitted leftover."""
    [calls] = run_distributed(_fit_aborting_on_nan, 1, str(tmp_path))
    assert calls == [("save", 2), ("finalize", 3), ("raised", "3 consecutive non-finite steps")]


@pytest.mark.parametrize("stop_before, batches, reported", [(None, 3, True), (1, 1, False), (2, 2, False), (3, 3, True),
                                                           (0, 0, False)])
def test_evaluate_runs_eval_iters_batches_unless_stopped(monkeypatch, stop_before, batches, reported):
    """Validation is exactly train.eval_iters forward-only batches; ``stop`` is asked before each one, and a stop
    before the last one ends it there and reports nothing (a stub trainer, one rank)."""
    from bft_megatron.config import load_config
    from bft_megatron.training import loop
    from bft_megatron.training.loop import TrainState, Trainer

    monkeypatch.setattr(loop, "to_rank0", lambda values, reporter, groups: values)
    monkeypatch.setattr(loop, "reduce_metrics", lambda partials, group: {"loss": float(len(partials))})
    ran, asked, shown = [], [], []
    chunk = SimpleNamespace(eval=lambda: None, train=lambda: None)
    trainer = SimpleNamespace(
        cfg=load_config(None, TINY + ["train.eval_iters=3"]), state=TrainState(), valid_data=object(),
        groups=SimpleNamespace(rank=0, dp_cp=None), reporter=0, model=[chunk],
        _step_data=lambda data, seed, end_row=None, origins=False: data,
        _fwd_bwd=lambda data, forward_only, sample_sink=None: ran.append(forward_only) or ["p"],
        progress=SimpleNamespace(eval=lambda it, values: shown.append(values)))

    def stop():
        asked.append(len(ran))
        return stop_before is not None and len(ran) >= stop_before

    values = Trainer.evaluate(trainer, stop=None if stop_before is None else stop)
    assert ran == [True] * batches
    assert values == ({"loss": 3.0} if reported else {}) and shown == ([values] if reported else [])
    if stop_before is not None:
        assert asked == list(range(min(stop_before, 3) + (stop_before < 3)))


# ---------------------------------------------------------------------------- the logged interval
def _interval_lines(rank: int, world: int) -> list[tuple[int, float, float]]:
    """(iteration, ms/step, effective tokens/s) of each progress line of a 6-step run at log_interval=4: step k
    takes k seconds on a fake clock and has 100 real tokens (one rank, world size 1)."""
    from bft_megatron.config import load_config
    from bft_megatron.training import fit as fit_module
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import TrainState

    cfg = load_config(None, TINY + ["train.train_iters=6", "logging.log_interval=4"])
    state, lines, clock = TrainState(), [], [0.0]

    def train_step(report):
        clock[0] += state.iteration + 1
        return SimpleNamespace(real_tokens=100, metrics={}, grad_norm=None, skipped=False, lr=0.0)

    def line(it, values, step_time, *rest):
        lines.append((it, step_time, values["effective_tokens_per_s_per_gpu"]))
        return ""

    fit_module.time = SimpleNamespace(perf_counter=lambda: clock[0], time=time.time)
    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=None, reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=line, close=lambda: None), train_step=train_step,
        record_step=lambda result: setattr(state, "iteration", state.iteration + 1))
    fit(trainer, None, ExitRequest(install=False))
    return lines


def test_a_short_last_interval_reports_its_own_steps_only():
    """The last line (step 6, two steps after the line at 4) divides those two steps' tokens by those two steps'
    time; it used to take the time of the last log_interval steps (3..6): half the effective tokens/s."""
    [lines] = run_distributed(_interval_lines, 1)
    assert lines == [(4, pytest.approx(2.5), pytest.approx(400 / 10)),   # steps 1-4: 1+2+3+4 s
                     (6, pytest.approx(5.5), pytest.approx(200 / 11))]   # steps 5-6: 5+6 s

