"""Gemma 3 text (``Gemma3ForCausalLM``: gemma-3-1b, MedGemma-27B-text): config.json read in both spellings (Hub /
transformers 4.x and transformers 5) with Gemma3TextConfig's defaults, what the trainer does not compute refused by
name, config errors, the name table against transformers' state dict, the synthesised export config, the
zero-centred RMSNorm against transformers' and the planner's parameter count. Logits against transformers (TP1,
TP2, PP2, packed, past the window): test_model_gemma3_logits; import/export round trip and loading the export:
test_convert_e2e (``gemma3_tied``, ``gemma3_1b_bf16``); fine-tune + live export at TP2: test_convert_finetune."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bft_megatron.config import ConfigError, load_config
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.plan import layer_params, total_params
from bft_megatron.config.schema import ModelConfig
from bft_megatron.config.validate import validate
from bft_megatron.convert.mapping import global_rules, model_layer_rules, rule_by_megatron_name
from bft_megatron.data.tokenize import encode
from bft_megatron.data.tokenizer import load_tokenizer
from bft_megatron.model.layers import RMSNorm
from tests.data_fixtures import hf_tokenizer
from tests.launch import TINY
from tests.test_data_templates import ANSWERS, CONV, NO_SYSTEM as CONV_NO_SYSTEM, supervised_runs

# google/medgemma-27b-text-it's config.json (architecture keys), as published (transformers 4.5x spelling)
MEDGEMMA_27B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 128,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 5376, "intermediate_size": 21504,
    "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "sliding_window": 1024,
    "sliding_window_pattern": 6, "vocab_size": 262144, "bos_token_id": 2, "eos_token_id": [1, 106],
    "pad_token_id": 0, "torch_dtype": "bfloat16", "cache_implementation": "hybrid"}
# google/gemma-3-1b-it: MQA, head_dim 256 (4 x 256 = 1024 != 1152), no RoPE scaling, window 512
GEMMA3_1B = dict(MEDGEMMA_27B, head_dim=256, hidden_size=1152, intermediate_size=6912, max_position_embeddings=32768,
                 num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, query_pre_attn_scalar=256,
                 rope_scaling=None, rope_local_base_freq=10000, rope_theta=1000000, sliding_window=512)
GEMMA = ["model.family=gemma3", "model.qk_norm=true", "model.sliding_window=8", "model.sliding_window_pattern=2",
         "model.rope_local_theta=10000", "model.query_pre_attn_scalar=16", "model.tie_embeddings=true"]


def test_medgemma_27b_config_json_reads_as_gemma3_fields():
    f = model_fields_from_hf(MEDGEMMA_27B)
    assert (f["family"], f["num_layers"], f["num_query_groups"], f["head_dim"], f["query_pre_attn_scalar"]) == \
        ("gemma3", 62, 16, 128, 168.0)
    assert (f["sliding_window"], f["sliding_window_pattern"], f["rope_theta"], f["rope_local_theta"],
            f["rope_linear_factor"], f["rope_scaling"]) == (1024, 6, 1e6, 1e4, 8.0, None)
    assert (f["tie_embeddings"], f["qk_norm"], f["qkv_bias"], f["norm_epsilon"]) == (True, True, False, 1e-6)
    m = ModelConfig(**f)
    assert (m.kv_channels, m.query_size) == (128, 4096)  # queries narrower than hidden 5376
    one_b = model_fields_from_hf(GEMMA3_1B)
    assert (one_b["head_dim"], one_b["num_query_groups"], one_b["rope_linear_factor"], one_b["sliding_window"]) == \
        (256, 1, None, 512)


@pytest.mark.parametrize("hub", [MEDGEMMA_27B, GEMMA3_1B], ids=["medgemma-27b", "gemma-3-1b"])
def test_the_transformers5_spelling_reads_the_same(hub):
    """transformers 5 writes rope_parameters per layer type and layer_types (what its save_pretrained gives)."""
    from transformers import Gemma3TextConfig

    saved = Gemma3TextConfig(**hub).to_dict()
    assert "full_attention" in saved["rope_parameters"] and len(saved["layer_types"]) == hub["num_hidden_layers"]
    assert model_fields_from_hf(saved) == model_fields_from_hf(hub)


def test_absent_keys_read_as_gemma3textconfig_defaults():
    from transformers import Gemma3TextConfig

    absent = ("head_dim", "num_key_value_heads", "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern",
              "rope_theta", "rope_local_base_freq", "rope_scaling", "tie_word_embeddings", "rms_norm_eps")
    bare = {k: v for k, v in MEDGEMMA_27B.items() if k not in absent}
    f, ref = model_fields_from_hf(bare), Gemma3TextConfig(**bare)
    assert (f["head_dim"], f["num_query_groups"], f["query_pre_attn_scalar"], f["sliding_window"]) == \
        (ref.head_dim, ref.num_key_value_heads, ref.query_pre_attn_scalar, ref.sliding_window) == (256, 4, 256, 4096)
    assert f["rope_theta"] == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert f["rope_local_theta"] == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert f["tie_embeddings"] is ref.tie_word_embeddings is True
    full = [i for i, t in enumerate(ref.layer_types) if t == "full_attention"]
    assert full == [i for i in range(62) if (i + 1) % f["sliding_window_pattern"] == 0]


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Gemma2ForCausalLM"]}, r"\['Gemma2ForCausalLM'\]: Gemma 2 .*softcapping.* is not supported"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "multimodal Gemma 3 checkpoint .* is not supported"),
    ({"architectures": ["GemmaForCausalLM"]}, r"\['GemmaForCausalLM'\]: Gemma 1 is not supported"),
    ({"final_logit_softcapping": 30.0}, r"final_logit_softcapping=30.0 \(Gemma 2's logit softcapping\)"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_scaling with rope_type='yarn' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0},
                          "sliding_attention": {"rope_type": "default"}}},
     "rope_parameters.full_attention with rope_type='dynamic'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention with rope_type='linear'"),
    ({"layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 60}, r"full_attention at layers \[0, 1\]"),
    ({"layer_types": ["sliding_attention"] * 61}, "for each of the 62 layers"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"sliding_window": None}, "sliding_window=null with sliding layers"),
])
def test_what_the_trainer_does_not_compute_is_refused_by_name(change, message):
    with pytest.raises(ConfigError, match="model.from_hf: .*" + message):
        model_fields_from_hf({**MEDGEMMA_27B, **change})


def test_a_periodic_layer_types_list_gives_its_pattern():
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    f = model_fields_from_hf({**MEDGEMMA_27B, "num_hidden_layers": 6, "layer_types": types})
    assert f["sliding_window_pattern"] == 3


@pytest.mark.parametrize("overrides, message", [
    (GEMMA + ["model.qk_norm=false"], "model.qk_norm=false with model.family=gemma3"),
    (GEMMA + ["model.rope_local_theta=null"], "model.rope_local_theta must be > 0 with model.family=gemma3, got None"),
    (GEMMA + ["model.sliding_window_pattern=0"], "model.sliding_window_pattern must be > 0 .* got 0"),
    (GEMMA + ["model.rope_linear_factor=-1"], "model.rope_linear_factor must be > 0 or null"),
    (GEMMA + ["model.sliding_window=null"], "model.sliding_window=null with model.family=gemma3"),
    (GEMMA + ["model.rope_scaling.factor=8.0"], r"model.rope_scaling \(llama3/yarn\) is set with model.family=gemma3"),
    (GEMMA + ["train.te_op_fuser=true"], "train.te_op_fuser=true with model.family=gemma3"),
    (["model.sliding_window_pattern=6"], "model.sliding_window_pattern=6 with model.family=llama: only Gemma 3"),
    (["model.family=mistral", "model.query_pre_attn_scalar=16"], "model.query_pre_attn_scalar=16.0 with model.family"),
])
def test_inconsistent_gemma3_fields_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, TINY + overrides), world_size=1, require_te=False)


def test_rows_longer_than_the_window_validate():
    """Gemma 3 applies its window (seq 32 over a window of 8), and so does Mistral now (every layer; its own test in
    test_model_mistral)."""
    validate(load_config(None, TINY + GEMMA), world_size=1, require_te=False)
    validate(load_config(None, TINY + ["model.family=mistral", "model.sliding_window=8"]), world_size=1,
             require_te=False)


def test_context_parallelism_with_the_window_runs_all_to_all_under_transformer_engine(monkeypatch):
    """TE's p2p context parallelism asserts on a sliding window: where the window applies, CP > 1 gets TE's
    all-to-all CP (cp_comm_type a2a), which splits each TP rank's heads over the CP ranks, so the (key/value) heads
    per rank must be multiples of parallel.cp (refused by name before anything is built). Without TE (reference
    attention) any CP runs (tests/test_train_gemma3.py). Rows no longer than the window keep megatron's p2p."""
    import importlib

    from bft_megatron.model.builder import transformer_config

    validate_mod = importlib.import_module("bft_megatron.config.validate")  # the package exports the function
    cpu = SimpleNamespace(device=torch.device("cpu"), vp_size=None)
    four = load_config(None, TINY + GEMMA + ["parallel.cp=4"])  # 4 heads, 2 key/value heads: 2 % 4
    validate(four, world_size=4, require_te=False)  # the reference attention: any CP
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: True)
    for cp in (2, 4):
        cfg = load_config(None, TINY + GEMMA + [f"parallel.cp={cp}"])
        if cp == 2:
            validate(cfg, world_size=2, require_te=False)
        else:
            with pytest.raises(ConfigError, match=r"parallel.cp=4 with model.family=gemma3 under Transformer Engine: "
                               r"the window applies .* heads per tensor-parallel rank \(4 = model.num_attention_heads"
                               r" / parallel.tp\) and the key/value heads per rank \(2 = model.num_query_groups"):
                validate(cfg, world_size=4, require_te=False)
        assert transformer_config(cfg, cpu).cp_comm_type == "a2a"
    # rows no longer than the window: it cuts nothing, is left off, and TE's p2p CP takes the model at any cp
    short = load_config(None, TINY + GEMMA + ["parallel.cp=4", "data.seq_length=8"])
    validate(short, world_size=4, require_te=False)
    assert transformer_config(short, cpu).cp_comm_type is None
    assert transformer_config(load_config(None, TINY + GEMMA), cpu).cp_comm_type is None  # cp 1


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**model_fields_from_hf({**MEDGEMMA_27B, "hidden_size": 64, "intermediate_size": 96,
                                               "num_hidden_layers": 3, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 300, **kw}))


def test_the_name_table_is_gemma3s_state_dict():
    """The HF names the rules read and write are exactly Gemma3ForCausalLM's parameters (four norms per layer,
    q_norm/k_norm, no lm_head: tied), and the post-norms sit in the row-parallel linears under both specs."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from bft_megatron.convert.hf_config import _synthesised_config

    m = _tiny()
    names = {n for r in global_rules(m.tie_embeddings) for n in r.hf_names()}
    names |= {n for i in range(m.num_layers) for r in model_layer_rules(m) for n in r.hf_names(i)}
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_synthesised_config(m)))
    assert names == set(model.state_dict()) - {"lm_head.weight"}
    for spec in ("local", "te"):
        rule = rule_by_megatron_name("mlp.linear_fc2.post_layernorm.weight", spec, False, True, False, True)
        assert rule.hf == ("model.layers.{i}.post_feedforward_layernorm.weight",)
        rule = rule_by_megatron_name("self_attention.linear_proj.post_layernorm.weight", spec, False, True, False, True)
        assert rule.hf == ("model.layers.{i}.post_attention_layernorm.weight",)
    pre = rule_by_megatron_name("mlp.linear_fc1.layer_norm_weight", "te", False, True, False, True)
    assert pre.hf == ("model.layers.{i}.pre_feedforward_layernorm.weight",)
    # Llama's table is unchanged: its post_attention_layernorm is the pre-MLP norm
    assert rule_by_megatron_name("pre_mlp_layernorm.weight", "local").hf == \
        ("model.layers.{i}.post_attention_layernorm.weight",)


@pytest.mark.parametrize("hub", [MEDGEMMA_27B, GEMMA3_1B], ids=["medgemma-27b", "gemma-3-1b"])
def test_a_synthesised_export_config_reads_back_as_the_same_gemma3(hub):
    from transformers import AutoConfig

    from bft_megatron.convert.hf_config import _synthesised_config

    m = ModelConfig(**model_fields_from_hf(hub))
    config = _synthesised_config(m)
    assert (config["architectures"], config["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    back = AutoConfig.for_model(**config)
    ref = AutoConfig.for_model(**hub)
    assert type(back).__name__ == "Gemma3TextConfig"
    for key in ("layer_types", "rope_parameters", "sliding_window", "query_pre_attn_scalar", "head_dim"):
        assert getattr(back, key) == getattr(ref, key), key
    assert back.pad_token_id is None and back.eos_token_id is None  # the tokenizer's come later
    assert ModelConfig(**model_fields_from_hf(config)) == m
    # transformers 4.x keys too (what the Hub's files carry)
    assert (config["rope_local_base_freq"], config["sliding_window_pattern"]) == (1e4, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centred_rmsnorm_is_gemma3s_bit_for_bit(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    config = SimpleNamespace(params_dtype=dtype, sequence_parallel=False, layernorm_zero_centered_gamma=True)
    ours, ref = RMSNorm(config, 96, eps=1e-6), Gemma3RMSNorm(96, eps=1e-6).to(dtype)
    assert torch.equal(ours.weight, torch.zeros(96, dtype=dtype))  # identity at initialisation, as HF's
    with torch.no_grad():
        w = 0.3 * torch.randn(96, generator=torch.Generator().manual_seed(0))
        ours.weight.copy_(w)
        ref.weight.copy_(w)
        x = (2.0 * torch.randn(7, 96, generator=torch.Generator().manual_seed(1))).to(dtype)
        assert torch.equal(ours(x), ref(x))
        ours.zero_centered = False  # Llama's x/rms * w with the same stored weight: another function
        assert not torch.allclose(ours(x).float(), ref(x).float(), atol=1e-2)


def test_planner_counts_match_transformers_and_the_published_size():
    """Four norms and two head norms per layer, tied embedding: transformers' own count; MedGemma-27B: 27.0B
    (Google: 27B, the text model of gemma-3-27b without its 0.4B vision tower)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from bft_megatron.convert.hf_config import _synthesised_config

    m = _tiny()
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_synthesised_config(m)))
    assert total_params(m) == sum(p.numel() for p in model.parameters())
    assert layer_params(m) == sum(p.numel() for p in model.model.layers[0].parameters())
    assert total_params(ModelConfig(**model_fields_from_hf(MEDGEMMA_27B))) / 1e9 == pytest.approx(27.0, abs=0.1)


def test_transformer_config_of_gemma3_and_llamas_unchanged():
    """Gemma 3: window (W-1, 0) (megatron/TE bounds are inclusive: W keys) on layers not a multiple of the pattern,
    softmax scale query_pre_attn_scalar**-0.5, zero-centred norms, gated tanh-gelu without the fused kernel
    (megatron's knows silu/erf-gelu only). Llama's config keeps none of it."""
    import torch.nn.functional as F
    from megatron.core.transformer.utils import is_layer_window_attention

    from bft_megatron.model.builder import transformer_config
    from bft_megatron.model.gemma3 import gelu_tanh

    cpu = SimpleNamespace(device=torch.device("cpu"), vp_size=None)
    tc = transformer_config(load_config(None, TINY + GEMMA), cpu)
    assert (tc.window_size, tc.window_attn_skip_freq, tc.softmax_scale) == ((7, 0), 2, 16 ** -0.5)
    assert tc.layernorm_zero_centered_gamma and tc.activation_func is gelu_tanh and tc.gated_linear_unit
    assert not tc.bias_activation_fusion and tc.qk_layernorm
    assert [is_layer_window_attention(tc.window_size, tc.window_attn_skip_freq, n) for n in (1, 2, 3, 4)] == \
        [True, False, True, False]  # HF: layer i (0-based) global iff (i+1) % pattern == 0
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(gelu_tanh(x), torch.nn.GELU(approximate="tanh")(x))  # HF's gelu_pytorch_tanh
    llama = transformer_config(load_config(None, TINY), cpu)
    assert (llama.window_size, llama.softmax_scale, llama.layernorm_zero_centered_gamma) == (None, None, False)
    assert llama.activation_func is F.silu


@pytest.mark.parametrize("seq_length, window", [(8, None), (9, (7, 0))])
def test_gemma3_window_only_in_rows_longer_than_it(seq_length, window):
    """The window (8) is set only where it cuts keys (rows of 9+ tokens; the planner counts it likewise); the
    sliding layers are the pattern's either way (their local RoPE: logits in test_model_gemma3_logits)."""
    from bft_megatron.config.plan import flops_per_token
    from bft_megatron.model.builder import transformer_config
    from bft_megatron.model.gemma3 import is_sliding

    cfg = load_config(None, TINY + GEMMA + [f"data.seq_length={seq_length}"])
    tc = transformer_config(cfg, SimpleNamespace(device=torch.device("cpu"), vp_size=None))
    assert (tc.window_size, tc.window_attn_skip_freq) == (window, 2)
    assert [is_sliding(tc, n) for n in (1, 2, 3, 4)] == [True, False, True, False]
    assert cfg.model.window_binds(seq_length) == (window is not None)
    llama = load_config(None, TINY + [f"data.seq_length={seq_length}"]).model
    unwindowed = replace(cfg.model, sliding_window=None)
    dense = flops_per_token(cfg.model, seq_length) == flops_per_token(unwindowed, seq_length)
    assert dense == (window is None) and not llama.window_binds(seq_length)


def test_the_te_layer_spec_gets_gemma3s_modules(monkeypatch):
    """TE is not installed here: the wiring of the TE spec (post-norm TE row-parallel linears, the per-layer RoPE
    attention) is checked against stand-in TE classes; running it needs a GPU (tests/test_convert_gpu.py)."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from bft_megatron.model.gemma3 import Gemma3SelfAttention, gemma3_layer_spec, mlp_submodules

    class FakeRow:
        def __init__(self, input_size, output_size, *, config, **kwargs):
            self.output_size = output_size

    monkeypatch.setattr(te, "TERowParallelLinear", FakeRow)
    norm = SimpleNamespace  # a stand-in for TENorm(config=, hidden_size=, eps=)
    layer = gemma3_layer_spec(get_gpt_layer_local_spec(qk_layernorm=True), use_te=True, norm_cls=norm)
    attn = layer.submodules.self_attention
    assert attn.module is Gemma3SelfAttention
    proj = attn.submodules.linear_proj(16, 8, config=SimpleNamespace(layernorm_epsilon=1e-6))
    assert isinstance(proj, FakeRow) and proj.post_layernorm.hidden_size == 8
    assert mlp_submodules(layer).linear_fc2 is attn.submodules.linear_proj


@pytest.mark.parametrize("conv", [CONV, CONV_NO_SYSTEM], ids=["system", "nosystem"])
def test_gemma3_template_writes_one_bos_and_supervises_each_model_turn(conv):
    """Gemma 3's template writes <bos> itself (its tokenizer would add another one when asked for special tokens:
    the data layer does not ask), merges the system prompt into the first user turn and names the answerer
    'model'; each answer plus <end_of_turn> is supervised (the newline after it, and the turn headers, are not)."""
    tok = load_tokenizer(hf_tokenizer("gemma3"))
    assert tok._tok("x").input_ids[0] == tok.bos_id  # the fixture adds <bos> like Gemma's tokenizer
    enc = encode(conv, "tokenizer", tok)
    assert enc.tokens[0] == tok.bos_id and tok.bos_id not in enc.tokens[1:].tolist()
    text = tok.decode(enc.tokens.tolist())
    assert text.count("<start_of_turn>model\n") == 2 and "assistant" not in text
    assert ("Be brief.\n\nWhat is microcephaly?" in text) == (conv is CONV)
    assert [tok.decode(r) for r in supervised_runs(enc)] == [a + "<end_of_turn>" for a in ANSWERS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_scale_is_gemma3s_bit_for_bit(dtype):
    """sqrt(hidden) cast to the embedding dtype first (bf16 at 5376: 73.5, not 73.32), as HF's scaled embedding."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from bft_megatron.model.gemma3 import _EmbeddingScale

    hidden = 5376
    ref = Gemma3TextScaledWordEmbedding(16, hidden, 0, embed_scale=hidden ** 0.5).to(dtype)
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        looked_up = torch.nn.functional.embedding(ids, ref.weight)
        assert torch.equal(_EmbeddingScale(hidden)(None, (ids,), looked_up), ref(ids))


def test_flops_count_the_window_of_the_sliding_layers():
    """Attention FLOPs per token: a global layer's causal half (seq/2 keys per query, Megatron's count), a sliding
    layer's mean of min(i, W) keys over the row, counted here by brute force; no change while seq <= W."""
    import dataclasses

    from bft_megatron.config.plan import flops_per_token

    seq = 16
    m = _tiny(sliding_window=4, sliding_window_pattern=2)  # layers 1 and 3 slide, layer 2 is global
    sliding = sum(min(i, 4) for i in range(1, seq + 1)) / seq
    dense = 64 * m.qkv_size + m.query_size * 64 + 3 * 64 * 96
    want = 3 * (2 * sum(dense + 2 * m.query_size * keys for keys in (sliding, seq / 2, sliding)) + 2 * 64 * 384)
    assert flops_per_token(m, seq) == pytest.approx(want, rel=1e-12)
    wide = dataclasses.replace(m, sliding_window=seq)  # the window covers the row: every layer counts as global
    assert flops_per_token(wide, seq) == flops_per_token(dataclasses.replace(wide, sliding_window_pattern=1), seq)
