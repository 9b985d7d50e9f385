"""The rank-0 progress line (tokens/s/GPU, MFU, ETA) and the TensorBoard scalars, from known inputs.

MFU = tokens/s/GPU x model FLOPs per token (Megatron's count, causal attention halved) / peak FLOP/s; the peak
is ``logging.peak_tflops`` or the GPU's dense BF16 peak by device name (989 TFLOP/s on H100 SXM / H200, 756 on H100
PCIe, 835 on H100 NVL), none on CPU.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from bft_megatron.config import load_config
from bft_megatron.config.plan import flops_per_token
from bft_megatron.training.progress import ProgressLog, format_duration, peak_flops

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=256", "train.global_batch_size=32",
        "train.train_iters=110"]
VALUES = {"loss": 1.25, "lm_loss": 2.5, "p_conf": 0.5, "sample_weight": 0.4, "token_weight": 0.3}


def _field(line: str, name: str) -> float:
    return float(re.search(rf"(?:^| \| ){re.escape(name)} ([0-9.]+)", line).group(1))


def _log(tmp_path, extra=(), rank=0, world=4) -> ProgressLog:
    cfg = load_config(None, TINY + [f"logging.tensorboard_dir={tmp_path}"] + list(extra))
    return ProgressLog(cfg, SimpleNamespace(rank=rank, world_size=world))


def test_line_reports_throughput_mfu_and_eta_from_known_inputs(tmp_path):
    log = _log(tmp_path, ["logging.peak_tflops=0.002"])  # a peak at the tiny model's scale: MFU ~0.35
    line = log.line(10, VALUES, step_time=2.0, lr=1e-4, grad_norm=0.75, skipped=1)
    log.close()
    tokens_per_gpu = 32 * 256 / 4 / 2.0  # rows x seq_length / GPUs / seconds: 1024
    assert _field(line, "tok/s/GPU") == pytest.approx(tokens_per_gpu, abs=0.05)
    want_mfu = tokens_per_gpu * flops_per_token(log.cfg.model, 256) / 0.002e12
    assert 0.1 < want_mfu < 1 and _field(line, "MFU") == pytest.approx(want_mfu, abs=5e-4)
    assert " | ETA 3m20s | " in line  # 100 steps left at 2 s each
    assert line.startswith("step 10/110 | loss 1.250000 | lm loss 2.500000 | lr 1.000e-04 | grad norm 0.7500")
    assert "skipped 1" in line and "p_conf 0.5000" in line and "2000 ms/step" in line


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (200, "3m20s"),
                                             (3599, "59m59s"), (3600, "1h00m"), (60_000, "16h40m"), (-3, "0s")])
def test_eta_is_readable_from_seconds_to_days(seconds, shown):
    assert format_duration(seconds) == shown


def test_peak_is_dense_bf16_on_h100_and_h200_and_none_on_cpu(monkeypatch):
    assert peak_flops(250.0) == 250e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert peak_flops(None) == 989e12


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_follows_the_device_name_variant_and_the_config_wins(monkeypatch, name, tflops):
    """Dense BF16 datasheet peaks: the H100 PCIe and NVL parts are not the SXM's 989 TFLOP/s; unlisted: no MFU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops(None) == (tflops * 1e12 if tflops else None)
    assert peak_flops(500.0) == 500e12


def test_causal_attention_is_halved_in_the_flop_count():
    m = load_config(None, TINY).model
    dense = flops_per_token(m, 256)
    # doubling the sequence adds only the attention term 6*L*s*h (causal: half of 12*L*s*h)
    assert flops_per_token(m, 512) - dense == pytest.approx(6 * 2 * 256 * 64)


def test_mfu_counts_the_output_layer_at_the_padded_vocabulary(tmp_path):
    """The model's output layer has make_vocab_size_divisible_by * tp columns (130 -> 256 at 64 x TP4, 192 at
    TP1), and so has the MFU numerator, as in Megatron-LM's FLOP count."""
    log = _log(tmp_path, ["model.vocab_size=130", "model.make_vocab_size_divisible_by=64", "parallel.tp=4"])
    log.close()
    padded = load_config(None, TINY + ["model.vocab_size=256"]).model
    assert log.flops == flops_per_token(padded, 256)
    assert log.flops - flops_per_token(log.cfg.model, 256, tp=1) == 3 * 2 * 64 * (256 - 192)


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_names_and_values(tmp_path):
    log = _log(tmp_path)
    log.line(3, VALUES, step_time=0.5, lr=2e-4, grad_norm=1.5, skipped=0)
    log.eval(4, {"lm_loss": 2.25, "loss": 1.0})
    log.close()
    got = _scalars(tmp_path)
    for tag, value in [("train/loss", 1.25), ("train/lm_loss", 2.5), ("train/lr", 2e-4), ("train/grad_norm", 1.5),
                       ("train/p_conf", 0.5), ("train/sample_weight", 0.4), ("train/token_weight", 0.3),
                       ("train/tokens_per_s_per_gpu", 32 * 256 / 4 / 0.5), ("train/step_time_ms", 500.0)]:
        assert got[tag] == [(3, pytest.approx(value, rel=1e-6))], tag
    assert got["valid/lm_loss"] == [(4, 2.25)] and got["valid/loss"] == [(4, 1.0)]


def test_skipped_steps_is_a_cumulative_tensorboard_scalar(tmp_path):
    """Not only the line's 'skipped N': the run's running count of skipped (non-finite) steps, 0 included."""
    log = _log(tmp_path)
    for it, skipped in ((1, 0), (2, 1), (3, 3)):
        log.line(it, VALUES, step_time=0.5, lr=2e-4, grad_norm=1.5, skipped=skipped)
    log.close()
    assert _scalars(tmp_path)["train/skipped_steps"] == [(1, 0.0), (2, 1.0), (3, 3.0)]


def test_only_global_rank_0_writes_tensorboard(tmp_path):
    log = _log(tmp_path, rank=1)
    log.line(1, VALUES, step_time=1.0, lr=1e-4, grad_norm=None, skipped=0)
    log.close()
    assert log.writer is None and not list(tmp_path.iterdir())


def test_a_validation_larger_than_its_split_is_warned_about():
    """eval_iters global batches beyond the validation split wrap around: rows read twice weigh double in the
    reported means, silently (the demo's 154 validation rows with train.eval_iters=25 x 8)."""
    from bft_megatron.config import load_config
    from bft_megatron.training.data import validation_plan_warning

    def warning(*overrides, rows=154):
        cfg = load_config(None, ["train.global_batch_size=8", "train.eval_interval=10", *overrides])
        return validation_plan_warning(cfg, list(range(rows)))

    assert warning("train.eval_iters=25") == (
        "validation data: 154 rows, but train.eval_iters=25 x train.global_batch_size=8 = 200 rows per validation: "
        "46 rows are read twice in each validation and weigh double in its means; set train.eval_iters=19 (152 "
        "rows), or null (every row once), or add validation data")
    assert warning("train.eval_iters=19") is None
    assert warning("train.eval_iters=null") is None
    assert warning("train.eval_iters=1", rows=5).endswith("; set train.eval_iters=null (every row once) or add "
                                                          "validation data")
    assert warning("train.eval_iters=25", "train.eval_interval=0") is None  # no validation
    assert warning("train.eval_iters=25", "train.eval_interval=0", "train.eval_on_start=true") is not None
    cfg = load_config(None, ["train.eval_interval=10", "train.eval_iters=25"])
    assert validation_plan_warning(cfg, None) is None
