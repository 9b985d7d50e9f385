"""The model's building blocks on CPU, without building a GPTModel: RMSNorm against transformers' LlamaRMSNorm
(small, large and bf16 inputs), the TransformerConfig the config maps to (the settings the CPU logits and
layout tests cannot see: recompute, dropout, sequence parallel, per-token loss, dtypes), and the local
(no Transformer Engine) layer spec.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from bft_megatron.config.schema import load_config
from bft_megatron.model import spec
from bft_megatron.model.builder import transformer_config
from bft_megatron.model.layers import RMSNorm
from tests.data_fixtures import logged

TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "train.bf16=false"]
CPU = SimpleNamespace(device=torch.device("cpu"), vp_size=None)  # what transformer_config reads of the groups


def _reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (statistics in fp32, normalised value cast back, then the weight)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(weight.numel(), eps=eps).to(weight.dtype)
    with torch.no_grad():
        ref.weight.copy_(weight)
        return ref(x)


def _norm(hidden: int, eps: float, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(SimpleNamespace(params_dtype=dtype, sequence_parallel=False), hidden, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.2 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rmsnorm_matches_llama_rmsnorm_where_eps_matters(scale):
    """At scale 1e-3 the mean square (~1e-6) is the size of eps: eps must sit inside the square root."""
    torch.manual_seed(1)
    norm = _norm(32, 1e-6, torch.float32)
    x = scale * torch.randn(5, 32)
    with torch.no_grad():
        got = norm(x)
    want = _reference_rmsnorm(x, norm.weight.detach(), 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_rmsnorm_bf16_keeps_the_dtype_and_fp32_statistics():
    """bf16 in, bf16 out, and bit for bit what LlamaRMSNorm gives (its statistics are in fp32 too); computing
    the mean square in bf16 would change many elements by a bf16 ulp or more."""
    torch.manual_seed(2)
    norm = _norm(256, 1e-5, torch.bfloat16)
    x = (3.0 * torch.randn(16, 256)).to(torch.bfloat16)
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _reference_rmsnorm(x, norm.weight.detach(), 1e-5))


def test_transformer_config_carries_the_training_settings():
    tc = transformer_config(load_config(None, TINY + ["train.recompute=full", "train.dropout=0.1"]), CPU)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    assert tc.hidden_dropout == tc.attention_dropout == 0.1
    # the loss returns (sum, units): megatron must divide by the global unit count, not per micro-batch
    assert tc.calculate_per_token_loss is True
    # Llama blocks: GQA groups, head_dim = hidden / heads, SwiGLU, no linear biases, fp32 softmax
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 16)
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu and not tc.add_bias_linear
    assert tc.normalization == "RMSNorm" and tc.attention_softmax_in_fp32
    assert tc.params_dtype == tc.pipeline_dtype == torch.float32 and not tc.bf16
    selective = transformer_config(load_config(None, TINY + ["train.recompute=selective"]), CPU)
    assert selective.recompute_granularity == "selective"
    assert transformer_config(load_config(None, TINY), CPU).recompute_granularity is None


def test_transformer_config_parallel_and_precision():
    cfg = load_config(None, TINY + ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2",
                                    "model.qkv_bias=true", "model.family=qwen2", "model.norm_epsilon=1e-6",
                                    "train.bf16=true"])
    tc = transformer_config(cfg, CPU)
    assert tc.sequence_parallel and tc.tensor_model_parallel_size == 2 and tc.context_parallel_size == 2
    assert tc.add_qkv_bias and tc.layernorm_epsilon == 1e-6
    assert tc.bf16 and tc.params_dtype == tc.pipeline_dtype == torch.bfloat16
    # CPU: no CUDA-only fusions (they would fail or be silently different there)
    assert not (tc.gradient_accumulation_fusion or tc.apply_rope_fusion or tc.masked_softmax_fusion)
    assert tc.use_cpu_initialization


def test_local_spec_uses_our_rmsnorm_and_reference_attention(monkeypatch):
    """Without TE: every norm is our (sequence-parallel capable) RMSNorm, not megatron's WrappedTorchNorm
    (which refuses SP), and core attention is ReferenceAttention (THD packing, CP); warned once per process."""
    from bft_megatron.model.reference_attention import ReferenceAttention

    monkeypatch.setitem(spec._WARNED, "local", False)
    tc = transformer_config(load_config(None, TINY), CPU)
    with logged(logging.WARNING) as records:
        block = spec.block_spec(tc, use_te=False, vp_stage=None, pp_rank=0)
        spec.block_spec(tc, use_te=False, vp_stage=None, pp_rank=0)
    assert len([r for r in records if "Transformer Engine not importable" in r.getMessage()]) == 1
    assert len(block.layer_specs) == 4 and block.layer_norm is RMSNorm
    for layer in block.layer_specs:
        sub = layer.submodules
        assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
        assert sub.self_attention.submodules.core_attention is ReferenceAttention


def test_gpt_model_gets_the_exact_rope_theta(monkeypatch):
    """A non-integer ``rope_theta`` reaches megatron's RotaryEmbedding unrounded: its inverse frequencies equal
    HF's ``1 / theta ** (2i / d)`` (an ``int(theta)`` would shift every frequency)."""
    import megatron.core.models.gpt as gpt
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from bft_megatron.model.builder import _gpt_model

    captured = {}
    monkeypatch.setattr(gpt, "GPTModel", lambda **kw: captured.update(kw))
    cfg = load_config(None, TINY + ["model.rope_theta=12345.75"])
    _gpt_model(cfg, None, None, SimpleNamespace(tp_size=1, pg_collection=None), None, True, True)
    inv = RotaryEmbedding(16, 1.0, rotary_base=captured["rotary_base"], use_cpu_initialization=True).inv_freq
    want = 1.0 / (12345.75 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    assert torch.allclose(inv, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cudnn, flash, dropout, packed, problem", [
    (90600, None, 0.0, True, None),            # cuDNN's fused attention takes the window on packed rows
    (90500, None, 0.0, True, "cuDNN 90500 (a window on packed rows needs >= 90600)"),
    (90500, None, 0.0, False, None),           # padded rows: 9.2 is enough
    (90100, None, 0.0, False, "cuDNN 90100 (a window on padded rows needs >= 90200)"),
    (91000, None, 0.1, True, "train.dropout=0.1 (TE's fused attention takes a window only without attention"),
    (91000, "2.7.4", 0.1, True, None),         # flash-attn takes over
    (None, "2.2.0", 0.0, True, "no flash-attn >= 2.3 (found 2.2.0)"),
])
def test_window_backend_problem_names_what_is_missing(cudnn, flash, dropout, packed, problem):
    """Review: TE's fused attention has a window only from cuDNN 9.2 (padded) / 9.6 (THD) and without attention
    dropout; otherwise flash-attn >= 2.3, or the first forward fails (no backend)."""
    from bft_megatron.model.spec import window_backend_problem

    got = window_backend_problem(cudnn, flash, dropout, packed)
    assert got is None if problem is None else problem in got


def test_fp8_weight_cache_maps_to_megatron_and_the_plan():
    """``train.fp8_weight_cache`` (default on) is megatron's ``disable_parameter_transpose_cache`` inverted (TE's
    Linear and our fused MLP read it); the planner keeps both FP8 copies of every linear weight for the step
    with it, and one (column-wise, for the backward pass) per micro-batch in flight without it."""
    from bft_megatron.config.plan import GIB, plan_memory

    fp8 = ["train.fp8=hybrid", "train.bf16=true"]
    assert transformer_config(load_config(None, TINY + fp8), CPU).disable_parameter_transpose_cache is False
    off = load_config(None, TINY + fp8 + ["train.fp8_weight_cache=false"])
    assert transformer_config(off, CPU).disable_parameter_transpose_cache is True
    linear = 4 * (64 * 128 + 64 * 64 + 3 * 64 * 128)  # TINY: 4 layers of QKV, projection, SwiGLU fc1 + fc2
    cached, _ = plan_memory(load_config(None, TINY + fp8), dp=1, num_microbatches=4)
    assert cached.fp8_buffers == pytest.approx(2 * linear / GIB)
    assert plan_memory(off, dp=1, num_microbatches=4)[0].fp8_buffers == pytest.approx(linear / GIB)
    pp = ["parallel.pp=2", "model.num_layers=4"]  # first stage of 1F1B: 2 micro-batches in flight, 2 layers
    first, _ = plan_memory(load_config(None, TINY + fp8 + pp + ["train.fp8_weight_cache=false"]), dp=1,
                           num_microbatches=4)
    assert first.fp8_buffers == pytest.approx(2 * (linear / 2) / GIB)


class _FusedMLP:  # stands in for megatron's TEFusedMLP (None without Transformer Engine)
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    @classmethod
    def as_mlp_submodule(cls, submodules, config):
        return cls(submodules=submodules, config=config)


class _CachedMLP(_FusedMLP):
    pass


def test_swap_mlp_class_in_both_spec_spellings():
    """te_op_fuser's MLP class swap works on megatron-core <= 0.18's ``ModuleSpec(module=TEFusedMLP)`` and on
    0.19's ``partial(TEFusedMLP.as_mlp_submodule, submodules=...)``; anything else is refused by name."""
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    old = SimpleNamespace(submodules=SimpleNamespace(mlp=ModuleSpec(module=_FusedMLP, submodules="subs")))
    spec.swap_mlp_class(old, _FusedMLP, _CachedMLP)
    assert old.submodules.mlp.module is _CachedMLP and old.submodules.mlp.submodules == "subs"
    new = SimpleNamespace(submodules=SimpleNamespace(mlp=functools.partial(_FusedMLP.as_mlp_submodule, submodules="s")))
    spec.swap_mlp_class(new, _FusedMLP, _CachedMLP)
    built = new.submodules.mlp(config="c")
    assert type(built) is _CachedMLP and built.kwargs == {"submodules": "s", "config": "c"}
    other = SimpleNamespace(submodules=SimpleNamespace(mlp=ModuleSpec(module=dict)))
    with pytest.raises(RuntimeError, match="builds the MLP with .* not _FusedMLP"):
        spec.swap_mlp_class(other, _FusedMLP, _CachedMLP)
