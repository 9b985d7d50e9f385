"""bench/multi_gpu_checks.py's reading of the trainer's progress lines and its verdicts (the script itself
launches torchrun runs: on CPU, `python bench/multi_gpu_checks.py --config configs/demo_cpu.yaml ...`, see its
docstring; on GPUs, issue 7)."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest

from bft_megatron.config import load_config
from bft_megatron.training.progress import ProgressLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=256", "train.global_batch_size=32",
        "train.train_iters=20", "logging.peak_tflops=0.002"]


@pytest.fixture(scope="module")
def checks():
    spec = importlib.util.spec_from_file_location("multi_gpu_checks", os.path.join(ROOT, "bench",
                                                                                   "multi_gpu_checks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(losses: list[float], step_ms: float = 500.0) -> str:
    """The trainer's own progress lines (ProgressLog.line) for steps 1.. with these losses."""
    log = ProgressLog(load_config(None, TINY), SimpleNamespace(rank=1, world_size=2))  # rank 1: no TensorBoard
    return "\n".join("[12:00:00 r0 INFO] " + log.line(i + 1, {"loss": v, "lm_loss": 2 * v, "p_conf": 0.5},
                                                       step_time=step_ms / 1000, lr=1e-4, grad_norm=0.5, skipped=0)
                     for i, v in enumerate(losses))


def test_parse_log_reads_every_step_of_the_progress_lines(checks):
    steps = checks.parse_log(_lines([1.25, 1.125, 1.0]) + "\n[12:00:01 r0 INFO] validation | lm loss 9 | 1 ms/step")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["loss"] for r in steps] == [1.25, 1.125, 1.0]
    assert [r["lm_loss"] for r in steps] == [2.5, 2.25, 2.0]
    assert all(r["ms"] == 500 and r["mfu"] is not None and r["tok"] > 0 for r in steps)


def _results(checks, layouts, losses: dict) -> dict:
    return {name: {"nproc": 2, "steps": checks.parse_log(_lines(losses[name]))} for name, *_ in layouts}


def test_compare_passes_within_tolerance_and_fails_beyond_it(checks):
    layouts = [("tp1", 1, [], None), ("tp2", 2, ["parallel.tp=2"], "tp1"),
               ("tp1 fp8", 1, ["train.fp8=hybrid"], "tp1")]
    args = SimpleNamespace(rtol=2e-2, fp8_rtol=5e-2, warmup=1, steps=4)
    base = [2.0, 1.9, 1.8, 1.7]
    close = [v * 1.01 for v in base]
    rows, ok = checks.compare(_results(checks, layouts, {"tp1": base, "tp2": close, "tp1 fp8": close}),
                              layouts, {}, args)
    assert ok and [r["verdict"] for r in rows[1:]] == ["ok", "ok"]
    assert rows[1]["loss"] == pytest.approx(0.01, rel=1e-3)
    assert rows[0]["ms"] == 500  # throughput: median after the warm-up steps
    off = [2.0, 1.9, 1.8, 1.7 * 1.03]  # one step 3% off: beyond BF16's 2e-2, within FP8's 5e-2
    rows, ok = checks.compare(_results(checks, layouts, {"tp1": base, "tp2": off, "tp1 fp8": off}),
                              layouts, {}, args)
    assert not ok and [r["verdict"] for r in rows[1:]] == ["FAILED", "ok"]


def test_compare_fails_failed_runs_and_checks_resumes_at_the_next_step(checks):
    layouts = [("tp1", 1, [], None), ("tp2", 2, ["parallel.tp=2"], "tp1")]
    args = SimpleNamespace(rtol=2e-2, fp8_rtol=5e-2, warmup=1, steps=4)
    base = [2.0, 1.9, 1.8, 1.7]
    results = _results(checks, layouts, {"tp1": base, "tp2": base})
    resumes = {"tp2 -> tp1": {"nproc": 1, "steps": checks.parse_log(_lines([9.0, 9.0, 1.8]))},
               "tp2 -> pp2": {"nproc": 2, "steps": checks.parse_log(_lines([9.0, 9.0, 1.9]))}}
    rows, ok = checks.compare(results, layouts, resumes, args)
    assert not ok  # the resume at PP2 gave another step-3 loss (only step 3 = steps // 2 + 1 is compared)
    assert [r["verdict"] for r in rows[2:]] == ["ok", "FAILED"]
    results["tp2"]["error"] = "NCCL timeout"
    rows, ok = checks.compare(results, layouts, {}, args)
    assert not ok and rows[1]["verdict"] == "run failed"
