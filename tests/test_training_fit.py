"""fit()'s cadences and its walltime exit, with a stub trainer on one gloo rank (no model)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from tests.dist_harness import run_distributed

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "logging.log_interval=100"]


def _fit(rank: int, world: int, overrides: list[str], started_ago_s: float) -> tuple[int, list[int], int]:
    """(iterations trained, iterations validated at, steps logged) of a stub run whose clock started
    ``started_ago_s`` seconds ago."""
    import torch

    from bft_megatron.config import load_config
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import TrainState

    cfg = load_config(None, TINY + overrides)
    state, evaluated, logged = TrainState(), [], []
    trainer = SimpleNamespace(
        cfg=cfg, state=state, valid_data=object(), reporter=0,
        groups=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), dp=None),
        progress=SimpleNamespace(line=lambda it, *a: logged.append(it) or "", close=lambda: None),
        train_step=lambda report: SimpleNamespace(real_tokens=0, metrics={}, grad_norm=None, skipped=False, lr=0.0),
        record_step=lambda result: setattr(state, "iteration", state.iteration + 1),
        evaluate=lambda: evaluated.append(state.iteration))
    exit_request = ExitRequest(install=False)
    exit_request.started = time.time() - started_ago_s
    fit(trainer, None, exit_request)
    return state.iteration, evaluated, len(logged)


def test_validation_and_logging_cadence():
    [(iterations, evaluated, logged)] = run_distributed(_fit, 1, ["train.train_iters=7", "train.eval_interval=3"], 0.0)
    assert (iterations, evaluated, logged) == (7, [3, 6], 1)  # log_interval 100: the last step only


def test_exit_duration_is_in_minutes_from_the_start():
    minute = ["train.train_iters=5", "train.exit_duration_minutes=1.0"]
    within, = run_distributed(_fit, 1, minute, 40.0)  # 40 s of the minute gone: the run finishes
    past, = run_distributed(_fit, 1, minute, 70.0)    # 70 s: it stops after the step in progress
    assert within[0] == 5 and past[0] == 1
