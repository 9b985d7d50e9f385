"""Build megatron-core ``GPTModel`` chunks (Llama-3.x / Qwen2.x / Qwen3 / Mistral / Phi3 / Gemma3) from the typed
config.

One chunk per virtual pipeline stage (``parallel.vp``; one chunk without interleaving). Chunk ``i``
of pipeline rank ``r`` holds the embedding iff ``r == 0 and i == 0`` and the output layer iff
``r == pp-1 and i == vp-1``; megatron computes each chunk's layer offset from ``vp_stage``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bft_megatron.config.schema import Config, padded_vocab_size
from bft_megatron.model.layers import llama3_inv_freq, longrope_inv_freq, yarn_inv_freq
from bft_megatron.model.rotary_scale import install_rotary_attention_factor
from bft_megatron.model.spec import block_spec, have_te, warn_window_backend
from bft_megatron.model.wgrad import fuse_embedding_wgrad, output_layer_without_apex, unfuse_output_layer
from bft_megatron.parallel.bootstrap import ParallelGroups

__all__ = ["transformer_config", "build_model_chunks", "padded_vocab_size"]


def _precision_kwargs(cfg: Config, on_cpu: bool) -> dict:
    t = cfg.train
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    kw = dict(bf16=t.bf16, params_dtype=dtype, pipeline_dtype=dtype)
    if t.fp8 is not None:
        kw.update(fp8=t.fp8, fp8_recipe=t.fp8_recipe, disable_parameter_transpose_cache=not t.fp8_weight_cache)
    return kw


def _recompute_kwargs(cfg: Config) -> dict:
    if cfg.train.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if cfg.train.recompute == "selective":
        return dict(recompute_granularity="selective")
    return {}


def _grad_accum_fusion(cfg: Config, on_cpu: bool) -> bool:
    return bool(cfg.train.gradient_accumulation_fusion) and not on_cpu and have_te()


def transformer_config(cfg: Config, groups: ParallelGroups):
    """megatron ``TransformerConfig`` for ``cfg``: Llama-style blocks, per-token loss contract."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = cfg.model, cfg.parallel
    on_cpu = groups.device.type == "cpu"
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_groups, ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels, qk_layernorm=m.qk_norm,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        hidden_dropout=cfg.train.dropout, attention_dropout=cfg.train.dropout,
        init_method_std=m.init_method_std, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=groups.vp_size, context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel,
        # The loss returns a sum (already divided by the step's global units, training/step.py) and a unit count;
        # this keeps the schedule from dividing by the units or the micro-batch count.
        calculate_per_token_loss=True,
        # CUDA-only fusions off on CPU; gradient accumulation fusion: TE layers only (see _build_chunk).
        gradient_accumulation_fusion=_grad_accum_fusion(cfg, on_cpu), use_cpu_initialization=on_cpu,
        bias_activation_fusion=not on_cpu, bias_dropout_fusion=not on_cpu,
        # TE's fused RoPE; megatron's unfused THD path syncs the host per packed sample (.item() in a loop).
        apply_rope_fusion=not on_cpu and have_te(),
        masked_softmax_fusion=not on_cpu, persist_layer_norm=False, cross_entropy_loss_fusion=False,
        batch_p2p_sync=not on_cpu, deallocate_pipeline_outputs=True,
        **_precision_kwargs(cfg, on_cpu), **_recompute_kwargs(cfg),
    )
    if m.family == "gemma3":  # norms, activation, softmax scale and windows (see model/gemma3.py)
        from bft_megatron.model.gemma3 import gemma3_config_kwargs

        kwargs.update(gemma3_config_kwargs(m, cfg.data.seq_length))
    elif m.window_binds(cfg.data.seq_length):
        # Mistral / Phi3: every layer sees the last W keys (HF: i-W < j <= i; megatron/TE: inclusive (W-1, 0)). Set
        # only where a sample can outgrow it: below, the window changes nothing and TE keeps its causal kernels.
        kwargs.update(window_size=(m.sliding_window - 1, 0), window_attn_skip_freq=None)
    if m.window_binds(cfg.data.seq_length) and p.cp > 1:
        # TE's p2p CP ring has no sliding-window attention; its all-to-all CP has (config/validate.py::_check_window)
        kwargs["cp_comm_type"] = "a2a"
    if m.rope_scaling is not None and m.rope_scaling.rope_type == "yarn":
        # HF multiplies YaRN's cos and sin by the attention factor a: queries and keys both scaled by a, so the
        # scores by a^2, which is this softmax scale (the same in TE's fused RoPE and attention, THD and CP)
        kwargs["softmax_scale"] = m.rope_scaling.yarn_attention_factor() ** 2 / math.sqrt(m.kv_channels)
    elif _longrope(m) and m.partial_rotary_factor == 1:
        # longrope's a, the same way when whole heads rotate; with partial rotary: model/rotary_scale.py
        kwargs["softmax_scale"] = m.rope_scaling.longrope_attention_factor() ** 2 / math.sqrt(m.kv_channels)
    return TransformerConfig(**kwargs)


def _longrope(m) -> bool:
    return m.rope_scaling is not None and m.rope_scaling.rope_type == "longrope"


def _install_rope_scaling(model, cfg: Config) -> None:
    """llama3 / YaRN / longrope inverse frequencies on the chunk's rotary embedding (megatron 0.16 knows only
    llama3's factor). longrope: the short factors, which transformers uses for every sample of rows no longer than
    original_max_position_embeddings (longer rows are refused: config/rope_checks.py); with partial rotary its
    attention factor goes on the rotated query/key channels (model/rotary_scale.py)."""
    rs, m = cfg.model.rope_scaling, cfg.model
    if _longrope(m) and m.partial_rotary_factor != 1 and rs.longrope_attention_factor() != 1:
        install_rotary_attention_factor(model, m)
    if rs is None or not hasattr(model, "rotary_pos_emb"):
        return
    emb = model.rotary_pos_emb
    if rs.rope_type == "longrope":
        inv = longrope_inv_freq(m.rotary_dim, m.rope_theta, rs.short_factor)
    elif rs.rope_type == "yarn":
        inv = yarn_inv_freq(m.kv_channels, m.rope_theta, rs.factor, rs.original_max_position_embeddings,
                            rs.beta_fast, rs.beta_slow, rs.truncate)
    else:
        inv = llama3_inv_freq(m.kv_channels, m.rope_theta, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                              rs.original_max_position_embeddings)
    emb.inv_freq = inv.to(emb.inv_freq.device)


def _build_chunk(cfg: Config, groups: ParallelGroups, tconfig, vp_stage: int | None, use_te: bool):
    num_chunks = groups.vp_size or 1
    chunk = vp_stage or 0
    pre = groups.is_first_pp_stage and chunk == 0
    post = groups.is_last_pp_stage and chunk == num_chunks - 1
    spec = block_spec(tconfig, use_te, vp_stage, groups.pp_rank, te_op_fuser=cfg.train.te_op_fuser,
                      gemma3=cfg.model.family == "gemma3")
    with output_layer_without_apex(tconfig.gradient_accumulation_fusion) as patched:
        model = _gpt_model(cfg, tconfig, spec, groups, vp_stage, pre, post)
    if patched:
        unfuse_output_layer(model)
    if cfg.train.gradient_accumulation_fusion:
        fuse_embedding_wgrad(model)  # pure torch: on CPU too
    _install_rope_scaling(model, cfg)
    if cfg.model.family == "gemma3":
        from bft_megatron.model.gemma3 import install_gemma3

        install_gemma3(model, cfg.model)
    return model


def _gpt_model(cfg: Config, tconfig, spec, groups: ParallelGroups, vp_stage, pre: bool, post: bool):
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    return GPTModel(
        config=tconfig, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, groups.tp_size),
        max_sequence_length=max(m.max_position_embeddings, cfg.data.seq_length),
        pre_process=pre, post_process=post, parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings, position_embedding_type="rope",
        # float, as HF: megatron only computes rotary_base ** (2i / d), and int() would truncate e.g. 1e4 + 0.5
        rotary_base=m.rope_theta, rope_scaling=m.rope_scaling is not None and m.rope_scaling.rope_type == "llama3",
        rope_scaling_factor=m.rope_scaling.factor if m.rope_scaling else 8.0,
        rotary_percent=m.partial_rotary_factor,  # Phi-4-mini's partial rotary: int(kv_channels * it) channels, as HF
        pg_collection=groups.pg_collection, vp_stage=vp_stage,
    )


def build_model_chunks(cfg: Config, groups: ParallelGroups) -> tuple[list[torch.nn.Module], object]:
    """Unwrapped ``GPTModel`` chunks for this rank (no DDP / Float16Module yet) and the TransformerConfig."""
    from megatron.core import tensor_parallel

    tconfig = transformer_config(cfg, groups)
    use_te = have_te()
    if use_te:
        warn_window_backend(cfg, tconfig)
    stages = list(range(groups.vp_size)) if groups.vp_size else [None]
    chunks = [_build_chunk(cfg, groups, tconfig, vp, use_te) for vp in stages]
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if groups.device.type == "cuda":
            chunk.cuda(torch.cuda.current_device())
    return chunks, tconfig
