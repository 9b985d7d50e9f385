"""Declarative HF <-> megatron-core parameter name table for Llama-3.x, Qwen2.x, Qwen3 (dense), Mistral, Phi3 and
Gemma 3 (text).

Megatron names are *layer-local* (``self_attention.linear_qkv.weight``) for per-layer rules and
model-global (``embedding.word_embeddings.weight``) for the others. In a model's ``state_dict`` a
layer-local name appears as ``decoder.layers.<local index>.<name>``; in a dist checkpoint as the
sharded key ``decoder.layers.<name>`` with a leading layer axis of size ``num_layers``.

The two layer specs differ only in where the RMSNorm weights live: Transformer Engine fuses them
into the following linear (``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``);
the local spec has separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules. Qwen3's per-head query and
key norms (``q_norm`` / ``k_norm``, ``[head_dim]`` each, replicated over TP) are ``self_attention.q_layernorm`` /
``k_layernorm`` under both specs.

``kind`` says how HF tensors combine into one megatron tensor:

* ``copy``    - one HF tensor, same layout;
* ``qkv``     - q, k, v projections interleaved per query group (see :mod:`.qkv`);
* ``gate_up`` - gate and up projections concatenated (per TP shard in memory, see :mod:`.qkv`);
* ``vocab``   - one HF tensor, rows padded to megatron's padded vocabulary size.

Phi3 (``Phi3ForCausalLM``: Phi-3, phi-4) is Llama's model with two HF tensors fused: ``qkv_proj``
``[q; k; v]`` (rows ``heads*d``, ``groups*d``, ``groups*d``, not interleaved per group) and ``gate_up_proj``
``[gate; up]`` (``Phi3MLP`` chunks it in that order). Its rules (``fused=True``) name the one fused tensor; the
``qkv`` / ``gate_up`` transforms split it by those row counts (:mod:`.tensors`), so the megatron side is Llama's.

Gemma 3 (``Gemma3ForCausalLM``) normalises the output of attention and of the MLP too: ``post_attention_layernorm``
maps to ``self_attention.linear_proj.post_layernorm`` and ``post_feedforward_layernorm`` to
``mlp.linear_fc2.post_layernorm`` (the norm lives in the row-parallel linear before it, see
:mod:`bft_megatron.model.gemma3`), ``pre_feedforward_layernorm`` to the pre-MLP norm. Its norm weights are HF's
zero-centred ``w`` of ``x/rms * (1 + w)``, copied as they are.

``tp_axis`` is the axis megatron splits over tensor-parallel ranks (0 = column parallel /
vocab parallel, 1 = row parallel, None = replicated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Rule", "SPECS", "GLOBAL_RULES", "LAYER_RULES", "FUSED_FAMILIES", "SANDWICH_FAMILIES", "layer_rules",
           "model_layer_rules", "global_rules", "rule_by_megatron_name", "detect_spec"]

Kind = Literal["copy", "qkv", "gate_up", "vocab"]
SPECS = ("local", "te")


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is made of."""

    local: str  # megatron name under the local spec
    hf: tuple[str, ...]  # HF names; ``{i}`` is the (global) layer index
    kind: Kind = "copy"
    tp_axis: int | None = None
    te: str | None = None  # megatron name under the TE spec, when different
    bias: bool = False  # exists only for models with QKV bias (Qwen2)
    qk_norm: bool = False  # exists only for models with query/key norms (Qwen3)
    fused: bool = False  # ``hf`` is one HF tensor holding the parts of a qkv / gate_up rule (Phi3)

    def megatron(self, spec: str) -> str:
        if spec not in SPECS:
            raise ValueError(f"unknown layer spec {spec!r}; expected one of {SPECS}")
        return self.te if spec == "te" and self.te else self.local

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf)


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         te="self_attention.linear_qkv.layer_norm_weight"),
    Rule("self_attention.linear_qkv.weight", (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight",
                                              f"{_ATTN}.v_proj.weight"), kind="qkv", tp_axis=0),
    Rule("self_attention.linear_qkv.bias", (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
         kind="qkv", tp_axis=0, bias=True),
    Rule("self_attention.q_layernorm.weight", (f"{_ATTN}.q_norm.weight",), qk_norm=True),
    Rule("self_attention.k_layernorm.weight", (f"{_ATTN}.k_norm.weight",), qk_norm=True),
    Rule("self_attention.linear_proj.weight", (f"{_ATTN}.o_proj.weight",), tp_axis=1),
    Rule("pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         te="mlp.linear_fc1.layer_norm_weight"),
    Rule("mlp.linear_fc1.weight", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), kind="gate_up", tp_axis=0),
    Rule("mlp.linear_fc2.weight", (f"{_MLP}.down_proj.weight",), tp_axis=1),
)

# Phi3's fused HF tensors: the same megatron tensors as the Llama rules they replace
_FUSED_RULES: tuple[Rule, ...] = (
    Rule("self_attention.linear_qkv.weight", (f"{_ATTN}.qkv_proj.weight",), kind="qkv", tp_axis=0, fused=True),
    Rule("mlp.linear_fc1.weight", (f"{_MLP}.gate_up_proj.weight",), kind="gate_up", tp_axis=0, fused=True),
)
FUSED_FAMILIES = frozenset({"phi3"})  # model.family values whose HF checkpoints use _FUSED_RULES

# Gemma 3's four norms per layer: HF's post_attention_layernorm is the norm *after* attention (megatron: inside
# linear_proj), pre_feedforward_layernorm the one before the MLP (Llama's post_attention_layernorm), and
# post_feedforward_layernorm the one after it (inside linear_fc2). Same names under both specs.
_PRE_MLP_NORM = Rule("pre_mlp_layernorm.weight", ("model.layers.{i}.pre_feedforward_layernorm.weight",),
                     te="mlp.linear_fc1.layer_norm_weight")
_POST_ATTN_NORM = Rule("self_attention.linear_proj.post_layernorm.weight",
                       ("model.layers.{i}.post_attention_layernorm.weight",))
_POST_MLP_NORM = Rule("mlp.linear_fc2.post_layernorm.weight", ("model.layers.{i}.post_feedforward_layernorm.weight",))
SANDWICH_FAMILIES = frozenset({"gemma3"})  # model.family values with the four-norm layer

EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), kind="vocab", tp_axis=0)
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",))
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), kind="vocab", tp_axis=0)
GLOBAL_RULES: tuple[Rule, ...] = (EMBEDDING, FINAL_NORM, OUTPUT)


def layer_rules(qkv_bias: bool, qk_norm: bool = False, fused: bool = False,
                sandwich: bool = False) -> tuple[Rule, ...]:
    """Per-layer rules for a model with or without QKV bias and query/key norms; ``fused``: Phi3's HF tensors
    (``model.family in FUSED_FAMILIES``), in the place of the Llama rules of the same megatron tensors;
    ``sandwich``: Gemma 3's norms after attention and after the MLP (``model.family in SANDWICH_FAMILIES``)."""
    by_local = {r.local: r for r in _FUSED_RULES} if fused else {}
    if sandwich:
        by_local[_PRE_MLP_NORM.local] = _PRE_MLP_NORM
    rules = []
    for r in LAYER_RULES:
        if (qkv_bias or not r.bias) and (qk_norm or not r.qk_norm):
            rules.append(by_local.get(r.local, r))
            if sandwich and r.local == "self_attention.linear_proj.weight":
                rules.append(_POST_ATTN_NORM)
    return tuple(rules) + ((_POST_MLP_NORM,) if sandwich else ())


def model_layer_rules(m) -> tuple[Rule, ...]:
    """:func:`layer_rules` of a :class:`~bft_megatron.config.schema.ModelConfig`."""
    return layer_rules(m.qkv_bias, m.qk_norm, m.family in FUSED_FAMILIES, m.family in SANDWICH_FAMILIES)


def global_rules(tied: bool) -> tuple[Rule, ...]:
    """Embedding, final norm and (untied models only) the output layer."""
    return tuple(r for r in GLOBAL_RULES if not (tied and r is OUTPUT))


def rule_by_megatron_name(name: str, spec: str, qkv_bias: bool = True, qk_norm: bool = True,
                          fused: bool = False, sandwich: bool = False) -> Rule:
    """The rule whose megatron name (layer-local or global) under ``spec`` is ``name``."""
    for rule in layer_rules(qkv_bias, qk_norm, fused, sandwich) + GLOBAL_RULES:
        if rule.megatron(spec) == name:
            return rule
    raise KeyError(f"no HF mapping for megatron parameter {name!r} (spec {spec!r})")


def detect_spec(names) -> str:
    """``te`` or ``local`` from a collection of megatron names (checkpoint keys or state-dict names)."""
    te_marker = LAYER_RULES[0].te
    local_marker = LAYER_RULES[0].local
    if any(n.endswith(te_marker) for n in names):
        return "te"
    if any(n.endswith(local_marker) for n in names):
        return "local"
    raise ValueError(f"cannot tell the layer spec: neither {te_marker!r} nor {local_marker!r} among the names")
