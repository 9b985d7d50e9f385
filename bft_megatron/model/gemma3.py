"""Gemma 3 text (``Gemma3ForCausalLM``) on megatron-core's ``GPTModel``: what differs from the Llama block.

* **Norms**: zero-centred RMSNorm ``x/rms * (1 + w)`` everywhere (megatron's ``layernorm_zero_centered_gamma``;
  TE's norms and our local :class:`~bft_megatron.model.layers.RMSNorm` honour it), and two more per layer: the
  output of attention and of the MLP is normalised before the residual add. They live in the row-parallel
  linear before them (:func:`post_norm_linear`: ``linear_proj.post_layernorm``, ``linear_fc2.post_layernorm``), so
  megatron's ``TransformerLayer`` (and its bias-dropout-add) stays unchanged:
  ``h = x + post_attn_norm(attn(input_norm(x)))``, ``out = h + post_ffn_norm(mlp(pre_ffn_norm(h)))``.
* **Embedding** multiplied by ``sqrt(hidden_size)``, the scale first cast to the embedding's dtype (HF's
  ``Gemma3TextScaledWordEmbedding``: 73.5 in bf16 at hidden 5376, not 73.32); the tied output layer uses the
  unscaled weight. A forward hook on ``embedding.word_embeddings`` (elementwise: any TP/SP layout).
* **Attention**: softmax scale ``query_pre_attn_scalar ** -0.5``; layers whose 1-based number is not a multiple of
  ``sliding_window_pattern`` slide a window of ``W`` tokens: query ``i`` sees keys ``i-W < j <= i`` (HF's
  ``kv_idx > q_idx - W``), which is megatron/TE's ``window_size=(W-1, 0)`` (inclusive bounds) with
  ``window_attn_skip_freq=pattern``. Sliding layers use RoPE base ``rope_local_theta`` unscaled, global ones
  ``rope_theta`` with linear scaling (inverse frequencies divided by the factor, as HF's ``linear`` type).
  :class:`Gemma3RotaryEmbedding` returns both as one tensor ``[s, 2, 1, d]`` (global, local) and
  :class:`Gemma3SelfAttention` takes its layer's half (a tensor, not a tuple, passes every megatron code path,
  activation recompute's ``save_for_backward`` included).
* **MLP**: gated gelu with the tanh approximation (HF ``gelu_pytorch_tanh``); megatron's fused bias-activation
  kernels know only silu/gelu(erf)/quick-gelu, so the fusion is off for this family.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention

__all__ = ["gelu_tanh", "gemma3_config_kwargs", "post_norm_linear", "Gemma3SelfAttention",
           "Gemma3RotaryEmbedding", "install_gemma3", "gemma3_layer_spec", "mlp_submodules"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's ``gelu_pytorch_tanh``."""
    return F.gelu(x, approximate="tanh")


def gemma3_config_kwargs(m, seq_length: int) -> dict:
    """``TransformerConfig`` arguments of a Gemma 3 model (they override the Llama ones of the builder). The window
    only where it cuts keys in rows of ``seq_length`` (``window_binds``); the pattern always (:func:`is_sliding`)."""
    window = (m.sliding_window - 1, 0) if m.window_binds(seq_length) else None  # W keys: i-(W-1) .. i inclusive
    return dict(activation_func=gelu_tanh, bias_activation_fusion=False, layernorm_zero_centered_gamma=True,
                softmax_scale=m.query_pre_attn_scalar ** -0.5, window_size=window,
                window_attn_skip_freq=m.sliding_window_pattern)


def is_sliding(config, layer_number: int) -> bool:
    """Whether layer ``layer_number`` (1-based, global over pipeline stages) is a sliding layer (HF's
    ``layer_types`` "sliding_attention"): local RoPE, and the window where ``config.window_size`` is set. By the
    pattern alone: in rows no longer than the window none is set, and the sliding layers still use local RoPE."""
    return is_layer_window_attention((1, 0), config.window_attn_skip_freq, layer_number)


def post_norm_linear(linear_cls, norm_cls):
    """A subclass of the row-parallel ``linear_cls`` that normalises its output with ``norm_cls``
    (``post_layernorm``: Gemma 3's post-attention / post-feedforward norm). The output is the full hidden state
    of each token (after the TP all-reduce; with sequence parallel a sequence shard), so the norm is per token;
    its weight is replicated over TP (sequence parallel: flagged for the TP all-reduce of its gradient)."""

    class PostNormLinear(linear_cls):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = norm_cls(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

        def forward(self, x, *args, **kwargs):
            output, bias = super().forward(x, *args, **kwargs)
            if bias is not None:  # Gemma 3 has no biases (add_bias_linear=False); a bias would be added after
                raise ValueError("post-norm linear: a bias is not supported (Gemma 3 has none)")
            return self.post_layernorm(output), None

    PostNormLinear.__name__ = PostNormLinear.__qualname__ = f"{linear_cls.__name__}PostNorm"
    return PostNormLinear


class Gemma3SelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` given its layer's RoPE: global or local half of :class:`Gemma3RotaryEmbedding`."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 4 and rotary_pos_emb.shape[1] == 2:
            half = 1 if is_sliding(self.config, self.layer_number) else 0
            # [s, 1, 1, d], contiguous: TE's fused RoPE kernel reads the frequencies by their dense layout
            rotary_pos_emb = rotary_pos_emb[:, half:half + 1].contiguous()
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class Gemma3RotaryEmbedding(RotaryEmbedding):
    """Global RoPE (``rope_theta``, inverse frequencies / ``linear_factor``) and local RoPE (``local_theta``,
    unscaled), returned together as ``[s, 2, 1, d]``: index 0 global, 1 local."""

    def __init__(self, kv_channels: int, theta: float, local_theta: float, linear_factor: float | None,
                 use_cpu_initialization: bool, cp_group) -> None:
        kw = dict(kv_channels=kv_channels, rotary_percent=1.0, use_cpu_initialization=use_cpu_initialization,
                  cp_group=cp_group)
        super().__init__(rotary_base=theta, **kw)
        if linear_factor is not None:
            self.inv_freq = self.inv_freq / linear_factor  # HF's rope_type linear: inv_freq /= factor
        self.local = RotaryEmbedding(rotary_base=local_theta, **kw)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        glob = super().forward(max_seq_len, offset, packed_seq, cp_group)  # [s, 1, 1, d], CP-sliced as megatron's
        return torch.cat((glob, self.local.forward(max_seq_len, offset, packed_seq, cp_group)), dim=1)


class _EmbeddingScale:
    """Forward hook: HF multiplies the looked-up rows by ``tensor(sqrt(hidden)).to(weight dtype)``."""

    def __init__(self, hidden_size: int) -> None:
        self.scale = torch.tensor(math.sqrt(hidden_size))  # fp32, as HF's buffer

    def __call__(self, module, inputs, output):
        # the 0-dim scale stays on the host: a CUDA kernel takes it as a scalar, while .to(output.device) was a
        # blocking host-to-device copy (a stream sync) on every micro-batch
        return output * self.scale.to(dtype=output.dtype)


def install_gemma3(model, m) -> None:
    """After ``GPTModel`` is built: the dual RoPE and (first stage) the embedding scale."""
    old = getattr(model, "rotary_pos_emb", None)
    if old is not None:
        model.rotary_pos_emb = Gemma3RotaryEmbedding(m.kv_channels, m.rope_theta, m.rope_local_theta,
                                                     m.rope_linear_factor, old.inv_freq.device.type == "cpu",
                                                     old.cp_group)  # inv_freq: a plain attribute, on the device
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if embedding is not None:
        embedding.register_forward_hook(_EmbeddingScale(m.hidden_size))


def gemma3_layer_spec(layer, use_te: bool, norm_cls):
    """Turn a Llama layer spec (TE or local, with qk norms) into Gemma 3's, in place; returns it."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TERowParallelLinear as Row
    else:
        from megatron.core.tensor_parallel import RowParallelLinear as Row
    layer.submodules.self_attention.module = Gemma3SelfAttention
    post_linear = post_norm_linear(Row, norm_cls)
    layer.submodules.self_attention.submodules.linear_proj = post_linear
    mlp_submodules(layer).linear_fc2 = post_linear
    return layer


def mlp_submodules(layer):
    """The ``MLPSubmodules`` of a layer spec's MLP: a ``ModuleSpec``'s ``submodules`` (megatron-core <= 0.18) or the
    ``submodules=`` keyword of the ``functools.partial(MLP.as_mlp_submodule, ...)`` that 0.19 builds instead."""
    mlp = layer.submodules.mlp
    return mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
