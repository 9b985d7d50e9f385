"""``bft-megatron plan``: the memory and FLOP model, checked against numbers written out by hand.

The tiny model: hidden 64, 4 layers, 4 heads / 2 KV groups (head_dim 16), SwiGLU FFN 128, vocabulary 250
padded to 256 (multiple of 64 x TP), 32-token rows, micro-batch 2. All bytes below are derived here from
first principles (bf16 weights, fp32 gradient buffers, fp32 master + two Adam moments, bf16 activations),
not by calling the planner's helpers.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys

import pytest

from bft_megatron.config.plan import (GIB, RUNTIME_OVERHEAD_GIB, flops_per_token, format_plan, main, pipeline_bubble,
                                      plan_memory, total_params)
from bft_megatron.config.schema import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=250", "model.make_vocab_size_divisible_by=64",
        "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=8"]

# One layer: QKV 64 x (64 + 2*2*16 = 128), output projection 64 x 64, SwiGLU 3 x 64 x 128, two norms of 64.
LAYER = 64 * 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64          # 36992
LINEAR = LAYER - 2 * 64                                      # 36864 (FP8-cast weights)
TABLE = 256 * 64                                             # padded embedding / output layer: 16384
# Activations per token per layer (TP1), bf16: four hidden-sized tensors (qkv input, attention output,
# projection input, fc1 input) + q/k/v (128) + fc1 output (gate and up, 2 x 128) + SwiGLU output (128);
# plus the two norm inputs (2 x 2 x 64) and the fp32 log-sum-exp per head (4 x 4).
ACT_TOKEN = 2 * (4 * 64 + 128 + 3 * 128) + 2 * 2 * 64 + 4 * 4   # 1808 bytes
TOKENS = 32 * 2                                               # seq x micro-batch
ACT_LAYER = TOKENS * ACT_TOKEN                                # 115712 bytes
LOGITS = 2 * 2 * TOKENS * 256                                 # bf16 logits + bf16 gradient: 65536 bytes


def cfg_of(*overrides: str):
    return load_config(None, TINY + list(overrides))


def gib(nbytes: float) -> float:
    return nbytes / GIB


def test_total_params_tiny_and_real_models():
    assert total_params(cfg_of().model) == 4 * LAYER + 2 * 250 * 64 + 64                # untied: 180032
    assert total_params(cfg_of("model.tie_embeddings=true").model) == 4 * LAYER + 250 * 64 + 64
    llama8b = cfg_of("model.hidden_size=4096", "model.num_layers=32", "model.num_attention_heads=32",
                     "model.num_query_groups=8", "model.ffn_hidden_size=14336", "model.vocab_size=128256")
    assert total_params(llama8b.model) == pytest.approx(8.03e9, rel=1e-3)
    llama70b = load_config(os.path.join(ROOT, "configs/llama3.1_70b_tp8pp4.yaml"))
    assert total_params(llama70b.model) == pytest.approx(70.55e9, rel=1e-3)
    qwen72b = load_config(os.path.join(ROOT, "configs/qwen2.5_72b.yaml"))
    assert total_params(qwen72b.model) == pytest.approx(72.71e9, rel=1e-3)   # Qwen's model card: 72.7B


@pytest.mark.parametrize("name", ["llama31_untied", "llama32_tied", "qwen2_tied", "qwen2_untied_bf16"])
def test_total_params_equals_the_hf_models_count(name, tmp_path):
    """Exact against transformers' own model (QKV bias of Qwen, tied or untied tables, GQA)."""
    from bft_megatron.convert.importer import model_config_from_hf_dir
    from tests.convert_models import make_model

    hf = make_model(name, str(tmp_path))
    assert total_params(model_config_from_hf_dir(str(tmp_path))) == sum(p.numel() for p in hf.parameters())


def test_single_stage_untied_distributed_optimizer_dp2():
    mem, stage = plan_memory(cfg_of(), dp=2, num_microbatches=2)
    params = 4 * LAYER + 2 * TABLE + 64                       # layers + embedding + output layer + final norm
    assert stage == "only"
    assert mem.weights == pytest.approx(gib(2 * params))
    assert mem.gradients == pytest.approx(gib(4 * params))
    assert mem.optimizer == pytest.approx(gib(12 * params / 2))          # sharded over 2 DP ranks
    assert mem.activations == pytest.approx(gib(4 * ACT_LAYER))         # 4 layers, 1 micro-batch in flight
    assert mem.logits == pytest.approx(gib(LOGITS))
    assert mem.fp8_buffers == 0.0 and mem.overhead == RUNTIME_OVERHEAD_GIB
    expected = gib(18 * params - 6 * params + 4 * ACT_LAYER + LOGITS) + 2.5
    assert mem.total(recompute=False) == pytest.approx(expected)


def test_checkpoint_row_states_the_gather_of_the_whole_optimizer_shard_into_host_memory():
    """fully_reshardable copies fp32 main weights + both Adam moments (12 bytes per parameter of the rank's
    TP/PP shard, not divided by DP) into host memory before a save; dp_reshardable gathers nothing."""
    recipe = os.path.join(ROOT, "configs/llama3.1_8b.yaml")
    full = ["checkpoint.optimizer_format=fully_reshardable"]  # the recipe itself writes dp_reshardable
    whole = load_config(recipe, ["parallel.tp=1"] + full)
    gathered = gib(12 * total_params(whole.model))                   # 89.7 GiB: Llama-3.1-8B on one rank
    assert f"fully_reshardable gathers {gathered:.1f} GiB" in format_plan(whole, 8, 0.4, 989.0)  # DP8: still whole
    tp2 = format_plan(load_config(recipe, ["parallel.tp=2"] + full), 8, 0.4, 989.0)
    assert re.search(r"gathers (\d+\.\d) GiB", tp2).group(1) == f"{gathered / 2:.1f}"   # 44.9: half per TP rank
    dp_format = format_plan(load_config(recipe, ["checkpoint.optimizer_format=dp_reshardable"]), 8, 0.4, 989.0)
    assert "no gather into host memory" in dp_format and "fully_reshardable gathers" not in dp_format


def test_tied_embeddings_hold_one_table_on_a_single_stage():
    untied, _ = plan_memory(cfg_of(), dp=1, num_microbatches=4)
    tied, _ = plan_memory(cfg_of("model.tie_embeddings=true"), dp=1, num_microbatches=4)
    assert untied.weights - tied.weights == pytest.approx(gib(2 * TABLE))
    assert untied.optimizer - tied.optimizer == pytest.approx(gib(12 * TABLE))   # dp=1: nothing sharded


def test_distributed_optimizer_shards_only_the_optimizer():
    on, _ = plan_memory(cfg_of(), dp=4, num_microbatches=1)
    off, _ = plan_memory(cfg_of("parallel.distributed_optimizer=false"), dp=4, num_microbatches=1)
    assert off.optimizer == pytest.approx(4 * on.optimizer)
    assert (off.weights, off.gradients) == (on.weights, on.gradients)


def test_tensor_and_sequence_parallel_split_activations_and_logits():
    mem, _ = plan_memory(cfg_of("parallel.tp=2"), dp=1, num_microbatches=4)
    # Vocabulary padded to a multiple of 64 x 2 = 128: still 256; everything /2 except the norm inputs and
    # outputs (the qkv and fc1 inputs), which every TP rank holds in full without sequence parallel.
    act = TOKENS * (2 * (2 * 64 + 128 + 3 * 128) / 2 + 2 * 2 * 64 + 2 * 2 * 64 + 4 * 4 / 2)
    assert mem.activations == pytest.approx(gib(4 * act))
    assert mem.logits == pytest.approx(gib(LOGITS / 2))
    sp, _ = plan_memory(cfg_of("parallel.tp=2", "parallel.sequence_parallel=true"), dp=1, num_microbatches=4)
    assert sp.activations == pytest.approx(gib(4 * TOKENS * ACT_TOKEN / 2))   # norm inputs sharded too


def test_pipeline_first_stage_is_most_loaded_with_small_vocab():
    mem, stage = plan_memory(cfg_of("parallel.pp=2"), dp=1, num_microbatches=4)
    assert stage == "first"
    params = 2 * LAYER + TABLE                                # 2 layers + embedding, no final norm
    assert mem.weights == pytest.approx(gib(2 * params))
    assert mem.activations == pytest.approx(gib(2 * 2 * ACT_LAYER))     # 1F1B: pp=2 micro-batches in flight
    assert mem.logits == 0.0


def test_pipeline_last_stage_wins_with_large_vocab():
    mem, stage = plan_memory(cfg_of("parallel.pp=2", "model.vocab_size=8192"), dp=1, num_microbatches=4)
    assert stage == "last"
    params = 2 * LAYER + 8192 * 64 + 64                       # 2 layers + output layer + final norm
    assert mem.weights == pytest.approx(gib(2 * params))
    assert mem.activations == pytest.approx(gib(1 * 2 * ACT_LAYER))     # the last stage holds 1 micro-batch
    assert mem.logits == pytest.approx(gib(2 * 2 * TOKENS * 8192))


def test_pipeline_tied_embedding_copy_lives_on_last_stage():
    untied, _ = plan_memory(cfg_of("parallel.pp=2", "model.vocab_size=8192"), dp=1, num_microbatches=4)
    tied, stage = plan_memory(cfg_of("parallel.pp=2", "model.vocab_size=8192", "model.tie_embeddings=true"),
                              dp=1, num_microbatches=4)
    assert stage == "last" and tied.weights == untied.weights


def test_interleaved_pipeline_follows_megatron_warmup():
    # pp=2, vp=2, 4 micro-batches: Megatron warms up 2*(pp-rank-1) + (vp-1)*pp chunk passes, holds one more.
    # First stage: 2 + 2 + 1 = 5 chunks of 1 layer = 2.5 micro-batches of the stage's 2 layers.
    # Last stage:  0 + 2 + 1 = 3 chunks = 1.5 micro-batches.
    overrides = ("parallel.pp=2", "parallel.vp=2")
    first, stage = plan_memory(cfg_of(*overrides), dp=1, num_microbatches=4)
    assert stage == "first" and first.activations == pytest.approx(gib(2.5 * 2 * ACT_LAYER))
    last, stage = plan_memory(cfg_of(*overrides, "model.vocab_size=8192"), dp=1, num_microbatches=4)
    assert stage == "last" and last.activations == pytest.approx(gib(1.5 * 2 * ACT_LAYER))


def test_fewer_microbatches_than_stages_caps_in_flight():
    mem, _ = plan_memory(cfg_of("parallel.pp=4"), dp=1, num_microbatches=2)
    assert mem.activations == pytest.approx(gib(2 * 1 * ACT_LAYER))    # min(pp=4, m=2) x 1 layer


def test_full_recompute_keeps_layer_inputs_plus_one_layer():
    mem, _ = plan_memory(cfg_of("train.recompute=full"), dp=1, num_microbatches=4)
    layer_input = 2 * TOKENS * 64                             # bf16 hidden state entering each layer
    assert mem.activations_recompute == pytest.approx(gib(4 * layer_input + ACT_LAYER))
    assert mem.total(recompute=True) == pytest.approx(mem.total(False) - mem.activations + mem.activations_recompute)
    assert "total (with recompute)" in format_plan(cfg_of("train.recompute=full"), 1, 0.4, 989.0)


def test_fp8_adds_weight_and_transpose_copies_of_linear_layers():
    mem, _ = plan_memory(cfg_of("train.fp8=hybrid"), dp=1, num_microbatches=4)
    assert mem.fp8_buffers == pytest.approx(gib(2 * 4 * LINEAR))        # 1-byte weight + 1-byte transpose
    tp2, _ = plan_memory(cfg_of("train.fp8=hybrid", "parallel.tp=2"), dp=1, num_microbatches=4)
    assert tp2.fp8_buffers == pytest.approx(mem.fp8_buffers / 2)


def test_flops_per_token_by_hand():
    # Forward: 2 FLOPs per weight of the dense layers, 2*s*h for QK^T+AV (4*s*h halved for causal masking),
    # 2*h*V_pad for the output layer (its GEMM has the padded 256 columns, as in Megatron-LM's count);
    # training = 3 x forward.
    dense = 64 * 128 + 64 * 64 + 3 * 64 * 128
    expected = 3 * (2 * 4 * (dense + 32 * 64) + 2 * 64 * 256)
    assert flops_per_token(cfg_of().model, 32) == expected == 1032192
    report = format_plan(cfg_of(), 4, 0.5, 100.0)             # 0.5 x 100 TFLOP/s / 1029888 FLOP per token
    assert f"{0.5 * 100e12 / expected:,.0f} tokens/s/GPU" in report
    assert "TP1 x PP1 x CP1 x DP4; 1 micro-batches/step" in report


def test_flops_count_the_output_layer_at_the_vocabulary_padded_for_tp():
    """250 pads to 256 at TP1 and TP2 (multiples of 64 and 128), to 512 at TP8: the output GEMM grows with it."""
    m = cfg_of().model
    assert flops_per_token(m, 32, tp=2) == flops_per_token(m, 32, tp=1)
    assert flops_per_token(m, 32, tp=8) - flops_per_token(m, 32) == 3 * 2 * 64 * (512 - 256)
    report = format_plan(cfg_of("parallel.tp=4"), 4, 0.5, 100.0)   # 250 -> 256 at TP4
    want = 3 * (2 * 4 * (64 * 128 + 64 * 64 + 3 * 64 * 128 + 32 * 64) + 2 * 64 * 256)
    assert f"{0.5 * 100e12 / want:,.0f} tokens/s/GPU" in report


@pytest.mark.parametrize("gpus, gbs, message", [
    (0, 8, "--gpus must be >= 1"),
    (3, 8, "--gpus=3 is not divisible by parallel.tp\\*pp\\*cp = 2"),          # tp=2
    (6, 8, "global_batch_size=8 is not divisible by train.micro_batch_size\\*dp = 2\\*3"),
])
def test_bad_gpus_raise(gpus, gbs, message):
    with pytest.raises(ValueError, match=message):
        format_plan(cfg_of("parallel.tp=2", f"train.global_batch_size={gbs}"), gpus, 0.4, 989.0)


def test_main_reports_bad_gpus_as_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", os.path.join(ROOT, "configs/llama3.1_8b.yaml"), "--gpus", "7"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "world size 7 is not divisible by parallel.tp*pp*cp" in err and "--gpus 7" in err


@pytest.mark.parametrize("gpus, overrides, message", [
    (24, ["parallel.tp=3"], "model.num_attention_heads=32 must be divisible by parallel.tp=3"),
    (8, ["parallel.vp=2"], "parallel.vp=2 (interleaved pipeline) requires parallel.pp > 1, got pp=1"),
    (8, ["train.fp8=hybrid", "train.bf16=false"], "train.fp8='hybrid' requires train.bf16=true"),
    (8, ["train.lrr=1"], "override 'train.lrr': unknown key 'lrr' in section 'train' (did you mean 'lr'?)"),
    (8, ["train.adam_beta1=1.5"], "train.adam_beta1 must be in [0, 1), got 1.5"),
    (8, ["logging.peak_tflops=0"], "logging.peak_tflops must be > 0 or null (auto), got 0.0"),
    (0, [], "world size must be >= 1, got 0"),
])
def test_main_validates_the_config_for_the_gpus_as_the_dry_run_does(gpus, overrides, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", os.path.join(ROOT, "configs/llama3.1_8b.yaml"), "--gpus", str(gpus), *overrides])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"config error: {message}" in err and "Traceback" not in err and "usage:" not in err


def test_main_reports_a_missing_config_file_as_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "nope.yaml"), "--gpus", "8"])
    assert exc.value.code == 2 and "nope.yaml: No such file or directory" in capsys.readouterr().err


def test_main_plans_fp8_without_transformer_engine_and_takes_the_configs_peak(monkeypatch, capsys):
    """plan runs on a laptop: only the Transformer Engine availability check is skipped; the peak defaults to
    logging.peak_tflops (as train --dry-run), --peak-tflops wins."""
    validate_mod = importlib.import_module("bft_megatron.config.validate")
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: False)
    recipe = os.path.join(ROOT, "configs/llama3.1_8b.yaml")
    assert main(["--config", recipe, "--gpus", "8", "train.fp8=hybrid", "logging.peak_tflops=500"]) == 0
    out = capsys.readouterr().out
    assert "of 500 TFLOP/s" in out and "fp8 weight copies" in out
    assert main(["--config", recipe, "--gpus", "8", "--peak-tflops", "700", "logging.peak_tflops=500"]) == 0
    assert "of 700 TFLOP/s" in capsys.readouterr().out
    assert main(["--config", recipe, "--gpus", "8", "logging.peak_tflops=null"]) == 0
    assert "of 989 TFLOP/s" in capsys.readouterr().out
    assert main(["--config", recipe, "--gpus", "8", "train.te_op_fuser=true"]) == 0  # as its --help says:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "train.fp8, train.te_op_fuser and logging.wandb_project do not need Transformer Engine or wandb" in help_text


@pytest.mark.parametrize("mfu", ["0", "1.5", "-0.2"])
def test_main_rejects_an_mfu_outside_0_1(capsys, mfu):
    with pytest.raises(SystemExit) as exc:
        main(["--config", os.path.join(ROOT, "configs/llama3.1_8b.yaml"), "--gpus", "8", "--mfu", mfu])
    assert exc.value.code == 2 and f"--mfu must be in (0, 1], got {float(mfu)}" in capsys.readouterr().err


def test_gflop_per_token_keeps_three_digits_for_tiny_models():
    from bft_megatron.config.plan import _gflop

    assert [_gflop(x) for x in (433.24e9, 51.46e9, 10e9, 7.571e6, 0.0)] == ["433.2", "51.5", "10.0", "0.00757", "0"]
    plan = format_plan(load_config(os.path.join(ROOT, "configs/demo_cpu.yaml"), []), 1, 0.4, 989.0)
    assert "tokens/s/GPU (0.00757 GFLOP/token)" in plan  # the demo model printed 0.0


def test_cli_plan_subprocess():
    cmd = [sys.executable, "-m", "bft_megatron.cli", "plan", "--config", "configs/llama3.1_8b.yaml", "--gpus", "8",
           "--mfu", "0.5", "train.recompute=full"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8 GPUs = TP2 x PP1 x CP1 x DP4; 16 micro-batches/step; params 8.03 B" in out
    assert "total (with recompute)" in out and "at MFU 0.50" in out and "tokens/s/GPU (51.5 GFLOP/token)" in out
    total = float(out.split("total (with recompute)")[1].split("GiB")[0])
    assert math.isfinite(total) and 30 < total < 50


@pytest.mark.parametrize("gpus, m, bubble, pct", [(32, 64, 3 / 64, "4.69%"), (64, 32, 3 / 32, "9.38%"),
                                                  (128, 16, 3 / 16, "18.8%"), (256, 8, 3 / 8, "37.5%")])
def test_pipeline_bubble_of_the_pp4_recipe_divides_its_throughput(gpus, m, bubble, pct):
    """TP8 x PP4, gbs 64: m = 64/DP micro-batches per step, 1F1B bubble (pp-1)/m (docs/launch.md's table); the
    assumed MFU is of the busy time, so tokens/s/GPU = MFU * peak / F / (1 + bubble)."""
    cfg = load_config(os.path.join(ROOT, "configs/llama3.1_70b_tp8pp4.yaml"))
    report, busy = format_plan(cfg, gpus, 0.4, 989.0), 0.4 * 989e12 / flops_per_token(cfg.model, 8192, 8)  # 881
    assert pipeline_bubble(cfg.parallel, m) == pytest.approx(bubble) and f"{m} micro-batches/step" in report
    assert f"pipeline bubble: {pct} of the ideal step time ((pp-1)/(vp*m) = 3/{m})" in report
    assert f"{busy / (1 + bubble):,.0f} tokens/s/GPU" in report                  # 841 at 32 GPUs, 640 at 256
    assert f"the MFU is of the busy time: {busy:,.0f} / (1 + bubble 3/{m})" in report
    assert ("warning: the pipeline bubble" in report) == (bubble > 0.10) and "never full" not in report
    if bubble > 0.10:                                                              # m = 60: bubble 3/60 = 5%
        assert f"raise train.global_batch_size (to {60 * gpus // 32}: 60 micro-batches, bubble 5%)" in report


def test_interleaving_divides_the_bubble_by_vp():
    cfg = load_config(os.path.join(ROOT, "configs/llama3.1_70b_tp4pp4vp5_fp8.yaml"))   # PP4 x VP5, DP2: m = 32
    assert pipeline_bubble(cfg.parallel, 32) == pytest.approx(3 / 160)
    report, busy = format_plan(cfg, 32, 0.4, 989.0), 0.4 * 989e12 / flops_per_token(cfg.model, 4096, 4)
    assert "((pp-1)/(vp*m) = 3/160)" in report and f"{busy / (1 + 3 / 160):,.0f} tokens/s/GPU" in report
    wide = format_plan(cfg, 256, 0.4, 989.0)             # DP16: m = 4, 3/20; m >= 20*3/5 = 12, a multiple of pp
    assert "bubble (15%) is over 10%" in wide and "(to 192: 12 micro-batches, bubble 5%) or raise parallel.vp" in wide


def test_fewer_micro_batches_than_stages_warn_that_the_pipeline_never_fills():
    cfg = load_config(os.path.join(ROOT, "configs/llama3.1_70b_tp8pp4.yaml"), ["train.global_batch_size=2"])
    report, busy = format_plan(cfg, 32, 0.4, 989.0), 0.4 * 989e12 / flops_per_token(cfg.model, 8192, 8)
    assert "pipeline bubble: 150% of the ideal step time ((pp-1)/(vp*m) = 3/2)" in report
    assert f"{busy / 2.5:,.0f} tokens/s/GPU" in report                          # 881 / (1 + 3/2) = 352
    assert "warning: only 2 micro-batches/step for 4 pipeline stages: the pipeline is never full" in report
    assert report.count("warning:") == 1 and "parallel.vp" not in report     # interleaving needs m % pp == 0


def test_no_bubble_without_a_pipeline():
    cfg = load_config(os.path.join(ROOT, "configs/llama3.1_8b.yaml"))            # TP2 x DP64, gbs 64: m = 1
    report = format_plan(cfg, 128, 0.4, 989.0)
    assert pipeline_bubble(cfg.parallel, 1) == 0.0 and "1 micro-batches/step" in report
    assert "bubble" not in report and "warning" not in report and "tokens/s/GPU (51.5 GFLOP/token)\n" in report


RECIPES = {"llama3.1_8b.yaml": 8, "llama3.1_8b_32k_cp4.yaml": 8, "llama3.1_70b_tp8pp4.yaml": 32, "phi4.yaml": 8,
           "llama3.1_70b_tp4pp4vp5_fp8.yaml": 32, "qwen2.5_72b.yaml": 32, "qwen3_32b.yaml": 16, "medgemma27b.yaml": 16}


@pytest.mark.parametrize("name, gpus", sorted(RECIPES.items()))
def test_recipes_validate_fit_and_state_their_plan(name, gpus, monkeypatch):
    """Each recipe validates at its GPU count (TE assumed present for FP8), fits an 80 GB H100 with margin,
    and its header quotes the planner's current total (so the comment cannot drift from the planner)."""
    validate_mod = importlib.import_module("bft_megatron.config.validate")   # the package exports the function
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: True)
    path = os.path.join(ROOT, "configs", name)
    cfg = load_config(path)
    layout = validate_mod.validate(cfg, gpus)
    mem, _ = plan_memory(cfg, layout.dp, layout.num_microbatches)
    total = mem.total(cfg.train.recompute == "full")
    assert total < 75.0
    with open(path, encoding="utf-8") as fh:
        header = fh.read().split("\nmodel:", 1)[0]
    assert f"GPUs: {gpus} = " in header and f"{total:.1f} GiB planned" in header
    assert "tokens/s/GPU" in header
    assert (cfg.loss.method, cfg.loss.variant, cfg.loss.group_size) == ("bft", "v1", 256)
    assert cfg.train.exit_duration_minutes and cfg.checkpoint.save_interval and cfg.logging.tensorboard_dir
    assert cfg.parallel.distributed_optimizer and cfg.train.bf16 and cfg.data.packing


def test_grown_row_length_scales_the_token_terms():
    """CP pads packed samples, growing rows past data.seq_length: the trainer re-plans with the measured
    length; only the token-proportional terms (activations, logits) grow, linearly."""
    cfg = load_config(os.path.join(ROOT, "configs/llama3.1_8b_32k_cp4.yaml"))
    seq = cfg.data.seq_length
    base, _ = plan_memory(cfg, 1, 8)
    same, _ = plan_memory(cfg, 1, 8, seq_length=None)
    grown, _ = plan_memory(cfg, 1, 8, seq_length=seq * 1.1)
    assert same == base
    assert (grown.weights, grown.gradients, grown.optimizer) == (base.weights, base.gradients, base.optimizer)
    assert grown.activations == pytest.approx(base.activations * 1.1, rel=1e-9)
    assert grown.logits == pytest.approx(base.logits * 1.1, rel=1e-9)
    assert grown.total(False) > base.total(False)


@pytest.mark.parametrize("cp, packing, noted", [(1, True, False), (2, True, True), (2, False, False)])
def test_plan_notes_that_packed_rows_grow_under_cp(cp, packing, noted):
    """The dry-run's plan is at data.seq_length; under CP with packing it says rows grow (2*CP-1 per sample)."""
    report = format_plan(cfg_of(f"parallel.cp={cp}", f"data.packing={packing}"), 2 * cp, 0.4, 989.0)
    assert ("grow past data.seq_length by up to 3 tokens per sample (plus rounding to a multiple of 32)"
            in report) == noted


def test_bf16_gradient_buffers_halve_the_gradient_memory():
    fp32, _ = plan_memory(cfg_of("train.bf16=true"), dp=1, num_microbatches=1)
    bf16, _ = plan_memory(cfg_of("train.bf16=true", "parallel.grad_reduce_in_fp32=false"), dp=1, num_microbatches=1)
    assert bf16.gradients == pytest.approx(fp32.gradients / 2)
    assert (bf16.weights, bf16.optimizer) == (fp32.weights, fp32.optimizer)
    fp32_run, _ = plan_memory(cfg_of("train.bf16=false", "parallel.grad_reduce_in_fp32=false"), dp=1,
                              num_microbatches=1)
    assert fp32_run.gradients == fp32.gradients  # the buffers follow the parameters' dtype


def test_fp32_runs_plan_fp32_weights_and_activations_and_no_master_copy():
    """train.bf16=false: 4-byte weights, gradients and activations/logits; the optimizer holds only Adam's two
    fp32 moments (the fp32 weights are the master weights)."""
    bf16, _ = plan_memory(cfg_of(), dp=2, num_microbatches=2)
    fp32, _ = plan_memory(cfg_of("train.bf16=false"), dp=2, num_microbatches=2)
    params = 4 * LAYER + 2 * TABLE + 64
    assert fp32.weights == pytest.approx(gib(4 * params)) and fp32.gradients == pytest.approx(gib(4 * params))
    assert fp32.optimizer == pytest.approx(gib(8 * params / 2))
    assert fp32.activations == pytest.approx(2 * bf16.activations) and fp32.logits == pytest.approx(2 * bf16.logits)
    out = format_plan(cfg_of("train.bf16=false"), 2, 0.4, 989.0)
    assert "params 0.18 M" in out and "weights (fp32)" in out and "optimizer (Adam moments" in out
    assert "weights (bf16)" in format_plan(cfg_of(), 2, 0.4, 989.0)
