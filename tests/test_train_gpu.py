"""GPU checks of the trainer with Transformer Engine (run on the device machine; skipped on CPU).

* THD packing: logits of a packed micro-batch through TE's THD attention equal those of each sample
  run alone (no attention across samples), bf16 tolerance; also for Gemma 3's sliding-window layers and
  a Mistral window narrower than the rows.
* A short BF16 BFT run with the TE spec and THD packing trains (lm loss falls) and its checkpoint
  resumes bitwise at the same layout; FP8 (tensorwise) runs finite.
* The output layer on supervised rows only (default) gives every-row's first-step loss and gradient norm.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

GPU_TINY = ["model.hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=384", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
            "data.seq_length=128", "data.packing=true", "train.global_batch_size=16", "train.micro_batch_size=4",
            "train.lr=3e-3", "train.warmup_iters=5", "train.train_iters=30", "train.bf16=true", "loss.group_size=16"]


@pytest.fixture(scope="module")
def groups():
    from bft_megatron.parallel import bootstrap

    os.environ.setdefault("MASTER_PORT", "29533")
    g = bootstrap.initialize(seed=1234)
    yield g
    bootstrap.destroy(keep_process_group=True)


def _trainer(groups, extra=()):
    from bft_megatron.config import load_config, validate
    from bft_megatron.training.build import build_trainer

    cfg = load_config(None, GPU_TINY + list(extra))
    return build_trainer(cfg, validate(cfg, 1), groups)


# Gemma 3 (tests/test_train_gemma3.py's shape on GPU_TINY): every other layer slides a 16-token window, so TE's
# fused attention must apply the window within each packed sample (cu_seqlens) and not across them.
GEMMA3 = ["model.family=gemma3", "model.qk_norm=true", "model.sliding_window=16", "model.sliding_window_pattern=2",
          "model.rope_local_theta=10000", "model.rope_theta=1000000", "model.rope_linear_factor=8",
          "model.query_pre_attn_scalar=32", "model.tie_embeddings=true"]


MISTRAL_WINDOW = ["model.family=mistral", "model.sliding_window=16"]  # every layer slides (rows of 128)


def _packed_micro_batch(trainer, groups, **kwargs):
    """The trainer's first two training rows packed into one THD micro-batch on the GPU."""
    from bft_megatron.data.collate import collate
    from bft_megatron.training.batch import to_micro_batch

    dataset = trainer.train_data.dataset
    return to_micro_batch(collate([dataset[i] for i in range(2)], packed=True, pad_id=dataset.pad_id), groups.device,
                          total=2 * trainer.cfg.data.seq_length, pad_id=dataset.pad_id, **kwargs)


@pytest.mark.parametrize("family", [[], GEMMA3, MISTRAL_WINDOW], ids=["llama", "gemma3", "mistral_window"])
def test_thd_packing_matches_samples_alone(groups, family):
    trainer = _trainer(groups, family)
    model = trainer.model[0]
    mb = _packed_micro_batch(trainer, groups)
    with torch.no_grad():
        packed = model(mb.tokens.reshape(1, -1), mb.position_ids.reshape(1, -1), None,
                       packed_seq_params=mb.packed_seq_params())[0].float()
        cu = mb.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            toks = mb.tokens.reshape(1, -1)[:, a:b]
            pos = torch.arange(b - a, device=groups.device).unsqueeze(0)
            alone = model(toks, pos, None)[0].float()
            torch.testing.assert_close(packed[a:b], alone, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("async_save, optimizer_format", [(False, "fully_reshardable"), (True, "fully_reshardable"),
                                                         (False, "dp_reshardable")])
def test_bf16_bft_trains_and_resumes(groups, tmp_path, async_save, optimizer_format):
    """Bitwise resume from a mid-run checkpoint, written synchronously or by megatron's async writer, with either
    optimizer format (TE's FusedAdam here, torch Adam in the CPU tests)."""
    from bft_megatron.checkpoint import Checkpointer
    from bft_megatron.training.fit import fit

    save = [f"checkpoint.save={tmp_path}", "checkpoint.save_interval=20", f"checkpoint.async_save={async_save}",
            f"checkpoint.optimizer_format={optimizer_format}"]
    trainer = _trainer(groups, save)
    fit(trainer, Checkpointer(trainer.cfg, groups))
    hist = trainer.state.history
    assert hist[-1]["lm_loss"] < 0.7 * hist[0]["lm_loss"], [h["lm_loss"] for h in hist]
    # No checkpoint.save here: a run resumes its own save dir's `latest` (iteration 30) before checkpoint.load.
    resumed = _trainer(groups, [f"checkpoint.load={tmp_path}/iter_0000020"])
    ck = Checkpointer(resumed.cfg, groups)
    assert ck.load(resumed)
    fit(resumed, None)
    assert [h["loss"] for h in resumed.state.history] == [h["loss"] for h in hist[20:]]


def test_fp8_tensorwise_runs(groups):
    from bft_megatron.training.fit import fit

    trainer = _trainer(groups, ["train.fp8=hybrid", "train.fp8_recipe=tensorwise", "train.train_iters=5"])
    fit(trainer, None)
    assert all(h["loss"] == h["loss"] for h in trainer.state.history)


def _reseeded_trainer(groups, extra):
    """A trainer whose weights are initialised from the same RNG state as every other call's."""
    from megatron.core import tensor_parallel

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return _trainer(groups, list(extra))


def test_te_performance_options_keep_parameters_and_losses(groups):
    """gradient_accumulation_fusion (TE layers write main_grad; without apex the output layer through
    TorchWgradAccum) and te_op_fuser (TEFusedMLP) change kernels, not the model: same parameter names, same
    losses (bf16)."""
    from megatron.core.extensions.transformer_engine import TEFusedMLP

    from bft_megatron.training.fit import fit

    steps = ["train.train_iters=6", "train.warmup_iters=1", "loss.method=sft"]
    base = _reseeded_trainer(groups, steps + ["train.gradient_accumulation_fusion=false"])
    fast = _reseeded_trainer(groups, steps + ["train.gradient_accumulation_fusion=true", "train.te_op_fuser=true"])
    names = [n for n, _ in base.model[0].named_parameters()]
    assert names == [n for n, _ in fast.model[0].named_parameters()]
    assert isinstance(fast.model[0].module.module.decoder.layers[0].mlp, TEFusedMLP)
    assert fast.tconfig.gradient_accumulation_fusion and not base.tconfig.gradient_accumulation_fusion
    assert fast.model[0].module.module.output_layer.gradient_accumulation_fusion
    fit(base, None)
    fit(fast, None)
    want = [h["loss"] for h in base.state.history]
    got = [h["loss"] for h in fast.state.history]
    assert want[-1] < 0.9 * want[0], want  # SFT learns, so a gradient that went missing would show
    assert got == pytest.approx(want, rel=2e-2), (got, want)


def test_torch_wgrad_accum_adds_the_weight_gradient_into_main_grad():
    """The apex stand-in for the output layer: ``main_grad += grad_output^T @ input`` in place, bf16 inputs
    accumulated in fp32 (equal to the fp32 product up to summation order)."""
    from bft_megatron.model.wgrad import TorchWgradAccum, torch_wgrad_accum_available

    assert torch_wgrad_accum_available()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(512, 1000, device="cuda", generator=gen).bfloat16()
    main = torch.randn(1000, 256, device="cuda", generator=gen)
    want = main + dy.float().t() @ x.float()
    ptr = main.data_ptr()
    TorchWgradAccum.wgrad_gemm_accum_fp32(x, dy, main)
    assert main.data_ptr() == ptr
    torch.testing.assert_close(main, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("tie", [False, True])
def test_fused_output_layer_wgrad_gives_the_unfused_gradients(groups, tie):
    """The output layer's weight gradient through TorchWgradAccum (and TE's fused accumulation elsewhere) equals
    the unfused gradients after one step: untied, and tied, where the embedding's own gradient must survive
    next to the output layer's (megatron's ``zero_out_wgrad`` dummy; a lost half would be a large error)."""
    extra = ["train.train_iters=1", "train.warmup_iters=0", "loss.method=sft", f"model.tie_embeddings={tie}"]
    grads = []
    for fused in (False, True):
        trainer = _reseeded_trainer(groups, extra + [f"train.gradient_accumulation_fusion={fused}"])
        assert trainer.model[0].module.module.output_layer.gradient_accumulation_fusion == fused
        trainer.train_step()
        named = dict(trainer.model[0].module.module.named_parameters())
        keys = ["embedding.word_embeddings.weight"] + ([] if tie else ["output_layer.weight"])
        grads.append({k: named[k].main_grad.float().clone() for k in keys})
    for key, want in grads[0].items():
        got = grads[1][key]
        rel = float((got - want).norm() / want.norm())
        assert want.norm() > 0 and rel < 1e-2, (key, rel)


def test_bf16_gradient_buffers_train_like_fp32(groups):
    """parallel.grad_reduce_in_fp32=false: megatron's DDP keeps bf16 gradient buffers (half the memory) and the
    run trains like one with fp32 buffers (bf16 tolerance); the fused weight-gradient paths (TE, the output
    layer's TorchWgradAccum, the embedding's index_put_) then accumulate in bf16."""
    from bft_megatron.training.fit import fit

    steps = ["train.train_iters=6", "train.warmup_iters=1", "loss.method=sft"]
    base = _reseeded_trainer(groups, steps)
    half = _reseeded_trainer(groups, steps + ["parallel.grad_reduce_in_fp32=false"])
    assert base.model[0].buffers[0].grad_data.dtype == torch.float32
    assert half.model[0].buffers[0].grad_data.dtype == torch.bfloat16
    fit(base, None)
    fit(half, None)
    want = [h["loss"] for h in base.state.history]
    got = [h["loss"] for h in half.state.history]
    assert want[-1] < 0.9 * want[0], want
    assert got == pytest.approx(want, rel=2e-2), (got, want)


def _fused_mlp_linears(trainer):
    from bft_megatron.model.te_fused_mlp import _StepCachedLinear

    layers = trainer.model[0].module.module.decoder.layers
    return [op for layer in layers for op in layer.mlp._fused_impl[0] if isinstance(op, _StepCachedLinear)]


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fused_mlp_casts_fp8_weights_once_per_step(groups, recipe):
    """te_op_fuser + FP8: fc1 / fc2 are quantized at each step's first micro-batch only (4 micro-batches a
    step here) and the losses equal those of a run that casts every weight for every micro-batch
    (fp8_weight_cache=false). Tensorwise casts of the same weights are the same bits, so the losses must match
    exactly; a copy kept across an optimizer step would have trained on old weights and shown. Delayed
    scaling may pick another scale for the later micro-batches' casts: close, not equal (as TE's Linear)."""
    from bft_megatron.training.fit import fit

    steps = ["train.train_iters=5", "train.warmup_iters=1", "loss.method=sft", "train.fp8=hybrid",
             f"train.fp8_recipe={recipe}", "train.te_op_fuser=true"]
    base = _reseeded_trainer(groups, steps + ["train.fp8_weight_cache=false"])
    fast = _reseeded_trainer(groups, steps)
    fit(base, None)
    fit(fast, None)
    assert not _fused_mlp_linears(base)  # the uncached run keeps TE's own BasicLinear
    linears = _fused_mlp_linears(fast)
    assert len(linears) == 2 * 2 and all(op.casts == 5 for op in linears), [op.casts for op in linears]
    want = [h["loss"] for h in base.state.history]
    got = [h["loss"] for h in fast.state.history]
    assert want[-1] < 0.9 * want[0], want
    if recipe == "tensorwise":
        assert got == want
    else:
        assert got == pytest.approx(want, rel=2e-2), (got, want)


def test_supervised_logits_only_matches_every_row_under_te(groups):
    """The output layer on supervised rows only (the default) against every row, BF16 under TE with THD packing:
    each kept row's logits are the every-row logits at its position (so labels pair with the right rows); from
    the same initial weights the first step's loss and gradient norm agree to bf16 GEMM tolerance (other row
    counts may pick other cuBLAS kernels), and training with it still lowers the CE mean."""
    from bft_megatron.training.fit import fit
    from bft_megatron.training.logit_rows import selecting_rows

    steps = ["train.train_iters=3", "train.warmup_iters=1"]
    runs = [_reseeded_trainer(groups, [f"train.supervised_logits_only={flag}"] + steps) for flag in (True, False)]
    model = runs[0].model[0]
    mb = _packed_micro_batch(runs[0], groups, logit_rows=(1, 0))
    args = (mb.tokens.reshape(1, -1), mb.position_ids.reshape(1, -1), None)
    with torch.no_grad():
        full = model(*args, packed_seq_params=mb.packed_seq_params())[0].float()  # [T, V]
        with selecting_rows(model, mb.logit_rows):
            picked = model(*args, packed_seq_params=mb.packed_seq_params())[0].float()  # [n, V]
    kept = mb.logit_positions < full.shape[0]
    assert int(kept.sum()) == int(mb.loss_mask.sum()) > 0
    torch.testing.assert_close(picked[kept], full[mb.logit_positions[kept]], atol=3e-2, rtol=3e-2)
    for trainer in runs:
        fit(trainer, None)
    selected, every = (trainer.state.history for trainer in runs)
    assert selected[0]["loss"] == pytest.approx(every[0]["loss"], rel=5e-3)
    assert selected[0]["lm_loss"] == pytest.approx(every[0]["lm_loss"], rel=5e-3)
    assert selected[0]["grad_norm"] == pytest.approx(every[0]["grad_norm"], rel=2e-2)
    assert selected[-1]["lm_loss"] < selected[0]["lm_loss"]
