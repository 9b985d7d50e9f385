"""Transformer layer specs: Transformer Engine when importable, megatron-core's local modules otherwise."""

from __future__ import annotations

import functools
import importlib.util

from bft_megatron.model.layers import RMSNorm
from bft_megatron.utils.logging import get_logger

__all__ = ["have_te", "block_spec", "swap_mlp_class", "window_backend_problem", "warn_window_backend"]

_log = get_logger(__name__)
_WARNED = {"local": False}


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def block_spec(config, use_te: bool, vp_stage: int | None, pp_rank: int, te_op_fuser: bool = False,
               gemma3: bool = False):
    """The decoder-block spec for this pipeline stage / virtual chunk.

    TE: megatron-core's TE layer spec (norms fused into ``linear_qkv`` / ``linear_fc1``); with
    ``te_op_fuser`` the MLP is megatron's ``TEFusedMLP`` (TE's operation API; same parameters), with its FP8
    weights cast once per step (:mod:`bft_megatron.model.te_fused_mlp`).
    Local: megatron-core's local layer spec with :class:`RMSNorm` (sequence-parallel capable) for
    the layer norms and the final norm, and :class:`ReferenceAttention` as core attention (THD
    packing and context parallelism, like TE's; dense O(T^2) scores: fine for CPU tests, slow on GPU).
    With ``config.qk_layernorm`` (Qwen3) both specs normalise each query and key head (TE: ``TENorm``; local:
    :class:`RMSNorm` over ``kv_channels``); megatron's ``finalize_model_grads`` all-reduces those weights'
    gradients over TP by their names, since every TP rank holds other heads.
    ``gemma3``: Gemma 3's layer (:mod:`bft_megatron.model.gemma3`): post-attention / post-MLP norms in the
    row-parallel linears, per-layer RoPE in the self-attention (TE: wired, not yet run on a GPU).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm,
                                                           use_te_op_fuser=te_op_fuser)
        if te_op_fuser:
            from megatron.core.extensions.transformer_engine import TEFusedMLP

            from bft_megatron.model.te_fused_mlp import StepCachedFusedMLP

            swap_mlp_class(layer, TEFusedMLP, StepCachedFusedMLP)
        norm = TENorm
    else:
        layer, norm = _local_layer_spec(config), RMSNorm
    if gemma3:
        from bft_megatron.model.gemma3 import gemma3_layer_spec

        layer = gemma3_layer_spec(layer, use_te=use_te, norm_cls=norm)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def swap_mlp_class(layer, base: type, replacement: type) -> None:
    """Build ``replacement`` (a subclass of megatron's ``base`` MLP class) where the layer spec builds ``base``:
    megatron's ``TEFusedMLP`` -> :class:`~bft_megatron.model.te_fused_mlp.StepCachedFusedMLP` (FP8 weights cast once
    per step, as TE's ``Linear``; the same submodules and parameters).

    megatron-core <= 0.18 spells the MLP as ``ModuleSpec(module=TEFusedMLP, ...)``; 0.19 as
    ``functools.partial(TEFusedMLP.as_mlp_submodule, submodules=...)`` (a class-method builder).
    """
    mlp = layer.submodules.mlp
    func = getattr(mlp, "func", None)
    if isinstance(mlp, functools.partial) and getattr(func, "__self__", None) is base:
        layer.submodules.mlp = functools.partial(getattr(replacement, func.__name__), *mlp.args, **mlp.keywords)
    elif getattr(mlp, "module", None) is base:
        mlp.module = replacement
    else:
        raise RuntimeError(f"megatron-core's layer spec builds the MLP with {mlp!r}, not {base.__name__}: "
                           "this megatron-core version is not supported with train.te_op_fuser")


def _local_layer_spec(config):
    """megatron-core's local layer spec with :class:`RMSNorm` and :class:`ReferenceAttention` (warned once)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if not _WARNED["local"]:
        _log.warning("Transformer Engine not importable: using megatron-core's local layer spec "
                     "(dense O(T^2) reference attention: for tests and tiny models; no FP8)")
        _WARNED["local"] = True
    from bft_megatron.model.reference_attention import ReferenceAttention

    layer = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = ReferenceAttention
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    return layer


# cuDNN releases whose fused attention takes a sliding window (left, 0) with a causal mask (TE 2.x,
# common/fused_attn/fused_attn.cpp): 9.2 on padded rows, 9.6 on packed (THD) rows.
_CUDNN_WINDOW = {False: 90200, True: 90600}


def window_backend_problem(cudnn: int | None, flash_attn: str | None, dropout: float, packed: bool) -> str | None:
    """Why Transformer Engine may find no attention backend for a sliding window, or None. TE's fused (cuDNN)
    attention takes a window only without attention dropout and from the cuDNN release above; else flash-attn
    (>= 2.3 has windows) must be installed, and TE's unfused attention has no packed rows."""
    fused = cudnn is not None and cudnn >= _CUDNN_WINDOW[packed] and dropout == 0
    if fused or _version(flash_attn) >= (2, 3):
        return None
    need = _CUDNN_WINDOW[packed]
    why = (f"train.dropout={dropout} (TE's fused attention takes a window only without attention dropout)"
           if dropout else f"cuDNN {cudnn} (a window on {'packed' if packed else 'padded'} rows needs >= {need})")
    return (f"sliding-window attention under Transformer Engine: {why} and no flash-attn >= 2.3 (found "
            f"{flash_attn or 'none'}); the first forward may fail with 'No dot product attention backend is available'")


def _version(text: str | None) -> tuple[int, ...]:
    """(major, minor) of a version string; (0,) for None or an unreadable one."""
    try:
        return tuple(int(part) for part in (text or "").split(".")[:2])
    except ValueError:
        return (0,)


def warn_window_backend(cfg, tconfig) -> None:
    """Log :func:`window_backend_problem` once at model build on a GPU with TE, when some layer has a window."""
    import importlib.metadata

    import torch

    if not tconfig.window_size or not torch.cuda.is_available():
        return
    try:
        flash = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        flash = None
    problem = window_backend_problem(torch.backends.cudnn.version(), flash, cfg.train.dropout, cfg.data.packing)
    if problem:
        _log.warning("%s", problem)
