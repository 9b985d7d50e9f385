"""Range checks of numeric config fields, empty YAML sections, and HF config.json nulls.

Every value here used to pass validation (or fail with a TypeError / "must not be null") and reach megatron, torch
or the training loop: a non-finite optimizer setting, a zero collective timeout, a negative init std, ...
"""

import json

import pytest

from bft_megatron.config import ConfigError, load_config, validate
from bft_megatron.config.hf import model_fields_from_hf
from tests.test_config import cfg_with

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}


@pytest.mark.parametrize("extra, message", [
    (["parallel.timeout_minutes=0"], r"parallel.timeout_minutes must be >= 1, got 0"),
    (["parallel.timeout_minutes=-5"], r"parallel.timeout_minutes must be >= 1, got -5"),
    (["parallel.bucket_size=0"], r"parallel.bucket_size must be >= 1 or null \(megatron's default\), got 0"),
    (["parallel.bucket_size=-1"], r"parallel.bucket_size must be >= 1 or null \(megatron's default\), got -1"),
    (["model.init_method_std=-0.02"], r"model.init_method_std must be > 0, got -0.02"),
    (["model.init_method_std=0"], r"model.init_method_std must be > 0, got 0.0"),
    (["model.num_query_groups=0"], r"model.num_query_groups must be >= 1 or null \(= model.num_attention_heads\), "
                                   r"got 0"),
    (["model.rope_scaling.original_max_position_embeddings=0"],
     r"model.rope_scaling.original_max_position_embeddings must be >= 1, got 0"),
    (["train.exit_duration_minutes=0"], r"train.exit_duration_minutes must be > 0 or null \(no time limit\), got 0.0"),
    (["train.exit_duration_minutes=-1"], r"train.exit_duration_minutes must be > 0 or null \(no time limit\), "
                                         r"got -1.0"),
    (["train.seed=-1"], r"train.seed must be in \[0, 2\*\*31\), got -1"),
    (["train.seed=4294967296"], r"train.seed must be in \[0, 2\*\*31\), got 4294967296"),
    (["data.seed=-1"], r"data.seed must be >= 0, got -1"),  # without data.train sources (prepared data)
    (["data.seq_length=1"], r"data.seq_length must be >= 2 \(a prompt token and a target\), got 1"),
    # The boundary of each "> 0" check: 0 itself is out of range.
    (["model.rope_theta=0"], r"model.rope_theta must be > 0, got 0.0"),
    (["model.norm_epsilon=0"], r"model.norm_epsilon must be > 0, got 0.0"),
    (["model.rope_scaling.factor=0"], r"model.rope_scaling.factor must be > 0, got 0.0"),
    (["model.rope_scaling.low_freq_factor=0"], r"needs high_freq_factor > low_freq_factor > 0, got 4.0 and 0.0"),
    (["train.lr=0", "train.min_lr=0"], r"train.lr must be > 0, got 0.0"),
    (["loss.eps=0"], r"loss.eps must be > 0, got 0.0"),
    (["logging.peak_tflops=0"], r"logging.peak_tflops must be > 0 or null \(auto\), got 0.0"),
    (["train.global_batch_size=0"], r"train.global_batch_size must be > 0, got 0"),
    (["train.train_iters=0", "train.warmup_iters=0"], r"train.train_iters must be > 0, got 0"),
])
def test_out_of_range_values_are_rejected(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_with(*extra), 1)


@pytest.mark.parametrize("field", [
    "train.lr", "train.min_lr", "train.weight_decay", "train.adam_beta1", "train.adam_beta2", "train.adam_eps",
    "train.clip_grad", "train.exit_duration_minutes", "train.dropout", "model.init_method_std", "model.rope_theta",
    "model.norm_epsilon", "model.rope_scaling.factor", "model.rope_scaling.low_freq_factor",
    "model.rope_scaling.high_freq_factor", "loss.gamma", "loss.eps", "logging.peak_tflops"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} must be a finite number, got {value}$"):
        validate(cfg_with(f"{field}={value}"), 1)


def test_of_several_non_finite_floats_the_first_is_named_with_its_own_value():
    with pytest.raises(ConfigError, match=r"^train.lr must be a finite number, got inf$"):
        validate(cfg_with("train.lr=inf", "train.min_lr=nan"), 1)


def test_non_finite_source_weights_are_named_with_their_index():
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight must be a finite number, got inf"):
        validate(cfg_with("data.train=[a.jsonl, b.jsonl:inf]"), 1)


def test_the_new_checks_accept_the_defaults_and_sensible_values():
    assert validate(cfg_with("parallel.bucket_size=null", "train.exit_duration_minutes=null"), 1).dp == 1
    assert validate(cfg_with("parallel.bucket_size=40000000", "parallel.timeout_minutes=1", "train.seed=0",
                             "train.exit_duration_minutes=0.5", "model.rope_scaling.factor=8"), 1).dp == 1


def test_an_empty_yaml_section_means_all_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\nloss:\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(str(path), ["loss.gamma=2"])
    assert cfg.train == type(cfg.train)() and cfg.loss.gamma == 2.0 and cfg.model.hidden_size == 64
    # An optional section left empty stays off (rope_scaling: null = no scaling), as documented.
    path.write_text("model:\n  rope_scaling:\n")
    assert load_config(str(path)).model.rope_scaling is None


def test_hf_null_num_key_value_heads_means_multi_head_attention(tmp_path):
    fields = model_fields_from_hf({**LLAMA, "num_key_value_heads": None})
    assert fields["num_query_groups"] == 4  # transformers: None = num_attention_heads
    # Other optional keys written as null take the same default as when they are absent.
    nulls = model_fields_from_hf({**LLAMA, "max_position_embeddings": None, "rope_theta": None,
                                  "rms_norm_eps": None, "tie_word_embeddings": None, "rope_scaling": None})
    assert nulls == model_fields_from_hf(LLAMA)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_key_value_heads": None}))
    assert load_config(None, [f"model.from_hf={tmp_path}"]).model.kv_groups == 4


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "vocab_size"])
def test_hf_required_keys_missing_or_null_are_config_errors(key):
    with pytest.raises(ConfigError, match=rf"model.from_hf: config.json has no {key} \(or it is null\)"):
        model_fields_from_hf({**LLAMA, key: None})
    with pytest.raises(ConfigError, match=rf"model.from_hf: config.json has no {key}"):
        model_fields_from_hf({k: v for k, v in LLAMA.items() if k != key})


def test_hf_null_rope_theta_takes_rope_parameters_theta():
    """A config.json with ``rope_theta: null`` beside transformers-5 ``rope_parameters``: null means absent, so the
    theta in rope_parameters applies (it silently became 10000, the class default, a different model)."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    fields = model_fields_from_hf({**LLAMA, "rope_theta": None, "rope_parameters": rope})
    assert fields["rope_theta"] == 500000.0 == model_fields_from_hf({**LLAMA, "rope_parameters": rope})["rope_theta"]


@pytest.mark.parametrize("broken", [{"factor": None}, {"low_freq_factor": None},
                                    {"original_max_position_embeddings": None}])
def test_hf_llama3_rope_scaling_with_a_missing_key_is_a_config_error(broken):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    fields = model_fields_from_hf({**LLAMA, "rope_scaling": scaling})
    assert fields["rope_scaling"].factor == 8.0
    [key] = broken
    with pytest.raises(ConfigError, match=f"llama3 rope_scaling has no {key} \\(or it is null\\)"):
        model_fields_from_hf({**LLAMA, "rope_scaling": {**scaling, **broken}})
    absent = {k: v for k, v in scaling.items() if k != key}
    with pytest.raises(ConfigError, match=f"llama3 rope_scaling has no {key} "):
        model_fields_from_hf({**LLAMA, "rope_scaling": absent})
